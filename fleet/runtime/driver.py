"""The I/O shell that runs the pure scheduler against Ray.

One thread owns the :class:`scheduler.Scheduler`. It turns Ray results into events (a dead actor
becomes ``DeviceLost``, a failure value ``TileFailed``, a result ``TileDone``) and instructions
into Ray calls (``Dispatch`` into ``TileWorker.run_tile``, ``RunTail`` into ``run_tail`` or a
stitch in the driver). It never lets an exception escape into the scheduler's state: a frame that
cannot go on fails with a reason, and the deployment keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from scheduler import (Cancel, Complete, DeviceInfo, DeviceJoined, DeviceLost, Dispatch, FailFrame,
                       FrameSubmitted, RunTail, Scheduler, Stitch, TailDone, TailFailed, TileDone, TileFailed)

from tiling.geometry import Box
from tiling.stitch import stitch
from workers.executor import to_torch_tree

from scheduler import TileRef
from sims.catalog import DeviceSpec, Profile

from .deployment import DeploymentState
from .stats import MAX_TRACE, TraceEvent, trace_events
from .wiring import remote_bytes

log = logging.getLogger("tilefleet.driver")

KV_NAMESPACE = "tilefleet"
TILES_KEY = "tilefleet/tiles/"  # + Ray node id (hex): ascii count of tiles done there, all drivers together
PUBLISH_EVERY_S = 2.0
INPUT_LOST_GRACE_S = 3.0  # > Ray's node death detection with fast health checks (about 1.5 s)


class FrameFailed(RuntimeError):
    """A frame the runtime could not complete; the message says why."""


@dataclass
class Device:
    info: DeviceInfo
    actor: Any
    pid: int
    node_id: str = ""
    alive: bool = True
    killed_at: float | None = None
    detected_after_s: float | None = None
    profile: Profile | None = None
    scale: float = 1.0


@dataclass
class FrameCtx:
    frame_id: int
    deployment: DeploymentState
    x: np.ndarray
    future: Future
    submitted: float
    results: dict[TileRef, Any] = field(default_factory=dict)  # payload ref ({'out', 'exp'}) of each accepted tile
    placed: dict[TileRef, str] = field(default_factory=dict)
    done_at: float | None = None
    tail_result_ref: Any = None


class Driver:
    """Runs frames of any number of deployments on one set of devices."""

    def __init__(self, devices: dict[str, Device], *, max_in_flight: int = 2, max_retries: int = 3,
                 publish_tiles: bool = False) -> None:
        self.devices = devices
        self.sched = Scheduler(max_in_flight_per_device=max_in_flight, max_retries=max_retries, learn_speed=False)
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self.frames: dict[int, FrameCtx] = {}
        self.deployments: dict[str, DeploymentState] = {}
        self.pending: dict[Any, tuple[str, Any, str]] = {}  # meta ref -> (kind, key or frame id, device)
        self.next_frame = 0
        self.trace: list[TraceEvent] = []
        self.t0 = time.monotonic()
        self._tile_refs: dict[Any, Any] = {}  # (key, device) -> the 2 refs of run_tile
        self._tail_refs: dict[Any, Any] = {}  # (frame, device) -> the output ref of run_tail
        self._sent: dict[Any, float] = {}  # (key, device) -> when the tile was dispatched
        self._stop = threading.Event()
        self.error: BaseException | None = None
        # tiles done per Ray node, published to the cluster's KV for `tilefleet devices` (LAN clusters)
        self._publish = publish_tiles
        self._deferred: list[tuple[float, Any]] = []  # (when, event): failures held back a moment
        self._node_id = ray.get_runtime_context().get_node_id()
        self._unpublished: dict[str, int] = {}
        self._published_at = 0.0
        self.sched.handle(*(DeviceJoined(d.info, self.now()) for d in devices.values()))
        self.thread = threading.Thread(target=self._loop, name="tilefleet-driver", daemon=True)
        self.thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- called from client threads ----------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the driver thread and wait for its result (the scheduler is single-threaded)."""
        if not self.thread.is_alive():
            raise RuntimeError("the driver has stopped" + (f": {self.error}" if self.error else ""))
        fut: Future = Future()

        def job() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self.inbox.put(job)
        return fut.result(timeout=120)

    def submit(self, deployment: DeploymentState, x: np.ndarray) -> Future:
        fut: Future = Future()

        def job() -> None:
            fid = self.next_frame
            self.next_frame += 1
            ctx = FrameCtx(fid, deployment, x, fut, time.monotonic())
            self.frames[fid] = ctx
            spec = deployment.frame_spec(fid)
            self._execute(self.sched.handle(FrameSubmitted(spec, self.now())))

        self.inbox.put(job)
        return fut

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    def device_lost(self, device: str, why: str, results_lost: bool = True) -> None:
        """A device is gone (its Ray node died, say): thread-safe, handled on the driver thread."""
        self.inbox.put(lambda: self._lost(device, why, results_lost=results_lost))

    # --- driver thread only (through ``call``) -------------------------------------------------------
    def load(self, state: DeploymentState) -> None:
        """Every alive device loads the deployment's weights before its first frame."""
        self.deployments[state.id] = state
        alive = [d for d in self.devices.values() if d.alive]
        ray.get([d.actor.load.remote(state.id, *state.shipped) for d in alive], timeout=300)

    def unload(self, state: DeploymentState) -> None:
        state.closed = True
        self.deployments.pop(state.id, None)
        for d in self.devices.values():
            if d.alive:
                try:
                    d.actor.unload.remote(state.id)
                except Exception:  # noqa: BLE001 - a dead actor holds nothing
                    pass

    def snapshot(self, state: DeploymentState) -> dict[str, Any]:
        return state.stats.snapshot({d: dev.alive for d, dev in self.devices.items()}, self.sched.stats(),
                                    state.weight_bytes)

    def alive_specs(self) -> list[DeviceSpec]:
        return [DeviceSpec(d.info.id, d.profile) for d in self.devices.values() if d.alive and d.profile]

    def device_table(self) -> list[dict[str, Any]]:
        """Every device: id, profile figures, state."""
        out = []
        for d in self.devices.values():
            p = d.profile
            assert p is not None
            out.append({"id": d.info.id, "class": p.name, "gflops": p.gflops, "memory_bytes": p.memory_bytes,
                        "usable_bytes": p.usable_bytes, "gpu": p.gpu, "link_mbps": p.link_mbps,
                        "latency_ms": p.latency_s * 1e3, "emulated": p.emulated,
                        "state": "alive" if d.alive else "lost", "pid": d.pid, "node_id": d.node_id})
        return out

    def mark_killed(self, device_id: str) -> int:
        """Note when a device was crashed on purpose (to time detection); its worker's pid."""
        dev = self.devices.get(device_id)
        if dev is None:
            raise KeyError(f"no device '{device_id}'; devices: {', '.join(self.devices)}")
        dev.killed_at = time.monotonic()
        return dev.pid

    def detection_times(self) -> dict[str, float | None]:
        return {d: dev.detected_after_s for d, dev in self.devices.items() if dev.killed_at is not None}

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.pending)
                if self.pending:
                    refs = list(self.pending)
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    if not ready:
                        ready, _ = ray.wait(refs, num_returns=1, timeout=0.02)
                    for ref in ready:
                        self._on_ready(ref)
                while self._deferred and self._deferred[0][0] <= time.monotonic():
                    self._execute(self.sched.handle(self._deferred.pop(0)[1]))
                if self._unpublished and (time.monotonic() - self._published_at > PUBLISH_EVERY_S or not self.pending):
                    self._publish_tiles()
        except BaseException as e:  # pragma: no cover - a bug in the shell: fail every frame loudly
            log.exception("driver loop crashed")
            self.error = e
            for ctx in self.frames.values():
                if not ctx.future.done():
                    ctx.future.set_exception(FrameFailed(f"driver crashed: {e!r}"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            job = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        job()
        while True:
            try:
                self.inbox.get_nowait()()
            except queue.Empty:
                return

    def _on_ready(self, ref: Any) -> None:
        entry = self.pending.pop(ref, None)
        if entry is None:
            return  # dropped meanwhile (its device was lost while this batch was being handled)
        kind, subject, device = entry
        dev = self.devices[device]
        try:
            meta = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError, ray.exceptions.ObjectLostError) as e:
            self._lost(device, f"{type(e).__name__}")
            return
        except ray.exceptions.TaskCancelledError:
            return  # we cancelled it (its inputs were lost); the scheduler no longer expects it
        except ray.exceptions.RayError as e:  # a task error, or anything else Ray reports: a retryable failure
            meta = {"ok": False, "error": type(e).__name__, "message": (str(e).splitlines() or [""])[0],
                    "retryable": True}
        t = self.now()
        if not dev.alive:
            return
        if kind == "tile":
            self._on_tile(subject, device, meta, t)
        else:
            self._on_tail(subject, device, meta, t)

    def _on_tile(self, key: tuple[int, int, int], device: str, meta: dict[str, Any], t: float) -> None:
        fid, stage, idx = key
        ctx = self.frames.get(fid)
        refs = self._tile_refs.pop((key, device), None)
        sent = self._sent.pop((key, device), None)
        if meta.get("ok") and sent is not None and ctx is not None and "timeline" not in meta:
            # dispatch overhead: the round trip the driver saw minus the worker's own execution time
            ctx.deployment.stats.record_overhead(time.monotonic() - sent - meta.get("compute_s", 0.0))
        if meta.get("ok"):
            self._record_trace(device, f"f{fid} s{stage} t{idx}", meta)
            if ctx is not None and refs is not None and self.sched.expects(key, device):
                ctx.results[(stage, idx)] = refs[1]
                ctx.deployment.stats.device(device).record(meta)
                if self._publish:
                    node = self.devices[device].node_id
                    self._unpublished[node] = self._unpublished.get(node, 0) + 1
            busy = meta.get("timeline", {})
            compute_s = busy.get("compute_end", 0.0) - busy.get("compute_start", 0.0) if busy else meta.get("compute_s", 0.0)
            ev: Any = TileDone(key, device, t, compute_s=compute_s, bytes_in=meta.get("bytes_in", 0),
                               bytes_out=meta.get("bytes_out", 0))
        else:
            if ctx is not None:
                ctx.deployment.stats.device(device).failures += 1
            ev = TileFailed(key, device, t, error=f"{meta.get('error')}: {meta.get('message')}",
                            retryable=bool(meta.get("retryable", True)))
            if meta.get("error") == "InputLost":
                # a producer's machine died: the node watch will report it (and the scheduler re-run the
                # producer and cancel this tile) within a health-check period; retrying now would fail again
                self._deferred.append((time.monotonic() + INPUT_LOST_GRACE_S, ev))
                return
        self._execute(self.sched.handle(ev))

    def _publish_tiles(self) -> None:
        """Add this driver's new tile counts to the cluster-wide per-node totals (best effort)."""
        from ray.experimental import internal_kv

        counts, self._unpublished = self._unpublished, {}
        self._published_at = time.monotonic()
        try:
            for node, n in counts.items():
                key = f"{TILES_KEY}{node}".encode()
                old = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
                total = (int(old) if old and old.isdigit() else 0) + n
                internal_kv._internal_kv_put(key, str(total).encode(), overwrite=True, namespace=KV_NAMESPACE)
        except Exception as e:  # noqa: BLE001 - statistics must never break inference
            log.warning("could not publish tile counts: %s", e)

    def _on_tail(self, fid: int, device: str, meta: dict[str, Any], t: float) -> None:
        ctx = self.frames.get(fid)
        ref = self._tail_refs.pop((fid, device), None)
        if meta.get("ok") and ctx is not None and ref is not None:
            ctx.tail_result_ref = ref
            ctx.deployment.stats.device(device).record(meta, tail=True)
            self._record_trace(device, f"f{fid} tail", meta)
            ev: Any = TailDone(fid, device, t, compute_s=meta.get("compute_s", 0.0))
        else:
            ev = TailFailed(fid, device, t, error=f"{meta.get('error')}: {meta.get('message')}",
                            retryable=bool(meta.get("retryable", True)))
        self._execute(self.sched.handle(ev))

    def add_device(self, device_id: str, dev: Device) -> None:
        """A device that joined the cluster: it takes work from now on (driver thread only)."""
        self.devices[device_id] = dev
        self._execute(self.sched.handle(DeviceJoined(dev.info, self.now())))

    def _lost(self, device: str, why: str, results_lost: bool | None = None) -> None:
        """``results_lost``: the device's stored tile outputs are gone too. By default, when it
        ran on another Ray node than this driver (its node's object store may have gone with it)."""
        dev = self.devices[device]
        if not dev.alive:
            return
        if results_lost is None:
            results_lost = dev.node_id != self._node_id
        dev.alive = False
        if dev.killed_at is not None:
            dev.detected_after_s = time.monotonic() - dev.killed_at
        log.warning("device %s lost (%s)", device, why)
        for ref, (_, _, d) in list(self.pending.items()):
            if d == device:
                self.pending.pop(ref)
        self._execute(self.sched.handle(DeviceLost(device, self.now(), results_lost=results_lost)))

    # --- instructions ------------------------------------------------------------------------------

    def _execute(self, instructions: list[Any]) -> None:
        """Carry out the scheduler's instructions: every type has one handler, an unknown one raises."""
        for ins in instructions:
            handler = self._HANDLERS.get(type(ins))
            if handler is None:
                raise TypeError(f"the driver has no handler for instruction {ins!r}; handled: "
                                f"{', '.join(t.__name__ for t in self._HANDLERS)}")
            try:
                handler(self, ins)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as e:
                device = getattr(ins, "device", None)
                if device is not None:
                    self._lost(device, type(e).__name__)

    def _on_stitch(self, ins: Stitch) -> None:
        """Nothing to move: the consumer stitches (next-stage tiles, the tail's worker, or _complete)."""

    _HANDLERS: dict[type, Callable[[Driver, Any], None]] = {
        Dispatch: lambda d, i: d._dispatch(i.key, i.device),
        RunTail: lambda d, i: d._run_tail(i.frame_id, i.device),
        Complete: lambda d, i: d._complete(i.frame_id),
        FailFrame: lambda d, i: d._fail(i.frame_id, i.reason),
        Cancel: lambda d, i: d._cancel(i.key, i.device),
        Stitch: lambda d, i: d._on_stitch(i),
    }

    def _dispatch(self, key: tuple[int, int, int], device: str) -> None:
        fid, stage_i, idx = key
        ctx = self.frames[fid]
        dep = ctx.deployment
        stage = dep.plan.stages[stage_i]
        tile = stage.tiles[idx]
        wiring = dep.wiring.tiles[(stage_i, idx)]
        inputs: dict[str, Any] = {}
        for name, box in tile.in_boxes.items():
            if name == wiring.frame_input:
                inputs[name] = np.ascontiguousarray(ctx.x[:, :, box.h0:box.h1, box.w0:box.w1])
            else:
                inputs[name] = [(s.box, ctx.results[s.tile], s.name) for s in wiring.sources[name]]
        pieces: dict[str, list[Any]] = {}
        for p in tile.pieces_in:
            src = stage.tiles[p.src]
            pieces.setdefault(p.node, []).append((p.box, ctx.results[(stage_i, p.src)], src.pieces_out.index(p)))
        ctx.placed[(stage_i, idx)] = device
        in_bytes = (tile.in_bytes if wiring.frame_input else remote_bytes(dep.wiring, (stage_i, idx), ctx.placed, device))
        cost = {"flops": tile.flops, "in_bytes": in_bytes, "out_bytes": tile.out_bytes + tile.reuse_out_bytes}
        actor = self.devices[device].actor
        refs = actor.run_tile.options(num_returns=2).remote(dep.id, stage_i, idx, inputs, pieces, cost)
        self.pending[refs[0]] = ("tile", key, device)
        self._tile_refs[(key, device)] = refs
        self._sent[(key, device)] = time.monotonic()

    def _cancel(self, key: tuple[int, int, int], device: str) -> None:
        refs = self._tile_refs.get((key, device))
        if refs is not None:
            try:
                ray.cancel(refs[0])
            except Exception:  # noqa: BLE001 - best effort; the scheduler ignores a late result anyway
                pass

    def _run_tail(self, fid: int, device: str) -> None:
        ctx = self.frames[fid]
        dep = ctx.deployment
        if dep.plan.tail.empty:
            # nothing to compute: the driver stitches the outputs itself, straight from the workers.
            # A tile's payload is ready when its metadata is (one task made both), so no waiting.
            self._execute(self.sched.handle(TailDone(fid, device, self.now())))
            return
        parts: dict[str, list[Any]] = {}
        remote = 0  # bytes of the last stage's outputs that lie on other devices
        for name in dep.wiring.last_outputs:
            st = dep.plan.stages[dep.wiring.producers[name]]
            parts[name] = [(t.out_boxes[name], ctx.results[(st.index, t.index)], name) for t in st.tiles]
            remote += sum(dep.wiring.channels[name] * t.out_boxes[name].area * ctx.x.itemsize
                          for t in st.tiles if ctx.placed.get((st.index, t.index)) != device)
        shapes = {n: dep.plan.stages[dep.wiring.producers[n]].shapes[n] for n in parts}
        given = {dep.plan.input_name: ctx.x} if dep.plan.input_name in dep.plan.tail.inputs else {}
        cost = {"flops": dep.plan.tail.flops, "in_bytes": remote, "out_bytes": dep.plan.tail.out_bytes}
        actor = self.devices[device].actor
        meta_ref, out_ref = actor.run_tail.options(num_returns=2).remote(dep.id, parts, shapes, given, cost)
        self.pending[meta_ref] = ("tail", fid, device)
        self._tail_refs[(fid, device)] = out_ref

    def _complete(self, fid: int) -> None:
        ctx = self.frames.pop(fid)
        dep = ctx.deployment
        try:
            if dep.plan.tail.empty:
                last = dep.plan.stages[-1]
                env = {}
                payloads = ray.get([ctx.results[(last.index, t.index)] for t in last.tiles], timeout=60)
                for name in dep.wiring.last_outputs:
                    env[name] = stitch(Box.full(*last.shapes[name][1:]),
                                       [(t.out_boxes[name], pay["out"][name]) for t, pay in zip(last.tiles, payloads)])
                result = dep.finish_outputs(env)
            else:
                result = to_torch_tree(ray.get(ctx.tail_result_ref))
        except Exception as e:  # noqa: BLE001
            ctx.future.set_exception(FrameFailed(f"frame {fid}: collecting the result failed: {e!r}"))
            return
        ctx.done_at = time.monotonic()
        dep.stats.latencies[fid] = ctx.done_at - ctx.submitted
        ctx.future.set_result(result)

    def _fail(self, fid: int, reason: str) -> None:
        ctx = self.frames.pop(fid, None)
        if ctx is not None and not ctx.future.done():
            ctx.future.set_exception(FrameFailed(reason))

    def _record_trace(self, device: str, name: str, meta: dict[str, Any]) -> None:
        self.trace.extend(trace_events(device, name, meta))
        if len(self.trace) > MAX_TRACE:
            del self.trace[: len(self.trace) // 2]
