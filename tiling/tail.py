"""What follows the fused stages: a small graph module run whole on one device."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn


class Tail:
    """What follows the fused stages, as its own small graph module, run whole on one device.

    Its placeholders are the stage outputs (and the model input) that tail nodes read, so shipping
    it to a device ships only the tail's own weights.
    """

    def __init__(self, gm: fx.GraphModule, fused: set[str], input_name: str,
                 node_flops: Mapping[str, int] | None = None) -> None:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[str] = []
        self.nodes: list[str] = []

        def arg(n: fx.Node) -> fx.Node:
            if n not in env:  # a fused node or the model input, read by the tail
                env[n] = graph.placeholder(n.name)
                self.inputs.append(n.name)
            return env[n]

        live = _live(gm, fused)
        for node in gm.graph.nodes:
            if node.op == "placeholder" or node.name in fused or node not in live:
                continue
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], arg))
                continue
            env[node] = graph.node_copy(node, arg)
            if node.op != "get_attr":
                self.nodes.append(node.name)
        self.gm = fx.GraphModule(gm, graph)
        self.input_name = input_name
        self.flops = (sum(node_flops.get(n, 0) for n in self.nodes) if node_flops is not None
                      else _tail_flops(gm, fused))
        self.out_bytes = _tail_out_bytes(gm)

    @property
    def empty(self) -> bool:
        return not self.nodes

    @torch.no_grad()
    def run(self, env: Mapping[str, Any]) -> Any:
        return self.gm(*(env[n] for n in self.inputs))


def _live(gm: fx.GraphModule, fused: set[str]) -> set[fx.Node]:
    """Tail nodes the output needs (or that have side effects): size queries of fused maps that only
    fused ops read are dropped, so the tail never asks for a map it does not use."""
    live: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.name in fused or node.op == "placeholder":
            continue
        if node.op == "output" or node in live or (node.op != "get_attr" and node.is_impure()):
            live.add(node)
            live.update(n for n in node.all_input_nodes if n.name not in fused)
    return live


def _tail_flops(gm: fx.GraphModule, fused: set[str]) -> int:
    """2 x multiply-adds of the convs and linear layers the tail runs, per frame (from traced shapes)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.name in fused:
            continue
        mod = gm.get_submodule(str(node.target))
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or not len(meta.shape):
            continue
        per_frame = math.prod(meta.shape) // max(1, int(meta.shape[0]))
        if isinstance(mod, nn.Conv2d):
            total += 2 * per_frame * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.Linear):
            total += 2 * per_frame * mod.in_features
    return total


def _tail_out_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the model's outputs per frame (what the tail's device sends back)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            for arg in _leaves(node.args[0]):
                meta = arg.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape") and len(meta.shape):
                    total += math.prod(meta.shape) // max(1, int(meta.shape[0])) * 4
    return total


def _leaves(a: Any) -> list[fx.Node]:
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for v in a for n in _leaves(v)]
    if isinstance(a, dict):
        return [n for v in a.values() for n in _leaves(v)]
    return []


