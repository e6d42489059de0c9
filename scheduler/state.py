"""The scheduler: a pure state machine from events to instructions.

Modelled on dask/distributed's ``worker_state_machine.py``: ``handle`` takes
events (each carrying its own timestamp), updates the bookkeeping, and
returns the instructions the shell must carry out.  No I/O, no clock, no
randomness, no Ray: the same sequence of events always produces the same
instructions, so tests assert exact instruction lists and the driver runs
this class unchanged on Ray and in the simulator (:mod:`sims.simulate`).

How a tile moves::

    waiting (deps not done) -> planned (in a device's planned queue)
        -> in flight (dispatched; the first in flight on a device runs)
        -> done (result accepted)

Each handler here applies one event's direct consequences (a tile done, a
device gone); then the machine *settles* (:mod:`scheduler.core`): pending
tails are placed, free slots filled from the planned queues (EFT planning,
:mod:`scheduler.placement`) and idle devices steal planned tiles
(:mod:`scheduler.stealing`), until nothing changes.

A result is accepted only from the device the tile is in flight on.  Late
results (from a lost device, for a cancelled tile, for a frame that already
ended) are ignored, which is what makes ``Stitch`` and ``Complete``
exactly-once even when the shell delivers duplicates.
"""

from __future__ import annotations

import dataclasses
import math

from scheduler.core import SchedulerCore
from scheduler.events import (
    Cancel,
    DeviceBudget,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Event,
    FrameCancelled,
    FrameSubmitted,
    Instruction,
    Stitch,
    TailDone,
    TailFailed,
    Tick,
    TileDone,
    TileFailed,
)
from scheduler.invariants import check_index, check_invariants
from scheduler.log import LogEntry, Subject, Transition
from scheduler.model import FrameSpec, TileKey, TileRef, frame_problems, tile_key
from scheduler.placement import to_ns
from scheduler.records import (
    DeviceRecord,
    DeviceStats,
    FrameRecord,
    FrameStatus,
    TileRecord,
)


