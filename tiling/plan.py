"""``partition``: a model and an example in, an exact fused-tile plan out.

The plan is the compiler's output in the sense of ``torch.distributed.pipelining``: pure data
(stages, tiles, boxes, costs) plus small programs that run a tile or the tail. ``Plan.run`` is the
reference runtime in one process; the distributed runtime runs the same programs on workers, and
honours reduce points as :mod:`tiling.reduce` describes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .build import GridLike, build_group, grid_spec, shapes_of
from .errors import GridError, InputMismatch, TrainingModeWarning
from .fit import fit_grid
from .flops import node_flops
from .fusion import Fusion, Layer, analyze, split
from .geometry import Box
from .ops import Stop
from .phases import split_phases
from .reduce import ReducePoint, combine
from .report import plan_table
from .stage import Stage, Tile, redundancy
from .stitch import empty_like, paste
from .tail import Tail

__all__ = ["GridLike", "Partitioner", "Plan", "Stage", "Tail", "Tile", "partition", "redundancy", "rel_error",
           "run_stage"]


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
    model_flops: int = 0  # FLOPs of the whole model per frame, as FlopCounterMode counts them
    itemsizes: dict[str, int] = field(default_factory=dict)  # bytes per value of each traced tensor

    @property
    def fused_share(self) -> float:
        """Share of the model's FLOPs inside fused stages of at least 2 tiles (untiled FLOPs, counted
        by ``FlopCounterMode`` node by node, over the whole model's count)."""
        inside = sum(s.untiled_flops for s in self.stages if len(s.tiles) >= 2)
        return inside / self.model_flops if self.model_flops else 0.0

    @property
    def reduce_points(self) -> dict[str, ReducePoint]:
        return {p.node: p for s in self.stages for p in s.reduces}

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
    def run(self, x: torch.Tensor, on_tile: Callable[[int], None] | None = None) -> Any:
        """Every tile in this process, stitched, then the tail: the same result as ``model(x)``.
        ``on_tile(i)`` is called after each tile (progress bars)."""
        self.check_input(x)
        env: dict[str, torch.Tensor] = {self.input_name: x}
        reduced: dict[str, torch.Tensor] = {}
        per_tile: dict[int, list[dict[str, torch.Tensor]]] = {}
        for stage in self.stages:
            outs, per_tile[stage.index] = run_stage_tiles(stage, env, on_tile, reduced=reduced, earlier=per_tile)
            env.update(outs)
            for point in stage.reduces:  # reduce: every tile's partial, in tile order
                reduced[point.node] = combine(point, [res[point.key] for res in per_tile[stage.index]])
        return self.tail.run(env)

    def summary(self) -> str:
        return plan_table(self)


