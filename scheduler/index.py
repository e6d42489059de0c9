"""Indexes over the fleet, so one decision costs the same at 10 and at 10,000 devices.

Placement, stealing and tails used to scan every device for every decision.  Here devices are
grouped into *classes*: same profile numbers (GFLOP/s, overhead, link, latency, memory, GPU)
and the same speed factor.  Within a class a tile costs the same everywhere, so the class's
best device for any tile is simply the one ready first (ties: smaller id), which a heap keeps.
A decision then looks at one heap top per class (``K`` classes, usually a handful) instead of
every device; the heaps cost O(log n) per change of a device.

* ``ready`` (per class): every alive device by when all its work, planned included, ends;
  placement takes the best of the class tops by the EFT objective.
* ``thieves`` (per class): devices with nothing planned and a free slot, by when their
  dispatched work ends; a class's first thief is its best (stealing only gets easier the
  earlier a thief is free), so one steal attempt per class decides.
* ``victims``: devices with planned work, latest queue end first, bucketed by the smallest
  memory any of their planned tiles needs, so a thief only meets victims it could take from.
* ``expiry``: when a running tile's estimated end passes, its device's time starts moving
  with the clock (see :mod:`scheduler.timeheap`).
* ``memory``: how many alive devices have each memory budget (largest budget in O(sizes)).
* ``dirty`` / ``freed``: devices touched since the last fill / that released memory, so
  filling slots and retrying waiting tails look only at devices that could have changed.

The bookkeeping each device carries for this (costs in ns, sums) lives on
:class:`~scheduler.records.DeviceRecord`; :func:`scheduler.invariants.check_index` recomputes
all of it from scratch in tests.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from dataclasses import dataclass, field

from scheduler.model import DeviceInfo, TileSpec
from scheduler.placement import Objective, cost_ns, effective_gflops
from scheduler.records import DeviceRecord
from scheduler.timeheap import TimeHeap, Walk

ClassKey = tuple[float, float, float, float, int, bool, float]
"""``(gflops, tile_overhead_s, link_bps, latency_s, memory_bytes, gpu, speed)``."""


def class_key(info: DeviceInfo, speed: float) -> ClassKey:
    """Devices with equal keys cost the same for every tile and tail and fit the same tiles."""
    return (
        info.gflops,
        info.tile_overhead_s,
        info.link_bps,
        info.latency_s,
        info.memory_bytes,
        info.gpu,
        speed,
    )


@dataclass(slots=True)
class DeviceClass:
    """Interchangeable devices: ``info`` is any member's profile (only its numbers are used)."""

    key: ClassKey
    info: DeviceInfo
    speed: float
    eff: float
    members: list[str] = field(default_factory=list)  # alive members, sorted ids
    ready: TimeHeap = field(default_factory=TimeHeap)
    thieves: TimeHeap = field(default_factory=TimeHeap)

    @property
    def tail_rank(self) -> tuple[bool, float]:
        """The class's part of :func:`scheduler.placement.tail_preference`."""
        return (not self.info.gpu, -self.eff)


