"""Slow devices, lost devices, failing tiles: exact instruction lists."""

from __future__ import annotations

from collections import Counter

import pytest

from scheduler import (
    Cancel,
    Complete,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
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
from scheduler.testing import Checked, device, independent_frame

pytestmark = pytest.mark.unit


def fleet(h: Checked, *ids: str) -> None:
    assert h(*(DeviceJoined(device(i), 0.0) for i in ids)) == []


# ------------------------------------------------------------------ slow device


def test_slowed_device_keeps_its_running_tile_and_loses_the_rest() -> None:
    h = Checked(max_in_flight_per_device=2)
    fleet(h, "a", "b")
    assert h(FrameSubmitted(independent_frame(1, 8), 0.0)) == [
        Dispatch((1, 0, 0), "a"),
        Dispatch((1, 0, 2), "a"),
        Dispatch((1, 0, 1), "b"),
        Dispatch((1, 0, 3), "b"),
    ]
    assert h.s.planned("a") == [(1, 0, 4), (1, 0, 6)]
    # a is now 5x slower: the queued (1,0,2) is cancelled, its planned tiles
    # move to b; the running (1,0,0) stays.
    assert h(DeviceSlow("a", 5.0, 0.5)) == [Cancel((1, 0, 2), "a")]
    assert h.s.in_flight("a") == [(1, 0, 0)]
    assert h.s.planned("a") == []
    assert h.s.planned("b") == [(1, 0, 2), (1, 0, 4), (1, 0, 5), (1, 0, 6), (1, 0, 7)]
    # The cancelled tile's result, should the device have run it anyway, is ignored.
    assert h(TileDone((1, 0, 2), "a", 0.6)) == []
    assert h(TileDone((1, 0, 1), "b", 1.0)) == [Dispatch((1, 0, 2), "b")]
    assert h(TileDone((1, 0, 3), "b", 2.0)) == [Dispatch((1, 0, 4), "b")]
    # a goes idle at t=3, but any tile would finish at 3 + 5 = 8 on it, later
    # than b's last planned tile (t=7): stealing declines.
    assert h(TileDone((1, 0, 0), "a", 3.0)) == []
    stats = h.s.stats()
    assert (stats["a"].cancelled, stats["a"].requeued, stats["b"].steals) == (1, 3, 0)


def test_slowed_device_steals_back_when_it_helps() -> None:
    h = Checked(max_in_flight_per_device=1)
    fleet(h, "a", "b")
    h(FrameSubmitted(independent_frame(1, 12), 0.0))
    assert h(DeviceSlow("a", 2.0, 0.0)) == []  # nothing queued at a: only planned tiles move
    assert h.s.planned("a") == []
    assert len(h.s.planned("b")) == 10
    # a finishes its running tile at t=2; a tile now takes 2 s on a (done at
    # 4).  In b's queue (1,0,2) ends at 3 and (1,0,3) at 4: no gain; (1,0,4)
    # ends at 5, so it is the first tile worth moving.
    out = h(TileDone((1, 0, 0), "a", 2.0))
    assert out == [Dispatch((1, 0, 4), "a")]
    assert h.s.stats()["a"].steals == 1


def test_restored_speed_wins_work_back_by_stealing() -> None:
    h = Checked(max_in_flight_per_device=2)
    fleet(h, "a", "b")
    h(FrameSubmitted(independent_frame(1, 4), 0.0))
    # At 3x, a tile would end at 6.0 on a but 3.0 at the end of b's queue.
    assert h(DeviceSlow("a", 3.0, 0.1)) == [Cancel((1, 0, 2), "a")]
    assert h.s.planned("b") == [(1, 0, 2)]
    # Back at full speed a has a free slot and nothing planned: it steals.
    assert h(DeviceSlow("a", 1.0, 0.2)) == [Dispatch((1, 0, 2), "a")]
    assert h(DeviceSlow("nope", 2.0, 0.3), DeviceSlow("a", float("nan"), 0.3)) == []


# ------------------------------------------------------------------ lost device


def test_lost_device_tiles_rerun_exactly_once() -> None:
    h = Checked(max_in_flight_per_device=1)
    fleet(h, "a", "b", "c")
    sent: list[Instruction] = []
    sent += h(FrameSubmitted(independent_frame(1, 6), 0.0))
    assert sent == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "b"), Dispatch((1, 0, 2), "c")]
    # a dies: its running (1,0,0) and planned (1,0,3) are re-placed, b and c
    # are busy so they wait in planned queues.
    assert h(DeviceLost("a", 0.5)) == []
    assert h.s.planned("b") == [(1, 0, 0), (1, 0, 4)]
    assert h.s.planned("c") == [(1, 0, 3), (1, 0, 5)]
    sent += h(TileDone((1, 0, 1), "b", 1.0))
    sent += h(TileDone((1, 0, 2), "c", 1.0))
    assert sent[-2:] == [Dispatch((1, 0, 0), "b"), Dispatch((1, 0, 3), "c")]
    # The lost device's late result is ignored; it is not accepted twice.
    assert h(TileDone((1, 0, 0), "a", 1.1)) == []
    assert h(DeviceLost("a", 1.2)) == []  # a second loss report changes nothing
    sent += h(TileDone((1, 0, 0), "b", 2.0))
    sent += h(TileDone((1, 0, 3), "c", 2.0))
    sent += h(TileDone((1, 0, 4), "b", 3.0))
    sent += h(TileDone((1, 0, 5), "c", 3.0))
    assert sent[-2:] == [Stitch(1, 0), RunTail(1, "b")]
    sent += h(TailDone(1, "b", 3.0))
    dispatches = Counter(i.key for i in sent if isinstance(i, Dispatch))
    assert dispatches == {(1, 0, i): 2 if i == 0 else 1 for i in range(6)}
    assert Counter(type(i).__name__ for i in sent)["Complete"] == 1
    assert [h.s.accepted((1, 0, i)) for i in range(6)] == ["b", "b", "c", "c", "b", "c"]
    assert h.s.stats()["a"].requeued == 2


