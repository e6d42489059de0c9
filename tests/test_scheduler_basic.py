"""Exact instruction lists for the happy path, dask worker-state-machine style.

Every tile costs exactly 1 s on a 1 GFLOP/s device (see scheduler.testing),
so each expected list below can be checked by hand.
"""

from __future__ import annotations

import pytest

from scheduler import (
    Complete,
    DeviceJoined,
    Dispatch,
    FailFrame,
    FrameSpec,
    FrameSubmitted,
    RunTail,
    Scheduler,
    Stitch,
    TailDone,
    TileDone,
    TileSpec,
)
from scheduler.testing import Checked, device, independent_frame, layered_frame

pytestmark = pytest.mark.unit


def joined(*ids: str) -> list[DeviceJoined]:
    return [DeviceJoined(device(i), 0.0) for i in ids]


def test_two_equal_devices_four_tiles_one_in_flight() -> None:
    h = Checked(max_in_flight_per_device=1)
    assert h(*joined("a", "b")) == []
    assert h(FrameSubmitted(independent_frame(1, 4), 0.0)) == [
        Dispatch((1, 0, 0), "a"),
        Dispatch((1, 0, 1), "b"),
    ]
    assert h.s.planned("a") == [(1, 0, 2)]
    assert h.s.planned("b") == [(1, 0, 3)]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Dispatch((1, 0, 2), "a")]
    assert h(TileDone((1, 0, 1), "b", 1.0)) == [Dispatch((1, 0, 3), "b")]
    assert h(TileDone((1, 0, 2), "a", 2.0)) == []
    assert h(TileDone((1, 0, 3), "b", 2.0)) == [Stitch(1, 0), RunTail(1, "a")]
    assert h(TailDone(1, "a", 2.5)) == [Complete(1)]
    # Duplicates after the end change nothing: Stitch and Complete were once.
    assert h(TileDone((1, 0, 3), "b", 3.0), TailDone(1, "a", 3.0)) == []
    assert h.s.frame_status(1) == "completed"
    assert [h.s.accepted((1, 0, i)) for i in range(4)] == ["a", "b", "a", "b"]
    stats = h.s.stats()
    assert (stats["a"].tiles_done, stats["b"].tiles_done, stats["a"].tails_done) == (2, 2, 1)


def test_two_in_flight_per_device_dispatches_queue_at_the_device() -> None:
    h = Checked(max_in_flight_per_device=2)
    h(*joined("a", "b"))
    assert h(FrameSubmitted(independent_frame(1, 6), 0.0)) == [
        Dispatch((1, 0, 0), "a"),
        Dispatch((1, 0, 2), "a"),
        Dispatch((1, 0, 1), "b"),
        Dispatch((1, 0, 3), "b"),
    ]
    assert h.s.in_flight("a") == [(1, 0, 0), (1, 0, 2)]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Dispatch((1, 0, 4), "a")]
    # A result for the queued (not first) tile is accepted too: devices may
    # run tiles concurrently, the order only matters for cancelling.
    assert h(TileDone((1, 0, 3), "b", 1.0)) == [Dispatch((1, 0, 5), "b")]


@pytest.mark.parametrize(
    ("halo", "after_first", "after_second"),
    [
        # halo 0: (1,1,0) needs only (1,0,0), so it runs before stage 0 is stitched.
        (0, [Dispatch((1, 1, 0), "a")], [Stitch(1, 0), Dispatch((1, 1, 1), "b")]),
        # halo 1: both stage-1 tiles need both stage-0 tiles.
        (1, [], [Stitch(1, 0), Dispatch((1, 1, 0), "a"), Dispatch((1, 1, 1), "b")]),
    ],
)
def test_stage_one_waits_for_its_deps(
    halo: int, after_first: list[object], after_second: list[object]
) -> None:
    h = Checked()
    h(*joined("a", "b"))
    frame = layered_frame(1, stages=2, width=2, halo=halo)
    assert h(FrameSubmitted(frame, 0.0)) == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "b")]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == after_first
    assert h(TileDone((1, 0, 1), "b", 1.0)) == after_second
    assert h(TileDone((1, 1, 0), "a", 2.0)) == []
    assert h(TileDone((1, 1, 1), "b", 2.0)) == [Stitch(1, 1), RunTail(1, "a")]
    assert h(TailDone(1, "a", 2.0)) == [Complete(1)]


def test_tail_prefers_gpu_then_speed_memory_permitting() -> None:
    h = Checked()
    h(
        DeviceJoined(device("cpu-fast", 100.0), 0.0),
        DeviceJoined(device("gpu", 10.0, gpu=True), 0.0),
        DeviceJoined(device("gpu-tiny", 50.0, gpu=True, memory_bytes=10), 0.0),
        DeviceJoined(device("cpu-slow", 1.0), 0.0),
    )
    frame = FrameSpec(1, (), (), tail_flops=10**9, out_bytes=100)
    # No tiles: the tail is ready at once.  gpu-tiny cannot hold 100 bytes.
    assert h(FrameSubmitted(frame, 0.0)) == [RunTail(1, "gpu")]
    assert h(TailDone(1, "gpu", 0.1)) == [Complete(1)]


