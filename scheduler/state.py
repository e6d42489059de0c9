"""The scheduler: a pure state machine from events to instructions.

Modelled on dask/distributed's ``worker_state_machine.py``: ``handle`` takes
events (each carrying its own timestamp), updates the bookkeeping, and
returns the instructions the shell must carry out.  No I/O, no clock, no
randomness, no Ray: the same sequence of events always produces the same
instructions, so tests assert exact instruction lists and the simulator in
:mod:`scheduler.sim` drives this class unchanged.

How a tile moves::

    waiting (deps not done) -> planned (in a device's planned queue)
        -> in flight (dispatched; the first in flight on a device runs)
        -> done (result accepted)

Planning is EFT (:mod:`scheduler.placement`); rebalancing is stealing of
planned tiles only (:mod:`scheduler.stealing`).  After every event the
machine *settles*: pending tails are placed, free slots are filled from the
planned queues, and idle devices steal, until nothing changes.

A result is accepted only from the device the tile is in flight on.  Late
results (from a lost device, for a cancelled tile, for a frame that already
ended) are ignored, which is what makes ``Stitch`` and ``Complete``
exactly-once even when the shell delivers duplicates.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

from scheduler.events import (
    Cancel,
    Complete,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    Event,
    FailFrame,
    FrameSubmitted,
    Instruction,
    RunTail,
    Stitch,
    TailDone,
    TailFailed,
    Tick,
    TileDone,
    TileFailed,
)
from scheduler.invariants import check_invariants
from scheduler.log import EventLog, LogEntry, Subject, Transition
from scheduler.model import FrameSpec, TileKey, frame_problems, tile_key
from scheduler.placement import (
    Candidate,
    choose_tail_device,
    largest_budget,
    plan_greedy,
    tail_cost_s,
    tile_cost_s,
)
from scheduler.records import DeviceRecord, DeviceStats, FrameRecord, FrameStatus, TileRecord
from scheduler.stealing import PlannedTile, Victim, choose_steal


class Scheduler:
    """Event-driven scheduler for fused-tile CNN inference on a device fleet.

    ``max_in_flight_per_device`` bounds how many tiles a device holds at once
    (one running, the rest queued at the device); keeping it small keeps work
    in the scheduler's planned queues, where stealing can still move it.
    ``max_retries`` is how many times a retryable failure is re-run before
    the frame fails.  ``log_size`` bounds the event log and the memory of
    finished frames.  ``work_stealing=False`` gives the static MoDNN split,
    useful as a baseline.
    """

    def __init__(
        self,
        *,
        max_in_flight_per_device: int = 2,
        max_retries: int = 3,
        log_size: int = 10000,
        work_stealing: bool = True,
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
        self.now = 0.0
        self.retries = 0
        self.steals = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._frames: dict[int, FrameRecord] = {}
        self._finished: OrderedDict[int, FrameRecord] = OrderedDict()
        self._seq = 0
        self._log = EventLog(log_size)

    # ================================================================ public API

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order; return every instruction they produce."""
        out: list[Instruction] = []
        for event in events:
            produced: list[Instruction] = []
            self._advance_clock(event.t)
            self._apply(event, produced)
            self._settle(produced)
            self._log.record(self.now, event, produced)
            out.extend(produced)
        return out

    def validate(self) -> None:
        """Check every invariant; raise AssertionError saying which broke."""
        check_invariants(self._devices, self._frames, self._finished, self.max_in_flight_per_device)

    def story(self, subject: Subject) -> list[LogEntry]:
        """Log entries about a tile key, a frame id or a device id."""
        return self._log.story(subject)

    def transitions(self, key: TileKey) -> list[Transition]:
        """Internal transitions (planned, stolen, re-placed...) of one tile."""
        return self._log.tile_transitions(key)

    @property
    def log(self) -> tuple[LogEntry, ...]:
        return tuple(self._log)

    def stats(self) -> dict[str, DeviceStats]:
        """Per-device counters, by device id (lost devices included)."""
        return {d: DeviceStats.of(dev) for d, dev in sorted(self._devices.items())}

    def frame_status(self, frame_id: int) -> FrameStatus | None:
        """``active``, ``completed``, ``failed``, or None if unknown/forgotten."""
        frame = self._frames.get(frame_id) or self._finished.get(frame_id)
        return None if frame is None else frame.status

    def frame_reason(self, frame_id: int) -> str:
        """Why a failed frame failed ('' otherwise)."""
        frame = self._frames.get(frame_id) or self._finished.get(frame_id)
        return "" if frame is None else frame.reason

    def accepted(self, key: TileKey) -> str | None:
        """The device whose result for ``key`` was accepted, if one was.

        The shell keeps a tile's output only when, right after handling its
        ``TileDone``, this names the device that sent it; anything else is a
        late duplicate to drop.
        """
        frame = self._frames.get(key[0]) or self._finished.get(key[0])
        if frame is None:
            return None
        tile = frame.tiles.get((key[1], key[2]))
        if tile is None or tile.state != "done":
            return None
        return tile.device

    def in_flight(self, device_id: str) -> list[TileKey]:
        """Tiles dispatched to the device and not finished; the first runs."""
        dev = self._devices.get(device_id)
        return [] if dev is None else list(dev.in_flight)

    def planned(self, device_id: str) -> list[TileKey]:
        """Tiles the scheduler intends for the device, not yet dispatched."""
        dev = self._devices.get(device_id)
        return [] if dev is None else dev.planned_keys()

    def device_ids(self, *, alive_only: bool = True) -> list[str]:
        return sorted(d for d, dev in self._devices.items() if dev.alive or not alive_only)

    def active_frames(self) -> list[int]:
        return sorted(f for f, fr in self._frames.items() if fr.status == "active")

    # ============================================================ event handlers

    def _advance_clock(self, t: float) -> None:
        # Events may arrive slightly out of order from different actors; the
        # clock never goes backwards, and a NaN timestamp is simply ignored.
        if math.isfinite(t) and t > self.now:
            self.now = t

    def _apply(self, event: Event, out: list[Instruction]) -> None:
        if isinstance(event, FrameSubmitted):
            self._on_frame_submitted(event.frame, out)
        elif isinstance(event, TileDone):
            self._on_tile_done(event, out)
        elif isinstance(event, TileFailed):
            self._on_tile_failed(event, out)
        elif isinstance(event, TailDone):
            self._on_tail_done(event, out)
        elif isinstance(event, TailFailed):
            self._on_tail_failed(event, out)
        elif isinstance(event, DeviceJoined):
            self._on_device_joined(event)
        elif isinstance(event, DeviceLost):
            self._on_device_lost(event, out)
        elif isinstance(event, DeviceSlow):
            self._on_device_slow(event, out)
        elif isinstance(event, Tick):
            pass

    def _on_frame_submitted(self, spec: FrameSpec, out: list[Instruction]) -> None:
        fid = spec.frame_id
        if fid in self._frames or fid in self._finished:
            return  # a resubmission must not produce a second terminal instruction
        self._seq += 1
        frame = FrameRecord(spec=spec, seq=self._seq, submitted_t=self.now, tiles={}, left_in_stage={})
        problems = frame_problems(spec)
        if problems:
            self._frames[fid] = frame
            self._fail_frame(frame, "invalid frame: " + "; ".join(problems), out)
            return
        for t in spec.tiles:
            frame.tiles[t.ref] = TileRecord(
                key=tile_key(fid, t.ref),
                spec=t,
                weight_key=(spec.model, t.stage),
                weights=spec.weights_for(t.stage),
                priority=(self._seq, t.stage, t.index),
                missing=set(t.deps),
            )
            frame.left_in_stage[t.stage] = frame.left_in_stage.get(t.stage, 0) + 1
        for t in spec.tiles:
            for dep in set(t.deps):
                frame.tiles[dep].dependents.append(t.ref)
        self._frames[fid] = frame
        reason = self._infeasible(frame)
        if reason is not None:
            self._fail_frame(frame, reason, out)
            return
        if not frame.tiles:
            frame.tail = "pending"
        self._plan([t for t in frame.tiles.values() if not t.missing], out, why="ready")

    def _on_tile_done(self, ev: TileDone, out: list[Instruction]) -> None:
        tile = self._take_back(ev.key, ev.device)
        if tile is None:
            return
        frame = self._frames[ev.key[0]]
        if frame.status != "active":
            tile.state, tile.device = "dropped", None
            self._maybe_retire(frame)
            return
        dev = self._devices[ev.device]
        tile.state, tile.device = "done", ev.device
        dev.tiles_done += 1
        dev.busy_s += max(0.0, ev.compute_s)
        dev.bytes_in += ev.bytes_in
        dev.bytes_out += ev.bytes_out
        self._log.note(self.now, tile.key, "in_flight", "done", ev.device, "result accepted")
        stage = tile.spec.stage
        frame.left_in_stage[stage] -= 1
        if frame.left_in_stage[stage] == 0:
            frame.stitched.append(stage)
            out.append(Stitch(frame.frame_id, stage))
        ready: list[TileRecord] = []
        for ref in tile.dependents:
            nxt = frame.tiles[ref]
            nxt.missing.discard(tile.spec.ref)
            if not nxt.missing and nxt.state == "waiting":
                ready.append(nxt)
        self._plan(ready, out, why="deps done")
        if frame.status == "active" and all(t.state == "done" for t in frame.tiles.values()):
            frame.tail = "pending"

    def _on_tile_failed(self, ev: TileFailed, out: list[Instruction]) -> None:
        tile = self._take_back(ev.key, ev.device)
        if tile is None:
            return
        frame = self._frames[ev.key[0]]
        dev = self._devices[ev.device]
        dev.failures += 1
        if frame.status != "active":
            tile.state, tile.device = "dropped", None
            self._maybe_retire(frame)
            return
        tile.state, tile.device = "waiting", None
        if not ev.retryable:
            self._fail_frame(
                frame, f"tile {ev.key} failed on {ev.device} (not retryable): {ev.error}", out
            )
            return
        tile.retries += 1
        if tile.retries > self.max_retries:
            self._fail_frame(
                frame,
                f"tile {ev.key} failed {tile.retries} times (max_retries={self.max_retries}); "
                f"last on {ev.device}: {ev.error}",
                out,
            )
            return
        dev.retries += 1
        self.retries += 1
        self._plan([tile], out, why=f"retry {tile.retries}")

    def _on_tail_done(self, ev: TailDone, out: list[Instruction]) -> None:
        frame = self._release_tail(ev.frame_id, ev.device)
        if frame is None:
            return
        if frame.status == "active":
            frame.tail, frame.tail_device = "done", ev.device
            dev = self._devices[ev.device]
            dev.tails_done += 1
            dev.busy_s += max(0.0, ev.compute_s)
            self._end_frame(frame, "completed", "", out)
        else:
            self._maybe_retire(frame)

    def _on_tail_failed(self, ev: TailFailed, out: list[Instruction]) -> None:
        frame = self._release_tail(ev.frame_id, ev.device)
        if frame is None:
            return
        dev = self._devices[ev.device]
        dev.failures += 1
        if frame.status != "active":
            self._maybe_retire(frame)
            return
        frame.tail, frame.tail_device = "pending", None
        if not ev.retryable:
            self._fail_frame(
                frame, f"tail of frame {frame.frame_id} failed on {ev.device} (not retryable): {ev.error}", out
            )
            return
        frame.tail_retries += 1
        if frame.tail_retries > self.max_retries:
            self._fail_frame(
                frame,
                f"tail of frame {frame.frame_id} failed {frame.tail_retries} times "
                f"(max_retries={self.max_retries}); last on {ev.device}: {ev.error}",
                out,
            )
            return
        dev.retries += 1
        self.retries += 1

    def _on_device_joined(self, ev: DeviceJoined) -> None:
        dev = self._devices.get(ev.device.id)
        if dev is not None and dev.alive:
            return  # a duplicate announcement; the profile in use stays
        if dev is None:
            self._devices[ev.device.id] = DeviceRecord(info=ev.device, running_since=self.now)
        else:
            # Back after a loss: fresh profile and speed, counters kept.
            dev.info, dev.alive, dev.speed, dev.running_since = ev.device, True, 1.0, self.now
        # Work reaches it through stealing in _settle.

    def _on_device_lost(self, ev: DeviceLost, out: list[Instruction]) -> None:
        dev = self._devices.get(ev.device_id)
        if dev is None or not dev.alive:
            return
        dev.alive = False
        moved: list[TileRecord] = []
        for key in dev.in_flight + dev.planned_keys():
            frame = self._frames[key[0]]
            tile = frame.tiles[(key[1], key[2])]
            if frame.status == "active":
                tile.state, tile.device = "waiting", None
                moved.append(tile)
            else:
                tile.state, tile.device = "dropped", None
        dev.requeued += len(moved)
        dev.in_flight.clear()
        dev.planned.clear()
        dev.weight_refs.clear()
        dev.peak_bytes = 0
        for fid in list(dev.tails):
            frame = self._frames[fid]
            if frame.status == "active":
                frame.tail, frame.tail_device = "pending", None
        dev.tails.clear()
        for frame in list(self._frames.values()):
            if frame.status == "active":
                reason = self._infeasible(frame)
                if reason is not None:
                    self._fail_frame(frame, f"{reason} after losing {ev.device_id}", out)
            self._maybe_retire(frame)
        still = [t for t in moved if self._frames.get(t.key[0]) is not None
                 and self._frames[t.key[0]].status == "active"]
        self._plan(still, out, why=f"{ev.device_id} lost")

    def _on_device_slow(self, ev: DeviceSlow, out: list[Instruction]) -> None:
        dev = self._devices.get(ev.device_id)
        if dev is None or not dev.alive or not (math.isfinite(ev.factor) and ev.factor > 0):
            return
        slower = ev.factor > dev.speed
        dev.speed = ev.factor
        if not slower:
            return  # faster again: it wins work back by stealing when idle
        others = [d for d in self._devices.values() if d.alive and d is not dev]
        moved: list[TileRecord] = []
        for key in dev.in_flight[1:] + dev.planned_keys():
            tile = self._tile(key)
            if not any(o.info.memory_bytes >= tile.need_bytes for o in others):
                continue  # nowhere else could hold it: leave it here
            if tile.state == "in_flight":
                dev.in_flight.remove(key)
                dev.release(tile)
                dev.cancelled += 1
                out.append(Cancel(key, dev.id))
            else:
                dev.unplan(key)
            tile.state, tile.device = "waiting", None
            moved.append(tile)
        dev.requeued += len(moved)
        self._plan(moved, out, why=f"{dev.id} slowed x{ev.factor:g}", exclude=dev.id)

    # ============================================================== transitions

    def _tile(self, key: TileKey) -> TileRecord:
        return self._frames[key[0]].tiles[(key[1], key[2])]

    def _take_back(self, key: TileKey, device_id: str) -> TileRecord | None:
        """Remove ``key`` from the device's in-flight list if it is there.

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
        if was_running:
            dev.running_since = self.now
        return tile

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
        out.append(Complete(frame.frame_id) if status == "completed" else FailFrame(frame.frame_id, reason))
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
                    f"tile {tile.key} needs {tile.need_bytes} bytes (stage {tile.spec.stage} weights "
                    f"{tile.weights} + peak {tile.spec.peak_bytes}) but the largest alive device "
                    f"budget is {largest} bytes"
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
        budget = 1 + sum(len(d.planned) for d in self._devices.values()) * max(1, len(self._devices))
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
            device = choose_tail_device(need, [(Candidate(d.info, d.speed), d.free_bytes()) for d in alive])
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

    def _steal_once(self) -> bool:
        """Let one idle device take one planned tile, if that helps."""
        alive = [d for d in self._devices.values() if d.alive]
        thieves = sorted(
            (d for d in alive if not d.planned and len(d.in_flight) < self.max_in_flight_per_device),
            key=lambda d: (-d.info.gflops / d.speed, d.id),
        )
        if not thieves:
            return False
        victims = [
            Victim(
                self._candidate(d, with_planned=False),
                tuple(PlannedTile(k, self._tile(k).spec, self._tile(k).need_bytes) for k in d.planned_keys()),
            )
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
            self._log.note(self.now, steal.key, "planned", "planned", thief.id, f"stolen from {victim.id}")
            return True
        return False
