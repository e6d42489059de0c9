"""Work stealing: which planned tile should an idle device take, and from whom?

Modelled on dask/distributed's ``stealing.py``, simplified for a fleet where
all data flows through one gateway:

* Only *planned* tiles move: tiles the scheduler intends for a device but has
  not dispatched.  A dispatched tile is the device's business; taking back a
  running one would waste the work already done.
* The victim is the device whose planned queue would finish latest, since it
  is the one delaying the frame; if it has nothing worth moving the next
  latest is tried.
* A tile moves only when it would finish earlier on the thief than where it
  sits in the victim's queue.  That single test keeps a slow thief from
  taking work it would finish later, and makes ping-pong impossible.
* Among the tiles that qualify, dask's cost-ratio bucket decides: a tile with
  much compute per byte moved is the cheapest to steal, so the highest
  ``log2(compute / transfer)`` bucket wins, then the tile nearest the front
  of the victim's queue.  Queues are in frame order, so taking the front
  helps the oldest frame finish first; taking the back would let a young
  frame overtake it while the old one still waits on the slow device.

Everything is a pure function of snapshots, so the state machine can ask
"what would you steal?" without side effects and tests can ask it directly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.model import TileKey, TileSpec
from scheduler.placement import Candidate, compute_s, finish_time, fits, tile_cost_s, transfer_s

_BUCKET_LIMIT = 8
_TIE_DIGITS = 9


@dataclass(frozen=True, slots=True)
class PlannedTile:
    """A tile waiting in a device's planned queue."""

    key: TileKey
    tile: TileSpec
    need_bytes: int


@dataclass(frozen=True, slots=True)
class Victim:
    """A device with planned work.  ``cand.ready_at`` is when its dispatched
    work ends; ``planned`` is in the order it would run them.

    ``finishes[i]`` (derived) is when ``planned[i]`` would end on the victim;
    computed once because every idle device asks about the same victims.
    """

    cand: Candidate
    planned: tuple[PlannedTile, ...]
    finishes: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _smallest: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        info, speed = self.cand.info, self.cand.speed
        end = self.cand.ready_at
        finishes: list[float] = []
        flops = in_bytes = -1
        for p in self.planned:
            end += tile_cost_s(p.tile, info, speed)
            finishes.append(end)
            if flops < 0 or p.tile.flops < flops:
                flops = p.tile.flops
            if in_bytes < 0 or p.tile.in_bytes < in_bytes:
                in_bytes = p.tile.in_bytes
        object.__setattr__(self, "finishes", tuple(finishes))
        object.__setattr__(self, "_smallest", (max(flops, 0), max(in_bytes, 0)))

    @property
    def finish(self) -> float:
        """When the victim's planned queue would end, by its own estimates."""
        return self.finishes[-1] if self.finishes else self.cand.ready_at

    def earliest_on(self, thief: Candidate) -> float:
        """A lower bound on when ``thief`` could finish any of these tiles."""
        flops, in_bytes = self._smallest
        info = thief.info
        return (
            thief.ready_at
            + transfer_s(in_bytes, info)
            + compute_s(flops, info, thief.speed)
            + info.tile_overhead_s
        )


@dataclass(frozen=True, slots=True)
class Steal:
    """Move ``key`` from ``victim``'s planned queue to the thief."""

    victim: str
    key: TileKey
    thief_finish: float
    victim_finish: float


def cost_bucket(compute: float, transfer: float) -> int:
    """``floor(log2(compute / transfer))`` clamped to +-8; free transfers land
    in the top bucket.  Buckets, not raw ratios, so that near-equal tiles tie
    and queue position decides."""
    if transfer <= 0:
        return _BUCKET_LIMIT
    if compute <= 0:
        return -_BUCKET_LIMIT
    return max(-_BUCKET_LIMIT, min(_BUCKET_LIMIT, math.floor(math.log2(compute / transfer))))


def queue_finish(victim: Victim) -> float:
    """When the victim's planned queue would end, by its own estimates."""
    return victim.finish


def choose_steal(thief: Candidate, victims: Sequence[Victim]) -> Steal | None:
    """The single best steal for ``thief``, or ``None`` if no move helps.

    ``thief.ready_at`` must already include the thief's in-flight work.
    """
    ordered = sorted(
        (v for v in victims if v.planned and v.cand.info.id != thief.info.id),
        key=lambda v: (-round(v.finish, _TIE_DIGITS), v.cand.info.id),
    )
    for victim in ordered:
        earliest = round(victim.earliest_on(thief), _TIE_DIGITS)
        if earliest >= round(victim.finish, _TIE_DIGITS):
            break  # nothing here ends later than the thief could; later victims end sooner
        best: tuple[tuple[int, int], Steal] | None = None  # (bucket, -position)
        # Tiles ending by `earliest` on the victim cannot gain: skip them.
        start = bisect.bisect_right(victim.finishes, earliest)
        for position in range(start, len(victim.planned)):
            p, end = victim.planned[position], victim.finishes[position]
            if not fits(thief.info, p.need_bytes):
                continue
            on_thief = finish_time(p.tile, thief)
            if round(on_thief, _TIE_DIGITS) >= round(end, _TIE_DIGITS):
                continue
            bucket = cost_bucket(
                compute_s(p.tile.flops, thief.info, thief.speed) + thief.info.tile_overhead_s,
                transfer_s(p.tile.in_bytes, thief.info),
            )
            rank = (bucket, -position)
            if best is None or rank > best[0]:
                best = (rank, Steal(victim.cand.info.id, p.key, on_thief, end))
        if best is not None:
            return best[1]
    return None
