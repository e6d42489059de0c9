"""The tile executor: plain torch, no Ray. Holds stage weights once, runs tiles, never raises.

The Ray actor (``workers/actor.py``) is a thin shell around this class, and tests drive it directly.
Tiles arrive as numpy arrays (Ray moves numpy several times faster than torch tensors) covering
exactly the tile's input boxes, or as parts from which those boxes are assembled (outputs of the
previous stage's tiles, handed from worker to worker). The device is chosen here, in one place:
CUDA when torch sees a GPU and the caller allows it, CPU otherwise.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tiling.geometry import Box
from tiling.program import StageProgram
from tiling.regions import TileGeometry
from tiling.stitch import stitch

Part = tuple[Box, np.ndarray]  # a region of some tensor, in that tensor's coordinates


@dataclass
class TileResult:
    outputs: dict[str, np.ndarray]  # stage output name -> the tile's box of it
    exports: list[np.ndarray]  # reuse pieces for neighbours, in geometry.pieces_out order
    compute_s: float  # wall time of the torch work on this host
    bytes_in: int
    bytes_out: int
    device: str = "cpu"


@dataclass
class TileFailure:
    """A tile that could not run: a value, not an exception, so the caller's state never breaks."""

    error: str
    message: str
    retryable: bool
    detail: str = field(default="", repr=False)

    def __str__(self) -> str:
        return f"{self.error}: {self.message}"


def keep_freed_activations(keep_bytes: int = 256 << 20) -> bool:
    """glibc only: serve large allocations from the heap and keep up to ``keep_bytes`` of freed
    memory there, instead of mmapping and unmapping each frame's activations anew.

    glibc maps blocks above 32 MiB (YOLOv2's first activations at 608x608 are 47 MiB) and unmaps
    them when freed, so every tile paid the page faults of zeroing fresh pages again: YOLOv2-16 on
    one thread runs 6% faster without them (0.43 vs 0.45 s). The cost is that a worker keeps up to
    ``keep_bytes`` of freed memory resident. For worker processes only: whether it took effect.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, keep_bytes))


def pick_device(prefer_cuda: bool = True) -> torch.device:
    """CUDA when torch itself sees a GPU (Ray's fake ``num_gpus`` does not count), else CPU."""
    if prefer_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TileExecutor:
    """Runs tiles of the stages it holds, on one torch device, with a fixed thread count."""

    def __init__(self, *, threads: int | None = None, prefer_cuda: bool = True, allow_tf32: bool = False,
                 channels_last: bool | None = None) -> None:
        self.device = pick_device(prefer_cuda)
        # NHWC: oneDNN's CPU convolutions run about 1.6x faster on it than on NCHW (YOLOv2-16, one
        # thread: 0.40 s vs 0.66 s). Tiles still cross Ray as NCHW arrays; only the compute is NHWC.
        self.channels_last = (self.device.type == "cpu") if channels_last is None else channels_last
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if self.device.type == "cuda":
            # TF32 would trade exactness (1e-4) for speed: only when the user asks
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        self.stages: dict[tuple[str, int], StageProgram] = {}

    # --- weights ---------------------------------------------------------------------------------
    def load(self, deployment: str, programs: Mapping[int, StageProgram]) -> int:
        """Hold these stages' weights (once per deployment); returns the bytes now held for it."""
        for k, prog in programs.items():
            prog = prog.to(self.device).eval()
            if self.channels_last:
                prog = prog.to(memory_format=torch.channels_last)
            self.stages[(deployment, k)] = prog
        return sum(p.weight_bytes for (d, _), p in self.stages.items() if d == deployment)

    def unload(self, deployment: str) -> None:
        for key in [k for k in self.stages if k[0] == deployment]:
            del self.stages[key]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.stages.values())

    # --- tiles -----------------------------------------------------------------------------------
    def run(self, deployment: str, stage: int, geo: TileGeometry,
            inputs: Mapping[str, np.ndarray | Sequence[Part]],
            pieces: Mapping[str, Sequence[Part]] | None = None,
            reduced: Mapping[str, np.ndarray] | None = None) -> TileResult | TileFailure:
        """Run one tile. ``inputs`` maps each stage input to its crop, or to parts to assemble;
        ``reduced`` holds the combined value of each reduce point the stage reads. The outputs include
        this tile's partial of each reduce point its stage makes (``tiling.partial_key``)."""
        prog = self.stages.get((deployment, stage))
        if prog is None:
            return TileFailure("NotLoaded", f"stage {stage} of deployment '{deployment}' is not loaded here",
                               retryable=True)
        try:
            t0 = time.perf_counter()
            crops: dict[str, torch.Tensor] = {}
            bytes_in = 0
            for name in prog.stage_inputs:
                value = inputs[name]
                box = geo.in_boxes[name]
                if not isinstance(value, np.ndarray):
                    value = stitch(box, list(value))
                bytes_in += value.nbytes
                crops[name] = self._tensor(value)
            tp: dict[str, list[tuple[Box, torch.Tensor]]] = {}
            for node, parts in (pieces or {}).items():
                for b, arr in parts:
                    bytes_in += arr.nbytes
                    tp.setdefault(node, []).append((b, self._tensor(arr)))
            red = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in (reduced or {}).items()}
            outs, exports = prog.run_tile(geo, crops, tp, red or None)
            res_out = {k: _numpy(v) for k, v in outs.items()}
            res_exp = [_numpy(v) for v in exports]
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            bytes_out = sum(a.nbytes for a in res_out.values()) + sum(a.nbytes for a in res_exp)
            return TileResult(res_out, res_exp, dt, bytes_in, bytes_out, self.device.type)
        except torch.cuda.OutOfMemoryError as e:
            return TileFailure("OutOfMemory", str(e).splitlines()[0], retryable=True, detail=traceback.format_exc())
        except MemoryError as e:
            return TileFailure("OutOfMemory", str(e) or "host memory exhausted", retryable=True,
                               detail=traceback.format_exc())
        except (KeyError, ValueError, RuntimeError, TypeError, AssertionError) as e:
            return TileFailure(type(e).__name__, str(e), retryable=False, detail=traceback.format_exc())


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


def to_numpy_tree(x: Any) -> Any:
    """Tensors to numpy throughout a nested result (for the trip back to the client)."""
    if isinstance(x, torch.Tensor):
        return _numpy(x)
    if isinstance(x, dict):
        return {k: to_numpy_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy_tree(v) for v in x)
    return x


def to_torch_tree(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy() if not x.flags.writeable else x)
    if isinstance(x, dict):
        return {k: to_torch_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_torch_tree(v) for v in x)
    return x
