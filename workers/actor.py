"""The Ray actor around :class:`~workers.executor.TileExecutor`: one per device.

Thin on purpose: it resolves object references (tile outputs of the previous stage, fetched from
the worker that produced them, not through the driver), runs the executor on one thread, and, for
an emulated device, holds each result until the device's emulated timeline says it is delivered.
Every method returns values, never raises for a bad tile: the driver turns them into events.

``run_tile`` is called with ``num_returns=3``: a small metadata dict (what the driver reads), the
outputs, and the reuse exports. The driver only ever fetches the first; later tiles and the tail
receive the other two by reference.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from tiling.geometry import Box
from tiling.regions import TileGeometry

from .emulation import Emulation
from .executor import TileExecutor, TileFailure, to_numpy_tree, to_torch_tree

RefPart = tuple[Box, Any]  # (box, ObjectRef of a dict of outputs) + output name, see _resolve


@ray.remote(max_restarts=0)
class TileWorker:
    """Holds fused stages' weights and computes tiles for one (real or emulated) device."""

    def __init__(self, device_id: str, threads: int = 1, emulation: dict[str, Any] | None = None,
                 prefer_cuda: bool = True) -> None:
        self.device_id = device_id
        self.executor = TileExecutor(threads=threads, prefer_cuda=prefer_cuda)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tile-{device_id}")
        self.emulation = Emulation.from_dict(emulation) if emulation else None
        self.tails: dict[str, Any] = {}
        self.tiles_done = 0

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"device": self.device_id, "pid": os.getpid(), "torch_device": self.executor.device.type,
                "weight_bytes": self.executor.weight_bytes, "tiles_done": self.tiles_done,
                "node_id": ray.get_runtime_context().get_node_id()}

    async def load(self, deployment: str, programs: dict[int, Any], tail: Any = None) -> int:
        """Take a deployment's stage programs (shipped once through the object store)."""
        keys = list(programs)
        progs = await asyncio.gather(*(_await(programs[k]) if isinstance(programs[k], ray.ObjectRef)
                                       else _value(programs[k]) for k in keys))
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(self.pool, self.executor.load, deployment, dict(zip(keys, progs)))
        if tail is not None:
            self.tails[deployment] = await tail if isinstance(tail, ray.ObjectRef) else tail
        return held

    async def unload(self, deployment: str) -> None:
        self.executor.unload(deployment)
        self.tails.pop(deployment, None)

    async def run_tile(self, deployment: str, stage: int, geo: TileGeometry, inputs: dict[str, Any],
                       pieces: dict[str, list[tuple[Box, Any, int]]], cost: dict[str, int]) -> tuple[Any, Any, Any]:
        arrive = time.monotonic()
        try:
            resolved, fetched = await _resolve_inputs(inputs)
            resolved_pieces, piece_bytes = await _resolve_pieces(pieces)
        except Exception as e:  # noqa: BLE001 - a lost producer: the driver re-runs it and us
            fail = TileFailure("InputLost", f"{type(e).__name__}: {e}", retryable=True)
            return self._meta(fail, arrive, None), None, None
        timeline = None
        if self.emulation is not None:
            timeline = self.emulation.admit(arrive, cost["in_bytes"] + piece_bytes, cost["flops"],
                                            cost["out_bytes"])
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(self.pool, self.executor.run, deployment, stage, geo, resolved,
                                         resolved_pieces)
        if isinstance(res, TileFailure):
            return self._meta(res, arrive, timeline), None, None
        self.tiles_done += 1
        if timeline is not None:
            await asyncio.sleep(max(0.0, timeline.done - time.monotonic()))
        meta = self._meta(None, arrive, timeline)
        meta.update(compute_s=res.compute_s, bytes_in=res.bytes_in + fetched, bytes_out=res.bytes_out,
                    torch_device=res.device)
        return meta, res.outputs, res.exports

    async def run_tail(self, deployment: str, env_parts: dict[str, list[tuple[Box, Any, str]]],
                       shapes: dict[str, tuple[int, ...]], given: dict[str, Any],
                       cost: dict[str, int] | None = None) -> tuple[Any, Any]:
        """Stitch the last stage's outputs from their tiles and run the tail here."""
        arrive = time.monotonic()
        timeline = None
        try:
            env: dict[str, Any] = {k: v for k, v in given.items()}
            for name, parts in env_parts.items():
                arrs = await asyncio.gather(*(_await(ref) for _, ref, _ in parts))
                full = None
                for (box, _, out_name), outs in zip(parts, arrs):
                    a = outs[out_name]
                    if full is None:
                        full = np.empty((a.shape[0], *shapes[name]), dtype=a.dtype)
                    full[:, :, box.h0:box.h1, box.w0:box.w1] = a
                env[name] = full
            tail = self.tails[deployment]
            if self.emulation is not None and cost is not None:
                timeline = self.emulation.admit(arrive, cost["in_bytes"], cost["flops"], cost["out_bytes"])
            loop = asyncio.get_running_loop()

            def work() -> Any:
                t0 = time.perf_counter()
                out = tail.run(to_torch_tree(env))
                return to_numpy_tree(out), time.perf_counter() - t0

            out, dt = await loop.run_in_executor(self.pool, work)
        except Exception as e:  # noqa: BLE001
            fail = TileFailure(type(e).__name__, str(e), retryable=not isinstance(e, (ValueError, TypeError)))
            return self._meta(fail, arrive, timeline), None
        if timeline is not None:
            await asyncio.sleep(max(0.0, timeline.done - time.monotonic()))
        meta = self._meta(None, arrive, timeline)
        meta["compute_s"] = dt
        return meta, out

    def _meta(self, fail: TileFailure | None, arrive: float, timeline: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {"device": self.device_id, "ok": fail is None, "arrive": arrive,
                                "finish": time.monotonic()}
        if fail is not None:
            meta.update(error=fail.error, message=fail.message, retryable=fail.retryable)
        if timeline is not None:
            meta["timeline"] = timeline.as_dict()
        return meta


async def _await(ref: Any) -> Any:
    return await ref


async def _value(v: Any) -> Any:
    return v


async def _resolve_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Stage inputs: an array (first stage, sent by the driver) or parts held by other workers."""
    out: dict[str, Any] = {}
    fetched = 0
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            out[name] = value
            continue
        boxes = [b for b, _, _ in value]
        dicts = await asyncio.gather(*(_await(ref) for _, ref, _ in value))
        parts = []
        for b, d, (_, _, out_name) in zip(boxes, dicts, value):
            arr = d[out_name]
            parts.append((b, arr))
            fetched += arr.nbytes
        out[name] = parts
    return out, 0


async def _resolve_pieces(pieces: dict[str, list[tuple[Box, Any, int]]]) -> tuple[dict[str, Any], int]:
    out: dict[str, list[tuple[Box, np.ndarray]]] = {}
    nbytes = 0
    for node, plist in pieces.items():
        lists = await asyncio.gather(*(_await(ref) for _, ref, _ in plist))
        for (box, _, k), exports in zip(plist, lists):
            arr = exports[k]
            out.setdefault(node, []).append((box, arr))
            nbytes += arr.nbytes
    return out, nbytes
