"""The runtime on a real local Ray instance with emulated devices (one instance for the module)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import fleet
import tiling
from tiling import zoo

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[fleet.Cluster]:
    # a fast profile mix so the emulated clock keeps the tests short; 'pi3' keeps a slow device in it
    with fleet.connect(emulate="pi3,pi4*2,laptop", max_in_flight=2) as c:
        yield c


@pytest.fixture(scope="module")
def yolo() -> tuple[nn.Module, torch.Tensor]:
    zm = zoo.get("yolov2-16", input_size=96)
    return zm.model, zoo.example(zm)


def test_devices_listed(cluster: fleet.Cluster) -> None:
    devs = cluster.devices()
    assert [d["id"] for d in devs] == ["pi3-0", "pi4-0", "pi4-1", "laptop-0"]
    assert all(d["state"] == "alive" and d["emulated"] for d in devs)
    assert devs[0]["gflops"] == 4 and devs[0]["link_mbps"] == 40


@pytest.mark.parametrize("kw", [
    dict(grid=(3, 3)),
    dict(grid=(2, 3), reuse=True),
    dict(stages=[4, 8], grids=[(3, 3), (2, 2), (2, 1)]),
    dict(grid=(1, 4), col_weights=[1, 3, 3, 10]),
])
def test_results_equal_untiled(cluster: fleet.Cluster, yolo: tuple[nn.Module, torch.Tensor], kw: dict) -> None:
    model, x = yolo
    dep = cluster.deploy(model, x, **kw)
    try:
        ref = model(x)
        assert tiling.rel_error(dep(x), ref) <= 1e-4
        batch = torch.cat([x, torch.randn_like(x)])
        assert tiling.rel_error(dep(batch), model(batch)) <= 1e-4
        # a (C, H, W) frame gives a result without the batch dimension
        single = dep(x[0])
        assert single.shape == ref.shape[1:]
    finally:
        dep.close()


def test_models_with_tails(cluster: fleet.Cluster) -> None:
    for name, size, grid in [("resnet18", 64, (2, 2)), ("mobilenetv2", 64, (2, 2)), ("yolov2", 128, (2, 2))]:
        zm = zoo.get(name, input_size=size)
        x = zoo.example(zm)
        dep = cluster.deploy(zm.model, x, grid=grid)
        try:
            assert not dep.plan.tail.empty
            assert tiling.rel_error(dep(x), zm.model(x)) <= 1e-4, name
        finally:
            dep.close()


def test_stream_in_order_and_futures(cluster: fleet.Cluster, yolo: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    frames = [torch.randn_like(x) for _ in range(8)]
    dep = cluster.deploy(model, x, grid=(2, 2))
    try:
        outs = list(dep.stream(frames, in_flight=4))
        for f, y in zip(frames, outs):
            assert tiling.rel_error(y, model(f)) <= 1e-4
        fut = dep.submit(frames[0])
        assert tiling.rel_error(fut.result(timeout=60), model(frames[0])) <= 1e-4
        st = dep.stats()
        assert st["frames"]["count"] == 9 and st["frames"]["p50_ms"] > 0
        assert sum(d["tiles"] for d in st["devices"].values()) == 9 * 4
        # every device computed something, and the laptop (15x a pi3) more than the pi3
        tiles = {k: v["tiles"] for k, v in st["devices"].items()}
        assert tiles["laptop-0"] > tiles["pi3-0"]
    finally:
        dep.close()


def test_bad_frames_are_refused_and_serving_continues(cluster: fleet.Cluster,
                                                      yolo: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(2, 2))
    try:
        with pytest.raises(tiling.InputMismatch, match="partition again"):
            dep(torch.randn(1, 3, 64, 64))
        with pytest.raises(tiling.InputMismatch, match="dtype"):
            dep(x.to(torch.int32))
        assert tiling.rel_error(dep(x.double()), model(x)) <= 1e-4  # float64 (and float16) frames are converted
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(tiling.InputMismatch, match="NaN"):
            dep(bad)
        with pytest.raises(tiling.InputMismatch, match="torch tensors"):
            dep([1, 2, 3])  # type: ignore[arg-type]
        assert tiling.rel_error(dep(x), model(x)) <= 1e-4
    finally:
        dep.close()
    with pytest.raises(fleet.ClusterClosed):
        dep(x)


def test_trace_and_summary(cluster: fleet.Cluster, yolo: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(2, 2))
    try:
        dep(x)
        p = dep.trace(tmp_path / "frame.json")
        data = json.loads(p.read_text())
        lanes = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
        assert {"rx", "compute", "tx"} <= lanes
        assert any(e["ph"] == "X" and e["dur"] > 0 for e in data["traceEvents"])
        assert "redundancy" in dep.plan_summary()
    finally:
        dep.close()


def test_failed_device_loses_no_frame() -> None:
    zm = zoo.get("yolov2-16", input_size=96)
    x = zoo.example(zm)
    with fleet.connect(emulate="pi4*3") as c:
        dep = c.deploy(zm.model, x, grid=(3, 3))
        frames = [torch.randn_like(x) for _ in range(10)]
        futs = [dep.submit(f) for f in frames[:5]]
        sched = c.driver.core.sched
        deadline = time.monotonic() + 60  # wait until pi4-1 holds a tile, then crash it
        while not c.driver.call(lambda: sched.in_flight("pi4-1")) and time.monotonic() < deadline:
            time.sleep(0.005)
        held = c.driver.call(lambda: sched.in_flight("pi4-1"))
        assert held, "pi4-1 never had a tile in flight"
        c.fail("pi4-1")
        futs += [dep.submit(f) for f in frames[5:]]
        outs = [f.result(timeout=120) for f in futs]
        for f, y in zip(frames, outs):
            assert tiling.rel_error(y, zm.model(f)) <= 1e-4
        st = dep.stats()
        assert st["devices"]["pi4-1"]["alive"] is False
        # what it held when it died ran elsewhere (or its result, if it came back first, was kept)
        assert c.driver.call(lambda: sched.stats()["pi4-1"].requeued) >= 1 or all(
            c.driver.call(lambda: sched.accepted(k)) == "pi4-1" for k in held)
        assert sum(d["tiles"] for d in st["devices"].values()) == 10 * 9
        detected = c.detection_times()["pi4-1"]
        assert detected is not None and detected < 30
        assert [d["state"] for d in c.devices()] == ["alive", "lost", "alive"]


def test_frame_that_fits_no_device_fails_clearly_and_closed_cluster_refuses() -> None:
    zm = zoo.get("yolov2-16", input_size=320)
    x = zoo.example(zm)
    with fleet.connect(emulate="pi3-24m*2") as c:
        dep = c.deploy(zm.model, x, grid=(1, 1))  # 13.1 MiB of weights + a 15.6 MiB tile > 24 MiB
        with pytest.raises(fleet.FrameFailed, match="needs .* bytes"):
            dep(x)
        small = c.deploy(zm.model, x, grid=(4, 4))  # the same model in small tiles fits and runs
        assert tiling.rel_error(small(x), zm.model(x)) <= 1e-4
        assert small.stats()["devices"]["pi3-24m-0"]["peak_bytes"] <= 24 * 2**20
    with pytest.raises(fleet.ClusterClosed, match="connect"):
        c.deploy(zm.model, x, grid=(2, 2))


@pytest.mark.parametrize("name", ["efficientnet-b0", "gc-resnet", "shufflenetv2"])
def test_real_architectures_with_reduce_points_run_distributed(cluster: fleet.Cluster, name: str) -> None:
    """SE and global-context blocks run tiled across devices: every tile sends its partial, every
    continuation combines them in tile order, and the result equals the untiled model."""
    import archs

    model, x = archs.build(name)
    dep = cluster.deploy(model, x, grid=(2, 2))
    try:
        assert dep.plan.reduce_points or name == "shufflenetv2"
        assert tiling.rel_error(dep(x), model(x)) <= 1e-4
        batch = torch.cat([x, torch.randn_like(x)])
        assert tiling.rel_error(dep(batch), model(batch)) <= 1e-4
        red = dep.stats()["frames"]["reduce"]
        if dep.plan.reduce_points:
            # continuations run where their maps are: no map crosses, only partials (a few KB a tile)
            assert red["continued_tiles"] > 0 and red["map_bytes_moved"] == 0, red
            assert 0 < red["max_partial_bytes_per_tile"] <= 16 * 1024, red
    finally:
        dep.close()


def test_uint8_frames_cross_as_bytes_and_are_normalised_on_the_devices(
        cluster: fleet.Cluster, yolo: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    frame = torch.randint(0, 256, x.shape[1:], dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pre = tiling.Preprocess.parse("imagenet")
    dep8 = cluster.deploy(model, frame, grid=(2, 2), preprocess="imagenet")
    dep32 = cluster.deploy(model, pre.apply_float(frame[None]), grid=(2, 2))
    try:
        want = model(pre.apply_float(frame[None]))
        assert tiling.rel_error(dep8(frame[None]), want) <= 1e-4
        hwc = cluster.deploy(model, frame.permute(1, 2, 0), grid=(2, 2), preprocess="imagenet,layout=hwc")
        assert tiling.rel_error(hwc(frame.permute(1, 2, 0)), want[0]) <= 1e-4  # one HWC frame, camera-style
        hwc.close()
        dep32(pre.apply_float(frame[None]))
        first8 = sum(t.in_bytes for t in dep8.plan.stages[0].tiles)
        first32 = sum(t.in_bytes for t in dep32.plan.stages[0].tiles)
        assert first8 * 4 == first32  # the frame's crops cross at a quarter of float32
        with pytest.raises(tiling.InputMismatch, match="uint8 frames need a declared preprocessing"):
            dep32(frame[None])
        with pytest.raises(tiling.InputMismatch, match="raw uint8 frames"):
            dep8(x)
        assert tiling.rel_error(dep32(pre.apply_float(frame[None]).double()), want) <= 1e-4  # float64 converted
    finally:
        dep8.close()
        dep32.close()


def test_a_slowed_device_stays_exact_and_is_stolen_from(cluster: fleet.Cluster,
                                                        yolo: tuple[nn.Module, torch.Tensor]) -> None:
    """cluster.slow makes an emulated device slower mid-run, as heat would; frames stay exact and the
    slow device ends up with less of the work than it would get at its profile's speed."""
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(3, 3))
    try:
        dep(x)
        dep.reset_stats()
        cluster.slow("pi4-0", 20.0)
        frames = [torch.randn_like(x) for _ in range(4)]
        outs = list(dep.stream(frames, in_flight=2))
        assert max(tiling.rel_error(y, model(f)) for y, f in zip(outs, frames)) <= 1e-4
        tiles = {d: s["tiles"] for d, s in dep.stats()["devices"].items()}
        assert tiles["pi4-0"] < tiles["pi4-1"], tiles
        with pytest.raises(KeyError):
            cluster.slow("nosuch-0", 2.0)
    finally:
        cluster.slow("pi4-0", 1.0)
        dep.close()


