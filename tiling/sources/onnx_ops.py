"""ONNX compute ops as the torch calls a hand-written model would make (see :mod:`tiling.sources.onnx`).

Each handler reads one node through a :class:`NodeCtx` and emits through the builder, which folds
operations on constants. Convolutions and pools become ``nn.Conv2d``/``nn.MaxPool2d``/``nn.AvgPool2d``
modules when PyTorch's own padding and ``ceil_mode`` rules give exactly ONNX's windows; otherwise an
explicit ``F.pad`` (zeros, or minus infinity for max pooling) carries the asymmetric part, which the
tiler joins to the conv's layer. Tensor plumbing lives in :mod:`tiling.sources.onnx_shape_ops`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .emit import with_weights
from .onnx_graph import Handler, NodeCtx, Value
from .onnx_shape_ops import SHAPE_HANDLERS, rank

__all__ = ["HANDLERS"]


# --- windows: conv and pools ---------------------------------------------------------------------


def _window_pads(n: NodeCtx, in_hw: Sequence[int], k: Sequence[int], s: Sequence[int],
                 d: Sequence[int]) -> list[int]:
    """ONNX pads [top, left, bottom, right] after resolving ``auto_pad``."""
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in n.attr("pads", [0] * 4)]
        if len(pads) != 4:
            raise n.fail(f"pads {pads} are not those of a 2-D window")
        return pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise n.fail(f"auto_pad={auto!r}; accepted: NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    begin, end = [], []
    for size, kk, ss, dd in zip(in_hw, k, s, d):
        total = max(0, (math.ceil(size / ss) - 1) * ss + (kk - 1) * dd + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return [*begin, *end]


def _spatial(n: NodeCtx) -> tuple[int, int]:
    shape = n.shape(0)
    if len(shape) != 4:
        raise n.fail(f"input of rank {len(shape)}; only 2-D (N, C, H, W) windows are supported")
    return shape[2], shape[3]


def _pad_explicit(n: NodeCtx, x: Value, pads: Sequence[int], value: float) -> Value:
    """F.pad for ONNX pads [top, left, bottom, right] (torch wants left, right, top, bottom)."""
    t, left, b, r = pads
    if not any(pads):
        return x
    return n.builder.call(F.pad, x, (left, r, t, b), value=value)


def conv(n: NodeCtx) -> Value:
    x, w = n.input(0), n.const(1, "weight")
    bias = n.const(2, "bias") if n.has(2) else None
    if w.dim() != 4:
        raise n.fail(f"weight of rank {w.dim()}; only 2-D convolutions are supported")
    k = list(w.shape[2:])
    s = [int(v) for v in n.attr("strides", [1, 1])]
    d = [int(v) for v in n.attr("dilations", [1, 1])]
    groups = int(n.attr("group", 1))
    pads = _window_pads(n, _spatial(n), k, s, d)
    sym = pads[0] == pads[2] and pads[1] == pads[3]
    if not sym:
        x = _pad_explicit(n, x, pads, 0.0)
    mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(k), tuple(s), (pads[0], pads[1]) if sym else 0,
                    tuple(d), groups, bias=bias is not None, device="meta")
    return n.builder.module(with_weights(mod, weight=w, bias=bias), n.hint, x)


def conv_transpose(n: NodeCtx) -> Value:
    """``nn.ConvTranspose2d``: exact, but the tiler has no geometry for it, so it ends fusion."""
    x, w = n.input(0), n.const(1, "weight")
    bias = n.const(2, "bias") if n.has(2) else None
    if w.dim() != 4:
        raise n.fail(f"weight of rank {w.dim()}; only 2-D transposed convolutions are supported")
    ih, iw = _spatial(n)
    k = list(w.shape[2:])
    s = [int(v) for v in n.attr("strides", [1, 1])]
    d = [int(v) for v in n.attr("dilations", [1, 1])]
    groups = int(n.attr("group", 1))
    opad = [int(v) for v in n.attr("output_padding", [0, 0])]
    full = [(i - 1) * ss + (kk - 1) * dd + 1 + op for i, ss, kk, dd, op in zip((ih, iw), s, k, d, opad)]
    out_shape = n.attr("output_shape")
    auto = n.attr("auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = [int(v) for v in out_shape[-2:]] if out_shape is not None else [i * ss for i, ss in zip((ih, iw), s)]
        total = [f - o for f, o in zip(full, want)]
        if any(t < 0 for t in total):
            raise n.fail(f"output_shape {want} is larger than the full transposed output {full}")
        lower = auto == "SAME_LOWER"
        pads = [t - t // 2 if lower else t // 2 for t in total] + [t // 2 if lower else t - t // 2 for t in total]
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = [int(v) for v in n.attr("pads", [0, 0, 0, 0])]
    mod = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(k), tuple(s), 0, tuple(opad), groups,
                             bias=bias is not None, dilation=tuple(d), device="meta")
    y = n.builder.module(with_weights(mod, weight=w, bias=bias), n.hint, x)
    if not any(pads):
        return y
    t, left, b, r = pads
    idx = (slice(None), slice(None), slice(t, full[0] - b), slice(left, full[1] - r))
    return n.builder.call(operator.getitem, y, idx)


def _pool_geometry(n: NodeCtx) -> tuple[list[int], list[int], list[int], list[int], bool, int, int]:
    k = [int(v) for v in n.attr("kernel_shape")]
    if len(k) != 2:
        raise n.fail(f"kernel_shape {k}; only 2-D pools are supported")
    s = [int(v) for v in n.attr("strides", [1, 1])]
    d = [int(v) for v in n.attr("dilations", [1, 1])]
    ih, iw = _spatial(n)
    pads = _window_pads(n, (ih, iw), k, s, d)
    return k, s, d, pads, bool(n.attr("ceil_mode", 0)), ih, iw


def _onnx_out(size: int, k: int, s: int, d: int, pb: int, pe: int, ceil: bool) -> int:
    span = size + pb + pe - ((k - 1) * d + 1)
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + pb:  # a window may not start in the end padding
        out -= 1
    return out


def _torch_out(size: int, k: int, s: int, d: int, p: int, ceil: bool) -> int:
    span = size + 2 * p - ((k - 1) * d + 1)
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _native_pool_ok(n: NodeCtx, k: Sequence[int], s: Sequence[int], d: Sequence[int], pads: Sequence[int],
                    ceil: bool, hw: Sequence[int]) -> bool:
    """Whether PyTorch's symmetric padding and ceil rule give exactly ONNX's windows."""
    if pads[0] != pads[2] or pads[1] != pads[3] or any(pads[i] > k[i] // 2 for i in range(2)):
        return False
    want = n.out_shape()
    for ax in range(2):
        ours = _torch_out(hw[ax], k[ax], s[ax], d[ax], pads[ax], ceil)
        theirs = _onnx_out(hw[ax], k[ax], s[ax], d[ax], pads[ax], pads[ax + 2], ceil)
        if ours != theirs or (want is not None and len(want) == 4 and want[2 + ax] != ours):
            return False
    return True


def _overhang(hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int],
              pads: Sequence[int], ceil: bool) -> list[int]:
    """Extra end padding so that floor-mode windows over the padded input are ONNX's windows."""
    out = []
    for ax in range(2):
        o = _onnx_out(hw[ax], k[ax], s[ax], d[ax], pads[ax], pads[ax + 2], ceil)
        out.append(max(0, (o - 1) * s[ax] + (k[ax] - 1) * d[ax] + 1 - (hw[ax] + pads[ax] + pads[ax + 2])))
    return out


