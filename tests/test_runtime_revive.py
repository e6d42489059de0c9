"""Devices that come back: ``cluster.revive(id)`` after ``cluster.fail(id)`` (one Ray instance for the module).

The tests share one cluster and run in order: the first kills and revives one device, the second
kills every device and revives them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fleet
import tiling
from tiling import zoo

pytestmark = pytest.mark.ray
IDS = ["pi4-0", "pi4-1", "pi4-2"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[fleet.Cluster]:
    with fleet.connect(emulate="pi4*3", max_in_flight=2) as c:
        yield c


@pytest.fixture(scope="module")
def yolo() -> tuple[nn.Module, torch.Tensor]:
    zm = zoo.get("yolov2-16", input_size=96)
    return zm.model, zoo.example(zm)


def _state(cluster: fleet.Cluster) -> dict[str, tuple[str, int]]:
    return {d["id"]: (d["state"], d["pid"]) for d in cluster.devices()}


def test_a_failed_device_comes_back_and_takes_tiles_again(cluster: fleet.Cluster,
                                                          yolo: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(3, 3))
    frames = [torch.randn_like(x) for _ in range(4)]
    with torch.no_grad():
        refs = [model(f) for f in frames]
    old_pid = _state(cluster)["pi4-1"][1]
    with pytest.raises(ValueError, match="alive"):
        cluster.revive("pi4-1")
    with pytest.raises(KeyError, match="no device 'pi9-0'"):
        cluster.revive("pi9-0")

    # mid-stream: frames in flight when it dies, more sent after; every one completes, exactly
    futs = [dep.submit(frames[i % 4]) for i in range(6)]
    futs[0].result(timeout=60)
    cluster.fail("pi4-1")
    futs += [dep.submit(frames[i % 4]) for i in range(6, 12)]
    assert max(tiling.rel_error(f.result(timeout=120), refs[i % 4]) for i, f in enumerate(futs)) <= 1e-4

    before = dep.stats()["devices"]["pi4-1"]["tiles"]
    took = cluster.revive("pi4-1")
    state, pid = _state(cluster)["pi4-1"]
    assert state == "alive" and pid != old_pid and took < 60
    # the same deployment, never re-created: the revived worker loaded its weights and gets tiles
    # again (counted from its accepted results; bounded by frames, not by time)
    for i in range(50):
        outs = list(dep.stream(frames, in_flight=4))
        assert max(tiling.rel_error(y, r) for y, r in zip(outs, refs)) <= 1e-4
        if dep.stats()["devices"]["pi4-1"]["tiles"] > before:
            break
    else:
        pytest.fail(f"the revived device took no tile in 200 frames: {dep.stats()['devices']}")
    assert dep.stats()["devices"]["pi4-1"]["alive"] is True

    # revived at once, perhaps before the driver noticed the kill: it is lost first, then comes back
    futs = [dep.submit(frames[i % 4]) for i in range(6)]
    cluster.fail("pi4-0")
    cluster.revive("pi4-0")
    futs += [dep.submit(frames[i % 4]) for i in range(6, 12)]
    assert max(tiling.rel_error(f.result(timeout=120), refs[i % 4]) for i, f in enumerate(futs)) <= 1e-4
    assert {s for s, _ in _state(cluster).values()} == {"alive"}
    dep.close()


def test_every_device_dies_fails_fast_and_one_revived_serves_again(cluster: fleet.Cluster,
                                                                   yolo: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = yolo
    dep = cluster.deploy(model, x, grid=(2, 2))
    assert tiling.rel_error(dep(x), model(x)) <= 1e-4
    for d in IDS:
        cluster.slow(d, 20.0)  # frames take long enough to be surely in flight when the devices die
    futs = [dep.submit(torch.randn_like(x)) for _ in range(4)]
    for d in IDS:
        cluster.fail(d)
    t0 = time.monotonic()
    for f in futs:
        with pytest.raises(fleet.FrameFailed, match="every device is lost: pi4-0, pi4-1, pi4-2") as e:
            f.result(timeout=30)
        assert "revive" in str(e.value)
    assert time.monotonic() - t0 < 10
    # a new frame fails at once instead of waiting for a device
    t0 = time.monotonic()
    with pytest.raises(fleet.FrameFailed, match="no alive device .*every device is lost"):
        dep(x, timeout=10)
    assert time.monotonic() - t0 < 3
    assert {s for s, _ in _state(cluster).values()} == {"lost"}

    cluster.revive("pi4-2")  # comes back at its profile's speed, as a rebooted device would
    assert tiling.rel_error(dep(x, timeout=60), model(x)) <= 1e-4
    assert dep.stats()["devices"]["pi4-2"]["tiles"] > 0
    for d in ("pi4-0", "pi4-1"):
        cluster.revive(d)
    assert {s for s, _ in _state(cluster).values()} == {"alive"}
    outs = list(dep.stream([x] * 6, in_flight=3))
    assert max(tiling.rel_error(y, model(x)) for y in outs) <= 1e-4
    dep.close()
