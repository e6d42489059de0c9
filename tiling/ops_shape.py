"""Shape ops that only move channels: reshapes, transposes, permutes, chunks and size queries.

A map is ``(N, *mid, H, W)``: the batch first, the spatial dims last (a channel shuffle passes
through a 5-D ``(N, g, C/g, H, W)``). An op that keeps N and the trailing H, W and only relabels or
reorders the middle dims moves no pixel across space, so a tile can run it on its crop. For
``view``/``reshape`` this holds by arithmetic: both tensors are laid out row-major with the same
trailing ``H * W`` block, so equal N, equal trailing sizes and equal numel mean every pixel keeps its
(h, w). Tiles run them as ``reshape`` to ``(n, *mid, h, w)`` of their own crop, never with the
traced sizes (which are the whole map's). Anything that moves H or W elsewhere ends fusion.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from .opspec import NotLocal, OpSpec, Ref, Virtual, node_shape

VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
VIEW_FUNCTIONS: tuple[Any, ...] = (torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)
VIEW_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)
TRANSPOSE_FUNCTIONS: tuple[Any, ...] = (torch.transpose, torch.swapaxes, torch.swapdims)
TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
PERMUTE_FUNCTIONS: tuple[Any, ...] = (torch.permute,)
SPLIT_METHODS = {"chunk", "split", "tensor_split"}
SPLIT_FUNCTIONS: tuple[Any, ...] = (torch.chunk, torch.split, torch.tensor_split)
SIZE_METHODS = {"size", "dim"}


def _norm_dim(d: Any, nd: int) -> int:
    if not isinstance(d, int) or isinstance(d, bool):
        raise NotLocal(f"dim {d!r} is not a constant integer")
    return d + nd if d < 0 else d


def _middle(d: int, nd: int, what: str) -> None:
    if not 1 <= d <= nd - 3:
        axis = "batch" if d == 0 else ("height" if d == nd - 2 else "width")
        raise NotLocal(f"{what} moves the {axis} dim ({d} of a {nd}-D map); only channel-like dims "
                       f"between the batch and the trailing H, W are local")


def view_spec(x: fx.Node, out: tuple[int, ...], base: dict[str, Any]) -> OpSpec:
    """``view``/``reshape``/``flatten``/``unflatten``/``squeeze``/``unsqueeze`` that keep N, H and W."""
    s = node_shape(x)
    assert s is not None
    if len(out) < 4 or out[0] != s[0] or out[-2:] != s[-2:]:
        raise NotLocal(f"reshape of {s} to {out} mixes the spatial dims H, W with other axes; only "
                       f"reshapes that keep N and the trailing H, W (channel shuffles, groups) are local")
    return OpSpec(kind="reshape", inputs=(x.name,), params=dict(view=True, mid=out[1:-2]), **base)


def transpose_spec(x: fx.Node, d0: Any, d1: Any, how: str, target: Any, base: dict[str, Any]) -> OpSpec:
    nd = len(node_shape(x) or ())
    a, b = _norm_dim(d0, nd), _norm_dim(d1, nd)
    for d in (a, b):
        _middle(d, nd, f"transpose({d0}, {d1})")
    args = (Ref(x.name), a, b) if how != "module" else (Ref(x.name),)
    return OpSpec(kind="reshape", inputs=(x.name,), how=how, target=target, args=args,  # type: ignore[arg-type]
                  **base)


def permute_spec(x: fx.Node, perm: Any, how: str, target: Any, base: dict[str, Any]) -> OpSpec:
    nd = len(node_shape(x) or ())
    dims = [_norm_dim(d, nd) for d in perm]
    if dims[0] != 0 or dims[-2:] != [nd - 2, nd - 1]:
        raise NotLocal(f"permute{tuple(perm)} moves the batch or a spatial dim; only permutations of "
                       f"the middle dims are local")
    return OpSpec(kind="reshape", inputs=(x.name,), how=how, target=target,  # type: ignore[arg-type]
                  args=(Ref(x.name), tuple(dims)), **base)


def split_virtual(node: fx.Node, x: Any, dim: Any) -> Virtual:
    """``chunk``/``split`` along a middle dim: each ``getitem`` becomes a slice of ``x``."""
    s = node_shape(x)
    if s is None or len(s) < 4:
        raise NotLocal("it splits something that is not a map")
    d = _norm_dim(dim, len(s))
    _middle(d, len(s), f"splitting along dim {dim}")
    return Virtual(node.name, x.name)


def split_dim(node: fx.Node) -> Any:
    """The dim argument of a split/chunk call (method, torch function or ATen form)."""
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[2] if len(node.args) > 2 else 0


def tuple_item_spec(tup: fx.Node, source: fx.Node, index: Any, base: dict[str, Any]) -> OpSpec:
    """Item ``index`` of a split of ``source``: a slice of its split dim, from the traced shapes."""
    metas = tup.meta.get("tensor_meta")
    s = node_shape(source)
    if not isinstance(index, int) or not isinstance(metas, (list, tuple)) or s is None:
        raise NotLocal(f"item {index!r} of a split is not a constant index into traced pieces")
    d = _norm_dim(split_dim(tup), len(s))
    sizes = [int(m.shape[d]) for m in metas]
    start = sum(sizes[:index])
    idx = (slice(None),) * d + (slice(start, start + sizes[index]),)
    return OpSpec(kind="slice", inputs=(source.name,), how="function", target=operator.getitem,
                  args=(Ref(source.name), idx), **base)


def check_index(idx: tuple[Any, ...], nd: int) -> None:
    """``x[...]`` is local when it slices middle dims only and keeps the rank."""
    full = slice(None)
    if len(idx) > nd or any(i is Ellipsis or i is None for i in idx):
        raise NotLocal(f"indexing {idx!r} is not a slice of channel-like dims")
    for d, i in enumerate(idx):
        if d == 0 or d >= nd - 2:
            if i != full:
                raise NotLocal(f"indexing {idx!r} selects along the batch or a spatial dim")
        elif not isinstance(i, slice) or any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)):
            raise NotLocal(f"indexing {idx!r} is not a constant slice of the channel dim")


def size_spec(node: fx.Node, x: fx.Node, which: str, dim: Any, base: dict[str, Any]) -> OpSpec:
    """A size query of a map: the whole map's sizes (the tile's own batch) wherever it is read."""
    s = node_shape(x)
    assert s is not None
    d = None if dim is None else _norm_dim(dim, len(s))
    return OpSpec(kind="scalar", inputs=(), params=dict(full=s, which=which, dim=d), after=(x.name,), **base)


def scalar_value(spec: OpSpec, batch: int) -> Any:
    """What a tile's size query returns: the whole map's size, with the tile's batch."""
    full = (batch, *spec.params["full"][1:])
    if spec.params["which"] == "dim":
        return len(full)
    d = spec.params["dim"]
    return torch.Size(full) if d is None else full[d]


def view_run(spec: OpSpec, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], *spec.params["mid"], x.shape[-2], x.shape[-1])


def mid_channels(mid: tuple[int, ...]) -> int:
    return math.prod(mid) if mid else 1