def max_pool(n: NodeCtx) -> Value:
    if len(n.node.output) > 1 and n.node.output[1]:
        raise n.fail("the Indices output is not supported")
    k, s, d, pads, ceil, ih, iw = _pool_geometry(n)
    x = n.input(0)
    if _native_pool_ok(n, k, s, d, pads, ceil, (ih, iw)):
        mod = nn.MaxPool2d(tuple(k), tuple(s), (pads[0], pads[1]), tuple(d), ceil_mode=ceil)
        return n.builder.module(mod, n.hint, x)
    extra = _overhang((ih, iw), k, s, d, pads, ceil)
    x = _pad_explicit(n, x, [pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1]], -math.inf)
    return n.builder.module(nn.MaxPool2d(tuple(k), tuple(s), 0, tuple(d)), n.hint, x)


def average_pool(n: NodeCtx) -> Value:
    k, s, d, pads, ceil, ih, iw = _pool_geometry(n)
    if d != [1, 1]:
        raise n.fail(f"dilations {d}; PyTorch's average pooling has no dilation")
    include = bool(n.attr("count_include_pad", 0))
    x, b = n.input(0), n.builder
    if _native_pool_ok(n, k, s, d, pads, ceil, (ih, iw)):
        mod = nn.AvgPool2d(tuple(k), tuple(s), (pads[0], pads[1]), ceil_mode=ceil, count_include_pad=include)
        return b.module(mod, n.hint, x)
    # Sum over zero-padded windows divided by a count of the cells that count, both as local ops, so
    # tiles still compute divisors from whole-image positions.
    extra = _overhang((ih, iw), k, s, d, pads, ceil)
    total = [pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1]]
    summed = b.module(nn.AvgPool2d(tuple(k), tuple(s), 0, divisor_override=1), n.hint + "_sum",
                      _pad_explicit(n, x, total, 0.0))
    ones = b.call(operator.add, b.call(operator.mul, x, 0.0), 1.0)
    mask = _pad_explicit(n, ones, pads, 1.0 if include else 0.0)
    mask = _pad_explicit(n, mask, [0, 0, extra[0], extra[1]], 0.0)
    count = b.module(nn.AvgPool2d(tuple(k), tuple(s), 0, divisor_override=1), n.hint + "_count", mask)
    return b.call(operator.truediv, summed, count)