def run_stage(stage: Stage, env: Mapping[str, torch.Tensor],
              on_tile: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Run every tile of a stage in dependency order and stitch its outputs (stages without
    reduce points or pinned inputs; :meth:`Plan.run` handles every stage)."""
    return run_stage_tiles(stage, env, on_tile)[0]


def run_stage_tiles(stage: Stage, env: Mapping[str, torch.Tensor], on_tile: Callable[[int], None] | None = None,
                    reduced: Mapping[str, torch.Tensor] | None = None,
                    earlier: Mapping[int, list[dict[str, torch.Tensor]]] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Stitched outputs and each tile's own results (maps on its out boxes, and its partials).

    A pinned input is taken from the same-index tile of the stage that made it, as a distributed
    runtime would (no map crosses between tiles); the others are cropped from ``env``.
    """
    first = env[stage.inputs[0]] if stage.inputs else next(iter(env.values()))
    n = first.shape[0]
    outs: dict[str, torch.Tensor] = {}  # allocated from the first tile's results: uint8 in, float out
    whole = {o: Box.full(*stage.shapes[o][1:]) for o in stage.outputs}
    exported: dict[tuple[int, int], torch.Tensor] = {}  # (src tile, piece number) -> tensor
    results: list[dict[str, torch.Tensor]] = [{} for _ in stage.tiles]
    for i in stage.order:
        tile = stage.tiles[i]
        pieces: dict[str, list[tuple[Box, torch.Tensor]]] = {}
        for p in tile.pieces_in:
            src = stage.tiles[p.src]
            k = src.pieces_out.index(p)
            pieces.setdefault(p.node, []).append((p.box, exported[(p.src, k)]))
        inputs = {name: (earlier[stage.pinned[name]][i][name] if name in stage.pinned and earlier is not None
                         else _crop_env(env, name, box)) for name, box in tile.in_boxes.items()}
        res, exp = stage.run_tile(tile, inputs, pieces, reduced)
        for k, t in enumerate(exp):
            exported[(i, k)] = t
        for o in stage.outputs:
            if o not in outs:
                outs[o] = empty_like(res[o], (n, *stage.shapes[o]))
            paste(outs[o], whole[o], [(tile.out_boxes[o], res[o])])
        results[i] = res
        if on_tile is not None:
            on_tile(i)
    return outs, results


def _crop_env(env: Mapping[str, torch.Tensor], name: str, box: Box) -> torch.Tensor:
    t = env[name]
    return t[..., box.h0:box.h1, box.w0:box.w1]


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
    reduce_points: bool = True,
) -> Plan:
    """Plan fused-tile execution of ``model`` on inputs shaped like ``example``.

    ``grid=(rows, cols)`` cuts each stage's lowest-resolution output as evenly as possible;
    ``row_weights``/``col_weights`` bias the cuts by capability (MoDNN); ``cuts=(row_edges,
    col_edges)`` gives edges explicitly. ``stages=`` cuts the fused layers into several stages at
    layer boundaries (indices, or node/module names), each with its entry of ``grids=``.
    ``reuse=True`` runs tiles in a checkerboard where the second group reuses its neighbours'
    overlapping intermediate results (not across reduce points). ``upto=`` stops fusion before a layer.

    Without ``upto``/``stages``, fusion *fits the grid*: it ends before an output smaller than the
    grid (a fixed ``AvgPool2d(7)`` giving 1x1, say) and ``plan.stop`` says so. Global poolings whose
    result is broadcast back onto the map (squeeze-excitation, global context, image pooling) are
    reduce points that split a fused range into stages on the same grid; ``reduce_points=False``
    ends fusion there instead, for runtimes that cannot combine partials.
    """
    return Partitioner(model, example, leaf_modules).plan(
        grid, row_weights=row_weights, col_weights=col_weights, cuts=cuts, reuse=reuse, stages=stages,
        grids=grids, upto=upto, reduce_points=reduce_points)


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
        training = _training_dependent(model)
        if training:
            warnings.warn(
                f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''} "
                "behave differently in eval mode): "
                "tilefleet tiles an eval-mode copy (BatchNorm with its running statistics, dropout off), since "
                "training-mode BatchNorm normalises with statistics of the whole batch and map and cannot be "
                "tiled exactly; results equal model.eval()(x). Call model.eval() first to silence this.",
                TrainingModeWarning, stacklevel=3)
        self.example = example
        self.gm, self.leaves = trace(eval_copy(model), example, leaf_modules)
        self._fusions: dict[bool, Fusion] = {}
        self.fusion = self.fusion_for(True)
        self.shapes = shapes_of(self.fusion, example)
        self.itemsizes = _itemsizes(self.gm, example)  # uint8 frames: 1 byte per input value, floats after
        self._flops: dict[str, int] | None = None

    def fusion_for(self, reduce_points: bool) -> Fusion:
        if reduce_points not in self._fusions:
            self._fusions[reduce_points] = analyze(self.gm, reduce_points=reduce_points)
        return self._fusions[reduce_points]

    @property
    def node_flops(self) -> dict[str, int]:
        """FLOPs of every node per frame, counted once by ``FlopCounterMode`` on the example."""
        if self._flops is None:
            self._flops = node_flops(self.gm, self.example)
        return self._flops

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
        reduce_points: bool = True,
    ) -> Plan:
        base = self.fusion_for(reduce_points)
        fusion = base if upto is None else analyze(self.gm, upto, reduce_points=reduce_points)
        default: dict[str, Any] = grid_spec(grid)
        for key, val in (("row_weights", row_weights), ("col_weights", col_weights), ("cuts", cuts)):
            if val is not None:
                default[key] = val
        if upto is None and stages is None and grids is None:
            fusion = fit_grid(fusion, default, self.shapes)
        fusion, groups = split(fusion, stages)
        if grids is not None and len(grids) != len(groups):
            raise GridError(f"grids has {len(grids)} entries but there are {len(groups)} stages "
                            f"(layers {[p.layers for p in groups]})")
        parts = split_phases(fusion, groups)
        flops = self.node_flops
        built: list[Stage] = []
        counted: set[str] = set()
        for g in groups:
            gspec = grid_spec(grids[g.group] if grids is not None else default)
            mine = [p for p in parts if p.group == g.group]
            built += build_group(len(built), fusion, mine, gspec, self.shapes, reuse, self.itemsizes,
                                 flops, counted)
        tail = Tail(self.gm, fusion.fused(), fusion.input_name, flops)
        total = sum(flops.values())
        return Plan(built, tail, fusion.input_name, tuple(self.example.shape[1:]), self.example.dtype,  # type: ignore[arg-type]
                    fusion.layers, fusion.stops, self.leaves, total, dict(self.itemsizes))


_TRAINING_TYPES = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _training_dependent(model: nn.Module) -> list[str]:
    """Submodules in training mode whose output depends on it: batch norm, dropout, RReLU, and
    modules of the user's own whose ``forward`` reads ``self.training``."""
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        forward = getattr(type(m), "forward", None)
        reads = "training" in getattr(getattr(forward, "__code__", None), "co_names", ())
        norm = isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        if norm or isinstance(m, _TRAINING_TYPES) or (reads and not type(m).__module__.startswith("torch.")):
            out.append(f"{name or 'the root'} ({type(m).__name__})")
    return out


def _itemsizes(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, int]:
    """Bytes per value of every traced tensor (a uint8 frame is 1 byte per value, the maps after it 4)."""
    dtypes = {n.name: getattr(n.meta.get("tensor_meta"), "dtype", None) for n in gm.graph.nodes}
    return {n: d.itemsize if isinstance(d, torch.dtype) else example.element_size() for n, d in dtypes.items()}


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
