"""Build an ``fx.Graph`` op by op, folding whatever does not depend on the model input.

Model importers (ONNX, TorchScript) translate a foreign graph into the torch calls a hand-written
model would make. They emit through an :class:`Emitter`: ``call``/``method``/``module`` run the
operation at once when no operand is a graph value (initializers, constants and shape arithmetic
fold away here) and otherwise add a node; constants that reach a node become buffers of the root.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import fx, nn

__all__ = ["Emitter", "Value", "identifier", "with_weights"]

Value = Union[fx.Node, torch.Tensor]  # a graph value, or a constant folded at import time


def identifier(name: str, fallback: str) -> str:
    """A Python identifier from a foreign name (``/features/0/Conv`` -> ``features_0_Conv``)."""
    s = re.sub(r"\W+", "_", name).strip("_") or fallback
    return f"n_{s}" if s[0].isdigit() else s


def with_weights(mod: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    """Give a module built on the meta device (no random init, no memory) its real weights and buffers."""
    for name, t in tensors.items():
        if t is None:
            continue
        t = t.detach().contiguous()
        if isinstance(getattr(mod, name), nn.Parameter):
            setattr(mod, name, nn.Parameter(t.clone(), requires_grad=False))
        else:
            setattr(mod, name, t.clone())
    for name, p in list(mod.named_parameters(recurse=False)):
        if p.is_meta:  # nothing given for it
            setattr(mod, name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False))
    for name, b in list(mod.named_buffers(recurse=False)):
        if b is not None and b.is_meta:  # counters such as num_batches_tracked
            setattr(mod, name, torch.zeros(b.shape, dtype=b.dtype))
    return mod


class Emitter:
    """An fx graph under construction, its root module (weights, constants) and eager folding."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self._consts: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self._names: set[str] = set()

    def placeholder(self, name: str) -> fx.Node:
        return self.graph.placeholder(self._unique(identifier(name, "input")))

    def finish(self, out: Any, class_name: str) -> fx.GraphModule:
        """Close the graph with ``out`` and drop what only fed folded constants."""
        self.graph.output(self._args(out))
        gm = fx.GraphModule(self.root, self.graph, class_name=class_name)
        gm.graph.eliminate_dead_code()
        return fx.GraphModule(gm, gm.graph, class_name=class_name)  # keeps only the weights still used

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Value:
        if not _dynamic((args, kwargs)):
            return fn(*args, **kwargs)
        return self.graph.call_function(fn, self._args(args), self._args(kwargs))

    def method(self, name: str, *args: Any, **kwargs: Any) -> Value:
        if not _dynamic((args, kwargs)):
            return getattr(args[0], name)(*args[1:], **kwargs)
        return self.graph.call_method(name, self._args(args), self._args(kwargs))

    def module(self, mod: nn.Module, hint: str, *args: Value) -> Value:
        mod.eval()
        if not _dynamic(args):
            return mod(*args)
        name = self._unique(hint)
        self.root.add_module(name, mod)
        return self.graph.call_module(name, self._args(args))

    def _args(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return self._as_node(a)
        if isinstance(a, tuple):
            return tuple(self._args(v) for v in a)
        if isinstance(a, list):
            return [self._args(v) for v in a]
        if isinstance(a, dict):
            return {k: self._args(v) for k, v in a.items()}
        return a

    def _as_node(self, v: Value) -> fx.Node:
        if isinstance(v, fx.Node):
            return v
        hit = self._consts.get(id(v))
        if hit is not None and hit[0] is v:
            return hit[1]
        name = self._unique(f"const_{len(self._consts)}")
        self.root.register_buffer(name, v.detach().clone())
        node = self.graph.get_attr(name)
        self._consts[id(v)] = (v, node)  # holding v keeps its id from being reused by another tensor
        return node

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names or hasattr(nn.Module, name):
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name


def _dynamic(a: Any) -> bool:
    """Whether ``a`` holds a graph value anywhere (then the op cannot be folded)."""
    if isinstance(a, fx.Node):
        return True
    if isinstance(a, (list, tuple)):
        return any(_dynamic(v) for v in a)
    if isinstance(a, dict):
        return any(_dynamic(v) for v in a.values())
    return False


