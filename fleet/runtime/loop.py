"""The driver on Ray: one thread, real time, and a thread-safe facade for client threads.

:class:`DriverThread` owns the thread that runs the :class:`~fleet.runtime.driver.Driver`: it
drains an inbox of jobs from client threads, lets the Ray transport deliver reports, and fires
due timers. Client threads never touch the driver's structures; they post jobs (``call``,
``submit``) and wait on futures.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from sims.catalog import DeviceSpec

from .deployment import DeploymentState, FrameFuture, settle
from .driver import Driver, FrameFailed
from .stats import TraceEvent

log = logging.getLogger("tilefleet.driver")
CALL_TIMEOUT_S = 120.0
IDLE_WAIT_S = 0.05  # nothing in flight: wait this long for a client job (a job wakes the wait at once)
BUSY_WAIT_S = 0.02  # calls in flight: wait this long for a report before looking at the inbox again


class RealClock:
    """Monotonic seconds since start, and a heap of timers fired by the loop that owns it."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.now() + delay_s, next(self._seq), fn))

    def fire_due(self) -> None:
        while self._timers and self._timers[0][0] <= self.now():
            heapq.heappop(self._timers)[2]()

    def wait_for(self, cap_s: float) -> float:
        """How long the loop may wait for something else before the next timer is due (at most ``cap_s``)."""
        return min(cap_s, max(0.0, self._timers[0][0] - self.now())) if self._timers else cap_s


class DriverThread:
    """Runs a driver on its own thread; every public method is safe to call from any thread."""

    def __init__(self, make_driver: Callable[[RealClock], Driver], poll: Callable[[float], bool]) -> None:
        """``make_driver(clock)`` builds the driver (on the calling thread, before the loop starts);
        ``poll(timeout)`` lets the transport deliver what is ready (True when it has work pending)."""
        self.clock = RealClock()
        self.core = make_driver(self.clock)
        self._poll = poll
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="tilefleet-driver", daemon=True)
        self.thread.start()

    # --- thread-safe ---------------------------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the driver thread and wait for its result (the scheduler is single-threaded)."""
        if not self.thread.is_alive():
            raise RuntimeError("the driver has stopped" + (f": {self.error}" if self.error else ""))
        fut: Future = Future()

        def job() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self.inbox.put(job)
        return fut.result(timeout=CALL_TIMEOUT_S)

    def submit(self, state: DeploymentState, x: np.ndarray) -> FrameFuture:
        outer = FrameFuture(None, lambda reason: self.inbox.put(lambda: self._cancel(outer, reason)))

        def job() -> None:
            inner = self.core.submit(state, x)
            outer.frame_id = getattr(inner, "frame_id", None)
            inner.add_done_callback(lambda f: settle(outer, f))

        self.inbox.put(job)  # before any cancel of it: the inbox is FIFO, so frame_id is set by then
        return outer

    def _cancel(self, fut: FrameFuture, reason: str) -> None:
        if fut.frame_id is not None:
            self.core.cancel_frame(fut.frame_id, reason)

    def device_lost(self, device: str, why: str, results_lost: bool = True) -> None:
        """A device is gone (its Ray node died, say): handled on the driver thread."""
        self.inbox.put(lambda: self.core.on_device_lost(device, why, results_lost))

    def snapshot(self, state: DeploymentState, detail: bool = True) -> dict[str, Any]:
        return self.call(lambda: self.core.snapshot(state, detail))

    def unload(self, state: DeploymentState) -> None:
        self.call(lambda: self.core.unload(state))

    def trace_copy(self) -> list[TraceEvent]:
        return self.call(lambda: list(self.core.trace))

    def alive_specs(self) -> list[DeviceSpec]:
        return self.call(self.core.alive_specs)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        # Each turn: client jobs, due timers, then Ray's reports. ``busy`` (calls in flight) is read
        # after all three, so a wait never starts while something just sent is pending, and no wait
        # outlasts the next timer: a report is picked up as it lands, a timer fires when due.
        busy = False
        try:
            while not self._stop.is_set():
                self._drain_inbox(0.0 if busy else self.clock.wait_for(IDLE_WAIT_S))
                self.clock.fire_due()
                busy = self._poll(self.clock.wait_for(BUSY_WAIT_S))
        except BaseException as e:  # pragma: no cover - a bug in the shell: fail every frame loudly
            log.exception("driver loop crashed")
            self.error = e
            for ctx in self.core.frames.values():
                if not ctx.future.done():
                    ctx.future.set_exception(FrameFailed(f"driver crashed: {e!r}"))

    def _drain_inbox(self, wait_s: float) -> None:
        try:
            job = self.inbox.get(timeout=wait_s) if wait_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        job()
        while True:
            try:
                self.inbox.get_nowait()()
            except queue.Empty:
                return

