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
  ``log2(compute / transfer)`` bucket wins, then the tile furthest back in the
  victim's queue (it gains the most and least disturbs frame order).

Everything is a pure function of snapshots, so the state machine can ask
"what would you steal?" without side effects and tests can ask it directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    work ends; ``planned`` is in the order it would run them."""

    cand: Candidate
    planned: tuple[PlannedTile, ...]


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
    end = victim.cand.ready_at
    for p in victim.planned:
        end += tile_cost_s(p.tile, victim.cand.info, victim.cand.speed)
    return end


def choose_steal(thief: Candidate, victims: Sequence[Victim]) -> Steal | None:
    """The single best steal for ``thief``, or ``None`` if no move helps.

    ``thief.ready_at`` must already include the thief's in-flight work.
    """
    ordered = sorted(
        (v for v in victims if v.planned and v.cand.info.id != thief.info.id),
        key=lambda v: (-round(queue_finish(v), _TIE_DIGITS), v.cand.info.id),
    )
    for victim in ordered:
        best: tuple[tuple[int, int], Steal] | None = None
        end = victim.cand.ready_at
        for position, p in enumerate(victim.planned):
            end += tile_cost_s(p.tile, victim.cand.info, victim.cand.speed)
            if not fits(thief.info, p.need_bytes):
                continue
            on_thief = finish_time(p.tile, thief)
            if round(on_thief, _TIE_DIGITS) >= round(end, _TIE_DIGITS):
                continue
            bucket = cost_bucket(
                compute_s(p.tile.flops, thief.info, thief.speed) + thief.info.tile_overhead_s,
                transfer_s(p.tile.in_bytes, thief.info),
            )
            rank = (bucket, position)
            if best is None or rank > best[0]:
                best = (rank, Steal(victim.cand.info.id, p.key, on_thief, end))
        if best is not None:
            return best[1]
    return None
