"""``partition``: a model and an example in, an exact fused-tile plan out.

The plan is the compiler's output in the sense of ``torch.distributed.pipelining``: pure data
(stages, tiles, boxes, costs) plus small programs that run a tile or the tail. ``Plan.run`` is the
reference runtime in one process; the distributed runtime runs the same programs on workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import fx, nn

from .errors import GridError, InputMismatch
from .fusion import Fusion, Layer, StageNodes, analyze, split
from .geometry import Box, check_cuts, deepthings_cuts, even_cuts, scale_cuts, weighted_cuts
from .ops import Const, OpSpec, Stop
from .program import StageProgram, _crop
from .regions import Piece, TileGeometry, cost, plan_pieces, propagate
from .report import plan_table
from .stitch import empty_like, paste

GridLike = Union[tuple[int, int], str, Mapping[str, Any], tuple[Sequence[int], Sequence[int]], None]


def redundancy(executed_flops: int, untiled_flops: int) -> float:
    """FLOPs executed by all tiles over FLOPs of the same nodes untiled, minus 1."""
    return executed_flops / untiled_flops - 1.0 if untiled_flops else 0.0


@dataclass
class Tile:
    """One tile of one stage: what it computes, what it reads, what it costs (batch 1)."""

    stage: int
    index: int
    row: int
    col: int
    out_box: Box  # on the stage's reference (lowest-resolution) output
    in_box: Box  # on the stage's first input
    flops: int
    other_ops: int
    in_bytes: int
    out_bytes: int
    peak_bytes: int
    geometry: TileGeometry
    group: int = 0  # reuse: 0 runs first, 1 runs from its neighbours' pieces
    deps: tuple[int, ...] = ()  # tiles of this stage that must finish first (reuse)
    reuse_in_bytes: int = 0
    reuse_out_bytes: int = 0

    @property
    def out_boxes(self) -> dict[str, Box]:
        return self.geometry.out_boxes

    @property
    def in_boxes(self) -> dict[str, Box]:
        return self.geometry.in_boxes

    @property
    def pieces_in(self) -> list[Piece]:
        return self.geometry.pieces_in

    @property
    def pieces_out(self) -> list[Piece]:
        return self.geometry.pieces_out


@dataclass
class Stage:
    """One fused stage: a set of nodes cut into a grid of independent tiles."""

    index: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    reference: str  # the lowest-resolution output, on which cuts are given
    layers: tuple[int, int]
    rows: list[int]
    cols: list[int]
    tiles: list[Tile]
    program: StageProgram
    untiled_flops: int
    shapes: dict[str, tuple[int, int, int]]  # C, H, W of every input and output
    reuse: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.rows) - 1, len(self.cols) - 1)

    @property
    def flops(self) -> int:
        return sum(t.flops for t in self.tiles)

    @property
    def redundancy(self) -> float:
        return redundancy(self.flops, self.untiled_flops)

    @property
    def order(self) -> list[int]:
        """Tile indices in an order that respects reuse dependencies."""
        return sorted(range(len(self.tiles)), key=lambda i: (self.tiles[i].group, i))

    @property
    def weight_bytes(self) -> int:
        return self.program.weight_bytes

    def crop_inputs(self, tile: Tile, env: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {i: _crop((env[i], Box.full(*env[i].shape[-2:])), b) for i, b in tile.in_boxes.items()}

    def run_tile(self, tile: Tile, inputs: Mapping[str, torch.Tensor],
                 pieces: Mapping[str, Sequence[tuple[Box, torch.Tensor]]] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        return self.program.run_tile(tile.geometry, inputs, pieces)


class Tail:
    """What follows the fused stages, as its own small graph module, run whole on one device.

    Its placeholders are the stage outputs (and the model input) that tail nodes read, so shipping
    it to a device ships only the tail's own weights.
    """

    def __init__(self, gm: fx.GraphModule, fused: set[str], input_name: str) -> None:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[str] = []
        self.nodes: list[str] = []

        def arg(n: fx.Node) -> fx.Node:
            if n not in env:  # a fused node or the model input, read by the tail
                env[n] = graph.placeholder(n.name)
                self.inputs.append(n.name)
            return env[n]

        for node in gm.graph.nodes:
            if node.op == "placeholder" or node.name in fused:
                continue
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], arg))
                continue
            env[node] = graph.node_copy(node, arg)
            if node.op != "get_attr":
                self.nodes.append(node.name)
        self.gm = fx.GraphModule(gm, graph)
        self.input_name = input_name
        self.flops = _tail_flops(gm, fused)
        self.out_bytes = _tail_out_bytes(gm)

    @property
    def empty(self) -> bool:
        return not self.nodes

    @torch.no_grad()
    def run(self, env: Mapping[str, Any]) -> Any:
        return self.gm(*(env[n] for n in self.inputs))


def _tail_flops(gm: fx.GraphModule, fused: set[str]) -> int:
    """2 x multiply-adds of the convs and linear layers the tail runs, per frame (from traced shapes)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.name in fused:
            continue
        mod = gm.get_submodule(str(node.target))
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or not len(meta.shape):
            continue
        per_frame = math.prod(meta.shape) // max(1, int(meta.shape[0]))
        if isinstance(mod, nn.Conv2d):
            total += 2 * per_frame * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.Linear):
            total += 2 * per_frame * mod.in_features
    return total


