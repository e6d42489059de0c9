"""Turn a tiling plan into what the scheduler and the workers need (pure: no Ray).

The scheduler sees tiles only as costs and dependencies (:class:`scheduler.TileSpec`); the driver
needs, per tile, where each of its inputs comes from: the frame itself (first stage, cropped by
the driver) or the outputs of earlier tiles (later stages, fetched worker to worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scheduler import FrameSpec, TileRef, TileSpec
from tiling import Plan
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


@dataclass
class Wiring:
    """Per tile: its inputs' sources; per deployment: the frame template for the scheduler."""

    tiles: dict[TileRef, TileWiring]
    producers: dict[str, int]  # stage output name -> stage index that produces it
    template: tuple[TileSpec, ...]
    stage_weights: tuple[int, ...]
    last_outputs: list[str]  # stage outputs the tail reads (or that the model returns)
    channels: dict[str, int]
    itemsize: int  # bytes per element of the plan's dtype


def wire(plan: Plan) -> Wiring:
    producers: dict[str, int] = {}
    for s in plan.stages:
        for o in s.outputs:
            producers[o] = s.index
    tiles: dict[TileRef, TileWiring] = {}
    specs: list[TileSpec] = []
    channels: dict[str, int] = {}
    for s in plan.stages:
        for name, shape in s.shapes.items():
            channels[name] = shape[0]
    for s in plan.stages:
        for t in s.tiles:
            w = TileWiring()
            deps: set[TileRef] = {(s.index, d) for d in t.deps}
            for name, box in t.in_boxes.items():
                if name == plan.input_name:
                    w.frame_input = name
                    continue
                src_stage = plan.stages[producers[name]]
                srcs = []
                for p in src_stage.tiles:
                    pbox = p.out_boxes[name]
                    ov = pbox.intersect(box)
                    if not ov.empty:
                        srcs.append(Source((src_stage.index, p.index), name, pbox, ov))
                        deps.add((src_stage.index, p.index))
                w.sources[name] = srcs
            tiles[(s.index, t.index)] = w
            specs.append(TileSpec(stage=s.index, index=t.index, flops=t.flops, in_bytes=t.in_bytes + t.reuse_in_bytes,
                                  out_bytes=t.out_bytes + t.reuse_out_bytes, peak_bytes=t.peak_bytes + t.reuse_in_bytes,
                                  deps=tuple(sorted(deps))))
    last = [n for n in plan.tail.inputs if n != plan.input_name]
    # a worker holds every stage's weights of a deployment from deploy on, so each stage's tiles are
    # charged the whole deployment's weights (conservative when two stages are in flight at once)
    total_w = sum(s.weight_bytes for s in plan.stages)
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    return Wiring(tiles, producers, tuple(specs), tuple(total_w for _ in plan.stages), last, channels, itemsize)


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
                total += w.channels[name] * src.overlap.area * w.itemsize
    return total
