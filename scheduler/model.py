"""Plain data the scheduler speaks: device profiles and the work of one frame.

Everything here is a frozen dataclass.  The state machine logs every event
together with the instructions it produced, tests compare instruction lists
with ``==``, and the simulator replays the same objects; immutability is what
makes all three safe (no aliasing, hashable, cheap to keep in a log).

Nothing here knows about Ray or torch: the shell converts its own objects
(actor handles, tensors) into these ids and byte counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TileRef = tuple[int, int]
"""``(stage, index)``: a tile within one frame."""

TileKey = tuple[int, int, int]
"""``(frame_id, stage, index)``: a tile across the whole scheduler."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device's static profile, as measured by the shell when it joined.

    ``gflops`` is the sustained rate for conv tiles, ``tile_overhead_s`` the
    fixed per-call cost (RPC, kernel launch), ``link_bps`` and ``latency_s``
    describe the link to the gateway that sends inputs and receives outputs.
    A device may later run slower than this profile; that is reported with
    :class:`~scheduler.events.DeviceSlow` rather than by replacing the profile,
    so the original capability is never forgotten.
    """

    id: str
    gflops: float
    tile_overhead_s: float
    memory_bytes: int
    link_bps: float
    latency_s: float
    gpu: bool = False
    klass: str = ""

    def __post_init__(self) -> None:
        # A bad profile is a bug in the shell's probe, so fail where it is built
        # instead of producing NaN finish times deep inside the scheduler.
        if not self.id:
            raise ValueError("DeviceInfo.id must be a non-empty string")
        if not (math.isfinite(self.gflops) and self.gflops > 0):
            raise ValueError(f"device {self.id!r}: gflops must be > 0, got {self.gflops!r}")
        if not (math.isfinite(self.link_bps) and self.link_bps > 0):
            raise ValueError(f"device {self.id!r}: link_bps must be > 0, got {self.link_bps!r}")
        if self.tile_overhead_s < 0 or self.latency_s < 0:
            raise ValueError(f"device {self.id!r}: overhead and latency must be >= 0")
        if self.memory_bytes < 0:
            raise ValueError(f"device {self.id!r}: memory_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class TileSpec:
    """One fused tile: a spatial piece of one stage of the network.

    ``deps`` are tiles of the *same frame* that must be done before this one
    may start: previous-stage tiles whose outputs overlap this tile's input
    region, or same-stage neighbours when the partitioner reuses their halo
    (DeepThings' data reuse).  ``peak_bytes`` is the activation memory the
    tile needs while running, on top of the stage weights.

    Across a reduce point a stage continues tile by tile on maps that stay where they were made:
    ``pin`` names the dep whose device must run this tile (it is never stolen), and that dep's
    ``held_bytes`` stay reserved on its device until every tile pinned to it is done, so the
    scheduler never parks more maps at a barrier than a device can hold.
    """

    stage: int
    index: int
    flops: int
    in_bytes: int
    out_bytes: int
    peak_bytes: int
    deps: tuple[TileRef, ...] = ()
    pin: TileRef | None = None  # run where this tile (a dep) ran: it continues on the maps kept there
    held_bytes: int = 0  # of this tile's output, kept on its device until the tiles pinned to it are done

    @property
    def ref(self) -> TileRef:
        return (self.stage, self.index)


@dataclass(frozen=True, slots=True)
class FrameSpec:
    """All the work of one input frame: fused tiles, then a tail.

    ``stage_weights_bytes[s]`` is the size of stage ``s``'s weights.  A device
    holds those once no matter how many tiles of stage ``s`` it runs, and
    frames of the same ``deployment`` share them.  The tail (pooling and fully
    connected layers after the last fused stage) runs on one device once every
    tile is done; it needs ``tail_weights_bytes`` plus its input (the stitched
    last stage) plus its output.  ``deployment`` and ``tail_weights_bytes``
    extend the minimal spec and default to a single unnamed deployment with a free tail.
    """

    frame_id: int
    tiles: tuple[TileSpec, ...]
    stage_weights_bytes: tuple[int, ...]
    tail_flops: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    deployment: str = ""
    tail_weights_bytes: int = 0

    @property
    def stages(self) -> tuple[int, ...]:
        """Stages that have at least one tile, ascending."""
        return tuple(sorted({t.stage for t in self.tiles}))

    @property
    def tail_in_bytes(self) -> int:
        """Bytes the tail reads: the outputs of the last stage's tiles."""
        stages = self.stages
        if not stages:
            return self.in_bytes
        last = stages[-1]
        return sum(t.out_bytes for t in self.tiles if t.stage == last)

    @property
    def tail_memory_bytes(self) -> int:
        """Memory the tail reserves on its device while it runs."""
        return self.tail_weights_bytes + self.tail_in_bytes + self.out_bytes

    def weights_for(self, stage: int) -> int:
        """Weights of ``stage``; 0 for a stage the spec does not list."""
        if 0 <= stage < len(self.stage_weights_bytes):
            return self.stage_weights_bytes[stage]
        return 0

    def tile_need_bytes(self, tile: TileSpec) -> int:
        """Memory a tile needs on an otherwise empty device: weights + peak."""
        return self.weights_for(tile.stage) + tile.peak_bytes


def tile_key(frame_id: int, ref: TileRef) -> TileKey:
    """Build a :data:`TileKey` from a frame id and a :data:`TileRef`."""
    return (frame_id, ref[0], ref[1])


def frame_problems(frame: FrameSpec) -> tuple[str, ...]:
    """Why this frame cannot be scheduled, or ``()`` when it can.

    The state machine turns a non-empty answer into ``FailFrame`` rather than
    raising, because the spec comes from outside (the partitioner, over the
    wire) and one bad frame must not take the scheduler down.
    """
    problems: list[str] = []
    refs: dict[TileRef, TileSpec] = {}
    for tile in frame.tiles:
        if tile.ref in refs:
            problems.append(f"duplicate tile {tile.ref}")
        refs[tile.ref] = tile
        if not 0 <= tile.stage < len(frame.stage_weights_bytes):
            problems.append(
                f"tile {tile.ref}: stage {tile.stage} has no entry in stage_weights_bytes "
                f"(len {len(frame.stage_weights_bytes)})"
            )
        if min(tile.flops, tile.in_bytes, tile.out_bytes, tile.peak_bytes) < 0:
            problems.append(f"tile {tile.ref}: negative flops or byte count")
    for tile in frame.tiles:
        for dep in tile.deps:
            if dep not in refs:
                problems.append(f"tile {tile.ref}: unknown dep {dep}")
            elif dep == tile.ref:
                problems.append(f"tile {tile.ref}: depends on itself")
    if any(w < 0 for w in frame.stage_weights_bytes):
        problems.append("negative stage_weights_bytes")
    if min(frame.tail_flops, frame.in_bytes, frame.out_bytes, frame.tail_weights_bytes) < 0:
        problems.append("negative tail_flops or frame byte count")
    if not problems:
        cycle = _find_cycle(refs)
        if cycle is not None:
            problems.append(f"dependency cycle through tile {cycle}")
    return tuple(problems)


def _find_cycle(refs: dict[TileRef, TileSpec]) -> TileRef | None:
    """Kahn's algorithm: a tile left unsorted lies on (or behind) a cycle."""
    indegree = {ref: len(set(t.deps)) for ref, t in refs.items()}
    dependents: dict[TileRef, list[TileRef]] = {ref: [] for ref in refs}
    for ref, t in refs.items():
        for dep in set(t.deps):
            dependents[dep].append(ref)
    ready = [ref for ref, n in indegree.items() if n == 0]
    seen = 0
    while ready:
        ref = ready.pop()
        seen += 1
        for nxt in dependents[ref]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if seen == len(refs):
        return None
    return min(ref for ref, n in indegree.items() if n > 0)