def _tail_out_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the model's outputs per frame (what the tail's device sends back)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            for arg in _leaves(node.args[0]):
                meta = arg.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape") and len(meta.shape):
                    total += math.prod(meta.shape) // max(1, int(meta.shape[0])) * 4
    return total


def _leaves(a: Any) -> list[fx.Node]:
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for v in a for n in _leaves(v)]
    if isinstance(a, dict):
        return [n for v in a.values() for n in _leaves(v)]
    return []


@dataclass
class Plan:
    """An exact fused-tile plan for one model, input shape and dtype (any batch size)."""

    stages: list[Stage]
    tail: Tail
    input_name: str
    input_shape: tuple[int, int, int]
    dtype: torch.dtype
    layers: list[Layer]
    stops: list[Stop]
    leaves: list[str] = field(default_factory=list)

    @property
    def tiles(self) -> list[Tile]:
        return self.stages[0].tiles

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.stages)

    @property
    def untiled_flops(self) -> int:
        return sum(s.untiled_flops for s in self.stages)

    @property
    def redundancy(self) -> float:
        return redundancy(self.flops, self.untiled_flops)

    @property
    def stop(self) -> Stop | None:
        """Where and why fusion ended (None when the whole model is fused)."""
        return self.stops[0] if self.stops else None

    def check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputMismatch(f"expected a torch.Tensor of shape (N, {', '.join(map(str, self.input_shape))}), "
                                f"got {type(x).__name__}")
        if x.dim() != 4:
            raise InputMismatch(f"expected an (N, C, H, W) tensor with (C, H, W) = {self.input_shape}, "
                                f"got shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputMismatch(f"this plan is fixed to (C, H, W) = {self.input_shape}, got {tuple(x.shape[1:])}; "
                                f"partition again with an example of the new size")
        if x.dtype != self.dtype and self.dtype == torch.uint8:
            raise InputMismatch(f"this plan takes raw uint8 frames (0-255) and normalises them in its first stage "
                                f"(tiling.with_preprocess); got {x.dtype}: pass the frame as decoded, not normalised")
        if x.dtype != self.dtype:
            raise InputMismatch(f"this plan is fixed to dtype {self.dtype}, got {x.dtype}; convert with x.to({self.dtype})")
        if x.shape[0] < 1:
            raise InputMismatch("the batch is empty")

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> Any:
        """Every tile in this process, stitched, then the tail: the same result as ``model(x)``."""
        self.check_input(x)
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for stage in self.stages:
            env.update(run_stage(stage, env))
        return self.tail.run(env)

    def summary(self) -> str:
        return plan_table(self)


