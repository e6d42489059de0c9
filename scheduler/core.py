"""The working set and how work is put on the fleet: plan, fill, steal.

:class:`SchedulerCore` holds the scheduler's bookkeeping (devices, frames,
the log) and the policy that runs after every event, *settling*: pending
tails are placed, free slots are filled from the planned queues, and idle
devices steal planned tiles, until nothing changes.  It also owns the few
transitions every event handler needs (take a result back, fail a frame,
retire it).  Reacting to the events themselves is
:class:`scheduler.state.Scheduler`'s job; the split keeps "what happened"
apart from "where work goes now".

Planning is EFT (:mod:`scheduler.placement`); rebalancing is stealing of
planned tiles only (:mod:`scheduler.stealing`).  Both ask the fleet indexes
(:mod:`scheduler.index`) instead of scanning devices, so settling after an event
touches only the devices and frames that event concerns.  Every change to a
device's queues goes through the record's queue methods followed by
:meth:`SchedulerCore._touch`, which re-files it in the indexes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

from scheduler.events import Cancel, Complete, Dispatch, FailFrame, Instruction, RunTail
from scheduler.index import FleetIndex
from scheduler.log import EventLog
from scheduler.model import TileKey
from scheduler.placement import cost_ns, tail_ns, to_ns
from scheduler.records import DeviceRecord, FrameRecord, FrameStatus, TileRecord
from scheduler.stragglers import SPECULATE_MIN_S, SPECULATION_SHARE, Stragglers
from scheduler.stealing import (
    PlannedTile,
    Queue,
    Steal,
    Thief,
    make_queue,
    out_of_reach,
    steal_from,
)

class SchedulerCore(Stragglers):
    """Bookkeeping plus planning and settling; see :class:`Scheduler`."""

    def __init__(
        self,
        *,
        max_in_flight_per_device: int = 2,
        max_retries: int = 3,
        log_size: int = 10000,
        work_stealing: bool = True,
        learn_speed: bool = True,
        speculate_after: float | None = None,
        speculation_share: float = SPECULATION_SHARE,
        speculate_min_s: float = SPECULATE_MIN_S,
    ) -> None:
        if max_in_flight_per_device < 1:
            raise ValueError("max_in_flight_per_device must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if log_size < 1:
            raise ValueError("log_size must be >= 1")
        if speculate_after is not None and not (math.isfinite(speculate_after) and speculate_after > 1):
            raise ValueError(f"speculate_after must be a number > 1 (times a tile's expected time) or None "
                             f"(no speculation), got {speculate_after!r}")
        if not (math.isfinite(speculate_min_s) and speculate_min_s >= 0):
            raise ValueError(f"speculate_min_s must be a number >= 0 (seconds), got {speculate_min_s!r}")
        if not (0 < speculation_share <= 1):
            raise ValueError(f"speculation_share must be in (0, 1], got {speculation_share!r}")
        self.max_in_flight_per_device = max_in_flight_per_device
        self.max_retries = max_retries
        self.log_size = log_size
        self.work_stealing = work_stealing
        self.learn_speed = learn_speed
        self.speculate_after = speculate_after
        self.speculation_share = speculation_share
        self._speculate_min_ns = to_ns(speculate_min_s)
        self.speculations = 0  # speculative copies started
        self.speculation_wins = 0  # ... that finished before the original
        self._flying = 0  # tile copies in flight on all devices
        self._speculative = 0  # tiles with a second copy in flight now
        # (when the running tile is overdue, device, tile, level): level 1 at speculate_after times its
        # expected time, level 2 when it has run twice as long again
        self._watch: list[tuple[int, str, TileKey, int]] = []
        self._overdue: dict[TileKey, str] = {}  # overdue running tiles waiting for an idle device
        self._relax: list[tuple[int, str, float]] = []  # (when, device, learned factor) to halve then
        self.now = 0.0
        self._now_ns = 0
        self.retries = 0
        self.steals = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._frames: dict[int, FrameRecord] = {}
        self._finished: OrderedDict[int, FrameRecord] = OrderedDict()
        self._seq = 0
        self._log = EventLog(log_size)
        self._checked: dict[tuple[object, ...], tuple[object, tuple[str, ...]]] = {}  # see Scheduler._problems
        self._index = FleetIndex(max_in_flight_per_device)
        self._tails_new: set[int] = set()  # frames whose tail became pending: search everywhere
        self._tails_waiting: set[int] = set()  # pending tails that found no room: retry on freed

    # ============================================================== transitions

    def _tile(self, key: TileKey) -> TileRecord:
        return self._frames[key[0]].tiles[(key[1], key[2])]

    def _touch(self, dev: DeviceRecord) -> None:
        """Re-file ``dev`` in the indexes after any change to its queues, speed or life."""
        self._index.update(dev, self._now_ns)

    def _cost(self, dev: DeviceRecord, tile: TileRecord) -> int:
        return cost_ns(tile.spec, dev.info, dev.speed)

    def _set_speed(self, dev: DeviceRecord, speed: float) -> None:
        """A new speed factor: every cost on the device changes, and so may its class."""
        if speed == dev.speed:
            return
        dev.speed = speed
        costs = {k: self._cost(dev, self._tile(k)) for k in dev.costs}
        tails = {f: tail_ns(self._frames[f].spec, dev.info, speed) for f in dev.tail_costs}
        dev.retime(costs, tails)
        self._touch(dev)

    def _set_pending_tail(self, frame: FrameRecord) -> None:
        frame.tail, frame.tail_device = "pending", None
        self._tails_new.add(frame.frame_id)

    def _take_back(self, key: TileKey, device_id: str) -> tuple[TileRecord, float | None] | None:
        """Remove ``key`` from the device's in-flight list if it is there.

        Returns the tile and, if it was the running one, when it started.
        Returns None for results the machine no longer expects: the device
        is unknown or lost, the tile was cancelled or re-placed, or it was
        already done.  Those are the late duplicates to ignore.
        """
        dev = self._devices.get(device_id)
        if dev is None or key not in dev.in_flight:
            return None
        tile = self._tile(key)
        started = dev.running_since
        was_running = self._remove_in_flight(dev, tile)
        return tile, started if was_running else None

    def _remove_in_flight(self, dev: DeviceRecord, tile: TileRecord) -> bool:
        was_running = dev.take_flight(tile, self.now, self._now_ns)
        self._flying -= 1
        if was_running and dev.in_flight:
            self._watch_running(dev)
        self._index.freed.add(dev.id)
        self._touch(dev)
        return was_running

    def _take_off(self, dev: DeviceRecord, tile: TileRecord, out: list[Instruction]) -> None:
        """Take a queued (cancelled at the device) or planned tile off ``dev``; it waits to be placed again."""
        if tile.state == "in_flight":
            self._remove_in_flight(dev, tile)
            dev.cancelled += 1
            out.append(Cancel(tile.key, dev.id))
        else:
            self._unplan(dev, tile)
        tile.state, tile.device = "waiting", None

    def _unplan(self, dev: DeviceRecord, tile: TileRecord) -> None:
        dev.unplan(tile)
        self._touch(dev)

    def _release_tail(self, frame_id: int, device_id: str) -> FrameRecord | None:
        dev = self._devices.get(device_id)
        if dev is None or frame_id not in dev.tails:
            return None
        dev.remove_tail(frame_id)
        self._index.freed.add(dev.id)
        self._touch(dev)
        frame = self._frames[frame_id]
        if frame.status != "active":
            frame.tail, frame.tail_device = "blocked", None  # an ended frame's tail drained: it can retire
        return frame

    def _fail_frame(self, frame: FrameRecord, reason: str, out: list[Instruction]) -> None:
        """End a frame as failed: drop its planned tiles, cancel its queued
        ones, and let running ones drain (their results will be ignored)."""
        if frame.status != "active":
            return
        for tile in sorted(frame.tiles.values(), key=lambda t: t.priority):
            if tile.state == "planned" and tile.device is not None:
                self._unplan(self._devices[tile.device], tile)
                tile.state, tile.device = "dropped", None
            elif tile.state == "in_flight" and tile.device is not None:
                if tile.backup is not None:
                    self._drop_copy(tile, tile.backup, out)
                dev = self._devices[tile.device]
                if dev.in_flight[0] != tile.key:
                    self._remove_in_flight(dev, tile)
                    dev.cancelled += 1
                    out.append(Cancel(tile.key, dev.id))
                    tile.state, tile.device = "dropped", None
            elif tile.state == "waiting":
                tile.state = "dropped"
        if frame.tail == "pending":
            frame.tail = "blocked"
        self._end_frame(frame, "failed", reason, out)

    def _end_frame(
        self, frame: FrameRecord, status: FrameStatus, reason: str, out: list[Instruction]
    ) -> None:
        frame.status, frame.reason, frame.ended_t = status, reason, self.now
        self._release_held(frame)
        out.append(
            Complete(frame.frame_id) if status == "completed" else FailFrame(frame.frame_id, reason)
        )
        self._maybe_retire(frame)

    def _maybe_retire(self, frame: FrameRecord) -> None:
        """Move an ended frame out of the working set once nothing of it is
        still running anywhere; keep a bounded memory of it to ignore late
        events and answer ``frame_status``."""
        if frame.status == "active":
            return
        if any(t.state == "in_flight" for t in frame.tiles.values()):
            return
        if frame.tail == "running":
            return
        if self._frames.pop(frame.frame_id, None) is not None:
            for t in frame.tiles.values():
                if t.state == "done" and t.device is not None:
                    self._forget_result(t.device, frame.frame_id)
        self._finished[frame.frame_id] = frame
        while len(self._finished) > self.log_size:
            self._finished.popitem(last=False)

    def _forget_result(self, device_id: str, frame_id: int) -> None:
        results = self._devices[device_id].results
        left = results[frame_id] - 1
        if left:
            results[frame_id] = left
        else:
            del results[frame_id]

    # ================================================================ planning

    def _infeasible(self, frame: FrameRecord) -> str | None:
        """A reason no alive device can ever run some remaining part of the
        frame, or None.  Checked on submission and after each loss."""
        largest = self._index.largest_memory()
        if largest < 0:
            return f"no alive device to run frame {frame.frame_id}"
        for tile in sorted(frame.tiles.values(), key=lambda t: t.priority):
            if tile.state != "done" and tile.need_bytes > largest:
                return (
                    f"tile {tile.key} needs {tile.need_bytes} bytes (stage {tile.spec.stage} "
                    f"weights {tile.weights} + peak {tile.spec.peak_bytes}) but the largest "
                    f"alive device budget is {largest} bytes"
                )
        need = frame.spec.tail_memory_bytes
        if frame.tail != "done" and need > largest:
            return (
                f"tail of frame {frame.frame_id} needs {need} bytes but the largest alive device "
                f"budget is {largest} bytes"
            )
        return None

    def _plan(
        self,
        tiles: Iterable[TileRecord],
        out: list[Instruction],
        *,
        why: str,
        exclude: str | None = None,
    ) -> None:
        """Put ready tiles on planned queues by greedy EFT, oldest first.

        Each tile goes to the device with the best objective given everything
        planned so far (the index answers exactly what a scan of every alive
        device would).  ``exclude`` keeps tiles off one device (the one just
        slowed) unless no other device can hold them.
        """
        todo = sorted(tiles, key=lambda t: t.priority)
        if not todo:
            return
        hidden = self._devices.get(exclude) if exclude is not None else None
        if hidden is not None and hidden.alive:
            self._index.hide(hidden)
            leftovers = self._place(todo, out, why=why, fail=False)
            self._touch(hidden)
            self._place(leftovers, out, why=why, fail=True)
        else:
            self._place(todo, out, why=why, fail=True)

    def _place(
        self, todo: list[TileRecord], out: list[Instruction], *, why: str, fail: bool
    ) -> list[TileRecord]:
        leftovers: list[TileRecord] = []
        for tile in todo:
            frame = self._frames[tile.key[0]]
            if frame.status != "active":
                continue
            holder = self._holder(frame, tile)
            if holder is not None:  # it continues on maps held there: no choice to make
                tile.state, tile.device = "planned", holder.id
                holder.plan(tile, self._cost(holder, tile))
                self._touch(holder)
                self._log.note(self.now, tile.key, "waiting", "planned", holder.id, why + " (pinned)")
                continue
            found = self._index.best(tile.spec, tile.need_bytes, self._now_ns)
            if found is None:
                if not fail:
                    leftovers.append(tile)
                    continue
                reason = self._infeasible(frame) or f"no device can hold tile {tile.key}"
                self._fail_frame(frame, reason, out)
                continue
            dev = self._devices[found[1]]
            tile.state, tile.device = "planned", dev.id
            dev.plan(tile, self._cost(dev, tile))
            self._touch(dev)
            self._log.note(self.now, tile.key, "waiting", "planned", dev.id, why)
        return leftovers

    def _holder(self, frame: FrameRecord, tile: TileRecord) -> DeviceRecord | None:
        """The alive device holding the maps ``tile`` is pinned to, if it can hold the tile (else it
        goes anywhere: the maps' device is gone and they were made again, or they will be fetched)."""
        pin = tile.spec.pin
        if pin is None:
            return None
        src = frame.tiles[pin]
        dev = self._devices.get(src.device or "") if src.state == "done" and src.holds else None
        return dev if dev is not None and dev.alive and tile.need_bytes <= dev.info.memory_bytes else None

    def _release_held(self, frame: FrameRecord, done: TileRecord | None = None) -> None:
        """Free the maps held for pinned tiles: those ``done`` was the last to need, or (None)
        every hold of the frame (it ended)."""
        if done is not None:
            pins = [] if done.spec.pin is None else [frame.tiles[done.spec.pin]]
        else:
            pins = [t for t in frame.tiles.values() if t.holds]
        for src in pins:
            if not src.holds or src.device is None:
                continue
            if done is not None and any(frame.tiles[r].spec.pin == src.spec.ref and frame.tiles[r].state != "done"
                                        for r in src.dependents):
                continue  # another tile still continues on these maps
            dev = self._devices[src.device]
            dev.unhold(src.key)
            src.holds = False
            self._index.freed.add(dev.id)
            self._touch(dev)

    # ================================================================= settling

    def _settle(self, out: list[Instruction]) -> None:
        """Note overdue tiles, place pending tails, fill free slots, steal for idle devices;
        repeat until no steal happens; then re-run overdue tiles on devices still idle."""
        if self._relax and self._relax[0][0] <= self._now_ns:
            self._relax_speeds()
        speculate = self.speculate_after is not None
        if speculate and self._watch and self._watch[0][0] <= self._now_ns:
            self._find_overdue(out)
        self._place_tails(out)
        self._fill(out)
        if self.work_stealing:
            budget = 1 + self._index.planned_total * max(1, len(self._devices))
            while budget > 0 and self._steal_once():
                budget -= 1
                self._fill(out)
        if speculate and self._overdue:
            self._start_copies(out)
            self._fill(out)  # only re-files the devices it looked at: nothing is planned on them
        if self._flying == 0 and self._frames:
            self._break_deadlock(out)

    def _break_deadlock(self, out: list[Instruction]) -> None:
        """Nothing runs, yet frames wait: maps held at a reduce point fill the devices that must
        run what continues on them. Fail the youngest frame holding maps (freeing them), so the
        older ones go on; repeat while that is still the case. Cheap: only when nothing is in flight.
        """
        while self._flying == 0:
            active = [f for f in self._frames.values() if f.status == "active"]
            if not active or any(f.tail != "blocked" for f in active):
                return  # a tail is running or about to: that is progress
            holding = [f for f in active if any(t.state == "done" and t.spec.held_bytes for t in f.tiles.values())]
            if not holding:
                return
            frame = max(holding, key=lambda f: f.seq)
            held = {t.device: 0 for t in frame.tiles.values() if t.state == "done" and t.spec.held_bytes}
            for t in frame.tiles.values():
                if t.state == "done" and t.spec.held_bytes:
                    held[t.device] += t.spec.held_bytes
            where = ", ".join(f"{b} B on {d} (budget {self._devices[d].info.memory_bytes} B)"  # type: ignore[index]
                              for d, b in sorted(held.items()))
            self._fail_frame(frame, f"frame {frame.frame_id}: the maps held at its reduce point ({where}) leave "
                                    "no room for the tiles that continue on them; use a finer grid, fewer frames "
                                    "in flight or devices with more memory", out)
            self._place_tails(out)
            self._fill(out)

    def _place_tails(self, out: list[Instruction]) -> None:
        """Oldest pending tail first, each on the best device with room now.

        A tail that found no room before can only fit on a device that freed
        memory since (``freed``), so only those are looked at for it.
        """
        if not self._tails_new and not self._tails_waiting:
            self._index.freed.clear()  # what freed memory matters only to a waiting tail
            return
        fresh, self._tails_new = self._tails_new, set()
        ids = fresh | self._tails_waiting
        frames = [self._frames[f] for f in ids if f in self._frames]
        pending = sorted(
            (f for f in frames if f.status == "active" and f.tail == "pending"), key=lambda f: f.seq
        )
        self._tails_waiting = set()
        freed = sorted(
            (d for d in map(self._devices.get, self._index.freed) if d is not None and d.alive),
            key=lambda d: (not d.info.gpu, -d.info.gflops / d.speed, d.id),
        )
        self._index.freed.clear()
        for frame in pending:
            need = frame.spec.tail_memory_bytes
            if frame.frame_id in fresh:
                device = self._index.tail_device(need, self._devices)
            else:
                device = next((d.id for d in freed if need <= d.free_bytes()), None)
            if device is None:
                self._tails_waiting.add(frame.frame_id)
                continue  # no room now; memory frees when something finishes
            dev = self._devices[device]
            frame.tail, frame.tail_device = "running", device
            dev.add_tail(frame.frame_id, need, tail_ns(frame.spec, dev.info, dev.speed))
            self._touch(dev)
            out.append(RunTail(frame.frame_id, device))

    def _fill(self, out: list[Instruction]) -> None:
        """Dispatch planned tiles into free slots, head of queue first; a head
        that does not fit in memory now waits (it fits once the device
        drains, because planning only chose devices whose budget holds it).

        Only devices changed since the last fill can have become able to
        dispatch, so only those are looked at, in id order.
        """
        for device_id in sorted(self._index.dirty):
            dev = self._devices[device_id]
            if not dev.alive:
                continue
            while dev.planned and len(dev.in_flight) < self.max_in_flight_per_device:
                key = dev.planned[0][1]
                tile = self._tile(key)
                if not dev.has_room_for(tile):
                    break
                dev.dispatch_head(tile, self.now, self._now_ns)
                tile.state = "in_flight"
                self._flying += 1
                if dev.in_flight[0] == key:
                    self._watch_running(dev)
                self._touch(dev)
                self._log.note(self.now, key, "planned", "in_flight", dev.id, "dispatch")
                out.append(Dispatch(key, dev.id))
        self._index.dirty.clear()

    def _queue(self, dev: DeviceRecord) -> Queue:
        """The victim's planned queue with its finish times, from its bookkeeping."""
        planned: list[PlannedTile] = []
        costs: list[int] = []
        for _, key in dev.planned:
            tile = self._frames[key[0]].tiles[(key[1], key[2])]
            planned.append(PlannedTile(key, tile.spec, tile.need_bytes))
            costs.append(dev.costs[key])
        run_end = dev.run_end_ns
        ready = max(self._now_ns, run_end if run_end is not None else 0) + dev.flight_ns
        return make_queue(dev.id, ready, planned, costs)

    def _choose_steal(self) -> tuple[str, Steal] | None:
        """``(thief, steal)``: the first thief in (fastest, earliest free, id) order that has a
        steal, taking from the latest victim it could take from; one try per device class
        (a class's earliest-free thief is the one most likely to gain)."""
        index = self._index
        if not index.victims:
            return None
        queues: dict[str, Queue] = {}
        for _, ready, thief_id, cls in index.thief_heads(self._now_ns):
            thief = Thief(cls.info, cls.speed, ready)
            found: Steal | None = None
            with index.victims_for(cls.info.memory_bytes, self._now_ns) as walk:
                for _, victim_id in walk:
                    queue = queues.get(victim_id)
                    if queue is None:
                        queue = queues[victim_id] = self._queue(self._devices[victim_id])
                    if out_of_reach(thief, queue):
                        break
                    found = steal_from(thief, queue)
                    if found is not None:
                        break
            if found is not None:
                return thief_id, found
        return None

    def _steal_once(self) -> bool:
        """Let one idle device take one planned tile, if that helps."""
        chosen = self._choose_steal()
        if chosen is None:
            return False
        thief_id, steal = chosen
        thief, victim = self._devices[thief_id], self._devices[steal.victim]
        tile = self._tile(steal.key)
        victim.unplan(tile)
        thief.plan(tile, self._cost(thief, tile))
        tile.device = thief.id
        self._touch(victim)
        self._touch(thief)
        thief.steals += 1
        victim.stolen_from += 1
        self.steals += 1
        self._log.note(
            self.now, steal.key, "planned", "planned", thief.id, f"stolen from {victim.id}"
        )
        return True