def test_lost_device_running_the_tail() -> None:
    h = Checked()
    h(DeviceJoined(device("gpu", 10.0, gpu=True), 0.0), DeviceJoined(device("cpu"), 0.0))
    assert h(FrameSubmitted(independent_frame(1, 1), 0.0)) == [Dispatch((1, 0, 0), "gpu")]
    assert h(TileDone((1, 0, 0), "gpu", 0.1)) == [Stitch(1, 0), RunTail(1, "gpu")]
    assert h(DeviceLost("gpu", 0.2)) == [RunTail(1, "cpu")]
    assert h(TailDone(1, "gpu", 0.3)) == []
    assert h(TailDone(1, "cpu", 0.4)) == [Complete(1)]


def test_losing_every_device_fails_active_frames() -> None:
    h = Checked()
    fleet(h, "a")
    h(FrameSubmitted(independent_frame(1, 2), 0.0))
    assert h(DeviceLost("a", 1.0)) == [
        FailFrame(1, "no alive device to run frame 1 after losing a")
    ]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == []
    # A device that comes back gets new frames, the failed one stays failed.
    assert h(DeviceJoined(device("a"), 2.0)) == []
    assert h(FrameSubmitted(independent_frame(2, 1), 2.0)) == [Dispatch((2, 0, 0), "a")]
    assert h.s.frame_status(1) == "failed"


def test_joining_device_steals_planned_work() -> None:
    h = Checked(max_in_flight_per_device=1)
    fleet(h, "a")
    h(FrameSubmitted(independent_frame(1, 4), 0.0))
    assert h.s.planned("a") == [(1, 0, 1), (1, 0, 2), (1, 0, 3)]
    # On a, (1,0,1) would end at 2.0; on the newcomer at 1.5.
    assert h(DeviceJoined(device("b"), 0.5)) == [Dispatch((1, 0, 1), "b")]
    assert h.s.planned("a") == [(1, 0, 2), (1, 0, 3)]
    assert h.s.stats()["b"].steals == 1
    assert h(Tick(0.6)) == []


# ----------------------------------------------------------------------- retries


def test_retryable_failure_reruns_up_to_max_retries() -> None:
    h = Checked(max_retries=2)
    fleet(h, "a")
    assert h(FrameSubmitted(independent_frame(1, 1), 0.0)) == [Dispatch((1, 0, 0), "a")]
    assert h(TileFailed((1, 0, 0), "a", 1.0, "oom")) == [Dispatch((1, 0, 0), "a")]
    assert h(TileFailed((1, 0, 0), "a", 2.0, "oom")) == [Dispatch((1, 0, 0), "a")]
    out = h(TileFailed((1, 0, 0), "a", 3.0, "oom"))
    assert out == [FailFrame(1, "tile (1, 0, 0) failed 3 times (max_retries=2); last on a: oom")]
    assert h(TileDone((1, 0, 0), "a", 4.0)) == []
    assert h.s.retries == 2
    assert (h.s.stats()["a"].retries, h.s.stats()["a"].failures) == (2, 3)


