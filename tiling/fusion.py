"""Find the tileable prefix of a traced graph, number its layers and split it into stages.

A fused stage is the largest set of nodes, closed under predecessors, in which every op is local and
every tensor operand is in the set or a constant. We walk the graph once in topological order, so a
node joins the set exactly when all of its map operands already did. Every node that reads the set
but cannot join it is recorded as a :class:`Stop`, which is how the plan explains where and why
fusion ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx

from .errors import NotTileable
from .ops import Classifier, OpSpec, Stop


@dataclass
class Layer:
    """A conv, pool or upsample with the pads before it and the pointwise ops after it."""

    index: int
    anchor: str
    kind: str
    out_shape: tuple[int, int, int]
    nodes: list[str] = field(default_factory=list)


@dataclass
class Fusion:
    """The tileable prefix of a graph: local ops in topological order, their layers and the stops."""

    gm: fx.GraphModule
    input_name: str
    specs: dict[str, OpSpec]  # topological order
    layer_of: dict[str, int]
    layers: list[Layer]
    stops: list[Stop]
    users: dict[str, list[str]]  # every node's users, by name, the output node included

    def nodes_in_layers(self, lo: int, hi: int) -> list[str]:
        return [n for n in self.specs if lo <= self.layer_of[n] < hi]


def analyze(gm: fx.GraphModule, upto: int | str | None = None) -> Fusion:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotTileable(f"the model takes {len(placeholders)} inputs; tilefleet partitions single-input models")
    clf = Classifier(gm)
    x = placeholders[0]
    if not clf.is_map(x):
        raise NotTileable(f"the model's input has shape {clf.shape(x)}; an (N, C, H, W) example is required")
    inset = {x.name}
    specs: dict[str, OpSpec] = {}
    stops: list[Stop] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        reads_set = any(isinstance(a, fx.Node) and a.name in inset for a in node.all_input_nodes)
        res = clf.classify(node)
        if isinstance(res, Stop):
            if reads_set:
                stops.append(res)
            continue
        outside = [i for i in res.inputs if i not in inset]
        if outside:
            if reads_set:
                stops.append(Stop(node.name, _label(clf, node), f"it also reads '{outside[0]}', which is not fused"))
            continue
        specs[node.name] = res
        inset.add(node.name)
    users = {n.name: [u.name for u in n.users] for n in gm.graph.nodes}
    layer_of, layers = _number_layers(specs, x.name, users)
    fusion = Fusion(gm, x.name, specs, layer_of, layers, stops, users)
    if upto is not None:
        fusion = _truncate(fusion, _layer_index(fusion, upto, "upto"))
    if not fusion.specs:
        why = "; ".join(str(s) for s in fusion.stops[:3]) or "no op reads the input"
        raise NotTileable(f"nothing in the model is spatially local, so there is nothing to tile ({why})")
    return fusion


def _label(clf: Classifier, node: fx.Node) -> str:
    return clf._label(node)


def _number_layers(specs: dict[str, OpSpec], input_name: str,
                   users: dict[str, list[str]]) -> tuple[dict[str, int], list[Layer]]:
    """Anchors (conv, pool, upsample) open a layer; other ops join the latest layer they read.

    A pad whose only user is an anchor joins that anchor's layer, so Darknet's padded max pool and
    an explicit ``ZeroPad2d`` before a conv stay one layer.
    """
    layer_of: dict[str, int] = {input_name: -1}
    layers: list[Layer] = []
    for name, spec in specs.items():
        if spec.is_anchor:
            layers.append(Layer(len(layers), name, spec.kind, spec.out_shape))
            layer_of[name] = layers[-1].index
        else:
            layer_of[name] = max((layer_of[i] for i in spec.inputs), default=-1)
    for name, spec in specs.items():  # forward-attach pads to their anchor
        if spec.kind == "pad":
            us = users.get(name, [])
            if len(us) == 1 and us[0] in specs and specs[us[0]].is_anchor:
                layer_of[name] = layer_of[us[0]]
    for name in specs:
        if layer_of[name] >= 0:
            layers[layer_of[name]].nodes.append(name)
    return layer_of, layers


def _layer_index(fusion: Fusion, at: int | str, what: str) -> int:
    """A layer boundary: an index (the first layer after it), or a node or module name (the boundary
    falls after the layer that holds it, so ``upto="layers.15"`` fuses through layer 15)."""
    n = len(fusion.layers)
    if isinstance(at, bool) or not isinstance(at, (int, str)):
        raise NotTileable(f"{what} must be a layer index or a node/module name, got {at!r}")
    if isinstance(at, int):
        if not 0 <= at <= n:
            raise NotTileable(f"{what}={at} is outside the {n} fusible layers (0..{n})")
        return at
    hits = [fusion.layer_of[nm] for nm in fusion.specs
            if nm == at or _module_path(fusion, nm) == at or _module_path(fusion, nm).startswith(at + ".")]
    if not hits:
        known = ", ".join(f"{layer.index}:{layer.anchor}" for layer in fusion.layers[:12])
        raise NotTileable(f"{what}='{at}' names no fusible node or module; fusible layers: {known} ...")
    return max(hits) + 1


def _module_path(fusion: Fusion, name: str) -> str:
    for node in fusion.gm.graph.nodes:
        if node.name == name:
            return str(node.target) if node.op == "call_module" else name
    return name


def _truncate(fusion: Fusion, upto: int) -> Fusion:
    keep = {n: s for n, s in fusion.specs.items() if fusion.layer_of[n] < upto}
    stops = list(fusion.stops)
    if upto < len(fusion.layers):
        first = fusion.layers[upto]
        stops.insert(0, Stop(first.anchor, first.kind, f"upto={upto} stops fusion before layer {upto}"))
    layers = fusion.layers[:upto]
    return Fusion(fusion.gm, fusion.input_name, keep, fusion.layer_of, layers, stops, fusion.users)


@dataclass
class StageNodes:
    """Which nodes a stage runs, which tensors it reads from outside, which it hands on."""

    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: tuple[int, int]


def split(fusion: Fusion, stages: Sequence[int | str | tuple[int, int]] | None) -> list[StageNodes]:
    """Cut the fused prefix into consecutive stages at layer boundaries."""
    n = len(fusion.layers)
    bounds = [0, n]
    if stages:
        if all(isinstance(s, tuple) for s in stages):
            pairs = [tuple(s) for s in stages]  # type: ignore[arg-type]
            starts = [int(p[0]) for p in pairs]
            ends = [int(p[1]) for p in pairs]
            if starts[0] != 0 or any(a != b for a, b in zip(ends, starts[1:])) or ends[-1] > n:
                raise NotTileable(f"stages={list(stages)} must be consecutive (start, end) layer ranges from 0 to at most {n}")
            bounds = [0, *ends]
            if ends[-1] < n:
                fusion = _truncate(fusion, ends[-1])
                n = ends[-1]
        else:
            idx = [_layer_index(fusion, s, "stages") for s in stages]  # type: ignore[arg-type]
            if any(b <= a for a, b in zip(idx, idx[1:])):
                raise NotTileable(f"stage boundaries must be increasing layer indices, got {list(stages)} -> {idx}")
            bounds = sorted({0, *idx, n})
    out: list[StageNodes] = []
    done: set[str] = {fusion.input_name}
    for lo, hi in zip(bounds, bounds[1:]):
        first = lo == 0
        nodes = [nm for nm in fusion.specs if (lo <= fusion.layer_of[nm] < hi) or (first and fusion.layer_of[nm] < 0)]
        if not nodes:
            continue
        members = set(nodes)
        inputs: list[str] = []
        for nm in nodes:
            for i in fusion.specs[nm].inputs:
                if i not in members and i not in inputs:
                    inputs.append(i)
        outputs = [nm for nm in nodes if any(u not in members for u in fusion.users[nm])]
        out.append(StageNodes(nodes, inputs, outputs, (lo, hi)))
        done |= members
    # a stage whose every output is a pad or slice of its input still needs a real op
    return out
