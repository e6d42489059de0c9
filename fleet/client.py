"""The Python client: connect to a cluster, deploy a model, submit frames.

    with fleet.connect(emulate="pi3*4") as cluster:
        dep = cluster.deploy(model, example, grid=(5, 5))
        y = dep(x)                      # equals model(x)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tiling
from sims.catalog import DeviceSpec, Profile, host_profile, measure_host_gflops, parse_spec, profiles


from .deployment_plan import Wiring, frame_spec, wire
from .driver import Device, Driver, FrameFailed
from .nodes import LABEL_SOURCE, LocalNodes, NodeWatcher, discover_devices, start_local_devices

__all__ = ["Cluster", "ClusterClosed", "Deployment", "FrameFailed", "connect"]

log = logging.getLogger("tilefleet.client")
_deployment_ids = itertools.count()


class ClusterClosed(RuntimeError):
    """The cluster (or deployment) was closed; connect again."""


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
    from . import lan, lancli

    token = None if insecure else lan.resolve_token(token_file, create=False)
    advert, client = lancli.pick_head(token, cluster=cluster, timeout=timeout)
    client.close()
    lan.use_ray_auth(token.path if token else None)
    return f"{advert.host}:{advert.ray_port}", lan.choose_node_ip(None, advert.host)


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
                   watch=table if (local_nodes or not specs) else None, local_nodes=local_nodes)


class Cluster:
    """A set of devices with one driver; deployments share it (and the devices' memory)."""

    def __init__(self, devices: dict[str, Device], owns_ray: bool, *, max_in_flight: int, scale: float,
                 publish_tiles: bool = False, watch: dict[str, Profile] | None = None,
                 local_nodes: LocalNodes | None = None) -> None:
        self._devices = devices
        self._owns_ray = owns_ray
        self._local_nodes = local_nodes
        self.scale = scale
        self.driver = Driver(devices, max_in_flight=max_in_flight, publish_tiles=publish_tiles)
        self.deployments: list[Deployment] = []
        self.closed = False
        # an existing cluster: follow nodes joining and dying (its profile table prices the newcomers)
        self._watcher = NodeWatcher(self, watch) if watch is not None else None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def devices(self) -> list[dict[str, Any]]:
        """Every device: id, profile figures, state."""
        self._check()
        out = []
        for d in self._devices.values():
            p: Profile = d.profile
            out.append({"id": d.info.id, "class": p.name, "gflops": p.gflops, "memory_bytes": p.memory_bytes,
                        "usable_bytes": p.usable_bytes, "gpu": p.gpu, "link_mbps": p.link_mbps,
                        "latency_ms": p.latency_s * 1e3, "emulated": p.emulated,
                        "state": "alive" if d.alive else "lost", "pid": d.pid})
        return out

    def deploy(self, model: nn.Module, example: torch.Tensor, grid: Any = "auto", **kw: Any) -> Deployment:
        """Partition ``model`` for this cluster and ship its stages' weights to every device once."""
        self._check()
        dep = Deployment(self, model, example, grid, **kw)
        self.deployments.append(dep)
        return dep

    def fail(self, device_id: str) -> float:
        """Crash a device as hardware would: SIGKILL its worker process (with ``nodes=True``, every
        process of its Ray node). Returns the kill time."""
        self._check()
        dev = self._devices.get(device_id)
        if dev is None:
            raise KeyError(f"no device '{device_id}'; devices: {', '.join(self._devices)}")
        dev.killed_at = time.monotonic()
        if self._local_nodes is not None:
            self._local_nodes.kill(device_id)
        else:
            os.kill(dev.pid, signal.SIGKILL)
        return dev.killed_at

    def detection_times(self) -> dict[str, float | None]:
        return {d: dev.detected_after_s for d, dev in self._devices.items() if dev.killed_at is not None}

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


class Deployment:
    """One model deployed on a cluster: fixed (C, H, W) and dtype, any batch size."""

    def __init__(self, cluster: Cluster, model: nn.Module, example: torch.Tensor, grid: Any = "auto", *,
                 mode: str = "latency", **kw: Any) -> None:
        import ray

        if mode not in ("latency", "throughput"):
            raise ValueError(f"mode must be 'latency' or 'throughput', got {mode!r}")
        self.cluster = cluster
        self.id = f"dep{next(_deployment_ids)}"
        self.mode = mode
        if isinstance(grid, str) and grid == "auto":
            from .planner import choose_plan

            alive = [DeviceSpec(d.info.id, d.profile) for d in cluster._devices.values() if d.alive]
            if any(_this_host(d.profile) for d in alive):
                rate = _calibrate(model, example, concurrent=sum(_this_host(d.profile) for d in alive))
                alive = [DeviceSpec(d.id, dataclasses.replace(d.profile, gflops=rate)) if _this_host(d.profile) else d
                         for d in alive]
            self.plan, self.choice = choose_plan(model, example, alive, mode=mode, scale=cluster.scale, **kw)
        else:
            self.plan = tiling.partition(model, example, grid, **kw)
            self.choice = None
        self.wiring: Wiring = wire(self.plan)
        t0 = time.monotonic()
        programs = {s.index: ray.put(s.program) for s in self.plan.stages}
        tail = ray.put(self.plan.tail) if not self.plan.tail.empty else None
        geos = ray.put({s.index: [t.geometry for t in s.tiles] for s in self.plan.stages})
        self.shipped = (programs, tail, geos)  # references: a device that joins later loads from them
        alive = [d for d in cluster._devices.values() if d.alive]
        ray.get([d.actor.load.remote(self.id, *self.shipped) for d in alive], timeout=300)
        self.deploy_s = time.monotonic() - t0
        self.latencies: dict[int, float] = {}
        self.counters: dict[str, dict[str, Any]] = {}
        self.overheads: list[float] = []
        self.closed = False
        self._tail_weights = sum(p.numel() * p.element_size() for p in self.plan.tail.gm.parameters())
        self._frame_bytes = int(np.prod(self.plan.input_shape)) * example.element_size()

    # --- frames --------------------------------------------------------------------------------------
    def frame_spec(self, fid: int) -> Any:
        return frame_spec(self.wiring, fid, self.id, self.plan.tail.flops, self._frame_bytes, self.plan.tail.out_bytes,
                          self._tail_weights)

    def _as_batch(self, x: Any) -> tuple[np.ndarray, bool]:
        if not isinstance(x, torch.Tensor):
            raise tiling.InputMismatch(f"frames must be torch tensors, got {type(x).__name__}")
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        self.plan.check_input(x)
        if not torch.isfinite(x).all():
            raise tiling.InputMismatch("the frame contains NaN or Inf; clean it (torch.nan_to_num) before sending")
        return x.detach().cpu().contiguous().numpy(), single

    def submit(self, x: torch.Tensor) -> Future:
        """Send a frame; returns a future of the result (``.result(timeout=...)``)."""
        self._check()
        arr, single = self._as_batch(x)
        inner = self.cluster.driver.submit(self, arr)
        if not single:
            return inner
        outer: Future = Future()

        def unwrap(f: Future) -> None:
            try:
                outer.set_result(_map_tensors(f.result(), lambda t: t[0]))
            except BaseException as e:  # noqa: BLE001
                outer.set_exception(e)

        inner.add_done_callback(unwrap)
        return outer

    def __call__(self, x: torch.Tensor, timeout: float | None = 300) -> Any:
        return self.submit(x).result(timeout=timeout)

    def stream(self, frames: Iterable[torch.Tensor], in_flight: int | None = None,
               timeout: float | None = 300) -> Iterator[Any]:
        """Results in submission order, keeping ``in_flight`` frames in the cluster at once."""
        depth = in_flight or max(2, len([d for d in self.cluster._devices.values() if d.alive]))
        window: deque[Future] = deque()
        for x in frames:
            window.append(self.submit(x))
            if len(window) >= depth:
                yield window.popleft().result(timeout=timeout)
        while window:
            yield window.popleft().result(timeout=timeout)

    # --- results -------------------------------------------------------------------------------------
    def finish_outputs(self, env: dict[str, np.ndarray]) -> Any:
        return _map_tensors(self.plan.tail.run({k: torch.from_numpy(v) for k, v in env.items()}), lambda t: t)

    def finish_tail(self, out: Any) -> Any:
        from workers.executor import to_torch_tree

        return to_torch_tree(out)

    def record_latency(self, fid: int, seconds: float) -> None:
        self.latencies[fid] = seconds

    def record_tile(self, device: str, meta: dict[str, Any], tail: bool = False) -> None:
        """Called by the driver for every accepted result of this deployment."""
        c = self.counters.setdefault(device, _counter())
        c["tails" if tail else "tiles"] += 1
        tl = meta.get("timeline")
        c["busy_s"] += (tl["compute_end"] - tl["compute_start"]) if tl else meta.get("compute_s", 0.0)
        c["host_compute_s"] += meta.get("compute_s", 0.0)
        c["bytes_in"] += meta.get("bytes_in", 0)
        c["bytes_out"] += meta.get("bytes_out", 0)
        if tl:
            emulated = tl["compute_end"] - tl["compute_start"]
            c["worst_host_ratio"] = max(c["worst_host_ratio"], meta.get("compute_s", 0.0) / max(1e-9, emulated))
            late = meta.get("computed_at", 0.0) - tl["done"]
            if late > 1e-3:
                c["host_too_slow"] += 1  # the host finished after the emulated device would have: say so
                c["max_late_s"] = max(c["max_late_s"], late)

    def reset_stats(self) -> None:
        """Forget per-frame latencies and per-device counters (e.g. after warm-up frames)."""
        def reset() -> None:
            self.latencies.clear()
            self.counters.clear()
            self.overheads.clear()

        self.cluster.driver.call(reset)

    def record_overhead(self, seconds: float) -> None:
        if len(self.overheads) < 100_000:
            self.overheads.append(seconds)

    def record_failure(self, device: str) -> None:
        self.counters.setdefault(device, _counter())["failures"] += 1

    # --- reports -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per device: tiles, busy (emulated compute) seconds, bytes, peak bytes, steals, retries;
        per frame: latency. Steals and retries are the cluster's (the scheduler's) counters."""
        sched = self.cluster.driver.call(lambda: self.cluster.driver.sched.stats())
        lat = list(self.latencies.values())
        stage_w = sum(s.weight_bytes for s in self.plan.stages)
        devices = {}
        for did, dev in self.cluster._devices.items():
            c = self.counters.get(did, _counter())
            s = sched.get(did)
            devices[did] = {**c, "alive": dev.alive, "steals": s.steals if s else 0, "retries": s.retries if s else 0,
                            # weights held from deploy on + the most tile memory ever in flight at once
                            "peak_bytes": (stage_w + s.peak_high_water) if (c["tiles"] and s) else 0}
        frames: dict[str, Any] = {"count": len(lat)}
        if lat:
            frames.update(p50_ms=_pct(lat, 50) * 1e3, p95_ms=_pct(lat, 95) * 1e3, mean_ms=statistics.mean(lat) * 1e3)
        return {"devices": devices, "frames": frames, "latency_s": dict(self.latencies),
                "deploy_s": self.deploy_s, "scale": self.cluster.scale,
                "detection_s": self.cluster.detection_times()}

    def trace(self, path: str | os.PathLike[str]) -> Path:
        """Write a Chrome trace (chrome://tracing, Perfetto) of tiles and transfers per device."""
        events = self.cluster.driver.call(lambda: list(self.cluster.driver.trace))
        ids = {d: i for i, d in enumerate(sorted({e.device for e in events}))}
        lanes = {"rx": 1, "compute": 2, "tx": 3}
        out = []
        for d, i in ids.items():
            out.append({"name": "process_name", "ph": "M", "pid": i, "args": {"name": d}})
            for lane, tid in lanes.items():
                out.append({"name": "thread_name", "ph": "M", "pid": i, "tid": tid, "args": {"name": lane}})
        t0 = min((e.start for e in events), default=0.0)
        for e in events:
            out.append({"name": e.name, "ph": "X", "pid": ids[e.device], "tid": lanes.get(e.lane, 2),
                        "ts": (e.start - t0) * 1e6, "dur": max(0.0, e.end - e.start) * 1e6, "args": e.args})
        p = Path(path)
        p.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
        return p

    def plan_summary(self) -> str:
        text = self.plan.summary()
        if self.choice is not None:
            text += "\n" + self.choice.summary()
        return text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for d in self.cluster._devices.values():
            if d.alive:
                try:
                    d.actor.unload.remote(self.id)
                except Exception:  # noqa: BLE001 - a dead actor holds nothing
                    pass
        if self in self.cluster.deployments:
            self.cluster.deployments.remove(self)

    def _check(self) -> None:
        if self.closed:
            raise ClusterClosed("this deployment is closed; deploy again")
        self.cluster._check()


def _this_host(p: Profile) -> bool:
    """A worker on this machine, priced by timing the model here (LAN devices bring their own figures)."""
    return not p.emulated and p.source != LABEL_SOURCE


def _calibrate(model: nn.Module, example: torch.Tensor, concurrent: int = 1) -> float:
    """This host's real GFLOP/s on this model as a worker runs it (one thread, NHWC, BN folded).

    The catalog's conv micro-benchmark flatters the host (early layers with 3 input channels run
    far slower), and plain torch on the model is not what a worker runs, so workers on this host
    are priced by timing the model's whole-frame stages in the workers' own executor, in
    ``concurrent`` threads at once: workers sharing the host's cores slow each other down
    (memory bandwidth, caches), and a lone measurement would promise too much.
    """
    from concurrent.futures import ThreadPoolExecutor

    from workers.executor import TileExecutor

    plan = tiling.partition(model, example[:1], grid=(1, 1))
    x = example[:1].numpy()
    old = torch.get_num_threads()
    ex = TileExecutor(threads=1)
    ex.load("calibrate", {s.index: s.program for s in plan.stages})

    def frame() -> float:
        t0 = time.perf_counter()
        env = {plan.input_name: x}
        for st in plan.stages:
            r = ex.run("calibrate", st.index, st.tiles[0].geometry, {n: env[n] for n in st.inputs})
            if not hasattr(r, "outputs"):
                raise RuntimeError(f"calibration run failed: {r}")
            env.update(r.outputs)
        return time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(max(1, concurrent)) as pool:
            times = list(pool.map(lambda _: (frame(), frame())[1], range(max(1, concurrent))))  # 1st run allocates
    finally:
        torch.set_num_threads(old)
    return max(0.1, plan.untiled_flops / statistics.median(times) / 1e9)


def _counter() -> dict[str, Any]:
    return {"tiles": 0, "tails": 0, "busy_s": 0.0, "host_compute_s": 0.0, "bytes_in": 0, "bytes_out": 0,
            "failures": 0, "host_too_slow": 0, "worst_host_ratio": 0.0,
            "max_late_s": 0.0}


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _map_tensors(x: Any, fn: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x
