"""Where a cluster's devices come from, and how its membership is followed.

- Local devices: one ``TileWorker`` per device on this machine, emulated or not
  (:func:`start_local_devices`), optionally each on a Ray node of its own (:class:`LocalNodes`).
- An existing cluster: one worker per node that offers CPUs, its profile from the labels
  ``tilefleet join`` sets (:func:`profile_from_labels`), and a watch of ``ray.nodes()`` that turns a
  dead node into a lost device and a new node into a new one (:class:`NodeWatcher`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from sims.catalog import DeviceSpec, Profile, ProfileError, host_profile
from sims.emulation import Emulation
from sims.speed import clock_scale

from .driver import Device
from .loop import DriverThread

log = logging.getLogger("tilefleet.nodes")
HOST_DERATE = 0.5


class LocalNodes:
    """One Ray node per local device on this machine (``connect(..., nodes=True)``).

    Built on ``ray.cluster_utils.Cluster``: a head that offers no CPUs (the driver's node) and a
    worker raylet with its own object store per device. Killing a device kills its node's
    processes with SIGKILL, as a machine's crash would.
    """

    def __init__(self, specs: Sequence[DeviceSpec], threads: int) -> None:
        import ray
        from ray.cluster_utils import Cluster as RayCluster

        if ray.is_initialized():
            raise RuntimeError("nodes=True starts its own Ray cluster; call ray.shutdown() first")
        store = 96 * 2**20
        self.rc = RayCluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": store,
            "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                               "health_check_failure_threshold": 3}})
        self.nodes: dict[str, Any] = {}
        try:
            for spec in specs:
                self.nodes[spec.id] = self.rc.add_node(num_cpus=threads, object_store_memory=store,
                                                       labels={"tilefleet/device": spec.id})
            self.rc.wait_for_nodes()
        except BaseException:
            self.rc.shutdown()
            raise
        self.address = self.rc.address
        self.node_ids = {did: node.node_id for did, node in self.nodes.items()}

    def kill(self, device_id: str) -> None:
        self.rc.remove_node(self.nodes[device_id], allow_graceful=False)

    def shutdown(self) -> None:
        self.rc.shutdown()


def start_local_devices(specs: Sequence[DeviceSpec], host_gflops: float, scale: float | None,
                         threads: int, node_ids: dict[str, str] | None = None) -> dict[str, Device]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.actor import TileWorker

    emulated = [s.profile for s in specs if s.profile.emulated]
    # the conv micro-benchmark flatters the host, and several emulated devices share its cores: count
    # on half of it (a laptop profile then runs at s of about 2.7 here, far from late results)
    s = scale if scale is not None else (clock_scale(emulated, HOST_DERATE * host_gflops) if emulated else 1.0)
    actors = {}
    for spec in specs:
        emu = None
        if spec.profile.emulated:
            emu = Emulation(spec.profile, s)
        opts: dict[str, Any] = {"num_cpus": 0 if emu else threads}
        if node_ids is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_ids[spec.id], soft=False)
        actors[spec.id] = TileWorker.options(**opts).remote(spec.id, threads, emu)
    infos = ray.get([a.info.remote() for a in actors.values()], timeout=120)
    out: dict[str, Device] = {}
    for spec, info in zip(specs, infos):
        out[spec.id] = Device(spec.info(), actors[spec.id], info["pid"], info["node_id"], profile=spec.profile,
                              scale=s)
    return out


def profile_from_labels(labels: dict[str, str], table: dict[str, Profile]) -> Profile:
    """A device's profile from the node labels ``tilefleet join`` sets (measured on the device).

    Missing labels fall back to the catalog entry of ``tilefleet/class`` (or ``host``); malformed
    ones are ignored with a warning, so one badly labelled node cannot stop a deployment.
    """
    base = table.get(labels.get("tilefleet/class", "host"), host_profile())
    changes: dict[str, Any] = {"emulated": False, "source": LABEL_SOURCE}
    for label, field_name, factor in _LABEL_FIELDS:
        raw = labels.get(label)
        if raw is None:
            continue
        try:
            v = float(raw)
            if not v >= 0 or v == float("inf"):
                raise ValueError(raw)
        except ValueError:
            log.warning("node label %s=%r is not a number >= 0; using the catalog's figure", label, raw)
            continue
        changes[field_name] = int(v * factor) if field_name == "memory_bytes" else v * factor
    if "tilefleet/gpu" in labels:
        changes["gpu"] = labels["tilefleet/gpu"] in ("1", "true", "yes")
    try:
        return dataclasses.replace(base, **changes)
    except ProfileError as e:
        log.warning("node labels give an invalid profile (%s); using the catalog's %s", e, base.name)
        return dataclasses.replace(base, emulated=False, source=LABEL_SOURCE)


LABEL_SOURCE = "measured on the device by `tilefleet join` (node labels)"
# node label -> Profile field, and the factor from the label's unit to the field's
_LABEL_FIELDS = (("tilefleet/gflops", "gflops", 1.0), ("tilefleet/tile_overhead_ms", "tile_overhead_s", 1e-3),
                 ("tilefleet/memory_mb", "memory_bytes", 2**20), ("tilefleet/link_mbps", "link_mbps", 1.0),
                 ("tilefleet/latency_ms", "latency_s", 1e-3))


def node_device(node: dict[str, Any], table: dict[str, Profile]) -> tuple[str, Profile, Any] | None:
    """Start a tile worker on a Ray node that offers CPUs: (device id, profile, actor); None otherwise."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.actor import TileWorker

    cpus = node.get("Resources", {}).get("CPU", 0)
    if not node.get("Alive") or cpus < 1:
        return None
    labels = node.get("Labels", {}) or {}
    prof = profile_from_labels(labels, table)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", labels.get("tilefleet/name", node["NodeManagerHostname"]))[:40]
    did = f"{name}-{node['NodeID'][:6]}"
    try:
        wanted = int(float(labels.get("tilefleet/threads", 1) or 1))
    except ValueError:
        wanted = 1
    threads = max(1, min(int(cpus), wanted))
    actor = TileWorker.options(num_cpus=threads, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(did, threads, None)
    return did, prof, actor


def discover_devices(table: dict[str, Profile]) -> dict[str, Device]:
    """Devices of an existing cluster: one worker per alive node with CPUs, described by its labels."""
    import ray

    pending = [d for d in (node_device(n, table) for n in ray.nodes()) if d is not None]
    if not pending:
        raise RuntimeError("the Ray cluster has no alive node with CPUs to run tiles on; "
                           "join devices with `tilefleet join` (see `tilefleet devices`)")
    infos = ray.get([a.info.remote() for _, _, a in pending], timeout=120)
    return {did: Device(DeviceSpec(did, prof).info(), actor, info["pid"], info["node_id"], profile=prof)
            for (did, prof, actor), info in zip(pending, infos)}


RETRY_JOIN_S = 30.0  # a node whose worker failed to start is tried again after this long


class NodeWatcher:
    """Follows an existing cluster's membership: a node that dies loses its device (and the results
    stored there), a node that joins gets a worker, every deployment's weights, and work.

    It talks to the driver only through its public, thread-safe calls (``call``, ``device_lost``),
    never through its structures."""

    def __init__(self, driver: DriverThread, table: dict[str, Profile], period_s: float = 1.0) -> None:
        self.driver, self.table, self.period_s = driver, table, period_s
        self._gave_up: dict[str, float] = {}  # node id -> when its worker last failed to start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tilefleet-nodes", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import ray

        while not self.stop.wait(self.period_s):
            try:
                self._check(ray.nodes())
            except Exception as e:  # noqa: BLE001 - a GCS hiccup must not end the watch
                log.warning("could not read the cluster's nodes: %s", e)

    def _check(self, nodes: list[dict[str, Any]]) -> None:
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        core = self.driver.core
        devices = self.driver.call(lambda: [(d, dev.node_id, dev.alive) for d, dev in core.devices.items()])
        for did, node_id, dev_alive in devices:
            if dev_alive and node_id not in alive:
                self.driver.device_lost(did, "its Ray node died", results_lost=True)
        known = {node_id for _, node_id, _ in devices}
        for node in nodes:
            nid = node["NodeID"]
            if nid in alive and nid not in known and time.monotonic() - self._gave_up.get(nid, -RETRY_JOIN_S) >= RETRY_JOIN_S:
                self._add(node)

    def _add(self, node: dict[str, Any]) -> None:
        import ray

        made = node_device(node, self.table)
        if made is None:
            return
        did, prof, actor = made
        try:
            info = ray.get(actor.info.remote(), timeout=60)
            dev = Device(DeviceSpec(did, prof).info(), actor, info["pid"], info["node_id"], profile=prof)
            register_device(self.driver, did, dev)
        except Exception as e:  # noqa: BLE001 - it may join again later
            log.warning("node %s joined but its worker did not start (trying again in %.0f s): %s",
                        node["NodeID"][:8], RETRY_JOIN_S, e)
            self._gave_up[node["NodeID"]] = time.monotonic()
            ray.kill(actor)
            return
        log.info("device %s joined (%s, %.1f GFLOP/s)", did, prof.name, prof.gflops)


def register_device(driver: DriverThread, device_id: str, dev: Device, timeout_s: float = 300.0) -> None:
    """Give a newcomer (a joined node's worker, a revived device) to the driver: every open
    deployment's weights are loaded onto its worker first (from the references shipped at deploy
    time), then it takes work. A deployment made or closed while the weights travel is caught up
    before it joins: the check and the registration are one job on the driver thread."""
    import ray

    core = driver.core
    loaded: set[str] = set()

    def join_if_current() -> dict[str, Any] | None:
        current = {d.id: d.shipped for d in core.deployments.values()}
        if set(current) != loaded:
            return current
        core.add_device(device_id, dev)
        return None

    while (current := driver.call(join_if_current)) is not None:
        ray.get([dev.actor.load.remote(dep_id, *refs) for dep_id, refs in current.items() if dep_id not in loaded],
                timeout=timeout_s)
        for gone in loaded - set(current):
            dev.actor.unload.remote(gone)
        loaded = set(current)
