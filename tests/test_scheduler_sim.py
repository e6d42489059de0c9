"""The state machine driven, unchanged, by the discrete-event simulator."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import DeviceJoined, DeviceLost, DeviceSlow, Event, Scheduler, Stitch, simulate
from scheduler.testing import device, independent_frame, layered_frame

pytestmark = [pytest.mark.unit, pytest.mark.sim]

EQUAL4 = [device(f"d{i}") for i in range(4)]


def test_stealing_beats_a_static_split_when_a_device_is_secretly_slow() -> None:
    """d0 runs 5x slower than its profile says and nobody tells the scheduler.

    The static MoDNN split gives it a quarter of the tiles and the frame
    waits for it.  Stealing alone lets the others drain its planned queue;
    with speed learning on (the default) d0's first measured tile also moves
    its queue away at once."""
    frames = [independent_frame(1, 40)]
    hidden = {"d0": 5.0}
    static = simulate(
        EQUAL4,
        frames,
        scheduler=Scheduler(work_stealing=False, learn_speed=False),
        hidden_slowdown=hidden,
        validate=True,
    )
    stealing = simulate(
        EQUAL4,
        frames,
        scheduler=Scheduler(learn_speed=False),
        hidden_slowdown=hidden,
        validate=True,
    )
    default = simulate(EQUAL4, frames, hidden_slowdown=hidden, validate=True)
    assert static.completed == stealing.completed == default.completed == (1,)
    assert static.makespan == pytest.approx(50.0)  # 10 tiles x 5 s on d0
    assert stealing.makespan <= 0.4 * static.makespan
    assert default.makespan <= 0.3 * static.makespan
    assert Counter(stealing.assignments.values())["d0"] <= 4
    assert Counter(default.assignments.values())["d0"] <= 2
    assert sum(s.steals for s in stealing.stats.values()) > 0
    assert sum(s.steals for s in static.stats.values()) == 0
    assert default.stats["d0"].speed == pytest.approx(5.0, rel=0.05)  # learned, in 10% steps


def test_announced_slowdown_moves_work_without_waiting() -> None:
    frames = [independent_frame(1, 40)]
    script = [DeviceSlow("d0", 5.0, 2.5)]
    result = simulate(EQUAL4, frames, script=script, validate=True)
    static = simulate(
        EQUAL4, frames, script=script, scheduler=Scheduler(work_stealing=False), validate=True
    )
    assert result.completed == (1,)
    # d0 keeps the tile it was running and finishes at most one more.
    assert Counter(result.assignments.values())["d0"] <= 4
    assert result.makespan < 13.5
    # Re-placement on DeviceSlow works even without stealing.
    assert static.makespan < 14.5
    assert result.stats["d0"].requeued > 0


def test_device_joining_mid_frame_gets_work_by_stealing() -> None:
    frames = [independent_frame(1, 24)]
    two = [device("a"), device("b")]
    alone = simulate(two, frames, validate=True)
    helped = simulate(two, frames, script=[DeviceJoined(device("c", 2.0), 3.0)], validate=True)
    assert alone.makespan == pytest.approx(12.0)
    assert helped.makespan <= 8.0  # 18 tiles left at t=3, 4 tiles/s: 7.5 at best
    assert helped.stats["c"].steals > 0
    assert Counter(helped.assignments.values())["c"] > 0


def test_device_lost_mid_frame_still_completes() -> None:
    frames = [layered_frame(1, stages=3, width=4)]
    result = simulate(EQUAL4, frames, script=[DeviceLost("d2", 1.5)], validate=True)
    assert result.completed == (1,)
    assert result.failed == {}
    assert len(result.assignments) == 12
    assert all(d != "d2" for k, d in result.assignments.items() if k[1] >= 1)
    assert result.stats["d2"].requeued > 0


def test_pipelined_frames_all_complete_with_each_stage_stitched_once() -> None:
    frames = [layered_frame(f, stages=3, width=5, halo=1, tail_flops=10**9) for f in range(6)]
    fleet = [device("a", 2.0), device("b", 1.0), device("g", 8.0, gpu=True)]
    result = simulate(fleet, frames, submit_times=[0.5 * f for f in range(6)], validate=True)
    assert result.completed == tuple(range(6))
    stitches = Counter(i for i in result.instructions if isinstance(i, Stitch))
    assert set(stitches.values()) == {1}
    assert len(stitches) == 18


def test_simulation_is_deterministic() -> None:
    frames = [layered_frame(f, stages=2, width=6) for f in range(3)]
    fleet = [device("a", 3.0), device("b", 1.0), device("c", 1.0)]
    script: list[Event] = [
        DeviceSlow("a", 4.0, 1.0),
        DeviceLost("b", 2.0),
        DeviceSlow("a", 1.0, 3.0),
    ]
    one = simulate(fleet, frames, script=script, hidden_slowdown={"c": 2.0})
    two = simulate(fleet, frames, script=script, hidden_slowdown={"c": 2.0})
    assert one == two
    assert sorted(one.completed) == [0, 1, 2]


def test_submit_times_must_match_frames() -> None:
    with pytest.raises(ValueError, match="one entry per frame"):
        simulate(EQUAL4, [independent_frame(1, 1)], submit_times=[0.0, 1.0])


@settings(max_examples=25, deadline=None)
@given(
    gflops=st.lists(st.sampled_from([1.0, 2.0, 8.0]), min_size=1, max_size=4),
    hidden=st.lists(st.sampled_from([1.0, 1.0, 3.0]), min_size=4, max_size=4),
    script=st.lists(
        st.tuples(
            st.sampled_from(["slow", "lost", "join"]),
            st.integers(0, 3),
            st.floats(0.0, 6.0),
            st.sampled_from([1.0, 5.0]),
        ),
        max_size=4,
    ),
    n_frames=st.integers(1, 3),
)
def test_random_fleets_and_mishaps_always_end_every_frame(
    gflops: list[float],
    hidden: list[float],
    script: list[tuple[str, int, float, float]],
    n_frames: int,
) -> None:
    fleet = [device(f"d{i}", g) for i, g in enumerate(gflops)]
    events: list[Event] = []
    for kind, i, t, factor in script:
        if kind == "slow":
            events.append(DeviceSlow(f"d{i}", factor, t))
        elif kind == "lost":
            events.append(DeviceLost(f"d{i}", t))
        else:
            events.append(DeviceJoined(device(f"d{i}", factor), t))
    frames = [layered_frame(f, stages=2, width=3) for f in range(n_frames)]
    result = simulate(
        fleet,
        frames,
        submit_times=[0.3 * f for f in range(n_frames)],
        hidden_slowdown={f"d{i}": h for i, h in enumerate(hidden)},
        script=events,
        validate=True,
    )
    assert sorted([*result.completed, *result.failed]) == list(range(n_frames))
    for fid in result.completed:
        assert all(result.assignments.get((fid, s, i)) for s in range(2) for i in range(3))
