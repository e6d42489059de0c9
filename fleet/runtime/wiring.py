"""Turn a tiling plan into what the scheduler and the workers need (pure: no Ray).

The scheduler sees tiles only as costs and dependencies (:class:`scheduler.TileSpec`); the driver
needs, per tile, where each of its inputs comes from: the frame itself (first stage, cropped by
the driver) or the outputs of earlier tiles (later stages, fetched worker to worker).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field


from scheduler import FrameSpec, TileRef, TileSpec
from tiling import Plan, ReducePoint, Stage, Tile
from tiling.geometry import Box


@dataclass(frozen=True)
class Source:
    """Part of a stage input produced by an earlier tile: its box of output ``name``."""

    tile: TileRef
    name: str
    box: Box  # the producer's whole box of that output
    overlap: Box  # what the consumer actually needs of it


@dataclass
class TileWiring:
    sources: dict[str, list[Source]] = field(default_factory=dict)  # stage input -> producers
    frame_input: str | None = None  # the stage input that is the frame itself, if any
    # reduce point -> (the point, the tiles whose partials combine into it, in tile-index order)
    reduced: dict[str, tuple[ReducePoint, list[TileRef]]] = field(default_factory=dict)
    pinned_to: TileRef | None = None  # the tile whose maps this one continues (same index, same boxes)

    def reduced_bytes(self) -> int:
        """Bytes of partials this tile fetches (a few KB: what crosses a reduce point)."""
        return sum(p.partial_bytes * len(tiles) for p, tiles in self.reduced.values())


@dataclass
class Wiring:
    """Per tile: its inputs' sources; per deployment: the frame template for the scheduler."""

    tiles: dict[TileRef, TileWiring]
    producers: dict[str, int]  # stage output name -> stage index that produces it
    template: tuple[TileSpec, ...]
    stage_weights: tuple[int, ...]
    last_outputs: list[str]  # stage outputs the tail reads (or that the model returns)
    channels: dict[str, int]
    itemsizes: dict[str, int]  # bytes per value of each stage output (a uint8 frame's maps are float)

    def itemsize(self, name: str) -> int:
        return self.itemsizes.get(name, 4)


def wire(plan: Plan) -> Wiring:
    """Where every tile's inputs come from, and the scheduler's template of a frame."""
    producers = {o: s.index for s in plan.stages for o in s.outputs}
    channels = {name: shape[0] for s in plan.stages for name, shape in s.shapes.items()}
    points = plan.reduce_points
    tiles: dict[TileRef, TileWiring] = {}
    specs: list[TileSpec] = []
    for s in plan.stages:
        for t in s.tiles:
            w, deps = _wire_tile(plan, s, t, producers, points)
            tiles[(s.index, t.index)] = w
            specs.append(TileSpec(stage=s.index, index=t.index, flops=t.flops,
                                  in_bytes=t.in_bytes + t.reuse_in_bytes + w.reduced_bytes(),
                                  out_bytes=t.out_bytes + t.reuse_out_bytes, peak_bytes=t.peak_bytes + t.reuse_in_bytes,
                                  deps=tuple(sorted(deps)), pin=w.pinned_to))
    # a tile others continue on keeps those maps on its device until they are done: count them there
    held: dict[TileRef, int] = {}
    for (si, ti), w in tiles.items():
        if w.pinned_to is not None:
            maps = sum(channels[src.name] * src.box.area * plan.itemsizes.get(src.name, 4)
                       for srcs in w.sources.values() for src in srcs if src.tile == w.pinned_to)
            held[w.pinned_to] = held.get(w.pinned_to, 0) + maps
    specs = [dataclasses.replace(t, held_bytes=held[t.ref]) if t.ref in held else t for t in specs]
    last = [n for n in plan.tail.inputs if n != plan.input_name]
    # a worker holds every stage's weights of a deployment from deploy on, so each stage's tiles are
    # charged the whole deployment's weights (conservative when two stages are in flight at once)
    total_w = sum(s.weight_bytes for s in plan.stages)
    itemsizes = {n: plan.itemsizes.get(n, 4) for n in channels}
    return Wiring(tiles, producers, tuple(specs), tuple(total_w for _ in plan.stages), last, channels, itemsizes)


def _wire_tile(plan: Plan, s: Stage, t: Tile, producers: dict[str, int],
               points: dict[str, ReducePoint]) -> tuple[TileWiring, set[TileRef]]:
    w = TileWiring()
    deps: set[TileRef] = {(s.index, d) for d in t.deps}
    for name, box in t.in_boxes.items():
        if name == plan.input_name:
            w.frame_input = name
            continue
        src_stage = plan.stages[producers[name]]
        if name in s.pinned:  # the same-index tile made exactly this box: it continues on those maps
            ref = (s.pinned[name], t.index)
            w.sources[name] = [Source(ref, name, src_stage.tiles[t.index].out_boxes[name], box)]
            w.pinned_to = ref
            deps.add(ref)
            continue
        srcs = []
        for p in src_stage.tiles:
            ov = p.out_boxes[name].intersect(box)
            if not ov.empty:
                srcs.append(Source((src_stage.index, p.index), name, p.out_boxes[name], ov))
                deps.add((src_stage.index, p.index))
        w.sources[name] = srcs
    for node in s.reduced_in:
        point = points[node]
        refs = [(point.stage, p.index) for p in plan.stages[point.stage].tiles]
        w.reduced[node] = (point, refs)
        deps.update(refs)
    return w, deps


def frame_spec(w: Wiring, frame_id: int, deployment: str, tail_flops: int, in_bytes: int, out_bytes: int,
               tail_weights: int) -> FrameSpec:
    return FrameSpec(frame_id=frame_id, tiles=w.template, stage_weights_bytes=w.stage_weights,
                     tail_flops=tail_flops, in_bytes=in_bytes, out_bytes=out_bytes, deployment=deployment,
                     tail_weights_bytes=tail_weights)


def remote_bytes(w: Wiring, ref: TileRef, placed: dict[TileRef, str], device: str) -> int:
    """Bytes of a tile's inputs that come from tiles on other devices (what crosses links)."""
    total = 0
    for name, srcs in w.tiles[ref].sources.items():
        for src in srcs:
            if placed.get(src.tile) != device:
                total += w.channels[name] * src.overlap.area * w.itemsize(name)
    for point, tiles in w.tiles[ref].reduced.values():
        total += point.partial_bytes * sum(placed.get(t) != device for t in tiles)
    return total
