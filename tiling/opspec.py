"""The data every op classifier produces: :class:`OpSpec`, :class:`Stop` and their small helpers.

Kept apart from :mod:`tiling.ops` so that the op families (shape ops, reductions, ATen forms) can
live in their own modules and all produce the same records without importing the classifier.

What a spec's ``kind`` means to the rest of the core:

- map kinds (``conv`` ... ``slice``, ``reshape``, ``broadcast``): a tensor shaped ``(N, *mid, H, W)``
  that tiles carry as a box of its last two dims;
- ``reduce``: a global sum or max over H, W of a map, computed as per-tile partials over the part of
  the map each tile owns and combined across tiles (a *reduce point*);
- ``global``: a value computed only from reduce results, constants and sizes (the squeeze-excitation
  MLP, say): tile-invariant, so every tile that needs it computes it whole;
- ``scalar``: a size of a map (``x.size()``, ``x.shape``, ``sym_size``), with the whole map's H, W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import fx, nn

from .geometry import IDENTITY, AxisMap

Kind = Literal["conv", "maxpool", "avgpool", "pad", "upsample", "pointwise", "cat", "slice", "reshape",
               "broadcast", "reduce", "global", "scalar"]
WINDOW_KINDS = ("conv", "maxpool", "avgpool", "pad")
ANCHOR_KINDS = ("conv", "maxpool", "avgpool", "upsample")
VALUE_KINDS = ("reduce", "global", "scalar")  # tile-invariant values, not maps


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
    """One op a tile can run: enough to propagate regions and run it on a tile."""

    name: str
    kind: Kind
    inputs: tuple[str, ...]  # stage maps read, in order of first appearance
    maps: tuple[AxisMap, AxisMap] = (IDENTITY, IDENTITY)
    fill: float = 0.0  # value of the image border for window ops
    how: Literal["module", "function", "method"] = "function"
    target: Any = None  # module path, callable or method name
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    out_shape: tuple[int, int, int] = (0, 0, 0)  # C, H, W of the whole output (C: product of middle dims)
    in_hw: tuple[int, int] = (0, 0)  # H, W of the spatial input (window ops)
    in_channels: int = 0  # C of the spatial input (window ops)
    macs_per_pixel: int = 0  # multiply-adds per output pixel per frame (conv)
    params: dict[str, Any] = field(default_factory=dict)
    globals_in: tuple[str, ...] = ()  # tile-invariant values read whole (reduce results, sizes)
    mid: tuple[int, ...] = ()  # middle dims of a map that is not (N, C, H, W); () means (C,)
    after: tuple[str, ...] = ()  # nodes that must be fused too, though their values are not read (sizes)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every fused node this spec depends on: maps, whole values, and nodes whose size it reads."""
        return (*self.inputs, *self.globals_in, *self.after)

    @property
    def is_anchor(self) -> bool:
        return self.kind in ANCHOR_KINDS

    @property
    def is_map(self) -> bool:
        return self.kind not in VALUE_KINDS


@dataclass(frozen=True)
class Stop:
    """Why a node ends fusion."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


@dataclass(frozen=True)
class Virtual:
    """A node that returns a tuple of maps (``chunk``, ``split``, batch norm's ATen form): it runs
    nowhere itself; each ``getitem`` of it becomes its own spec reading ``source``."""

    node: str
    source: str


class NotLocal(Exception):
    """Raised inside a classifier: the message becomes the :class:`Stop` reason."""


def pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def bind(node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a functional call, by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a tensor-valued node, or None (sizes, tuples, constants of other types)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def node_refs(a: Any) -> list[fx.Node]:
    """Every graph node inside a (nested) argument."""
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for v in a for n in node_refs(v)]
    if isinstance(a, dict):
        return [n for v in a.values() for n in node_refs(v)]
    if isinstance(a, slice):
        return [n for v in (a.start, a.stop, a.step) for n in node_refs(v)]
    return []
