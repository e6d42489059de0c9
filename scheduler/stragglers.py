"""Slow devices, from the scheduler's side: learned slowdowns, overdue tiles, speculative copies.

A mixin of :class:`scheduler.core.SchedulerCore`, which holds the state; kept apart because it is
one idea (a device slower than its profile says) with its own constants:

* a learned slowdown moves the device's queue (``_slow_down``) and relaxes with time unless results
  confirm it (``RELAX_AFTER_S``);
* a running tile ``SPECULATE_AFTER`` times past its expected time (and at least
  ``SPECULATE_MIN_S`` into its run) is overdue: the device is slowed
  down on suspicion, and the tile is copied to an idle device, first result wins
  (``SPECULATION_SHARE`` bounds the copies);
* ``next_deadline`` tells the shell when to send a ``Tick`` so this happens with nothing else going on.
"""

from __future__ import annotations

import heapq
import math
from scheduler.events import Cancel, DeviceSlow, Dispatch, Instruction
from scheduler.model import TileKey
from scheduler.placement import NS, compute_s, duration_ns, speed_step, to_ns
from scheduler.records import DeviceRecord, TileRecord

SPECULATE_AFTER = 2.0
"""The runtime's default: a tile still running after this many times its expected time (at its
device's learned speed) is re-run on an idle device, and the first result wins (as Spark's
``spark.speculation.multiplier``, 1.5 there). Twice covers the jitter of dispatch and of a busy host."""
SPECULATE_MIN_S = 0.1
"""...and never before it has run this long (as Spark's ``spark.speculation.minTaskRuntime``, also
100 ms): below that a tile is shorter than the runtime's own jitter (a Ray call's round trip is 1-5
ms on a busy host), every tile of a small model looks overdue, and chasing them costs the driver
more than a copy could win back (``tilefleet bench --dispatch``: 3.4 ms a tile with it, 2.0 without)."""
SPECULATION_SHARE = 0.1
"""At most this share of the tiles in flight (and at least one tile) has a speculative copy at once."""
RELAX_AFTER_S = 10.0
"""A slowdown the scheduler learned (from results or an overdue tile) halves every this many
seconds unless new results confirm it: a device that got little work because it was once slow
(heat, a co-located job) is tried again, rather than starved on an old measurement."""



