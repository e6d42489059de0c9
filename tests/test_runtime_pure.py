"""The runtime's pure parts: wiring, the tile executor, the predictor and the auto-planner (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tiling
from fleet.runtime.wiring import remote_bytes, wire
from fleet.runtime.planner import choose_plan, downsampling_boundaries
from scheduler import DeviceInfo
from sims.catalog import DeviceSpec, parse_spec
from sims.profile_files import profiles
from sims.metrics import steady_fps, throughput_depth, trim_for
from sims.predict import predict
from sims.simulate import simulate
from tiling.geometry import Box
from tiling.stitch import stitch
from workers.executor import TileExecutor, TileFailure, TileResult


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def two_stage() -> tuple[nn.Module, torch.Tensor, tiling.Plan]:
    m = small_net()
    x = torch.randn(1, 3, 40, 36)
    return m, x, tiling.partition(m, x, stages=[2], grids=[(3, 3), (2, 2)], reuse=False)


def test_wiring_sources_and_deps(two_stage: tuple[nn.Module, torch.Tensor, tiling.Plan]) -> None:
    _, _, plan = two_stage
    w = wire(plan)
    s1 = plan.stages[1]
    for t in s1.tiles:
        tw = w.tiles[(1, t.index)]
        assert tw.frame_input is None
        (name,) = tw.sources
        # the sources cover the tile's input box exactly once
        covered = sum(src.overlap.area for src in tw.sources[name])
        assert covered == t.in_box.area
        spec = next(s for s in w.template if (s.stage, s.index) == (1, t.index))
        assert set(spec.deps) == {src.tile for src in tw.sources[name]}
    assert all(not s.deps for s in w.template if s.stage == 0)
    # bytes from other devices: none when every producer ran on the same device
    placed = {(0, i): "a" for i in range(9)}
    assert remote_bytes(w, (1, 0), placed, "a") == 0
    assert remote_bytes(w, (1, 0), placed, "b") == s1.tiles[0].in_bytes


def test_executor_from_crops_and_parts(two_stage: tuple[nn.Module, torch.Tensor, tiling.Plan]) -> None:
    m, x, plan = two_stage
    ex = TileExecutor(threads=1)
    assert ex.load("d", {s.index: s.program for s in plan.stages}) == sum(s.weight_bytes for s in plan.stages)
    xn = x.numpy()
    s0, s1 = plan.stages
    outs0 = {}
    for t in s0.tiles:
        b = t.in_box
        r = ex.run("d", 0, t.geometry, {plan.input_name: xn[:, :, b.h0:b.h1, b.w0:b.w1]})
        assert isinstance(r, TileResult) and r.bytes_in == t.in_bytes
        outs0[t.index] = r.outputs
    (mid,) = s0.outputs
    (last,) = s1.outputs
    full = np.zeros((1, *s1.shapes[last]), np.float32)
    for t in s1.tiles:
        parts = [(p.out_boxes[mid], outs0[p.index][mid]) for p in s0.tiles]
        r = ex.run("d", 1, t.geometry, {mid: parts})
        assert isinstance(r, TileResult)
        b = t.out_box
        full[:, :, b.h0:b.h1, b.w0:b.w1] = r.outputs[last]
    assert tiling.rel_error(torch.from_numpy(full), m(x)) < 1e-5


def test_executor_returns_failures_not_exceptions(two_stage: tuple[nn.Module, torch.Tensor, tiling.Plan]) -> None:
    _, x, plan = two_stage
    ex = TileExecutor(threads=1)
    t = plan.stages[0].tiles[0]
    r = ex.run("nope", 0, t.geometry, {})
    assert isinstance(r, TileFailure) and r.error == "NotLoaded" and r.retryable
    ex.load("d", {0: plan.stages[0].program})
    r = ex.run("d", 0, t.geometry, {plan.input_name: np.zeros((1, 3, 2, 2), np.float32)})
    assert isinstance(r, TileFailure) and not r.retryable and "covers" in r.message


def test_assemble() -> None:
    a = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    b = a + 100
    out = stitch(Box(1, 6, 2, 3), [(Box(0, 4, 0, 4), a), (Box(4, 8, 0, 4), b)])
    assert out.shape == (1, 2, 5, 1)
    assert out[0, 0, :, 0].tolist() == [6, 10, 14, 102, 106]
    with pytest.raises(ValueError, match="cover"):
        stitch(Box(0, 9, 0, 1), [(Box(0, 4, 0, 4), a)])


def test_steady_fps_handles_bursts() -> None:
    even = [i * 0.5 for i in range(40)]
    assert steady_fps(even, trim=4) == pytest.approx(2.0)
    bursty = sorted(t + 0.001 * j for t in range(0, 40, 4) for j in range(6))  # 6 frames every 4 s
    assert steady_fps(bursty, trim=6) == pytest.approx(1.5, rel=0.01)
    assert trim_for(100, 12) == 12 and trim_for(10, 12) == 2


def test_throughput_depth() -> None:
    assert throughput_depth([4.0] * 6) == 12
    assert throughput_depth([4, 4, 12, 12, 60]) == 28
    assert throughput_depth([1, 1000]) == 48


def test_predict_is_the_simulator() -> None:
    """The planner's predictor runs the simulator (tests/test_sim.py checks its timings exactly)."""
    plan = tiling.partition(small_net(), torch.randn(1, 3, 32, 32), grid=(2, 2))
    devs = parse_spec("pi3*2", profiles())
    p = predict(plan, devs, frames=3)
    assert p.frames == 3 and not p.failed and sum(p.tiles_per_device.values()) == 3 * len(plan.tiles)
    assert p.latency_s == sorted(simulate(plan, devs, frames=3).latency_s)[1]


