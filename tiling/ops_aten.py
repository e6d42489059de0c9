"""ATen forms of the local ops, for graphs captured by ``torch.export`` when ``torch.fx`` fails.

``torch.export`` records ATen overloads (``aten.conv2d.default``, ``aten.max_pool2d.default``,
``aten._native_batch_norm_legit_no_training.default`` ...) instead of modules and ``torch.nn.functional``
calls. Each handler here reads the overload's schema order and hands the same arguments to the
classifier's helpers, so the geometry and the stage programs are the ones the fx path uses.
Supported: convolutions (``conv2d``, ``convolution`` when not transposed), max and average pooling,
constant padding (``constant_pad_nd``, ``pad``), nearest upsampling, batch norm in inference form, channel ``cat``/``slice``/``split``,
shape-preserving ``view``/``reshape``/``transpose``/``permute``/``flatten``/``unflatten``, the
reductions of :mod:`tiling.ops_reduce`, ``expand`` of global values, and the elementwise ops listed
in ``POINTWISE``. Everything else ends fusion, like any unknown op.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .ops_shape import (check_index, permute_spec, size_spec, split_virtual, transpose_spec, tuple_item_spec,
                        view_spec)
from .opspec import NotLocal, OpSpec, Ref, Virtual, bind

aten = torch.ops.aten
POINTWISE = {
    aten.relu, aten.relu6, aten.leaky_relu, aten.sigmoid, aten.tanh, aten.silu, aten.hardswish, aten.hardsigmoid,
    aten.gelu, aten.elu, aten.hardtanh, aten.mish, aten.softplus, aten.add, aten.sub, aten.mul, aten.div,
    aten.neg, aten.clamp, aten.clamp_min, aten.clamp_max, aten.exp, aten.sqrt, aten.rsqrt, aten.abs,
    aten.maximum, aten.minimum, aten.where, aten.contiguous, aten.clone, aten.alias, aten.square, aten.erf,
    aten.pow,
}
VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze}
SPLITS = {aten.split, aten.split_with_sizes, aten.chunk}


def is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def bn_no_training(*args: Any) -> torch.Tensor:
    """The normalised map of ``_native_batch_norm_legit_no_training`` (item 0 of its tuple)."""
    return aten._native_batch_norm_legit_no_training.default(*args)[0]


def classify_aten(clf: Any, node: fx.Node, base: dict[str, Any], shape_free: bool,
                  tuple_node: fx.Node | None = None, index: Any = None) -> OpSpec | Virtual | None:
    """The spec of an ATen node; with ``shape_free``, only sizes and tuple-returning ops (else None)."""
    p = _packet(node)
    x = node.args[0] if node.args else None
    if shape_free:
        if p is aten.sym_size:
            return size_spec(node, x, "size", node.args[1], base)  # type: ignore[arg-type]
        if p in SPLITS:
            return split_virtual(node, x, node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
        if p in (aten._native_batch_norm_legit_no_training, aten.max_pool2d_with_indices):
            return Virtual(node.name, x.name)  # type: ignore[union-attr]
        return None
    if tuple_node is not None:
        return _tuple_item(clf, node, tuple_node, index, base)
    if p in (aten.conv2d, aten.convolution):
        return _conv(clf, node, p, base)
    if p is aten.max_pool2d:
        a = bind(node, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                 dict(stride=(), padding=0, dilation=1, ceil_mode=False))
        return clf.maxpool(a["input"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], base)
    if p is aten.avg_pool2d:
        a = bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
                 dict(stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None))
        return clf.avgpool(a["input"], a["kernel_size"], a["stride"], a["padding"], a["count_include_pad"],
                           a["divisor_override"], base)
    if p is aten.constant_pad_nd:
        return clf.pad(x, node.args[1], float(node.args[2]) if len(node.args) > 2 else 0.0, base)
    if p is aten.pad:
        a = bind(node, ["input", "pad", "mode", "value"], dict(mode="constant", value=None))
        if a["mode"] != "constant":
            raise NotLocal(f"mode='{a['mode']}' pads with image content; only constant padding is local")
        return clf.pad(x, a["pad"], float(a["value"] or 0.0), base)
    return _other(clf, node, p, x, base)


def _other(clf: Any, node: fx.Node, p: Any, x: Any, base: dict[str, Any]) -> OpSpec:
    if p in (aten.upsample_nearest2d, aten._upsample_nearest_exact2d, aten.upsample_bilinear2d, aten.expand,
             aten.repeat) and isinstance(x, fx.Node) and x.name in clf.glob:
        from .ops_reduce import broadcast_spec

        return broadcast_spec(node, clf.glob, clf.shape(node), base)
    if p in (aten.upsample_nearest2d, aten._upsample_nearest_exact2d):
        return clf.upsample(x, base)
    if p is aten.cat:
        return clf.cat(node, node.args[1] if len(node.args) > 1 else 0, base)
    if p is aten.slice:
        a = bind(node, ["input", "dim", "start", "end", "step"], dict(dim=0, start=None, end=None, step=1))
        nd = len(clf.shape(x) or ())
        d = a["dim"] % nd if nd else 0
        size = (clf.shape(x) or (0,) * (d + 1))[d]
        whole = a["start"] in (None, 0) and (a["end"] is None or a["end"] >= size) and a["step"] == 1
        idx = (slice(None),) * d + (slice(None) if whole else slice(a["start"], a["end"], a["step"]),)
        check_index(idx, nd)
        return OpSpec(kind="slice", inputs=(clf.map_input(x).name,) if nd == 4 else (x.name,), how="function",
                      target=operator.getitem, args=(Ref(x.name), idx), **base)
    if p is aten.batch_norm:
        if node.args[5]:
            raise NotLocal("batch norm in training mode normalises over the whole map")
        return clf.elementwise(node, base, how="function", target=node.target)
    if p is aten.dropout:
        if node.args[2] if len(node.args) > 2 else True:
            raise NotLocal("dropout in training mode is random")
        return clf.elementwise(node, base, how="function", target=node.target)
    if p in POINTWISE:
        return clf.elementwise(node, base, how="function", target=node.target)
    if isinstance(x, fx.Node) and clf.is_map(x):
        if p in VIEWS:
            return view_spec(x, clf.shape(node), base)
        if p is aten.transpose:
            return transpose_spec(x, node.args[1], node.args[2], "function", node.target, base)
        if p is aten.permute:
            return permute_spec(x, node.args[1], "function", node.target, base)
    raise NotLocal("not known to be spatially local")


def _conv(clf: Any, node: fx.Node, p: Any, base: dict[str, Any]) -> OpSpec:
    if p is aten.convolution:
        a = bind(node, ["input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                        "groups"], {})
        if a["transposed"]:
            raise NotLocal("a transposed convolution scatters each input pixel over a window")
    else:
        a = bind(node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                 dict(bias=None, stride=1, padding=0, dilation=1, groups=1))
    return clf.conv_call(node, a, base)


def _tuple_item(clf: Any, node: fx.Node, tup: fx.Node, index: Any, base: dict[str, Any]) -> OpSpec:
    p = _packet(tup)
    if p in SPLITS:
        return tuple_item_spec(tup, tup.args[0], index, base)  # type: ignore[arg-type]
    if index != 0:
        raise NotLocal(f"item {index!r} of {tup.target} is a whole-map statistic or positions, not the map")
    if p is aten.max_pool2d_with_indices:
        a = bind(tup, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                 dict(stride=(), padding=0, dilation=1, ceil_mode=False))
        return clf.maxpool(a["input"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], base)
    return clf.elementwise(node, base, how="function", target=bn_no_training, args=tuple(tup.args),
                           kwargs=dict(tup.kwargs))
