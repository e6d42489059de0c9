"""The Ray actor around :class:`~workers.executor.TileExecutor`: one per device.

Thin on purpose: it resolves object references (tile outputs of the previous stage, fetched from
the worker that produced them, not through the driver), runs the executor on one thread, and, for
an emulated device, holds each result until the device's emulated timeline says it is delivered.
Every method returns values, never raises for a bad tile: the driver turns them into events.

``run_tile`` is called with ``num_returns=3``: its :class:`~workers.report.Report` (what the driver
reads), the payload ``{"out": outputs, "exp": reuse exports}``, and the partials of the stage's
reduce points. The driver fetches the report; later tiles, neighbours and the tail receive the
payload by reference, from the worker that made it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import ray
import torch

from tiling.geometry import Box
from tiling.reduce import ReducePoint, combine, partial_key
from tiling.regions import TileGeometry
from tiling.stitch import stitch

from .executor import (
    TileExecutor,
    TileFailure,
    keep_freed_activations,
    to_numpy_tree,
    to_torch_tree,
)
from .report import Cost, Report


class Timeline(Protocol):
    """When an emulated device receives, computes and delivers one tile (its own clock)."""

    @property
    def done(self) -> float: ...

    def as_dict(self) -> dict[str, float]: ...


class Emulated(Protocol):
    """A device emulation (see :class:`sims.emulation.Emulation`): admits work, says when it is done."""

    slow_factor: float

    def admit(self, now: float, bytes_in: int, flops: int, bytes_out: int) -> Timeline: ...


PARTIAL_SUFFIX = partial_key("")  # the suffix every partial's key ends with
RefPart = tuple[Box, Any]  # (box, ObjectRef of a dict of outputs) + output name, see _resolve


@ray.remote(max_restarts=0, max_concurrency=32)
class TileWorker:
    """Holds fused stages' weights and computes tiles for one (real or emulated) device.

    A threaded actor (Ray's sync path is faster than asyncio's here: about 1.0 vs 1.4 ms a call):
    several calls may be in flight, and transfers of the next tile overlap the compute of this one.
    """

    def __init__(self, device_id: str, threads: int = 1, emulation: Emulated | None = None,
                 prefer_cuda: bool = True) -> None:
        self.device_id = device_id
        keep_freed_activations()  # this process only computes tiles
        self.executor = TileExecutor(threads=threads, prefer_cuda=prefer_cuda)
        self.emulation = emulation  # handed in (sims.emulation.Emulation): this package never imports sims
        self.tails: dict[str, Any] = {}
        self.geometries: dict[tuple[str, int], list[TileGeometry]] = {}
        self.tiles_done = 0
        # every torch computation runs on this one thread: one tile at a time, as on the device;
        # one malloc arena instead of one per Ray thread (32 threads each keeping a frame's worth
        # of freed activations reached 7 GB); and one OpenMP team (libgomp keeps a team per calling
        # thread: computing under a lock on whichever Ray thread called cut 0.2 ms of hand-off a
        # tile, but host*2 throughput against plain torch fell from 2.4-2.8x to 0.65-0.84x)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{device_id}")
        self._admit = threading.Lock()

    def slow(self, factor: float) -> float:
        """An emulated device computes ``factor`` times slower from now on (1.0 restores it): what
        heat or a co-located job does to a real one. Returns the factor now in force."""
        if self.emulation is None:
            raise ValueError(f"{self.device_id} is not emulated: only emulated devices can be slowed")
        if not factor > 0:
            raise ValueError(f"slow factor must be > 0, got {factor!r}")
        with self._admit:
            self.emulation.slow_factor = float(factor)
        return float(factor)

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"device": self.device_id, "pid": os.getpid(), "torch_device": self.executor.device.type,
                "weight_bytes": self.executor.weight_bytes, "tiles_done": self.tiles_done,
                "node_id": ray.get_runtime_context().get_node_id()}

    def load(self, deployment: str, programs: dict[int, Any], tail: Any = None, geometries: Any = None) -> int:
        """Take a deployment's stage programs and tile geometries (shipped once through the object store)."""
        progs = {k: _get(v) for k, v in programs.items()}
        if geometries is not None:
            for k, g in _get(geometries).items():
                self.geometries[(deployment, k)] = g
        if tail is not None:
            self.tails[deployment] = _get(tail)
        return self._compute.submit(self.executor.load, deployment, progs).result()

    def unload(self, deployment: str) -> None:
        self._compute.submit(self.executor.unload, deployment).result()
        self.tails.pop(deployment, None)
        for key in [k for k in self.geometries if k[0] == deployment]:
            del self.geometries[key]

    def run_tile(self, deployment: str, stage: int, tile: int, inputs: dict[str, Any],
                 pieces: dict[str, list[tuple[Box, Any, int]]], cost: Cost,
                 reduced: dict[str, tuple[ReducePoint, list[Any]]] | None = None) -> tuple[Report, Any, Any]:
        """Called with ``num_returns=3``: the report, the payload (maps and reuse pieces, kept here and
        handed on by reference) and the partials of the stage's reduce points (a few KB, fetched by
        every tile that continues after the reduce point, so no map crosses it)."""
        arrive = time.monotonic()
        try:
            geo = self.geometries[(deployment, stage)][tile]
            resolved = _resolve_inputs(inputs)
            resolved_pieces, piece_bytes = _resolve_pieces(pieces)
            combined = _combine(reduced or {})
        except Exception as e:  # noqa: BLE001 - a lost producer: the driver re-runs it and us
            fail = TileFailure("InputLost", f"{type(e).__name__}: {e}", retryable=True)
            return self._meta(fail, arrive, None), None, None
        timeline = None
        if self.emulation is not None:
            with self._admit:
                timeline = self.emulation.admit(arrive, cost.in_bytes + piece_bytes, cost.flops, cost.out_bytes)
        res = self._compute.submit(self.executor.run, deployment, stage, geo, resolved, resolved_pieces,
                                   combined).result()
        computed_at = time.monotonic()
        if isinstance(res, TileFailure):
            return self._meta(res, arrive, timeline), None, None
        self.tiles_done += 1
        if timeline is not None:
            time.sleep(max(0.0, timeline.done - time.monotonic()))
        # bytes_in: what crossed to this device (the driver's priced crop: parts made here do not
        # move, as in the simulator), not what the tile read (res.bytes_in counts local parts too)
        meta = self._meta(None, arrive, timeline, compute_s=res.compute_s, bytes_in=cost.in_bytes + piece_bytes,
                          bytes_out=res.bytes_out, torch_device=res.device, computed_at=computed_at)
        maps = {k: v for k, v in res.outputs.items() if not k.endswith(PARTIAL_SUFFIX)}
        partials = {k: v for k, v in res.outputs.items() if k.endswith(PARTIAL_SUFFIX)}
        return meta, {"out": maps, "exp": res.exports}, partials

    def run_tail(self, deployment: str, env_parts: dict[str, list[tuple[Box, Any, str]]],
                 shapes: dict[str, tuple[int, ...]], given: dict[str, Any],
                 cost: Cost | None = None) -> tuple[Report, Any]:
        """Stitch the last stage's outputs from their tiles and run the tail here."""
        arrive = time.monotonic()
        timeline = None
        try:
            env: dict[str, Any] = dict(given)
            for name, parts in env_parts.items():
                payloads = ray.get([ref for _, ref, _ in parts])
                env[name] = stitch(Box.full(*shapes[name][1:]),
                                   [(box, pay["out"][out]) for (box, _, out), pay in zip(parts, payloads)])
            tail = self.tails[deployment]
            if self.emulation is not None and cost is not None:
                with self._admit:
                    timeline = self.emulation.admit(arrive, cost.in_bytes, cost.flops, cost.out_bytes)
            def work() -> tuple[Any, float]:
                t0 = time.perf_counter()
                out = to_numpy_tree(tail.run(to_torch_tree(env)))
                return out, time.perf_counter() - t0

            out, dt = self._compute.submit(work).result()
        except Exception as e:  # noqa: BLE001
            fail = TileFailure(type(e).__name__, str(e), retryable=not isinstance(e, (ValueError, TypeError)))
            return self._meta(fail, arrive, timeline), None
        if timeline is not None:
            time.sleep(max(0.0, timeline.done - time.monotonic()))
        return self._meta(None, arrive, timeline, compute_s=dt), out

    def _meta(self, fail: TileFailure | None, arrive: float, timeline: Any, **figures: Any) -> Report:
        tl = timeline.as_dict() if timeline is not None else None
        if fail is not None:
            return Report(self.device_id, False, arrive, time.monotonic(), timeline=tl, error=fail.error,
                          message=fail.message, retryable=fail.retryable)
        return Report(self.device_id, True, arrive, time.monotonic(), timeline=tl, **figures)


