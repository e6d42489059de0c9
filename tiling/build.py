"""Build stages from a fusion: cuts on each group's reference output, regions, costs, programs.

A *group* is a range of layers on one grid (``stages=`` makes several). Reduce points split a group
into consecutive stages (:mod:`tiling.phases`); the group's regions are propagated once, jointly, so
a tile of a later stage reads exactly the boxes the same tile of an earlier stage produced, and each
tile's partial covers exactly the box of the reduced map it owns (the grid's cuts, scaled onto it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .errors import GridError
from .fusion import Fusion, StageNodes, group_outputs
from .geometry import Box, check_cuts, deepthings_cuts, even_cuts, scale_cuts, weighted_cuts
from .ops import Const, OpSpec
from .program import StageProgram
from .reduce import ReducePoint
from .regions import TileGeometry, cost, plan_pieces, propagate
from .stage import Stage, Tile

GridLike = Union[tuple[int, int], str, Mapping[str, Any], tuple[Sequence[int], Sequence[int]], None]


def shapes_of(fusion: Fusion, example: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    out = {fusion.input_name: tuple(example.shape[1:])}
    out.update({n: s.out_shape for n, s in fusion.specs.items()})
    return out  # type: ignore[return-value]


def grid_spec(g: GridLike) -> dict[str, Any]:
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


def axis_cuts(size: int, spec: Mapping[str, Any], axis: int) -> list[int]:
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
        key = ("row_weights", "col_weights")[axis]
        if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__len__"):
            raise GridError(f"{key} must be a list of positive finite numbers, one per {name}, got {weights!r:.80}")
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real)
               or not math.isfinite(w) or w <= 0]
        if bad:
            raise GridError(f"{key} must be positive finite numbers (a device's relative speed), got {bad[0]!r:.40} "
                            f"in {list(weights)!r:.120}")
        if len(weights) != parts:
            raise GridError(f"{len(weights)} {name} weights for a grid of {parts} {name}s")
        return weighted_cuts(size, list(weights))
    if spec.get("deepthings"):
        return deepthings_cuts(size, parts)
    return even_cuts(size, parts)


def parts_of(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    """How many tiles along (rows, cols) a grid spec asks for, when it says (for fitting fusion)."""
    if spec.get("cuts") is not None:
        c = spec["cuts"]
        return (len(c[0]) - 1, len(c[1]) - 1) if isinstance(c, (tuple, list)) and len(c) == 2 else None
    g = spec.get("grid")
    rw, cw = spec.get("row_weights"), spec.get("col_weights")
    r = _count(rw) if rw is not None else (g[0] if isinstance(g, (tuple, list)) and len(g) == 2 else 1)
    c = _count(cw) if cw is not None else (g[1] if isinstance(g, (tuple, list)) and len(g) == 2 else 1)
    return (r, c) if isinstance(r, int) and isinstance(c, int) else None


def _count(weights: Any) -> int | None:
    """How many parts a weights argument asks for; None when it is not a list (refused later)."""
    return len(weights) if hasattr(weights, "__len__") and not isinstance(weights, (str, bytes, Mapping)) else None


def reference(outputs: Sequence[str], shapes: Mapping[str, tuple[int, int, int]]) -> str:
    """The lowest-resolution output: cuts are given on it."""
    return min(outputs, key=lambda o: (shapes[o][1] * shapes[o][2], list(outputs).index(o)))


def _boxes(rows: list[int], cols: list[int], rh: int, rw: int, names: Sequence[str],
           shapes: Mapping[str, tuple[int, int, int]], i: int, j: int) -> dict[str, Box]:
    """Tile (i, j)'s owned box on each named map (cuts scaled from the reference's size)."""
    out = {}
    for o in names:
        r, c = scale_cuts(rows, rh, shapes[o][1]), scale_cuts(cols, rw, shapes[o][2])
        out[o] = Box(r[i], r[i + 1], c[j], c[j + 1])
    return out


def build_group(k0: int, fusion: Fusion, parts: list[StageNodes], gspec: Mapping[str, Any],
                shapes: Mapping[str, tuple[int, int, int]], reuse: bool, itemsize: int | Mapping[str, int],
                node_flops: Mapping[str, int], counted: set[str]) -> list[Stage]:
    """The stages of one group: one joint propagation per tile, restricted to each stage."""
    members = {n for p in parts for n in p.nodes if fusion.specs[n].is_map}
    outs = group_outputs(fusion, members)
    ref = reference(outs, shapes)
    rh, rw = shapes[ref][1:]
    rows, cols = axis_cuts(rh, gspec, 0), axis_cuts(rw, gspec, 1)
    order = [n for n in fusion.specs if n in members or any(n in p.reduces for p in parts)]
    specs = {n: fusion.specs[n] for n in order}
    ins = [i for p in parts for i in p.inputs if i not in members]
    input_hw = {n: shapes[n][1:] for n in [*ins, *members]}
    reduces = [n for p in parts for n in p.reduces]
    geos: list[TileGeometry] = []
    for i in range(len(rows) - 1):
        for j in range(len(cols) - 1):
            owned_in = _boxes(rows, cols, rh, rw, [fusion.specs[r].inputs[0] for r in reduces], shapes, i, j)
            owned = {r: owned_in[fusion.specs[r].inputs[0]] for r in reduces}
            geos.append(propagate(specs, order, ins, input_hw, _boxes(rows, cols, rh, rw, outs, shapes, i, j),
                                  owned=owned))
    if len(parts) == 1 and not reduces:
        return [_stage(k0, fusion, parts[0], gspec, shapes, reuse, itemsize, rows, cols, geos, node_flops, counted)]
    stages = []
    for m, part in enumerate(parts):
        sub = [_restrict(g, part, fusion) for g in geos]
        stages.append(_stage(k0 + m, fusion, part, gspec, shapes, False, itemsize, rows, cols, sub, node_flops,
                             counted))
    return stages


def _restrict(geo: TileGeometry, part: StageNodes, fusion: Fusion) -> TileGeometry:
    maps = [n for n in part.nodes if fusion.specs[n].is_map]
    return TileGeometry({o: geo.need[o] for o in part.outputs},
                        {i: geo.need[i] if i in geo.need else geo.in_boxes[i] for i in part.inputs},
                        {n: geo.compute[n] for n in maps}, {n: geo.need[n] for n in maps},
                        owned={r: geo.owned[r] for r in part.reduces})


def _stage(k: int, fusion: Fusion, part: StageNodes, gspec: Mapping[str, Any],
           shapes: Mapping[str, tuple[int, int, int]], reuse: bool, itemsize: int | Mapping[str, int], rows: list[int],
           cols: list[int], geos: list[TileGeometry], node_flops: Mapping[str, int], counted: set[str]) -> Stage:
    specs = {n: fusion.specs[n] for n in part.nodes}
    maps = [n for n in part.nodes if specs[n].is_map]
    values = [n for n in part.nodes if not specs[n].is_map and specs[n].kind != "reduce"]
    input_hw = {n: shapes[n][1:] for n in [*part.inputs, *maps]}
    channels = {n: shapes[n][0] for n in [*part.inputs, *maps]}
    grid_c = len(cols) - 1
    groups, deps = _reuse(geos, specs, maps, part.inputs, input_hw, grid_c, len(rows) - 1) if reuse else (
        [0] * len(geos), [() for _ in geos])
    ref = reference(part.outputs, shapes)
    value_flops = sum(node_flops.get(n, 0) for n in values)
    tiles: list[Tile] = []
    for t, geo in enumerate(geos):
        c = cost(specs, maps, part.inputs, channels, fusion.users, geo, itemsize)
        i, j = divmod(t, grid_c)
        tiles.append(Tile(k, t, i, j, geo.out_boxes[ref], geo.in_boxes[part.inputs[0]] if part.inputs else Box(0, 0, 0, 0), c.flops + value_flops,
                          c.other_ops, c.in_bytes, c.out_bytes, c.peak_bytes, geo, groups[t], deps[t],
                          c.reuse_in_bytes, c.reuse_out_bytes))
    mine = [n for n in part.nodes if n not in counted]
    counted.update(mine)
    untiled = sum(node_flops.get(n, 0) for n in mine) if node_flops else sum(
        2 * s.macs_per_pixel * s.out_shape[1] * s.out_shape[2] for s in specs.values() if s.kind == "conv")
    points = [ReducePoint(r, specs[r].inputs[0], k, specs[r].params["op"], specs[r].params["divisor"],
                          specs[r].out_shape[0], specs[r].params["form"],
                          itemsize if isinstance(itemsize, int) else itemsize.get(r, 4)) for r in part.reduces]
    return Stage(k, part.nodes, part.inputs, part.outputs, ref, part.layers, rows, cols, tiles,
                 program(fusion, part, specs, input_hw), untiled,
                 {n: shapes[n] for n in [*part.inputs, *part.outputs]}, reuse, part.group, dict(part.pinned),
                 points, list(part.reduced_in))


def _reuse(geos: list[TileGeometry], specs: Mapping[str, OpSpec], maps: list[str], inputs: list[str],
           input_hw: Mapping[str, tuple[int, int]], grid_c: int, grid_r: int,
           ) -> tuple[list[int], list[tuple[int, ...]]]:
    """DeepThings' checkerboard: group-1 tiles compute only what group-0 neighbours did not."""
    groups = [((t // grid_c) + (t % grid_c)) % 2 for t in range(len(geos))]
    deps: list[tuple[int, ...]] = [() for _ in geos]
    if len(geos) < 2:
        return [0] * len(geos), deps
    for t, geo in enumerate(geos):
        if groups[t] == 0:
            continue
        i, j = divmod(t, grid_c)
        nbrs = [ii * grid_c + jj for ii, jj in ((i - 1, j), (i, j - 1), (i, j + 1), (i + 1, j))
                if 0 <= ii < grid_r and 0 <= jj < grid_c]
        avail = {n: [geos[a].compute[n] for a in nbrs] for n in maps}
        new = propagate(specs, maps, inputs, input_hw, geo.out_boxes, avail)
        new.pieces_in = plan_pieces(new, maps, t, [(a, geos[a]) for a in nbrs])
        geos[t] = new
        deps[t] = tuple(sorted({p.src for p in new.pieces_in}))
    for geo in geos:
        for p in geo.pieces_in:
            geos[p.src].pieces_out.append(p)
    return groups, deps


def program(fusion: Fusion, part: StageNodes, specs: Mapping[str, OpSpec],
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
    return StageProgram(list(specs.values()), modules, consts, part.inputs, input_hw, part.outputs,
                        reduced_in=part.reduced_in)


