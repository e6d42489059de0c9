"""The map step: where should a tile (or a tail) run?  Pure functions only.

Placement is earliest-finish-time (EFT): a device's estimated finish for a
tile is when its committed work ends plus the tile's transfer and compute
time on it.  Placing a batch of tiles greedily by EFT, one at a time and
charging each choice to the chosen device, hands every device a number of
tiles proportional to its speed; that is MoDNN's capability-proportional
split, obtained without computing the proportions explicitly, and it keeps
working when a device is slowed or already busy.

Every choice goes through :func:`objective`, a tuple, so ties break the same
way on every run: earlier finish, then the faster device, then the smaller id.

Times inside decisions are whole nanoseconds (ints, :func:`to_ns`): a device's
estimated ready time is an integer sum of per-tile costs each rounded once
(:func:`cost_ns`), so it can be kept incrementally in an index
(:mod:`scheduler.index`) and recomputed from scratch by ``validate()`` to the
exact same number, whatever the summation order.  Earlier versions rounded the
float sum ``ready + cost`` instead; the two differ by at most 1-2 ns, which
changes a decision only between finishes that close.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from scheduler.model import DeviceInfo, FrameSpec, TileSpec

K = TypeVar("K")

NS = 10**9


@dataclass(frozen=True, slots=True)
class Candidate:
    """A device as placement sees it: profile, current slowdown, and the time
    its already-committed work is estimated to end."""

    info: DeviceInfo
    speed: float = 1.0
    ready_at: float = 0.0


def transfer_s(nbytes: int, info: DeviceInfo) -> float:
    """Seconds to move ``nbytes`` over the device's link, latency included."""
    return nbytes / info.link_bps + info.latency_s


def compute_s(flops: int, info: DeviceInfo, speed: float = 1.0) -> float:
    """Seconds of arithmetic: ``flops / (gflops * 1e9 / speed)``."""
    return flops * speed / (info.gflops * 1e9)


def tile_cost_s(tile: TileSpec, info: DeviceInfo, speed: float = 1.0) -> float:
    """Estimated wall time of one tile on a device that starts it right away."""
    return (
        transfer_s(tile.in_bytes, info) + compute_s(tile.flops, info, speed) + info.tile_overhead_s
    )


def tail_cost_s(frame: FrameSpec, info: DeviceInfo, speed: float = 1.0) -> float:
    """Estimated wall time of a frame's tail on a device."""
    return (
        transfer_s(frame.tail_in_bytes, info)
        + compute_s(frame.tail_flops, info, speed)
        + info.tile_overhead_s
    )


def to_ns(seconds: float) -> int:
    """Seconds as whole nanoseconds: the unit every comparison in a decision uses."""
    return round(seconds * NS)


def cost_ns(tile: TileSpec, info: DeviceInfo, speed: float = 1.0) -> int:
    """:func:`tile_cost_s` in whole nanoseconds (rounded once, then only added)."""
    return round(
        (
            tile.in_bytes / info.link_bps
            + info.latency_s
            + tile.flops * speed / (info.gflops * 1e9)
            + info.tile_overhead_s
        )
        * NS
    )


def duration_ns(tile: TileSpec, info: DeviceInfo, speed: float = 1.0) -> int:
    """From a tile's start on the device until its report is back: :func:`cost_ns` plus sending
    the output (what a running tile is compared with to call it overdue)."""
    return cost_ns(tile, info, speed) + round((tile.out_bytes / info.link_bps + info.latency_s) * NS)


def tail_ns(frame: FrameSpec, info: DeviceInfo, speed: float = 1.0) -> int:
    """:func:`tail_cost_s` in whole nanoseconds."""
    return round(tail_cost_s(frame, info, speed) * NS)


SPEED_STEP = 1.1


def speed_step(factor: float) -> float:
    """A learned speed factor rounded to a power of 1.1: measurements jitter, and devices whose
    factors differ by less than a step stay in one class of the fleet index (and keep their
    queue's costs) instead of each becoming a class of its own."""
    return SPEED_STEP ** round(math.log(factor) / math.log(SPEED_STEP)) if factor > 0 else 1.0


