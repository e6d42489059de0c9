"""Run one fused stage on one tile, from the cropped inputs only.

A :class:`StageProgram` is an ``nn.Module`` holding exactly the weights of its stage (so ``.to()``
moves them and pickling ships only them) and a list of :class:`OpSpec`. Window ops run with
padding 0 on an input that the executor has cropped and, only where the window crosses the true
image border, padded with the op's own fill value: zeros for convolution, minus infinity for max
pooling, zeros plus whole-image divisors for average pooling. A cut never pads.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Box, need_box
from .ops import Const, OpSpec, Ref
from .ops_shape import scalar_value, view_run
from .reduce import partial, partial_key
from .regions import TileGeometry
from .stitch import stitch

Value = tuple[torch.Tensor, Box]
_FOLDABLE_BN = (nn.BatchNorm2d,)


def _key(path: str) -> str:
    return path.replace(".", "__")


_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]] = \
    weakref.WeakKeyDictionary()


def fold_batch_norm(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's weight and bias with the eval-mode batch norm after it folded in (in float64, then
    back to the weight's dtype). Memoised per batch norm while the tensors are unchanged: the
    auto-planner builds dozens of candidate plans of one model, and folding dominated their cost."""
    versions = tuple(None if t is None else (id(t), t._version)
                     for t in (w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    hit = _FOLDED.get(bn)
    if hit is not None and hit[0] == versions:
        return hit[1], hit[2]
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if b is not None:
        shift = shift + b.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    fw, fb = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype), shift.to(w.dtype)
    _FOLDED[bn] = (versions, fw, fb)
    return fw, fb


class StageProgram(nn.Module):
    """The weights and ops of one fused stage."""

    def __init__(self, specs: Sequence[OpSpec], modules: Mapping[str, nn.Module],
                 constants: Mapping[str, torch.Tensor], inputs: Sequence[str],
                 input_hw: Mapping[str, tuple[int, int]], outputs: Sequence[str] = (), *,
                 fold_bn: bool = True, reduced_in: Sequence[str] = ()) -> None:
        super().__init__()
        self.specs = list(specs)
        self.reduced_in = list(reduced_in)  # reduce points whose combined values run_tile needs
        self.order = [s.name for s in self.specs]
        self.stage_inputs = list(inputs)
        self.input_hw = dict(input_hw)
        self._const_keys: dict[str, str] = {}
        for i, (k, v) in enumerate(constants.items()):
            self.register_buffer(f"const_{i}", v.detach().clone() if isinstance(v, torch.Tensor) else v)
            self._const_keys[k] = f"const_{i}"
        # conv -> batch norm pairs folded into one conv (weights scaled once, here); the batch norm
        # then passes its input through. Only where nothing else reads the conv's own output.
        self._folded: dict[str, tuple[str, str]] = {}
        self._passthrough: set[str] = set()
        if fold_bn:
            self._fold_batch_norms(modules, set(outputs))
        used = {s.target for s in self.specs if s.how == "module" and s.name not in self._passthrough
                and s.name not in self._folded}
        self.mods = nn.ModuleDict({_key(k): v for k, v in modules.items() if k in used})

    def _fold_batch_norms(self, modules: Mapping[str, nn.Module], outputs: set[str]) -> None:
        readers: dict[str, int] = {}
        for s in self.specs:
            for i in set(s.inputs):
                readers[i] = readers.get(i, 0) + 1
        by_name = {s.name: s for s in self.specs}
        for s in self.specs:
            bn = modules.get(s.target) if s.how == "module" and isinstance(s.target, str) else None
            if not isinstance(bn, _FOLDABLE_BN) or bn.training or bn.running_mean is None or len(s.inputs) != 1:
                continue
            conv = by_name.get(s.inputs[0])
            if conv is None or conv.kind != "conv" or readers.get(conv.name) != 1 or conv.name in outputs:
                continue
            if len(s.args) != 1 or s.kwargs:
                continue
            w, b = self._conv_weights(conv, modules[conv.target] if conv.how == "module" else None)
            fw, fb = fold_batch_norm(w, b, bn)
            i = len(self._folded)
            self.register_buffer(f"fold_w_{i}", fw)
            self.register_buffer(f"fold_b_{i}", fb)
            self._folded[conv.name] = (f"fold_w_{i}", f"fold_b_{i}")
            self._passthrough.add(s.name)

    # --- accounting helpers -----------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in [*self.parameters(), *self.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # --- execution ----------------------------------------------------------------------------------
    @torch.no_grad()
    def run_tile(self, geo: TileGeometry, inputs: Mapping[str, torch.Tensor],
                 pieces: Mapping[str, Sequence[tuple[Box, torch.Tensor]]] | None = None,
                 reduced: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Outputs of the tile (one tensor per stage output) and the pieces it hands to neighbours.

        ``inputs`` hold exactly each stage input's ``geo.in_boxes`` region; ``pieces`` the reuse
        pieces listed in ``geo.pieces_in``, by node; ``reduced`` the combined value of every reduce
        point in ``reduced_in``. The outputs also hold this tile's partial of every reduce point the
        stage makes, under :func:`tiling.reduce.partial_key` of the point.
        """
        values: dict[str, Value] = {}
        self._batch = next(iter(inputs.values())).shape[0] if inputs else 1
        missing = [r for r in self.reduced_in if r not in (reduced or {})]
        if missing:
            raise ValueError(f"this stage continues from reduce points {missing}: pass their combined values "
                             f"as reduced={{name: tensor}} (see tiling.reduce.combine)")
        self._glob: dict[str, Any] = {r: (reduced or {})[r] for r in self.reduced_in}
        partials: dict[str, torch.Tensor] = {}
        for name in self.stage_inputs:
            box = geo.in_boxes[name]
            t = inputs[name]
            if tuple(t.shape[-2:]) != (box.height, box.width):
                raise ValueError(f"input '{name}' covers {tuple(t.shape[-2:])}, the tile needs {box} "
                                 f"({box.height}x{box.width})")
            values[name] = (t, box)
        pieces = pieces or {}
        for spec in self.specs:
            if not spec.is_map:
                self._value(spec, geo, values, partials)
                continue
            comp, need = geo.compute[spec.name], geo.need[spec.name]
            got = pieces.get(spec.name, ())
            if need.empty:
                continue
            out = self._run_op(spec, comp, values) if not comp.empty else None
            if got or (out is not None and comp != need):
                out = self._assemble(spec, need, comp, out, got, values)
                values[spec.name] = (out, need)
            else:
                assert out is not None
                values[spec.name] = (out, comp)
        outs = {o: _crop(values[o], b) if not b.empty else self._empty(o, values) for o, b in geo.out_boxes.items()}
        outs.update(partials)
        exported = [_crop(values[p.node], p.box) for p in geo.pieces_out]
        return outs, exported

    def _value(self, spec: OpSpec, geo: TileGeometry, values: Mapping[str, Value],
               partials: dict[str, torch.Tensor]) -> None:
        """A whole value: this tile's partial of a reduce point, or a value computed from them."""
        if spec.kind == "reduce":
            own = geo.owned[spec.name]
            x = values.get(spec.inputs[0])
            if own.empty or x is None:
                t = next(iter(values.values()))[0]
                crop = t.new_empty((self._batch, spec.out_shape[0], 0, 0))
            else:
                crop = _crop(x, own)
            partials[partial_key(spec.name)] = partial(spec.params["op"], crop)
        elif spec.kind == "scalar":
            self._glob[spec.name] = scalar_value(spec, self._batch)
        else:
            self._glob[spec.name] = self._call(spec, Box(0, 0, 0, 0), values)
    def _assemble(self, spec: OpSpec, need: Box, comp: Box, out: torch.Tensor | None,
                  got: Sequence[tuple[Box, torch.Tensor]], values: Mapping[str, Value]) -> torch.Tensor:
        own = [(comp, out)] if out is not None else []
        return stitch(need, [*own, *got], exact=False)  # the regions were planned to cover ``need``

    def _run_op(self, spec: OpSpec, comp: Box, values: Mapping[str, Value]) -> torch.Tensor:
        kind = spec.kind
        if kind in ("conv", "maxpool", "avgpool", "pad"):
            x = self._window_input(spec, comp, values.get(spec.inputs[0], self._nothing(values)))
            if kind == "pad":
                return x
            if kind == "maxpool":
                p = spec.params
                return F.max_pool2d(x, p["kernel"], p["stride"], 0, p["dilation"])
            if kind == "avgpool":
                return self._avgpool(spec, comp, x)
            return self._conv(spec, x)
        if kind == "upsample":
            return self._upsample(spec, comp, values[spec.inputs[0]])
        if kind == "broadcast":
            g = self._glob[spec.globals_in[0]]
            return g.expand(g.shape[0], g.shape[1], comp.height, comp.width)
        if kind == "reshape" and spec.params.get("view"):
            return view_run(spec, _crop(values[spec.inputs[0]], comp))
        if spec.name in self._passthrough:  # a batch norm folded into the conv before it
            return _crop(values[spec.inputs[0]], comp)
        return self._call(spec, comp, values)

    def _empty(self, name: str, values: Mapping[str, Value]) -> torch.Tensor:
        """An output this tile owns no part of (cuts scaled onto a differently shaped output)."""
        c = next(s for s in self.specs if s.name == name).out_shape[0]
        return next(iter(values.values()))[0].new_empty((self._batch, c, 0, 0))

    @staticmethod
    def _nothing(values: Mapping[str, Value]) -> Value:
        t = next(iter(values.values()))[0]
        return (t.new_empty((0,)), Box(0, 0, 0, 0))

    def _window_input(self, spec: OpSpec, comp: Box, value: Value) -> torch.Tensor:
        t, box = value
        want = need_box(spec.maps, comp)
        ih, iw = spec.in_hw
        have = want.clip(ih, iw)
        if have.empty:  # the window lies wholly in the border: nothing of the image is read
            return t.new_full((self._batch, spec.in_channels, want.height, want.width), spec.fill)
        x = _crop(value, have)
        pads = (have.w0 - want.w0, want.w1 - have.w1, have.h0 - want.h0, want.h1 - have.h1)
        if any(pads):
            x = F.pad(x, pads, value=spec.fill)
        return x

    def _conv_weights(self, spec: OpSpec, module: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of a conv: its module's, or constants of the traced graph."""
        if module is not None:
            return module.weight, module.bias
        p = spec.params
        return self._const(p["weight"]), (self._const(p["bias"]) if p.get("bias") is not None else None)

    def _conv(self, spec: OpSpec, x: torch.Tensor) -> torch.Tensor:
        p = spec.params
        folded = self._folded.get(spec.name)
        if folded is not None:
            w, b = getattr(self, folded[0]), getattr(self, folded[1])
        else:
            w, b = self._conv_weights(spec, self.mods[_key(spec.target)] if spec.how == "module" else None)
        return F.conv2d(x, w, b, p["stride"], 0, p["dilation"], p["groups"])

    def _avgpool(self, spec: OpSpec, comp: Box, x: torch.Tensor) -> torch.Tensor:
        p = spec.params
        total = F.avg_pool2d(x, p["kernel"], p["stride"], 0, False, True, 1)
        if p["divisor_override"]:
            return total / p["divisor_override"]
        dh = _divisors(comp.h0, comp.h1, spec.in_hw[0], p["kernel"][0], p["stride"][0], p["padding"][0],
                       p["count_include_pad"])
        dw = _divisors(comp.w0, comp.w1, spec.in_hw[1], p["kernel"][1], p["stride"][1], p["padding"][1],
                       p["count_include_pad"])
        div = torch.tensor(dh, dtype=x.dtype, device=x.device)[:, None] * torch.tensor(
            dw, dtype=x.dtype, device=x.device)[None, :]
        return total / div

    def _upsample(self, spec: OpSpec, comp: Box, value: Value) -> torch.Tensor:
        want = need_box(spec.maps, comp)
        x = _crop(value, want)
        fh, fw = spec.params["factor"]
        x = x.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)
        h0, w0 = comp.h0 - want.h0 * fh, comp.w0 - want.w0 * fw
        return x[:, :, h0:h0 + comp.height, w0:w0 + comp.width]

    def _call(self, spec: OpSpec, comp: Box, values: Mapping[str, Value]) -> torch.Tensor:
        def resolve(a: Any) -> Any:
            if isinstance(a, Ref):
                if a.name in self._glob:
                    return self._glob[a.name]
                return _crop(values[a.name], comp)
            if isinstance(a, Const):
                return self._const(a)
            if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
                return type(a)(resolve(v) for v in a)
            if isinstance(a, dict):
                return {k: resolve(v) for k, v in a.items()}
            if isinstance(a, slice):
                return slice(resolve(a.start), resolve(a.stop), resolve(a.step))
            return a

        if spec.how == "module":
            return self.mods[_key(spec.target)](*(resolve(a) for a in spec.args), **resolve(spec.kwargs))
        args = [resolve(a) for a in spec.args]
        kwargs = resolve(spec.kwargs)
        if spec.how == "method":
            return getattr(args[0], spec.target)(*args[1:], **kwargs)
        return spec.target(*args, **kwargs)

    def _const(self, c: Const) -> torch.Tensor:
        return getattr(self, self._const_keys[c.name])


def _crop(value: Value, want: Box) -> torch.Tensor:
    t, box = value
    if not box.contains(want):
        raise AssertionError(f"region {want} is not inside the available {box}")  # pragma: no cover
    hs, ws = want.relative_to(box)
    return t[..., hs, ws]


def _divisors(o0: int, o1: int, size: int, k: int, s: int, p: int, include_pad: bool) -> list[float]:
    """Average-pool divisors of outputs ``o0..o1`` from whole-image coordinates (PyTorch's rule)."""
    out = []
    for o in range(o0, o1):
        start = o * s - p
        end = min(start + k, size + p)
        if include_pad:
            out.append(float(end - start))
        else:
            out.append(float(min(end, size) - max(start, 0)))
    return out
