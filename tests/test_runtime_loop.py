"""The driver thread's loop (fleet.runtime.loop) on a fake transport: no wait outlasts a timer, and
work a timer sends is looked for at once, not after an idle wait on the inbox."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from fleet.runtime.loop import BUSY_WAIT_S, IDLE_WAIT_S, DriverThread, RealClock


class Recorder:
    """A transport's ``poll`` and an inbox that note every wait the loop asks for, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.pending = False
        self.lock = threading.Lock()

    def note(self, kind: str, value: float = 0.0) -> None:
        with self.lock:
            self.events.append((kind, value))

    def poll(self, timeout: float) -> bool:
        self.note("poll", timeout)
        if self.pending:
            threading.Event().wait(min(timeout, 0.001))  # a short stand-in for ray.wait
        return self.pending


class RecordingInbox(queue.Queue):  # type: ignore[type-arg]
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.rec.note("inbox", timeout if block and timeout is not None else 0.0)
        return super().get(block, timeout)


@pytest.fixture
def loop() -> Iterator[tuple[DriverThread, Recorder]]:
    rec = Recorder()
    dt = DriverThread(lambda clock: SimpleNamespace(frames={}), rec.poll)
    dt.inbox = RecordingInbox(rec)  # swapped before any job is posted: the loop reads self.inbox each turn
    yield dt, rec
    dt.stop()


def test_wait_for_is_capped_by_the_next_timer() -> None:
    clock = RealClock()
    assert clock.wait_for(0.05) == 0.05
    clock.call_later(10.0, lambda: None)
    assert clock.wait_for(0.05) == 0.05
    clock.call_later(0.0, lambda: None)
    assert clock.wait_for(0.05) == 0.0


@pytest.mark.parametrize("busy", [False, True])
def test_no_wait_outlasts_a_pending_timer(loop: tuple[DriverThread, Recorder], busy: bool) -> None:
    dt, rec = loop
    rec.pending = busy
    fired = threading.Event()
    delay = 0.01  # shorter than either wait cap: each wait before it fires must be cut to it

    def arm() -> None:
        dt.clock.call_later(delay, lambda: (rec.note("timer"), fired.set()))
        rec.note("armed")

    dt.call(arm)
    assert fired.wait(10), "the timer never fired"
    events = rec.events[rec.events.index(("armed", 0.0)):rec.events.index(("timer", 0.0))]
    waits = [v for kind, v in events if kind in ("inbox", "poll")]
    assert waits and max(waits) <= delay < min(BUSY_WAIT_S, IDLE_WAIT_S), events


def test_work_a_timer_sends_is_polled_at_once(loop: tuple[DriverThread, Recorder]) -> None:
    """A timer that dispatches (a retry after a grace period, a speculative copy) makes calls
    pending: the loop's next step is to poll for their reports, never an idle wait on the inbox."""
    dt, rec = loop
    fired = threading.Event()

    def dispatch() -> None:
        rec.pending = True
        rec.note("timer")
        fired.set()

    dt.call(lambda: dt.clock.call_later(0.05, dispatch))
    assert fired.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait for the loop's next step to be recorded
        with rec.lock:
            after = rec.events[rec.events.index(("timer", 0.0)) + 1:]
        if after:
            break
        threading.Event().wait(0.001)
    assert after[0][0] == "poll", rec.events[-10:]