def _get(v: Any) -> Any:
    return ray.get(v) if isinstance(v, ray.ObjectRef) else v


def _resolve_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Stage inputs: an array (first stage, sent by the driver) or parts held by other workers."""
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            out[name] = value
            continue
        payloads = ray.get([ref for _, ref, _ in value])
        out[name] = [(b, pay["out"][out_name]) for (b, _, out_name), pay in zip(value, payloads)]
    return out


def _combine(reduced: dict[str, tuple[ReducePoint, list[Any]]]) -> dict[str, np.ndarray]:
    """Each reduce point's value from every tile's partial, combined in tile order (the same bits
    on every device that continues after it). The partials' bytes are in the tile's cost already."""
    out: dict[str, np.ndarray] = {}
    for node, (point, refs) in reduced.items():
        parts = [pay[point.key] for pay in ray.get(refs)]
        out[node] = combine(point, [torch.from_numpy(np.ascontiguousarray(a)) for a in parts]).numpy()
    return out


def _resolve_pieces(pieces: dict[str, list[tuple[Box, Any, int]]]) -> tuple[dict[str, Any], int]:
    out: dict[str, list[tuple[Box, np.ndarray]]] = {}
    nbytes = 0
    for node, plist in pieces.items():
        payloads = ray.get([ref for _, ref, _ in plist])
        for (box, _, k), pay in zip(plist, payloads):
            arr = pay["exp"][k]
            out.setdefault(node, []).append((box, arr))
            nbytes += arr.nbytes
    return out, nbytes
