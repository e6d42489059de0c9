"""The simulated world: a seeded event heap, and a transport that runs the device and link model.

The real :class:`~fleet.runtime.driver.Driver` and the real scheduler run here unchanged; only the
clock and the transport differ from Ray's. A dispatched tile is admitted to its device's
:class:`~sims.clock.DeviceClock` (the same model emulated workers obey) after the runtime's
per-tile dispatch cost, and its report is delivered at the timeline's ``done``. No tensor is
computed: costs come from each tile's FLOPs and bytes.

Faults are parameters, not sleeps (after 500 Lines' "cluster"): :meth:`SimTransport.kill` stops a
device at a time and reports it lost after a detection delay, :meth:`~SimTransport.revive` brings
it back, :meth:`~SimTransport.slow` stretches its compute, and a seeded ``faults`` policy can fail,
duplicate or delay reports, so thousands of histories run through the driver in milliseconds.
With ``shared`` (:class:`~sims.medium.SharedLink`) every device's transfers also cross one shared
channel, as devices behind one Wi-Fi access point do.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scheduler import TileKey
from workers.report import Report

from .catalog import DeviceSpec
from .clock import DeviceClock
from .medium import SharedLink

if TYPE_CHECKING:
    from fleet.runtime.driver import Driver
    from fleet.runtime.transport import Gather, TailWork, TileWork

# What the real runtime adds to every tile on this kind of host, seconds, host time (not scaled):
# the driver's actor call until the worker starts on it, and the report's way back until the
# driver has it. Measured on emulated runs here (fleet.runtime driver, Ray 2.60, two cores):
# sent -> first rx 2.1 ms, worker's emulated end -> driver has the report 2.8-3 ms (a pi4*2,laptop
# latency frame at clock scale 2.5; `tilefleet bench --dispatch` gives 2-3 ms for both together
# on an idle worker with tiny tiles).
DISPATCH_S = 0.002
REPORT_S = 0.002


# The simulator makes a few small objects per event and frees nearly all of them by reference count.
# With CPython's default thresholds (700, 10, 10) the collector still walks every live record
# (each device's, each frame's) again and again: about 40% of a 1,000-device run's time. While
# the event loop runs, collections are rarer; the process's own thresholds come back afterwards.
GC_THRESHOLDS = (50_000, 20, 100)
_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, ...] = ()


@contextmanager
def rare_collections() -> Iterator[None]:
    """:data:`GC_THRESHOLDS` while inside (re-entrant, and safe from several threads at once)."""
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            gc.set_threshold(*GC_THRESHOLDS)
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.set_threshold(*_gc_saved)


class SimClock:
    """Simulated seconds and a heap of timers; :meth:`run` pops them in time order (FIFO on ties)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.events = 0

    def now(self) -> float:
        return self.t

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.call_at(self.t + max(0.0, delay_s), fn)

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.t), next(self._seq), fn))

    def run(self, until: float | None = None, stop: Callable[[], bool] | None = None) -> None:
        with rare_collections():
            while self._heap and (until is None or self._heap[0][0] <= until):
                t, _, fn = heapq.heappop(self._heap)
                self.t = t
                self.events += 1
                fn()
                if stop is not None and stop():
                    return
        if until is not None:
            self.t = max(self.t, until)


@dataclass
class Faults:
    """A seeded policy for what can go wrong with a report (all probabilities per report)."""

    fail: float = 0.0  # a retryable failure instead of the result
    fatal: float = 0.0  # a non-retryable failure (a bug on that device)
    duplicate: float = 0.0  # the same report delivered twice
    late_s: float = 0.0  # extra delay, uniform in [0, late_s]
    input_lost: float = 0.0  # a later-stage tile that cannot fetch its inputs


