"""A model deployed on a cluster: the public API (:class:`Deployment`) and what the driver owns of it
(:class:`DeploymentState`).

The split keeps threads apart. Client threads call ``Deployment`` (submit, stream, stats, trace);
the driver thread alone reads and writes ``DeploymentState`` (the plan's wiring, per-device
counters, latencies). Everything a client sees of the driver's side is a snapshot made on the
driver thread through ``Driver.call``.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import tiling
from scheduler import FrameSpec, TileKey, TileRef
from workers.report import Cost

from .stats import DeploymentStats, write_chrome_trace
from .transport import Gather, Part, Piece, TailWork, TileWork
from .wiring import Wiring, frame_spec, remote_bytes, wire


class DriverHandle(Protocol):
    """What a deployment asks of the driver's thread (:class:`fleet.runtime.loop.DriverThread`):
    thread-safe calls only. A protocol, so this module stays below the driver in the import order."""

    def call(self, fn: Callable[[], Any]) -> Any: ...

    def submit(self, state: DeploymentState, x: np.ndarray) -> FrameFuture: ...

    def snapshot(self, state: DeploymentState, detail: bool = True) -> dict[str, Any]: ...

    def unload(self, state: DeploymentState) -> None: ...

    def trace_copy(self) -> list[Any]: ...


_deployment_ids = itertools.count()


class FrameFuture(Future):
    """A frame's result. :meth:`cancel` (and ``Deployment.cancel(future, reason)``) also stop the
    frame's work in the fleet: planned tiles are dropped, queued ones cancelled, running ones'
    results ignored. ``frame_id`` is the driver's id of the frame (None until it is known)."""

    def __init__(self, frame_id: int | None = None, cancel_frame: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.frame_id = frame_id
        self._cancel_frame = cancel_frame

    def request_cancel(self, reason: str) -> bool:
        """Ask the runtime to give the frame up; it then fails with ``FrameCancelledError(reason)``
        unless its result arrives first. False when the future is already done."""
        if self.done() or self._cancel_frame is None:
            return False
        self._cancel_frame(reason)
        return True

    def cancel(self) -> bool:
        """``Future.cancel``: the future is cancelled at once (``CancelledError``), and the frame's
        work in the fleet is given up too."""
        pending = not self.done()
        if not super().cancel():
            return False
        if pending and self._cancel_frame is not None:
            self._cancel_frame("cancelled (Future.cancel)")
        return True


def settle(dst: Future, src: Future) -> None:
    """Copy ``src``'s outcome into ``dst``, unless ``dst`` was cancelled meanwhile."""
    try:
        e = src.exception()
        if e is not None:
            dst.set_exception(e)
        else:
            dst.set_result(src.result())
    except InvalidStateError:
        pass  # dst was cancelled by its owner: nobody wants the outcome


class ClusterClosed(RuntimeError):
    """The cluster (or deployment) was closed; connect again."""


def new_deployment_id() -> str:
    return f"dep{next(_deployment_ids)}"


@dataclass
class DeploymentState:
    """What the driver needs of a deployment, and the statistics it keeps for it (driver thread only)."""

    id: str
    plan: tiling.Plan
    wiring: Wiring
    shipped: Any  # (programs, tail, geometries) object references of programs, tail, geometries: late joiners load them
    tail_weights: int
    frame_bytes: int
    stats: DeploymentStats = field(default_factory=DeploymentStats)
    closed: bool = False

    @classmethod
    def build(cls, dep_id: str, plan: tiling.Plan, frame_itemsize: int, shipped: Any = None) -> DeploymentState:
        """The driver's view of a plan (``shipped``: the object references the Ray world made)."""
        return cls(id=dep_id, plan=plan, wiring=wire(plan), shipped=shipped,
                   tail_weights=sum(p.numel() * p.element_size() for p in plan.tail.gm.parameters()),
                   frame_bytes=int(np.prod(plan.input_shape)) * frame_itemsize)

    def frame_spec(self, fid: int) -> FrameSpec:
        return frame_spec(self.wiring, fid, self.id, self.plan.tail.flops, self.frame_bytes,
                          self.plan.tail.out_bytes, self.tail_weights)

    # --- the work of one tile, one tail, one result (what the driver asks of any deployment) -------------
    def tile_work(self, key: TileKey, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TileWork:
        """Tile ``key`` on ``device``: its crop of the frame ``x``, the handles of the earlier tiles it
        reads (``results``), and what it costs given where those tiles ran (``placed``)."""
        _, stage_i, idx = key
        stage = self.plan.stages[stage_i]
        tile = stage.tiles[idx]
        wiring = self.wiring.tiles[(stage_i, idx)]
        fi = wiring.frame_input
        frame_boxes = {fi: tile.in_boxes[fi]} if fi is not None and fi in tile.in_boxes else {}
        sources: dict[str, list[Part]] = {name: [(s.box, results[s.tile], s.name) for s in srcs]
                                          for name, srcs in wiring.sources.items()}
        pieces: dict[str, list[Piece]] = {}
        for p in tile.pieces_in:
            src = stage.tiles[p.src]
            pieces.setdefault(p.node, []).append((p.box, results[(stage_i, p.src)], src.pieces_out.index(p)))
        in_bytes = tile.in_bytes if wiring.frame_input else remote_bytes(self.wiring, (stage_i, idx), placed, device)
        cost = Cost(tile.flops, in_bytes, tile.out_bytes + tile.reuse_out_bytes)
        reduced = {node: (point, [results[r] for r in refs]) for node, (point, refs) in wiring.reduced.items()}
        if wiring.pinned_to is not None or wiring.reduced:  # what crosses the reduce point to this tile
            maps = sum(self.wiring.channels[src.name] * src.overlap.area * self.wiring.itemsize(src.name)
                       for srcs in wiring.sources.values() for src in srcs
                       if src.tile == wiring.pinned_to and placed.get(src.tile) != device)
            partials = sum(point.partial_bytes * sum(placed.get(r) != device for r in refs)
                           for point, refs in wiring.reduced.values())
            self.stats.record_continuation(maps, partials)
        return TileWork(self.id, key, x if frame_boxes else None, frame_boxes, sources, pieces, cost,
                        tile.reuse_in_bytes, reduced)

    def tail_work(self, fid: int, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TailWork | None:
        """The layers after the last stage on ``device``; None when there are none (the result is
        stitched at the client, straight from the workers)."""
        plan = self.plan
        if plan.tail.empty:
            return None
        parts, shapes = self._last_parts(results)
        remote = 0  # bytes of the last stage's outputs that lie on other devices
        for name in parts:
            st = plan.stages[self.wiring.producers[name]]
            remote += sum(self.wiring.channels[name] * t.out_boxes[name].area * self.wiring.itemsize(name)
                          for t in st.tiles if placed.get((st.index, t.index)) != device)
        reads_frame = plan.input_name in plan.tail.inputs
        return TailWork(self.id, fid, parts, shapes, x if reads_frame else None,
                        plan.input_name if reads_frame else None, Cost(plan.tail.flops, remote, plan.tail.out_bytes))

    def gather(self, results: Mapping[TileRef, Any]) -> Gather | None:
        """How to assemble the result where no tail runs (None: the tail's output is the result)."""
        if not self.plan.tail.empty:
            return None
        return Gather(*self._last_parts(results))

    def _last_parts(self, results: Mapping[TileRef, Any]) -> tuple[dict[str, list[Part]], dict[str, tuple[int, ...]]]:
        """The last stage's outputs by tile (what the tail or the final stitch reads)."""
        parts: dict[str, list[Part]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.wiring.last_outputs:
            st = self.plan.stages[self.wiring.producers[name]]
            parts[name] = [(t.out_boxes[name], results[(st.index, t.index)], name) for t in st.tiles]
            shapes[name] = st.shapes[name]
        return parts, shapes

    def finish_outputs(self, env: dict[str, np.ndarray]) -> Any:
        """The frame's result from its last stage's stitched outputs (a plan with no tail to ship)."""
        return self.plan.tail.run({k: torch.from_numpy(v) for k, v in env.items()})

    @property
    def weight_bytes(self) -> int:
        return sum(s.weight_bytes for s in self.plan.stages)


class Deployment:
    """One model deployed on a cluster: fixed (C, H, W) and dtype, any batch size.

    Made by ``Cluster.deploy``. ``plan`` and ``choice`` (the auto-planner's candidates, or None)
    are read-only; frames go in through :meth:`submit`, :meth:`__call__` or :meth:`stream`.
    """

    def __init__(self, state: DeploymentState, driver: DriverHandle, choice: Any, deploy_s: float,
                 alive_devices: Callable[[], int], cluster_check: Callable[[], None], scale: float,
                 detection_times: Callable[[], dict[str, float | None]],
                 on_close: Callable[[Deployment], None], preprocess: tiling.Preprocess | None = None) -> None:
        self._state = state
        self._driver = driver
        self.id = state.id
        self.plan = state.plan
        self.choice = choice
        self.deploy_s = deploy_s
        self._alive_devices = alive_devices
        self._cluster_check = cluster_check
        self._scale = scale
        self._detection_times = detection_times
        self._on_close = on_close
        self.preprocess = preprocess  # frames are raw uint8 and normalised on the devices
        self.closed = False

    # --- frames --------------------------------------------------------------------------------------
    def _as_batch(self, x: Any) -> tuple[np.ndarray, bool]:
        """One frame or a batch as the plan's NCHW array; refuses what the deployment cannot take,
        saying what was wrong and what is accepted (:func:`check_frame`)."""
        return check_frame(x, self.plan, self.preprocess)

    def submit(self, x: torch.Tensor) -> FrameFuture:
        """Send a frame; returns a future of the result (``.result(timeout=...)``); see :meth:`cancel`."""
        self._check()
        arr, single = self._as_batch(x)
        inner = self._driver.submit(self._state, arr)
        if not single:
            return inner
        outer = FrameFuture(None, inner.request_cancel)

        def unwrap(f: Future) -> None:
            if f.cancelled():
                outer.cancel()
                return
            try:
                try:
                    result = map_tensors(f.result(), lambda t: t[0])
                except BaseException as e:  # noqa: BLE001
                    outer.set_exception(e)
                else:
                    outer.set_result(result)
            except InvalidStateError:
                pass  # outer was cancelled by its owner

        inner.add_done_callback(unwrap)
        return outer

    def cancel(self, future: Future, reason: str = "cancelled") -> bool:
        """Give up on a submitted frame (its client left, its deadline passed): the fleet stops
        spending time on it (planned tiles dropped, queued ones cancelled, running ones' results
        ignored) and ``future`` fails with ``FrameCancelledError(reason)``, unless the result
        arrives first. False when the future is done already or not one of :meth:`submit`'s."""
        return isinstance(future, FrameFuture) and future.request_cancel(reason)

    def __call__(self, x: torch.Tensor, timeout: float | None = 300) -> Any:
        return self.submit(x).result(timeout=timeout)

    def stream(self, frames: Iterable[torch.Tensor], in_flight: int | None = None,
               timeout: float | None = 300) -> Iterator[Any]:
        """Results in submission order, keeping ``in_flight`` frames in the cluster at once.

        When ``frames`` raises, or a frame is refused (:class:`tiling.InputMismatch`), the results
        of every frame sent before it are yielded first, then the error is raised; nothing after it
        is sent, and the deployment serves on.
        """
        if isinstance(frames, (torch.Tensor, np.ndarray)) and frames.ndim == 3:
            raise tiling.InputMismatch(f"stream() takes an iterable of frames; got one {tuple(frames.shape)} frame: "
                                       "call the deployment with it, or pass [frame]")
        try:
            it = iter(frames)
        except TypeError:
            raise tiling.InputMismatch(f"stream() takes an iterable of frames (a list, a generator, an (N, C, H, W) "
                                       f"batch), got {type(frames).__name__}") from None
        depth = in_flight or max(2, self._alive_devices())
        window: deque[Future] = deque()
        failure: BaseException | None = None
        while True:
            try:
                x = next(it)
                window.append(self.submit(x))
            except StopIteration:
                break
            except Exception as e:  # the source or a refused frame: what was sent is delivered first
                failure = e
                break
            if len(window) >= depth:
                yield window.popleft().result(timeout=timeout)
        while window:
            yield window.popleft().result(timeout=timeout)
        if failure is not None:
            raise failure

    # --- reports -------------------------------------------------------------------------------------
    def stats(self, detail: bool = True) -> dict[str, Any]:
        """Per device: tiles, busy (emulated compute) seconds, bytes, peak bytes, steals, retries;
        per frame: latency; per tile: dispatch overhead. Steals and retries are the cluster's (the
        scheduler's) counters. A snapshot taken on the driver thread; ``detail=False`` leaves out the
        per-frame latencies and per-tile overheads (what a metrics scrape needs, at constant cost)."""
        snap = self._driver.snapshot(self._state, detail)
        snap.update(deploy_s=self.deploy_s, scale=self._scale, detection_s=self._detection_times())
        return snap

    def reset_stats(self) -> None:
        """Forget per-frame latencies and per-device counters (e.g. after warm-up frames)."""
        self._driver.call(self._state.stats.reset)

    def trace(self, path: str | os.PathLike[str]) -> Path:
        """Write a Chrome trace (chrome://tracing, Perfetto) of tiles and transfers per device."""
        return write_chrome_trace(self._driver.trace_copy(), path)

    def plan_summary(self) -> str:
        text = self.plan.summary()
        if self.choice is not None:
            text += "\n" + self.choice.summary()
        return text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._driver.unload(self._state)
        self._on_close(self)

    def _check(self) -> None:
        if self.closed:
            raise ClusterClosed("this deployment is closed; deploy again")
        self._cluster_check()


def map_tensors(x: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_frame(x: Any, plan: tiling.Plan, preprocess: tiling.Preprocess | None = None) -> tuple[np.ndarray, bool]:
    """A frame (C, H, W) or batch (N, C, H, W) as the plan's contiguous NCHW array, and whether it
    was one frame. Accepted: torch tensors and numpy arrays, of any strides or memory format; float16,
    bfloat16 and float64 frames are converted to the plan's float dtype; raw uint8 frames only where
    the deployment declares ``preprocess=``. Everything else is a :class:`tiling.InputMismatch` that
    says what was wrong and what is accepted; NaN and Inf are refused (they would spread through
    every overlapping tile and make every result of the frame meaningless)."""
    shape = ", ".join(map(str, plan.input_shape))
    accepted = f"frames are ({shape}) or (N, {shape}) torch tensors or numpy arrays"
    if isinstance(x, np.ndarray):
        x = _from_numpy(x, accepted)
    if not isinstance(x, torch.Tensor):
        hint = ("; stack a list of frames with torch.stack(frames), or send them through dep.stream(frames)"
                if isinstance(x, (list, tuple)) else "")
        raise tiling.InputMismatch(f"{accepted}; got {type(x).__name__}{hint}")
    if x.is_nested or x.layout != torch.strided:
        raise tiling.InputMismatch(f"{accepted}, dense; got a nested tensor: send its frames with "
                                   "dep.stream(x.unbind())" if x.is_nested else
                                   f"{accepted}, dense; got a {x.layout} tensor: convert it with x.to_dense()")
    if x.device.type == "meta":
        raise tiling.InputMismatch(f"{accepted}; got a tensor on the meta device, which holds no values")
    if x.dim() not in (3, 4):
        raise tiling.InputMismatch(f"{accepted}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    single = x.dim() == 3
    if single and preprocess is None:
        x = x.unsqueeze(0)
    if preprocess is not None:
        if x.dtype != torch.uint8:
            raise tiling.InputMismatch(
                f"this deployment takes raw uint8 frames ({preprocess.layout.upper()}, 0-255) and "
                f"preprocesses them on the devices ({preprocess.name}); got {x.dtype}")
        x = preprocess.to_nchw(x)  # a uint8 permute when frames arrive HWC
    elif x.dtype == torch.uint8:
        raise tiling.InputMismatch(
            "uint8 frames need a declared preprocessing: cluster.deploy(model, example_uint8, "
            "preprocess='imagenet' | 'darknet' | 'none,scale=1/255,...') ships them as bytes and "
            "normalises them on the devices (see docs/models.md); or send float frames")
    elif x.dtype not in FLOAT_DTYPES:
        hint = ("send its real part (x.real) or magnitude (x.abs())" if x.is_complex() else
                "convert it with x.float() if that is what you mean" if x.dtype == torch.bool else
                "camera frames are uint8, with preprocess= at deploy")
        raise tiling.InputMismatch(f"frames must have a floating-point dtype (float16, bfloat16, float32, float64: "
                                   f"converted to {plan.dtype}); got {x.dtype}: {hint}")
    if x.shape[0] == 0:
        raise tiling.InputMismatch(f"the batch is empty (shape {tuple(x.shape)}); send at least one frame: {accepted}")
    if tuple(x.shape[1:]) != plan.input_shape:
        empty = " (an empty frame)" if 0 in x.shape[1:] else ""
        raise tiling.InputMismatch(f"this deployment is fixed to (C, H, W) = {plan.input_shape}, got "
                                   f"{tuple(x.shape[1:])}{empty}; for frames of another size, partition again: "
                                   "cluster.deploy(model, an_example_of_that_size)")
    if x.is_floating_point() and x.dtype != plan.dtype:
        before = x
        x = x.to(plan.dtype)  # float16 / float64 / bfloat16 frames are converted
        if not bool(torch.isfinite(x).all()) and bool(torch.isfinite(before).all()):
            big = float(before.abs().max())
            raise tiling.InputMismatch(f"the {before.dtype} frame holds values up to {big:.3g}, beyond {plan.dtype}'s "
                                       f"range (max {torch.finfo(plan.dtype).max:.3g}); scale it before sending")
    plan.check_input(x)
    arr = x.detach().cpu().contiguous().numpy()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # numpy's check: ~15x faster than torch's here
        per_frame = ~np.isfinite(arr.reshape(arr.shape[0], -1))
        bad = np.flatnonzero(per_frame.any(axis=1))
        nans = int(np.isnan(arr).sum())
        raise tiling.InputMismatch(
            f"frame {int(bad[0])}{' of the batch' if arr.shape[0] > 1 else ''} holds {nans} NaN and "
            f"{int(per_frame.sum()) - nans} Inf values; frames must be finite (a NaN or Inf would spread through "
            "every overlapping tile): clean it with torch.nan_to_num(x) before sending")
    return arr, single


def _from_numpy(a: np.ndarray, accepted: str) -> torch.Tensor:
    """A numpy frame as a tensor: any strides or byte order; numbers only."""
    if a.dtype.kind not in "biufc":
        raise tiling.InputMismatch(f"{accepted}; got a numpy array of dtype {a.dtype} (not numbers)")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # big-endian data, e.g. from a file: native order, same values
    if not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, order="C")  # a copy: torch shares memory with writable arrays only
    return torch.from_numpy(a)