def test_a_cancelled_frame_stops_and_the_next_frames_are_exact(cluster: fleet.Cluster,
                                                              yolo: tuple[nn.Module, torch.Tensor]) -> None:
    """Deployment.cancel gives up a frame in flight: its future fails with the reason, none of its
    tiles is accepted (the stats count only the other frames'), and the frames after it are exact.
    Future.cancel() does the same for a (C, H, W) frame's future."""
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(3, 3))
    try:
        dep(x)
        dep.reset_stats()
        frames = [torch.randn_like(x) for _ in range(3)]
        doomed = dep.submit(frames[0])
        rest = [dep.submit(f) for f in frames[1:]]
        assert dep.cancel(doomed, "cancelled: the client went away")
        with pytest.raises(fleet.FrameCancelledError, match="the client went away"):
            doomed.result(timeout=60)
        for f, fut in zip(frames[1:], rest):
            assert tiling.rel_error(fut.result(timeout=60), model(f)) <= 1e-4
        assert not dep.cancel(rest[0])  # done already
        single = dep.submit(frames[1][0])
        assert single.cancel() and single.cancelled()
        assert tiling.rel_error(dep(frames[2]), model(frames[2])) <= 1e-4
        st = dep.stats()
        assert st["frames"]["count"] == 3 and st["frames"]["cancelled"] == 2, st["frames"]
        assert sum(d["tiles"] for d in st["devices"].values()) == 3 * 9  # the cancelled frames' tiles: none
    finally:
        dep.close()
