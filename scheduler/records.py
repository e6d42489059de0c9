"""The state machine's mutable bookkeeping: one record per tile, frame, device.

These records are private to :class:`~scheduler.state.Scheduler`; the shell
only ever sees the frozen :class:`DeviceStats` snapshot.  Memory accounting
lives on :class:`DeviceRecord` because it is the one number that must never
drift: the scheduler's promise is that a device is never asked to hold more
than its budget, and :mod:`scheduler.invariants` recomputes it from scratch
to check the incremental bookkeeping here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

from scheduler.model import DeviceInfo, FrameSpec, TileKey, TileRef, TileSpec

TileState = Literal["waiting", "planned", "in_flight", "done", "dropped"]
"""waiting on deps -> planned on a device -> in flight (dispatched) -> done;
``dropped`` once its frame has failed and nothing of it runs any more."""

FrameStatus = Literal["active", "completed", "failed"]
TailState = Literal["blocked", "pending", "running", "done"]
"""blocked on tiles -> pending (no device has room yet) -> running -> done."""

Priority = tuple[int, int, int]
"""``(frame submission order, stage, index)``: older frames run first."""

WeightKey = tuple[str, int]
"""``(deployment, stage)``: weights shared by every frame of one deployment."""


@dataclass(slots=True)
class TileRecord:
    """Where one tile stands.  ``device`` is set while planned or in flight,
    and names the device whose result was accepted once done."""

    key: TileKey
    spec: TileSpec
    weight_key: WeightKey
    weights: int
    priority: Priority
    missing: set[TileRef]
    dependents: list[TileRef] = field(default_factory=list)
    state: TileState = "waiting"
    device: str | None = None
    retries: int = 0
    backup: str | None = None  # a second copy runs here (speculation); the first result wins
    holds: bool = False  # done, and its maps are kept on its device for the tiles pinned to it

    @property
    def need_bytes(self) -> int:
        """Memory on an otherwise idle device: stage weights + peak (+ the maps it will hold)."""
        return self.weights + self.spec.peak_bytes + self.spec.held_bytes


@dataclass(slots=True)
class FrameRecord:
    """One frame: its tiles, per-stage progress, the tail, and how it ended."""

    spec: FrameSpec
    seq: int
    submitted_t: float
    tiles: dict[TileRef, TileRecord]
    left_in_stage: dict[int, int]
    stitched: list[int] = field(default_factory=list)
    status: FrameStatus = "active"
    reason: str = ""
    tail: TailState = "blocked"
    tail_device: str | None = None
    tail_retries: int = 0
    ended_t: float | None = None

    @property
    def frame_id(self) -> int:
        return self.spec.frame_id


@dataclass(slots=True)
class DeviceRecord:
    """A device, its queues and its memory in use.

    ``in_flight`` is in dispatch order and its first tile is the one taken to
    be running (devices run tiles first in, first out); ``planned`` is the
    scheduler's own queue for the device, sorted by priority, and is the only
    thing stealing may move.
    """

    info: DeviceInfo
    alive: bool = True
    speed: float = 1.0
    observed: int = 0
    estimate: float = 1.0  # the running average of measured speed factors (``speed`` is it, rounded)
    speed_since: float = 0.0
    # results not yet counted in ``estimate``: measured and expected seconds, and how many (short
    # tiles are measured together, see Stragglers._learn_speed)
    window_measured_s: float = 0.0
    window_expected_s: float = 0.0
    window_n: int = 0
    in_flight: list[TileKey] = field(default_factory=list)
    running_since: float = 0.0
    planned: list[tuple[Priority, TileKey]] = field(default_factory=list)
    tails: dict[int, int] = field(default_factory=dict)
    # Estimated time, in whole ns, kept by the queue methods below (see scheduler.index):
    # costs of tiles in flight or planned and of running tails at the current speed, when the
    # running tile should end, the work behind it (in flight and tails), and the planned work.
    costs: dict[TileKey, int] = field(default_factory=dict)
    tail_costs: dict[int, int] = field(default_factory=dict)
    tail_bytes: int = 0  # sum(tails.values()), kept so memory checks stay O(1)
    run_end_ns: int | None = None
    flight_ns: int = 0
    planned_ns: int = 0
    needs: dict[int, int] = field(default_factory=dict)  # need_bytes of planned tiles -> count
    results: dict[int, int] = field(default_factory=dict)  # frame -> accepted results held here
    # where scheduler.index has filed the device
    klass: tuple[float, float, float, float, int, bool, float] | None = None
    victim_bucket: int | None = None
    expiry_ns: int | None = None
    indexed_planned: int = 0
    weight_refs: dict[WeightKey, list[int]] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_high_water: int = 0  # most tile peak bytes ever in flight at once (memory reports)
    held: dict[TileKey, int] = field(default_factory=dict)  # done tiles' maps kept for pinned tiles
    held_bytes: int = 0
    overcommitted: bool = False  # its budget shrank below what it already holds; nothing new until it fits
    # counters for DeviceStats
    tiles_done: int = 0
    tails_done: int = 0
    busy_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    steals: int = 0
    stolen_from: int = 0
    retries: int = 0
    failures: int = 0
    cancelled: int = 0
    requeued: int = 0
    speculated: int = 0  # speculative copies run here
    speculation_wins: int = 0  # ... whose result came first

    id: str = field(init=False, default="")  # info.id, read on every index update: a slot, not a property

    def __post_init__(self) -> None:
        self.id = self.info.id

    # ----------------------------------------------------------- planned queue

    def restart_speed(self, now: float) -> None:
        """Measurements start again (a join, an announced speed): nothing before ``now`` counts."""
        self.observed, self.speed_since = 0, now
        self.window_measured_s = self.window_expected_s = 0.0
        self.window_n = 0

    def plan(self, tile: TileRecord, cost_ns: int) -> None:
        bisect.insort(self.planned, (tile.priority, tile.key))
        self.costs[tile.key] = cost_ns
        self.planned_ns += cost_ns
        need = tile.need_bytes
        self.needs[need] = self.needs.get(need, 0) + 1

    def unplan(self, tile: TileRecord) -> None:
        entry = (tile.priority, tile.key)
        i = bisect.bisect_left(self.planned, entry)
        if i == len(self.planned) or self.planned[i] != entry:
            raise KeyError(tile.key)
        del self.planned[i]
        self._forget_planned(tile)

    def _forget_planned(self, tile: TileRecord) -> None:
        self.planned_ns -= self.costs.pop(tile.key)
        need = tile.need_bytes
        left = self.needs[need] - 1
        if left:
            self.needs[need] = left
        else:
            del self.needs[need]

    def dispatch_head(self, tile: TileRecord, now: float, now_ns: int) -> None:
        """Move the head of the planned queue (``tile``) in flight and reserve its memory."""
        self.planned.pop(0)
        cost = self.costs[tile.key]
        self._forget_planned(tile)
        self.dispatch_copy(tile, cost, now, now_ns)

    def dispatch_copy(self, tile: TileRecord, cost: int, now: float, now_ns: int) -> None:
        """Put ``tile`` in flight here at ``cost`` (also a speculative copy of a tile in flight elsewhere,
        which was never planned here)."""
        self.costs[tile.key] = cost
        if not self.in_flight:
            self.running_since = now
            self.run_end_ns = now_ns + cost
        else:
            self.flight_ns += cost
        self.in_flight.append(tile.key)
        self.reserve(tile)

    def take_flight(self, tile: TileRecord, now: float, now_ns: int) -> bool:
        """Remove ``tile`` from the in-flight list and free its memory; True if it was the
        running one (the next in flight then starts now)."""
        key = tile.key
        was_running = self.in_flight[0] == key
        self.in_flight.remove(key)
        self.release(tile)
        cost = self.costs.pop(key)
        if not was_running:
            self.flight_ns -= cost
            return False
        self.running_since = now
        if self.in_flight:
            nxt = self.costs[self.in_flight[0]]
            self.flight_ns -= nxt
            self.run_end_ns = now_ns + nxt
        else:
            self.run_end_ns = None
        return True

    def add_tail(self, frame_id: int, need: int, cost_ns: int) -> None:
        self.tails[frame_id] = need
        self.tail_bytes += need
        self.tail_costs[frame_id] = cost_ns
        self.flight_ns += cost_ns

    def remove_tail(self, frame_id: int) -> None:
        self.tail_bytes -= self.tails.pop(frame_id)
        self.refit()
        self.flight_ns -= self.tail_costs.pop(frame_id)

    def clear(self) -> None:
        """Drop all work and memory (the device is gone)."""
        self.in_flight.clear()
        self.planned.clear()
        self.tails.clear()
        self.tail_bytes = 0
        self.weight_refs.clear()
        self.peak_bytes = 0
        self.held.clear()
        self.held_bytes = 0
        self.overcommitted = False
        self.costs.clear()
        self.tail_costs.clear()
        self.needs.clear()
        self.run_end_ns, self.flight_ns, self.planned_ns = None, 0, 0

    def retime(self, costs: dict[TileKey, int], tail_costs: dict[int, int]) -> None:
        """New costs for everything held (the speed changed); sums recomputed."""
        self.costs, self.tail_costs = costs, tail_costs
        self.run_end_ns, self.flight_ns, self.planned_ns = timing(self)

    def planned_keys(self) -> list[TileKey]:
        return [k for _, k in self.planned]

    # ------------------------------------------------------------------ memory

    def weights_in_use(self) -> int:
        return sum(max(refs) for refs in self.weight_refs.values() if refs)

    def memory_in_use(self) -> int:
        """Weights of every stage with a tile in flight (once each), plus the
        peaks of the tiles in flight (and the maps they will hold), plus running
        tails' reservations, plus maps held for pinned tiles."""
        return self.weights_in_use() + self.peak_bytes + self.tail_bytes + self.held_bytes

    def extra_bytes_for(self, tile: TileRecord) -> int:
        """How much ``memory_in_use`` would grow if ``tile`` were dispatched."""
        refs = self.weight_refs.get(tile.weight_key)
        held = max(refs) if refs else 0
        return tile.spec.peak_bytes + tile.spec.held_bytes + max(0, tile.weights - held)

    def has_room_for(self, tile: TileRecord) -> bool:
        return self.memory_in_use() + self.extra_bytes_for(tile) <= self.info.memory_bytes

    def reserve(self, tile: TileRecord) -> None:
        self.weight_refs.setdefault(tile.weight_key, []).append(tile.weights)
        self.peak_bytes += tile.spec.peak_bytes + tile.spec.held_bytes
        self.peak_high_water = max(self.peak_high_water, self.peak_bytes)

    def release(self, tile: TileRecord) -> None:
        refs = self.weight_refs[tile.weight_key]
        refs.remove(tile.weights)
        if not refs:
            del self.weight_refs[tile.weight_key]
        self.peak_bytes -= tile.spec.peak_bytes + tile.spec.held_bytes
        self.refit()

    def hold(self, key: TileKey, nbytes: int) -> None:
        self.held[key] = nbytes
        self.held_bytes += nbytes
        if self.memory_in_use() > self.info.memory_bytes:  # reserved at dispatch, before its budget shrank
            self.overcommitted = True

    def unhold(self, key: TileKey) -> None:
        self.held_bytes -= self.held.pop(key, 0)
        self.refit()

    def refit(self) -> None:
        """After memory was freed: an overcommitted device (its budget shrank) fits again?"""
        if self.overcommitted and self.memory_in_use() <= self.info.memory_bytes:
            self.overcommitted = False

    def free_bytes(self) -> int:
        return self.info.memory_bytes - self.memory_in_use()


