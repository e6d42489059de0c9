"""Reduce points at run time: what a tile contributes, and how contributions combine.

The contract a runtime honours for a stage with ``stage.reduces`` (see ``docs/tiling.md``):

1. *map*: every tile of the stage returns, besides its maps, one partial per reduce point under
   ``outputs[point.key]``: the sum (or max) of the reduced map over the box the tile owns there
   (``tile.geometry.owned[point.node]``), shaped ``(N, C, 1, 1)``;
2. *reduce*: :func:`combine` the partials of all tiles of that stage, in tile-index order;
3. *continue*: pass the combined value, keyed by ``point.node``, as ``reduced=`` to every tile of
   every stage that lists the point in ``stage.reduced_in``.

Owned boxes partition the map, so nothing is counted twice, and a mean divides by the whole map's
``H * W`` exactly once, after the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch


def partial_key(node: str) -> str:
    """The key of a reduce point's partial among a tile's outputs (``#`` never appears in node names)."""
    return f"{node}#partial"


@dataclass(frozen=True)
class ReducePoint:
    """A global reduction inside a fused range, computed as per-tile partials."""

    node: str  # the reducing node; later stages read its combined value under this name
    input: str  # the (N, C, H, W) map it reduces
    stage: int  # the stage whose tiles produce the partials
    op: Literal["sum", "max"]  # how partials combine
    divisor: int  # H * W of the whole map for a mean, else 1
    channels: int
    form: tuple[int, ...]  # the reduction's result shape without the batch dim
    itemsize: int

    @property
    def key(self) -> str:
        return partial_key(self.node)

    @property
    def partial_bytes(self) -> int:
        """Bytes of one tile's partial, per frame."""
        return self.channels * self.itemsize


def partial(op: str, x: torch.Tensor) -> torch.Tensor:
    """One tile's share of a reduce point: the sum (or max) of the map over the box it owns."""
    n, c = x.shape[0], x.shape[1]
    if x.shape[-1] * x.shape[-2] == 0:
        return x.new_full((n, c, 1, 1), float("-inf") if op == "max" else 0.0)
    return x.amax(dim=(-2, -1), keepdim=True) if op == "max" else x.sum(dim=(-2, -1), keepdim=True)


def combine(point: ReducePoint, partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reduction's value from all tiles' partials, given in tile-index order.

    Accumulates left to right, so every runtime that follows the order gets the same bits.
    """
    if not partials:
        raise ValueError(f"reduce point '{point.node}' got no partials")
    acc = partials[0]
    for p in partials[1:]:
        acc = torch.maximum(acc, p) if point.op == "max" else acc + p
    if point.divisor != 1:
        acc = acc / point.divisor
    return acc.reshape(acc.shape[0], *point.form)
