"""``fleet.connect(address)``: an existing multi-node Ray cluster whose nodes describe themselves by labels.

Uses ``ray.cluster_utils.Cluster`` (a real head and real worker raylets on this machine): stage
outputs cross nodes worker to worker, and a killed node's work is re-run elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

import fleet
import tiling
from tiling import zoo

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                           "health_check_failure_threshold": 3}})
    nodes = [c.add_node(num_cpus=1, labels={"tilefleet/class": "pi4", "tilefleet/name": f"node{i}"})
             for i in range(3)]
    c.wait_for_nodes()
    c.nodes_added = nodes  # type: ignore[attr-defined]
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def test_existing_cluster_devices_and_exact_results(ray_cluster: object) -> None:
    zm = zoo.get("yolov2-16", input_size=96)
    x = zoo.example(zm)
    with fleet.connect(ray_cluster.address) as c:  # type: ignore[attr-defined]
        devs = c.devices()
        assert len(devs) == 3 and {d["class"] for d in devs} == {"pi4"}
        assert all(d["id"].startswith("node") for d in devs)
        dep = c.deploy(zm.model, x, stages=[8], grids=[(3, 3), (2, 2)])
        frames = [torch.randn_like(x) for _ in range(4)]
        for f, y in zip(frames, dep.stream(frames)):
            assert tiling.rel_error(y, zm.model(f)) <= 1e-4
        st = dep.stats()
        assert sum(1 for d in st["devices"].values() if d["tiles"] > 0) == 3  # every node computed tiles
        # the per-node counts `tilefleet devices` shows: published to the cluster's KV by the driver
        from ray.experimental import internal_kv

        from fleet.runtime.raytransport import KV_NAMESPACE, TILES_KEY

        total = sum(d["tiles"] for d in st["devices"].values())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            keys = internal_kv._internal_kv_list(TILES_KEY, namespace=KV_NAMESPACE)
            published = sum(int(internal_kv._internal_kv_get(k, namespace=KV_NAMESPACE)) for k in keys)
            if published >= total:
                break
            time.sleep(0.2)
        assert len(keys) == 3 and published >= total


def test_node_death_and_join_mid_stream(ray_cluster: object) -> None:
    """A node dies mid-stream taking stored stage outputs with it: no frame is lost (producers
    re-run). A node that joins mid-stream gets the weights and starts receiving tiles."""
    c = ray_cluster
    zm = zoo.get("yolov2-16", input_size=96)
    x = zoo.example(zm)
    victim = c.add_node(num_cpus=1, labels={"tilefleet/class": "pi4", "tilefleet/name": "victim"})
    c.wait_for_nodes()
    frames = [torch.randn_like(x) for _ in range(30)]
    refs = [zm.model(f) for f in frames]
    with fleet.connect(c.address) as cl:  # type: ignore[attr-defined]
        assert len(cl.devices()) == 4
        dep = cl.deploy(zm.model, x, stages=[8], grids=[(2, 2), (2, 2)])
        outs = []
        newcomer = None
        for i, y in enumerate(dep.stream(frames, in_flight=3)):
            outs.append(y)
            if i == 5:
                c.remove_node(victim, allow_graceful=False)  # type: ignore[attr-defined]
            if i == 12:
                newcomer = c.add_node(num_cpus=1, labels={"tilefleet/class": "pi4", "tilefleet/name": "late"})
            if i == 20:  # wait until the newcomer is a device (worker up, weights loaded), then go on
                deadline = time.monotonic() + 90
                while not any(d["id"].startswith("late") and d["state"] == "alive" for d in cl.devices()):
                    assert time.monotonic() < deadline, cl.devices()
                    time.sleep(0.2)
        assert newcomer is not None and len(outs) == len(frames)
        assert max(tiling.rel_error(y, r) for y, r in zip(outs, refs)) <= 1e-4
        # the stream may end before the node watch sees the dead node (if no tile was sent there since):
        # wait for it, as a user's dashboard would, instead of racing it
        deadline = time.monotonic() + 90
        while (states := {d["id"].split("-")[0]: d["state"] for d in cl.devices()})["victim"] != "lost":
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        assert states["late"] == "alive"
        st = dep.stats()
        late = [v for k, v in st["devices"].items() if k.startswith("late")]
        assert late and late[0]["tiles"] > 0, st["devices"]
    c.remove_node(newcomer)  # type: ignore[attr-defined]
