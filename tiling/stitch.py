"""Stitching: the one place where regions of a tensor are pasted together (numpy or torch alike).

Every consumer of tile outputs uses it: ``Plan.run`` stitching a stage's outputs, a stage program
assembling a fused op's input from what it computed and what neighbours exported, a worker
assembling a tile's input from the previous stage's tiles, the tail's worker and the driver
stitching a whole output. Boxes are half-open and in the coordinates of the tensor being built,
so adjacent parts share an edge and never a pixel (see :mod:`tiling.geometry`).

    out = stitch(Box.full(38, 38), [(t.out_box, y_t) for t, y_t in zip(tiles, outputs)])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from .geometry import Box

A = TypeVar("A")  # numpy.ndarray or torch.Tensor, shaped (N, C, H, W)
Part = tuple[Box, Any]  # (the part's box, its (N, C, h, w) values)


def paste(dst: A, dst_box: Box, parts: Iterable[Part]) -> int:
    """Copy what each part has of ``dst_box`` into ``dst`` (which covers exactly ``dst_box``).

    Returns the number of pixels written (overlapping parts count twice), so callers can check
    coverage without a second pass.
    """
    written = 0
    for pbox, values in parts:
        inter = pbox.intersect(dst_box)
        if inter.empty:
            continue
        src_h, src_w = inter.relative_to(pbox)
        dst_h, dst_w = inter.relative_to(dst_box)
        dst[:, :, dst_h, dst_w] = values[:, :, src_h, src_w]  # type: ignore[index]
        written += inter.area
    return written


def empty_like(ref: A, shape: Sequence[int], dtype: Any = None) -> A:
    """An uninitialised array of ``shape`` of the same kind (numpy or torch) and dtype as ``ref``."""
    if isinstance(ref, np.ndarray):
        return np.empty(tuple(shape), dtype=dtype or ref.dtype)  # type: ignore[return-value]
    return ref.new_empty(tuple(shape), **({"dtype": dtype} if dtype is not None else {}))  # type: ignore[attr-defined]


def stitch(box: Box, parts: Sequence[Part], *, batch: int | None = None, channels: int | None = None,
           like: Any = None, exact: bool = True) -> Any:
    """Build the ``box`` region of a tensor from parts that together cover it.

    ``like`` (default: the first non-empty part) gives the array kind and dtype; ``batch`` and
    ``channels`` default to its first two dimensions. With ``exact`` (the default) parts that do
    not cover the box raise ``ValueError``: a missing tile must never turn into garbage pixels.
    """
    ref = like
    if ref is None:
        ref = next((v for b, v in parts if not b.empty), None)
        if ref is None:
            raise ValueError(f"nothing to stitch into {box}: every part is empty")
    n = ref.shape[0] if batch is None else batch
    c = ref.shape[1] if channels is None else channels
    out = empty_like(ref, (n, c, box.height, box.width))
    written = paste(out, box, parts)
    if exact and written < box.area:
        raise ValueError(f"parts cover {written} of the {box.area} pixels of {box}")
    return out
