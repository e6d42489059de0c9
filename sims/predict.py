"""Predict a deployment's latency and throughput by discrete-event simulation.

The unchanged :class:`scheduler.Scheduler` makes every decision; devices follow exactly the
emulation model of :mod:`sims.clock` (the same one emulated workers obey), plus a per-tile
dispatch cost of the real runtime (driver bookkeeping and a Ray actor call). So a prediction and
an emulated run differ only by what the host adds, which is what ``plan_summary()`` reports.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scheduler import (Complete, DeviceJoined, Dispatch, FailFrame, FrameSpec, FrameSubmitted, RunTail, Scheduler,
                       TailDone, TileDone, TileSpec)

from .catalog import DeviceSpec
from .clock import DeviceClock

# what the real runtime adds to every tile on this kind of host (driver + actor call), seconds
DISPATCH_S = 0.002

BytesFn = Callable[[tuple[int, int, int], str, dict[tuple[int, int], str]], int]


@dataclass
class Prediction:
    latency_s: float  # median per-frame latency (latency mode: one frame in flight)
    fps: float  # steady-state frames per second
    makespan_s: float
    frames: int
    tiles_per_device: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def predict(devices: Sequence[DeviceSpec], make_frame: Callable[[int], FrameSpec], *, frames: int = 4,
            in_flight: int = 1, scale: float = 1.0, max_in_flight_per_device: int = 2,
            remote_in_bytes: BytesFn | None = None, dispatch_s: float = DISPATCH_S,
            tail_out_bytes: int = 0) -> Prediction:
    """Run ``frames`` frames, ``in_flight`` at a time, through the scheduler on emulated clocks.

    ``remote_in_bytes(key, device, placed)`` tells how many input bytes of a later-stage tile come
    over the link given where the frame's tiles ran (``placed``: (stage, index) -> device); stage-0
    tiles read their ``in_bytes`` from the client.
    """
    sched = Scheduler(max_in_flight_per_device=max_in_flight_per_device, learn_speed=False)
    clocks = {d.id: DeviceClock(d.profile, scale) for d in devices}
    sched.handle(*(DeviceJoined(d.info(), 0.0) for d in devices))
    specs: dict[int, FrameSpec] = {}
    tile_index: dict[tuple[int, int, int], TileSpec] = {}
    heap: list[tuple[float, int, object]] = []
    seq = itertools.count()
    placed: dict[int, dict[tuple[int, int], str]] = {}  # per frame: (stage, index) -> device
    submitted: dict[int, float] = {}
    ended: dict[int, float] = {}
    failed: list[str] = []
    tiles: dict[str, int] = {d.id: 0 for d in devices}
    next_frame = 0

    def submit(t: float) -> None:
        nonlocal next_frame
        if next_frame >= frames:
            return
        spec = make_frame(next_frame)
        specs[spec.frame_id] = spec
        tile_index.update({(spec.frame_id, t.stage, t.index): t for t in spec.tiles})
        submitted[spec.frame_id] = t
        next_frame += 1
        heapq.heappush(heap, (t, next(seq), FrameSubmitted(spec, t)))

    def obey(instructions: list[object], t: float) -> None:
        for ins in instructions:
            if isinstance(ins, Dispatch):
                stage = ins.key[1]
                tile = tile_index[ins.key]
                frame_placed = placed.setdefault(ins.key[0], {})
                frame_placed[(stage, ins.key[2])] = ins.device
                if stage == 0 or remote_in_bytes is None:
                    nbytes = tile.in_bytes
                else:
                    nbytes = remote_in_bytes(ins.key, ins.device, frame_placed)
                tl = clocks[ins.device].admit(t + dispatch_s, nbytes, tile.flops, tile.out_bytes)
                busy = tl.compute_end - tl.compute_start
                heapq.heappush(heap, (tl.done, next(seq), TileDone(ins.key, ins.device, tl.done, compute_s=busy)))
            elif isinstance(ins, RunTail):
                spec = specs[ins.frame_id]
                if spec.tail_flops == 0:
                    done = t
                else:
                    tl = clocks[ins.device].admit(t + dispatch_s, spec.tail_in_bytes, spec.tail_flops, tail_out_bytes)
                    done = tl.done
                heapq.heappush(heap, (done, next(seq), TailDone(ins.frame_id, ins.device, done)))
            elif isinstance(ins, Complete):
                ended[ins.frame_id] = t
                submit(t)
            elif isinstance(ins, FailFrame):
                ended[ins.frame_id] = t
                failed.append(ins.reason)
                submit(t)

    for _ in range(max(1, in_flight)):
        submit(0.0)
    while heap:
        t, _, ev = heapq.heappop(heap)
        if isinstance(ev, TileDone) and sched.expects(ev.key, ev.device):
            tiles[ev.device] += 1
        obey(sched.handle(ev), t)  # type: ignore[arg-type]
    lat = sorted(ended[f] - submitted[f] for f in ended)
    fps = steady_fps(sorted(ended.values()), trim=in_flight)
    if fps == 0.0 and lat and lat[0] > 0:
        fps = 1.0 / lat[0]
    return Prediction(lat[len(lat) // 2] if lat else float("inf"), fps, max(ended.values(), default=0.0),
                      len(ended), tiles, failed)


def steady_fps(done: Sequence[float], trim: int = 0) -> float:
    """Frames per second between the k-th and the (N-1-k)-th completion, k trimmed at each end.

    ``k`` is at least the number of frames in flight: while the pipeline fills, and once the last
    frame is submitted and it drains, frames complete faster than in steady state, and a window
    that includes the drain overstates throughput. The benchmark harness uses the same formula.
    """
    n = len(done)
    if n < 2:
        return 0.0
    k = trim_for(n, trim)
    span = done[n - 1 - k] - done[k]
    gap = 0.3 * span / max(1, n - 1 - 2 * k)  # well under the mean spacing of completions
    a, b = _burst_end(done, k, gap), _burst_end(done, n - 1 - k, gap)
    # measure between the ends of two bursts: with whole frames per device, completions come in
    # bursts, and a window that opens inside one would count frames finished before it
    return (b - a) / (done[b] - done[a]) if done[b] > done[a] else float("inf")


def _burst_end(done: Sequence[float], i: int, gap: float) -> int:
    while i + 1 < len(done) and done[i + 1] - done[i] < gap:
        i += 1
    return i


def trim_for(n: int, in_flight: int) -> int:
    """Frames trimmed at each end: the number in flight, but always leaving half the frames."""
    return min(max(in_flight, n // 8), max(0, (n - 2) // 4))


def throughput_depth(gflops: Sequence[float], cap: int = 48) -> int:
    """Frames to keep in flight for steady-state throughput on a mixed cluster.

    Results come back in submission order, so the slowest device's frame blocks the window: the
    window must hold what every device does while the slowest finishes one frame, i.e. the sum of
    speeds relative to the slowest, plus one per device for the pipeline (and never under 2 each).
    """
    if not gflops:
        return 2
    lo = min(gflops)
    return int(min(cap, max(2 * len(gflops), round(sum(g / lo for g in gflops)) + len(gflops))))
