"""Run a plan on a simulated fleet: the real driver and scheduler, the device model, seeded arrivals.

    run = simulate(plan, parse_spec("pi3*6"), frames=50, in_flight=12)
    run.fps, run.latency_s, run.completed, run.failed

Arrivals are closed-loop (``in_flight`` frames kept in the fleet, as ``Deployment.stream`` does),
open-loop (``rate`` frames per second from each of ``streams`` cameras, fixed or Poisson) or at
given times. Scripted events (a device dies, returns, slows down or joins) come from a
:class:`Scenario`. This is the only loop that feeds the scheduler outside Ray: the planner's
predictor, ``tilefleet sim``, the scheduler's cost benchmark (:mod:`sims.perf`) and the scheduler's
tests with hand-made frames (:mod:`sims.specs`) all run here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tiling
from scheduler import SPECULATE_AFTER, TileDone

from .catalog import DeviceSpec
from .medium import SharedLink, check_mbps
from .metrics import steady_fps
from .world import DISPATCH_S, REPORT_S, Faults, SimClock, SimTransport

if TYPE_CHECKING:
    from fleet.runtime.driver import Driver
    from fleet.runtime.transport import Deployed


@dataclass(frozen=True)
class ScenarioEvent:
    at_s: float
    action: str  # "kill", "revive", "slow", "budget", "join"
    device: str
    factor: float = 1.0  # slow: compute time multiplier
    memory_bytes: int = 0  # budget: the device's new memory budget
    detect_s: float = 1.5  # kill: how long until the driver hears of it (Ray's health checks here: ~1.5 s)
    spec: DeviceSpec | None = None  # join / revive: the device's profile
    announce: bool = False  # slow: the device also tells the driver (a thermal monitor would), not only its clock
    before_frame: int | None = None  # instead of at_s: just before this frame (0-based) is submitted, the
    # same point of a run in any world whatever its clock (tests replay a history on Ray this way)


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
    sched_cpu_s: float = 0.0  # CPU seconds in Scheduler.handle alone
    device_stats: dict[str, Any] = field(default_factory=dict)  # Scheduler.stats(): steals, requeued, speed
    shared_link: dict[str, float] | None = None  # the shared medium's totals (``shared_link_mbps`` runs)
    instructions: list[Any] = field(default_factory=list)  # every instruction, in order (``record=True``)
    assignments: dict[Any, str] = field(default_factory=dict)  # tile -> device of its last accepted result

    @property
    def completed(self) -> list[int]:
        return [f for f in self.ended if f not in self.failed]

    @property
    def latency_s(self) -> list[float]:
        return [self.ended[f] - self.submitted[f] for f in self.completed]

    @property
    def makespan(self) -> float:
        """When the last frame ended."""
        return max(self.ended.values(), default=0.0)

    @property
    def fps(self) -> float:
        done = sorted(self.ended[f] for f in self.completed)
        fps = steady_fps(done, trim=self.in_flight)
        lat = sorted(self.latency_s)
        if fps == 0.0 and lat and lat[0] > 0:
            fps = 1.0 / lat[0]
        return fps


def simulate(plan: tiling.Plan | Deployed, devices: Sequence[DeviceSpec], *, frames: int, in_flight: int = 1,
             rate: float | None = None, poisson: bool = False, streams: int = 1,
             arrivals: Sequence[float] | None = None, scale: float = 1.0, max_in_flight_per_device: int = 2,
             dispatch_s: float = DISPATCH_S, report_s: float = REPORT_S, scenario: Scenario | None = None,
             faults: Faults | None = None,
             seed: int = 0, trace: bool = False, frame_itemsize: int = 4, max_retries: int = 3,
             learn_speed: bool = True, work_stealing: bool = True,
             speculate_after: float | None = SPECULATE_AFTER, shared_link_mbps: float | None = None,
             validate: bool = False, record: bool = False, warmup: int = 0, until: int | None = None,
             on_progress: Callable[[int], None] | None = None) -> SimRun:
    """Submit ``frames`` frames and run until every one has ended (completed or failed).

    ``plan`` is a tiling plan, or any deployment the driver can run (:class:`sims.specs.SpecDeployment`:
    bare ``FrameSpec`` frames). Frames arrive closed-loop (``in_flight`` at a time), open-loop
    (``rate``), or at the given ``arrivals`` times. ``shared_link_mbps``: every device's transfers
    share one medium of that bandwidth (:mod:`sims.medium`). ``validate`` checks the scheduler's
    invariants after every event; ``record`` keeps every instruction and each tile's device.
    ``warmup``: events and CPU time are counted from when that many frames have ended; ``until``:
    stop once that many have ended (default: all), e.g. to measure a fleet that is still full.
    """
    if arrivals is not None and rate is not None:
        raise ValueError("give arrival times or a rate, not both")
    clock = SimClock()
    shared = None if shared_link_mbps is None else SharedLink(check_mbps(shared_link_mbps), scale)
    transport = SimTransport(list(devices), clock, scale=scale, dispatch_s=dispatch_s, report_s=report_s,
                             faults=faults, seed=seed, shared=shared)
    driver = _driver(devices, transport, clock, scale, max_in_flight_per_device=max_in_flight_per_device,
                     max_retries=max_retries, learn_speed=learn_speed, work_stealing=work_stealing,
                     speculate_after=speculate_after, trace=trace)
    state = _deployment(plan, frame_itemsize)
    driver.load(state)
    run = SimRun({}, {}, {}, [], {}, 0, 0.0, 0.0, in_flight)
    observer = _Observer(driver, validate, record)
    at_frame = _script(scenario, clock, transport)  # before arrivals: an event at t happens before frames at t
    times = list(arrivals) if arrivals is not None else (
        None if rate is None else _open_loop(frames, rate, poisson, streams, random.Random(seed + 1)))
    next_frame = [0]

    def submit() -> None:
        if next_frame[0] >= frames:
            return
        for ev in at_frame.pop(next_frame[0], []):
            _apply(ev, transport)
        next_frame[0] += 1
        fut = driver.submit(state, None)
        fid = driver.next_frame - 1
        run.submitted[fid] = clock.now()
        fut.add_done_callback(lambda f, fid=fid: ended(fid, f))

    def ended(fid: int, f: Future) -> None:
        run.ended[fid] = clock.now()
        run.order.append(fid)
        if len(run.ended) == warmup:
            observer.reset()
        if f.exception() is not None:
            run.failed[fid] = str(f.exception())
        if on_progress is not None:
            on_progress(len(run.ended))
        if times is None:
            clock.call_later(0.0, submit)  # closed loop: the next frame as soon as one ends

    for t in times[:frames] if times is not None else [0.0] * max(1, in_flight):
        clock.call_at(t, submit)
    observer.install()
    start = time.perf_counter()
    last = frames if until is None else min(until, frames)
    clock.run(stop=lambda: len(run.ended) >= last)
    run.wall_s = time.perf_counter() - start
    run.events, run.handle_cpu_s, run.sched_cpu_s = observer.events, observer.cpu_s, observer.sched_cpu_s
    run.instructions, run.assignments = observer.instructions, observer.assignments
    run.stats, run.device_stats = driver.snapshot(state), driver.sched.stats()
    run.trace = list(driver.trace)
    run.shared_link = shared.totals(run.makespan) if shared is not None else None
    return run


def _driver(devices: Sequence[DeviceSpec], transport: SimTransport, clock: SimClock, scale: float, *,
            trace: bool, **options: Any) -> Driver:
    """The runtime's own driver on the simulated world (``options``: the scheduler's)."""
    from fleet.runtime.driver import Device, Driver

    fleet = {d.id: Device(d.info(), None, profile=d.profile, scale=scale) for d in devices}
    driver = Driver(fleet, transport, clock, max_in_flight=options.pop("max_in_flight_per_device"), **options)
    driver.record_trace = trace
    transport.driver = driver
    return driver


def _deployment(plan: tiling.Plan | Deployed, frame_itemsize: int) -> Deployed:
    from fleet.runtime.deployment import DeploymentState

    return DeploymentState.build("sim", plan, frame_itemsize) if isinstance(plan, tiling.Plan) else plan


def _script(scenario: Scenario | None, clock: SimClock, transport: SimTransport) -> dict[int, list[ScenarioEvent]]:
    """Timed events go on the clock; events before a frame are returned by frame, for the submitter."""
    at_frame: dict[int, list[ScenarioEvent]] = {}
    for ev in (scenario.events if scenario else []):
        if ev.before_frame is not None:
            at_frame.setdefault(ev.before_frame, []).append(ev)
        else:
            clock.call_at(ev.at_s, lambda ev=ev: _apply(ev, transport))
    return at_frame


def _open_loop(frames: int, rate: float, poisson: bool, streams: int, rng: random.Random) -> list[float]:
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
    return sorted(times)[:frames]


def _apply(ev: ScenarioEvent, transport: SimTransport) -> None:
    if ev.action == "kill":
        transport.kill(ev.device, ev.detect_s)
    elif ev.action == "slow":
        transport.slow(ev.device, ev.factor, announce=ev.announce)
    elif ev.action == "budget":
        transport.budget(ev.device, ev.memory_bytes)
    elif ev.action in ("revive", "join"):
        if ev.spec is None:
            raise ValueError(f"scenario event {ev.action} of {ev.device} needs the device's profile")
        transport.revive(ev.spec)
    else:
        raise ValueError(f"unknown scenario action {ev.action!r}; accepted: kill, revive, slow, budget, join")


class _Observer:
    """Wraps ``Scheduler.handle``: counts the events the driver passes it, times the scheduler alone
    (``sched_cpu_s``) and the driver's and scheduler's handling of each report and submission
    (``cpu_s``; the transport's own work, the device model called from inside the driver, and the
    event heap are excluded). On request it checks the scheduler's invariants after every event and
    records every instruction and the device of each accepted tile."""

    def __init__(self, driver: Any, validate: bool, record: bool) -> None:
        self.driver = driver
        self.validate = validate
        self.record = record
        self.events = 0
        self.cpu_s = 0.0
        self.sched_cpu_s = 0.0
        self.instructions: list[Any] = []
        self.assignments: dict[Any, str] = {}

    def reset(self) -> None:
        """Count from now on (after a warm-up)."""
        self.events, self.cpu_s, self.sched_cpu_s = 0, 0.0, 0.0

    def install(self) -> None:
        sched, drv = self.driver.sched, self.driver
        handle = sched.handle

        def observed(*events: Any) -> Any:
            t0 = time.process_time()
            out = handle(*events)
            self.sched_cpu_s += time.process_time() - t0
            self.events += len(events)
            if self.validate:
                sched.validate()
            if self.record:
                self.instructions.extend(out)
                for ev in events:
                    if isinstance(ev, TileDone) and sched.accepted(ev.key) == ev.device:
                        self.assignments[ev.key] = ev.device
            return out

        sched.handle = observed  # type: ignore[method-assign]
        for name in ("submit", "on_report", "on_tail_report", "on_device_lost", "on_device_slow", "add_device",
                     "_tick"):
            setattr(drv, name, self._timed(getattr(drv, name), +1))
        for name in ("dispatch", "run_tail"):  # the world's side: subtracted
            setattr(drv.transport, name, self._timed(getattr(drv.transport, name), -1))

    def _timed(self, fn: Callable[..., Any], sign: int) -> Callable[..., Any]:
        clock = time.process_time

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                self.cpu_s += sign * (clock() - t0)
        return wrapper