def timing(dev: DeviceRecord) -> tuple[int | None, int, int]:
    """``(run_end_ns, flight_ns, planned_ns)`` from scratch, from ``dev.costs``."""
    run_end = None
    if dev.in_flight:
        run_end = round(dev.running_since * 1e9) + dev.costs[dev.in_flight[0]]
    flight = sum(dev.costs[k] for k in dev.in_flight[1:]) + sum(dev.tail_costs.values())
    planned = sum(dev.costs[k] for _, k in dev.planned)
    return run_end, flight, planned


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Per-device counters for the shell's dashboards and the benchmarks.

    ``busy_s`` sums the ``compute_s`` the shell reported in accepted results;
    ``steals`` counts tiles this device took from others, ``stolen_from``
    tiles others took from it; ``retries`` counts failures here that were
    re-run, ``failures`` all failures reported here; ``requeued`` counts
    tiles moved away when it was lost or slowed; ``cancelled`` counts Cancel
    instructions sent to it; ``speculated`` counts speculative copies of slow tiles run here and
    ``speculation_wins`` those that finished first.
    """

    device_id: str
    alive: bool
    speed: float
    tiles_done: int
    tails_done: int
    busy_s: float
    bytes_in: int
    bytes_out: int
    steals: int
    stolen_from: int
    retries: int
    failures: int
    cancelled: int
    requeued: int
    in_flight: int
    planned: int
    memory_in_use: int
    peak_high_water: int = 0
    speculated: int = 0
    speculation_wins: int = 0

    @classmethod
    def of(cls, dev: DeviceRecord) -> DeviceStats:
        return cls(
            device_id=dev.id,
            alive=dev.alive,
            speed=dev.speed,
            tiles_done=dev.tiles_done,
            tails_done=dev.tails_done,
            busy_s=dev.busy_s,
            bytes_in=dev.bytes_in,
            bytes_out=dev.bytes_out,
            steals=dev.steals,
            stolen_from=dev.stolen_from,
            retries=dev.retries,
            failures=dev.failures,
            cancelled=dev.cancelled,
            requeued=dev.requeued,
            in_flight=len(dev.in_flight),
            planned=len(dev.planned),
            memory_in_use=dev.memory_in_use(),
            peak_high_water=dev.peak_high_water,
            speculated=dev.speculated,
            speculation_wins=dev.speculation_wins,
        )
