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
planned tiles only (:mod:`scheduler.stealing`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from scheduler.events import Cancel, Complete, Dispatch, FailFrame, Instruction, RunTail
from scheduler.log import EventLog
from scheduler.model import TileKey
from scheduler.placement import (
    Candidate,
    choose_tail_device,
    largest_budget,
    plan_greedy,
    tail_cost_s,
    tile_cost_s,
)
from scheduler.records import DeviceRecord, FrameRecord, FrameStatus, TileRecord
from scheduler.stealing import PlannedTile, Victim, choose_steal


class SchedulerCore:
    """Bookkeeping plus planning and settling; see :class:`Scheduler`."""

    def __init__(
        self,
        *,
        max_in_flight_per_device: int = 2,
        max_retries: int = 3,
        log_size: int = 10000,
        work_stealing: bool = True,
        learn_speed: bool = True,
    ) -> None:
        if max_in_flight_per_device < 1:
            raise ValueError("max_in_flight_per_device must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if log_size < 1:
            raise ValueError("log_size must be >= 1")
        self.max_in_flight_per_device = max_in_flight_per_device
        self.max_retries = max_retries
        self.log_size = log_size
        self.work_stealing = work_stealing
        self.learn_speed = learn_speed
        self.now = 0.0
        self.retries = 0
        self.steals = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._frames: dict[int, FrameRecord] = {}
        self._finished: OrderedDict[int, FrameRecord] = OrderedDict()
        self._seq = 0
        self._log = EventLog(log_size)

    # ============================================================== transitions

    def _tile(self, key: TileKey) -> TileRecord:
        return self._frames[key[0]].tiles[(key[1], key[2])]

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
        was_running = dev.in_flight[0] == key
        dev.in_flight.remove(key)
        tile = self._tile(key)
        dev.release(tile)
        started = dev.running_since if was_running else None
        if was_running:
            dev.running_since = self.now
        return tile, started

    def _release_tail(self, frame_id: int, device_id: str) -> FrameRecord | None:
        dev = self._devices.get(device_id)
        if dev is None or frame_id not in dev.tails:
            return None
        del dev.tails[frame_id]
        return self._frames[frame_id]

    def _fail_frame(self, frame: FrameRecord, reason: str, out: list[Instruction]) -> None:
        """End a frame as failed: drop its planned tiles, cancel its queued
        ones, and let running ones drain (their results will be ignored)."""
        if frame.status != "active":
            return
        for tile in sorted(frame.tiles.values(), key=lambda t: t.priority):
            if tile.state == "planned" and tile.device is not None:
                self._devices[tile.device].unplan(tile.key)
                tile.state, tile.device = "dropped", None
            elif tile.state == "in_flight" and tile.device is not None:
                dev = self._devices[tile.device]
                if dev.in_flight[0] != tile.key:
                    dev.in_flight.remove(tile.key)
                    dev.release(tile)
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
        self._frames.pop(frame.frame_id, None)
        self._finished[frame.frame_id] = frame
        while len(self._finished) > self.log_size:
            self._finished.popitem(last=False)

    # ================================================================ planning

    def _infeasible(self, frame: FrameRecord) -> str | None:
        """A reason no alive device can ever run some remaining part of the
        frame, or None.  Checked on submission and after each loss."""
        alive = [d.info for d in self._devices.values() if d.alive]
        if not alive:
            return f"no alive device to run frame {frame.frame_id}"
        largest = largest_budget(alive)
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

    def _ready_at(self, dev: DeviceRecord, *, with_planned: bool = True) -> float:
        """When the device's committed work is estimated to end."""
        t = self.now
        for i, key in enumerate(dev.in_flight):
            cost = tile_cost_s(self._tile(key).spec, dev.info, dev.speed)
            if i == 0:
                cost = max(0.0, cost - (self.now - dev.running_since))
            t += cost
        for fid in dev.tails:
            t += tail_cost_s(self._frames[fid].spec, dev.info, dev.speed)
        if with_planned:
            for _, key in dev.planned:
                t += tile_cost_s(self._tile(key).spec, dev.info, dev.speed)
        return t

    def _candidate(self, dev: DeviceRecord, *, with_planned: bool = True) -> Candidate:
        return Candidate(dev.info, dev.speed, self._ready_at(dev, with_planned=with_planned))

    def _plan(
        self,
        tiles: Iterable[TileRecord],
        out: list[Instruction],
        *,
        why: str,
        exclude: str | None = None,
    ) -> None:
        """Put ready tiles on planned queues by greedy EFT, oldest first.

        ``exclude`` keeps tiles off one device (the one just slowed) unless
        no other device can hold them.
        """
        todo = sorted(tiles, key=lambda t: t.priority)
        if not todo:
            return
        alive = {d.id: self._candidate(d) for d in self._devices.values() if d.alive}
        preferred = {d: c for d, c in alive.items() if d != exclude}
        choices, updated = plan_greedy([(t, t.spec, t.need_bytes) for t in todo], preferred)
        alive.update(updated)
        leftovers = [t for t, d in choices if d is None]
        if leftovers and exclude is not None and exclude in alive:
            more, _ = plan_greedy([(t, t.spec, t.need_bytes) for t in leftovers], alive)
            choices = [(t, d) for t, d in choices if d is not None] + more
        for tile, device in choices:
            frame = self._frames[tile.key[0]]
            if frame.status != "active":
                continue
            if device is None:
                reason = self._infeasible(frame) or f"no device can hold tile {tile.key}"
                self._fail_frame(frame, reason, out)
                continue
            tile.state, tile.device = "planned", device
            self._devices[device].plan(tile.priority, tile.key)
            self._log.note(self.now, tile.key, "waiting", "planned", device, why)

    # ================================================================= settling

    def _settle(self, out: list[Instruction]) -> None:
        """Place pending tails, fill free slots, steal for idle devices;
        repeat until no steal happens."""
        self._place_tails(out)
        self._fill(out)
        if not self.work_stealing:
            return
        budget = 1 + sum(len(d.planned) for d in self._devices.values()) * max(
            1, len(self._devices)
        )
        while budget > 0 and self._steal_once():
            budget -= 1
            self._fill(out)

    def _place_tails(self, out: list[Instruction]) -> None:
        pending = sorted(
            (f for f in self._frames.values() if f.status == "active" and f.tail == "pending"),
            key=lambda f: f.seq,
        )
        for frame in pending:
            need = frame.spec.tail_memory_bytes
            alive = [d for d in self._devices.values() if d.alive]
            device = choose_tail_device(
                need, [(Candidate(d.info, d.speed), d.free_bytes()) for d in alive]
            )
            if device is None:
                continue  # no room now; memory frees when something finishes
            frame.tail, frame.tail_device = "running", device
            self._devices[device].tails[frame.frame_id] = need
            out.append(RunTail(frame.frame_id, device))

    def _fill(self, out: list[Instruction]) -> None:
        """Dispatch planned tiles into free slots, head of queue first; a head
        that does not fit in memory now waits (it fits once the device
        drains, because planning only chose devices whose budget holds it)."""
        for dev in sorted(self._devices.values(), key=lambda d: d.id):
            if not dev.alive:
                continue
            while dev.planned and len(dev.in_flight) < self.max_in_flight_per_device:
                key = dev.planned[0][1]
                tile = self._tile(key)
                if not dev.has_room_for(tile):
                    break
                dev.planned.pop(0)
                if not dev.in_flight:
                    dev.running_since = self.now
                dev.in_flight.append(key)
                dev.reserve(tile)
                tile.state = "in_flight"
                self._log.note(self.now, key, "planned", "in_flight", dev.id, "dispatch")
                out.append(Dispatch(key, dev.id))

    def _planned_tiles(self, dev: DeviceRecord) -> tuple[PlannedTile, ...]:
        out: list[PlannedTile] = []
        for _, key in dev.planned:
            tile = self._frames[key[0]].tiles[(key[1], key[2])]
            out.append(PlannedTile(key, tile.spec, tile.weights + tile.spec.peak_bytes))
        return tuple(out)

    def _steal_once(self) -> bool:
        """Let one idle device take one planned tile, if that helps."""
        alive = [d for d in self._devices.values() if d.alive]
        thieves = sorted(
            (
                d
                for d in alive
                if not d.planned and len(d.in_flight) < self.max_in_flight_per_device
            ),
            key=lambda d: (-d.info.gflops / d.speed, d.id),
        )
        if not thieves:
            return False
        victims = [
            Victim(self._candidate(d, with_planned=False), self._planned_tiles(d))
            for d in sorted(alive, key=lambda d: d.id)
            if d.planned
        ]
        if not victims:
            return False
        for thief in thieves:
            steal = choose_steal(self._candidate(thief), victims)
            if steal is None:
                continue
            victim = self._devices[steal.victim]
            tile = self._tile(steal.key)
            victim.unplan(steal.key)
            thief.plan(tile.priority, steal.key)
            tile.device = thief.id
            thief.steals += 1
            victim.stolen_from += 1
            self.steals += 1
            self._log.note(
                self.now, steal.key, "planned", "planned", thief.id, f"stolen from {victim.id}"
            )
            return True
        return False
