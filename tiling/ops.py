"""Which graph nodes are spatially local, and the geometry of each one.

``classify`` turns one ``torch.fx`` node into an :class:`OpSpec` (kind, per-axis map, border fill,
how to call it on a tile) or a :class:`Stop` that says why fusion cannot pass this node. The list of
local ops is deliberately closed: an op we do not know is treated as global, because a wrong guess
here would silently give wrong tiles, while a missed op only makes the tail longer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from .geometry import IDENTITY, AxisMap, Upsample, Window

Kind = Literal["conv", "maxpool", "avgpool", "pad", "upsample", "pointwise", "cat", "slice"]
WINDOW_KINDS = ("conv", "maxpool", "avgpool", "pad")
ANCHOR_KINDS = ("conv", "maxpool", "avgpool", "upsample")


@dataclass(frozen=True)
class Ref:
    """A tensor produced inside the stage (or one of its inputs), by node name."""

    name: str


@dataclass(frozen=True)
class Const:
    """A constant tensor (a ``get_attr`` node), stored once in the stage program."""

    name: str


@dataclass
class OpSpec:
    """One spatially local op: enough to propagate regions and run it on a tile."""

    name: str
    kind: Kind
    inputs: tuple[str, ...]  # stage tensors read, in order of first appearance
    maps: tuple[AxisMap, AxisMap] = (IDENTITY, IDENTITY)
    fill: float = 0.0  # value of the image border for window ops
    how: Literal["module", "function", "method"] = "function"
    target: Any = None  # module path, callable or method name
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    out_shape: tuple[int, int, int] = (0, 0, 0)  # C, H, W of the whole output
    in_hw: tuple[int, int] = (0, 0)  # H, W of the spatial input (window ops)
    in_channels: int = 0  # C of the spatial input (window ops)
    macs_per_pixel: int = 0  # multiply-adds per output pixel per frame (conv)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_anchor(self) -> bool:
        return self.kind in ANCHOR_KINDS


@dataclass(frozen=True)
class Stop:
    """Why a node ends fusion."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


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
    torch.exp, torch.square, torch.sqrt, torch.rsqrt, F.batch_norm,
)
BINARY_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
)
POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "clamp", "clip", "abs", "neg", "exp", "square", "sqrt", "add",
    "sub", "mul", "div", "maximum", "minimum", "contiguous", "clone",
}
CAT_FUNCTIONS: tuple[Callable[..., Any], ...] = (torch.cat, torch.concat, torch.concatenate)
CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
MAXPOOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
AVGPOOL_FUNCTIONS = (F.avg_pool2d, torch._C._nn.avg_pool2d)
PAD_FUNCTIONS = (F.pad, torch._C._nn.pad)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _bind(node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a functional call, by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


class Classifier:
    """Decides locality of nodes of one traced, shape-propagated graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    # shapes ---------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(int(s) for s in meta.shape)

    def is_map(self, node: Any) -> bool:
        """A 4-D tensor produced by the graph: something tiles can carry."""
        s = self.shape(node)
        return s is not None and len(s) == 4 and isinstance(node, fx.Node) and node.op != "get_attr"

    # the decision ---------------------------------------------------------------------------------
    def classify(self, node: fx.Node) -> OpSpec | Stop:
        label = self._label(node)
        out = self.shape(node)
        if out is None or len(out) != 4:
            return Stop(node.name, label, f"its result is not an (N, C, H, W) tensor (shape {out})")
        try:
            spec = self._classify(node, label, out)
        except _NotLocal as e:
            return Stop(node.name, label, str(e))
        return spec

    def _label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[str(node.target)]).__name__} '{node.target}'"
        if node.op == "call_method":
            return f".{node.target}()"
        return getattr(node.target, "__name__", str(node.target))

    def _classify(self, node: fx.Node, label: str, out: tuple[int, ...]) -> OpSpec:
        c, h, w = out[1], out[2], out[3]
        base = dict(name=node.name, out_shape=(c, h, w))
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            x = node.args[0] if node.args else None
            if isinstance(mod, nn.Conv2d):
                return self._conv(node, x, mod.weight, mod.stride, mod.padding, mod.dilation, mod.groups,
                                  mod.padding_mode, base, how="module")
            if isinstance(mod, nn.MaxPool2d):
                if mod.return_indices:
                    raise _NotLocal("return_indices=True returns positions in whole-image coordinates")
                return self._maxpool(node, x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, base)
            if isinstance(mod, nn.AvgPool2d):
                return self._avgpool(node, x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                     mod.count_include_pad, mod.divisor_override, base)
            if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
                return self._pad(node, x, mod.padding, float(getattr(mod, "value", 0.0)), base)
            if isinstance(mod, nn.Upsample):
                if mod.mode not in ("nearest", "nearest-exact"):
                    raise _NotLocal(f"mode='{mod.mode}' interpolates across tile edges; only nearest is local")
                return self._upsample(node, x, base)
            if isinstance(mod, POINTWISE_MODULES):
                if isinstance(mod, nn.BatchNorm2d) and mod.training:
                    raise _NotLocal("batch norm in training mode normalises over the whole map")
                return self._elementwise(node, base, how="module", target=str(node.target))
            raise _NotLocal(f"module type {type(mod).__name__} is not known to be spatially local")
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_"):
                raise _NotLocal("in-place methods mutate tensors other nodes may read; use the out-of-place form")
            if name in POINTWISE_METHODS:
                return self._elementwise(node, base, how="method", target=name)
            raise _NotLocal("not known to be spatially local")
        if node.op == "call_function":
            t = node.target
            if any(t is f for f in CONV_FUNCTIONS):
                a = _bind(node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                          dict(bias=None, stride=1, padding=0, dilation=1, groups=1))
                weight = self._const_tensor(a["weight"], "weight")
                if a["bias"] is not None:
                    self._const_tensor(a["bias"], "bias")
                spec = self._conv(node, a["input"], weight, a["stride"], a["padding"], a["dilation"],
                                  a["groups"], "zeros", base, how="function")
                spec.params["weight"] = Const(str(a["weight"].target))
                spec.params["bias"] = None if a["bias"] is None else Const(str(a["bias"].target))
                return spec
            if any(t is f for f in MAXPOOL_FUNCTIONS):
                a = _bind(node, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "return_indices"], dict(stride=None, padding=0, dilation=1,
                                                         ceil_mode=False, return_indices=False))
                if a["return_indices"]:
                    raise _NotLocal("return_indices=True returns positions in whole-image coordinates")
                return self._maxpool(node, a["input"], a["kernel_size"], a["stride"] or a["kernel_size"],
                                     a["padding"], a["dilation"], base)
            if any(t is f for f in AVGPOOL_FUNCTIONS):
                a = _bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"], dict(stride=None, padding=0, ceil_mode=False,
                                                           count_include_pad=True, divisor_override=None))
                return self._avgpool(node, a["input"], a["kernel_size"], a["stride"] or a["kernel_size"],
                                     a["padding"], a["ceil_mode"], a["count_include_pad"],
                                     a["divisor_override"], base)
            if any(t is f for f in PAD_FUNCTIONS):
                a = _bind(node, ["input", "pad", "mode", "value"], dict(mode="constant", value=None))
                if a["mode"] != "constant":
                    raise _NotLocal(f"mode='{a['mode']}' pads with image content; only constant padding is local")
                return self._pad(node, a["input"], a["pad"], float(a["value"] or 0.0), base)
            if t is F.interpolate:
                a = _bind(node, ["input", "size", "scale_factor", "mode"], dict(mode="nearest"))
                if a["mode"] not in ("nearest", "nearest-exact"):
                    raise _NotLocal(f"mode='{a['mode']}' interpolates across tile edges; only nearest is local")
                return self._upsample(node, a["input"], base)
            if any(t is f for f in CAT_FUNCTIONS):
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim not in (1, -3):
                    raise _NotLocal(f"concatenation along dim {dim}; only the channel dim (1) is local")
                return self._elementwise(node, base, how="function", target=t, kind="cat")
            if t is operator.getitem:
                return self._slice(node, base)
            if t in (F.dropout, F.dropout2d, F.alpha_dropout):
                if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
                    raise _NotLocal("dropout in training mode is random")
                return self._elementwise(node, base, how="function", target=t)
            if any(t is f for f in POINTWISE_FUNCTIONS) or any(t is f for f in BINARY_FUNCTIONS):
                return self._elementwise(node, base, how="function", target=t)
            raise _NotLocal("not known to be spatially local")
        raise _NotLocal(f"node kind {node.op} is not an op")

    # helpers per kind ------------------------------------------------------------------------------
    def _const_tensor(self, arg: Any, what: str) -> torch.Tensor:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return _fetch_attr(self.gm, str(arg.target))
        raise _NotLocal(f"its {what} is computed by the graph, not a constant")

    def _map_input(self, x: Any) -> fx.Node:
        if not self.is_map(x):
            raise _NotLocal("its input is not an (N, C, H, W) map")
        assert isinstance(x, fx.Node)
        return x

    def _conv(self, node: fx.Node, x: Any, weight: torch.Tensor, stride: Any, padding: Any, dilation: Any,
              groups: int, padding_mode: str, base: dict[str, Any], how: str) -> OpSpec:
        xin = self._map_input(x)
        if padding_mode != "zeros":
            raise _NotLocal(f"padding_mode='{padding_mode}' pads with image content; only zeros is local")
        if weight.dim() != 4:
            raise _NotLocal("weight is not 4-D")
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        k, s, d = _pair(weight.shape[2:]), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                p = (0, 0)
            else:  # 'same': PyTorch puts the odd pixel after the data
                p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        else:
            p = _pair(padding)
        maps = (Window(k[0], s[0], d[0], p[0]), Window(k[1], s[1], d[1], p[1]))
        macs = int(weight.shape[0]) * int(weight.shape[1]) * k[0] * k[1]
        return OpSpec(kind="conv", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=0.0, how=how,  # type: ignore[arg-type]
                      target=str(node.target) if how == "module" else None, in_hw=(ih, iw),
                      macs_per_pixel=macs, params=dict(stride=s, dilation=d, groups=int(groups)), **base)

    def _maxpool(self, node: fx.Node, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
                 base: dict[str, Any]) -> OpSpec:
        xin = self._map_input(x)
        k, s, p, d = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding), _pair(dilation)
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(k[0], s[0], d[0], p[0]), Window(k[1], s[1], d[1], p[1]))
        return OpSpec(kind="maxpool", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=-math.inf, in_hw=(ih, iw),
                      params=dict(kernel=k, stride=s, dilation=d), **base)

    def _avgpool(self, node: fx.Node, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                 count_include_pad: bool, divisor_override: int | None, base: dict[str, Any]) -> OpSpec:
        xin = self._map_input(x)
        k, s, p = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding)
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(k[0], s[0], 1, p[0]), Window(k[1], s[1], 1, p[1]))
        return OpSpec(kind="avgpool", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=0.0, in_hw=(ih, iw),
                      params=dict(kernel=k, stride=s, padding=p, count_include_pad=bool(count_include_pad),
                                  divisor_override=divisor_override), **base)

    def _pad(self, node: fx.Node, x: Any, pad: Any, value: float, base: dict[str, Any]) -> OpSpec:
        xin = self._map_input(x)
        pads = [int(v) for v in (pad if isinstance(pad, (tuple, list)) else [pad] * 4)]
        if len(pads) == 2:
            pads += [0, 0]
        if len(pads) != 4 and any(pads[4:]):
            raise _NotLocal("pads channels or batch, not only height and width")
        left, right, top, bottom = pads[:4]
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        maps = (Window(1, 1, 1, top), Window(1, 1, 1, left))
        return OpSpec(kind="pad", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=maps, fill=value, in_hw=(ih, iw),
                      params=dict(pads=(left, right, top, bottom)), **base)

    def _upsample(self, node: fx.Node, x: Any, base: dict[str, Any]) -> OpSpec:
        xin = self._map_input(x)
        ih, iw = self.shape(xin)[2:]  # type: ignore[index]
        oh, ow = base["out_shape"][1:]
        if oh % ih or ow % iw:
            raise _NotLocal(f"upsampling {ih}x{iw} to {oh}x{ow} is not by an integer factor")
        fh, fw = oh // ih, ow // iw
        return OpSpec(kind="upsample", in_channels=self.shape(xin)[1],  # type: ignore[index]
                      inputs=(xin.name,), maps=(Upsample(fh), Upsample(fw)), in_hw=(ih, iw),
                      params=dict(factor=(fh, fw)), **base)

    def _slice(self, node: fx.Node, base: dict[str, Any]) -> OpSpec:
        x, idx = node.args[0], node.args[1]
        xin = self._map_input(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None)
        ok = (
            len(idx) >= 2 and idx[0] == full and isinstance(idx[1], slice)
            and all(i == full for i in idx[2:]) and len(idx) <= 4
        )
        if not ok:
            raise _NotLocal(f"indexing {idx!r} is not a slice of the channel dim")
        return OpSpec(kind="slice", inputs=(xin.name,), how="function", target=operator.getitem,
                      args=(Ref(xin.name), idx), **base)

    def _elementwise(self, node: fx.Node, base: dict[str, Any], how: str, target: Any,
                     kind: Kind = "pointwise") -> OpSpec:
        c, h, w = base["out_shape"]
        inputs: list[str] = []

        def convert(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a.op == "get_attr":
                    t = _fetch_attr(self.gm, str(a.target))
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and (t.shape[-1] > 1 or t.shape[-2] > 1):
                        raise _NotLocal(f"constant '{a.target}' has spatial extent {tuple(t.shape)}")
                    return Const(str(a.target))
                s = self.shape(a)
                if s is None:
                    raise _NotLocal(f"operand '{a.name}' is not a tensor known at trace time")
                if len(s) == 4 and s[2:] == (h, w) and a.op != "get_attr":
                    if a.name not in inputs:
                        inputs.append(a.name)
                    return Ref(a.name)
                raise _NotLocal(
                    f"operand '{a.name}' of shape {s} is broadcast over space (a global gate such as "
                    f"squeeze-excitation), so each output pixel depends on the whole map"
                )
            if isinstance(a, (list, tuple)):
                return type(a)(convert(v) for v in a)
            if isinstance(a, dict):
                return {k: convert(v) for k, v in a.items()}
            return a

        args = tuple(convert(a) for a in node.args)
        kwargs = {k: convert(v) for k, v in node.kwargs.items()}
        if kwargs.get("inplace"):
            kwargs["inplace"] = False  # crops are views of shared values: never write through them
        if not inputs:
            raise _NotLocal("it reads no map produced by the graph")
        return OpSpec(kind=kind, inputs=tuple(inputs), how=how, target=target,  # type: ignore[arg-type]
                      args=args, kwargs=kwargs, **base)


class _NotLocal(Exception):
    pass


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
