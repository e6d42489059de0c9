"""Find the tileable prefix of a traced graph, number its layers and split it into stages.

A fused stage is the largest set of nodes, closed under predecessors, in which every op is local and
every tensor operand is in the set or a constant. We walk the graph once in topological order, so a
node joins the set exactly when all of its map operands already did. Every node that reads the set
but cannot join it is recorded as a :class:`Stop`, which is how the plan explains where and why
fusion ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import fx

from .errors import NotTileable
from .ops import Classifier, OpSpec, Stop, Virtual


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
    """The tileable part of a graph: ops in topological order, their layers and the stops.

    ``specs`` holds maps and the whole values (reduce results, what is computed from them, sizes)
    that feed back into maps; ``absorbed`` the tuple nodes (``chunk``, ``split``) whose items are
    all fused, so they run nowhere.
    """

    gm: fx.GraphModule
    input_name: str
    specs: dict[str, OpSpec]  # topological order
    layer_of: dict[str, int]
    layers: list[Layer]
    stops: list[Stop]
    users: dict[str, list[str]]  # every node's users, by name, the output node included
    absorbed: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)  # node -> what it is, for stop messages

    def nodes_in_layers(self, lo: int, hi: int) -> list[str]:
        return [n for n in self.specs if lo <= self.layer_of[n] < hi]

    @property
    def maps(self) -> list[str]:
        return [n for n, s in self.specs.items() if s.is_map]

    def fused(self) -> set[str]:
        return set(self.specs) | self.absorbed

    def read_outside(self, name: str) -> bool:
        """Whether a node outside the fused set (the tail, the model output) reads ``name``."""
        inside = self.fused()
        return any(u not in inside for u in self.users.get(name, ()))


def analyze(gm: fx.GraphModule, upto: int | str | None = None, reduce_points: bool = True) -> Fusion:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotTileable(f"the model takes {len(placeholders)} inputs; tilefleet partitions single-input models")
    clf = Classifier(gm, reduce_points)
    x = placeholders[0]
    if not clf.is_map(x) or len(clf.shape(x) or ()) != 4:
        raise NotTileable(f"the model's input has shape {clf.shape(x)}; an (N, C, H, W) example is required")
    specs, stops = _walk(gm, clf, x.name)
    users = {n.name: [u.name for u in n.users] for n in gm.graph.nodes}
    labels = {n.name: clf.label(n) for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    fusion = settle(Fusion(gm, x.name, specs, {}, [], stops, users, set(clf.virtual), labels))
    if upto is not None:
        fusion = _truncate(fusion, _layer_index(fusion, upto, "upto"))
    if not fusion.maps:
        why = "; ".join(str(s) for s in fusion.stops[:3]) or "no op reads the input"
        raise NotTileable(f"nothing in the model is spatially local, so there is nothing to tile ({why})")
    return fusion


def _walk(gm: fx.GraphModule, clf: Classifier, input_name: str) -> tuple[dict[str, OpSpec], list[Stop]]:
    """One topological walk: a node joins when it is local and everything it reads has joined."""
    inset = {input_name}
    specs: dict[str, OpSpec] = {}
    stops: list[Stop] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not any(a.name in inset for a in ins):
            continue
        if all(a.name in clf.glob for a in ins):
            res: OpSpec | Virtual | Stop = clf.classify_value(node)
        else:
            res = clf.classify(node)
        if isinstance(res, Stop):
            stops.append(res)
            continue
        if isinstance(res, Virtual):
            if res.source in inset:
                clf.virtual[node.name] = res
                inset.add(node.name)
            continue
        outside = [i for i in res.reads if i not in inset]
        if outside:
            stops.append(Stop(node.name, clf.label(node), f"it also reads '{outside[0]}', which is not fused"))
            continue
        specs[node.name] = res
        inset.add(node.name)
        if not res.is_map:
            clf.glob.add(node.name)
    return specs, stops


def without(fusion: Fusion, names: set[str]) -> dict[str, OpSpec]:
    """The specs left when ``names`` and everything that reads them (transitively) leave the set."""
    gone = set(names)
    kept: dict[str, OpSpec] = {}
    for n, s in fusion.specs.items():
        if n in gone or any(r in gone for r in s.reads):
            gone.add(n)
        else:
            kept[n] = s
    return kept


def settle(fusion: Fusion, front: Sequence[Stop] = ()) -> Fusion:
    """Drop what cannot stay fused once the set is known, until nothing changes.

    A whole value read outside the fused set leaves it, and so does a reduction read by nothing fused
    (a classifier's final global pool): reduce points exist only to feed values back onto the map. A map that is not
    (N, C, H, W) cannot be handed on (stage outputs are 4-D), so a reshape read outside leaves too.
    ``front`` are stops that explain the set before any other (``upto=``, a grid that does not fit).
    """
    labels = fusion.labels
    stops: list[Stop] = []
    while True:
        fusion.absorbed = {v for v in fusion.absorbed if all(u in fusion.specs for u in fusion.users.get(v, ()))}
        readers: dict[str, int] = {}
        for s in fusion.specs.values():
            for r in s.reads:
                readers[r] = readers.get(r, 0) + 1
        drop: set[str] = set()
        for n, s in fusion.specs.items():
            outside = fusion.read_outside(n)
            if s.kind == "reduce" and (outside or not readers.get(n)):
                stops.append(Stop(n, labels.get(n, n), "a global reduction whose result is not broadcast back "
                                  "onto the map (or is also read outside the fused range): it runs in the tail"))
            elif s.is_map and s.mid and outside:
                stops.append(Stop(n, labels.get(n, n), f"its {len(s.mid) + 3}-D result would leave the fused "
                                  "range; only (N, C, H, W) maps are handed on"))
            elif s.is_map or not outside:
                continue  # a value nobody reads (a size of a shuffle, say) is dead code: harmless
            drop.add(n)
        if not drop:
            break
        fusion = replace(fusion, specs=without(fusion, drop))
    order = {n.name: i for i, n in enumerate(fusion.gm.graph.nodes)}
    rest = sorted([*fusion.stops, *stops], key=lambda st: order.get(st.node, len(order)))
    layer_of, layers = _number_layers(fusion.specs, fusion.input_name, fusion.users)
    return replace(fusion, layer_of=layer_of, layers=layers, stops=_dedupe([*front, *rest]))


def _dedupe(stops: list[Stop]) -> list[Stop]:
    seen: set[tuple[str, str]] = set()
    out = []
    for st in stops:
        if (st.node, st.reason) not in seen:
            seen.add((st.node, st.reason))
            out.append(st)
    return out


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
            layer_of[name] = max((layer_of[i] for i in spec.reads if i in layer_of), default=-1)
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
            end = f"; fusion ends at {fusion.stops[0]}" if at > n and fusion.stops else ""
            raise NotTileable(f"{what}={at} is outside the {n} fusible layers: accepted 0..{n}{end}")
        return at
    hits = [fusion.layer_of[nm] for nm in fusion.specs
            if nm == at or _module_path(fusion, nm) == at or _module_path(fusion, nm).startswith(at + ".")]
    if not hits:
        known = ", ".join(f"{layer.index}:{layer.anchor}" for layer in fusion.layers[:12])
        blocker = _blocking_stop(fusion, at)
        if blocker is not None:
            raise NotTileable(f"{what}='{at}' lies beyond where fusion must end: {blocker}; accepted: a layer "
                              f"before it (fusible layers: {known}{' ...' if n > 12 else ''})")
        raise NotTileable(f"{what}='{at}' names no fusible node or module; fusible layers: {known} ...")
    return max(hits) + 1


def _blocking_stop(fusion: Fusion, at: str) -> Stop | None:
    """The first stop on the way from the input to the node or module ``at`` (None when ``at`` names
    nothing in the graph, or nothing stops on its way)."""
    nodes = list(fusion.gm.graph.nodes)
    target = next((nd for nd in nodes if nd.name == at or (nd.op == "call_module" and (
        str(nd.target) == at or str(nd.target).startswith(at + ".")))), None)
    if target is None:
        return None
    seen: set[str] = set()
    todo = [target]
    while todo:  # everything ``at`` depends on, itself included
        nd = todo.pop()
        if nd.name not in seen:
            seen.add(nd.name)
            todo.extend(nd.all_input_nodes)
    order = {nd.name: i for i, nd in enumerate(nodes)}
    on_path = [st for st in fusion.stops if st.node in seen]
    return min(on_path, key=lambda st: order.get(st.node, len(order)), default=None)


def _module_path(fusion: Fusion, name: str) -> str:
    for node in fusion.gm.graph.nodes:
        if node.name == name:
            return str(node.target) if node.op == "call_module" else name
    return name


def _truncate(fusion: Fusion, upto: int) -> Fusion:
    keep = {n: s for n, s in fusion.specs.items() if fusion.layer_of[n] < upto}
    front: list[Stop] = []
    if upto < len(fusion.layers):
        first = fusion.layers[upto]
        front.append(Stop(first.anchor, first.kind, f"upto={upto} stops fusion before layer {upto}"))
    return settle(replace(fusion, specs=keep), front)


def cut_before(fusion: Fusion, name: str, reason: str) -> Fusion:
    """Fusion without ``name`` and what reads it; the stop saying why comes first."""
    stop = Stop(name, fusion.labels.get(name, name), reason)
    return settle(replace(fusion, specs=without(fusion, {name})), [stop])


def group_outputs(fusion: Fusion, members: set[str]) -> list[str]:
    """Maps of ``members`` that a fused op outside them, or the tail, reads (topological order)."""
    read: set[str] = set()
    for n, s in fusion.specs.items():
        if n not in members:
            read.update(s.inputs)
    return [n for n in fusion.specs if n in members and fusion.specs[n].is_map
            and (n in read or fusion.read_outside(n))]


@dataclass
class StageNodes:
    """Which nodes a stage runs, which tensors it reads from outside, which it hands on."""

    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: tuple[int, int]
    group: int = 0  # stages of one group share a grid and pass maps tile to tile (reduce points)
    reduces: list[str] = field(default_factory=list)  # reduce points whose partials this stage makes
    reduced_in: list[str] = field(default_factory=list)  # reduce points whose combined values it reads
    pinned: dict[str, int] = field(default_factory=dict)  # input -> stage whose same-index tile makes it


def split(fusion: Fusion, stages: Sequence[int | str | tuple[int, int]] | None
          ) -> tuple[Fusion, list[StageNodes]]:
    """Cut the fused layers into consecutive groups at layer boundaries (``stages=``).

    Returns the fusion as the groups see it (truncated when the last range ends early).
    """
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
        outputs = group_outputs(fusion, members)
        out.append(StageNodes(nodes, inputs, outputs, (lo, hi), group=len(out)))
    return fusion, out
