"""Global reductions as reduce points, the values computed from them, and their broadcast back.

Squeeze-excitation, global-context blocks and image-pooling branches pool the whole map to one value
per channel, transform it, and broadcast it back onto the map. Tiles can still do that exactly:
each tile sums (or maxes) the part of the map it *owns* (never its halo, so nothing counts twice),
the partials are combined, and every tile carries on with the combined value. This module says
which nodes are such reductions (``reduce``), which nodes compute only from their results
(``global``: tile-invariant, so every tile computes them whole), and which nodes spread a global
value back over space (``broadcast``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .opspec import Const, NotLocal, OpSpec, Ref, node_shape

aten = torch.ops.aten
REDUCE_METHODS = {"mean": "mean", "sum": "sum", "amax": "max"}
REDUCE_FUNCTIONS: dict[Any, str] = {torch.mean: "mean", torch.sum: "sum", torch.amax: "max"}
ATEN_REDUCE: dict[Any, str] = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "max"}
ADAPTIVE_FUNCTIONS: dict[Any, str] = {
    F.adaptive_avg_pool2d: "mean", F.adaptive_max_pool2d: "max", aten.adaptive_avg_pool2d.default: "mean",
    aten._adaptive_avg_pool2d.default: "mean",
}
ADAPTIVE_MODULES: dict[type[nn.Module], str] = {nn.AdaptiveAvgPool2d: "mean", nn.AdaptiveMaxPool2d: "max"}
BROADCAST_METHODS = {"expand", "expand_as", "repeat"}
BROADCAST_FUNCTIONS: tuple[Any, ...] = (
    F.interpolate, aten.expand.default, aten.repeat.default, aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.default, aten.upsample_nearest2d.default,
    aten.upsample_bicubic2d.vec,
)


def match_reduce(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Any, str, Any, bool] | None:
    """(input, op, dims, keepdim) when ``node`` is a reduction over dims, else None."""
    t = node.target
    if node.op == "call_module":
        mod = modules[str(t)]
        op = next((v for k, v in ADAPTIVE_MODULES.items() if isinstance(mod, k)), None)
        if op is None:
            return None
        if getattr(mod, "return_indices", False) or _size_of(mod.output_size) != (1, 1):
            return None
        return node.args[0], op, (2, 3), True
    if node.op == "call_method" and str(t) in REDUCE_METHODS:
        return _dims_call(node, REDUCE_METHODS[str(t)], first=1)
    if node.op != "call_function":
        return None
    if t in ADAPTIVE_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if node.kwargs.get("return_indices") or (len(node.args) > 2 and node.args[2]):
            return None
        return (node.args[0], ADAPTIVE_FUNCTIONS[t], (2, 3), True) if _size_of(size) == (1, 1) else None
    if t in REDUCE_FUNCTIONS:
        return _dims_call(node, REDUCE_FUNCTIONS[t], first=1)
    if t in ATEN_REDUCE:
        return _dims_call(node, ATEN_REDUCE[t], first=1)
    return None


def _size_of(v: Any) -> tuple[Any, Any] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (v[0], v[1])
    return None


def _dims_call(node: fx.Node, op: str, first: int) -> tuple[Any, str, Any, bool]:
    dims = node.args[first] if len(node.args) > first else node.kwargs.get("dim", None)
    keep = node.args[first + 1] if len(node.args) > first + 1 else node.kwargs.get("keepdim", False)
    return node.args[0], op, dims, bool(keep)


def reduce_spec(x: Any, op: str, dims: Any, keepdim: bool, out: tuple[int, ...], base: dict[str, Any]) -> OpSpec:
    """A reduce point: a mean, sum or max of a whole (N, C, H, W) map over exactly H and W."""
    s = node_shape(x)
    if s is None or len(s) != 4 or not isinstance(x, fx.Node):
        raise NotLocal(f"it reduces something that is not an (N, C, H, W) map (shape {s})")
    dl = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    if dl is None or sorted(d % 4 if isinstance(d, int) else -1 for d in dl) != [2, 3]:
        raise NotLocal(f"it reduces over dims {dims!r}; a reduce point reduces over exactly H and W (2, 3)")
    return OpSpec(kind="reduce", inputs=(x.name,), name=base["name"], out_shape=(s[1], 1, 1),
                  params=dict(op="max" if op == "max" else "sum", divisor=s[2] * s[3] if op == "mean" else 1,
                              form=tuple(out[1:]), keepdim=keepdim))


def is_broadcast(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in BROADCAST_METHODS
    if node.op == "call_module":
        return False
    return any(node.target is f for f in BROADCAST_FUNCTIONS)


def value_spec(gm: fx.GraphModule, node: fx.Node, glob: set[str], base: dict[str, Any]) -> OpSpec:
    """A node that reads only global values and constants: run whole by every tile that needs it,
    or, when it spreads a per-channel value over H x W, a ``broadcast`` map."""
    if node.op == "call_method" and str(node.target).endswith("_"):
        raise NotLocal("in-place methods mutate values other nodes may read")
    if node.op not in ("call_method", "call_function", "call_module"):
        raise NotLocal(f"node kind {node.op} is not an op")
    out = node_shape(node)
    if out is not None and len(out) >= 4 and out[-1] * out[-2] > 1:
        return broadcast_spec(node, glob, out, base)
    reads: list[str] = []

    def convert(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return Const(str(a.target))
            if a.name not in glob:  # pragma: no cover - analyze only sends nodes whose inputs are global
                raise NotLocal(f"operand '{a.name}' is not a global value")
            if a.name not in reads:
                reads.append(a.name)
            return Ref(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(convert(v) for v in a)
        if isinstance(a, dict):
            return {k: convert(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(convert(a.start), convert(a.stop), convert(a.step))
        return a

    args, kwargs = convert(tuple(node.args)), convert(dict(node.kwargs))
    how = {"call_module": "module", "call_method": "method"}.get(node.op, "function")
    target = str(node.target) if node.op != "call_function" else node.target
    return OpSpec(kind="global", inputs=(), how=how, target=target, args=args, kwargs=kwargs,  # type: ignore[arg-type]
                  globals_in=tuple(reads), **base)


def broadcast_spec(node: fx.Node, glob: set[str], out: tuple[int, ...], base: dict[str, Any]) -> OpSpec:
    g = node.args[0] if node.args else None
    gs = node_shape(g)
    if not is_broadcast(node) or not isinstance(g, fx.Node) or g.name not in glob or gs is None:
        raise NotLocal("it builds a map with spatial extent from global values, and is not a known broadcast "
                       "(expand, expand_as, repeat, or interpolate of a 1x1 value)")
    if len(gs) != 4 or gs[2:] != (1, 1) or gs[:2] != out[:2] or len(out) != 4:
        raise NotLocal(f"it spreads a value of shape {gs} to {out}; only (N, C, 1, 1) -> (N, C, H, W) is a broadcast")
    return OpSpec(kind="broadcast", inputs=(), globals_in=(g.name,), **base)


def global_operand_ok(shape: tuple[int, ...] | None) -> bool:
    """A whole value may meet a map in an elementwise op when it does not vary over H and W."""
    if shape is None:
        return True  # a Python number or size
    return all(v == 1 for v in shape[-2:])