class Scheduler(SchedulerCore):
    """Event-driven scheduler for fused-tile CNN inference on a device fleet.

    ``max_in_flight_per_device`` bounds how many tiles a device holds at once
    (one running, the rest queued at the device); keeping it small keeps work
    in the scheduler's planned queues, where stealing can still move it.
    ``max_retries`` is how many times a retryable failure is re-run before
    the frame fails.  ``log_size`` bounds the event log and the memory of
    finished frames.  ``work_stealing=False`` gives the static MoDNN split,
    useful as a baseline.  ``learn_speed`` lets the reported ``compute_s`` of
    accepted results correct a device's speed factor (see ``_learn_speed``).
    """

    SPEED_ALPHA = 0.5
    """Weight of a new measurement in the speed factor's moving average."""

    SPEED_WINDOW_S = 0.05
    """A measurement of the speed factor spans at least this much expected compute: a tile that long
    or longer is one measurement, shorter tiles are summed until they reach it. A tile of a
    millisecond is timed with as much jitter as it lasts (scheduling, a busy host), and learning
    from each one alone moved work back and forth on noise (``tilefleet bench --dispatch``)."""

    SLOWDOWN_TRIGGER = 1.5
    """A measured factor this many times the current one is treated as a
    ``DeviceSlow``: queued work is moved off the device."""

    # ================================================================ public API

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order; return every instruction they produce."""
        out: list[Instruction] = []
        for event in events:
            produced: list[Instruction] = []
            self._advance_clock(event.t)
            self._index.expire(self._now_ns, self._devices)
            self._apply(event, produced)
            self._settle(produced)
            self._log.record(self.now, event, produced)
            out.extend(produced)
        return out

    def validate(self) -> None:
        """Check every invariant; raise AssertionError saying which broke."""
        check_invariants(self._devices, self._frames, self._finished, self.max_in_flight_per_device)
        check_index(self)

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

    def expects(self, key: TileKey, device_id: str) -> bool:
        """Whether a result for ``key`` from ``device_id`` would be accepted now.

        The shell asks this *before* handling a ``TileDone`` to decide whether
        to keep the tile's output: True exactly when the tile is in flight on
        that device for a frame still running.  Anything else is a late or
        duplicate result whose output must be dropped.
        """
        dev = self._devices.get(device_id)
        frame = self._frames.get(key[0])
        return (
            dev is not None
            and frame is not None
            and frame.status == "active"
            and key in dev.in_flight
        )

    def accepted(self, key: TileKey) -> str | None:
        """The device whose result for ``key`` was accepted, if one was."""
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
            self._now_ns = to_ns(t)

    def _apply(self, event: Event, out: list[Instruction]) -> None:
        if isinstance(event, FrameSubmitted):
            self._on_frame_submitted(event.frame, out)
        elif isinstance(event, FrameCancelled):
            self._on_frame_cancelled(event, out)
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
        elif isinstance(event, DeviceBudget):
            self._on_device_budget(event, out)
        elif isinstance(event, Tick):
            pass

    def _problems(self, spec: FrameSpec) -> tuple[str, ...]:
        """:func:`frame_problems`, checked once per frame template: every frame of a deployment shares
        one tuple of tiles, and re-validating it (deps, cycles) cost a quarter of a submission."""
        key = (id(spec.tiles), spec.stage_weights_bytes, spec.tail_flops, spec.in_bytes, spec.out_bytes,
               spec.tail_weights_bytes)
        hit = self._checked.get(key)
        if hit is not None and hit[0] is spec.tiles:
            return hit[1]
        problems = frame_problems(spec)
        if len(self._checked) >= 256:
            self._checked.clear()
        self._checked[key] = (spec.tiles, problems)  # holding the tuple keeps its id from being reused
        return problems

    def _on_frame_submitted(self, spec: FrameSpec, out: list[Instruction]) -> None:
        fid = spec.frame_id
        if fid in self._frames or fid in self._finished:
            return  # a resubmission must not produce a second terminal instruction
        self._seq += 1
        frame = FrameRecord(
            spec=spec, seq=self._seq, submitted_t=self.now, tiles={}, left_in_stage={}
        )
        problems = self._problems(spec)
        if problems:
            self._frames[fid] = frame
            self._fail_frame(frame, "invalid frame: " + "; ".join(problems), out)
            return
        for t in spec.tiles:
            frame.tiles[t.ref] = TileRecord(
                key=tile_key(fid, t.ref),
                spec=t,
                weight_key=(spec.deployment, t.stage),
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
            self._set_pending_tail(frame)
        self._plan([t for t in frame.tiles.values() if not t.missing], out, why="ready")

    def _on_frame_cancelled(self, ev: FrameCancelled, out: list[Instruction]) -> None:
        """Fail the frame with the shell's reason, as any failure: planned tiles dropped, queued
        ones cancelled, running ones left to drain (their results are then ignored)."""
        frame = self._frames.get(ev.frame_id)
        if frame is not None and frame.status == "active":
            self._fail_frame(frame, ev.reason, out)

    def _on_tile_done(self, ev: TileDone, out: list[Instruction]) -> None:
        taken = self._take_back(ev.key, ev.device)
        if taken is None:
            return
        tile, started = taken
        frame = self._frames[ev.key[0]]
        if tile.backup is not None:  # speculated: this copy came first, the other is cancelled
            loser = tile.backup if ev.device == tile.device else tile.device
            won = ev.device == tile.backup
            assert loser is not None
            if won:  # the original is still running (a device cannot drop a tile it computes)
                slow = self._devices[loser]
                factor = self._overdue_factor(slow, ev.key) if slow.in_flight[0] == ev.key else slow.speed
            self._drop_copy(tile, loser, out)
            if won:
                self.speculation_wins += 1
                self._devices[ev.device].speculation_wins += 1
                if factor > slow.speed:  # it is at least this slow: its queue goes elsewhere
                    self._slow_down(slow, factor, out, why=f"{loser} lost a speculative race, x{factor:.3g}", busy=True)
                    self._learned_slow(slow)
        if frame.status != "active":
            tile.state, tile.device = "dropped", None
            self._maybe_retire(frame)
            return
        dev = self._devices[ev.device]
        tile.state, tile.device = "done", ev.device
        if tile.spec.held_bytes:  # its maps stay here for the tiles pinned to it
            dev.hold(tile.key, tile.spec.held_bytes)
            tile.holds = True
        self._release_held(frame, tile)
        dev.results[frame.frame_id] = dev.results.get(frame.frame_id, 0) + 1
        dev.tiles_done += 1
        dev.busy_s += max(0.0, ev.compute_s)
        dev.bytes_in += ev.bytes_in
        dev.bytes_out += ev.bytes_out
        self._log.note(self.now, tile.key, "in_flight", "done", ev.device, "result accepted")
        if started is not None and started >= dev.speed_since:
            self._learn_speed(dev, tile, ev.compute_s, out)
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
        if frame.status == "active" and not any(frame.left_in_stage.values()):
            self._set_pending_tail(frame)  # every tile is done

    def _on_tile_failed(self, ev: TileFailed, out: list[Instruction]) -> None:
        taken = self._take_back(ev.key, ev.device)
        if taken is None:
            return
        tile = taken[0]
        frame = self._frames[ev.key[0]]
        dev = self._devices[ev.device]
        dev.failures += 1
        if tile.backup is not None:  # the other copy still runs: it is the tile now
            self._drop_copy(tile, ev.device, None)
            return
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
        self._set_pending_tail(frame)
        if not ev.retryable:
            self._fail_frame(
                frame,
                f"tail of frame {frame.frame_id} failed on {ev.device} (not retryable): {ev.error}",
                out,
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
            dev = self._devices[ev.device.id] = DeviceRecord(
                info=ev.device, running_since=self.now, speed_since=self.now
            )
        else:
            # Back after a loss: fresh profile and speed, counters kept.
            dev.info, dev.alive, dev.speed, dev.running_since = ev.device, True, 1.0, self.now
            dev.restart_speed(self.now)
        self._index.freed.add(dev.id)  # room for a waiting tail
        self._touch(dev)
        # Work reaches it through stealing in _settle.

    def _on_device_lost(self, ev: DeviceLost, out: list[Instruction]) -> None:
        dev = self._devices.get(ev.device_id)
        if dev is None or not dev.alive:
            return
        largest_before = self._index.largest_memory()
        dev.alive = False
        moved: list[TileRecord] = []
        touched = {key[0] for key in dev.in_flight} | set(dev.tails)
        self._flying -= len(dev.in_flight)
        for key in dev.in_flight + dev.planned_keys():
            frame = self._frames[key[0]]
            tile = frame.tiles[(key[1], key[2])]
            if tile.backup is not None:  # its other copy runs on: that one is the tile now
                self._drop_copy(tile, dev.id, None)
                continue
            if frame.status == "active":
                tile.state, tile.device = "waiting", None
                moved.append(tile)
            else:
                tile.state, tile.device = "dropped", None
        if ev.results_lost:
            touched |= set(dev.results)
            moved += self._rerun_lost_results(ev.device_id, out)
        dev.requeued += len(moved)
        for fid in list(dev.tails):
            frame = self._frames[fid]
            if frame.status == "active":
                self._set_pending_tail(frame)
            else:
                frame.tail, frame.tail_device = "blocked", None  # an ended frame's tail died with the device
        for key in dev.held:  # its memory is gone, maps included (a stored result may live on elsewhere)
            if key[0] in self._frames:
                self._tile(key).holds = False
        dev.clear()
        self._touch(dev)
        # Only a smaller largest budget can make a frame infeasible that was not; otherwise
        # only the frames whose work was here can have changed.
        if self._index.largest_memory() < largest_before:
            frames = list(self._frames.values())
        else:
            frames = sorted(
                (self._frames[f] for f in touched if f in self._frames), key=lambda f: f.seq
            )
        for frame in frames:
            if frame.status == "active":
                reason = self._infeasible(frame)
                if reason is not None:
                    self._fail_frame(frame, f"{reason} after losing {ev.device_id}", out)
            self._maybe_retire(frame)
        still = [
            t
            for t in moved
            if self._frames.get(t.key[0]) is not None and self._frames[t.key[0]].status == "active"
            and t.state == "waiting" and not t.missing
        ]
        self._plan(still, out, why=f"{ev.device_id} lost")

    def _rerun_lost_results(self, device_id: str, out: list[Instruction]) -> list[TileRecord]:
        """Done tiles whose outputs were stored on ``device_id`` and are still needed run again.

        Needed: a dependent is not done (or is itself re-run), or the tile belongs to the last
        stage and the tail is not done. Dependents already dispatched are cancelled (their inputs
        are gone) and wait again; a tail already running waits for the re-run tiles.  Only the
        frames holding results there are looked at (``DeviceRecord.results``).
        """
        requeued: list[TileRecord] = []
        held = self._devices[device_id].results
        frames = sorted((self._frames[f] for f in held if f in self._frames), key=lambda f: f.seq)
        for frame in frames:
            if frame.status != "active" or not frame.tiles:
                continue
            rerun = self._needed_again(frame, device_id)
            if not rerun:
                continue
            for ref in sorted(rerun):
                t = frame.tiles[ref]
                t.state, t.device = "waiting", None
                self._forget_result(device_id, frame.frame_id)
                frame.left_in_stage[t.spec.stage] += 1
                if t.spec.stage in frame.stitched:
                    frame.stitched.remove(t.spec.stage)
                self._log.note(self.now, t.key, "done", "waiting", device_id, "its result was lost")
                requeued.append(t)
            for t in frame.tiles.values():  # dependents see the re-run producers as missing again
                if t.state == "done":
                    continue
                undone = {d for d in t.spec.deps if frame.tiles[d].state != "done"}
                if undone == t.missing:
                    continue
                if t.state == "planned" and t.device is not None:
                    self._unplan(self._devices[t.device], t)
                elif t.state == "in_flight" and t.device is not None and t.device != device_id:
                    if t.backup is not None:
                        self._drop_copy(t, t.backup, out)
                    self._take_back(t.key, t.device)
                    out.append(Cancel(t.key, t.device))
                    requeued.append(t)
                t.state, t.device, t.missing = "waiting", None, undone
            if frame.tail == "running" and frame.tail_device is not None:
                self._release_tail(frame.frame_id, frame.tail_device)  # its late result is ignored
            frame.tail, frame.tail_device = "blocked", None
        return requeued

    @staticmethod
    def _needed_again(frame: FrameRecord, device_id: str) -> set[TileRef]:
        """Tiles of ``frame`` done on ``device_id`` whose output someone still needs."""
        last = max(t.spec.stage for t in frame.tiles.values())
        rerun: set[TileRef] = set()
        grew = True
        while grew:  # a re-run tile needs its own inputs again, so needs can chain back
            grew = False
            for t in frame.tiles.values():
                if t.state != "done" or t.device != device_id or t.spec.ref in rerun:
                    continue
                if (t.spec.stage == last and frame.tail != "done") or any(
                        frame.tiles[d].state != "done" or d in rerun for d in t.dependents):
                    rerun.add(t.spec.ref)
                    grew = True
        return rerun

    def _on_device_budget(self, ev: DeviceBudget, out: list[Instruction]) -> None:
        dev = self._devices.get(ev.device_id)
        budget = ev.memory_bytes
        if dev is None or not dev.alive or not isinstance(budget, int) or budget < 0 or budget == dev.info.memory_bytes:
            return
        largest_before = self._index.largest_memory()
        memory = self._index.memory
        memory[dev.info.memory_bytes] -= 1
        if not memory[dev.info.memory_bytes]:
            del memory[dev.info.memory_bytes]
        memory[budget] += 1
        dev.info = dataclasses.replace(dev.info, memory_bytes=budget)
        self._touch(dev)
        # what no longer fits moves: queued tiles (not the running one) and planned ones
        moved: list[TileRecord] = []
        for key in dev.in_flight[1:] + dev.planned_keys():
            tile = self._tile(key)
            if tile.need_bytes <= budget or tile.backup is not None:
                continue
            self._take_off(dev, tile, out)
            moved.append(tile)
        dev.requeued += len(moved)
        dev.overcommitted = dev.memory_in_use() > budget
        if self._index.largest_memory() < largest_before:
            for frame in list(self._frames.values()):
                if frame.status == "active":
                    reason = self._infeasible(frame)
                    if reason is not None:
                        self._fail_frame(frame, f"{reason} after {dev.id}'s budget shrank to {budget} bytes", out)
        self._plan([t for t in moved if (f := self._frames.get(t.key[0])) is not None and f.status == "active"], out,
                   why=f"{dev.id} budget now {budget} B", exclude=dev.id)
