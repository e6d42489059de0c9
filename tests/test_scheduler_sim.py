"""The scheduler with hand-made frames, driven by the real driver on the simulated fleet.

Frames and devices come from :mod:`scheduler.testing` (a 1 GFLOP tile on a 1 GFLOP/s device takes
exactly 1 s, links cost nothing); :func:`sims.specs.simulate_specs` runs them through the same
driver, event heap and device model as ``tilefleet sim``: there is no other loop.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Stitch
from scheduler.testing import device, independent_frame, layered_frame
from sims.simulate import Scenario, ScenarioEvent, SimRun
from sims.specs import device_spec, simulate_specs

pytestmark = pytest.mark.sim

EQUAL4 = [device(f"d{i}") for i in range(4)]


def steals(run: SimRun) -> int:
    return sum(s.steals for s in run.device_stats.values())


def test_stealing_beats_a_static_split_when_a_device_is_secretly_slow() -> None:
    """d0 runs 5x slower than its profile says and nobody tells the scheduler.

    The static MoDNN split gives it a quarter of the tiles and the frame waits for it. Stealing
    alone lets the others drain its planned queue; with speed learning on, d0's first measured
    tile also moves its queue away at once."""
    frames = [independent_frame(0, 40)]
    hidden = {"d0": 5.0}
    static = simulate_specs(EQUAL4, frames, work_stealing=False, hidden_slowdown=hidden, validate=True)
    stealing = simulate_specs(EQUAL4, frames, hidden_slowdown=hidden, validate=True)
    learning = simulate_specs(EQUAL4, frames, learn_speed=True, hidden_slowdown=hidden, validate=True)
    assert static.completed == stealing.completed == learning.completed == [0]
    assert static.makespan == pytest.approx(50.0)  # 10 tiles x 5 s on d0
    assert stealing.makespan <= 0.4 * static.makespan
    assert learning.makespan <= 0.3 * static.makespan
    assert Counter(static.assignments.values()) == {f"d{i}": 10 for i in range(4)}
    assert Counter(stealing.assignments.values())["d0"] <= 4
    assert Counter(learning.assignments.values())["d0"] <= 2
    assert steals(stealing) > 0 and steals(static) == 0
    assert learning.device_stats["d0"].speed == pytest.approx(5.0, rel=0.05)  # learned, in 10% steps
    assert stealing.device_stats["d0"].speed == 1.0


def test_announced_slowdown_moves_work_without_waiting() -> None:
    """The device says it is 5x slower at 2.5 s (a thermal monitor would): its queue moves at once,
    with or without stealing."""
    frames = [independent_frame(0, 40)]
    told = Scenario([ScenarioEvent(2.5, "slow", "d0", factor=5.0, announce=True)])
    result = simulate_specs(EQUAL4, frames, scenario=told, validate=True)
    static = simulate_specs(EQUAL4, frames, scenario=told, work_stealing=False, validate=True)
    hidden = simulate_specs(EQUAL4, frames, scenario=Scenario([ScenarioEvent(2.5, "slow", "d0", factor=5.0)]),
                            work_stealing=False, validate=True)
    assert result.completed == [0]
    # d0 keeps the tile it was running and finishes at most one more.
    assert Counter(result.assignments.values())["d0"] <= 4
    assert result.makespan < 13.5
    # Re-placement on DeviceSlow works even without stealing; untold and static, the frame waits for d0.
    assert static.makespan < 14.5 < hidden.makespan
    assert result.device_stats["d0"].requeued > 0


def test_device_joining_mid_frame_gets_work_by_stealing() -> None:
    frames = [independent_frame(0, 24)]
    two = [device("a"), device("b")]
    alone = simulate_specs(two, frames, validate=True)
    joins = Scenario([ScenarioEvent(3.0, "join", "c", spec=device_spec(device("c", 2.0)))])
    helped = simulate_specs(two, frames, scenario=joins, validate=True)
    assert alone.makespan == pytest.approx(12.0)
    assert helped.makespan <= 8.0  # 18 tiles left at t=3, 4 tiles/s: 7.5 at best
    assert helped.device_stats["c"].steals > 0
    assert Counter(helped.assignments.values())["c"] > 0


def test_device_lost_mid_frame_still_completes() -> None:
    frames = [layered_frame(0, stages=3, width=4)]
    lost = Scenario([ScenarioEvent(1.5, "kill", "d2", detect_s=0.0)])
    result = simulate_specs(EQUAL4, frames, scenario=lost, validate=True)
    assert result.completed == [0] and result.failed == {}
    assert len(result.assignments) == 12
    assert all(d != "d2" for k, d in result.assignments.items() if k[1] >= 1)
    assert result.device_stats["d2"].requeued > 0


def test_pipelined_frames_all_complete_with_each_stage_stitched_once() -> None:
    frames = [layered_frame(f, stages=3, width=5, halo=1, tail_flops=10**9) for f in range(6)]
    fleet = [device("a", 2.0), device("b", 1.0), device("g", 8.0, gpu=True)]
    result = simulate_specs(fleet, frames, submit_times=[0.5 * f for f in range(6)], validate=True)
    assert sorted(result.completed) == list(range(6))
    stitches = Counter(i for i in result.instructions if isinstance(i, Stitch))
    assert set(stitches.values()) == {1}
    assert len(stitches) == 18


def test_simulation_is_deterministic() -> None:
    frames = [layered_frame(f, stages=2, width=6) for f in range(3)]
    fleet = [device("a", 3.0), device("b", 1.0), device("c", 1.0)]
    script = Scenario([ScenarioEvent(1.0, "slow", "a", factor=4.0, announce=True),
                       ScenarioEvent(2.0, "kill", "b", detect_s=0.0),
                       ScenarioEvent(3.0, "slow", "a", factor=1.0, announce=True)])
    one, two = (simulate_specs(fleet, frames, scenario=script, hidden_slowdown={"c": 2.0}) for _ in range(2))
    assert (one.ended, one.assignments, one.instructions, one.events) == (two.ended, two.assignments,
                                                                          two.instructions, two.events)
    assert sorted(one.completed) == [0, 1, 2]


def test_submit_times_must_match_frames() -> None:
    with pytest.raises(ValueError, match="one entry per frame"):
        simulate_specs(EQUAL4, [independent_frame(0, 1)], submit_times=[0.0, 1.0])
    with pytest.raises(ValueError, match="nondecreasing"):
        simulate_specs(EQUAL4, [independent_frame(0, 1)] * 2, submit_times=[1.0, 0.0])
    with pytest.raises(KeyError, match="no simulated device 'd9'"):
        simulate_specs(EQUAL4, [independent_frame(0, 1)], hidden_slowdown={"d9": 2.0})


def test_device_specs_keep_the_schedulers_profile() -> None:
    info = device("x", 2.5, memory_bytes=1234, overhead_s=0.01, link_bps=1e9, latency_s=0.002, gpu=True)
    assert device_spec(info).info() == dataclasses.replace(info, klass="test")  # a profile names its class
    assert device_spec(dataclasses.replace(info, klass="pi")).info().klass == "pi"


@settings(max_examples=25, deadline=None)
@given(
    gflops=st.lists(st.sampled_from([1.0, 2.0, 8.0]), min_size=1, max_size=4),
    hidden=st.lists(st.sampled_from([1.0, 1.0, 3.0]), min_size=4, max_size=4),
    script=st.lists(
        st.tuples(st.sampled_from(["slow", "lost", "join"]), st.integers(0, 3), st.floats(0.0, 6.0),
                  st.sampled_from([1.0, 5.0])),
        max_size=4,
    ),
    n_frames=st.integers(1, 3),
)
def test_random_fleets_and_mishaps_always_end_every_frame(
    gflops: list[float], hidden: list[float], script: list[tuple[str, int, float, float]], n_frames: int,
) -> None:
    fleet = [device(f"d{i}", g) for i, g in enumerate(gflops)]
    events = []
    known = {d.id for d in fleet}
    for kind, i, t, factor in sorted(script, key=lambda e: e[2]):
        d = f"d{i}"
        if kind == "join":
            events.append(ScenarioEvent(t, "join", d, spec=device_spec(device(d, factor))))
            known.add(d)
        elif d in known:  # the world can only slow or kill a device it has
            events.append(ScenarioEvent(t, "slow", d, factor=factor, announce=True) if kind == "slow"
                          else ScenarioEvent(t, "kill", d, detect_s=0.0))
    frames = [layered_frame(f, stages=2, width=3) for f in range(n_frames)]
    result = simulate_specs(fleet, frames, submit_times=[0.3 * f for f in range(n_frames)],
                            hidden_slowdown={d.id: h for d, h in zip(fleet, hidden)}, scenario=Scenario(events),
                            validate=True)
    assert sorted(result.order) == list(range(n_frames))
    for fid in result.completed:
        assert all(result.assignments.get((fid, s, i)) for s in range(2) for i in range(3))
