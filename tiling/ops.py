"""Which graph nodes are spatially local, and the geometry of each one.

``classify`` turns one ``torch.fx`` node into an :class:`OpSpec` (kind, per-axis map, border fill,
how to call it on a tile), a :class:`Virtual` (a tuple of maps whose items become specs) or a
:class:`Stop` that says why fusion cannot pass this node. The list of local ops is deliberately
closed: an op we do not know is treated as global, because a wrong guess here would silently give
wrong tiles, while a missed op only makes the tail longer. Shape ops live in :mod:`tiling.ops_shape`,
reductions and their global values in :mod:`tiling.ops_reduce`, ATen forms (graphs captured by
``torch.export``) in :mod:`tiling.ops_aten`; they all produce the records of :mod:`tiling.opspec`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .ops_shape import (PERMUTE_FUNCTIONS, SIZE_METHODS, SPLIT_FUNCTIONS, SPLIT_METHODS, TRANSPOSE_FUNCTIONS,
                        TRANSPOSE_METHODS, VIEW_FUNCTIONS, VIEW_METHODS, VIEW_MODULES, check_index,
                        permute_spec, size_spec, split_dim, split_virtual, transpose_spec, tuple_item_spec,
                        view_spec)
from .geometry import Upsample, Window
from .ops_aten import classify_aten, is_aten
from .ops_reduce import global_operand_ok, match_reduce, reduce_spec
from .opspec import (ANCHOR_KINDS, WINDOW_KINDS, Const, Kind, NotLocal, OpSpec, Ref, Stop, Virtual, bind,
                     fetch_attr, node_shape, pair)

__all__ = ["ANCHOR_KINDS", "WINDOW_KINDS", "Classifier", "Const", "Kind", "OpSpec", "Ref", "Stop", "Virtual"]

# --- the closed list of local ops -----------------------------------------------------------------

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.BatchNorm2d,
)
POINTWISE_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.gelu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.softsign, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.neg,
    torch.exp, torch.square, torch.sqrt, torch.rsqrt, F.batch_norm, F.hardtanh, torch.erf,
)
BINARY_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
)
POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "clamp", "clip", "abs", "neg", "exp", "square", "sqrt", "add",
    "sub", "mul", "div", "maximum", "minimum", "contiguous", "clone", "float",
    "__add__", "__mul__", "__sub__", "__truediv__", "hardswish", "hardsigmoid", "silu", "relu6",
}
CAT_FUNCTIONS: tuple[Callable[..., Any], ...] = (torch.cat, torch.concat, torch.concatenate)
CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
MAXPOOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
AVGPOOL_FUNCTIONS = (F.avg_pool2d, torch._C._nn.avg_pool2d)
PAD_FUNCTIONS = (F.pad, torch._C._nn.pad)



class Classifier:
    """Decides locality of nodes of one traced, shape-propagated graph.

    ``glob`` is the live set of nodes that hold tile-invariant values (reduce results and what is
    computed from them, sizes); ``virtual`` the tuple nodes seen so far. The fusion walk fills both,
    so a node is judged knowing which of its operands are maps and which are whole values.
    """

    def __init__(self, gm: fx.GraphModule, reduce_points: bool = True) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.reduce_points = reduce_points
        self.glob: set[str] = set()
        self.virtual: dict[str, Virtual] = {}

    # shapes ---------------------------------------------------------------------------------------
    shape = staticmethod(node_shape)

    def is_map(self, node: Any) -> bool:
        """A tensor produced by the graph shaped (N, *mid, H, W): something tiles can carry."""
        s = self.shape(node)
        return (s is not None and len(s) >= 4 and isinstance(node, fx.Node) and node.op != "get_attr"
                and node.name not in self.glob)

    # the decision ---------------------------------------------------------------------------------
    def classify(self, node: fx.Node) -> OpSpec | Virtual | Stop:
        label = self.label(node)
        try:
            early = self._shape_free(node)
            if early is not None:
                return early
            out = self.shape(node)
            if out is None or len(out) < 4:
                raise NotLocal(f"its result is not an (N, C, H, W) tensor (shape {out})")
            spec = self._classify(node, out)
            if len(out) != 4:
                if spec.kind not in ("reshape", "slice", "pointwise"):
                    raise NotLocal(f"it gives a {len(out)}-D result")
                spec.mid = out[1:-2]
            return spec
        except NotLocal as e:
            return Stop(node.name, label, str(e))

    def classify_value(self, node: fx.Node) -> OpSpec | Stop:
        """A node whose operands are all whole values (see :func:`tiling.ops_reduce.value_spec`)."""
        from .ops_reduce import value_spec

        try:
            out = self.shape(node)
            base: dict[str, Any] = dict(name=node.name)
            if out is not None and len(out) == 4:
                base["out_shape"] = (out[1], out[2], out[3])
            return value_spec(self.gm, node, self.glob, base)
        except NotLocal as e:
            return Stop(node.name, self.label(node), str(e))

    def label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[str(node.target)]).__name__} '{node.target}'"
        if node.op == "call_method":
            return f".{node.target}()"
        return getattr(node.target, "__name__", str(node.target))

    def _shape_free(self, node: fx.Node) -> OpSpec | Virtual | None:
        """Nodes judged before their result's shape: reductions, size queries, tuples of maps."""
        base: dict[str, Any] = dict(name=node.name)
        red = match_reduce(node, self.modules)
        if red is not None:
            if not self.reduce_points:
                raise NotLocal("a global reduction over H and W; reduce points are switched off "
                               "(reduce_points=False), so it runs in the tail")
            return reduce_spec(red[0], red[1], red[2], red[3], self.shape(node) or (), base)
        t, x = node.target, (node.args[0] if node.args else None)
        if not self.is_map(x):
            return None
        assert isinstance(x, fx.Node)
        if node.op == "call_method" and t in SIZE_METHODS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return size_spec(node, x, str(t), dim, base)
        if node.op == "call_function" and t is getattr and node.args[1] == "shape":
            return size_spec(node, x, "size", None, base)
        if (node.op == "call_method" and t in SPLIT_METHODS) or (
                node.op == "call_function" and any(t is f for f in SPLIT_FUNCTIONS)):
            return split_virtual(node, x, split_dim(node))
        if node.op == "call_function" and is_aten(t):
            return classify_aten(self, node, base, shape_free=True)
        return None

    def _classify(self, node: fx.Node, out: tuple[int, ...]) -> OpSpec:
        base = dict(name=node.name, out_shape=(math.prod(out[1:-2]), out[-2], out[-1]))
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)], base)
        if node.op == "call_method":
            return self._method(node, out, base)
        if node.op == "call_function":
            if is_aten(node.target):
                res = classify_aten(self, node, base, shape_free=False)
                assert isinstance(res, OpSpec)
                return res
            return self._function(node, out, base)
        raise NotLocal(f"node kind {node.op} is not an op")

    def _module(self, node: fx.Node, mod: nn.Module, base: dict[str, Any]) -> OpSpec:
        x = node.args[0] if node.args else None
        if isinstance(mod, nn.Conv2d):
            return self.conv(node, x, mod.weight, mod.stride, mod.padding, mod.dilation, mod.groups,
                             mod.padding_mode, base, how="module")
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise NotLocal("return_indices=True returns positions in whole-image coordinates")
            return self.maxpool(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, base)
        if isinstance(mod, nn.AvgPool2d):
            return self.avgpool(x, mod.kernel_size, mod.stride, mod.padding, mod.count_include_pad,
                                mod.divisor_override, base)
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
            return self.pad(x, mod.padding, float(getattr(mod, "value", 0.0)), base)
        if isinstance(mod, nn.Upsample):
            if mod.mode not in ("nearest", "nearest-exact"):
                raise NotLocal(f"mode='{mod.mode}' interpolates across tile edges; only nearest is local")
            return self.upsample(x, base)
        if isinstance(mod, POINTWISE_MODULES):
            if isinstance(mod, nn.BatchNorm2d) and mod.training:
                raise NotLocal("batch norm in training mode normalises over the whole map")
            return self.elementwise(node, base, how="module", target=str(node.target))
        if isinstance(mod, VIEW_MODULES) and isinstance(x, fx.Node) and self.is_map(x):
            return view_spec(x, self.shape(node) or (), base)
        if isinstance(mod, nn.ChannelShuffle) and isinstance(x, fx.Node) and self.is_map(x):
            return self.elementwise(node, base, how="module", target=str(node.target))
        raise NotLocal(f"module type {type(mod).__name__} is not known to be spatially local")

    def _method(self, node: fx.Node, out: tuple[int, ...], base: dict[str, Any]) -> OpSpec:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if name.endswith("_"):
            raise NotLocal("in-place methods mutate tensors other nodes may read; use the out-of-place form")
        if name in POINTWISE_METHODS:
            return self.elementwise(node, base, how="method", target=name)
        if name in ("expand_as", "expand", "repeat") and isinstance(x, fx.Node) and x.name in self.glob:
            from .ops_reduce import broadcast_spec

            return broadcast_spec(node, self.glob, out, base)
        if not (isinstance(x, fx.Node) and self.is_map(x)):
            raise NotLocal("not known to be spatially local")
        if name in VIEW_METHODS:
            return view_spec(x, out, base)
        if name in TRANSPOSE_METHODS:
            a = bind(node, ["self", "dim0", "dim1"], {})
            return transpose_spec(x, a["dim0"], a["dim1"], "method", name, base)
        if name == "permute":
            perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return permute_spec(x, perm or node.kwargs.get("dims", ()), "method", name, base)
        raise NotLocal("not known to be spatially local")

    def _function(self, node: fx.Node, out: tuple[int, ...], base: dict[str, Any]) -> OpSpec:
        t = node.target
        x = node.args[0] if node.args else None
        if any(t is f for f in CONV_FUNCTIONS):
            return self.conv_call(node, bind(node, ["input", "weight", "bias", "stride", "padding", "dilation",
                                                    "groups"], dict(bias=None, stride=1, padding=0, dilation=1,
                                                                    groups=1)), base)
        if any(t is f for f in MAXPOOL_FUNCTIONS):
            a = bind(node, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                     dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False))
            if a["return_indices"]:
                raise NotLocal("return_indices=True returns positions in whole-image coordinates")
            return self.maxpool(a["input"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], base)
        if any(t is f for f in AVGPOOL_FUNCTIONS):
            a = bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                            "divisor_override"], dict(stride=None, padding=0, ceil_mode=False,
                                                      count_include_pad=True, divisor_override=None))
            return self.avgpool(a["input"], a["kernel_size"], a["stride"], a["padding"], a["count_include_pad"],
                                a["divisor_override"], base)
        if any(t is f for f in PAD_FUNCTIONS):
            a = bind(node, ["input", "pad", "mode", "value"], dict(mode="constant", value=None))
            if a["mode"] != "constant":
                raise NotLocal(f"mode='{a['mode']}' pads with image content; only constant padding is local")
            return self.pad(a["input"], a["pad"], float(a["value"] or 0.0), base)
        if t is F.interpolate:
            if isinstance(x, fx.Node) and x.name in self.glob:
                from .ops_reduce import broadcast_spec

                return broadcast_spec(node, self.glob, out, base)
            a = bind(node, ["input", "size", "scale_factor", "mode"], dict(mode="nearest"))
            if a["mode"] not in ("nearest", "nearest-exact"):
                raise NotLocal(f"mode='{a['mode']}' interpolates across tile edges; only nearest is local")
            return self.upsample(a["input"], base)
        if any(t is f for f in CAT_FUNCTIONS):
            return self.cat(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), base)
        if t is operator.getitem:
            return self.getitem(node, base)
        return self._function_shape_or_pointwise(node, t, x, out, base)

    def _function_shape_or_pointwise(self, node: fx.Node, t: Any, x: Any, out: tuple[int, ...],
                                     base: dict[str, Any]) -> OpSpec:
        if t in (F.dropout, F.dropout2d, F.alpha_dropout):
            if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
                raise NotLocal("dropout in training mode is random")
            return self.elementwise(node, base, how="function", target=t)
        if any(t is f for f in POINTWISE_FUNCTIONS) or any(t is f for f in BINARY_FUNCTIONS):
            return self.elementwise(node, base, how="function", target=t)
        if isinstance(x, fx.Node) and self.is_map(x):
            if any(t is f for f in VIEW_FUNCTIONS):
                return view_spec(x, out, base)
            if any(t is f for f in TRANSPOSE_FUNCTIONS):
                a = bind(node, ["input", "dim0", "dim1"], {})
                return transpose_spec(x, a["dim0"], a["dim1"], "function", t, base)
            if any(t is f for f in PERMUTE_FUNCTIONS):
                return permute_spec(x, node.args[1] if len(node.args) > 1 else node.kwargs["dims"],
                                        "function", t, base)
            if t is F.channel_shuffle:
                return self.elementwise(node, base, how="function", target=t)
        raise NotLocal("not known to be spatially local")

    # helpers per kind (also called by the ATen table) ----------------------------------------------
    def const_tensor(self, arg: Any, what: str) -> torch.Tensor:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return fetch_attr(self.gm, str(arg.target))
        raise NotLocal(f"its {what} is computed by the graph, not a constant")

    def map_input(self, x: Any) -> fx.Node:
        s = self.shape(x)
        if not self.is_map(x) or s is None or len(s) != 4:
            raise NotLocal("its input is not an (N, C, H, W) map")
        assert isinstance(x, fx.Node)
        return x

    def conv_call(self, node: fx.Node, a: dict[str, Any], base: dict[str, Any]) -> OpSpec:
        """A functional convolution: weight and bias must be constants of the graph."""
        weight = self.const_tensor(a["weight"], "weight")
        if a["bias"] is not None:
            self.const_tensor(a["bias"], "bias")
        spec = self.conv(node, a["input"], weight, a["stride"], a["padding"], a["dilation"], a["groups"], "zeros",
                         base, how="function")
        spec.params["weight"] = Const(str(a["weight"].target))
        spec.params["bias"] = None if a["bias"] is None else Const(str(a["bias"].target))
        return spec

    def conv(self, node: fx.Node, x: Any, weight: torch.Tensor, stride: Any, padding: Any, dilation: Any,
             groups: int, padding_mode: str, base: dict[str, Any], how: str) -> OpSpec:
        xin = self.map_input(x)
        if padding_mode != "zeros":
            raise NotLocal(f"padding_mode='{padding_mode}' pads with image content; only zeros is local")
        if weight.dim() != 4:
            raise NotLocal("weight is not 4-D")
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        k, s, d = pair(weight.shape[2:]), pair(stride), pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                p = (0, 0)
            else:  # 'same': PyTorch puts the odd pixel after the data
                p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        else:
            p = pair(padding)
        maps = (Window(k[0], s[0], d[0], p[0]), Window(k[1], s[1], d[1], p[1]))
        macs = int(weight.shape[0]) * int(weight.shape[1]) * k[0] * k[1]
        return OpSpec(kind="conv", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=0.0, how=how,  # type: ignore[arg-type]
                      target=str(node.target) if how == "module" else None, in_hw=(ih, iw),
                      macs_per_pixel=macs, params=dict(stride=s, dilation=d, groups=int(groups)), **base)

    def maxpool(self, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any, base: dict[str, Any]) -> OpSpec:
        xin = self.map_input(x)
        k, p, d = pair(kernel), pair(padding), pair(dilation)
        s = pair(stride) if stride not in (None, [], ()) else k
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(k[0], s[0], d[0], p[0]), Window(k[1], s[1], d[1], p[1]))
        return OpSpec(kind="maxpool", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=-math.inf, in_hw=(ih, iw),
                      params=dict(kernel=k, stride=s, dilation=d), **base)

    def avgpool(self, x: Any, kernel: Any, stride: Any, padding: Any, count_include_pad: bool,
                divisor_override: int | None, base: dict[str, Any]) -> OpSpec:
        xin = self.map_input(x)
        k, p = pair(kernel), pair(padding)
        s = pair(stride) if stride not in (None, [], ()) else k
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(k[0], s[0], 1, p[0]), Window(k[1], s[1], 1, p[1]))
        return OpSpec(kind="avgpool", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=0.0, in_hw=(ih, iw),
                      params=dict(kernel=k, stride=s, padding=p, count_include_pad=bool(count_include_pad),
                                  divisor_override=divisor_override), **base)

    def pad(self, x: Any, pad: Any, value: float, base: dict[str, Any]) -> OpSpec:
        xin = self.map_input(x)
        pads = [int(v) for v in (pad if isinstance(pad, (tuple, list)) else [pad] * 4)]
        if len(pads) == 2:
            pads += [0, 0]
        if len(pads) != 4 and any(pads[4:]):
            raise NotLocal("pads channels or batch, not only height and width")
        left, right, top, bottom = pads[:4]
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(1, 1, 1, top), Window(1, 1, 1, left))
        return OpSpec(kind="pad", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=value, in_hw=(ih, iw),
                      params=dict(pads=(left, right, top, bottom)), **base)

    def upsample(self, x: Any, base: dict[str, Any]) -> OpSpec:
        xin = self.map_input(x)
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        oh, ow = base["out_shape"][1:]
        if oh % ih or ow % iw:
            raise NotLocal(f"upsampling {ih}x{iw} to {oh}x{ow} is not by an integer factor")
        fh, fw = oh // ih, ow // iw
        return OpSpec(kind="upsample", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=(Upsample(fh), Upsample(fw)), in_hw=(ih, iw),
                      params=dict(factor=(fh, fw)), **base)

    def cat(self, node: fx.Node, dim: Any, base: dict[str, Any]) -> OpSpec:
        nd = len(self.shape(node) or ())
        if not isinstance(dim, int) or not 1 <= dim % nd <= nd - 3:
            raise NotLocal(f"concatenation along dim {dim}; only the channel dim (1) is local")
        return self.elementwise(node, base, how="function", target=node.target, kind="cat")

    def getitem(self, node: fx.Node, base: dict[str, Any]) -> OpSpec:
        x, idx = node.args[0], node.args[1]
        if isinstance(x, fx.Node) and x.name in self.virtual:
            return self.tuple_item(node, x, idx, base)
        xin = x if self.is_map(x) else None
        if xin is None:
            raise NotLocal("its input is not a map")
        assert isinstance(xin, fx.Node)
        idx = idx if isinstance(idx, tuple) else (idx,)
        check_index(idx, len(self.shape(xin) or ()))
        return OpSpec(kind="slice", inputs=(xin.name,), how="function", target=operator.getitem,
                      args=(Ref(xin.name), idx), **base)

    def tuple_item(self, node: fx.Node, tup: fx.Node, idx: Any, base: dict[str, Any]) -> OpSpec:
        """Item ``idx`` of a tuple node: a slice of a split, or the result of a tuple-returning ATen op."""
        source = next(n for n in tup.all_input_nodes if n.name == self.virtual[tup.name].source)
        if is_aten(tup.target):
            res = classify_aten(self, node, base, shape_free=False, tuple_node=tup, index=idx)
            assert isinstance(res, OpSpec)
            return res
        return tuple_item_spec(tup, source, idx, base)

    def elementwise(self, node: fx.Node, base: dict[str, Any], how: str, target: Any, kind: Kind = "pointwise",
                    args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> OpSpec:
        """An op applied per pixel: map operands are cropped to the tile, whole values read whole."""
        c, h, w = base["out_shape"]
        nd = len(self.shape(node) or (0,) * 4)
        inputs: list[str] = []
        globals_in: list[str] = []

        def convert(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a.op == "get_attr":
                    t = fetch_attr(self.gm, str(a.target))
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and (t.shape[-1] > 1 or t.shape[-2] > 1):
                        raise NotLocal(f"constant '{a.target}' has spatial extent {tuple(t.shape)}")
                    return Const(str(a.target))
                s = self.shape(a)
                if a.name in self.glob:
                    if not global_operand_ok(s):
                        raise NotLocal(f"whole value '{a.name}' of shape {s} varies over H, W")
                    globals_in.append(a.name) if a.name not in globals_in else None
                    return Ref(a.name)
                if s is None:
                    raise NotLocal(f"operand '{a.name}' is not a tensor known at trace time")
                if len(s) == nd and s[-2:] == (h, w):
                    inputs.append(a.name) if a.name not in inputs else None
                    return Ref(a.name)
                raise NotLocal(
                    f"operand '{a.name}' of shape {s} is broadcast over space (a global gate such as "
                    f"squeeze-excitation), so each output pixel depends on the whole map"
                )
            if isinstance(a, (list, tuple)):
                return type(a)(convert(v) for v in a)
            if isinstance(a, dict):
                return {k: convert(v) for k, v in a.items()}
            return a

        cargs = tuple(convert(a) for a in (node.args if args is None else args))
        ckw = {k: convert(v) for k, v in (node.kwargs if kwargs is None else kwargs).items()}
        if ckw.get("inplace"):
            ckw["inplace"] = False  # crops are views of shared values: never write through them
        if not inputs:
            raise NotLocal("it reads no map produced by the graph")
        return OpSpec(kind=kind, inputs=tuple(inputs), how=how, target=target,  # type: ignore[arg-type]
                      args=cargs, kwargs=ckw, globals_in=tuple(globals_in), **base)