class SimTransport:
    """The device and link model as a transport; reports arrive on the :class:`SimClock`."""

    def __init__(self, devices: list[DeviceSpec], clock: SimClock, *, scale: float = 1.0,
                 dispatch_s: float = DISPATCH_S, report_s: float = REPORT_S, faults: Faults | None = None,
                 seed: int = 0,
                 shared: SharedLink | None = None) -> None:
        self.clock = clock
        self.scale = scale
        self.dispatch_s = dispatch_s
        self.report_s = report_s
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.shared = shared
        self.clocks = {d.id: DeviceClock(d.profile, scale, shared) for d in devices}
        self.slow_factor = {d.id: 1.0 for d in devices}
        self.dead: set[str] = set()
        self.epoch = {d.id: 0 for d in devices}  # bumped when a device dies: its queued reports never arrive
        self.driver: Driver | None = None

    # --- the Transport protocol ----------------------------------------------------------------------
    def load(self, deployment: Any, devices: list[str]) -> None:
        pass  # weights are accounted for by the scheduler's memory model

    def unload(self, deployment: str, devices: list[str]) -> None:
        pass

    def dispatch(self, device: str, work: TileWork) -> None:
        if device in self.dead:
            return  # the driver learns of the death after the detection delay, as on a real LAN
        self._advance()
        c = work.cost
        tl = self.clocks[device].admit(self.clock.now() + self.dispatch_s, c.in_bytes + work.reuse_in_bytes, c.flops,
                                       c.out_bytes, slow_factor=self.slow_factor[device])
        report = Report(device, True, tl.arrive, tl.done, bytes_in=c.in_bytes + work.reuse_in_bytes,
                        bytes_out=c.out_bytes, timeline=tl.as_dict())
        if work.key[1] > 0 and self._roll(self.faults.input_lost):
            report = Report(device, False, tl.arrive, tl.done, error="InputLost", message="simulated", retryable=True)
        self._deliver(device, tl.done, lambda r: self._driver().on_report(work.key, device, r, ("tile", work.key)),
                      report)

    def run_tail(self, device: str, work: TailWork) -> None:
        if device in self.dead:
            return
        self._advance()
        c = work.cost
        if c.flops == 0:
            done, tl_dict = self.clock.now(), None
        else:
            tl = self.clocks[device].admit(self.clock.now() + self.dispatch_s, c.in_bytes, c.flops, c.out_bytes,
                                           slow_factor=self.slow_factor[device])
            done, tl_dict = tl.done, tl.as_dict()
        report = Report(device, True, self.clock.now(), done, bytes_in=c.in_bytes, bytes_out=c.out_bytes,
                        timeline=tl_dict)
        self._deliver(device, done, lambda r: self._driver().on_tail_report(work.frame_id, device, r, ("tail",)),
                      report)

    def cancel(self, key: TileKey, device: str) -> None:
        pass  # the copy still runs on the device's clock; its late report is ignored by the scheduler

    def forget(self, device: str) -> None:
        self.epoch[device] += 1

    def result(self, deployment: Any, gather: Gather | None, tail_handle: Any) -> Any:
        return None  # nothing is computed in the simulator

    def accepted(self, device: str) -> None:
        pass

    # --- faults as parameters ------------------------------------------------------------------------
    def kill(self, device: str, detect_after_s: float, results_lost: bool = True) -> None:
        """The device stops now; the driver hears of it ``detect_after_s`` later."""
        self._known(device)
        self.dead.add(device)
        self.epoch[device] += 1
        self.clock.call_later(detect_after_s, lambda: self._driver().on_device_lost(device, "killed (simulated)",
                                                                                     results_lost))

    def revive(self, spec: DeviceSpec) -> None:
        """The device comes back (or a new one joins), with an empty clock."""
        from fleet.runtime.driver import Device

        self.dead.discard(spec.id)
        self.clocks[spec.id] = DeviceClock(spec.profile, self.scale, self.shared)
        self.slow_factor[spec.id] = 1.0
        self.epoch[spec.id] = self.epoch.get(spec.id, 0) + 1
        self._driver().add_device(spec.id, Device(spec.info(), None, profile=spec.profile, scale=self.scale))

    def budget(self, device: str, memory_bytes: int) -> None:
        """Another process takes (or gives back) memory on the device; the driver is told at once."""
        self._driver().set_budget(device, memory_bytes)

    def slow(self, device: str, factor: float, announce: bool = False) -> None:
        """From now on the device computes ``factor`` times slower. The scheduler is not told (it
        sees results come late) unless ``announce``: then the driver hears it at once, as from a
        thermal monitor (``DeviceSlow``)."""
        self._known(device)
        self.slow_factor[device] = factor
        if announce:
            self._driver().on_device_slow(device, factor)

    # --- delivery ------------------------------------------------------------------------------------
    def _known(self, device: str) -> None:
        if device not in self.clocks:
            raise KeyError(f"no simulated device {device!r}; devices: {', '.join(list(self.clocks)[:20])}")

    def _advance(self) -> None:
        if self.shared is not None:
            self.shared.forget_before(self.clock.now())  # nothing is booked in the past any more

    def _driver(self) -> Driver:
        assert self.driver is not None, "SimTransport.driver is set by the world that built both"
        return self.driver

    def _roll(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def _deliver(self, device: str, at: float, to: Callable[[Report], None], report: Report) -> None:
        """Hand ``report`` (the device's work ended at ``at``) to the driver after the report's way
        back (``report_s``), unless the device died meanwhile; faults may fail, duplicate or delay it."""
        f = self.faults
        if report.ok and self._roll(f.fail):
            report = Report(device, False, report.arrive, at, error="SimulatedFailure", message="injected")
        elif report.ok and self._roll(f.fatal):
            report = Report(device, False, report.arrive, at, error="SimulatedBug", message="injected",
                            retryable=False)
        epoch = self.epoch[device]
        copies = 2 if self._roll(f.duplicate) else 1
        for _ in range(copies):
            delay = self.rng.uniform(0, f.late_s) if f.late_s > 0 else 0.0

            def fire(report: Report = report) -> None:
                if self.epoch[device] == epoch and device not in self.dead:
                    to(report)

            self.clock.call_at(at + self.report_s + delay, fire)

