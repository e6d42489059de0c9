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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import tiling
from scheduler import FrameSpec

from .stats import DeploymentStats, write_chrome_trace
from .wiring import Wiring, frame_spec, wire


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
        """One frame or a batch as the plan's NCHW array; refuses what the deployment cannot take."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise tiling.InputMismatch(f"frames must be torch tensors (or numpy arrays), got {type(x).__name__}")
        single = x.dim() == 3
        if self.preprocess is not None:
            if x.dtype != torch.uint8:
                raise tiling.InputMismatch(
                    f"this deployment takes raw uint8 frames ({self.preprocess.layout.upper()}, 0-255) and "
                    f"preprocesses them on the devices ({self.preprocess.name}); got {x.dtype}")
            x = self.preprocess.to_nchw(x)  # a uint8 permute when frames arrive HWC
        else:
            if x.dtype == torch.uint8:
                raise tiling.InputMismatch(
                    "uint8 frames need a declared preprocessing: cluster.deploy(model, example_uint8, "
                    "preprocess='imagenet' | 'darknet' | 'none,scale=1/255,...') ships them as bytes and "
                    "normalises them on the devices (see docs/models.md); or send float frames")
            if x.is_floating_point() and x.dtype != self.plan.dtype:
                x = x.to(self.plan.dtype)  # float16 / float64 / bfloat16 frames are converted
            if single:
                x = x.unsqueeze(0)
        self.plan.check_input(x)
        arr = x.detach().cpu().contiguous().numpy()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # numpy's check: ~15x faster than torch's here
            raise tiling.InputMismatch("the frame contains NaN or Inf; clean it (torch.nan_to_num) before sending")
        return arr, single

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
        """Results in submission order, keeping ``in_flight`` frames in the cluster at once."""
        depth = in_flight or max(2, self._alive_devices())
        window: deque[Future] = deque()
        for x in frames:
            window.append(self.submit(x))
            if len(window) >= depth:
                yield window.popleft().result(timeout=timeout)
        while window:
            yield window.popleft().result(timeout=timeout)

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
