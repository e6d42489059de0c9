"""FrameCancelled: a frame nobody waits for any more fails at once, with exact instruction lists.

Every step runs through :class:`scheduler.testing.Checked`, so the invariants
(``scheduler/invariants.py``) are checked after each event.
"""

from __future__ import annotations

import pytest

from scheduler import (
    Cancel,
    Complete,
    DeviceJoined,
    DeviceLost,
    Dispatch,
    FailFrame,
    FrameCancelled,
    FrameSubmitted,
    RunTail,
    Stitch,
    TailDone,
    TileDone,
    TileFailed,
)
from scheduler.testing import GB, Checked, device, independent_frame

pytestmark = pytest.mark.unit

WHY = "cancelled: the client went away"


def fleet(h: Checked, *ids: str) -> None:
    assert h(*(DeviceJoined(device(i), 0.0) for i in ids)) == []


def test_cancel_drops_planned_tiles_cancels_queued_ones_and_ignores_late_results() -> None:
    h = Checked(max_in_flight_per_device=2)
    fleet(h, "a", "b")
    assert h(FrameSubmitted(independent_frame(1, 8), 0.0)) == [
        Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 2), "a"), Dispatch((1, 0, 1), "b"), Dispatch((1, 0, 3), "b")]
    assert h(FrameSubmitted(independent_frame(2, 4), 0.0)) == []
    assert h.s.planned("a") == [(1, 0, 4), (1, 0, 6), (2, 0, 0), (2, 0, 2)]
    # the running tiles ((1,0,0) on a, (1,0,1) on b) drain; the queued ones are cancelled, the planned
    # ones dropped, the frame fails with the reason, and the freed slots go to the next frame at once
    assert h(FrameCancelled(1, 0.5, WHY)) == [
        Cancel((1, 0, 2), "a"), Cancel((1, 0, 3), "b"), FailFrame(1, WHY),
        Dispatch((2, 0, 0), "a"), Dispatch((2, 0, 1), "b")]
    assert h.s.frame_status(1) == "failed" and h.s.frame_reason(1) == WHY
    assert h.s.in_flight("a") == [(1, 0, 0), (2, 0, 0)] and h.s.planned("a") == [(2, 0, 2)]
    assert h.s.active_frames() == [2]
    assert not h.s.expects((1, 0, 0), "a")  # the shell drops the running tile's output
    # late results: the running tile's frees its slot, the cancelled copy's is ignored
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Dispatch((2, 0, 2), "a")]
    assert h(TileDone((1, 0, 2), "a", 1.1)) == []
    assert h(TileFailed((1, 0, 1), "b", 1.2, error="late")) == [Dispatch((2, 0, 3), "b")]
    # cancelling again, or a frame nobody knows, is a no-op
    assert h(FrameCancelled(1, 1.3, "again")) == [] and h(FrameCancelled(99, 1.3)) == []
    assert h.s.frame_reason(1) == WHY
    stats = h.s.stats()
    assert (stats["a"].cancelled, stats["b"].cancelled, stats["a"].tiles_done) == (1, 1, 0)
    # the other frame is untouched: it completes
    out = [i for t, k in ((2.0, (2, 0, 0)), (2.0, (2, 0, 1)), (3.0, (2, 0, 2)), (3.0, (2, 0, 3)))
           for i in h(TileDone(k, "a" if k[2] % 2 == 0 else "b", t))]
    assert out[-2:] == [Stitch(2, 0), RunTail(2, "a")]
    assert h(TailDone(2, "a", 3.5)) == [Complete(2)]


def test_cancel_after_the_frame_ended_changes_nothing() -> None:
    h = Checked(max_in_flight_per_device=1)
    fleet(h, "a")
    h(FrameSubmitted(independent_frame(1, 1), 0.0))
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Stitch(1, 0), RunTail(1, "a")]
    assert h(TailDone(1, "a", 1.0)) == [Complete(1)]
    assert h(FrameCancelled(1, 2.0, WHY)) == []
    assert h.s.frame_status(1) == "completed"


def test_cancel_while_the_tail_runs_then_its_late_result_or_its_device_death() -> None:
    for ending in ("tail done", "device lost"):
        h = Checked(max_in_flight_per_device=1)
        fleet(h, "a", "b")
        h(FrameSubmitted(independent_frame(1, 2, tail_flops=GB), 0.0))
        assert h(TileDone((1, 0, 0), "a", 1.0)) == []
        assert h(TileDone((1, 0, 1), "b", 1.0)) == [Stitch(1, 0), RunTail(1, "a")]
        assert h(FrameCancelled(1, 1.5, "timeout")) == [FailFrame(1, "timeout")]
        # the tail drains; when it ends (or its device dies) the frame retires, with no Complete
        late = TailDone(1, "a", 2.0) if ending == "tail done" else DeviceLost("a", 2.0, results_lost=True)
        assert h(late) == [], ending
        assert h.s.frame_status(1) == "failed" and h.s.active_frames() == []