class Stragglers:
    """The straggler policy's methods, mixed into :class:`~scheduler.core.SchedulerCore`, which holds
    the state and the transitions used here (``_set_speed``, ``_plan``, ``_touch``, ...)."""

    def _drop_copy(self, tile: TileRecord, device_id: str, out: list[Instruction] | None) -> None:
        """Forget one of a speculated tile's two copies (the other stays the tile's only copy);
        ``out``: cancel it at the device too (None: the device already gave it back or is gone)."""
        assert tile.backup is not None
        if device_id == tile.device:
            tile.device = tile.backup
        tile.backup = None
        self._speculative -= 1
        self._overdue.pop(tile.key, None)
        dev = self._devices[device_id]
        if out is not None and tile.key in dev.in_flight:
            self._remove_in_flight(dev, tile)
            dev.cancelled += 1
            out.append(Cancel(tile.key, device_id))

    def _slow_down(
        self, dev: DeviceRecord, factor: float, out: list[Instruction], *, why: str, queued: bool = True,
        busy: bool = False,
    ) -> None:
        """The device got slower: keep its running tile, cancel the tiles queued at it (unless
        ``queued`` is False: a suspicion, not a measurement) and re-place those and its planned
        tiles elsewhere. ``busy``: it still computes a tile the scheduler gave up on (a lost
        speculative race), so its first tile in flight has not started either and moves too."""
        self._set_speed(dev, factor)
        elsewhere = self._index.largest_memory(without=dev)  # -1: no other alive device
        moved: list[TileRecord] = []
        for key in (dev.in_flight[0 if busy else 1:] if queued else []) + dev.planned_keys():
            tile = self._tile(key)
            if tile.backup is not None:
                self._drop_copy(tile, dev.id, out)  # a copy elsewhere runs on
                continue
            if tile.spec.pin is not None and self._holder(self._frames[key[0]], tile) is dev:
                continue  # it continues on maps held here
            if tile.need_bytes > elsewhere:
                continue  # nowhere else could hold it: leave it here
            self._take_off(dev, tile, out)
            moved.append(tile)
        dev.requeued += len(moved)
        self._plan(moved, out, why=why, exclude=dev.id)

    def _learned_slow(self, dev: DeviceRecord) -> None:
        """``dev``'s factor was just learned: let it decay unless results confirm it."""
        if self.learn_speed and dev.speed >= 1.05:
            heapq.heappush(self._relax, (self._now_ns + to_ns(RELAX_AFTER_S), dev.id, dev.speed))

    def _relax_speeds(self) -> None:
        while self._relax and self._relax[0][0] <= self._now_ns:
            _, device_id, speed = heapq.heappop(self._relax)
            dev = self._devices.get(device_id)
            if dev is None or not dev.alive or dev.speed != speed:
                continue  # gone, or measured again since
            new = speed_step(1 + (speed - 1) / 2)
            self._set_speed(dev, new if new >= 1.05 else 1.0)
            dev.estimate = dev.speed
            self._learned_slow(dev)

    # ============================================================== speculation

    def _watch_running(self, dev: DeviceRecord) -> None:
        """``dev``'s first tile in flight started now: note when it becomes overdue."""
        if self.speculate_after is None:
            return
        key = dev.in_flight[0]
        heapq.heappush(self._watch, (self._due_ns(dev, key), dev.id, key, 1))

    def _due_ns(self, dev: DeviceRecord, key: TileKey) -> int:
        """When ``key``, running on ``dev``, becomes overdue."""
        assert self.speculate_after is not None
        expected = duration_ns(self._tile(key).spec, dev.info, dev.speed)
        return to_ns(dev.running_since) + max(math.ceil(self.speculate_after * expected), self._speculate_min_ns)

    def _overdue_factor(self, dev: DeviceRecord, key: TileKey) -> float:
        """The speed factor to assume for ``dev`` while ``key`` is overdue there.

        A tile that has run ``t`` and not finished is taken to need ``t`` more (the usual
        estimate for a straggler, whose slowdown is unknown but at least ``t / expected``), so
        the factor is the one that makes the tile last ``2 t`` (only compute scales with it):
        placement then sees the device busy for as long again, and its queued tiles go elsewhere."""
        spec = self._tile(key).spec
        fixed = duration_ns(spec, dev.info, 0.0)  # transfers and overhead: a slow processor leaves them be
        compute = max(1, duration_ns(spec, dev.info, 1.0) - fixed)
        return (2 * (self._now_ns - to_ns(dev.running_since)) - fixed) / compute

    def next_deadline(self) -> float | None:
        """When a running tile would become overdue or a learned slowdown relaxes (seconds), for
        the shell's timer: a ``Tick`` then lets that happen even if nothing else does; None if
        nothing is pending."""
        relax = self._relax[0][0] / NS if self._relax else None
        watch = self._watch
        while watch:
            _, device_id, key, _ = watch[0]
            dev = self._devices.get(device_id)
            if dev is not None and dev.alive and dev.in_flight and dev.in_flight[0] == key:
                due = watch[0][0] / NS
                return due if relax is None else min(due, relax)
            heapq.heappop(watch)  # it finished or moved: no tick needed for it
        return relax

    def _find_overdue(self, out: list[Instruction]) -> None:
        """Running tiles that have run ``speculate_after`` times their expected time (at the
        device's current speed) are overdue.  Their device is at least that much slower than
        thought, so it is slowed down (its planned tiles move elsewhere) and the tile waits for an
        idle device to run a copy (:meth:`_start_copies`).  A late tile may be a busy link rather
        than a slow processor, and a queued tile may already be on the wire (sending it again would
        double the traffic), so the tiles queued at the device move only if the running one is
        still there after twice as long again: then it is slowed down as for a ``DeviceSlow``."""
        while self._watch and self._watch[0][0] <= self._now_ns:
            _, device_id, key, level = heapq.heappop(self._watch)
            dev = self._devices.get(device_id)
            if dev is None or not dev.alive or not dev.in_flight or dev.in_flight[0] != key:
                continue  # it finished or moved
            tile = self._tile(key)
            if tile.device != device_id or (tile.backup is not None and level == 1):
                continue
            due = self._due_ns(dev, key)
            if level == 1 and due > self._now_ns:  # its expected time grew (the device was found slower)
                heapq.heappush(self._watch, (due, device_id, key, 1))
                continue
            if level == 1:
                self._overdue[key] = device_id
                ran = self._now_ns - to_ns(dev.running_since)
                heapq.heappush(self._watch, (self._now_ns + 2 * ran, device_id, key, 2))
            factor = self._overdue_factor(dev, key)
            if factor > dev.speed or level == 2:
                self._slow_down(dev, max(factor, dev.speed), out, queued=level == 2,
                                why=f"{device_id}: running tile overdue, x{factor:.3g} at least")
                self._learned_slow(dev)

    def _start_copies(self, out: list[Instruction]) -> None:
        """Re-run overdue tiles on idle devices, oldest frame first; the first result wins.

        A copy goes to the best idle device (a thief: nothing planned, a free slot, nothing
        running) other than the tile's own, with room for it, that would finish it sooner than
        the original has already run.  At most ``speculation_share`` of the tiles in flight (and
        at least one) have a copy at once.
        """
        limit = max(1, int(self.speculation_share * self._flying))
        for key in [k for k in self._overdue if k[0] not in self._frames]:
            del self._overdue[key]  # its frame ended and retired
        for key, device_id in sorted(self._overdue.items(), key=lambda kv: self._tile(kv[0]).priority):
            if self._speculative >= limit:
                return
            dev = self._devices.get(device_id)
            tile = self._tile(key)
            if (dev is None or not dev.alive or not dev.in_flight or dev.in_flight[0] != key
                    or tile.device != device_id or tile.backup is not None
                    or self._frames[key[0]].status != "active"):
                del self._overdue[key]
                continue
            thief = self._copy_target(tile, dev)
            if thief is None:
                continue  # no idle device now: try again at the next event
            del self._overdue[key]
            thief.dispatch_copy(tile, self._cost(thief, tile), self.now, self._now_ns)
            tile.backup = thief.id
            self._flying += 1
            self._speculative += 1
            self.speculations += 1
            thief.speculated += 1
            self._touch(thief)
            self._log.note(self.now, key, "in_flight", "in_flight", thief.id,
                           f"speculative copy: overdue on {device_id}")
            out.append(Dispatch(key, thief.id))

    def _copy_target(self, tile: TileRecord, primary: DeviceRecord) -> DeviceRecord | None:
        if tile.spec.pin is not None:
            return None  # its maps are on the primary only
        ran_ns = self._now_ns - to_ns(primary.running_since)  # the copy must finish before this much again
        self._index.hide(primary, thieves=True)
        try:
            for _, _, thief_id, _cls in self._index.thief_heads(self._now_ns):
                thief = self._devices[thief_id]
                if thief.in_flight or not thief.has_room_for(tile):
                    continue  # a copy must start at once
                if self._cost(thief, tile) < ran_ns:
                    return thief
            return None
        finally:
            self._touch(primary)

    def _on_device_slow(self, ev: DeviceSlow, out: list[Instruction]) -> None:
        dev = self._devices.get(ev.device_id)
        if dev is None or not dev.alive or not (math.isfinite(ev.factor) and ev.factor > 0):
            return
        # Measurements restart from the announced factor; tiles started
        # before the announcement say nothing about the new speed.
        dev.restart_speed(self.now)
        if ev.factor > dev.speed:
            self._slow_down(dev, ev.factor, out, why=f"{dev.id} slowed x{ev.factor:g}")
        else:
            self._set_speed(dev, ev.factor)  # faster again: it wins work back by stealing

    def _learn_speed(
        self, dev: DeviceRecord, tile: TileRecord, measured_s: float, out: list[Instruction]
    ) -> None:
        """Correct the device's speed factor from a measured compute time.

        Profiles drift (thermal throttling, a co-located job) long before
        anyone sends ``DeviceSlow``; the shell's ``compute_s`` shows it.  The
        first measurement after a join or an announcement replaces the
        factor, later ones are averaged; a jump by ``SLOWDOWN_TRIGGER`` is
        handled exactly like an announced slowdown.  Only the running tile's
        result counts, and only if it started after the last announcement.
        Tiles shorter than ``SPEED_WINDOW_S`` (expected) count together, as one
        measurement of their summed times.
        """
        expected = compute_s(tile.spec.flops, dev.info)
        if not (self.learn_speed and expected > 0 and measured_s > 0 and math.isfinite(measured_s)):
            return
        dev.window_measured_s += measured_s
        dev.window_expected_s += expected
        dev.window_n += 1
        if dev.window_expected_s < self.SPEED_WINDOW_S:
            return  # short tiles: measure them together
        # the reported time includes the per-tile overhead, which the speed factor does not scale
        ratio = max(0.05, (dev.window_measured_s - dev.window_n * dev.info.tile_overhead_s) / dev.window_expected_s)
        dev.window_measured_s = dev.window_expected_s = 0.0
        dev.window_n = 0
        dev.estimate = (
            ratio
            if dev.observed == 0
            else (1 - self.SPEED_ALPHA) * dev.estimate + self.SPEED_ALPHA * ratio
        )
        dev.observed += 1
        new = speed_step(dev.estimate)
        if new == dev.speed:
            return  # within the same 10% step: nothing to re-time, and devices stay in few classes
        if new > dev.speed * self.SLOWDOWN_TRIGGER:
            self._slow_down(dev, new, out, why=f"{dev.id} measured x{new:.3g}")
        else:
            self._set_speed(dev, new)
        self._learned_slow(dev)
