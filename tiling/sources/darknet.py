"""Darknet importer: build a model from a ``.cfg`` and read/write ``.weights`` (pjreddie/darknet semantics).

DeepThings partitions YOLOv2 as Darknet runs it, so the importer reproduces Darknet's arithmetic rather
than a "cleaned up" reading of the cfg: maxpool windows start at ``-padding // 2``, ``[reorg]`` is
Darknet's memory reinterpretation (see :class:`~tiling.sources.darknet_layers.Reorg`), and batch norm
divides by ``sqrt(var) + 1e-6``.  The resulting module is an ordinary, fx-traceable ``nn.Module`` so the
tiling core can cut it like any other model. Parsing and per-section checks live in
:mod:`tiling.sources.darknet_cfg`.

``.weights`` trailing bytes are accepted with a :class:`DarknetWeightsWarning` (Darknet itself ignores
them; a warning keeps truncated-cfg mistakes visible without refusing files Darknet would load).
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .darknet_cfg import CfgSection, DarknetError, Shape, net_shape, parse_cfg, plan_layers, read_cfg_text
from .darknet_layers import DarknetConv, DarknetModel, build_uninitialised, seeded_init_

__all__ = [
    "CfgSection",
    "DarknetError",
    "DarknetModel",
    "DarknetWeightsWarning",
    "WeightsHeader",
    "load_darknet",
    "load_darknet_weights",
    "parse_cfg",
    "save_darknet_weights",
]


class DarknetWeightsWarning(UserWarning):
    """A ``.weights`` file that loads but has trailing bytes the cfg does not account for."""


def _calibration_size(sections: Sequence[CfgSection], shape: Shape) -> tuple[int, int]:
    """Calibrate near the real input size (border effects shrink the measured variance at tiny sizes),
    but reduced by the largest power of two that keeps the side >= 128 and the cfg valid, to keep builds cheap."""
    c, h, w = shape
    best = (h, w)
    d = 2
    while h % d == 0 and w % d == 0 and min(h, w) // d >= 128:
        try:
            plan_layers(sections, (c, h // d, w // d))
        except DarknetError:
            pass  # e.g. 608/2 breaks YOLOv2's reorg while 608/4 does not
        else:
            best = (h // d, w // d)
        d *= 2
    return best


def load_darknet(
    cfg: str | bytes | os.PathLike[str],
    weights: str | os.PathLike[str] | bytes | None = None,
    *,
    seed: int = 0,
    calibration_size: int | tuple[int, int] | None = None,
) -> DarknetModel:
    """Build an eval-mode :class:`DarknetModel` from a cfg path or cfg text (a ``str`` with a newline).

    Without ``weights`` the weights are random but reproducible from ``seed`` and calibrated on a seeded
    input of ``calibration_size`` (default: derived from the ``[net]`` size) so activations stay O(1).
    Pass ``calibration_size`` explicitly to get the same weights whatever the ``[net]`` size is; keep it
    well above the network's total stride (>= 128 for YOLOv2), or the deepest layers are calibrated on a
    handful of border-dominated pixels and activations grow tenfold at full size.
    """
    sections = parse_cfg(read_cfg_text(cfg))
    shape = net_shape(sections[0])
    plan = plan_layers(sections, shape)
    yolo = [i for i, p in enumerate(plan) if p.kind == "yolo"]
    model = build_uninitialised(  # every tensor is written below, by the seeded init or the weights file
        lambda: DarknetModel(
            layers=[p.make() for p in plan],
            inputs=[p.inputs for p in plan],
            input_shape=shape,
            layer_names=[f"{p.kind}_{i}" for i, p in enumerate(plan)],
            layer_shapes=[p.shape for p in plan],
            output_indices=yolo or [len(plan) - 1],
        )
    )
    if weights is None:
        if calibration_size is None:
            ch, cw = _calibration_size(sections, shape)
        else:
            ch, cw = (calibration_size, calibration_size) if isinstance(calibration_size, int) else calibration_size
            try:
                plan_layers(sections, (shape[0], ch, cw))
            except DarknetError as e:
                raise DarknetError(f"calibration_size {(ch, cw)} is not a valid input size for this cfg: {e}") from e
        seeded_init_(model, seed, calibration_shape=(2, shape[0], ch, cw))
    else:
        load_darknet_weights(model, weights)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# .weights files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsHeader:
    """The ``.weights`` header; ``seen`` (images seen in training) is int64 from version 0.2 on."""

    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_is_int64(self) -> bool:
        return _seen_is_int64(self.major, self.minor)


def _seen_is_int64(major: int, minor: int) -> bool:
    return (major * 10 + minor) >= 2 and major < 1000 and minor < 1000


def _conv_blocks(model: nn.Module) -> list[DarknetConv]:
    """Darknet stores weights in cfg order, which is registration order in a :class:`DarknetModel`."""
    return [m for m in model.modules() if isinstance(m, DarknetConv)]


def _conv_float_count(block: DarknetConv) -> int:
    n = block.conv.out_channels
    return n * (4 if block.batch_normalize else 1) + block.conv.weight.numel()


def load_darknet_weights(model: nn.Module, weights: str | os.PathLike[str] | bytes) -> WeightsHeader:
    """Read a Darknet ``.weights`` file (path or bytes) into ``model``'s ``[convolutional]`` layers in order.

    Layout per conv: biases, then (if batch-normalised) scales, rolling mean, rolling variance, then the
    ``filters × channels/groups × size × size`` kernel, all little-endian float32.  Darknet normalises
    with ``(x - mean) / (sqrt(var) + 1e-6)``; the BN is loaded with ``eps=0`` and
    ``running_var = (sqrt(var) + 1e-6)²`` (computed in float64) to reproduce it.
    """
    blocks = _conv_blocks(model)
    need = sum(_conv_float_count(b) for b in blocks)
    if isinstance(weights, (bytes, bytearray, memoryview)):
        data, name = bytes(weights), "<bytes>"
        size = len(data)
    else:
        # read what the cfg needs and no more (a file is input: /dev/zero or a 40 GB file is refused
        # or warned about from its size, never read whole); only regular files are read
        name = str(weights)
        try:
            p = Path(weights)
            st = p.stat()
            if not stat.S_ISREG(st.st_mode):
                raise DarknetError(f"cannot read weights file {name!r}: not a regular file (a directory, device "
                                   "or pipe); expected a Darknet .weights file")
            size = st.st_size
            with open(p, "rb") as f:
                data = f.read(20 + 4 * need)
        except OSError as e:
            raise DarknetError(f"cannot read weights file {name!r}: {e.strerror or e}") from e
    if len(data) < 16:
        raise DarknetError(f"weights {name}: {len(data)} bytes is too short for a header (12 + 4 or 8 bytes)")
    major, minor, revision = struct.unpack_from("<3i", data, 0)
    if _seen_is_int64(major, minor):
        (seen,), offset = struct.unpack_from("<q", data, 12), 20
    else:
        (seen,), offset = struct.unpack_from("<i", data, 12), 16
    have = (size - offset) // 4
    if len(data) < offset + 4 * need:
        raise DarknetError(
            f"weights {name}: expected {offset + 4 * need} bytes ({offset}-byte header + {need} float32 for "
            f"{len(blocks)} convolutional layers) but found {len(data)}; is this the cfg these weights belong to?"
        )
    if size > offset + 4 * need:
        warnings.warn(
            f"weights {name}: {size - offset - 4 * need} trailing bytes after the {need} float32 the cfg "
            f"needs ({have} present); they were ignored, as Darknet does",
            DarknetWeightsWarning,
            stacklevel=2,
        )
    floats = np.frombuffer(data, dtype="<f4", count=need, offset=offset)
    pos = 0

    def take(count: int) -> np.ndarray:
        nonlocal pos
        chunk = floats[pos : pos + count]
        pos += count
        return chunk

    with torch.no_grad():
        for block in blocks:
            conv = block.conv
            n = conv.out_channels
            biases = torch.from_numpy(take(n).astype(np.float32))
            if block.batch_normalize:
                bn = block.bn
                scales, mean, var = take(n), take(n), take(n).astype(np.float64)
                with np.errstate(invalid="ignore"):
                    eff_var = (np.sqrt(var) + 1e-6) ** 2
                bn.eps = 0.0
                bn.weight.copy_(torch.from_numpy(scales.astype(np.float32)))
                bn.bias.copy_(biases)
                bn.running_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
                bn.running_var.copy_(torch.from_numpy(eff_var.astype(np.float32)))
            else:
                assert conv.bias is not None
                conv.bias.copy_(biases)
            conv.weight.copy_(torch.from_numpy(take(conv.weight.numel()).astype(np.float32)).reshape(conv.weight.shape))
    model.eval()
    return WeightsHeader(major, minor, revision, seen)


def save_darknet_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    version: tuple[int, int, int] = (0, 2, 0),
    seen: int = 0,
) -> None:
    """Write ``model``'s ``[convolutional]`` layers as a Darknet ``.weights`` file (inverse of the reader).

    The stored variance is recovered as ``(sqrt(running_var + eps) - 1e-6)²``, so a reader that follows
    Darknet's formula gets back the normalisation this model computes.
    """
    major, minor, revision = version
    chunks: list[bytes] = [struct.pack("<3i", major, minor, revision)]
    chunks.append(struct.pack("<q" if _seen_is_int64(major, minor) else "<i", seen))
    blocks = _conv_blocks(model)
    if not blocks:
        raise DarknetError("the model has no Darknet [convolutional] layers to save")

    def f32(t: Tensor | np.ndarray) -> bytes:
        arr = t.detach().cpu().double().numpy() if isinstance(t, Tensor) else t
        return np.ascontiguousarray(arr, dtype="<f4").tobytes()

    for block in blocks:
        conv = block.conv
        n = conv.out_channels
        if block.batch_normalize:
            bn = block.bn
            rv = bn.running_var.detach().cpu().double().numpy() + float(bn.eps)
            var = (np.sqrt(rv) - 1e-6) ** 2
            chunks.append(f32(bn.bias if bn.bias is not None else torch.zeros(n)))
            chunks.append(f32(bn.weight if bn.weight is not None else torch.ones(n)))
            chunks.append(f32(bn.running_mean))
            chunks.append(f32(var))
        else:
            chunks.append(f32(conv.bias if conv.bias is not None else torch.zeros(n)))
        chunks.append(f32(conv.weight.reshape(-1)))
    Path(path).write_bytes(b"".join(chunks))
