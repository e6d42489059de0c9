"""Placement (the map step), memory budgets, and the pure steal decision."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from scheduler import (
    Complete,
    DeviceInfo,
    DeviceJoined,
    DeviceLost,
    Dispatch,
    FailFrame,
    FrameSpec,
    FrameSubmitted,
    RunTail,
    Stitch,
    TailDone,
    TileDone,
    TileSpec,
)
from scheduler.placement import (
    Candidate,
    best_device,
    choose_tail_device,
    objective,
    plan_greedy,
    tile_cost_s,
)
from scheduler.stealing import PlannedTile, Victim, choose_steal, cost_bucket, queue_finish
from scheduler.testing import GB, Checked, device, independent_frame
from sims.clock import DeviceClock
from sims.specs import device_spec, simulate_specs

pytestmark = pytest.mark.unit

# ------------------------------------------------------------------ pure placement


def test_tile_cost_is_transfer_plus_compute_plus_overhead() -> None:
    info = device("d", 2.0, overhead_s=0.5, link_bps=1e6, latency_s=0.25)
    tile = TileSpec(0, 0, 4 * GB, 1_000_000, 0, 0)
    assert tile_cost_s(tile, info) == pytest.approx(1.0 + 0.25 + 2.0 + 0.5)
    assert tile_cost_s(tile, info, speed=5.0) == pytest.approx(1.0 + 0.25 + 10.0 + 0.5)


def test_objective_breaks_ties_by_speed_then_id() -> None:
    slow, fast, fast2 = (Candidate(device(i, g)) for i, g in [("a", 1.0), ("z", 2.0), ("y", 2.0)])
    assert min([slow, fast, fast2], key=lambda c: objective(1.0, c)).info.id == "y"
    assert objective(1.0 + 1e-12, slow) == objective(1.0, slow)  # float noise is not a tie-breaker


def test_best_device_skips_devices_that_cannot_hold_the_tile() -> None:
    tile = TileSpec(0, 0, GB, 0, 0, 100)
    cands = [Candidate(device("tiny", 100.0, memory_bytes=50)), Candidate(device("big", 1.0))]
    found = best_device(tile, 100, cands)
    assert found is not None and found[0].info.id == "big"
    assert best_device(tile, 100, cands[:1]) is None


def test_plan_greedy_is_capability_proportional() -> None:
    cands = {i: Candidate(device(i, g)) for i, g in [("a", 1.0), ("b", 3.0)]}
    tiles = [((0, i), TileSpec(0, i, GB, 0, 0, 0), 0) for i in range(8)]
    choices, after = plan_greedy(tiles, cands)
    assert Counter(d for _, d in choices) == {"b": 6, "a": 2}
    assert after["a"].ready_at == pytest.approx(2.0)
    assert after["b"].ready_at == pytest.approx(2.0)


def test_tail_device_choice() -> None:
    cpu = Candidate(device("cpu", 100.0))
    gpu = Candidate(device("gpu", 10.0, gpu=True))
    slowed_gpu = Candidate(device("gpu2", 40.0, gpu=True), speed=8.0)
    assert choose_tail_device(10, [(cpu, 100), (gpu, 100), (slowed_gpu, 100)]) == "gpu"
    assert choose_tail_device(10, [(cpu, 100), (gpu, 5)]) == "cpu"
    assert choose_tail_device(10, [(cpu, 5)]) is None


# ----------------------------------------------------------- heterogeneous fleets

HETERO = [("s1", 4.0), ("s2", 4.0), ("m", 12.0), ("f", 60.0)]


def world_rate(info: DeviceInfo, tile: TileSpec, in_flight: int = 2) -> float:
    """Tiles per second the simulated device sustains (:mod:`sims.clock`): its busiest resource
    (link and compute overlap), or the round trip when ``in_flight`` tiles cannot hide it."""
    c = DeviceClock(device_spec(info).profile)
    parts = (c.transfer_time(tile.in_bytes), c.compute_time(tile.flops), c.transfer_time(tile.out_bytes))
    return min(1.0 / max(parts), in_flight / (sum(parts) + 2 * c.latency))


@pytest.mark.parametrize("n", [20, 37, 80, 161])
@pytest.mark.parametrize(("flops", "overhead"), [(GB, 0.0), (GB // 10, 0.0), (GB // 10, 0.002)])
def test_tile_counts_follow_device_speed(n: int, flops: int, overhead: float) -> None:
    """A device's share is its tile throughput over the fleet's.

    With big tiles that is gflops (4:4:12:60); with small ones the fixed
    latency and overhead flatten it, and the fast device's share shrinks.
    The scheduler plans with its estimate (:func:`tile_cost_s`: transfer,
    compute, overhead in sequence); the device model overlaps link and
    compute, so devices sustain a little more than planned, and stealing
    moves the shares from the planned ones towards the sustained ones.
    """
    fleet = [device(i, g, overhead_s=overhead, link_bps=1e9, latency_s=0.0005) for i, g in HETERO]
    tiles = tuple(TileSpec(0, i, flops, 10_000, 10_000, 0) for i in range(n))
    result = simulate_specs(fleet, [FrameSpec(0, tiles, (0,))], validate=True)
    assert result.completed == [0]
    counts = Counter(result.assignments.values())
    planned = {info.id: 1.0 / tile_cost_s(tiles[0], info) for info in fleet}
    sustained = {info.id: world_rate(info, tiles[0]) for info in fleet}
    for dev_id, _ in HETERO:
        shares = [n * rate[dev_id] / sum(rate.values()) for rate in (planned, sustained)]
        # EFT hands leftovers to whoever finishes them first (the fast device),
        # so only the slow ones are bounded by their share from above.
        if dev_id.startswith("s"):
            assert counts[dev_id] <= math.ceil(max(shares)), (dev_id, counts, shares)
        assert min(shares) - 2 <= counts[dev_id] <= max(shares) + 2, (dev_id, counts, shares)
    assert sum(counts.values()) == n
    if flops == GB:
        assert counts["f"] >= 0.7 * n


def test_initial_plan_is_exactly_proportional() -> None:
    h = Checked()
    h(*(DeviceJoined(device(i, g), 0.0) for i, g in HETERO))
    h(FrameSubmitted(independent_frame(1, 80), 0.0))
    held = {d: len(h.s.planned(d)) + len(h.s.in_flight(d)) for d, _ in HETERO}
    assert held == {"s1": 4, "s2": 4, "m": 12, "f": 60}


# --------------------------------------------------------------------- memory


def test_device_too_small_for_the_stage_is_never_used() -> None:
    fleet = [device("tiny", 100.0, memory_bytes=5_000), device("big", 1.0, memory_bytes=GB)]
    frame = independent_frame(0, 6, weights=5_000, peak_bytes=1_000)
    result = simulate_specs(fleet, [frame], validate=True)
    assert result.completed == [0]
    assert set(result.assignments.values()) == {"big"}
    assert not any(isinstance(i, Dispatch) and i.device == "tiny" for i in result.instructions)
    # The tail needs no memory here, so the fastest device still runs it.
    assert RunTail(0, "tiny") in result.instructions


def test_no_device_big_enough_fails_the_frame_naming_the_bytes() -> None:
    h = Checked()
    h(
        DeviceJoined(device("a", memory_bytes=4_000), 0.0),
        DeviceJoined(device("b", memory_bytes=3_000), 0.0),
    )
    frame = independent_frame(1, 2, weights=5_000, peak_bytes=1_000)
    assert h(FrameSubmitted(frame, 0.0)) == [
        FailFrame(
            1,
            "tile (1, 0, 0) needs 6000 bytes (stage 0 weights 5000 + peak 1000) "
            "but the largest alive device budget is 4000 bytes",
        )
    ]


def test_tail_too_big_for_every_device() -> None:
    h = Checked()
    h(DeviceJoined(device("a", memory_bytes=100), 0.0))
    frame = FrameSpec(1, (TileSpec(0, 0, 1, 0, 60, 0),), (0,), out_bytes=50)
    assert h(FrameSubmitted(frame, 0.0)) == [
        FailFrame(
            1, "tail of frame 1 needs 110 bytes but the largest alive device budget is 100 bytes"
        )
    ]


def test_losing_the_only_big_device_fails_frames_it_alone_could_run() -> None:
    h = Checked()
    h(
        DeviceJoined(device("big", memory_bytes=GB), 0.0),
        DeviceJoined(device("small", memory_bytes=10), 0.0),
    )
    assert h(FrameSubmitted(independent_frame(1, 1, weights=100), 0.0)) == [
        Dispatch((1, 0, 0), "big")
    ]
    assert h(DeviceLost("big", 0.5)) == [
        FailFrame(
            1,
            "tile (1, 0, 0) needs 100 bytes (stage 0 weights 100 + peak 0) but the largest alive "
            "device budget is 10 bytes after losing big",
        )
    ]


def test_in_flight_peaks_share_the_budget() -> None:
    # weights 1000 + two peaks of 500 fit; a third tile must wait.
    h = Checked(max_in_flight_per_device=4)
    h(DeviceJoined(device("a", memory_bytes=2_000), 0.0))
    out = h(FrameSubmitted(independent_frame(1, 4, weights=1_000, peak_bytes=500), 0.0))
    assert out == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "a")]
    assert h.s.stats()["a"].memory_in_use == 2_000
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [Dispatch((1, 0, 2), "a")]


def test_frames_of_one_model_share_stage_weights() -> None:
    h = Checked(max_in_flight_per_device=4)
    h(DeviceJoined(device("a", memory_bytes=2_000), 0.0))
    f1 = independent_frame(1, 1, weights=1_000, peak_bytes=500, deployment="m")
    f2 = independent_frame(2, 1, weights=1_000, peak_bytes=500, deployment="m")
    assert h(FrameSubmitted(f1, 0.0), FrameSubmitted(f2, 0.0)) == [
        Dispatch((1, 0, 0), "a"),
        Dispatch((2, 0, 0), "a"),
    ]


def test_frames_of_different_models_pay_weights_each() -> None:
    h = Checked(max_in_flight_per_device=4)
    h(DeviceJoined(device("a", memory_bytes=2_000), 0.0))
    f1 = independent_frame(1, 1, weights=1_000, peak_bytes=500, deployment="m1")
    f2 = independent_frame(2, 1, weights=1_000, peak_bytes=500, deployment="m2")
    assert h(FrameSubmitted(f1, 0.0), FrameSubmitted(f2, 0.0)) == [Dispatch((1, 0, 0), "a")]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == [
        Stitch(1, 0),
        RunTail(1, "a"),
        Dispatch((2, 0, 0), "a"),
    ]
    assert h(TailDone(1, "a", 1.0)) == [Complete(1)]


# ----------------------------------------------------------------- pure stealing


def _victim(
    dev_id: str, n: int, ready_at: float = 0.0, flops: int = GB, in_bytes: int = 0
) -> Victim:
    planned = tuple(
        PlannedTile((1, 0, i), TileSpec(0, i, flops, in_bytes, 0, 0), 0) for i in range(n)
    )
    return Victim(Candidate(device(dev_id), 1.0, ready_at), planned)


def test_cost_bucket() -> None:
    assert cost_bucket(8.0, 1.0) == 3
    assert cost_bucket(1.0, 8.0) == -3
    assert cost_bucket(1.0, 0.0) == 8
    assert cost_bucket(0.0, 1.0) == -8
    assert cost_bucket(1e9, 1.0) == 8


def test_steal_takes_the_first_tile_that_gains_from_the_latest_queue() -> None:
    thief = Candidate(device("t"), 1.0, 0.0)
    victims = [_victim("short", 2), _victim("long", 5)]
    assert queue_finish(victims[1]) == pytest.approx(5.0)
    steal = choose_steal(thief, victims)
    assert steal is not None
    # (1,0,0) would end at 1.0 on either device: no gain.  (1,0,1) ends at
    # 2.0 on the victim, 1.0 on the thief: the front-most gain, oldest work first.
    assert (steal.victim, steal.key) == ("long", (1, 0, 1))
    assert steal.thief_finish == pytest.approx(1.0)
    assert steal.victim_finish == pytest.approx(2.0)


def test_steal_declines_when_the_thief_would_finish_later() -> None:
    slow_thief = Candidate(device("t", 0.25), 1.0, 0.0)  # 4 s per tile
    assert choose_steal(slow_thief, [_victim("v", 3)]) is None
    assert choose_steal(slow_thief, [_victim("v", 5)]) is not None


def test_steal_prefers_compute_heavy_tiles() -> None:
    thief = Candidate(device("t", link_bps=1e9), 1.0, 0.0)
    heavy = PlannedTile((1, 0, 0), TileSpec(0, 0, GB, 1_000, 0, 0), 0)
    light = PlannedTile((1, 0, 1), TileSpec(0, 1, GB // 100, 100_000_000, 0, 0), 0)
    victim = Victim(Candidate(device("v", link_bps=1e9), 1.0, 3.0), (heavy, light))
    steal = choose_steal(thief, [victim])
    assert steal is not None and steal.key == (1, 0, 0)


def test_steal_respects_the_thiefs_memory() -> None:
    thief = Candidate(device("t", memory_bytes=10), 1.0, 0.0)
    victim = Victim(
        Candidate(device("v"), 1.0, 0.0),
        tuple(PlannedTile((1, 0, i), TileSpec(0, i, GB, 0, 0, 100), 100) for i in range(4)),
    )
    assert choose_steal(thief, [victim]) is None
