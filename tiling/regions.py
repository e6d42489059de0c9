"""Backward region propagation for one tile, checkerboard data reuse, and the tile's accounting.

For a tile we walk the stage's nodes in reverse topological order. Each node ``n`` has a *need* box
(what its consumers read from it, clipped to the image) and a *compute* box (what this tile itself
computes). Without reuse they are equal. With DeepThings-style reuse, a second-group tile computes
only the part of its need that its first-group neighbours did not already compute, and receives the
rest from them as *pieces*; the smaller compute box in turn shrinks what it needs upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .geometry import EMPTY, Box, bbox_of_difference, need_box
from .ops import OpSpec


@dataclass(frozen=True)
class Piece:
    """An intermediate result that one tile hands to another: node ``node`` over ``box``."""

    node: str
    box: Box
    src: int
    dst: int


@dataclass
class TileGeometry:
    """Everything the executor needs to run one tile: small, picklable, no tensors."""

    out_boxes: dict[str, Box]
    in_boxes: dict[str, Box]
    compute: dict[str, Box]
    need: dict[str, Box]
    pieces_in: list[Piece] = field(default_factory=list)
    pieces_out: list[Piece] = field(default_factory=list)
    owned: dict[str, Box] = field(default_factory=dict)  # reduce point -> the box it sums, on its input


def propagate(
    specs: Mapping[str, OpSpec],
    order: Sequence[str],
    inputs: Sequence[str],
    input_hw: Mapping[str, tuple[int, int]],
    out_boxes: Mapping[str, Box],
    avail: Mapping[str, Sequence[Box]] | None = None,
    owned: Mapping[str, Box] | None = None,
) -> TileGeometry:
    """Regions of every node of one tile.

    ``avail`` lists, per node, boxes that neighbours compute and can hand over (reuse); the tile's
    compute box is then the bounding box of its need minus those. ``owned`` gives, per reduce point,
    the box of its input this tile sums: the tile must compute at least that.
    """
    need: dict[str, Box] = {}
    compute: dict[str, Box] = {}
    for name in reversed(order):
        spec = specs[name]
        if not spec.is_map:  # whole values have no region; a reduce point needs its owned box
            need[name] = compute[name] = EMPTY
            if spec.kind == "reduce" and owned is not None:
                i = spec.inputs[0]
                need[i] = need.get(i, EMPTY).union(owned[name])
            continue
        hw = spec.out_shape[1:]
        box = need.get(name, EMPTY)
        if name in out_boxes:
            box = box.union(out_boxes[name])
        box = box.clip(*hw)
        need[name] = box
        comp = bbox_of_difference(box, avail.get(name, ())) if avail else box
        compute[name] = comp
        if comp.empty:
            continue
        for i in spec.inputs:
            ih, iw = input_hw[i]
            if spec.kind in ("conv", "maxpool", "avgpool", "pad", "upsample"):
                req = need_box(spec.maps, comp).clip(ih, iw)
            else:
                req = comp
            need[i] = need.get(i, EMPTY).union(req)
    in_boxes = {i: need.get(i, EMPTY) for i in inputs}
    return TileGeometry(dict(out_boxes), in_boxes, compute, {n: need[n] for n in order},
                        owned={n: b for n, b in (owned or {}).items() if n in specs})


def plan_pieces(geo: TileGeometry, order: Sequence[str], me: int,
                neighbours: Sequence[tuple[int, TileGeometry]]) -> list[Piece]:
    """Pieces this tile receives: for every node, its need not covered by its own compute box."""
    pieces: list[Piece] = []
    for name in order:
        need, comp = geo.need[name], geo.compute[name]
        if need.empty or comp == need:
            continue
        covered = [comp]
        for src, ngeo in neighbours:
            part = bbox_of_difference(need.intersect(ngeo.compute[name]), covered)
            if not part.empty:
                pieces.append(Piece(name, part, src, me))
                covered.append(part)
        if not bbox_of_difference(need, covered).empty:
            raise AssertionError(f"reuse left part of '{name}' {need} uncovered in tile {me}")  # pragma: no cover
    return pieces


# --- accounting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    flops: int  # 2 x multiply-adds of convs, batch 1
    other_ops: int  # output elements of every other op, batch 1
    in_bytes: int
    out_bytes: int
    peak_bytes: int
    reuse_in_bytes: int
    reuse_out_bytes: int


def cost(specs: Mapping[str, OpSpec], order: Sequence[str], inputs: Sequence[str],
         channels: Mapping[str, int], users: Mapping[str, Sequence[str]], geo: TileGeometry,
         itemsize: int | Mapping[str, int]) -> Cost:
    size = _sizer(itemsize)
    flops = sum(2 * specs[n].macs_per_pixel * geo.compute[n].area for n in order if specs[n].kind == "conv")
    other = sum(specs[n].out_shape[0] * geo.compute[n].area for n in order if specs[n].kind != "conv")
    in_bytes = sum(channels[i] * geo.in_boxes[i].area * size(i) for i in inputs)
    out_bytes = sum(channels[o] * b.area * size(o) for o, b in geo.out_boxes.items())
    rin = sum(channels[p.node] * p.box.area * size(p.node) for p in geo.pieces_in)
    rout = sum(channels[p.node] * p.box.area * size(p.node) for p in geo.pieces_out)
    peak = peak_bytes(specs, order, inputs, channels, users, geo, itemsize)
    return Cost(flops, other, in_bytes, out_bytes, peak, rin, rout)


def peak_bytes(specs: Mapping[str, OpSpec], order: Sequence[str], inputs: Sequence[str],
               channels: Mapping[str, int], users: Mapping[str, Sequence[str]], geo: TileGeometry,
               itemsize: int | Mapping[str, int]) -> int:
    """Largest total of tensors alive at once while the tile runs (batch 1).

    Batch norm and unary activations on a tensor nobody else reads run in place; channel slices are
    views; a pad that feeds a conv or pool is absorbed into it (the layer reads the border directly).
    So on a chain this is the largest layer input plus output, and on a DAG skip tensors add up.
    """
    isz = _sizer(itemsize)
    storage: dict[str, str] = {}
    size: dict[str, int] = {}
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    for i in inputs:
        storage[i] = i
        size[i] = channels[i] * geo.in_boxes[i].area * isz(i)
        born[i] = -1
    members = set(order)
    for step, name in enumerate(order):
        spec = specs[name]
        src = spec.inputs[0] if spec.inputs else None
        shares = False
        if src is not None and len(spec.inputs) == 1 and src in storage:
            sole_user = len(users.get(src, ())) == 1
            if spec.kind == "slice":
                shares = True
            elif spec.kind == "pointwise" and sole_user and src in members:
                shares = True
            elif spec.kind == "pad" and all(u in members and specs[u].kind in ("conv", "maxpool", "avgpool")
                                            for u in users.get(name, ())):
                shares = True
        nbytes = channels[name] * geo.need[name].area * isz(name)
        if shares:
            key = storage[src]  # type: ignore[index]
            size[key] = max(size[key], nbytes) if spec.kind != "pad" else size[key]
        else:
            key = name
            size[key] = nbytes
            born[key] = step
        storage[name] = key
        for i in spec.inputs:
            last[storage[i]] = max(last.get(storage[i], -1), step)
        last[key] = max(last.get(key, step), step)
    end = len(order)
    for name in geo.out_boxes:
        last[storage[name]] = end
    for p in geo.pieces_out:  # kept until handed over
        last[storage[p.node]] = end
    peak = 0
    for t in range(-1, end + 1):
        alive = sum(size[k] for k in size if born.get(k, -1) <= t <= last.get(k, -1))
        peak = max(peak, alive)
    return peak


def _sizer(itemsize: int | Mapping[str, int]) -> Callable[[str], int]:
    """Bytes per value of a tensor, by name: one size for all, or per tensor (uint8 frames, float maps)."""
    if isinstance(itemsize, int):
        return lambda _name: itemsize
    return lambda name: itemsize[name]
