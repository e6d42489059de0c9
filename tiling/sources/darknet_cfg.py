"""Darknet ``.cfg`` parsing and layer planning: one handler per section kind (pjreddie/darknet semantics).

Cfg parsing follows Darknet's reader: ``[section]`` headers, ``key=value`` lines (whitespace around
``=`` tolerated), ``#``/``;`` comment lines, first occurrence of a key wins.  Unlike Darknet, which
silently falls back to defaults, anything the importer cannot reproduce faithfully is a
:class:`DarknetError` naming the layer, the section, the cfg line and what is accepted.
Each section kind has a handler in ``_HANDLERS`` that checks its keys and returns the layer's
inputs, output shape and module builder; :mod:`tiling.sources.darknet` builds the model from them.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .darknet_layers import (
    ACTIVATIONS,
    DarknetConv,
    DarknetMaxPool,
    GlobalAvgPool,
    Passthrough,
    Region,
    Reorg,
    Route,
    Shortcut,
    Softmax,
    Upsample,
    YoloHead,
)
from ..errors import TilingError

__all__ = ["CfgSection", "DarknetError", "parse_cfg", "plan_layers"]

Shape = tuple[int, int, int]  # (C, H, W)


class DarknetError(TilingError):
    """A cfg or weights file the importer cannot reproduce faithfully (a ``ValueError``)."""


# A cfg is input: bounded before it is parsed, and so is what it asks to build (Darknet's own cfgs
# are a few KiB with a few hundred layers; YOLOv4's largest map is 32x608x608 = 11.8 M values).
MAX_CFG_BYTES = 1 << 20
MAX_LAYERS = 10_000
MAX_MAP_VALUES = 1 << 30
"""Values (C*H*W) of one layer's output for one frame: 4 GiB of float32, beyond any edge device."""
MAX_LAYER_PARAMS = 1 << 28
MAX_TOTAL_PARAMS = 1 << 30


_ALIASES = {
    "network": "net",
    "conv": "convolutional",
    "max": "maxpool",
    "avg": "avgpool",
    "soft": "softmax",
}
_SUPPORTED = (
    "convolutional",
    "maxpool",
    "route",
    "shortcut",
    "upsample",
    "reorg",
    "region",
    "yolo",
    "softmax",
    "avgpool",
    "dropout",
    "cost",
)
_KNOWN_UNSUPPORTED = frozenset(
    {
        "connected", "local", "deconvolutional", "batchnorm", "crnn", "rnn", "gru", "lstm", "crop",
        "detection", "normalization", "lrn", "l2norm", "logistic", "iseg", "xor", "sam", "scale_channels",
        "gaussian_yolo", "reorg3d", "reorg_old", "conv_lstm", "implicit_add", "implicit_mul", "empty",
        "silence", "activation", "contrastive",
    }
)
# Keys that change a layer's arithmetic in ways this importer does not reproduce: (key, harmless value).
_UNSUPPORTED_KEYS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "convolutional": (
        ("binary", "0"), ("xnor", "0"), ("dilation", "1"), ("antialiasing", "0"), ("deform", "0"),
        ("share_index", None), ("numload", "0"), ("dontloadscales", "0"), ("dontload", "0"),
    ),
    "maxpool": (("maxpool_depth", "0"), ("antialiasing", "0")),
    "reorg": (("flatten", "0"), ("extra", "0")),
    "region": (("background", "0"), ("tree", None)),
    "yolo": (("new_coords", "0"),),
    "softmax": (("tree", None),),
    "shortcut": (("weights_type", "none"),),
    "route": (),
}


