"""``connect(emulate=..., nodes=True)``: every emulated device is its own Ray node on this machine.

Stage outputs then live in the producing node's object store, as on a LAN, and ``fail()`` kills
the whole node with SIGKILL: outputs stored there are lost and the scheduler re-runs the ones
still needed.
"""

from __future__ import annotations

import time

import pytest
import torch

import fleet
import tiling
from tiling import zoo

pytestmark = pytest.mark.ray


def test_each_device_a_node_and_a_node_crash_loses_no_frame() -> None:
    import ray

    zm = zoo.get("yolov2-16", input_size=96)
    x = zoo.example(zm)
    frames = [torch.randn_like(x) for _ in range(12)]
    refs = [zm.model(f) for f in frames]
    with fleet.connect(emulate="pi4*3", nodes=True) as c:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 4  # the driver's head (no CPUs) and one node per device
        assert len({d.node_id for d in c.driver.core.devices.values()}) == 3
        dep = c.deploy(zm.model, x, stages=[8], grids=[(2, 2), (2, 2)])
        outs = []
        for i, y in enumerate(dep.stream(frames, in_flight=3)):
            outs.append(y)
            if i == 3:
                c.fail("pi4-1")
        assert max(tiling.rel_error(y, r) for y, r in zip(outs, refs)) <= 1e-4
        deadline = time.monotonic() + 10  # the stream may end before Ray declares the node dead
        while time.monotonic() < deadline and c.detection_times()["pi4-1"] is None:
            time.sleep(0.1)
        assert [d["state"] for d in c.devices()] == ["alive", "lost", "alive"]
        detected = c.detection_times()["pi4-1"]
        assert detected is not None and detected < 30
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3  # the node really is gone
