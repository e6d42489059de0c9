"""FLOPs of every node, counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them.

Fused share is the figure a user compares across models, so it must not depend on our own cost
formulas: each node of the traced graph runs once on the example under its own counter, and a
stage's untiled FLOPs are the sum over its nodes. The sum over all nodes is the model's count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, batch: int) -> None:
        super().__init__(gm)
        self.batch = batch
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        with FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        self.flops[n.name] = round(fc.get_total_flops() / self.batch)
        return out


@torch.no_grad()
def node_flops(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, int]:
    """FLOPs per frame of every op node of ``gm`` on ``example``."""
    counter = _Counter(gm, int(example.shape[0]))
    counter.run(example)
    return counter.flops