def run_stage(stage: Stage, env: Mapping[str, torch.Tensor],
              on_tile: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Run every tile of a stage in dependency order and stitch its outputs."""
    n = env[stage.inputs[0]].shape[0]
    outs: dict[str, torch.Tensor] = {}  # allocated from the first tile's results: uint8 in, float out
    whole = {o: Box.full(*stage.shapes[o][1:]) for o in stage.outputs}
    exported: dict[tuple[int, int], torch.Tensor] = {}  # (src tile, piece number) -> tensor
    for i in stage.order:
        tile = stage.tiles[i]
        pieces: dict[str, list[tuple[Box, torch.Tensor]]] = {}
        for p in tile.pieces_in:
            src = stage.tiles[p.src]
            k = src.pieces_out.index(p)
            pieces.setdefault(p.node, []).append((p.box, exported[(p.src, k)]))
        res, exp = stage.run_tile(tile, stage.crop_inputs(tile, env), pieces)
        for k, t in enumerate(exp):
            exported[(i, k)] = t
        for o, t in res.items():
            if o not in outs:
                outs[o] = empty_like(t, (n, *stage.shapes[o]))
            paste(outs[o], whole[o], [(tile.out_boxes[o], t)])
        if on_tile is not None:
            on_tile(i)
    return outs


# --- partition -------------------------------------------------------------------------------------


def partition(
    model: nn.Module,
    example: torch.Tensor,
    grid: GridLike = None,
    *,
    row_weights: Sequence[float] | None = None,
    col_weights: Sequence[float] | None = None,
    cuts: tuple[Sequence[int], Sequence[int]] | None = None,
    reuse: bool = False,
    stages: Sequence[int | str | tuple[int, int]] | None = None,
    grids: Sequence[GridLike] | None = None,
    upto: int | str | None = None,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
) -> Plan:
    """Plan fused-tile execution of ``model`` on inputs shaped like ``example``.

    ``grid=(rows, cols)`` cuts each stage's lowest-resolution output as evenly as possible;
    ``row_weights``/``col_weights`` bias the cuts by capability (MoDNN); ``cuts=(row_edges,
    col_edges)`` gives edges explicitly. ``stages=`` cuts the fused layers into several stages at
    layer boundaries (indices, or node/module names), each with its entry of ``grids=``.
    ``reuse=True`` runs tiles in a checkerboard where the second group reuses its neighbours'
    overlapping intermediate results. ``upto=`` stops fusion before a layer.
    """
    return Partitioner(model, example, leaf_modules).plan(
        grid, row_weights=row_weights, col_weights=col_weights, cuts=cuts, reuse=reuse, stages=stages,
        grids=grids, upto=upto)


class Partitioner:
    """Traces a model once and makes as many plans as asked (the auto-planner tries dozens)."""

    def __init__(self, model: nn.Module, example: torch.Tensor,
                 leaf_modules: Iterable[str | type[nn.Module]] = ()) -> None:
        from .trace import eval_copy, trace

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise InputMismatch(f"example must be an (N, C, H, W) tensor, got "
                                f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        if not (example.is_floating_point() or example.dtype == torch.uint8):
            raise InputMismatch(f"example must be a floating-point or uint8 (raw frame) tensor, got {example.dtype}")
        self.example = example
        self.gm, self.leaves = trace(eval_copy(model), example, leaf_modules)
        self.fusion = analyze(self.gm)
        self.shapes = _shapes(self.fusion, example)
        self.itemsizes = _itemsizes(self.gm, example)  # uint8 frames: 1 byte per input value, floats after

    @property
    def layers(self) -> list[Layer]:
        return self.fusion.layers

    def plan(
        self,
        grid: GridLike = None,
        *,
        row_weights: Sequence[float] | None = None,
        col_weights: Sequence[float] | None = None,
        cuts: tuple[Sequence[int], Sequence[int]] | None = None,
        reuse: bool = False,
        stages: Sequence[int | str | tuple[int, int]] | None = None,
        grids: Sequence[GridLike] | None = None,
        upto: int | str | None = None,
    ) -> Plan:
        fusion = self.fusion if upto is None else analyze(self.gm, upto)
        parts = split(fusion, stages)
        if grids is not None and len(grids) != len(parts):
            raise GridError(f"grids has {len(grids)} entries but there are {len(parts)} stages "
                            f"(layers {[p.layers for p in parts]})")
        default: dict[str, Any] = _grid_spec(grid)
        for key, val in (("row_weights", row_weights), ("col_weights", col_weights), ("cuts", cuts)):
            if val is not None:
                default[key] = val
        built: list[Stage] = []
        for k, part in enumerate(parts):
            gspec = _grid_spec(grids[k] if grids is not None else default)
            built.append(_build_stage(k, fusion, part, gspec, self.shapes, reuse, self.itemsizes))
        fused = {n for p in parts for n in p.nodes}
        tail = Tail(self.gm, fused, fusion.input_name)
        return Plan(built, tail, fusion.input_name, tuple(self.example.shape[1:]), self.example.dtype,  # type: ignore[arg-type]
                    fusion.layers, fusion.stops, self.leaves)


def _shapes(fusion: Fusion, example: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    out = {fusion.input_name: tuple(example.shape[1:])}
    out.update({n: s.out_shape for n, s in fusion.specs.items()})
    return out  # type: ignore[return-value]


def _itemsizes(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, int]:
    dtypes = {n.name: getattr(n.meta.get("tensor_meta"), "dtype", None) for n in gm.graph.nodes}
    return {n: d.itemsize if isinstance(d, torch.dtype) else example.element_size() for n, d in dtypes.items()}


def _grid_spec(g: GridLike) -> dict[str, Any]:
    if isinstance(g, Mapping) and set(g) <= {"grid", "row_weights", "col_weights", "cuts", "deepthings"}:
        spec = dict(g)
    elif isinstance(g, Mapping):
        raise GridError(f"unknown grid keys {sorted(set(g) - {'grid', 'row_weights', 'col_weights', 'cuts', 'deepthings'})}")
    elif isinstance(g, tuple) and len(g) == 2 and all(isinstance(v, (list, tuple)) for v in g):
        spec = {"cuts": g}
    else:
        spec = {"grid": g}
    g0 = spec.get("grid")
    if isinstance(g0, str):
        try:
            r, c = (int(v) for v in g0.lower().split("x"))
        except ValueError:
            raise GridError(f"grid string must look like '5x5', got {g0!r}") from None
        spec["grid"] = (r, c)
    elif isinstance(g0, int) and not isinstance(g0, bool):
        spec["grid"] = (g0, g0)
    return spec


def _axis_cuts(size: int, spec: Mapping[str, Any], axis: int) -> list[int]:
    name = ("row", "column")[axis]
    if spec.get("cuts") is not None:
        c = spec["cuts"]
        if not (isinstance(c, (tuple, list)) and len(c) == 2):
            raise GridError(f"cuts must be (row_edges, col_edges), got {c!r}")
        return check_cuts(c[axis], size, name)
    weights = spec.get(("row_weights", "col_weights")[axis])
    grid = spec.get("grid")
    if grid is None:
        parts = len(weights) if weights is not None else 1
    else:
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
            raise GridError(f"grid must be (rows, cols), 'RxC' or an int, got {grid!r}")
        parts = grid[axis]
        if isinstance(parts, bool) or not isinstance(parts, int):
            raise GridError(f"grid entries must be positive integers, got {grid!r}")
    if weights is not None:
        if len(weights) != parts:
            raise GridError(f"{len(weights)} {name} weights for a grid of {parts} {name}s")
        return weighted_cuts(size, list(weights))
    if spec.get("deepthings"):
        return deepthings_cuts(size, parts)
    return even_cuts(size, parts)


def _build_stage(k: int, fusion: Fusion, part: StageNodes, gspec: Mapping[str, Any],
                 shapes: Mapping[str, tuple[int, int, int]], reuse: bool, itemsize: int | Mapping[str, int]) -> Stage:
    specs = {n: fusion.specs[n] for n in part.nodes}
    ref = min(part.outputs, key=lambda o: (shapes[o][1] * shapes[o][2], part.outputs.index(o)))
    rh, rw = shapes[ref][1:]
    rows, cols = _axis_cuts(rh, gspec, 0), _axis_cuts(rw, gspec, 1)
    input_hw = {n: shapes[n][1:] for n in [*part.inputs, *part.nodes]}
    channels = {n: shapes[n][0] for n in [*part.inputs, *part.nodes]}
    out_cuts = {o: (scale_cuts(rows, rh, shapes[o][1]), scale_cuts(cols, rw, shapes[o][2])) for o in part.outputs}
    users = fusion.users
    grid_r, grid_c = len(rows) - 1, len(cols) - 1
    geos: list[TileGeometry] = []
    for i in range(grid_r):
        for j in range(grid_c):
            boxes = {o: Box(r[i], r[i + 1], c[j], c[j + 1]) for o, (r, c) in out_cuts.items()}
            geos.append(propagate(specs, part.nodes, part.inputs, input_hw, boxes))
    groups = [((t // grid_c) + (t % grid_c)) % 2 if reuse else 0 for t in range(len(geos))]
    deps: list[tuple[int, ...]] = [() for _ in geos]
    if reuse and len(geos) > 1:
        for t, geo in enumerate(geos):
            if groups[t] == 0:
                continue
            i, j = divmod(t, grid_c)
            nbrs = [ii * grid_c + jj for ii, jj in ((i - 1, j), (i, j - 1), (i, j + 1), (i + 1, j))
                    if 0 <= ii < grid_r and 0 <= jj < grid_c]
            avail = {n: [geos[a].compute[n] for a in nbrs] for n in part.nodes}
            new = propagate(specs, part.nodes, part.inputs, input_hw, geo.out_boxes, avail)
            new.pieces_in = plan_pieces(new, part.nodes, t, [(a, geos[a]) for a in nbrs])
            geos[t] = new
            deps[t] = tuple(sorted({p.src for p in new.pieces_in}))
        for t, geo in enumerate(geos):
            for p in geo.pieces_in:
                geos[p.src].pieces_out.append(p)
    tiles: list[Tile] = []
    for t, geo in enumerate(geos):
        c = cost(specs, part.nodes, part.inputs, channels, users, geo, itemsize)
        i, j = divmod(t, grid_c)
        tiles.append(Tile(k, t, i, j, geo.out_boxes[ref], geo.in_boxes[part.inputs[0]], c.flops, c.other_ops,
                          c.in_bytes, c.out_bytes, c.peak_bytes, geo, groups[t], deps[t],
                          c.reuse_in_bytes, c.reuse_out_bytes))
    # what the model itself computes: every node over its whole map
    untiled = sum(2 * s.macs_per_pixel * s.out_shape[1] * s.out_shape[2] for s in specs.values() if s.kind == "conv")
    program = _program(fusion, part, specs, input_hw)
    return Stage(k, part.nodes, part.inputs, part.outputs, ref, part.layers, rows, cols, tiles, program,
                 untiled, {n: shapes[n] for n in [*part.inputs, *part.outputs]}, reuse)


def _program(fusion: Fusion, part: StageNodes, specs: Mapping[str, OpSpec],
             input_hw: Mapping[str, tuple[int, int]]) -> StageProgram:
    modules: dict[str, nn.Module] = {}
    consts: dict[str, torch.Tensor] = {}
    root = fusion.gm

    def visit(a: Any) -> None:
        if isinstance(a, Const) and a.name not in consts:
            obj: Any = root
            for p in a.name.split("."):
                obj = getattr(obj, p)
            consts[a.name] = obj
        elif isinstance(a, (list, tuple)):
            for v in a:
                visit(v)
        elif isinstance(a, dict):
            for v in a.values():
                visit(v)

    for s in specs.values():
        if s.how == "module" and isinstance(s.target, str):
            modules[s.target] = root.get_submodule(s.target)
        visit(s.args)
        visit(s.kwargs)
        visit(s.params)
    return StageProgram(list(specs.values()), modules, consts, part.inputs, input_hw, part.outputs)


def rel_error(a: Any, b: Any) -> float:
    """Largest relative error (norm of difference / norm of reference) over matching tensors."""
    if isinstance(a, torch.Tensor):
        ref = b.detach().double()
        diff = (a.detach().double() - ref).norm().item()
        den = ref.norm().item()
        return diff / den if den > 0 else diff
    if isinstance(a, Mapping):
        return max((rel_error(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((rel_error(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else math.inf
