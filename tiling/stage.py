"""Stages and tiles: the plan's data, as a runtime reads it.

A :class:`Stage` is one fused range on one grid; its :class:`Tile` records say what each tile
computes (``out_boxes``), reads (``in_boxes``) and costs. Stages that come from one group split at
reduce points (:mod:`tiling.phases`) share the grid: ``pinned`` names the inputs a tile takes from the
tile with the same index of an earlier stage, on exactly the same box, and ``reduces`` /
``reduced_in`` the reduce points whose partials the stage makes / whose combined values it reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .geometry import Box
from .program import StageProgram, _crop
from .reduce import ReducePoint
from .regions import Piece, TileGeometry


def redundancy(executed_flops: int, untiled_flops: int) -> float:
    """FLOPs executed by all tiles over FLOPs of the same nodes untiled, minus 1."""
    return executed_flops / untiled_flops - 1.0 if untiled_flops else 0.0


@dataclass
class Tile:
    """One tile of one stage: what it computes, what it reads, what it costs (batch 1)."""

    stage: int
    index: int
    row: int
    col: int
    out_box: Box  # on the stage's reference (lowest-resolution) output
    in_box: Box  # on the stage's first input
    flops: int
    other_ops: int
    in_bytes: int
    out_bytes: int
    peak_bytes: int
    geometry: TileGeometry
    group: int = 0  # reuse: 0 runs first, 1 runs from its neighbours' pieces
    deps: tuple[int, ...] = ()  # tiles of this stage that must finish first (reuse)
    reuse_in_bytes: int = 0
    reuse_out_bytes: int = 0

    @property
    def out_boxes(self) -> dict[str, Box]:
        return self.geometry.out_boxes

    @property
    def in_boxes(self) -> dict[str, Box]:
        return self.geometry.in_boxes

    @property
    def pieces_in(self) -> list[Piece]:
        return self.geometry.pieces_in

    @property
    def pieces_out(self) -> list[Piece]:
        return self.geometry.pieces_out


@dataclass
class Stage:
    """One fused stage: a set of nodes cut into a grid of independent tiles."""

    index: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    reference: str  # the lowest-resolution output, on which cuts are given
    layers: tuple[int, int]
    rows: list[int]
    cols: list[int]
    tiles: list[Tile]
    program: StageProgram
    untiled_flops: int
    shapes: dict[str, tuple[int, int, int]]  # C, H, W of every input and output
    reuse: bool = False
    group: int = 0  # stages of one group share the grid (reduce points split a group)
    pinned: dict[str, int] = field(default_factory=dict)  # input -> stage whose same-index tile makes it
    reduces: list[ReducePoint] = field(default_factory=list)  # partials every tile returns
    reduced_in: list[str] = field(default_factory=list)  # reduce points whose combined values tiles need

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.rows) - 1, len(self.cols) - 1)

    @property
    def flops(self) -> int:
        return sum(t.flops for t in self.tiles)

    @property
    def redundancy(self) -> float:
        return redundancy(self.flops, self.untiled_flops)

    @property
    def order(self) -> list[int]:
        """Tile indices in an order that respects reuse dependencies."""
        return sorted(range(len(self.tiles)), key=lambda i: (self.tiles[i].group, i))

    @property
    def weight_bytes(self) -> int:
        return self.program.weight_bytes

    def crop_inputs(self, tile: Tile, env: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {i: _crop((env[i], Box.full(*env[i].shape[-2:])), b) for i, b in tile.in_boxes.items()}

    def run_tile(self, tile: Tile, inputs: Mapping[str, torch.Tensor],
                 pieces: Mapping[str, Sequence[tuple[Box, torch.Tensor]]] | None = None,
                 reduced: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        return self.program.run_tile(tile.geometry, inputs, pieces, reduced)

    @property
    def partial_bytes(self) -> int:
        """Bytes of partials one tile returns per frame (a few KB at most)."""
        return sum(p.partial_bytes for p in self.reduces)


