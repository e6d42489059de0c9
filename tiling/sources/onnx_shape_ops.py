"""ONNX tensor plumbing (shape arithmetic, slicing, concatenation, resizing) as torch calls.

Exporters surround the compute ops with ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
chains; on static shapes those fold to constants as the builder runs them, and what reaches the
graph is one ``reshape`` with plain numbers. Channel slices are written ``x[:, a:b]`` and
channel concatenation ``torch.cat(..., 1)``, the forms the tiler fuses.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper

from .onnx_graph import Handler, NodeCtx, Value

__all__ = ["SHAPE_HANDLERS", "rank"]

_BIG = 2**62  # ONNX uses INT64_MAX-ish numbers for "to the end"


def rank(n: NodeCtx, i: int) -> int:
    return len(n.shape(i))


def _axis(n: NodeCtx, axis: int, r: int) -> int:
    a = axis + r if axis < 0 else axis
    if not 0 <= a < r:
        raise n.fail(f"axis {axis} is out of range for rank {r}")
    return a


def constant(n: NodeCtx) -> Value:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = n.attr(key)
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            return v
        dtype = torch.float32 if "float" in key else torch.int64
        return torch.tensor(v, dtype=dtype)
    raise n.fail("only value, value_float(s) and value_int(s) constants are supported")


def identity(n: NodeCtx) -> Value:
    if n.op_type == "Dropout" and len(n.node.output) > 1 and n.node.output[1]:
        raise n.fail("the mask output is not supported (inference only)")
    return n.input(0)


def shape(n: NodeCtx) -> Value:
    s = list(n.shape(0))
    start, end = int(n.attr("start", 0)), n.attr("end")
    return torch.tensor(s[start:None if end is None else int(end)], dtype=torch.int64)


def size(n: NodeCtx) -> Value:
    return torch.tensor(math.prod(n.shape(0)), dtype=torch.int64)


def cast(n: NodeCtx) -> Value:
    to = int(n.attr("to"))
    try:
        np_type = helper.tensor_dtype_to_np_dtype(to)
        dtype = torch.from_numpy(np.zeros(0, dtype=np_type)).dtype
    except (KeyError, TypeError, ValueError):
        raise n.fail(f"cast to ONNX type {to} has no torch dtype") from None
    return n.builder.method("to", n.input(0), dtype)


def constant_of_shape(n: NodeCtx) -> Value:
    dims = [int(v) for v in n.const(0, "shape").tolist()]
    value = n.attr("value")
    fill = value.reshape(-1)[0] if isinstance(value, torch.Tensor) else torch.tensor(0.0)
    return torch.full(dims, fill.item(), dtype=fill.dtype)


def gather(n: NodeCtx) -> Value:
    x, idx = n.input(0), n.input(1)
    r = rank(n, 0)
    axis = _axis(n, int(n.attr("axis", 0)), r)
    dim = n.shape(0)[axis]
    b = n.builder
    if isinstance(idx, torch.Tensor):
        idx = torch.where(idx < 0, idx + dim, idx).to(torch.int64)
        if idx.dim() == 0:
            return b.call(torch.select, x, axis, int(idx))
        picked = b.call(torch.index_select, x, axis, idx.reshape(-1))
        out = [*n.shape(0)[:axis], *idx.shape, *n.shape(0)[axis + 1:]]
        return picked if idx.dim() == 1 else b.method("reshape", picked, *out)
    raise n.fail("indices computed from the model input are not supported")


def unsqueeze(n: NodeCtx) -> Value:
    axes = n.ints("axes", 1) or []
    x = n.input(0)
    r = rank(n, 0) + len(axes)
    for a in sorted(a + r if a < 0 else a for a in axes):
        x = n.builder.method("unsqueeze", x, a)
    return x


def squeeze(n: NodeCtx) -> Value:
    axes = n.ints("axes", 1)
    x, s = n.input(0), n.shape(0)
    if axes is None:
        axes = [i for i, d in enumerate(s) if d == 1]
    keep = [d for i, d in enumerate(s) if i not in {a + len(s) if a < 0 else a for a in axes}]
    return _reshape_to(n, x, s, keep)


def _reshape_to(n: NodeCtx, x: Value, src: tuple[int, ...], out: list[int]) -> Value:
    """``x.reshape(out)``, keeping a leading batch free (``-1``) when the reshape preserves it."""
    b = n.builder
    if isinstance(x, torch.Tensor):
        return x.reshape(out)
    if src and out and src[0] == out[0] and math.prod(src[1:]) == math.prod(out[1:]) and len(out) > 1:
        return b.method("reshape", x, -1, *out[1:])
    return b.method("reshape", x, *out)


def reshape(n: NodeCtx) -> Value:
    x, s = n.input(0), n.shape(0)
    target = [int(v) for v in n.const(1, "shape").tolist()] if not n.attr("shape") else list(n.attr("shape"))
    allow_zero = bool(n.attr("allowzero", 0))
    out = [s[i] if (v == 0 and not allow_zero) else v for i, v in enumerate(target)]
    if -1 in out:
        known = math.prod(v for v in out if v != -1)
        out[out.index(-1)] = math.prod(s) // known if known else 0
    return _reshape_to(n, x, s, out)


def flatten(n: NodeCtx) -> Value:
    s = n.shape(0)
    axis = int(n.attr("axis", 1))
    axis = axis + len(s) if axis < 0 else axis
    return _reshape_to(n, n.input(0), s, [math.prod(s[:axis]), math.prod(s[axis:])])


def transpose(n: NodeCtx) -> Value:
    r = rank(n, 0)
    perm = [int(v) for v in n.attr("perm", list(range(r - 1, -1, -1)))]
    return n.builder.method("permute", n.input(0), *perm)


def expand(n: NodeCtx) -> Value:
    dims = [int(v) for v in n.const(1, "shape").tolist()]
    out = list(np.broadcast_shapes(tuple(n.shape(0)), tuple(dims)))
    return n.builder.method("expand", n.input(0), *out)


def concat(n: NodeCtx) -> Value:
    vals = [n.input(i) for i in range(len(n.node.input)) if n.has(i)]
    r = max(len(n.shape(i)) for i in range(len(n.node.input)) if n.has(i))
    axis = _axis(n, int(n.attr("axis")), r)
    vals = [v for i, v in enumerate(vals) if not (isinstance(v, torch.Tensor) and v.numel() == 0 and r > 1)]
    return n.builder.call(torch.cat, vals, axis)


def _index(axis: int, sl: slice) -> tuple[slice, ...]:
    return (*(slice(None),) * axis, sl)


def split(n: NodeCtx) -> list[Value]:
    """Split sizes: an attribute (before 13), an input (13+), or ``num_outputs`` (18+) / equal parts."""
    x, s = n.input(0), n.shape(0)
    axis = _axis(n, int(n.attr("axis", 0)), len(s))
    sizes = n.ints("split", 1)
    k = len(n.node.output)
    if sizes is None:
        parts = int(n.attr("num_outputs", k))
        step = -(-s[axis] // parts)
        sizes = [min(step, s[axis] - i * step) for i in range(parts)]
    if sum(sizes) != s[axis]:
        raise n.fail(f"split sizes {sizes} do not add up to dim {axis} = {s[axis]}")
    outs, start = [], 0
    for sz in sizes:
        outs.append(n.builder.call(operator.getitem, x, _index(axis, slice(start, start + sz))))
        start += sz
    return outs


def slice_(n: NodeCtx) -> Value:
    """Slice: starts/ends/axes as attributes before opset 10, inputs (with steps) from 10 on."""
    x, s = n.input(0), n.shape(0)
    starts, ends = n.ints("starts", 1), n.ints("ends", 2)
    if starts is None or ends is None:
        raise n.fail("starts and ends are required")
    axes = n.ints("axes", 3, list(range(len(starts))))
    steps = n.ints("steps", 4, [1] * len(starts))
    idx: list[slice] = [slice(None)] * len(s)
    flips = []
    for st, en, ax, sp in zip(starts, ends, axes, steps):  # type: ignore[arg-type]
        ax = _axis(n, ax, len(s))
        dim = s[ax]
        if sp > 0:
            st, en = (max(0, min(dim, v + dim if v < 0 else v)) for v in (st, en))
            idx[ax] = slice(st, en, sp) if sp != 1 else slice(st, en)
        else:  # walk a flipped axis forwards: element i of the flip is element dim-1-i
            st = max(-1, min(dim - 1, st + dim if st < 0 else st))
            en = max(-1, min(dim - 1, en + dim if en < 0 else en))
            flips.append(ax)
            idx[ax] = slice(dim - 1 - st, dim - 1 - en, -sp)
    if flips:
        x = n.builder.call(torch.flip, x, flips)
    last = max((i for i, sl in enumerate(idx) if sl != slice(None)), default=0)
    return n.builder.call(operator.getitem, x, tuple(idx[:max(last + 1, 2)]))


def pad(n: NodeCtx) -> Value:
    """Pad: pads and value as attributes before opset 11, inputs from 11 (``axes`` from 18)."""
    x, s = n.input(0), n.shape(0)
    mode = str(n.attr("mode", "constant"))
    pads = n.ints("pads", 1)
    if pads is None:
        raise n.fail("pads are required")
    value = n.attr("value", 0.0) if n.opset < 11 else (float(n.const(2, "constant_value").item()) if n.has(2) else 0.0)
    r = len(s)
    axes = n.ints("axes", 3, list(range(r))) if n.opset >= 18 else list(range(r))
    full = [0] * (2 * r)
    for k, a in enumerate(axes):  # type: ignore[arg-type]
        a = a + r if a < 0 else a
        full[a], full[a + r] = pads[k], pads[k + len(axes)]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise n.fail(f"mode={mode!r}; accepted: constant, reflect, edge, wrap")
    if any(v < 0 for v in full):  # negative pads crop
        idx = tuple(slice(-min(full[a], 0), s[a] + min(full[a + r], 0)) for a in range(r))
        x = n.builder.call(operator.getitem, x, idx)
        full = [max(v, 0) for v in full]
    padded = [a for a in range(r) if full[a] or full[a + r]]
    if not padded:
        return x
    torch_pads: list[int] = []  # torch lists pads from the last dim back to the first padded one
    for a in range(r - 1, padded[0] - 1, -1):
        torch_pads += [full[a], full[a + r]]
    if torch_mode == "constant":
        return n.builder.call(F.pad, x, tuple(torch_pads), value=float(value))
    return n.builder.call(F.pad, x, tuple(torch_pads), mode=torch_mode)


def _nearest_index(out: int, size: int, scale: float, ctm: str, nearest: str) -> list[int]:
    """Source index of each output position per the ONNX Resize formulas."""
    idx = []
    for o in range(out):
        if ctm == "asymmetric":
            x = o / scale
        elif ctm == "align_corners":
            x = o * (size - 1) / (out - 1) if out > 1 else 0.0
        elif ctm == "pytorch_half_pixel" and out == 1:
            x = 0.0
        elif ctm in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
            x = (o + 0.5) / scale - 0.5
        elif ctm == "tf_half_pixel_for_nn":
            x = (o + 0.5) / scale
        else:
            raise ValueError(f"coordinate_transformation_mode={ctm!r}")
        if nearest == "floor":
            i = math.floor(x)
        elif nearest == "ceil":
            i = math.ceil(x)
        elif nearest == "round_prefer_ceil":
            i = math.floor(x + 0.5)
        else:  # round_prefer_floor
            i = math.ceil(x - 0.5)
        idx.append(min(max(i, 0), size - 1))
    return idx


def _resize(n: NodeCtx, scales: list[float] | None, sizes: list[int] | None, mode: str, ctm: str,
            nearest: str) -> Value:
    x, s = n.input(0), n.shape(0)
    if len(s) != 4:
        raise n.fail(f"input of rank {len(s)}; only (N, C, H, W) resizing is supported")
    if sizes is not None:
        out = [int(v) for v in sizes[-2:]]
        sc = [o / i for o, i in zip(out, s[2:])]
        if list(sizes[:2]) != list(s[:2]):
            raise n.fail("resizing the batch or channel dims is not supported")
    elif scales is not None:
        if [float(v) for v in scales[:2]] != [1.0, 1.0]:
            raise n.fail("scaling the batch or channel dims is not supported")
        sc = [float(v) for v in scales[-2:]]
        out = [int(math.floor(i * f)) for i, f in zip(s[2:], sc)]
    else:
        raise n.fail("neither scales nor sizes is given")
    b = n.builder
    if mode == "nearest":
        hi = _nearest_index(out[0], s[2], sc[0], ctm, nearest)
        wi = _nearest_index(out[1], s[3], sc[1], ctm, nearest)
        if out[0] % s[2] == 0 and out[1] % s[3] == 0:
            fh, fw = out[0] // s[2], out[1] // s[3]
            if hi == [o // fh for o in range(out[0])] and wi == [o // fw for o in range(out[1])]:
                return b.call(F.interpolate, x, scale_factor=(float(fh), float(fw)), mode="nearest")
        x = b.call(torch.index_select, x, 2, torch.tensor(hi, dtype=torch.int64))
        return b.call(torch.index_select, x, 3, torch.tensor(wi, dtype=torch.int64))
    torch_mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode)
    if torch_mode is None or ctm not in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        raise n.fail(f"mode={mode!r} with coordinate_transformation_mode={ctm!r} has no torch equivalent")
    if ctm == "half_pixel" and 1 in out:
        raise n.fail("half_pixel resizing to a size of 1 differs from PyTorch's")
    return b.call(F.interpolate, x, size=tuple(out), mode=torch_mode, align_corners=ctm == "align_corners")


def resize(n: NodeCtx) -> Value:
    """Resize (10: X, scales; 11+: X, roi, scales, sizes)."""
    if n.attr("antialias", 0) or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise n.fail("antialias and keep_aspect_ratio_policy are not supported")
    if n.attr("axes") is not None:
        raise n.fail("the axes attribute is not supported")
    si, zi = (1, None) if n.opset < 11 else (2, 3)
    scales = n.const(si, "scales").tolist() if n.has(si) else None
    if scales is not None and len(scales) == 0:
        scales = None
    sizes = n.const(zi, "sizes").tolist() if zi is not None and n.has(zi) else None
    ctm = str(n.attr("coordinate_transformation_mode", "asymmetric" if n.opset < 11 else "half_pixel"))
    nearest = str(n.attr("nearest_mode", "round_prefer_floor" if n.opset >= 11 else "floor"))
    if n.opset < 11:
        nearest = "floor"
    return _resize(n, scales, sizes, str(n.attr("mode", "nearest")), ctm, nearest)


def upsample(n: NodeCtx) -> Value:
    """Upsample (7-8: scales attribute; 9: scales input): asymmetric coordinates, floor rounding."""
    scales = n.attr("scales")
    if scales is None:
        scales = n.const(1, "scales").tolist()
    mode = str(n.attr("mode", "nearest"))
    if mode not in ("nearest",):
        raise n.fail(f"mode={mode!r}; Upsample's linear mode uses asymmetric coordinates, which PyTorch lacks")
    return _resize(n, [float(v) for v in scales], None, mode, "asymmetric", "floor")


def _fn(fn: Any, k: int) -> Handler:
    def handle(n: NodeCtx) -> Value:
        return n.builder.call(fn, *(n.input(i) for i in range(k)))

    return handle


def range_(n: NodeCtx) -> Value:
    start, limit, delta = (n.const(i, w) for i, w in ((0, "start"), (1, "limit"), (2, "delta")))
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


SHAPE_HANDLERS: dict[str, Handler] = {
    "Constant": constant, "Identity": identity, "Dropout": identity, "Shape": shape, "Size": size,
    "Cast": cast, "ConstantOfShape": constant_of_shape, "Gather": gather, "Unsqueeze": unsqueeze,
    "Squeeze": squeeze, "Reshape": reshape, "Flatten": flatten, "Transpose": transpose, "Expand": expand,
    "Concat": concat, "Split": split, "Slice": slice_, "Pad": pad, "Resize": resize, "Upsample": upsample,
    "Range": range_, "Equal": _fn(torch.eq, 2), "Less": _fn(torch.lt, 2), "Greater": _fn(torch.gt, 2),
    "Where": _fn(torch.where, 3), "Not": _fn(torch.logical_not, 1), "Floor": _fn(torch.floor, 1),
    "Ceil": _fn(torch.ceil, 1),
}
