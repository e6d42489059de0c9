"""A shared medium (devices behind one Wi-Fi access point): the channel alone, then a fleet on it."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from histories import TABLE, devices, plan_of

from sims.catalog import DeviceSpec
from sims.medium import SharedLink, check_mbps
from sims.simulate import simulate

pytestmark = pytest.mark.sim


def book(link: SharedLink, seed: int, n: int = 300) -> list[tuple[float, float, float, float]]:
    """Seeded bookings as the simulator makes them: inputs now (the clock moves on), results for
    later; returns (ready, airtime, start, end) per transfer, in booking order."""
    rng = random.Random(seed)
    now, out = 0.0, []
    for _ in range(n):
        now += rng.expovariate(20.0)
        ready = now if rng.random() < 0.5 else now + rng.uniform(0, 0.5)
        nbytes = rng.randint(1, 200_000)
        device_bps = rng.choice([1e6, 5e6, 1e9])
        start, end = link.carry(ready, nbytes, device_bps)
        out.append((ready, link.airtime(nbytes, device_bps), start, end))
        link.forget_before(now)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_the_channel_carries_one_transfer_at_a_time_and_never_idles_while_one_waits(seed: int) -> None:
    link = SharedLink(10.0, log=True)
    booked = book(link, seed)
    pieces = sorted(link.pieces)
    assert all(a[1] <= b[0] + 1e-12 for a, b in itertools.pairwise(pieces)), "two transfers on the air at once"
    for k, (ready, air, start, end) in enumerate(booked, start=1):
        mine = [(a, b) for a, b, who in link.pieces if who == k]
        assert sum(b - a for a, b in mine) == pytest.approx(air, rel=1e-9, abs=1e-12)
        assert mine[0][0] == start >= ready and mine[-1][1] == end
        # it waited only while transfers booked before it were on the air
        earlier = sorted((a, b) for a, b, who in link.pieces if who < k and b > ready and a < start)
        covered = ready
        for a, b in earlier:
            assert a <= covered + 1e-12, f"transfer {k}: the channel idled at {covered} while it waited"
            covered = max(covered, b)
        assert covered >= start - 1e-12
    # the bytes it carried never exceed its bandwidth over the span it was busy
    assert link.bytes <= link.bps * (pieces[-1][1] - pieces[0][0]) + 1
    assert link.busy_s == pytest.approx(sum(b - a for a, b, _ in pieces))


def test_forgetting_the_past_changes_nothing() -> None:
    kept, pruned = SharedLink(10.0), SharedLink(10.0)
    rng = random.Random(7)
    now = 0.0
    for _ in range(500):
        now += rng.expovariate(50.0)
        ready = now + rng.choice([0.0, rng.uniform(0, 0.3)])
        n = rng.randint(1, 50_000)
        assert kept.carry(ready, n, 1e9) == pruned.carry(ready, n, 1e9)
        pruned.forget_before(now)
    assert len(pruned._starts) < len(kept._starts)


def test_a_slow_station_holds_the_air_longer_and_scale_stretches_it() -> None:
    link = SharedLink(80.0)  # 10 MB/s
    assert link.airtime(1_000_000, 1e9) == pytest.approx(0.1)
    assert link.airtime(1_000_000, 2.5e6) == pytest.approx(0.4)  # the station's own 20 Mbit/s
    assert SharedLink(80.0, scale=3.0).airtime(1_000_000, 1e9) == pytest.approx(0.3)
    assert link.carry(5.0, 0, 1e9) == (5.0, 5.0)  # nothing to send: no air time


@pytest.mark.parametrize("bad", [0, -10, float("nan"), float("inf"), True, "54"])
def test_a_bandwidth_that_is_not_a_positive_number_is_refused_clearly(bad: object) -> None:
    with pytest.raises(ValueError, match=r"finite number of Mbit/s > 0 .* got"):
        check_mbps(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Mbit/s > 0"):
        simulate(plan_of((1, 1)), devices("pi3"), frames=1, shared_link_mbps=bad)  # type: ignore[arg-type]


def ten_mbit(n: int) -> list[DeviceSpec]:
    p = dataclasses.replace(TABLE["pi3"], name="pi3-10m", link_mbps=10.0)
    return [DeviceSpec(f"pi3-10m-{i}", p) for i in range(n)]


def test_one_tile_pays_the_slower_of_its_link_and_the_channel() -> None:
    plan = plan_of((1, 1), tail=False)
    (dev,) = devices("pi3")
    t, p = plan.stages[0].tiles[0], dev.profile
    out_bytes = t.out_bytes + t.reuse_out_bytes
    for mbps in (p.link_mbps * 10, p.link_mbps / 4):
        bps = min(p.link_bps, mbps * 1e6 / 8)
        run = simulate(plan, [dev], frames=1, dispatch_s=0.0, report_s=0.0, shared_link_mbps=mbps)
        expected = (t.in_bytes / bps + p.latency_s + t.flops / (p.gflops * 1e9) + p.tile_overhead_s
                    + out_bytes / bps + p.latency_s)
        assert run.latency_s == [pytest.approx(expected, rel=1e-9)]
        assert run.shared_link is not None and run.shared_link["bytes"] == t.in_bytes + out_bytes


def test_four_devices_on_one_10_mbit_channel_are_slower_than_on_four_10_mbit_links() -> None:
    plan = plan_of((2, 2), tail=False, size=96)
    # speculation off: a copy's transfer can outlive the run and blur the channel's accounting
    own = simulate(plan, ten_mbit(4), frames=24, in_flight=4, dispatch_s=0.0, report_s=0.0, speculate_after=None)
    shared = simulate(plan, ten_mbit(4), frames=24, in_flight=4, dispatch_s=0.0, report_s=0.0, shared_link_mbps=10.0,
                      speculate_after=None)
    assert not own.failed and not shared.failed and own.shared_link is None
    assert min(shared.latency_s) > max(own.latency_s) and shared.fps < own.fps / 2
    ch = shared.shared_link
    assert ch is not None
    assert ch["carried_mbps"] <= 10.0 and 0.5 < ch["utilisation"] <= 1.0  # the channel is the bottleneck
    moved = sum(d["bytes_in"] + d["bytes_out"] for d in shared.stats["devices"].values())
    assert ch["bytes"] == moved  # every byte any device sent or received crossed it
    # on their own links the same bytes move at up to 4 x 10 Mbit/s
    assert moved * 8 / 1e6 / own.makespan > 10.0
