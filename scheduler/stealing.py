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
Times are whole nanoseconds, as in :mod:`scheduler.placement`.  The scheduler
does not hand every victim to :func:`choose_steal`: it walks its victim index
(latest queue end first, only victims holding a tile that fits the thief) and
asks :func:`steal_from` / :func:`out_of_reach` per victim; :func:`choose_steal_ns`
with ``skip_unfit=True`` is the same rule over a plain list.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.model import DeviceInfo, TileKey, TileSpec
from scheduler.placement import NS, Candidate, cost_ns, fits, to_ns

_BUCKET_LIMIT = 8


@dataclass(frozen=True, slots=True)
class PlannedTile:
    """A tile waiting in a device's planned queue."""

    key: TileKey
    tile: TileSpec
    need_bytes: int


@dataclass(frozen=True, slots=True)
class Thief:
    """A device with nothing planned and a free slot, free at ``ready_ns``."""

    info: DeviceInfo
    speed: float
    ready_ns: int


@dataclass(frozen=True, slots=True)
class Queue:
    """A victim's planned queue: ``finishes[i]`` is when ``planned[i]`` would end on it."""

    device: str
    ready_ns: int
    planned: tuple[PlannedTile, ...]
    finishes: tuple[int, ...]
    min_flops: int
    min_in_bytes: int
    min_need: int

    @property
    def finish_ns(self) -> int:
        return self.finishes[-1] if self.finishes else self.ready_ns


def make_queue(
    device: str, ready_ns: int, planned: Sequence[PlannedTile], costs: Sequence[int]
) -> Queue:
    """A :class:`Queue` from the victim's dispatched-work end and its planned tiles' costs."""
    finishes: list[int] = []
    end = ready_ns
    for c in costs:
        end += c
        finishes.append(end)
    return Queue(
        device,
        ready_ns,
        tuple(planned),
        tuple(finishes),
        min((p.tile.flops for p in planned), default=0),
        min((p.tile.in_bytes for p in planned), default=0),
        min((p.need_bytes for p in planned), default=0),
    )


@dataclass(frozen=True, slots=True)
class Victim:
    """A device with planned work.  ``cand.ready_at`` is when its dispatched
    work ends; ``planned`` is in the order it would run them.

    ``finishes[i]`` (derived) is when ``planned[i]`` would end on the victim;
    computed once because every idle device asks about the same victims.
    """

    cand: Candidate
    planned: tuple[PlannedTile, ...]
    queue: Queue = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        info, speed = self.cand.info, self.cand.speed
        costs = [cost_ns(p.tile, info, speed) for p in self.planned]
        queue = make_queue(info.id, to_ns(self.cand.ready_at), self.planned, costs)
        object.__setattr__(self, "queue", queue)

    @property
    def finishes(self) -> tuple[float, ...]:
        return tuple(f / NS for f in self.queue.finishes)

    @property
    def finish(self) -> float:
        """When the victim's planned queue would end, by its own estimates."""
        return self.queue.finish_ns / NS


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


def earliest_ns(thief: Thief, queue: Queue) -> int:
    """A lower bound on when ``thief`` could finish any of the queue's tiles."""
    info = thief.info
    return thief.ready_ns + round(
        (
            queue.min_in_bytes / info.link_bps
            + info.latency_s
            + queue.min_flops * thief.speed / (info.gflops * 1e9)
            + info.tile_overhead_s
        )
        * NS
    )


def out_of_reach(thief: Thief, queue: Queue) -> bool:
    """Nothing in the queue ends later than the thief could end it: stop looking, since
    victims further down the order end sooner still."""
    return earliest_ns(thief, queue) >= queue.finish_ns


def steal_from(thief: Thief, queue: Queue) -> Steal | None:
    """The best tile to take from one victim: highest cost bucket, then nearest the front."""
    earliest = earliest_ns(thief, queue)
    info, speed = thief.info, thief.speed
    best: tuple[tuple[int, int], Steal] | None = None  # (bucket, -position)
    # Tiles ending by `earliest` on the victim cannot gain: skip them.
    start = bisect.bisect_right(queue.finishes, earliest)
    for position in range(start, len(queue.planned)):
        p, end = queue.planned[position], queue.finishes[position]
        if p.tile.pin is not None or not fits(info, p.need_bytes):
            continue  # a pinned tile continues on maps held by its device: never stolen
        on_thief = thief.ready_ns + cost_ns(p.tile, info, speed)
        if on_thief >= end:
            continue
        transfer = p.tile.in_bytes / info.link_bps + info.latency_s
        compute = p.tile.flops * speed / (info.gflops * 1e9) + info.tile_overhead_s
        rank = (cost_bucket(compute, transfer), -position)
        if best is None or rank > best[0]:
            best = (rank, Steal(queue.device, p.key, on_thief / NS, end / NS))
    return None if best is None else best[1]


def choose_steal_ns(
    thief: Thief, queues: Sequence[Queue], *, skip_unfit: bool = False
) -> Steal | None:
    """The single best steal for ``thief`` over a plain list of victims (the reference).

    ``skip_unfit=True`` passes over victims none of whose tiles fit the thief's memory
    instead of letting them end the search, which is what the scheduler's victim index does.
    """
    ordered = sorted(
        (q for q in queues if q.planned and q.device != thief.info.id),
        key=lambda q: (-q.finish_ns, q.device),
    )
    for queue in ordered:
        if skip_unfit and queue.min_need > thief.info.memory_bytes:
            continue
        if out_of_reach(thief, queue):
            break  # nothing here ends later than the thief could; later victims end sooner
        steal = steal_from(thief, queue)
        if steal is not None:
            return steal
    return None


def choose_steal(thief: Candidate, victims: Sequence[Victim]) -> Steal | None:
    """The single best steal for ``thief``, or ``None`` if no move helps.

    ``thief.ready_at`` must already include the thief's in-flight work.
    """
    t = Thief(thief.info, thief.speed, to_ns(thief.ready_at))
    return choose_steal_ns(t, [v.queue for v in victims])