class FleetIndex:
    """Every index over alive devices; ``update(dev)`` after any change to a device."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.classes: dict[ClassKey, DeviceClass] = {}
        self.victims: dict[int, TimeHeap] = {}  # smallest planned need -> devices
        self.expiry: list[tuple[int, str]] = []
        self.memory: Counter[int] = Counter()
        self.dirty: set[str] = set()
        self.freed: set[str] = set()
        self.planned_total = 0

    # ---------------------------------------------------------------- updates

    def update(self, dev: DeviceRecord, now: int, *, touched: bool = True) -> None:
        """Re-file ``dev`` everywhere from its current bookkeeping; O(log n)."""
        self.planned_total += len(dev.planned) - dev.indexed_planned
        dev.indexed_planned = len(dev.planned)
        if touched:
            self.dirty.add(dev.id)
        if not dev.alive:
            if dev.klass is not None:
                self._leave(dev)
                self.memory[dev.info.memory_bytes] -= 1
                if not self.memory[dev.info.memory_bytes]:
                    del self.memory[dev.info.memory_bytes]
            return
        key = class_key(dev.info, dev.speed)
        if dev.klass != key:
            if dev.klass is None:
                self.memory[dev.info.memory_bytes] += 1
            else:
                self._leave(dev)
            self._join(dev, key)
        cls = self.classes[key]
        run_end = dev.run_end_ns
        static = run_end is not None and run_end > now
        base = (run_end if static and run_end is not None else 0) + dev.flight_ns
        cls.ready.set(dev.id, static, base + dev.planned_ns)
        if not dev.planned and len(dev.in_flight) < self.max_in_flight:
            cls.thieves.set(dev.id, static, base)
        else:
            cls.thieves.discard(dev.id)
        bucket = min(dev.needs) if dev.planned else None
        if dev.victim_bucket is not None and dev.victim_bucket != bucket:
            self._drop_victim(dev)
        if bucket is not None:
            heap = self.victims.get(bucket)
            if heap is None:
                heap = self.victims[bucket] = TimeHeap(descending=True)
            heap.set(dev.id, static, base + dev.planned_ns)
            dev.victim_bucket = bucket
        if static and run_end is not None and dev.expiry_ns != run_end:
            heapq.heappush(self.expiry, (run_end, dev.id))
            dev.expiry_ns = run_end

    def _join(self, dev: DeviceRecord, key: ClassKey) -> None:
        cls = self.classes.get(key)
        if cls is None:
            cls = DeviceClass(key, dev.info, dev.speed, effective_gflops(dev.info, dev.speed))
            self.classes[key] = cls
        bisect.insort(cls.members, dev.id)
        dev.klass = key

    def _leave(self, dev: DeviceRecord) -> None:
        assert dev.klass is not None
        cls = self.classes[dev.klass]
        cls.members.pop(bisect.bisect_left(cls.members, dev.id))
        cls.ready.discard(dev.id)
        cls.thieves.discard(dev.id)
        if not cls.members:
            del self.classes[dev.klass]
        self._drop_victim(dev)
        dev.klass = None

    def _drop_victim(self, dev: DeviceRecord) -> None:
        if dev.victim_bucket is None:
            return
        heap = self.victims[dev.victim_bucket]
        heap.discard(dev.id)
        if not heap:
            del self.victims[dev.victim_bucket]
        dev.victim_bucket = None

    def hide(self, dev: DeviceRecord, *, thieves: bool = False) -> None:
        """Keep ``dev`` out of placement (and, with ``thieves``, out of the idle devices) until its
        next ``update``."""
        if dev.klass is not None:
            self.classes[dev.klass].ready.discard(dev.id)
            if thieves:
                self.classes[dev.klass].thieves.discard(dev.id)

    def expire(self, now: int, devices: dict[str, DeviceRecord]) -> None:
        """Devices whose running tile is now overdue start moving with the clock."""
        while self.expiry and self.expiry[0][0] <= now:
            t, device_id = heapq.heappop(self.expiry)
            dev = devices.get(device_id)
            if dev is not None and dev.alive and dev.run_end_ns == t:
                self.update(dev, now, touched=False)

    # ---------------------------------------------------------------- queries

    def largest_memory(self, *, without: DeviceRecord | None = None) -> int:
        """The largest alive budget (optionally not counting ``without``); -1 if none."""
        sizes = self.memory
        if without is not None and without.alive and sizes[without.info.memory_bytes] == 1:
            return max((m for m in sizes if m != without.info.memory_bytes), default=-1)
        return max(sizes, default=-1)

    def best(self, tile: TileSpec, need_bytes: int, now: int) -> tuple[Objective, str] | None:
        """EFT: the alive device with the smallest objective that could hold the tile.

        Exact: it equals :func:`scheduler.placement.best_device_ns` over every alive device.
        """
        best: tuple[Objective, str] | None = None
        for cls in self.classes.values():
            info = cls.info
            if need_bytes > info.memory_bytes:
                continue
            top = cls.ready.top(now)
            if top is None:
                continue
            key = (top[0] + cost_ns(tile, info, cls.speed), -cls.eff, top[1])
            if best is None or key < best[0]:
                best = (key, top[1])
        return best

    def thief_heads(self, now: int) -> list[tuple[float, int, str, DeviceClass]]:
        """Each class's first thief as ``(-eff, ready, id, class)``, in the order to try."""
        heads = []
        for cls in self.classes.values():
            top = cls.thieves.top(now)
            if top is not None:
                heads.append((-cls.eff, top[0], top[1], cls))
        heads.sort(key=lambda h: h[:3])
        return heads

    def victims_for(self, memory_bytes: int, now: int) -> Walk:
        """Devices with a planned tile that fits ``memory_bytes``, latest queue end first."""
        return Walk([h for m, h in self.victims.items() if m <= memory_bytes], now)

    def tail_device(self, need: int, free: dict[str, DeviceRecord]) -> str | None:
        """The best device for a tail among all alive ones with room (see ``tail_preference``).

        Classes in preference order; within one, members in id order until one has room: the
        first member usually has, so this is O(classes) unless the preferred devices are full.
        """
        ranks: dict[tuple[bool, float], list[DeviceClass]] = {}
        for cls in self.classes.values():
            ranks.setdefault(cls.tail_rank, []).append(cls)
        for rank in sorted(ranks):
            found: str | None = None
            for cls in ranks[rank]:
                for device_id in cls.members:
                    if found is not None and device_id >= found:
                        break
                    if need <= free[device_id].free_bytes():
                        found = device_id
                        break
            if found is not None:
                return found
        return None
