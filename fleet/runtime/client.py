"""The Python client: connect to a cluster, deploy a model, submit frames.

    with fleet.connect(emulate="pi3*4") as cluster:
        dep = cluster.deploy(model, example, grid=(5, 5))
        y = dep(x)                      # equals model(x)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import itertools
import logging
import os
import signal
import time
from typing import Any

import torch
from torch import nn

import tiling
from sims.catalog import DeviceSpec, Profile, host_profile, parse_spec
from sims.profile_files import profiles
from sims.speed import measure_host_gflops

from .calibrate import calibrate, this_host
from .deployment import ClusterClosed, Deployment, DeploymentState, new_deployment_id
from .driver import Device, Driver, FrameFailed
from .loop import DriverThread, RealClock
from .nodes import LocalNodes, NodeWatcher, discover_devices, register_device, start_local_devices
from .raytransport import RayTransport

__all__ = ["Cluster", "ClusterClosed", "Deployment", "FrameFailed", "connect"]

log = logging.getLogger("tilefleet.client")
_deployment_ids = itertools.count()


def _ray_init(address: str | None, num_cpus: int | None, node_ip: str | None = None) -> bool:
    """Start or join Ray; returns whether we started it (and so must shut it down)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20, configure_logging=False,
                 _system_config={"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                                 "health_check_failure_threshold": 3})
        return True
    ray.init(address=address, log_to_driver=False, configure_logging=False,
             **({"_node_ip_address": node_ip} if node_ip else {}))
    return True


def _lan_head(cluster: str | None, token_file: str | None, insecure: bool, timeout: float) -> tuple[str, str]:
    """Find a LAN head by zeroconf and check it like ``tilefleet join`` does: (GCS address, our IP).

    A Ray driver needs a raylet on its own machine: run this on a joined device, or after
    ``tilefleet join --client`` on a laptop.
    """
    from fleet.lan.net import choose_node_ip
    from fleet.lan.raynode import use_ray_auth
    from fleet.lan.tls import driver_tls
    from fleet.lan.tokens import resolve_token
    from fleet.lan.trust import pick_head

    token = None if insecure else resolve_token(token_file, create=False)
    advert, client = pick_head(token, cluster=cluster, timeout=timeout)
    node_ip = choose_node_ip(None, advert.host)
    with client:  # a --tls cluster: this driver's own certificate, over the agent connection just checked
        tls_files = driver_tls(advert, client, token, node_ip)
    use_ray_auth(token.path if token else None, tls_files)
    return f"{advert.host}:{advert.ray_port}", node_ip


def connect(address: str | None = None, *, emulate: str | None = None, profiles_file: str | None = None,
            scale: float | None = None, max_in_flight: int = 2, threads_per_device: int = 1,
            num_cpus: int | None = None, nodes: bool = False, cluster: str | None = None,
            token_file: str | None = None, insecure: bool = False, timeout: float = 5.0) -> Cluster:
    """Connect to a cluster.

    ``connect(emulate="pi3*4,laptop")``: a local Ray instance whose devices are emulated profiles
    (see ``tilefleet devices --catalog``). ``connect()``: a local instance whose devices are this
    host's own cores. ``connect("auto")`` or ``connect("ray://host:10001")``: an existing cluster.
    ``connect("zeroconf")`` or ``connect(cluster="lab")``: a LAN cluster started with ``tilefleet
    head``, found by zeroconf and checked like ``tilefleet join`` (versions, token fingerprint, the
    head's proof), using the join token (``token_file``, default ~/.config/tilefleet/token).
    ``scale`` overrides the emulation clock scale (by default chosen so the host stays well ahead of
    every emulated device). ``nodes=True`` (local devices only) makes each device its own Ray node
    on this machine, with its own object store: stage outputs cross nodes as on a LAN, and
    ``fail()`` kills the device's whole node.
    """
    import ray

    table = profiles(profiles_file)
    node_ip = None
    if address == "zeroconf" or cluster is not None:
        if emulate is not None or nodes:
            raise ValueError("connect to a LAN cluster (zeroconf / cluster=) or emulate devices, not both")
        address, node_ip = _lan_head(cluster, token_file, insecure, timeout)
    if emulate is not None:
        specs = parse_spec(emulate, table)
    elif address is None:
        n = max(1, (os.cpu_count() or 2) // threads_per_device)
        specs = parse_spec(f"host*{n}", table)
    else:
        specs = []
    if nodes and not specs:
        raise ValueError("nodes=True makes local devices one Ray node each; it does not apply to an existing "
                         "cluster (address=...)")
    local_nodes = LocalNodes(specs, threads_per_device) if nodes else None
    try:
        started = _ray_init(local_nodes.address if local_nodes else address,
                            num_cpus if num_cpus is not None else max(2, os.cpu_count() or 2), node_ip)
    except BaseException:
        if local_nodes:
            local_nodes.shutdown()
        raise
    try:
        if specs:
            host_gflops = measure_host_gflops(threads=threads_per_device)
            specs = [DeviceSpec(s.id, host_profile(host_gflops * threads_per_device)) if not s.profile.emulated
                     else s for s in specs]
            devices = start_local_devices(specs, host_gflops, scale, threads_per_device,
                                           local_nodes.node_ids if local_nodes else None)
        else:
            devices = discover_devices(table)
            scale = 1.0
    except BaseException:
        if started:
            ray.shutdown()
        if local_nodes:
            local_nodes.shutdown()
        raise
    return Cluster(devices, started, max_in_flight=max_in_flight,
                   scale=devices[next(iter(devices))].scale if devices else 1.0, publish_tiles=not specs,
                   watch=table if (local_nodes or not specs) else None, local_nodes=local_nodes,
                   local_threads=threads_per_device if specs else None)


class Cluster:
    """A set of devices with one driver; deployments share it (and the devices' memory)."""

    def __init__(self, devices: dict[str, Device], owns_ray: bool, *, max_in_flight: int, scale: float,
                 publish_tiles: bool = False, watch: dict[str, Profile] | None = None,
                 local_nodes: LocalNodes | None = None, local_threads: int | None = None) -> None:
        self._owns_ray = owns_ray
        self._local_nodes = local_nodes
        self._local_threads = local_threads  # threads per worker of the devices started here (None: found)
        self.scale = scale
        transport = RayTransport(devices, publish_tiles=publish_tiles)

        def make_driver(clock: RealClock) -> Driver:
            transport.driver = Driver(devices, transport, clock, max_in_flight=max_in_flight)
            return transport.driver

        self.driver = DriverThread(make_driver, transport.poll)
        self.deployments: list[Deployment] = []
        self.closed = False
        # an existing cluster: follow nodes joining and dying (its profile table prices the newcomers)
        self._watcher = NodeWatcher(self.driver, watch) if watch is not None else None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def devices(self) -> list[dict[str, Any]]:
        """Every device: id, profile figures, state."""
        self._check()
        return self.driver.call(self.driver.core.device_table)

    def plan(self, model: nn.Module, example: torch.Tensor, grid: Any = "auto", *, mode: str = "latency",
             preprocess: Any = None, **kw: Any) -> Planned:
        """How ``model`` would be cut for this cluster, without shipping anything: check it (memory,
        the plan summary) and then pass it to :meth:`deploy` as ``planned=``."""
        self._check()
        if mode not in ("latency", "throughput"):
            raise ValueError(f"mode must be 'latency' or 'throughput', got {mode!r}")
        pre = None
        if preprocess is not None:  # frames travel as uint8; each device normalises its own crop
            pre = tiling.Preprocess.parse(preprocess)
            if not isinstance(example, torch.Tensor) or example.dtype != torch.uint8:
                raise tiling.InputMismatch("with preprocess=..., the example is a raw uint8 frame (as the camera "
                                           f"gives it, {pre.layout.upper()}), got "
                                           f"{getattr(example, 'dtype', type(example).__name__)}")
            model, example = tiling.with_preprocess(model, pre), pre.to_nchw(example)
        alive = self.driver.alive_specs()
        if isinstance(grid, str) and grid == "auto":
            from .planner import choose_plan

            if any(this_host(d.profile) for d in alive):
                rate = calibrate(model, example, concurrent=sum(this_host(d.profile) for d in alive))
                alive = [DeviceSpec(d.id, dataclasses.replace(d.profile, gflops=rate)) if this_host(d.profile) else d
                         for d in alive]
            plan, choice = choose_plan(model, example, alive, mode=mode, scale=self.scale, **kw)
        else:
            plan, choice = tiling.partition(model, example, grid, **kw), None
        return Planned(plan, choice, example.element_size(), pre)

    def deploy(self, model: nn.Module | None = None, example: torch.Tensor | None = None, grid: Any = "auto", *,
               mode: str = "latency", preprocess: Any = None, planned: Planned | None = None,
               **kw: Any) -> Deployment:
        """Partition ``model`` for this cluster and ship its stages' weights to every device once.

        ``preprocess`` (a :class:`tiling.Preprocess` or its text, e.g. ``"imagenet"``,
        ``"darknet,layout=hwc"``) makes the deployment take raw uint8 frames: ``example`` is then one,
        frames cross the network as bytes (a quarter of float32), and each device normalises its own
        crop in the first fused stage. ``planned`` (from :meth:`plan`) ships that plan as it is.
        """
        self._check()
        if planned is None:
            if model is None or example is None:
                raise TypeError("deploy(model, example, ...) or deploy(planned=cluster.plan(...))")
            planned = self.plan(model, example, grid, mode=mode, preprocess=preprocess, **kw)
        t0 = time.monotonic()
        state = ship(new_deployment_id(), planned.plan, planned.frame_itemsize)
        self.driver.call(lambda: self.driver.core.load(state))  # every alive device, before the first frame
        dep = Deployment(state, self.driver, planned.choice, time.monotonic() - t0,
                         alive_devices=lambda: len(self.driver.alive_specs()),
                         cluster_check=self._check, scale=self.scale, detection_times=self.detection_times,
                         on_close=self.deployments.remove, preprocess=planned.preprocess)
        self.deployments.append(dep)
        return dep

    def fail(self, device_id: str) -> float:
        """Crash a device as hardware would: SIGKILL its worker process (with ``nodes=True``, every
        process of its Ray node). Returns the kill time."""
        self._check()
        pid = self.driver.call(lambda: self.driver.core.mark_killed(device_id))
        if self._local_nodes is not None:
            self._local_nodes.kill(device_id)
        else:
            os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def revive(self, device_id: str) -> float:
        """Bring back a device that failed, as a rebooted Pi comes back: a fresh worker process with
        the same id and profile, every open deployment's weights loaded onto it, and then work (the
        scheduler places new tiles on it and it steals queued ones). Returns the seconds it took.

        Only devices this cluster started on this machine (``emulate=...`` or the host's cores)
        can be revived; on an existing cluster a device comes back when its node rejoins.
        Raises KeyError for an unknown device and ValueError for one that is alive.
        """
        import ray

        self._check()
        if self._local_threads is None:
            raise ValueError("revive() restarts devices this cluster started (emulate=... or this host's "
                             "cores); on an existing cluster a device comes back when its node rejoins")
        if self._local_nodes is not None:
            raise ValueError("revive() is not supported with nodes=True: a device's Ray node cannot be "
                             "restarted under the same id")
        t0 = time.monotonic()
        core = self.driver.core

        def failed_device() -> Device:
            dev = core.devices.get(device_id)
            if dev is None:
                raise KeyError(f"no device '{device_id}'; devices: {', '.join(core.devices)}")
            if dev.alive and dev.killed_at is None:
                raise ValueError(f"device '{device_id}' is alive: revive() brings back a device that "
                                 "failed (fail() it first)")
            return dev

        old = self.driver.call(failed_device)
        try:
            ray.kill(old.actor)  # dead already (killed or lost); make sure no part of it runs on
        except Exception:  # noqa: BLE001
            pass
        assert old.profile is not None
        new = start_local_devices([DeviceSpec(device_id, old.profile)], 0.0, old.scale,
                                  self._local_threads)[device_id]
        # a device killed but not noticed yet is still alive to the driver: add_device loses it first
        register_device(self.driver, device_id, new)
        return time.monotonic() - t0

    def slow(self, device_id: str, factor: float) -> None:
        """Make an emulated device ``factor`` times slower from now on (``1`` restores it), as heat or
        another job would; the scheduler is not told (it sees the device's results come late)."""
        self._check()
        actor = self.driver.call(lambda: self.driver.core.devices[device_id].actor
                                 if device_id in self.driver.core.devices else None)
        if actor is None:
            raise KeyError(f"no device '{device_id}'")
        import ray

        ray.get(actor.slow.remote(factor), timeout=30)

    def set_budget(self, device_id: str, memory_bytes: int) -> None:
        """Tell the scheduler a device's memory budget changed, as when another process on it takes
        memory: tiles that no longer fit go elsewhere (a running one finishes), and frames that fit no
        device any more fail with the numbers. Giving memory back lets it take work again."""
        self._check()
        self.driver.call(lambda: self.driver.core.set_budget(device_id, memory_bytes))

    def detection_times(self) -> dict[str, float | None]:
        """Per killed device: seconds from ``fail`` until the driver noticed (None: not yet)."""
        return self.driver.call(self.driver.core.detection_times)

    def close(self) -> None:
        if self.closed:
            return
        if self._watcher is not None:
            self._watcher.stop.set()
            self._watcher.thread.join(timeout=5)
        for dep in list(self.deployments):
            dep.close()
        self.driver.stop()
        self.closed = True
        if self._owns_ray:
            import ray

            ray.shutdown()
        if self._local_nodes is not None:
            self._local_nodes.shutdown()

    def _check(self) -> None:
        if self.closed:
            raise ClusterClosed("this cluster is closed; call fleet.connect() again")


@dataclass(frozen=True)
class Planned:
    """A plan made for a cluster and not shipped yet (:meth:`Cluster.plan`)."""

    plan: tiling.Plan
    choice: Any  # the auto-planner's candidates and predictions, or None for an explicit grid
    frame_itemsize: int  # bytes per value of a frame as it is sent (1 for uint8 camera frames)
    preprocess: tiling.Preprocess | None = None


def ship(dep_id: str, plan: tiling.Plan, frame_itemsize: int) -> DeploymentState:
    """Put the plan's programs, tail and tile geometries in the object store once: every device
    (and any that joins later) loads them by reference."""
    import ray

    programs = {s.index: ray.put(s.program) for s in plan.stages}
    tail = ray.put(plan.tail) if not plan.tail.empty else None
    geos = ray.put({s.index: [t.geometry for t in s.tiles] for s in plan.stages})
    return DeploymentState.build(dep_id, plan, frame_itemsize, shipped=(programs, tail, geos))
