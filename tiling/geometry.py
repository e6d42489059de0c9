"""Integer geometry of fused tiles: half-open boxes, per-axis maps and grid cuts.

Everything here is exact integer arithmetic. A region is a half-open interval per axis, so that
adjacent tiles share an edge and never a pixel, and clipping at the image border is one ``min``/``max``.
Ops never see the border rule here: maps return *unclipped* input ranges, and the executor pads the
part that falls outside the image with the op's own fill value. That is what keeps cuts exact: a cut
never pads, only a true image border does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import GridError

Interval = tuple[int, int]


@dataclass(frozen=True, order=True)
class Box:
    """A half-open spatial box ``[h0, h1) x [w0, w1)`` in one tensor's own coordinates."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def height(self) -> int:
        return max(0, self.h1 - self.h0)

    @property
    def width(self) -> int:
        return max(0, self.w1 - self.w0)

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def empty(self) -> bool:
        return self.h1 <= self.h0 or self.w1 <= self.w0

    @property
    def rows(self) -> Interval:
        return (self.h0, self.h1)

    @property
    def cols(self) -> Interval:
        return (self.w0, self.w1)

    @staticmethod
    def of(rows: Interval, cols: Interval) -> Box:
        return Box(rows[0], rows[1], cols[0], cols[1])

    @staticmethod
    def full(height: int, width: int) -> Box:
        return Box(0, height, 0, width)

    def clip(self, height: int, width: int) -> Box:
        return _norm(Box(max(self.h0, 0), min(self.h1, height), max(self.w0, 0), min(self.w1, width)))

    def intersect(self, other: Box) -> Box:
        return _norm(Box(max(self.h0, other.h0), min(self.h1, other.h1), max(self.w0, other.w0),
                         min(self.w1, other.w1)))

    def union(self, other: Box) -> Box:
        """Bounding box of both; an empty operand contributes nothing."""
        if self.empty:
            return other
        if other.empty:
            return self
        return Box(min(self.h0, other.h0), max(self.h1, other.h1), min(self.w0, other.w0), max(self.w1, other.w1))

    def contains(self, other: Box) -> bool:
        if other.empty:
            return True
        return self.h0 <= other.h0 and other.h1 <= self.h1 and self.w0 <= other.w0 and other.w1 <= self.w1

    def shift(self, dh: int, dw: int) -> Box:
        return Box(self.h0 + dh, self.h1 + dh, self.w0 + dw, self.w1 + dw)

    def relative_to(self, outer: Box) -> tuple[slice, slice]:
        """Slices that cut this box out of a tensor that covers ``outer``."""
        return (slice(self.h0 - outer.h0, self.h1 - outer.h0), slice(self.w0 - outer.w0, self.w1 - outer.w0))

    def __str__(self) -> str:
        return f"[{self.h0}:{self.h1}, {self.w0}:{self.w1}]"


EMPTY = Box(0, 0, 0, 0)


def _norm(b: Box) -> Box:
    """One spelling of the empty box, so that slicing with it never wraps around."""
    return EMPTY if b.empty else b