def test_auto_plan_prefers_splitting_on_equal_devices_and_one_device_when_one_dominates() -> None:
    m = small_net()
    x = torch.randn(1, 3, 96, 96)
    table = profiles()
    plan, choice = choose_plan(m, x, parse_spec("pi3*4", table), mode="latency")
    assert sum(len(s.tiles) for s in plan.stages) > 1
    assert choice.best.prediction is not None and math.isfinite(choice.best.prediction.latency_s)
    assert "chosen" in choice.summary()
    # a GPU server next to Raspberry Pis: giving it everything beats splitting
    plan, choice = choose_plan(m, x, parse_spec("pi3*2,gpu-server", table), mode="latency")
    assert choice.best.prediction.tiles_per_device["gpu-server-0"] == 3 * sum(len(s.tiles) for s in plan.stages)


def test_downsampling_boundaries() -> None:
    part = tiling.Partitioner(small_net(), torch.randn(1, 3, 32, 32))
    assert downsampling_boundaries(part) == [2, 4]


def test_device_info_from_profile() -> None:
    (d,) = parse_spec("pi3", profiles())
    info = d.info()
    assert isinstance(info, DeviceInfo) and info.gflops == 4 and info.memory_bytes == d.profile.usable_bytes
    assert DeviceSpec("x", d.profile).info().id == "x"


def test_profile_from_labels_uses_measured_figures_and_ignores_bad_ones() -> None:
    from fleet.runtime.nodes import profile_from_labels
    from sims.profile_files import profiles

    table = profiles()
    p = profile_from_labels({"tilefleet/class": "pi4", "tilefleet/gflops": "9.5",
                             "tilefleet/tile_overhead_ms": "2.5", "tilefleet/memory_mb": "1024",
                             "tilefleet/link_mbps": "20", "tilefleet/latency_ms": "4", "tilefleet/gpu": "0"},
                            table)
    assert (p.name, p.gflops, p.tile_overhead_s, p.memory_bytes, p.link_mbps, p.latency_s, p.gpu, p.emulated) == (
        "pi4", 9.5, 0.0025, 1024 * 2**20, 20.0, 0.004, False, False)
    bad = profile_from_labels({"tilefleet/class": "pi4", "tilefleet/gflops": "fast", "tilefleet/link_mbps": "-3"},
                              table)
    assert (bad.gflops, bad.link_mbps, bad.emulated) == (table["pi4"].gflops, table["pi4"].link_mbps, False)
    unknown = profile_from_labels({"tilefleet/class": "no-such-class"}, table)
    assert unknown.name == "host" and not unknown.emulated


def test_near_tie_goes_to_the_plan_with_fewer_tiles() -> None:
    from fleet.runtime.planner import NEAR_TIE, PlanCandidate, _within
    from sims.predict import Prediction

    assert _within(-3.93, -3.99, NEAR_TIE) and not _within(-3.80, -3.99, NEAR_TIE)  # fps scores are negative
    assert _within(1.02, 1.0, NEAR_TIE) and not _within(1.05, 1.0, NEAR_TIE)
    # on two equal real devices, throughput mode gives each whole frames (1x1), not a reuse grid
    m, x = small_net(), torch.randn(1, 3, 96, 96)
    plan, choice = choose_plan(m, x, parse_spec("pi4*2", profiles()), mode="throughput")
    assert [s.grid for s in plan.stages] == [(1, 1)], choice.summary()
    assert isinstance(choice.best, PlanCandidate) and isinstance(choice.predicted, Prediction)


@pytest.mark.parametrize("name,size,grid,reuse", [
    ("yolov2-16", 96, (3, 3), False), ("yolov2-16", 80, (2, 2), True), ("resnet18", 64, (2, 2), False),
    ("mobilenetv2", 96, (2, 3), False), ("vgg16", 96, (3, 2), True), ("yolov2", 96, (2, 2), False)])
def test_channels_last_executor_matches_nchw(name: str, size: int, grid: tuple[int, int], reuse: bool) -> None:
    """Workers compute in NHWC (faster on CPU); every tile equals the NCHW reference within 1e-5."""
    from tiling import zoo

    zm = zoo.get(name, input_size=size)
    x = zoo.example(zm)
    plan = tiling.partition(zm.model, x, grid=grid, reuse=reuse)
    st = plan.stages[0]
    fast, ref = TileExecutor(threads=1), TileExecutor(threads=1, channels_last=False)
    assert fast.channels_last and not ref.channels_last
    for ex in (fast, ref):
        ex.load("d", {st.index: st.program})
    xn = x.numpy()
    exports: dict[int, list[np.ndarray]] = {}
    for t in sorted(st.tiles, key=lambda t: (t.group, t.index)):  # reuse: producers before consumers
        b = t.in_box
        pieces: dict[str, list] = {}
        for p in t.geometry.pieces_in:
            src = st.tiles[p.src]
            pieces.setdefault(p.node, []).append((p.box, exports[p.src][src.geometry.pieces_out.index(p)]))
        got = [ex.run("d", st.index, t.geometry, {plan.input_name: xn[:, :, b.h0:b.h1, b.w0:b.w1]}, pieces)
               for ex in (fast, ref)]
        assert all(isinstance(r, TileResult) for r in got), got
        exports[t.index] = got[1].exports
        for o in got[1].outputs:
            a, e = torch.from_numpy(got[0].outputs[o]), torch.from_numpy(got[1].outputs[o])
            assert got[0].outputs[o].flags["C_CONTIGUOUS"]
            assert tiling.rel_error(a, e) <= 1e-5, (name, t.index, o)
