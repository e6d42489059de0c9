"""The driver: the shell around the pure scheduler, the same code on Ray and in the simulator.

It owns the :class:`scheduler.Scheduler`, the frames in flight and every deployment's state. It
turns instructions into work for a :class:`~fleet.runtime.transport.Transport` and the transport's
reports into scheduler events, on an injected :class:`~fleet.runtime.transport.Clock`. It never
touches Ray, threads or wall time itself: :mod:`fleet.runtime.loop` runs it on Ray with a thread
and real time, :mod:`sims.world` runs it on a seeded event heap. Everything here runs on one
thread (the world's); nothing raises into the scheduler's state: a frame that cannot go on fails
with a reason, and the deployment keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from scheduler import (
    Cancel,
    Complete,
    DeviceBudget,
    DeviceInfo,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    FailFrame,
    FrameCancelled,
    FrameSubmitted,
    RunTail,
    SPECULATE_AFTER,
    SPECULATION_SHARE,
    Scheduler,
    TailDone,
    TailFailed,
    Tick,
    TileDone,
    TileFailed,
    TileKey,
    TileRef,
)
from scheduler.shell import Shell
from sims.catalog import DeviceSpec, Profile
from workers.report import Report

from .deployment import FrameFuture
from .stats import MAX_TRACE, TraceEvent, trace_events
from .transport import Clock, Deployed, Transport

log = logging.getLogger("tilefleet.driver")

SCHEDULER_HISTORY = 1000  # finished frames (and log entries) the scheduler remembers: late results need no more
INPUT_LOST_GRACE_S = 3.0  # > Ray's node death detection with fast health checks (about 1.5 s)


class FrameFailed(RuntimeError):
    """A frame the runtime could not complete; the message says why."""


class FrameCancelledError(FrameFailed):
    """A frame given up on before it finished (``Deployment.cancel``); the message says why."""


@dataclass
class Device:
    info: DeviceInfo
    actor: Any  # the world's handle on the device (a TileWorker actor on Ray; None in the simulator)
    pid: int = 0
    node_id: str = ""
    alive: bool = True
    killed_at: float | None = None
    detected_after_s: float | None = None
    profile: Profile | None = None
    scale: float = 1.0

    @property
    def clock_info(self) -> DeviceInfo:
        """The profile in the clock's seconds, as the scheduler must see it: an emulated device runs
        ``scale`` times slower than its profile (so the host keeps ahead of it), and its learned speed,
        overdue tiles and placement are all judged against what it really does."""
        s = self.scale
        if s == 1.0 or self.profile is None or not self.profile.emulated:
            return self.info
        i = self.info
        return dataclasses.replace(i, gflops=i.gflops / s, tile_overhead_s=i.tile_overhead_s * s,
                                   link_bps=i.link_bps / s, latency_s=i.latency_s * s)


@dataclass
class FrameCtx:
    frame_id: int
    deployment: Deployed
    x: Any  # the frame batch (numpy on Ray; None in the simulator)
    future: Future
    submitted: float
    results: dict[TileRef, Any] = field(default_factory=dict)  # handle of each accepted tile's payload
    placed: dict[TileRef, str] = field(default_factory=dict)
    done_at: float | None = None
    tail_handle: Any = None
    cancelled: bool = False


class Driver(Shell):
    """Runs frames of any number of deployments on one set of devices."""

    def __init__(self, devices: dict[str, Device], transport: Transport, clock: Clock, *, max_in_flight: int = 2,
                 max_retries: int = 3, learn_speed: bool = True, work_stealing: bool = True,
                 speculate_after: float | None = SPECULATE_AFTER) -> None:
        self.devices = devices
        self.transport = transport
        self.clock = clock
        self.sched = Scheduler(max_in_flight_per_device=max_in_flight, max_retries=max_retries,
                               learn_speed=learn_speed, work_stealing=work_stealing,
                               speculate_after=speculate_after, speculation_share=SPECULATION_SHARE,
                               log_size=SCHEDULER_HISTORY)
        self._armed: float | None = None  # when the speculation timer fires next
        self.frames: dict[int, FrameCtx] = {}
        self.deployments: dict[str, Deployed] = {}
        self.next_frame = 0
        self.trace: list[TraceEvent] = []
        self.record_trace = True
        self._sent: dict[tuple[TileKey, str], float] = {}  # when each tile copy was dispatched
        self.execute(self.sched.handle(*(DeviceJoined(d.clock_info, clock.now()) for d in devices.values())))

    # --- frames in -----------------------------------------------------------------------------------
    def submit(self, state: Deployed, x: Any) -> Future:
        fid = self.next_frame
        fut: Future = FrameFuture(fid)
        self.next_frame += 1
        self.frames[fid] = FrameCtx(fid, state, x, fut, self.clock.now())
        self.execute(self.sched.handle(FrameSubmitted(state.frame_spec(fid), self.clock.now())))
        return fut

    def cancel_frame(self, frame_id: int, reason: str = "cancelled") -> bool:
        """Give up on a frame: the scheduler drops its planned tiles, cancels those queued at devices
        and ignores the running ones' results; its future fails with :class:`FrameCancelledError`.
        False when the frame has already ended (or never existed). (``cancel`` is the shell's
        handler of the scheduler's ``Cancel`` instruction, for one tile.)"""
        ctx = self.frames.get(frame_id)
        if ctx is None:
            return False
        ctx.cancelled = True
        self.execute(self.sched.handle(FrameCancelled(frame_id, self.clock.now(), reason)))
        return True

    # --- reports in (from the transport) -------------------------------------------------------------
    def on_report(self, key: TileKey, device: str, report: Report, handle: Any) -> None:
        """A tile's outcome; ``handle`` refers to its payload where it was made (None on failure)."""
        dev = self.devices.get(device)
        if dev is None or not dev.alive:
            return
        fid, stage, idx = key
        ctx = self.frames.get(fid)
        sent = self._sent.pop((key, device), None)
        t = self.clock.now()
        if not report.ok:
            if ctx is not None:
                ctx.deployment.stats.device(device).failures += 1
            ev: Any = TileFailed(key, device, t, error=report.reason, retryable=report.retryable)
            if report.error == "InputLost":
                # a producer's machine died: the node watch reports it (and the scheduler re-runs the
                # producer and cancels this tile) within a health-check period; a retry now would fail too
                self.clock.call_later(INPUT_LOST_GRACE_S, lambda: self.execute(self.sched.handle(ev)))
                return
            self.execute(self.sched.handle(ev))
            return
        if self.record_trace:
            self._record_trace(device, f"f{fid} s{stage} t{idx}", report,
                               {"frame": fid, "kind": "tile", "stage": stage, "tile": idx})
        if ctx is not None and self.sched.expects(key, device):
            ctx.results[(stage, idx)] = handle
            ctx.placed[(stage, idx)] = device  # with a speculative copy, the first result's device
            stats = ctx.deployment.stats
            stats.device(device).record(report)
            if sent is not None and report.timeline is None:
                # dispatch overhead: the round trip the driver saw minus the worker's own execution time
                stats.record_overhead(t - sent - report.compute_s)
            self.transport.accepted(device)
        self.execute(self.sched.handle(TileDone(key, device, t, compute_s=report.busy_s, bytes_in=report.bytes_in,
                                                bytes_out=report.bytes_out)))

    def on_tail_report(self, fid: int, device: str, report: Report, handle: Any) -> None:
        dev = self.devices.get(device)
        if dev is None or not dev.alive:
            return
        ctx = self.frames.get(fid)
        t = self.clock.now()
        if report.ok and ctx is not None:
            ctx.tail_handle = handle
            ctx.deployment.stats.device(device).record(report, tail=True)
            if self.record_trace:
                self._record_trace(device, f"f{fid} tail", report, {"frame": fid, "kind": "tail"})
            self.execute(self.sched.handle(TailDone(fid, device, t, compute_s=report.busy_s)))
        else:
            self.execute(self.sched.handle(TailFailed(fid, device, t, error=report.reason,
                                                      retryable=report.retryable)))

    def on_device_lost(self, device: str, why: str, results_lost: bool) -> None:
        """``results_lost``: the device's stored tile outputs are gone too (its machine died)."""
        dev = self.devices.get(device)
        if dev is None or not dev.alive:
            return
        dev.alive = False
        if dev.killed_at is not None:
            dev.detected_after_s = self.clock.now() - dev.killed_at
        log.warning("device %s lost (%s)", device, why)
        self.transport.forget(device)
        for k in [k for k in self._sent if k[1] == device]:  # its reports never come
            del self._sent[k]
        self.execute(self.sched.handle(DeviceLost(device, self.clock.now(), results_lost=results_lost)))

    def set_budget(self, device_id: str, memory_bytes: int) -> None:
        """The device's memory budget changed (another process took memory, or gave it back)."""
        if device_id not in self.devices:
            raise KeyError(f"no device '{device_id}'; devices: {', '.join(self.devices)}")
        if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool) or memory_bytes < 0:
            raise ValueError(f"memory_bytes must be a whole number of bytes >= 0, got {memory_bytes!r}")
        self.execute(self.sched.handle(DeviceBudget(device_id, memory_bytes, self.clock.now())))

    def on_device_slow(self, device: str, factor: float) -> None:
        """The device says it now runs ``factor`` times slower than its profile (1: full speed again),
        as a thermal or load monitor would: its queued work moves before any result comes late."""
        dev = self.devices.get(device)
        if dev is None or not dev.alive:
            return
        self.execute(self.sched.handle(DeviceSlow(device, factor, self.clock.now())))

    def add_device(self, device_id: str, dev: Device) -> None:
        """A device that joined the cluster: it takes work from now on. A device that comes back under
        an id the driver still thinks alive restarted unnoticed: what it held is gone first."""
        old = self.devices.get(device_id)
        if old is not None and old.alive:
            self.on_device_lost(device_id, "it rejoined: its earlier instance's work is gone", results_lost=True)
        self.devices[device_id] = dev
        self.execute(self.sched.handle(DeviceJoined(dev.clock_info, self.clock.now())))

    # --- deployments and reports out -----------------------------------------------------------------
    def load(self, state: Deployed) -> None:
        """Every alive device loads the deployment's weights before its first frame."""
        self.deployments[state.id] = state
        self.transport.load(state, [d for d, dev in self.devices.items() if dev.alive])

    def unload(self, state: Deployed) -> None:
        state.closed = True
        self.deployments.pop(state.id, None)
        self.transport.unload(state.id, [d for d, dev in self.devices.items() if dev.alive])

    def snapshot(self, state: Deployed, detail: bool = True) -> dict[str, Any]:
        return state.stats.snapshot({d: dev.alive for d, dev in self.devices.items()}, self.sched.stats(),
                                    state.weight_bytes, detail)

    def alive_specs(self) -> list[DeviceSpec]:
        return [DeviceSpec(d.info.id, d.profile) for d in self.devices.values() if d.alive and d.profile]

    def device_table(self) -> list[dict[str, Any]]:
        """Every device: id, profile figures, state."""
        out = []
        for d in self.devices.values():
            p = d.profile
            assert p is not None
            out.append({"id": d.info.id, "class": p.name, "gflops": p.gflops, "memory_bytes": p.memory_bytes,
                        "usable_bytes": p.usable_bytes, "gpu": p.gpu, "link_mbps": p.link_mbps,
                        "latency_ms": p.latency_s * 1e3, "emulated": p.emulated,
                        "state": "alive" if d.alive else "lost", "pid": d.pid, "node_id": d.node_id})
        return out

    def mark_killed(self, device_id: str) -> int:
        """Note when a device was crashed on purpose (to time detection); its worker's pid."""
        dev = self.devices.get(device_id)
        if dev is None:
            raise KeyError(f"no device '{device_id}'; devices: {', '.join(self.devices)}")
        dev.killed_at = self.clock.now()
        return dev.pid

    def detection_times(self) -> dict[str, float | None]:
        return {d: dev.detected_after_s for d, dev in self.devices.items() if dev.killed_at is not None}

    # --- instructions (the shell contract: scheduler/shell.py) ---------------------------------------
    def execute(self, instructions: Any) -> None:
        super().execute(instructions)
        due = self.sched.next_deadline()  # a running tile becomes overdue then: look again at that time
        if due is not None and (self._armed is None or due < self._armed):
            self._armed = due
            self.clock.call_later(max(0.0, due - self.clock.now()), self._tick)

    def _tick(self) -> None:
        self._armed = None
        due, now = self.sched.next_deadline(), self.clock.now()
        if due is not None and due <= now:
            self.execute(self.sched.handle(Tick(now)))
        else:
            self.execute(())  # what it was armed for has finished: arm for what is next, if anything

    def dispatch(self, ins: Dispatch) -> None:
        key, device = ins.key, ins.device
        ctx = self.frames[key[0]]
        ctx.placed[key[1:]] = device
        work = ctx.deployment.tile_work(key, device, ctx.x, ctx.results, ctx.placed)
        self._sent[(key, device)] = self.clock.now()
        self.transport.dispatch(device, work)

    def cancel(self, ins: Cancel) -> None:
        self._sent.pop((ins.key, ins.device), None)
        self.transport.cancel(ins.key, ins.device)

    def run_tail(self, ins: RunTail) -> None:
        fid, device = ins.frame_id, ins.device
        ctx = self.frames[fid]
        work = ctx.deployment.tail_work(fid, device, ctx.x, ctx.results, ctx.placed)
        if work is None:
            # nothing to compute: the result is stitched at the client, straight from the workers
            self.execute(self.sched.handle(TailDone(fid, device, self.clock.now())))
            return
        self.transport.run_tail(device, work)

    def complete(self, ins: Complete) -> None:
        ctx = self.frames.pop(ins.frame_id)
        dep = ctx.deployment
        try:
            gather = dep.gather(ctx.results)
            result = self.transport.result(dep, gather, None if gather is not None else ctx.tail_handle)
        except Exception as e:  # noqa: BLE001
            ctx.future.set_exception(FrameFailed(f"frame {ins.frame_id}: collecting the result failed: {e!r}"))
            return
        ctx.done_at = self.clock.now()
        dep.stats.record_latency(ins.frame_id, ctx.done_at - ctx.submitted)
        ctx.future.set_result(result)

    def fail_frame(self, ins: FailFrame) -> None:
        ctx = self.frames.pop(ins.frame_id, None)
        if ctx is not None and not ctx.future.done():
            ctx.done_at = self.clock.now()
            reason = ins.reason
            if ctx.cancelled:
                ctx.deployment.stats.frames_cancelled += 1
            elif self.devices and not any(d.alive for d in self.devices.values()):
                # the scheduler names the last loss at most: say that none is left, and which they were
                reason += (f" (every device is lost: {', '.join(self.devices)}; the deployment serves again when "
                           "one comes back, e.g. cluster.revive(id) or a node rejoining)")
            ctx.future.set_exception((FrameCancelledError if ctx.cancelled else FrameFailed)(reason))

    # --- helpers -------------------------------------------------------------------------------------
    def _record_trace(self, device: str, name: str, report: Report, args: dict[str, Any]) -> None:
        self.trace.extend(trace_events(device, name, report, args))
        if len(self.trace) > MAX_TRACE:
            del self.trace[: len(self.trace) // 2]

