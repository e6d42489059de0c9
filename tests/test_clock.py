"""The emulated timeline: exact arithmetic of links, compute queues, scale and slowdown."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sims.catalog import BUILTIN, Profile, parse_spec
from sims.clock import ClusterClock, DeviceClock, EmulatedStats, Timeline

PI3 = BUILTIN["pi3"]  # 4 GFLOP/s, 5 ms per tile, 40 Mbit/s = 5e6 B/s, 3 ms latency
MB = 1_000_000
GFLOP = 1_000_000_000
approx = pytest.approx


def _one_tile(clock: DeviceClock, now: float = 0.0, **kw: float) -> Timeline:
    return clock.admit(now, 1 * MB, 4 * GFLOP, MB // 10, **kw)


def test_single_tile_on_pi3() -> None:
    t = _one_tile(DeviceClock(PI3))
    assert t.arrive == 0.0
    assert (t.rx_start, t.rx_end, t.ready) == (0.0, approx(0.2), approx(0.203))
    assert (t.compute_start, t.compute_end) == (approx(0.203), approx(0.203 + 1.005))
    assert (t.tx_start, t.tx_end, t.done) == (approx(1.208), approx(1.228), approx(1.231))
    assert t.rx_s == approx(0.2) and t.busy_compute_s == approx(1.005) and t.tx_s == approx(0.02)
    assert t.rx_wait_s == 0.0 and t.compute_wait_s == approx(0.0) and t.tx_wait_s == 0.0
    assert t.total_s == approx(0.2 + 0.003 + 1.005 + 0.02 + 0.003)


def test_single_tile_starting_later() -> None:
    t = _one_tile(DeviceClock(PI3), now=10.0)
    assert (t.arrive, t.rx_start, t.compute_start, t.done) == (10.0, 10.0, approx(10.203), approx(11.231))


def test_two_tiles_back_to_back_queue_compute_and_overlap_rx() -> None:
    c = DeviceClock(PI3)
    a = _one_tile(c)
    b = _one_tile(c)  # sent at the same moment: its input waits for a's on the rx link
    assert (b.rx_start, b.rx_end, b.ready) == (approx(0.2), approx(0.4), approx(0.403))
    assert b.rx_wait_s == approx(0.2)
    # b's input arrives while a computes (0.203 .. 1.208): the link overlapped a's compute ...
    assert b.rx_start < a.compute_end and a.compute_start < b.rx_end and b.ready < a.compute_end
    # ... and b computes FIFO, right after a
    assert b.compute_start == approx(a.compute_end) == approx(1.208)
    assert b.compute_end == approx(2.213)
    assert b.compute_wait_s == approx(1.208 - 0.403)
    # a's result leaves while b computes; b's result follows its compute
    assert a.tx_end < b.compute_end
    assert (b.tx_start, b.tx_end, b.done) == (approx(2.213), approx(2.233), approx(2.236))
    assert c.rx_free == approx(0.4) and c.compute_free == approx(2.213) and c.tx_free == approx(2.233)


def test_tx_queue_is_fifo() -> None:
    # Tiny compute, big results: the second result waits for the first on the tx link.
    c = DeviceClock(PI3)
    a = c.admit(0.0, 0, 0, 1 * MB)
    b = c.admit(0.0, 0, 0, 1 * MB)
    assert a.compute_start == approx(0.003) and a.compute_end == approx(0.008)
    assert b.compute_start == approx(0.008) and b.compute_end == approx(0.013)
    assert (a.tx_start, a.tx_end) == (approx(0.008), approx(0.208))
    assert (b.tx_start, b.tx_end, b.done) == (approx(0.208), approx(0.408), approx(0.411))
    assert b.tx_wait_s == approx(0.195)


def test_idle_gap_is_not_charged() -> None:
    c = DeviceClock(PI3)
    _one_tile(c)
    t = _one_tile(c, now=100.0)  # everything long free again
    assert (t.rx_start, t.compute_start, t.done) == (100.0, approx(100.203), approx(101.231))


def test_scale_doubles_every_duration() -> None:
    base = _one_tile(DeviceClock(PI3))
    scaled = _one_tile(DeviceClock(PI3, scale=2.0))
    for f in dataclasses.fields(Timeline):
        assert getattr(scaled, f.name) == approx(2 * getattr(base, f.name)), f.name
    c = DeviceClock(PI3, scale=2.0)
    assert c.latency == approx(0.006)
    assert c.transfer_time(MB) == approx(0.4)
    assert c.compute_time(4 * GFLOP) == approx(2.01)


def test_slow_factor_stretches_only_compute() -> None:
    t = _one_tile(DeviceClock(PI3), slow_factor=2.0)
    assert t.rx_s == approx(0.2) and t.tx_s == approx(0.02)
    assert t.busy_compute_s == approx(2.01)  # (1 s + 5 ms) * 2: the overhead slows too
    assert t.done == approx(0.203 + 2.01 + 0.023)
    both = _one_tile(DeviceClock(PI3, scale=3.0), slow_factor=2.0)
    assert both.busy_compute_s == approx(6.03)


def test_charge_tx_and_rx_queue_with_tiles() -> None:
    c = DeviceClock(PI3)
    a = _one_tile(c)
    # A reuse halo sent to a neighbour at t=0.5 waits until a's result has left the tx link.
    halo_done = c.charge_tx(0.5, 500_000)
    assert halo_done == approx(1.228 + 0.1 + 0.003)
    assert c.tx_free == approx(1.328)
    # Bytes passed in from another worker queue behind a's input on the rx link ...
    assert c.charge_rx(0.1, 250_000) == approx(0.2 + 0.05 + 0.003)
    # ... and delay the next tile's input behind them.
    b = _one_tile(c, now=0.1)
    assert b.rx_start == approx(0.25) and b.rx_end == approx(0.45)
    # b's result waits for the halo on the tx link
    assert b.compute_end == approx(a.compute_end + 1.005)
    assert b.tx_start == approx(max(b.compute_end, 1.328))
    # charging is FIFO in call order and starts no earlier than asked
    assert c.charge_tx(50.0, 0) == approx(50.003)
    assert c.charge_rx(0.0, 5 * MB) == approx(0.45 + 1.0 + 0.003)
    assert a.done < halo_done


def test_stats_and_reset() -> None:
    c = DeviceClock(PI3)
    _one_tile(c)
    _one_tile(c)
    c.charge_tx(0.0, 1000)
    c.charge_rx(0.0, 2000)
    s = c.stats
    assert s == EmulatedStats(
        tiles=2,
        compute_busy_s=approx(2.01),
        rx_busy_s=approx(0.4004),
        tx_busy_s=approx(0.0402),
        bytes_rx=2 * MB + 2000,
        bytes_tx=2 * (MB // 10) + 1000,
        flops=8 * GFLOP,
    )
    c.reset()
    assert c.stats == EmulatedStats()
    assert (c.rx_free, c.compute_free, c.tx_free) == (0.0, 0.0, 0.0)
    assert _one_tile(c).done == approx(1.231)
    assert s.tiles == 2  # snapshots are unaffected by later calls


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((float("nan"), 0, 0, 0), {}, "now"),
        ((0.0, -1, 0, 0), {}, "bytes_in"),
        ((0.0, 0, 1.5, 0), {}, "flops"),
        ((0.0, 0, 0, -2), {}, "bytes_out"),
        ((0.0, 0, 0, 0), {"slow_factor": 0.0}, "slow_factor"),
    ],
)
def test_admit_rejects_bad_input(args: tuple[float, int, int, int], kw: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeviceClock(PI3).admit(*args, **kw)


def test_bad_scale_and_profile() -> None:
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            DeviceClock(PI3, bad)
    with pytest.raises(TypeError):
        DeviceClock("pi3")  # type: ignore[arg-type]


def test_timeline_round_trips_and_checks_order() -> None:
    t = _one_tile(DeviceClock(PI3))
    assert Timeline(**dataclasses.asdict(t)) == t
    assert Timeline(0, 0, 1, 1, 2, 2, 3, 3).ready == 1  # without ready: the input is there at rx_end
    with pytest.raises(ValueError, match="out of order"):
        Timeline(0, 0, 1, 0.5, 2, 2, 3, 3)
    assert not math.isnan(t.ready)


def test_cluster_clock_holds_one_clock_per_device() -> None:
    cc = ClusterClock(parse_spec("pi3*2,pi4"), scale=1.0)
    assert cc.ids == ["pi3-0", "pi3-1", "pi4-0"] and len(cc) == 3 and "pi4-0" in cc
    a = cc.admit("pi3-0", 0.0, MB, 4 * GFLOP, MB // 10)
    b = cc.admit("pi3-1", 0.0, MB, 4 * GFLOP, MB // 10)
    assert a == b  # devices are independent
    assert cc["pi3-0"].compute_free == approx(1.208) and cc["pi4-0"].compute_free == 0.0
    assert cc.stats["pi3-0"].tiles == 1 and cc.stats["pi4-0"].tiles == 0
    cc.add("extra", BUILTIN["laptop"])
    with pytest.raises(ValueError, match="already"):
        cc.add("extra", BUILTIN["laptop"])
    assert cc.remove("extra").profile.name == "laptop"
    with pytest.raises(KeyError, match="no device 'extra'"):
        cc["extra"]
    cc.reset()
    assert all(s == EmulatedStats() for s in cc.stats.values())
    assert ClusterClock.from_spec("pi3,pi4", scale=2.0)["pi4-0"].scale == 2.0
    assert ClusterClock({"x": PI3}).ids == ["x"]


def test_cluster_transfer_between_devices() -> None:
    cc = ClusterClock.from_spec("pi3,pi4")
    # 1 MB pi3 -> pi4: pi3's 5 MB/s link is the bottleneck; latencies 3 ms + 2 ms.
    assert cc.transfer("pi3-0", "pi4-0", 0.0, MB) == approx(0.2 + 0.005)
    assert cc["pi3-0"].tx_free == approx(0.2) and cc["pi4-0"].rx_free == approx(0.2)
    # The next transfer into pi4 waits for its rx link even from a fast sender.
    cc.add("lap", BUILTIN["laptop"])
    assert cc.transfer("lap", "pi4-0", 0.0, 1_250_000) == approx(0.2 + 0.1 + 0.004)
    assert cc.stats["pi4-0"].bytes_rx == MB + 1_250_000 and cc.stats["pi3-0"].bytes_tx == MB
    assert cc.transfer("pi4-0", "pi4-0", 7.0, MB) == 7.0  # to itself: free


def test_custom_profile_clock() -> None:
    fast = Profile(
        name="fast", gflops=1000.0, tile_overhead_s=0.0, memory_bytes=1, runtime_overhead_bytes=0,
        gpu=True, link_mbps=8.0, latency_s=0.0, klass="x", source="test",
    )
    t = DeviceClock(fast).admit(1.0, 1_000_000, 10**12, 0)
    assert (t.rx_end, t.compute_end, t.done) == (approx(2.0), approx(3.0), approx(3.0))
