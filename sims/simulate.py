"""Run a plan on a simulated fleet: the real driver and scheduler, the device model, seeded arrivals.

    run = simulate(plan, parse_spec("pi3*6"), frames=50, in_flight=12)
    run.fps, run.latency_s, run.completed, run.failed

Arrivals are closed-loop (``in_flight`` frames kept in the fleet, as ``Deployment.stream`` does)
or open-loop (``rate`` frames per second from each of ``streams`` cameras, fixed or Poisson).
Scripted events (a device dies, returns, slows down or joins) come from a :class:`Scenario`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import tiling
from scheduler import SPECULATE_AFTER

from .catalog import DeviceSpec
from .metrics import steady_fps
from .world import DISPATCH_S, Faults, SimClock, SimTransport


@dataclass(frozen=True)
class ScenarioEvent:
    at_s: float
    action: str  # "kill", "revive", "slow", "budget", "join"
    device: str
    factor: float = 1.0  # slow: compute time multiplier
    memory_bytes: int = 0  # budget: the device's new memory budget
    detect_s: float = 1.5  # kill: how long until the driver hears of it (Ray's health checks here: ~1.5 s)
    spec: DeviceSpec | None = None  # join / revive: the device's profile


@dataclass
class Scenario:
    events: list[ScenarioEvent] = field(default_factory=list)


@dataclass
class SimRun:
    """What a simulated run produced (simulated seconds)."""

    submitted: dict[int, float]
    ended: dict[int, float]
    failed: dict[int, str]
    order: list[int]  # frame ids in the order their futures resolved
    stats: dict[str, Any]  # the driver's per-deployment snapshot (per device counters, latencies)
    events: int  # events passed to Scheduler.handle (at least one per tile completion)
    handle_cpu_s: float  # CPU seconds in the driver and scheduler (the transport and heap excluded)
    wall_s: float
    in_flight: int
    trace: list[Any] = field(default_factory=list)

    @property
    def completed(self) -> list[int]:
        return [f for f in self.ended if f not in self.failed]

    @property
    def latency_s(self) -> list[float]:
        return [self.ended[f] - self.submitted[f] for f in self.completed]

    @property
    def fps(self) -> float:
        done = sorted(self.ended[f] for f in self.completed)
        fps = steady_fps(done, trim=self.in_flight)
        lat = sorted(self.latency_s)
        if fps == 0.0 and lat and lat[0] > 0:
            fps = 1.0 / lat[0]
        return fps


def simulate(plan: tiling.Plan, devices: Sequence[DeviceSpec], *, frames: int, in_flight: int = 1,
             rate: float | None = None, poisson: bool = False, streams: int = 1, scale: float = 1.0,
             max_in_flight_per_device: int = 2, dispatch_s: float = DISPATCH_S, scenario: Scenario | None = None,
             faults: Faults | None = None, seed: int = 0, trace: bool = False, frame_itemsize: int = 4,
             max_retries: int = 3, on_progress: Callable[[int], None] | None = None,
             speculate_after: float | None = SPECULATE_AFTER) -> SimRun:
    """Submit ``frames`` frames and run until every one has ended (completed or failed)."""
    from fleet.runtime.deployment import DeploymentState
    from fleet.runtime.driver import Device, Driver

    clock = SimClock()
    transport = SimTransport(list(devices), clock, scale=scale, dispatch_s=dispatch_s, faults=faults, seed=seed)
    fleet = {d.id: Device(d.info(), None, profile=d.profile, scale=scale) for d in devices}
    driver = Driver(fleet, transport, clock, max_in_flight=max_in_flight_per_device, max_retries=max_retries,
                    speculate_after=speculate_after)
    driver.record_trace = trace
    transport.driver = driver
    state = DeploymentState.build("sim", plan, frame_itemsize)
    driver.load(state)
    run = SimRun({}, {}, {}, [], {}, 0, 0.0, 0.0, in_flight)
    counter = _Counting(driver)
    cpu = [0.0]
    next_frame = [0]

    def submit() -> None:
        if next_frame[0] >= frames:
            return
        next_frame[0] += 1
        t0 = time.process_time()
        fut = driver.submit(state, None)
        cpu[0] += time.process_time() - t0
        fid = driver.next_frame - 1
        run.submitted[fid] = clock.now()
        fut.add_done_callback(lambda f, fid=fid: ended(fid, f))

    def ended(fid: int, f: Future) -> None:
        run.ended[fid] = clock.now()
        run.order.append(fid)
        if f.exception() is not None:
            run.failed[fid] = str(f.exception())
        if on_progress is not None:
            on_progress(len(run.ended))
        if rate is None:
            clock.call_later(0.0, submit)  # closed loop: the next frame as soon as one ends

    for ev in (scenario.events if scenario else []):  # before the frames: an event at t applies to a frame at t
        clock.call_at(ev.at_s, lambda ev=ev: _apply(ev, transport))
    if rate is None:
        for _ in range(max(1, in_flight)):
            clock.call_at(0.0, submit)
    else:
        _open_loop(clock, submit, frames, rate, poisson, streams, random.Random(seed + 1))
    counter.install(cpu)
    start = time.perf_counter()
    clock.run(stop=lambda: len(run.ended) >= frames)
    run.wall_s = time.perf_counter() - start
    run.events, run.handle_cpu_s = counter.events, cpu[0]
    run.stats = driver.snapshot(state)
    run.trace = list(driver.trace)
    return run


def _open_loop(clock: SimClock, submit: Callable[[], None], frames: int, rate: float, poisson: bool, streams: int,
               rng: random.Random) -> None:
    """Arrival times from ``streams`` cameras at ``rate`` frames per second each, fixed or Poisson."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 frames per second, got {rate}")
    times: list[float] = []
    per = -(-frames // max(1, streams))
    for s in range(max(1, streams)):
        t = rng.uniform(0, 1.0 / rate) if streams > 1 else 0.0  # cameras are not in phase
        for _ in range(per):
            times.append(t)
            t += rng.expovariate(rate) if poisson else 1.0 / rate
    for t in sorted(times)[:frames]:
        clock.call_at(t, submit)


def _apply(ev: ScenarioEvent, transport: SimTransport) -> None:
    if ev.action == "kill":
        transport.kill(ev.device, ev.detect_s)
    elif ev.action == "slow":
        transport.slow(ev.device, ev.factor)
    elif ev.action == "budget":
        transport.budget(ev.device, ev.memory_bytes)
    elif ev.action in ("revive", "join"):
        if ev.spec is None:
            raise ValueError(f"scenario event {ev.action} of {ev.device} needs the device's profile")
        transport.revive(ev.spec)
    else:
        raise ValueError(f"unknown scenario action {ev.action!r}; accepted: kill, revive, slow, budget, join")


class _Counting:
    """Counts the events the driver passes to ``Scheduler.handle`` and the CPU time of the driver's and
    scheduler's handling of each report and submission; the transport's own work (the device model,
    called from inside the driver) and the event heap are excluded."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.events = 0

    def install(self, cpu: list[float]) -> None:
        sched, drv = self.driver.sched, self.driver
        handle = sched.handle

        def counted(*events: Any) -> Any:
            self.events += len(events)
            return handle(*events)

        sched.handle = counted  # type: ignore[method-assign]
        for name in ("on_report", "on_tail_report", "on_device_lost", "_tick"):
            setattr(drv, name, _timed(getattr(drv, name), cpu, +1))
        for name in ("dispatch", "run_tail"):  # the world's side: subtracted
            setattr(drv.transport, name, _timed(getattr(drv.transport, name), cpu, -1))


def _timed(fn: Callable[..., Any], cpu: list[float], sign: int) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            cpu[0] += sign * (time.process_time() - t0)
    return wrapper
