"""The builder the ONNX op translations emit through, and the view of one node they read.

``Builder.call``/``method``/``module`` run the torch operation eagerly when no operand depends on the
model input (that is how initializers, ``Constant`` and shape arithmetic fold away), and otherwise add
an fx node; constants that reach a graph node become buffers of the root module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from ..errors import TilingError

__all__ = ["Builder", "Handler", "NodeCtx", "OnnxImportError", "UnsupportedOnnxOp", "Value"]

Value = Union[fx.Node, torch.Tensor]  # a graph value, or a constant folded at import time


class OnnxImportError(TilingError):
    """An ONNX model the importer cannot turn into a torch module (the message says why and what works)."""


class UnsupportedOnnxOp(OnnxImportError):
    """A node whose op type (or attribute combination) has no translation."""

    def __init__(self, op_type: str, node: str, opset: int, reason: str = "") -> None:
        self.op_type, self.node, self.opset = op_type, node, opset
        why = f": {reason}" if reason else " (no translation for this op type)"
        super().__init__(f"unsupported ONNX op {op_type} in node '{node}' at opset {opset}{why}; "
                         f"supported ops are listed in docs/models.md")


def _identifier(name: str, fallback: str) -> str:
    s = re.sub(r"\W+", "_", name).strip("_") or fallback
    return f"n_{s}" if s[0].isdigit() else s


@dataclass
class NodeCtx:
    """One ONNX node as its translation sees it: attributes, inputs (values), static shapes."""

    node: onnx.NodeProto
    opset: int
    builder: Builder

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}({', '.join(self.node.output)})"

    def fail(self, reason: str = "") -> UnsupportedOnnxOp:
        return UnsupportedOnnxOp(self.op_type, self.name, self.opset, reason)

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                v = onnx.helper.get_attribute_value(a)
                if isinstance(v, bytes):
                    return v.decode()
                if isinstance(v, onnx.TensorProto):
                    return torch.from_numpy(np.array(numpy_helper.to_array(v)))
                if isinstance(v, (list, tuple)):
                    return [x.decode() if isinstance(x, bytes) else x for x in v]
                return v
        return default

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def input(self, i: int) -> Value:
        if not self.has(i):
            raise self.fail(f"input {i} is missing")
        return self.builder.env[self.node.input[i]]

    def opt(self, i: int) -> Value | None:
        return self.input(i) if self.has(i) else None

    def const(self, i: int, what: str) -> torch.Tensor:
        v = self.input(i)
        if isinstance(v, fx.Node):
            raise self.fail(f"its {what} (input {i}) is computed from the model input; only constants are supported")
        return v

    def ints(self, attr: str, i: int, default: Any = None) -> list[int] | None:
        """An int list given as an attribute (older opsets) or a constant input (newer ones)."""
        v = self.attr(attr)
        if v is not None:
            return [int(x) for x in v]
        if self.has(i):
            return [int(x) for x in self.const(i, attr).flatten().tolist()]
        return default

    def shape(self, i: int) -> tuple[int, ...]:
        v = self.input(i)
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
        s = self.builder.shapes.get(self.node.input[i])
        if s is None:
            raise self.fail(f"the shape of input '{self.node.input[i]}' is unknown after ONNX shape "
                            f"inference; give the model a static input shape")
        return s

    def out_shape(self, k: int = 0) -> tuple[int, ...] | None:
        return self.builder.shapes.get(self.node.output[k])

    @property
    def hint(self) -> str:
        return _identifier(self.node.name or self.node.output[0], self.op_type.lower())


Handler = Callable[["NodeCtx"], Union[Value, Sequence[Value]]]


class Builder:
    """Builds the fx graph; ``call``/``method``/``module`` fold operations on constants eagerly."""

    def __init__(self, model: onnx.ModelProto, opset: int, handlers: Mapping[str, Handler]) -> None:
        self.model, self.opset, self.handlers = model, opset, handlers
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Value] = {}
        self.shapes, self.dtypes = _static_shapes(model)
        self._consts: dict[int, fx.Node] = {}
        self._names: set[str] = set()

    def build(self) -> fx.GraphModule:
        g = self.graph
        for init in self.model.graph.initializer:
            self.env[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        for vi in self.model.graph.input:
            if vi.name not in self.env:
                ph = g.placeholder(self._unique(_identifier(vi.name, "input")))
                ph.meta["onnx_name"] = vi.name
                self.env[vi.name] = ph
        for node in self.model.graph.node:
            self._translate(node)
        outs = [self._as_node(self.env[o.name]) for o in self.model.graph.output]
        g.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.root, g, class_name="OnnxModel")
        gm.graph.eliminate_dead_code()  # what only fed folded constants
        return fx.GraphModule(gm, gm.graph, class_name="OnnxModel")  # keeps only the weights still used

    def _translate(self, node: onnx.NodeProto) -> None:
        ctx = NodeCtx(node, self.opset, self)
        if node.domain not in ("", "ai.onnx"):
            raise ctx.fail(f"custom domain '{node.domain}'")
        handler = self.handlers.get(node.op_type)
        if handler is None:
            raise ctx.fail()
        with torch.no_grad():
            try:
                res = handler(ctx)
            except UnsupportedOnnxOp:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise OnnxImportError(f"translating {node.op_type} node '{ctx.name}' (opset {self.opset}) "
                                      f"failed: {type(e).__name__}: {e}") from e
        results = list(res) if isinstance(res, (list, tuple)) else [res]
        for k, name in enumerate(node.output):
            if name == "":
                continue
            if k >= len(results):
                raise ctx.fail(f"output {k} ('{name}') is not supported")
            self.env[name] = results[k]
            if isinstance(results[k], fx.Node):
                results[k].meta.setdefault("onnx_node", ctx.name)

    # --- emitting ----------------------------------------------------------------------------------
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
        node = self._consts.get(id(v))
        if node is None:
            name = self._unique(f"const_{len(self._consts)}")
            self.root.register_buffer(name, v.detach().clone())
            node = self.graph.get_attr(name)
            self._consts[id(v)] = node
        return node

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names or hasattr(nn.Module, name):
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name


def _dynamic(a: Any) -> bool:
    if isinstance(a, fx.Node):
        return True
    if isinstance(a, (list, tuple)):
        return any(_dynamic(v) for v in a)
    if isinstance(a, dict):
        return any(_dynamic(v) for v in a.values())
    return False


def _static_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Static shapes and dtypes of every value ONNX shape inference could resolve."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.elem_type:
            try:
                np_type = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
                dtypes[vi.name] = torch.from_numpy(np.zeros(0, dtype=np_type)).dtype
            except (KeyError, TypeError, ValueError):
                pass
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = tuple(int(d) for d in dims)
    return shapes, dtypes