def global_pool(n: NodeCtx) -> Value:
    x = n.input(0)
    dims = tuple(range(2, len(n.shape(0))))
    if n.op_type == "GlobalAveragePool":
        return n.builder.call(torch.mean, x, dims, keepdim=True)
    return n.builder.call(torch.amax, x, dims, keepdim=True)


# --- normalisation and activations ---------------------------------------------------------------


def batch_norm(n: NodeCtx) -> Value:
    if n.attr("training_mode", 0) or any(o for o in n.node.output[1:]):
        raise n.fail("training mode (running statistics outputs) is not supported")
    x = n.input(0)
    scale, bias, mean, var = (n.const(i, w) for i, w in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
    eps = float(n.attr("epsilon", 1e-5))
    if len(n.shape(0)) == 4:
        mod = nn.BatchNorm2d(scale.numel(), eps=eps, device="meta")
        mod = with_weights(mod, weight=scale, bias=bias, running_mean=mean, running_var=var)
        return n.builder.module(mod, n.hint, x)
    return n.builder.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


def _unary(fn: Any, **kw: Any) -> Handler:
    def handle(n: NodeCtx) -> Value:
        return n.builder.call(fn, n.input(0), **kw)

    return handle


def leaky_relu(n: NodeCtx) -> Value:
    return n.builder.call(F.leaky_relu, n.input(0), float(n.attr("alpha", 0.01)))


def hard_sigmoid(n: NodeCtx) -> Value:
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    x, b = n.input(0), n.builder
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return b.call(F.hardsigmoid, x)
    return b.call(torch.clamp, b.call(operator.add, b.call(operator.mul, x, alpha), beta), 0.0, 1.0)


def elu(n: NodeCtx) -> Value:
    return n.builder.call(F.elu, n.input(0), float(n.attr("alpha", 1.0)))


def gelu(n: NodeCtx) -> Value:
    return n.builder.call(F.gelu, n.input(0), approximate=str(n.attr("approximate", "none")))


def clip(n: NodeCtx) -> Value:
    """Clip: bounds are attributes before opset 11 and optional inputs from 11 on."""
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo = float(n.const(1, "min").item()) if n.has(1) else None
        hi = float(n.const(2, "max").item()) if n.has(2) else None
    x = n.input(0)
    if lo is None and hi is None:
        return x
    if lo == 0.0 and hi == 6.0:
        return n.builder.call(F.relu6, x)
    return n.builder.call(torch.clamp, x, None if lo is None else float(lo), None if hi is None else float(hi))


def softmax(n: NodeCtx) -> Value:
    """Softmax/LogSoftmax: from opset 13 along ``axis``; before, over everything from ``axis`` on."""
    x, b = n.input(0), n.builder
    r = rank(n, 0)
    fn = F.softmax if n.op_type == "Softmax" else F.log_softmax
    axis = int(n.attr("axis", -1 if n.opset >= 13 else 1))
    axis = axis + r if axis < 0 else axis
    if n.opset >= 13 or axis == r - 1:
        return b.call(fn, x, axis)
    shape = n.shape(0)
    flat = b.call(torch.flatten, x, axis)
    return b.method("reshape", b.call(fn, flat, axis), *shape)


# --- arithmetic ------------------------------------------------------------------------------------


def _operand(n: NodeCtx, i: int, other_rank: int) -> Any:
    """A constant with one element becomes a Python number (so the graph reads ``x * 0.5``)."""
    v = n.input(i)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() <= other_rank and v.dtype != torch.bool:
        return v.item()
    return v


def _binary(op: Any) -> Handler:
    def handle(n: NodeCtx) -> Value:
        a, b = n.input(0), n.input(1)
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return n.builder.call(op, a, b)
        if isinstance(a, fx.Node):
            b = _operand(n, 1, rank(n, 0))
        elif isinstance(b, fx.Node):
            a = _operand(n, 0, rank(n, 1))
        if op is operator.truediv and not _is_float(n, a, 0) and not _is_float(n, b, 1):
            return n.builder.call(torch.div, a, b, rounding_mode="trunc")  # ONNX integer division
        return n.builder.call(op, a, b)

    return handle


def _is_float(n: NodeCtx, v: Any, i: int) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point()
    if isinstance(v, float):
        return True
    if isinstance(v, fx.Node):
        return n.builder.dtypes.get(n.node.input[i], torch.float32).is_floating_point
    return False


def _variadic(fn: Any) -> Handler:
    def handle(n: NodeCtx) -> Value:
        vals = [n.input(i) for i in range(len(n.node.input)) if n.has(i)]
        out = vals[0]
        for v in vals[1:]:
            out = n.builder.call(fn, out, v)
        return out

    return handle


def gemm(n: NodeCtx) -> Value:
    a, bm = n.input(0), n.input(1)
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    ta, tb = int(n.attr("transA", 0)), int(n.attr("transB", 0))
    c = n.opt(2)
    if isinstance(bm, torch.Tensor) and isinstance(c, (torch.Tensor, type(None))) and not ta:
        w = (bm if tb else bm.t()) * alpha
        bias = None if c is None else (c * beta).reshape(-1)
        if bias is None or bias.numel() in (1, w.shape[0]):
            mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            mod = with_weights(mod, weight=w, bias=None if bias is None else bias.expand(w.shape[0]))
            return n.builder.module(mod, n.hint, a)
    b = n.builder
    a = b.method("t", a) if ta else a
    bm = b.method("t", bm) if tb else bm
    y = b.call(torch.matmul, a, bm)
    if alpha != 1.0:
        y = b.call(operator.mul, y, alpha)
    if c is not None:
        y = b.call(operator.add, y, b.call(operator.mul, c, beta) if beta != 1.0 else c)
    return y


def matmul(n: NodeCtx) -> Value:
    a, bm = n.input(0), n.input(1)
    if isinstance(a, fx.Node) and isinstance(bm, torch.Tensor) and bm.dim() == 2:
        mod = nn.Linear(bm.shape[0], bm.shape[1], bias=False, device="meta")
        return n.builder.module(with_weights(mod, weight=bm.t()), n.hint, a)
    return n.builder.call(torch.matmul, a, bm)


def reduce(n: NodeCtx) -> Value:
    """ReduceMean/Max/Min/Sum: ``axes`` is an attribute until opset 18 (13 for ReduceSum), then an input."""
    x = n.input(0)
    r = rank(n, 0)
    axes = n.ints("axes", 1)
    keep = bool(n.attr("keepdims", 1))
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(r))
    dims = tuple(sorted(a + r if a < 0 else a for a in axes))
    fn = {"ReduceMean": torch.mean, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
          "ReduceSum": torch.sum}[n.op_type]
    return n.builder.call(fn, x, dims, keepdim=keep)


HANDLERS: dict[str, Handler] = {
    "Conv": conv, "ConvTranspose": conv_transpose, "MaxPool": max_pool, "AveragePool": average_pool,
    "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool, "BatchNormalization": batch_norm,
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "HardSwish": _unary(F.hardswish), "Exp": _unary(torch.exp), "Sqrt": _unary(torch.sqrt),
    "Abs": _unary(torch.abs), "Neg": _unary(torch.neg), "Erf": _unary(torch.erf),
    "Softplus": _unary(F.softplus), "Reciprocal": _unary(torch.reciprocal),
    "LeakyRelu": leaky_relu, "HardSigmoid": hard_sigmoid, "Elu": elu, "Gelu": gelu, "Clip": clip,
    "Softmax": softmax, "LogSoftmax": softmax,
    "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _binary(operator.mul),
    "Div": _binary(operator.truediv), "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(operator.add),
    "Gemm": gemm, "MatMul": matmul,
    "ReduceMean": reduce, "ReduceMax": reduce, "ReduceMin": reduce, "ReduceSum": reduce,
    **SHAPE_HANDLERS,
}
