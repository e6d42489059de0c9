"""The builder the ONNX op translations emit through, and the view of one node they read.

:class:`Builder` walks the ONNX nodes and hands each to its translation with a :class:`NodeCtx`
(attributes, inputs, static shapes from ONNX shape inference); translations emit through the
:class:`~tiling.sources.emit.Emitter`, which folds whatever does not depend on the model input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from ..errors import TilingError
from .emit import Emitter, Value, identifier

__all__ = ["Builder", "Handler", "NodeCtx", "OnnxImportError", "UnsupportedOnnxOp", "Value"]


class OnnxImportError(TilingError):
    """An ONNX model the importer cannot turn into a torch module (the message says why and what works)."""


class UnsupportedOnnxOp(OnnxImportError):
    """A node whose op type (or attribute combination) has no translation."""

    def __init__(self, op_type: str, node: str, opset: int, reason: str = "") -> None:
        self.op_type, self.node, self.opset = op_type, node, opset
        why = f": {reason}" if reason else " (no translation for this op type)"
        super().__init__(f"unsupported ONNX op {op_type} in node '{node}' at opset {opset}{why}; "
                         f"supported ops are listed in docs/models.md")


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
        return s if s is not None else self.builder.probe_shape(v)

    def out_shape(self, k: int = 0) -> tuple[int, ...] | None:
        return self.builder.shapes.get(self.node.output[k])

    @property
    def hint(self) -> str:
        return identifier(self.node.name or self.node.output[0], self.op_type.lower())


Handler = Callable[["NodeCtx"], Union[Value, Sequence[Value]]]


class Builder(Emitter):
    """Translates an ONNX graph node by node into the fx graph of an :class:`Emitter`."""

    def __init__(self, model: onnx.ModelProto, opset: int, handlers: Mapping[str, Handler]) -> None:
        super().__init__()
        self.model, self.opset, self.handlers = model, opset, handlers
        self.env: dict[str, Value] = {}
        self.shapes, self.dtypes = _static_shapes(model)
        self._probe: fx.Interpreter | None = None

    def build(self) -> fx.GraphModule:
        for init in self.model.graph.initializer:
            self.env[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        for vi in self.model.graph.input:
            if vi.name not in self.env:
                ph = self.placeholder(vi.name)
                ph.meta["onnx_name"] = vi.name
                self.env[vi.name] = ph
        for node in self.model.graph.node:
            self._translate(node)
        outs = [self.env[o.name] for o in self.model.graph.output]
        return self.finish(outs[0] if len(outs) == 1 else tuple(outs), "OnnxModel")

    def probe_shape(self, node: fx.Node) -> tuple[int, ...]:
        """The shape of a graph value ONNX shape inference left unknown (pads computed by a chain of
        ops it does not propagate, say): run the graph built so far on zeros, each node once."""
        if self._probe is None:
            self._probe = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
            for n in self.graph.nodes:
                if n.op == "placeholder":
                    name = n.meta["onnx_name"]
                    if name not in self.shapes:
                        raise OnnxImportError(f"input '{name}' has no static shape; pass input_shape=")
                    self._probe.env[n] = torch.zeros(self.shapes[name], dtype=self.dtypes.get(name, torch.float32))
        env = self._probe.env
        with torch.no_grad():
            for n in self.graph.nodes:
                if n not in env:
                    env[n] = self._probe.run_node(n)
                if n is node:
                    break
        return tuple(env[node].shape)

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
