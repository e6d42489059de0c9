"""Fusion that fits the grid: end a fused range before an output too small to cut.

A classifier written with a fixed ``AvgPool2d(7)`` instead of an adaptive pool fuses straight
through it, and the fused range then ends on a 1x1 map that no grid of 2 can cut. Rather than fail,
the range ends before that node (``plan.stop`` says so) and it runs in the tail. Only when no fused
output can hold the grid does planning fail, naming the largest grid that would fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .build import parts_of, reference
from .errors import GridError
from .fusion import Fusion, cut_before, group_outputs


def _cuttable(size: int, parts: int, deepthings: bool) -> bool:
    """Whether ``parts`` tiles can cut ``size`` with no empty tile (DeepThings' ceil(size/n) tiles need
    ``(n - 1) * ceil(size / n) < size``; even cuts only ``n <= size``)."""
    if deepthings:
        return (parts - 1) * -(-size // parts) < size
    return parts <= size


def _fit(fusion: Fusion, rows: int, cols: int, shapes: Mapping[str, tuple[int, int, int]],
         deepthings: bool = False) -> Fusion | None:
    while fusion.maps:
        ref = reference(group_outputs(fusion, set(fusion.maps)), shapes)
        h, w = shapes[ref][1:]
        if _cuttable(h, rows, deepthings) and _cuttable(w, cols, deepthings):
            return fusion
        fusion = cut_before(fusion, ref, f"its output {h}x{w} is smaller than the grid {rows}x{cols}; "
                                         f"fusion ends before it so that the grid fits")
    return None


def fit_grid(fusion: Fusion, spec: Mapping[str, Any], shapes: Mapping[str, tuple[int, int, int]]) -> Fusion:
    """The fused set, shortened until its lowest-resolution output holds the grid ``spec`` asks for."""
    want = parts_of(spec)
    if want is None or want == (1, 1) or any(not isinstance(v, int) or v < 1 for v in want):
        return fusion  # malformed grids are reported by the cutter, with its own message
    fitted = _fit(fusion, want[0], want[1], shapes, bool(spec.get("deepthings")))
    if fitted is not None:
        return fitted
    best = largest_grid(fusion, shapes)
    hint = f"the largest grid that fits is {best[0]}x{best[1]}" if best else "no grid of more than one tile fits"
    raise GridError(f"no fused output can hold a grid of {want[0]}x{want[1]}: every output the fused range "
                    f"could end on is smaller; {hint}")


def largest_grid(fusion: Fusion, shapes: Mapping[str, tuple[int, int, int]]) -> tuple[int, int] | None:
    """The grid with the most tiles (ties: more rows) for which a fused range remains."""
    sizes = sorted({shapes[n][1:] for n in fusion.maps}, key=lambda s: (-s[0] * s[1], -s[0]))
    for h, w in sizes:
        if _fit(fusion, h, w, shapes) is not None:
            return (h, w)
    return None