def effective_gflops(info: DeviceInfo, speed: float = 1.0) -> float:
    """The rate the device delivers now, given its slowdown factor."""
    return info.gflops / speed


def fits(info: DeviceInfo, need_bytes: int) -> bool:
    """Could the device hold ``need_bytes`` if it ran nothing else?"""
    return need_bytes <= info.memory_bytes


def finish_time(tile: TileSpec, cand: Candidate) -> float:
    """EFT of ``tile`` on ``cand``."""
    return cand.ready_at + tile_cost_s(tile, cand.info, cand.speed)


Objective = tuple[int, float, str]
"""``(finish in ns, -effective GFLOP/s, device id)``: smaller is better."""


def objective(finish: float, cand: Candidate) -> Objective:
    """Sort key for placement: earliest finish (whole ns), fastest device, smallest id."""
    return (to_ns(finish), -effective_gflops(cand.info, cand.speed), cand.info.id)


def best_device_ns(
    tile: TileSpec, need_bytes: int, candidates: Iterable[tuple[DeviceInfo, float, int]]
) -> tuple[Objective, DeviceInfo] | None:
    """Brute-force EFT over ``(info, speed, ready_ns)``: the best objective among
    devices whose memory could ever hold the tile, or ``None``.

    The scheduler answers the same question from its index in O(classes); this
    scan is the reference the index is tested against.
    """
    best: tuple[Objective, DeviceInfo] | None = None
    for info, speed, ready in candidates:
        if not fits(info, need_bytes):
            continue
        key = (ready + cost_ns(tile, info, speed), -effective_gflops(info, speed), info.id)
        if best is None or key < best[0]:
            best = (key, info)
    return best


def best_device(
    tile: TileSpec, need_bytes: int, candidates: Iterable[Candidate]
) -> tuple[Candidate, float] | None:
    """The candidate with the best objective among those whose memory could
    ever hold the tile, with its finish time; ``None`` when none can."""
    by_id = {c.info.id: c for c in candidates}
    found = best_device_ns(
        tile, need_bytes, ((c.info, c.speed, to_ns(c.ready_at)) for c in by_id.values())
    )
    if found is None:
        return None
    cand = by_id[found[1].id]
    return cand, finish_time(tile, cand)


def plan_greedy(
    items: Sequence[tuple[K, TileSpec, int]],
    candidates: Mapping[str, Candidate],
) -> tuple[list[tuple[K, str | None]], dict[str, Candidate]]:
    """Place ``(key, tile, need_bytes)`` items in order, each on its EFT device.

    Returns the choices (``None`` where no device can hold the item) and the
    candidates with their ``ready_at`` advanced by what was placed, so a
    caller can keep planning from there.
    """
    current = dict(candidates)
    choices: list[tuple[K, str | None]] = []
    for key, tile, need in items:
        found = best_device(tile, need, current.values())
        if found is None:
            choices.append((key, None))
            continue
        cand, finish = found
        current[cand.info.id] = replace(cand, ready_at=finish)
        choices.append((key, cand.info.id))
    return choices, current


def tail_preference(cand: Candidate) -> tuple[bool, float, str]:
    """Sort key for the tail: a GPU first, then the fastest now, then the id.

    The tail is one dense, sequential piece of work, so raw device speed
    matters more than queue length here.
    """
    return (not cand.info.gpu, -effective_gflops(cand.info, cand.speed), cand.info.id)


def choose_tail_device(need_bytes: int, candidates: Iterable[tuple[Candidate, int]]) -> str | None:
    """Best device for a tail among ``(candidate, free_bytes_now)`` pairs whose
    free memory holds ``need_bytes``; ``None`` when none has room now."""
    usable = [cand for cand, free in candidates if need_bytes <= free]
    if not usable:
        return None
    return min(usable, key=tail_preference).info.id


def largest_budget(infos: Iterable[DeviceInfo]) -> int:
    """The largest memory budget among ``infos`` (0 when there are none)."""
    return max((info.memory_bytes for info in infos), default=0)