def test_frames_run_oldest_first_on_a_shared_device() -> None:
    h = Checked(max_in_flight_per_device=1)
    h(*joined("a"))
    assert h(FrameSubmitted(independent_frame(1, 2), 0.0)) == [Dispatch((1, 0, 0), "a")]
    assert h(FrameSubmitted(independent_frame(2, 1), 0.0)) == []
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Dispatch((1, 0, 1), "a")]
    assert h(TileDone((1, 0, 1), "a", 2.0)) == [
        Stitch(1, 0),
        RunTail(1, "a"),
        Dispatch((2, 0, 0), "a"),
    ]
    assert h(TailDone(1, "a", 2.0)) == [Complete(1)]
    assert h(TileDone((2, 0, 0), "a", 3.0)) == [Stitch(2, 0), RunTail(2, "a")]
    assert h(TailDone(2, "a", 3.0)) == [Complete(2)]


def test_resubmitting_a_frame_is_ignored() -> None:
    h = Checked()
    h(*joined("a"))
    frame = independent_frame(7, 1)
    assert h(FrameSubmitted(frame, 0.0)) == [Dispatch((7, 0, 0), "a")]
    assert h(FrameSubmitted(frame, 0.1)) == []
    assert h(TileDone((7, 0, 0), "a", 1.0)) == [Stitch(7, 0), RunTail(7, "a")]
    assert h(TailDone(7, "a", 1.0)) == [Complete(7)]
    assert h(FrameSubmitted(frame, 2.0)) == []


@pytest.mark.parametrize(
    ("tiles", "weights", "needle"),
    [
        ((TileSpec(0, 0, 1, 0, 0, 0, ((0, 0),)),), (0,), "depends on itself"),
        ((TileSpec(0, 0, 1, 0, 0, 0, ((0, 9),)),), (0,), "unknown dep (0, 9)"),
        ((TileSpec(1, 0, 1, 0, 0, 0),), (0,), "stage 1 has no entry"),
        ((TileSpec(0, 0, 1, 0, 0, 0), TileSpec(0, 0, 1, 0, 0, 0)), (0,), "duplicate tile (0, 0)"),
        (
            (TileSpec(0, 0, 1, 0, 0, 0, ((0, 1),)), TileSpec(0, 1, 1, 0, 0, 0, ((0, 0),))),
            (0,),
            "dependency cycle",
        ),
    ],
)
def test_invalid_frames_fail_with_a_reason(
    tiles: tuple[TileSpec, ...], weights: tuple[int, ...], needle: str
) -> None:
    h = Checked()
    h(*joined("a"))
    out = h(FrameSubmitted(FrameSpec(3, tiles, weights), 0.0))
    assert len(out) == 1 and isinstance(out[0], FailFrame)
    assert out[0].frame_id == 3 and needle in out[0].reason
    assert h.s.frame_status(3) == "failed"


def test_results_from_strangers_are_ignored() -> None:
    h = Checked()
    h(*joined("a", "b"))
    assert h(FrameSubmitted(independent_frame(1, 1), 0.0)) == [Dispatch((1, 0, 0), "a")]
    assert h(TileDone((1, 0, 0), "b", 1.0)) == []  # not sent to b
    assert h(TileDone((1, 0, 0), "zzz", 1.0)) == []  # unknown device
    assert h(TileDone((9, 0, 0), "a", 1.0)) == []  # unknown frame
    assert h.s.accepted((1, 0, 0)) is None
    assert not h.s.expects((1, 0, 0), "b")
    assert h.s.expects((1, 0, 0), "a")
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Stitch(1, 0), RunTail(1, "a")]
    assert not h.s.expects((1, 0, 0), "a")  # a second copy would be a duplicate
    assert h.s.accepted((1, 0, 0)) == "a"


def test_story_tells_one_tiles_history() -> None:
    h = Checked(max_in_flight_per_device=1)
    h(*joined("a", "b"))
    h(FrameSubmitted(independent_frame(1, 4), 0.0))
    h(TileDone((1, 0, 0), "a", 1.0))
    h(TileDone((1, 0, 2), "a", 2.0))
    story = h.s.story((1, 0, 2))
    assert [entry.event for entry in story] == [
        TileDone((1, 0, 0), "a", 1.0),
        TileDone((1, 0, 2), "a", 2.0),
    ]
    assert story[0].instructions == (Dispatch((1, 0, 2), "a"),)
    assert [(tr.start, tr.finish, tr.device) for tr in h.s.transitions((1, 0, 2))] == [
        ("waiting", "planned", "a"),
        ("planned", "in_flight", "a"),
        ("in_flight", "done", "a"),
    ]
    assert len(h.s.story("b")) == 2  # joined + the frame's dispatch to b
    assert len(h.s.story(1)) == 3


def test_log_is_bounded() -> None:
    s = Scheduler(log_size=3)
    for i in range(10):
        s.handle(DeviceJoined(device(f"d{i}"), float(i)))
    assert len(s.log) == 3
    assert s.now == 9.0


def test_clock_never_goes_backwards() -> None:
    s = Scheduler()
    s.handle(DeviceJoined(device("a"), 5.0), DeviceJoined(device("b"), 1.0))
    assert s.now == 5.0
