"""TorchScript files as fx modules: freeze, inline, and translate ``aten::`` nodes into torch calls.

``torch.fx`` cannot trace a ``ScriptModule`` (its forward runs in C++), and re-tracing needs the
Python class, which a ``.pt`` file does not carry. But ``torch.jit.freeze`` turns the weights into
constants (and folds conv + batch norm), and after inlining the graph is a flat list of ``aten::``
calls. Those become the torch calls the tiler knows (``nn.Conv2d``, ``nn.MaxPool2d``, ``F.relu``,
``operator.add``, ``torch.cat``, channel slices); any other ``aten::`` op is called as
``torch.ops.aten.<op>`` (exact, but it ends fusion). In-place ops (``relu_``) become out-of-place
and later readers of the mutated value read the result. Control flow (``prim::If``/``prim::Loop``)
that freezing did not remove is refused: trace the model (``torch.jit.trace``) rather than script it.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import TilingError
from .emit import Emitter, Value

__all__ = ["TorchScriptError", "load_torchscript"]


class TorchScriptError(TilingError):
    """A TorchScript module the converter cannot express as an fx graph."""


def load_torchscript(path: str | os.PathLike[str] | torch.jit.ScriptModule) -> fx.GraphModule:
    """A TorchScript file (or loaded ``ScriptModule``) as an eval-mode ``fx.GraphModule``."""
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x; reading old files is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        sm = path if isinstance(path, torch.jit.ScriptModule) else torch.jit.load(str(path), map_location="cpu")
        return _freeze_and_convert(sm)


def _freeze_and_convert(sm: torch.jit.ScriptModule) -> fx.GraphModule:
    try:
        frozen = torch.jit.freeze(sm.eval())
    except Exception as e:  # noqa: BLE001 - freeze raises RuntimeError subclasses from C++
        raise TorchScriptError(f"torch.jit.freeze failed ({type(e).__name__}: {e}); only inference "
                               f"modules with a plain forward(x) can be converted") from e
    graph = frozen.graph.copy()
    torch._C._jit_pass_inline(graph)
    return _Converter().convert(graph)


class _Converter(Emitter):
    def __init__(self) -> None:
        super().__init__()
        self.env: dict[int, Any] = {}  # TorchScript value (by unique id) -> Value, list, tuple or constant

    def convert(self, graph: torch._C.Graph) -> fx.GraphModule:
        inputs = list(graph.inputs())[1:]  # the first is the module itself
        if len(inputs) != 1:
            raise TorchScriptError(f"forward takes {len(inputs)} inputs; a plain forward(x) is required")
        self.env[inputs[0].unique()] = self.placeholder(inputs[0].debugName().split(".")[0] or "x")
        for node in graph.nodes():
            self._node(node)
        outs = [self.env[v.unique()] for v in graph.outputs()]
        return self.finish(outs[0] if len(outs) == 1 else tuple(outs), "TorchScriptModel")

    def _node(self, node: torch._C.Node) -> None:
        kind = node.kind()
        args = [self.env[v.unique()] for v in node.inputs()]
        outs = [v.unique() for v in node.outputs()]
        values = list(node.outputs())
        if kind == "prim::Constant":
            self.env[outs[0]] = values[0].toIValue()
            return
        if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            self.env[outs[0]] = list(args) if kind == "prim::ListConstruct" else tuple(args)
            return
        if kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            for k, o in enumerate(outs):
                self.env[o] = args[0][k] if isinstance(args[0], (list, tuple)) else self.call(operator.getitem,
                                                                                           args[0], k)
            return
        if kind in ("prim::NumToTensor", "aten::Int", "aten::Float", "aten::detach", "aten::contiguous",
                    "aten::dropout", "aten::feature_dropout", "aten::alpha_dropout"):
            self.env[outs[0]] = args[0]
            return
        if not kind.startswith("aten::"):
            raise TorchScriptError(f"TorchScript node {kind} is not supported (control flow and custom ops "
                                   f"cannot be tiled; export the model with torch.jit.trace): {node}")
        name = kind[len("aten::"):]
        inplace = name.endswith("_") and not name.endswith("__")
        if inplace:
            name = name[:-1]
        fn = _TABLE.get(name)
        res = fn(self, *args) if fn is not None else self._generic(name, node, args)
        for k, o in enumerate(outs):
            self.env[o] = res if len(outs) == 1 else res[k]
        if inplace and isinstance(args[0], (fx.Node, torch.Tensor)):
            for v, val in list(self.env.items()):  # readers of the mutated value now read the result
                if val is args[0]:
                    self.env[v] = res

    def _generic(self, name: str, node: torch._C.Node, args: list[Any]) -> Any:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            raise TorchScriptError(f"aten::{name} has no torch.ops.aten binding: {node}")
        return self.call(packet, *args)


def _conv(em: _Converter, x: Value, w: torch.Tensor, b: torch.Tensor | None, stride: list[int], padding: Any,
          dilation: list[int], *rest: Any) -> Value:
    if len(rest) >= 3:  # aten::_convolution(..., transposed, output_padding, groups, ...)
        transposed, out_pad, groups = rest[0], rest[1], rest[2]
    else:  # aten::conv2d(..., groups)
        transposed, out_pad, groups = False, [0, 0], rest[0] if rest else 1
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        return em.call(torch.ops.aten._convolution if len(rest) >= 3 else torch.ops.aten.conv2d,
                       x, w, b, stride, padding, dilation, *rest)
    if transposed:
        mod: nn.Module = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), tuple(stride),
                                            tuple(padding), tuple(out_pad), groups, b is not None, tuple(dilation))
    else:
        mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), tuple(stride),
                        padding if isinstance(padding, str) else tuple(padding), tuple(dilation), groups,
                        b is not None)
    mod.weight.data.copy_(w)
    if b is not None:
        mod.bias.data.copy_(b)  # type: ignore[union-attr]
    return em.module(mod, "conv", x)


def _batch_norm(em: _Converter, x: Value, w: Any, b: Any, mean: Any, var: Any, training: bool, momentum: float,
                eps: float, *_: Any) -> Value:
    if training:
        raise TorchScriptError("batch norm in training mode; save the model after model.eval()")
    return em.call(F.batch_norm, x, mean, var, w, b, False, 0.0, eps)


def _linear(em: _Converter, x: Value, w: Any, b: Any = None) -> Value:
    if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(b, (torch.Tensor, type(None))):
        mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        mod.weight.data.copy_(w)
        if b is not None:
            mod.bias.data.copy_(b)  # type: ignore[union-attr]
        return em.module(mod, "linear", x)
    return em.call(F.linear, x, w, b)


def _arith(op: Callable[..., Any]) -> Callable[..., Value]:
    def handle(em: _Converter, a: Any, b: Any, alpha: Any = 1, *rest: Any) -> Value:
        if op is operator.truediv and alpha is not None and alpha != 1:  # aten::div(a, b, rounding_mode)
            return em.call(torch.div, a, b, rounding_mode=alpha)
        if op in (operator.add, operator.sub) and alpha != 1:
            b = em.call(operator.mul, b, alpha)
        return em.call(op, a, b)

    return handle


def _slice(em: _Converter, x: Value, dim: int, start: int | None, end: int | None, step: int = 1) -> Value:
    if dim < 0:  # the rank of a graph value is not known here
        return em.call(torch.ops.aten.slice, x, dim, start, end, step)
    big = 2**62
    sl = slice(start, None if end is None or end >= big else end, None if step == 1 else step)
    return em.call(operator.getitem, x, (*(slice(None),) * dim, sl) if dim else (sl, slice(None)))


def _upsample_nearest(em: _Converter, x: Value, size: Any, *scales: Any) -> Value:
    if size is not None:
        return em.call(F.interpolate, x, size=tuple(size), mode="nearest")
    sc = scales[0] if len(scales) == 1 else list(scales)
    return em.call(F.interpolate, x, scale_factor=tuple(sc), mode="nearest")


def _gelu(em: _Converter, x: Value, approximate: str = "none") -> Value:
    return em.call(F.gelu, x, approximate=approximate)


def _pad(em: _Converter, x: Value, pad: list[int], value: float = 0.0) -> Value:
    return em.call(F.pad, x, tuple(pad), value=value)


def _f(fn: Callable[..., Any], k: int | None = None) -> Callable[..., Value]:
    def handle(em: _Converter, *args: Any) -> Value:
        return em.call(fn, *(args if k is None else args[:k]))

    return handle


def _pool(kind: str) -> Callable[..., Value]:
    def handle(em: _Converter, x: Value, k: list[int], s: list[int], p: list[int], *rest: Any) -> Value:
        if kind == "max":
            d, ceil = rest[0] if rest else 1, rest[1] if len(rest) > 1 else False
            return em.module(nn.MaxPool2d(tuple(k), tuple(s or k), tuple(p), tuple(d), ceil_mode=ceil), "maxpool", x)
        ceil, inc, div = (list(rest) + [False, True, None][len(rest):])[:3]
        return em.module(nn.AvgPool2d(tuple(k), tuple(s or k), tuple(p), ceil, inc, div), "avgpool", x)

    return handle


_TABLE: dict[str, Callable[..., Value]] = {
    "_convolution": _conv, "conv2d": _conv, "batch_norm": _batch_norm, "linear": _linear,
    "add": _arith(operator.add), "sub": _arith(operator.sub), "mul": _arith(operator.mul),
    "div": _arith(operator.truediv), "cat": _f(torch.cat), "slice": _slice, "select": _f(torch.select),
    "relu": _f(F.relu), "relu6": _f(F.relu6), "hardtanh": _f(F.hardtanh), "leaky_relu": _f(F.leaky_relu, 2),
    "sigmoid": _f(torch.sigmoid), "tanh": _f(torch.tanh), "hardswish": _f(F.hardswish),
    "hardsigmoid": _f(F.hardsigmoid), "silu": _f(F.silu), "gelu": _gelu, "clamp": _f(torch.clamp),
    "max_pool2d": _pool("max"), "avg_pool2d": _pool("avg"), "constant_pad_nd": _pad,
    "upsample_nearest2d": _upsample_nearest, "adaptive_avg_pool2d": _f(F.adaptive_avg_pool2d),
    "flatten": _f(torch.flatten), "mean": _f(torch.mean, 3), "matmul": _f(torch.matmul),
}