def bbox_of_difference(box: Box, holes: Iterable[Box]) -> Box:
    """Bounding box of ``box`` minus the union of ``holes`` (exact, by coordinate compression).

    Data reuse needs this: a tile computes only what its neighbours did not already compute, and
    convolution needs a rectangle, so the remainder is rounded up to its bounding box.
    """
    holes = [h.intersect(box) for h in holes]
    holes = [h for h in holes if not h.empty]
    if box.empty or not holes:
        return box
    hs = sorted({box.h0, box.h1, *(v for h in holes for v in (h.h0, h.h1))})
    ws = sorted({box.w0, box.w1, *(v for h in holes for v in (h.w0, h.w1))})
    out = EMPTY
    for i in range(len(hs) - 1):
        for j in range(len(ws) - 1):
            cell = Box(hs[i], hs[i + 1], ws[j], ws[j + 1])
            if cell.empty or any(h.contains(cell) for h in holes):
                continue
            out = out.union(cell)
    return out


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry of one axis: kernel, stride, dilation and padding before the data.

    Output index ``o`` reads inputs ``o*s - p + j*d`` for ``j`` in ``range(k)``. Identity ops are
    ``Window(1, 1, 1, 0)``; a constant pad of ``p`` before is ``Window(1, 1, 1, p)`` (negative ``p``
    crops).
    """

    k: int = 1
    s: int = 1
    d: int = 1
    p: int = 0

    def need(self, o0: int, o1: int) -> Interval:
        if o1 <= o0:
            return (0, 0)
        return (o0 * self.s - self.p, (o1 - 1) * self.s - self.p + self.d * (self.k - 1) + 1)

    @property
    def span(self) -> int:
        return self.d * (self.k - 1) + 1


@dataclass(frozen=True)
class Upsample:
    """Nearest upsampling by an integer factor: output ``o`` reads input ``o // f``."""

    f: int

    def need(self, o0: int, o1: int) -> Interval:
        if o1 <= o0:
            return (0, 0)
        return (o0 // self.f, (o1 - 1) // self.f + 1)


AxisMap = Window | Upsample
IDENTITY = Window()


def need_box(maps: tuple[AxisMap, AxisMap], out: Box) -> Box:
    """Unclipped input box that an op needs to produce ``out``."""
    return Box.of(maps[0].need(out.h0, out.h1), maps[1].need(out.w0, out.w1))


# --- cuts -----------------------------------------------------------------------------------------


def even_cuts(size: int, parts: int) -> list[int]:
    """Split ``size`` into ``parts`` as evenly as possible: cut ``i`` at ``round(i * size / parts)``."""
    _check_parts(size, parts)
    return [round(i * size / parts) for i in range(parts + 1)]


def weighted_cuts(size: int, weights: Sequence[float]) -> list[int]:
    """Cuts that give part ``i`` a share of ``size`` proportional to ``weights[i]`` (at least 1 each).

    Largest-remainder apportionment: exact when the weights divide ``size``, and never an empty part,
    which is what MoDNN's capability-biased partition needs when a slow device gets a small share.
    """
    parts = len(weights)
    _check_parts(size, parts)
    for w in weights:
        if not (isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0):
            raise GridError(f"weights must be positive finite numbers, got {list(weights)}")
    total = float(sum(weights))
    quotas = [w / total * size for w in weights]
    sizes = [int(q) for q in quotas]
    order = sorted(range(parts), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: size - sum(sizes)]:
        sizes[i] += 1
    for i in range(parts):  # a tiny weight still gets one row: take it from the largest part
        if sizes[i] == 0:
            sizes[max(range(parts), key=lambda j: (sizes[j], -j))] -= 1
            sizes[i] = 1
    cuts = [0]
    for s in sizes:
        cuts.append(cuts[-1] + s)
    return cuts


def check_cuts(cuts: Sequence[int], size: int, axis: str) -> list[int]:
    """Validate explicit edges: integers from 0 to ``size``, strictly increasing."""
    try:
        edges = [int(c) for c in cuts]
    except (TypeError, ValueError):
        raise GridError(f"{axis} cuts must be integers, got {cuts!r}") from None
    if any(int(c) != c for c in cuts):
        raise GridError(f"{axis} cuts must be integers, got {list(cuts)}")
    if len(edges) < 2 or edges[0] != 0 or edges[-1] != size:
        raise GridError(
            f"{axis} cuts must start at 0 and end at the output {axis} size {size}, got {edges}"
        )
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise GridError(f"{axis} cuts must be strictly increasing, got {edges}")
    return edges


def scale_cuts(cuts: Sequence[int], src: int, dst: int) -> list[int]:
    """Carry cuts of a ``src``-sized output onto a ``dst``-sized one (exact for integer ratios)."""
    if src == dst:
        return list(cuts)
    return [0] + [round(c * dst / src) for c in cuts[1:-1]] + [dst]


def _check_parts(size: int, parts: int) -> None:
    if not isinstance(parts, int) or parts < 1:
        raise GridError(f"a grid needs a positive number of rows and columns, got {parts!r}")
    if parts > size:
        raise GridError(
            f"a grid of {parts} along an axis is larger than the output size {size} there; "
            f"use at most {size}"
        )


def deepthings_cuts(size: int, parts: int) -> list[int]:
    """DeepThings' grid: tiles of ``ceil(size / parts)``, the last tile takes the rest."""
    _check_parts(size, parts)
    step = -(-size // parts)
    cuts = [min(i * step, size) for i in range(parts)] + [size]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise GridError(f"DeepThings' cuts of {size} into {parts} leave an empty tile: {cuts}")
    return cuts