def test_non_retryable_failure_fails_at_once_and_cancels_queued_tiles() -> None:
    h = Checked(max_in_flight_per_device=2)
    fleet(h, "a", "b")
    h(FrameSubmitted(independent_frame(1, 6), 0.0))
    out = h(TileFailed((1, 0, 1), "b", 0.5, "bad shape", retryable=False))
    assert out == [
        Cancel((1, 0, 2), "a"),
        FailFrame(1, "tile (1, 0, 1) failed on b (not retryable): bad shape"),
    ]
    # The running tiles of the failed frame ((1,0,0) on a, (1,0,3) on b,
    # which became b's running tile when (1,0,1) failed) drain and hold a
    # slot until then; EFT accounts for them.
    assert h.s.in_flight("a") == [(1, 0, 0)] and h.s.in_flight("b") == [(1, 0, 3)]
    assert h(FrameSubmitted(independent_frame(2, 2), 0.6)) == [
        Dispatch((2, 0, 0), "a"),
        Dispatch((2, 0, 1), "b"),
    ]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == []
    assert h(TileDone((1, 0, 3), "b", 1.5)) == []
    assert h.s.frame_status(1) == "failed"
    assert h.s.accepted((1, 0, 0)) is None
    assert h.s.frame_status(1) == "failed"


def test_tail_failure_retries_then_fails() -> None:
    h = Checked(max_retries=1)
    fleet(h, "a")
    h(FrameSubmitted(independent_frame(1, 1), 0.0))
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Stitch(1, 0), RunTail(1, "a")]
    assert h(TailFailed(1, "a", 1.5, "nan")) == [RunTail(1, "a")]
    assert h(TailFailed(1, "a", 2.0, "nan")) == [
        FailFrame(1, "tail of frame 1 failed 2 times (max_retries=1); last on a: nan")
    ]
    assert h(TailDone(1, "a", 2.5)) == []


def test_non_retryable_tail_failure() -> None:
    h = Checked()
    fleet(h, "a")
    h(FrameSubmitted(independent_frame(1, 1), 0.0))
    h(TileDone((1, 0, 0), "a", 1.0))
    assert h(TailFailed(1, "a", 1.5, "boom", retryable=False)) == [
        FailFrame(1, "tail of frame 1 failed on a (not retryable): boom")
    ]
    assert h(TailFailed(1, "a", 1.6, "boom")) == []
    assert h.s.frame_status(1) == "failed"


# ------------------------------------------------------------------ results lost with a machine


def test_lost_results_still_needed_run_again() -> None:
    """A machine dies after finishing (1,0,0): its output is gone, and both stage-1 tiles need it.
    (1,0,0) runs again; (1,1,1), already sent to b with the lost input, is cancelled and waits."""
    from scheduler.testing import layered_frame

    h = Checked(max_in_flight_per_device=2)
    fleet(h, "a", "b")
    assert h(FrameSubmitted(layered_frame(1, 2, 2), 0.0)) == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "b")]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == []
    assert h(TileDone((1, 0, 1), "b", 1.0)) == [
        Stitch(1, 0), Dispatch((1, 1, 0), "a"), Dispatch((1, 1, 1), "b")]
    assert h(DeviceLost("a", 1.5, results_lost=True)) == [Cancel((1, 1, 1), "b"), Dispatch((1, 0, 0), "b")]
    assert h(TileDone((1, 1, 1), "b", 1.6)) == []  # ran on lost inputs before the cancel: ignored
    assert h(TileDone((1, 0, 0), "b", 2.5)) == [Stitch(1, 0), Dispatch((1, 1, 0), "b"), Dispatch((1, 1, 1), "b")]
    assert h(TileDone((1, 1, 0), "b", 3.5)) == []
    assert h(TileDone((1, 1, 1), "b", 4.5)) == [Stitch(1, 1), RunTail(1, "b")]
    assert h(TailDone(1, "b", 4.5)) == [Complete(1)]


def test_lost_results_chain_back_to_what_they_need() -> None:
    """The tail needs the last stage's output, which needs the first stage's: both were on a, so
    both run again, in order. Without results_lost (only a worker process died; its machine's
    store lives on) only the tail moves. After the frame ended, a loss changes nothing."""
    from scheduler.testing import layered_frame

    for results_lost in (True, False):
        h = Checked(max_in_flight_per_device=2)
        fleet(h, "a", "b")
        h(FrameSubmitted(layered_frame(1, 2, 1), 0.0))
        assert h(TileDone((1, 0, 0), "a", 1.0)) == [Stitch(1, 0), Dispatch((1, 1, 0), "a")]
        assert h(TileDone((1, 1, 0), "a", 2.0)) == [Stitch(1, 1), RunTail(1, "a")]
        lost = h(DeviceLost("a", 2.5, results_lost=results_lost))
        if not results_lost:
            assert lost == [RunTail(1, "b")]
            continue
        assert lost == [Dispatch((1, 0, 0), "b")]
        assert h(TileDone((1, 0, 0), "b", 3.5)) == [Stitch(1, 0), Dispatch((1, 1, 0), "b")]
        assert h(TileDone((1, 1, 0), "b", 4.5)) == [Stitch(1, 1), RunTail(1, "b")]
        assert h(TailDone(1, "a", 4.6)) == []  # the lost device's tail: ignored
        assert h(TailDone(1, "b", 5.0)) == [Complete(1)]
        fleet(h, "c")
        assert h(DeviceLost("b", 6.0, results_lost=True)) == []