@dataclass
class CfgSection:
    """One ``[section]`` of a cfg with the line of its header and of each key, for error messages."""

    name: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)
    index: int | None = None  # Darknet layer index; None for [net]

    def where(self, key: str | None = None) -> str:
        head = f"section [{self.name}]" if self.index is None else f"layer {self.index} [{self.name}]"
        if key is not None and key in self.key_lines:
            return f"{head} at cfg line {self.line} (key '{key}' on line {self.key_lines[key]})"
        return f"{head} at cfg line {self.line}"

    def fail(self, message: str, key: str | None = None) -> DarknetError:
        return DarknetError(f"{self.where(key)}: {message}")

    # Typed option access.  ``required`` keys raise with the accepted form in the message.
    def get_str(self, key: str, default: str | None = None) -> str:
        if key in self.options:
            return self.options[key]
        if default is None:
            raise self.fail(f"missing required key '{key}' (expected a line '{key}=...')")
        return default

    def get_int(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise self.fail(f"missing required key '{key}' (expected a line '{key}=<integer>')")
            return default
        try:
            return int(self.options[key])
        except ValueError:
            raise self.fail(f"'{key}={_shown(self.options[key])}' is not an integer", key) from None

    def get_float(self, key: str, default: float) -> float:
        if key not in self.options:
            return default
        try:
            v = float(self.options[key])
        except ValueError:
            raise self.fail(f"'{key}={self.options[key]}' is not a number", key) from None
        if not math.isfinite(v):
            raise self.fail(f"'{key}={self.options[key]}' is not a finite number", key)
        return v

    def get_ints(self, key: str, default: Sequence[int] | None = None) -> list[int]:
        if key not in self.options:
            if default is None:
                raise self.fail(f"missing required key '{key}' (expected '{key}=<int>[,<int>...]')")
            return list(default)
        try:
            return [int(v) for v in self.options[key].split(",") if v.strip()]
        except ValueError:
            raise self.fail(f"'{key}={self.options[key]}' is not a comma-separated integer list", key) from None

    def get_floats(self, key: str) -> list[float]:
        if key not in self.options:
            return []
        try:
            vs = [float(v) for v in self.options[key].split(",") if v.strip()]
        except ValueError:
            raise self.fail(f"'{key}={self.options[key]}' is not a comma-separated number list", key) from None
        if not all(math.isfinite(v) for v in vs):
            raise self.fail(f"'{key}={self.options[key]:.80}' holds a value that is not a finite number", key)
        return vs


def _shown(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def parse_cfg(text: str) -> list[CfgSection]:
    """Split cfg text into sections; the first must be ``[net]`` and every other one is numbered as a layer."""
    sections: list[CfgSection] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise DarknetError(f"cfg line {lineno}: malformed section header {line!r}; expected '[name]'")
            name = line[1:-1].strip().lower()
            name = _ALIASES.get(name, name)
            index = None if not sections else len(sections) - 1
            if not sections and name != "net":
                raise DarknetError(
                    f"cfg line {lineno}: the first section must be [net] (or [network]), found [{name}]"
                )
            if sections and name == "net":
                raise DarknetError(f"cfg line {lineno}: a second [net] section; only the first section may be [net]")
            sections.append(CfgSection(name=name, line=lineno, index=index))
            continue
        if not sections:
            raise DarknetError(f"cfg line {lineno}: {line!r} appears before any [section] header")
        key, eq, value = line.partition("=")
        if not eq:
            raise sections[-1].fail(f"line {lineno} {line!r} is not 'key=value'")
        value = value.split("#", 1)[0].strip()
        key = key.strip()
        if key not in sections[-1].options:  # Darknet's option_find returns the first occurrence
            sections[-1].options[key] = value
            sections[-1].key_lines[key] = lineno
    if not sections:
        raise DarknetError("empty cfg: expected a [net] section followed by layers")
    return sections


# --------------------------------------------------------------------------------------------------
# Planning: shapes and module factories, computed without building any tensors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    kind: str
    inputs: tuple[int, ...]  # layer indices; -1 is the network input
    shape: Shape
    make: Callable[[], nn.Module]


def net_shape(net: CfgSection) -> Shape:
    dims = []
    for key in ("channels", "height", "width"):
        if key not in net.options:
            raise net.fail(f"missing required key '{key}' (the [net] section needs width, height and channels)")
        v = net.get_int(key)
        if v <= 0:
            raise net.fail(f"'{key}={v}' must be positive", key)
        dims.append(v)
    return (dims[0], dims[1], dims[2])


def _resolve(sec: CfgSection, key: str, refs: Sequence[int]) -> list[int]:
    """Darknet's index rule: negative indices are relative to the current layer."""
    assert sec.index is not None
    out = []
    for r in refs:
        idx = sec.index + r if r < 0 else r
        if not 0 <= idx < sec.index:
            raise sec.fail(
                f"'{key}' refers to layer {r} -> {idx}, which does not exist before this layer; "
                f"accepted: absolute indices 0..{sec.index - 1} or relative indices -1..-{sec.index}",
                key,
            )
        out.append(idx)
    return out


def _check_keys(sec: CfgSection) -> None:
    for key, harmless in _UNSUPPORTED_KEYS.get(sec.name, ()):
        if key in sec.options and (harmless is None or sec.options[key].lower() != harmless):
            raise sec.fail(f"'{key}={sec.options[key]}' is not supported by this importer", key)


def _activation(sec: CfgSection, default: str) -> str:
    act = sec.get_str("activation", default).lower()
    if act not in ACTIVATIONS:
        raise sec.fail(f"unknown activation '{act}'; accepted: {', '.join(sorted(ACTIVATIONS))}", "activation")
    return act


@dataclass(frozen=True)
class _At:
    """Where a section sits: its layer index, its input's shape and a lookup of earlier layers' shapes."""

    index: int
    shape: Shape
    shape_of: Callable[[int], Shape]


def _convolutional(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    filters = sec.get_int("filters")
    size = sec.get_int("size")
    stride = sec.get_int("stride", 1)
    padding = size // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
    groups = sec.get_int("groups", 1)
    bn = bool(sec.get_int("batch_normalize", 0))
    act = _activation(sec, "logistic")  # Darknet's default for [convolutional]
    for k in ("stride_x", "stride_y"):
        if k in sec.options and sec.get_int(k) != stride:
            raise sec.fail(f"'{k}' different from 'stride' is not supported", k)
    if filters <= 0 or size <= 0 or stride <= 0 or groups <= 0 or padding < 0:
        raise sec.fail("filters, size, stride and groups must be positive and padding non-negative")
    if c % groups or filters % groups:
        raise sec.fail(f"groups={groups} must divide both the input channels ({c}) and filters ({filters})")
    oh, ow = (h + 2 * padding - size) // stride + 1, (w + 2 * padding - size) // stride + 1
    shape = (filters, oh, ow)
    make = lambda c=c, f=filters, k=size, s=stride, p=padding, g=groups, b=bn, a=act: DarknetConv(  # noqa: E731
        c, f, k, s, p, g, b, a
    )
    return _Planned(sec.name, (i - 1,), shape, make)


def _maxpool(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    stride = sec.get_int("stride", 1)
    size = sec.get_int("size", stride)
    padding = sec.get_int("padding", size - 1)
    for k in ("stride_x", "stride_y"):
        if k in sec.options and sec.get_int(k) != stride:
            raise sec.fail(f"'{k}' different from 'stride' is not supported", k)
    if size <= 0 or stride <= 0 or padding < 0:
        raise sec.fail("size and stride must be positive and padding non-negative")
    shape = (c, (h + padding - size) // stride + 1, (w + padding - size) // stride + 1)
    make = lambda k=size, s=stride, p=padding: DarknetMaxPool(k, s, p)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _route(sec: CfgSection, at: _At) -> _Planned:
    inputs = tuple(_resolve(sec, "layers", sec.get_ints("layers")))
    if not inputs:
        raise sec.fail("'layers' is empty; expected layers=<int>[,<int>...]", "layers")
    groups = sec.get_int("groups", 1)
    group_id = sec.get_int("group_id", 0)
    if groups <= 0 or not 0 <= group_id < groups:
        raise sec.fail(f"need groups >= 1 and 0 <= group_id < groups, got {groups}, {group_id}")
    shapes = [at.shape_of(j) for j in inputs]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise sec.fail(f"inputs {list(inputs)} have different spatial sizes {[s[1:] for s in shapes]}")
    if any(s[0] % groups for s in shapes):
        raise sec.fail(f"groups={groups} must divide the channels of every input {[s[0] for s in shapes]}")
    chans = [s[0] for s in shapes]
    shape = (sum(ch // groups for ch in chans), shapes[0][1], shapes[0][2])
    make = lambda ch=tuple(chans), g=groups, gi=group_id: Route(ch, g, gi)  # noqa: E731
    return _Planned(sec.name, inputs, shape, make)


def _shortcut(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    others = _resolve(sec, "from", sec.get_ints("from"))
    for j in others:
        if at.shape_of(j) != (c, h, w):
            raise sec.fail(
                f"'from' layer {j} has shape {at.shape_of(j)} but the previous layer has {(c, h, w)}; "
                "only equal shapes are supported",
                "from",
            )
    inputs = (i - 1, *others)
    shape = (c, h, w)
    act = _activation(sec, "linear")
    alpha, beta = sec.get_float("alpha", 1.0), sec.get_float("beta", 1.0)
    make = lambda a=act, al=alpha, be=beta: Shortcut(a, al, be)  # noqa: E731
    return _Planned(sec.name, inputs, shape, make)


def _upsample(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    stride = sec.get_int("stride", 2)
    if stride <= 0:
        raise sec.fail(f"stride={stride}: only positive (upsampling) strides are supported", "stride")
    scale = sec.get_float("scale", 1.0)
    shape = (c, h * stride, w * stride)
    make = lambda s=stride, sc=scale: Upsample(s, sc)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _reorg(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    stride = sec.get_int("stride", 1)
    reverse = bool(sec.get_int("reverse", 0))
    if stride <= 0 or c % (stride * stride):
        raise sec.fail(f"stride={stride}: stride² must divide the input channels ({c})", "stride")
    if reverse:
        shape = (c // (stride * stride), h * stride, w * stride)
    else:
        if h % stride or w % stride:
            raise sec.fail(
                f"input {h}x{w} is not divisible by stride={stride}; Darknet's reorg needs that "
                "(choose a network size that is a multiple of the total stride)",
                "stride",
            )
        shape = (c * stride * stride, h // stride, w // stride)
    make = lambda s=stride, r=reverse: Reorg(s, r)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _region(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    coords = sec.get_int("coords", 4)
    classes = sec.get_int("classes", 20)
    num = sec.get_int("num", 1)
    softmax = bool(sec.get_int("softmax", 0))
    anchors = sec.get_floats("anchors")
    if coords < 2 or classes < 0 or num <= 0:
        raise sec.fail("need coords >= 2, classes >= 0 and num >= 1")
    if c != num * (coords + 1 + classes):
        raise sec.fail(
            f"input has {c} channels but num*(coords+1+classes) = {num}*({coords}+1+{classes}) "
            f"= {num * (coords + 1 + classes)}"
        )
    shape = (c, h, w)
    make = lambda n=num, k=classes, co=coords, sm=softmax, an=tuple(anchors): Region(n, k, co, sm, an)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _yolo(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    classes = sec.get_int("classes", 20)
    total = sec.get_int("num", 1)
    mask = sec.get_ints("mask", range(total))
    anchors = sec.get_floats("anchors")
    if any(not 0 <= m < total for m in mask):
        raise sec.fail(f"mask {mask} refers to anchors outside 0..{total - 1} (num={total})", "mask")
    if c != len(mask) * (classes + 5):
        raise sec.fail(
            f"input has {c} channels but len(mask)*(classes+5) = {len(mask)}*({classes}+5) "
            f"= {len(mask) * (classes + 5)}"
        )
    mask_anchors = tuple(v for m in mask for v in anchors[2 * m : 2 * m + 2])
    scale_xy = sec.get_float("scale_x_y", 1.0)
    shape = (c, h, w)
    make = lambda k=classes, m=tuple(mask), an=mask_anchors, sxy=scale_xy: YoloHead(k, m, an, sxy)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _softmax(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    groups = sec.get_int("groups", 1)
    if groups <= 0 or (c * h * w) % groups:
        raise sec.fail(f"groups={groups} must divide C*H*W = {c * h * w}", "groups")
    temperature = sec.get_float("temperature", 1.0)
    spatial = bool(sec.get_float("spatial", 0.0))
    shape = (c, h, w)
    make = lambda g=groups, t=temperature, sp=spatial: Softmax(g, t, sp)  # noqa: E731
    return _Planned(sec.name, (i - 1,), shape, make)


def _avgpool(sec: CfgSection, at: _At) -> _Planned:
    c, h, w = at.shape
    i = at.index
    shape = (c, 1, 1)
    make = GlobalAvgPool
    return _Planned(sec.name, (i - 1,), shape, make)


def _identity(sec: CfgSection, at: _At) -> _Planned:  # dropout, cost: identities at inference
    return _Planned(sec.name, (at.index - 1,), at.shape, Passthrough)


# one handler per section kind: each checks its keys and returns the layer's inputs, shape and builder
_HANDLERS: dict[str, Callable[[CfgSection, _At], _Planned]] = {
    "convolutional": _convolutional,
    "maxpool": _maxpool,
    "route": _route,
    "shortcut": _shortcut,
    "upsample": _upsample,
    "reorg": _reorg,
    "region": _region,
    "yolo": _yolo,
    "softmax": _softmax,
    "avgpool": _avgpool,
    "dropout": _identity,
    "cost": _identity,
}


def plan_layers(sections: Sequence[CfgSection], net_shape: Shape) -> list[_Planned]:
    plan: list[_Planned] = []

    def shape_of(i: int) -> Shape:
        return net_shape if i < 0 else plan[i].shape

    if len(sections) - 1 > MAX_LAYERS:
        raise DarknetError(f"the cfg has {len(sections) - 1} layers; the importer takes at most {MAX_LAYERS}")
    _check_map(sections[0], net_shape, "the [net] input")
    params = 0
    for sec in sections[1:]:
        assert sec.index is not None
        handler = _HANDLERS.get(sec.name)
        if handler is None:
            what = "is not supported" if sec.name in _KNOWN_UNSUPPORTED else "is an unknown section"
            raise sec.fail(f"[{sec.name}] {what}; accepted sections: [net], " + ", ".join(f"[{s}]" for s in _SUPPORTED))
        _check_keys(sec)
        layer = handler(sec, _At(sec.index, shape_of(sec.index - 1), shape_of))
        if min(layer.shape) <= 0:
            raise sec.fail(f"output shape {layer.shape} from input {shape_of(sec.index - 1)} is empty")
        _check_map(sec, layer.shape, "its output")
        if sec.name == "convolutional":
            params += _check_params(sec, shape_of(sec.index - 1), layer.shape, params)
        plan.append(layer)
    if not plan:
        raise DarknetError("the cfg has a [net] section but no layers")
    return plan


def _check_map(sec: CfgSection, shape: Shape, what: str) -> None:
    values = shape[0] * shape[1] * shape[2]
    if values > MAX_MAP_VALUES:
        raise sec.fail(f"{what} {shape} holds {values} values per frame; the importer takes maps of at most "
                       f"{MAX_MAP_VALUES} values (C*H*W): is a size in the cfg mistyped?")


def _check_params(sec: CfgSection, shape_in: Shape, shape_out: Shape, so_far: int) -> int:
    """Weights of a ``[convolutional]`` layer, refused before anything is allocated when absurd."""
    size, groups = sec.get_int("size"), sec.get_int("groups", 1)
    n = shape_out[0] * (shape_in[0] // groups) * size * size + 4 * shape_out[0]
    if n > MAX_LAYER_PARAMS:
        raise sec.fail(f"{shape_out[0]} filters of {shape_in[0] // groups}x{size}x{size} are {n} weights; the "
                       f"importer takes at most {MAX_LAYER_PARAMS} per layer: is a size in the cfg mistyped?")
    if so_far + n > MAX_TOTAL_PARAMS:
        raise sec.fail(f"the layers up to this one hold {so_far + n} weights; the importer takes at most "
                       f"{MAX_TOTAL_PARAMS} in all")
    return n


def read_cfg_text(cfg: str | bytes | os.PathLike[str]) -> str:
    """Cfg text given as text (a ``str`` with a newline), as bytes, or as a path; files are bounded
    (:data:`MAX_CFG_BYTES`) and must be UTF-8 text."""
    if isinstance(cfg, str) and "\n" in cfg:
        return cfg
    if isinstance(cfg, (bytes, bytearray, memoryview)):
        raw, name = bytes(cfg), "<bytes>"
    else:
        if not isinstance(cfg, (str, os.PathLike)):
            raise DarknetError(f"cfg must be a path, cfg text or bytes, got {type(cfg).__name__}")
        path = Path(cfg)
        name = repr(str(path))
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise DarknetError(f"cannot read cfg file {name}: not a regular file (a directory, device or pipe)")
            with open(path, "rb") as f:
                raw = f.read(MAX_CFG_BYTES + 1)
        except OSError as e:
            raise DarknetError(f"cannot read cfg file {name}: {e.strerror or e}") from e
        name = f"cfg file {name}"
    if len(raw) > MAX_CFG_BYTES:
        raise DarknetError(f"{name} is larger than {MAX_CFG_BYTES} bytes; a Darknet cfg is a few KiB of text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DarknetError(f"{name} is not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                           "expected a Darknet .cfg: [net] and [layer] sections of key=value lines") from None


