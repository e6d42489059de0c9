"""The Ray world's transport: tiles and tails as ``TileWorker`` actor calls, results as reports.

Each call returns two object references: a small :class:`~workers.report.Report` (what the driver
reads) and the payload, which stays in the worker's object store and is handed to later tiles,
neighbours and the tail by reference. :meth:`RayTransport.poll` turns ready reports into driver
calls; a dead actor becomes ``on_device_lost`` (its stored results lost too when it ran on another
Ray node than the driver), any other Ray error a retryable failure report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from scheduler import TileKey
from tiling.geometry import Box
from tiling.stitch import stitch
from workers.executor import to_torch_tree
from workers.report import Report

from .transport import Gather, TailWork, TileWork

if TYPE_CHECKING:
    from .deployment import DeploymentState
    from .driver import Device, Driver

log = logging.getLogger("tilefleet.driver")

KV_NAMESPACE = "tilefleet"
TILES_KEY = "tilefleet/tiles/"  # + Ray node id (hex): ascii count of tiles done there, all drivers together
PUBLISH_EVERY_S = 2.0
LOST_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError, ray.exceptions.ObjectLostError)


class RayTransport:
    def __init__(self, devices: dict[str, Device], *, publish_tiles: bool = False) -> None:
        self.devices = devices
        self.driver: Driver | None = None  # set once the driver exists (it reports back to it)
        self._pending: dict[Any, tuple[str, Any, str, Any]] = {}  # report ref -> (kind, key or frame, device, refs)
        self._tile_refs: dict[tuple[TileKey, str], Any] = {}  # -> the 3 refs of run_tile
        self._tail_refs: dict[tuple[int, str], Any] = {}  # (frame, device) -> the output ref of run_tail
        self._node_id = ray.get_runtime_context().get_node_id()
        # tiles done per Ray node, published to the cluster's KV for `tilefleet devices` (LAN clusters)
        self._publish = publish_tiles
        self._unpublished: dict[str, int] = {}
        self._published_at = 0.0

    # --- the Transport protocol ----------------------------------------------------------------------
    def load(self, deployment: DeploymentState, devices: list[str]) -> None:
        ray.get([self.devices[d].actor.load.remote(deployment.id, *deployment.shipped) for d in devices], timeout=300)

    def unload(self, deployment: str, devices: list[str]) -> None:
        for d in devices:
            try:
                self.devices[d].actor.unload.remote(deployment)
            except Exception:  # noqa: BLE001 - a dead actor holds nothing
                pass

    def dispatch(self, device: str, work: TileWork) -> None:
        # a tile's handle is (payload ref, partials ref): maps and pieces come from the first,
        # reduce points' partials from the second, so no map is fetched to reduce
        inputs: dict[str, Any] = {n: _crop(work.frame, b) for n, b in work.frame_boxes.items()}
        inputs.update({n: [(b, h[0], o) for b, h, o in parts] for n, parts in work.sources.items()})
        pieces = {n: [(b, h[0], k) for b, h, k in ps] for n, ps in work.pieces.items()}
        reduced = {n: (point, [h[1] for h in hs]) for n, (point, hs) in work.reduced.items()}
        _, stage, idx = work.key

        def call() -> None:
            actor = self.devices[device].actor
            refs = actor.run_tile.options(num_returns=3).remote(work.deployment, stage, idx, inputs, pieces,
                                                                work.cost, reduced or None)
            self._pending[refs[0]] = ("tile", work.key, device, refs)
            self._tile_refs[(work.key, device)] = refs  # the latest call of this tile there, to cancel

        self._guard(device, call)

    def run_tail(self, device: str, work: TailWork) -> None:
        given = {work.frame_name: work.frame} if work.frame_name else {}
        parts = {n: [(b, h[0], o) for b, h, o in ps] for n, ps in work.parts.items()}

        def call() -> None:
            actor = self.devices[device].actor
            meta_ref, out_ref = actor.run_tail.options(num_returns=2).remote(work.deployment, parts, work.shapes,
                                                                             given, work.cost)
            self._pending[meta_ref] = ("tail", work.frame_id, device, out_ref)
            self._tail_refs[(work.frame_id, device)] = out_ref

        self._guard(device, call)

    def cancel(self, key: TileKey, device: str) -> None:
        refs = self._tile_refs.get((key, device))
        if refs is not None:
            try:
                ray.cancel(refs[0])
            except Exception:  # noqa: BLE001 - best effort; the scheduler ignores a late result anyway
                pass

    def forget(self, device: str) -> None:
        # its calls' references too: a device that fails and comes back many times must not leave
        # entries (and the objects they pin) behind each time
        for ref, (_, _, d, _) in list(self._pending.items()):
            if d == device:
                self._pending.pop(ref)
        for refs in (self._tile_refs, self._tail_refs):
            for k in [k for k in refs if k[1] == device]:
                del refs[k]

    def result(self, deployment: DeploymentState, gather: Gather | None, tail_handle: Any) -> Any:
        if gather is None:
            return to_torch_tree(ray.get(tail_handle, timeout=60))
        env = {}
        for name, parts in gather.parts.items():
            payloads = ray.get([h[0] for _, h, _ in parts], timeout=60)
            env[name] = stitch(Box.full(*gather.shapes[name][1:]),
                               [(box, pay["out"][out]) for (box, _, out), pay in zip(parts, payloads)])
        return deployment.finish_outputs(env)

    def accepted(self, device: str) -> None:
        if self._publish:
            node = self.devices[device].node_id
            self._unpublished[node] = self._unpublished.get(node, 0) + 1

    # --- delivering reports (the loop calls this) ----------------------------------------------------
    def poll(self, timeout: float) -> bool:
        """Deliver every ready report to the driver; wait up to ``timeout`` for one if none is ready.
        Returns whether calls are still pending."""
        if self._pending:
            refs = list(self._pending)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not ready and timeout > 0:
                ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            for ref in ready:
                self._deliver(ref)
        if self._unpublished and (time.monotonic() - self._published_at > PUBLISH_EVERY_S or not self._pending):
            self._publish_tiles()
        return bool(self._pending)

    def _deliver(self, ref: Any) -> None:
        entry = self._pending.pop(ref, None)
        if entry is None or self.driver is None:
            return  # dropped meanwhile (its device was lost while this batch was being handled)
        kind, subject, device, refs = entry
        # each call answers with its own refs: a tile cancelled and sent again to the same device has
        # two calls in flight, and the first to end must neither take nor drop the second's
        latest = self._tile_refs if kind == "tile" else self._tail_refs
        if latest.get((subject, device)) is refs:
            del latest[(subject, device)]
        try:
            report: Report = ray.get(ref)
        except LOST_ERRORS as e:
            self._lost(device, type(e).__name__)
            return
        except ray.exceptions.TaskCancelledError:
            if kind == "tile":
                self._tile_refs.pop((subject, device), None)
            return  # we cancelled it (its inputs were lost, its frame given up); the scheduler no longer expects it
        except ray.exceptions.RayError as e:  # a task error, or anything else Ray reports: a retryable failure
            report = Report(device, False, error=type(e).__name__, message=(str(e).splitlines() or [""])[0])
        if kind == "tile":
            self.driver.on_report(subject, device, report, (refs[1], refs[2]) if report.ok else None)
        else:
            self.driver.on_tail_report(subject, device, report, refs)

    def _guard(self, device: str, call: Callable[[], None]) -> None:
        """A call on a dead actor raises at once: that device is lost."""
        try:
            call()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as e:
            self._lost(device, type(e).__name__)

    def _lost(self, device: str, why: str) -> None:
        if self.driver is not None:
            # results stored on another node than the driver's may have gone with the device
            self.driver.on_device_lost(device, why, results_lost=self.devices[device].node_id != self._node_id)

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


def _crop(x: np.ndarray, box: Box) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, box.h0:box.h1, box.w0:box.w1])
