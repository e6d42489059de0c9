"""PyTorch modules that reproduce Darknet layers, the network container, and the seeded initialisation
shared with the zoo.

Every module here is written so that ``torch.fx.symbolic_trace`` traces *into* it and records plain
tensor ops (``pad``, ``max_pool2d``, ``getitem`` on the channel axis, ``cat``, ``interpolate``, ``add``,
reshapes for the heads).  The tiling core classifies graph nodes as spatially local or not, so a layer
hidden inside an opaque leaf module would be lost to it.  The only leaf modules used are the stock
``nn.Conv2d``, ``nn.BatchNorm2d`` and activation modules, whose geometry the core already knows.

Nothing here branches on tensor values; shape arithmetic uses ``x.shape`` so the same module works at
any input size the surrounding network accepts (Darknet itself resizes networks freely).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "DarknetConv",
    "DarknetMaxPool",
    "DarknetModel",
    "GlobalAvgPool",
    "Passthrough",
    "Region",
    "Reorg",
    "Route",
    "Shortcut",
    "Softmax",
    "Upsample",
    "YoloHead",
    "build_uninitialised",
    "calibrate_",
    "make_activation",
    "seeded_init_",
]

# Darknet activation names -> factories.  ``None`` means "no module" so that a linear layer leaves no
# node in the traced graph at all.
ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "leaky": lambda: nn.LeakyReLU(0.1),
    "linear": None,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "mish": nn.Mish,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module | None:
    """Build the activation named as in a cfg; the caller validates the name first (it owns the line number)."""
    factory = ACTIVATIONS[name]
    return None if factory is None else factory()


class DarknetConv(nn.Sequential):
    """``[convolutional]``: conv, optional batch norm, optional activation, as named children.

    A ``Sequential`` (not a leaf) so fx records ``layers.i.conv`` / ``layers.i.bn`` / ``layers.i.act``
    nodes that the tiling core recognises.  Batch norm uses ``eps=0``: the running variance is stored as
    ``(sqrt(var) + 1e-6) ** 2`` so that PyTorch's ``1/sqrt(running_var)`` equals Darknet's
    ``1/(sqrt(var) + 1e-6)``.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        size: int,
        stride: int,
        padding: int,
        groups: int,
        batch_normalize: bool,
        activation: str,
    ) -> None:
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        parts["conv"] = nn.Conv2d(
            in_channels, filters, size, stride=stride, padding=padding, groups=groups, bias=not batch_normalize
        )
        if batch_normalize:
            parts["bn"] = nn.BatchNorm2d(filters, eps=0.0)
        act = make_activation(activation)
        if act is not None:
            parts["act"] = act
        super().__init__(parts)
        self.activation = activation

    @property
    def batch_normalize(self) -> bool:
        return "bn" in self._modules


class DarknetMaxPool(nn.Module):
    """``[maxpool]`` with Darknet's window placement.

    Darknet starts the first window at ``-padding // 2`` and yields ``(w + padding - size) // stride + 1``
    outputs.  Padding ``padding // 2`` cells of ``-inf`` before and the rest after, then pooling without
    padding, gives exactly those windows (surplus trailing padding is never reached by a window, because
    ``max_pool2d`` floors).  ``size=2 stride=1`` thus pads one row/column at the bottom/right only.
    """

    def __init__(self, size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.size = size
        self.stride = stride
        self.padding = padding
        before = padding // 2
        after = padding - before
        self.pad = (before, after, before, after)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding:
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, padding={self.padding}"


class Route(nn.Module):
    """``[route]``: channel concatenation, optionally of the ``group_id``-th of ``groups`` channel slices.

    Slices are static (channel counts are known when the cfg is parsed), so fx sees ``x[:, a:b]``.
    """

    def __init__(self, channels: Sequence[int], groups: int = 1, group_id: int = 0) -> None:
        super().__init__()
        self.groups = groups
        self.group_id = group_id
        self.slices: tuple[tuple[int, int], ...] = tuple(
            (group_id * (c // groups), (group_id + 1) * (c // groups)) for c in channels
        )

    def forward(self, *xs: Tensor) -> Tensor:
        parts = list(xs) if self.groups == 1 else [x[:, a:b] for x, (a, b) in zip(xs, self.slices)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"inputs={len(self.slices)}, groups={self.groups}, group_id={self.group_id}"


class Shortcut(nn.Module):
    """``[shortcut]``: ``act(alpha * previous + beta * sum(from layers))`` as in Darknet's shortcut layer."""

    def __init__(self, activation: str = "linear", alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.activation = activation
        act = make_activation(activation)
        self.act = act if act is not None else Passthrough()

    def forward(self, x: Tensor, *others: Tensor) -> Tensor:
        if self.alpha != 1.0:
            x = x * self.alpha
        for other in others:
            x = x + (other * self.beta if self.beta != 1.0 else other)
        return self.act(x)


class Upsample(nn.Module):
    """``[upsample]``: nearest-neighbour upsampling by an integer factor, times Darknet's ``scale``."""

    def __init__(self, stride: int, scale: float = 1.0) -> None:
        super().__init__()
        self.stride = stride
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x * self.scale if self.scale != 1.0 else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, scale={self.scale}"


class Reorg(nn.Module):
    """``[reorg]`` exactly as pjreddie/darknet's CPU forward computes it, which is *not* space-to-depth.

    Darknet calls its index routine with the *input* dimensions ``(C, H, W)`` and ``forward=0``: output
    element ``(k, j, i)`` of a ``(C, H, W)``-shaped buffer is read from the input buffer viewed as
    ``(C / s², H·s, W·s)`` at ``(k mod C/s², j·s + (k div C/s²) div s, i·s + (k div C/s²) mod s)``;
    the result is then reinterpreted as ``(C·s², H/s, W/s)``.  So the input is read as if it were a
    taller, wider, thinner image, and neighbouring output pixels mix rows of the real input.  The
    pretrained YOLOv2 weights were trained with this layout, so it has to be reproduced, not "fixed".
    (AlexeyAB's fork calls the same routine with the *output* dimensions, which is a genuine
    space-to-depth; this module follows pjreddie.)

    ``reverse=True`` is the transpose mapping (Darknet's ``forward=1``): ``(C, H, W) -> (C/s², H·s, W·s)``.
    """

    def __init__(self, stride: int, reverse: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.reverse = reverse

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if self.reverse:
            # out viewed as (n, c/s², h, s, w, s) at [b, c2, j, oy, i, ox] = x viewed as (n, s, s, c/s², h, w).
            y = x.reshape(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
            return y.reshape(n, c // (s * s), h * s, w * s)
        # x viewed as (n, c/s², h, s, w, s) at [b, c2, j, oy, i, ox] goes to channel (oy·s + ox)·c/s² + c2.
        y = x.reshape(n, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * s * s, h // s, w // s)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, reverse={self.reverse}"


class Region(nn.Module):
    """``[region]`` (YOLOv2) at inference: logistic on x, y and objectness, softmax over classes per anchor.

    Channels are ``num`` blocks of ``coords + 1 + classes`` (Darknet's ``entry_index`` layout); the
    output keeps the input's ``(N, C, H, W)`` shape so box decoding can follow.  With ``softmax=0``
    Darknet applies the logistic to the classes instead.
    """

    def __init__(self, num: int, classes: int, coords: int, softmax: bool, anchors: Sequence[float] = ()) -> None:
        super().__init__()
        self.num = num
        self.classes = classes
        self.coords = coords
        self.softmax = softmax
        self.anchors: tuple[float, ...] = tuple(anchors)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        k = self.coords
        y = x.reshape(n, self.num, k + 1 + self.classes, h, w)
        cls = y[:, :, k + 1 :]
        cls = torch.softmax(cls, dim=2) if self.softmax else torch.sigmoid(cls)
        parts = [torch.sigmoid(y[:, :, 0:2])]
        if k > 2:
            parts.append(y[:, :, 2:k])
        parts += [torch.sigmoid(y[:, :, k : k + 1]), cls]
        return torch.cat(parts, dim=2).reshape(n, -1, h, w)

    def extra_repr(self) -> str:
        return f"num={self.num}, classes={self.classes}, coords={self.coords}, softmax={self.softmax}"


class YoloHead(nn.Module):
    """``[yolo]`` (YOLOv3) at inference: logistic on x, y, objectness and every class, per masked anchor.

    ``scale_x_y`` (YOLOv4) stretches the x/y logistic around 0.5 as Darknet does.
    """

    def __init__(
        self, classes: int, mask: Sequence[int], anchors: Sequence[float] = (), scale_x_y: float = 1.0
    ) -> None:
        super().__init__()
        self.classes = classes
        self.mask: tuple[int, ...] = tuple(mask)
        self.anchors: tuple[float, ...] = tuple(anchors)
        self.scale_x_y = scale_x_y

    def forward(self, x: Tensor) -> Tensor:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        y = x.reshape(n, len(self.mask), 5 + self.classes, h, w)
        xy = torch.sigmoid(y[:, :, 0:2])
        if self.scale_x_y != 1.0:
            xy = xy * self.scale_x_y - 0.5 * (self.scale_x_y - 1.0)
        out = torch.cat([xy, y[:, :, 2:4], torch.sigmoid(y[:, :, 4:])], dim=2)
        return out.reshape(n, -1, h, w)

    def extra_repr(self) -> str:
        return f"classes={self.classes}, mask={self.mask}, scale_x_y={self.scale_x_y}"


class Softmax(nn.Module):
    """``[softmax]``: Darknet's CPU softmax runs over each of ``groups`` contiguous chunks of the flattened
    ``C·H·W`` input (over channels when the input is 1×1, as after ``[avgpool]``).  ``spatial=1`` instead
    takes the softmax over channels at every pixel.
    """

    def __init__(self, groups: int = 1, temperature: float = 1.0, spatial: bool = False) -> None:
        super().__init__()
        self.groups = groups
        self.temperature = temperature
        self.spatial = spatial

    def forward(self, x: Tensor) -> Tensor:
        if self.temperature != 1.0:
            x = x / self.temperature
        if self.spatial:
            return torch.softmax(x, dim=1)
        n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        return torch.softmax(x.reshape(n, self.groups, -1), dim=2).reshape(n, c, h, w)


class GlobalAvgPool(nn.Module):
    """``[avgpool]``: Darknet averages each channel over the whole image into a 1×1 output."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class Passthrough(nn.Module):
    """Identity that leaves no node in an fx graph (``[dropout]`` at inference, ``[cost]``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class DarknetModel(nn.Module):
    """A Darknet network as a flat ``ModuleList`` run in cfg order.

    The forward loop is unrolled by fx (indices are plain Python data), and only outputs that a later
    ``[route]``/``[shortcut]`` reads are kept alive.  The result is the last layer's output, or the
    ``[yolo]`` heads' outputs (a tuple when there are several, in cfg order).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        inputs: Sequence[tuple[int, ...]],
        input_shape: tuple[int, int, int],
        layer_names: Sequence[str],
        layer_shapes: Sequence[tuple[int, int, int]],
        output_indices: Sequence[int],
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_inputs: tuple[tuple[int, ...], ...] = tuple(tuple(x) for x in inputs)
        self.input_shape: tuple[int, int, int] = tuple(input_shape)  # type: ignore[assignment]
        self.layer_names: list[str] = list(layer_names)
        self.layer_shapes: list[tuple[int, int, int]] = list(layer_shapes)
        self.output_indices: tuple[int, ...] = tuple(output_indices)
        keep = {j for i, ins in enumerate(self.layer_inputs) for j in ins if j != i - 1}
        self._keep = frozenset(keep | set(self.output_indices))

    def _run(self, x: Tensor, keep_all: bool) -> list[Tensor | None]:
        saved: dict[int, Tensor] = {-1: x}
        outs: list[Tensor | None] = []
        for i, layer in enumerate(self.layers):
            args = [x if j == i - 1 else saved[j] for j in self.layer_inputs[i]]
            x = layer(*args)
            if i in self._keep:
                saved[i] = x
            outs.append(x if keep_all or i in self._keep else None)
        return outs

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        outs = self._run(x, keep_all=False)
        results = [outs[i] for i in self.output_indices]
        if len(results) == 1:
            return results[0]  # type: ignore[return-value]
        return tuple(results)

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Every layer's output in order, for inspecting shapes and intermediate values (not traced)."""
        return self._run(x, keep_all=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Seeded random weights
# --------------------------------------------------------------------------------------------------

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_AFFINE_TYPES = (nn.Conv2d, nn.Linear)
_LOG_STEPS = 16  # calibrated scales are rounded to 2^(k/16): see calibrate_


M = TypeVar("M", bound=nn.Module)


def build_uninitialised(factory: Callable[[], M]) -> M:
    """Construct a module without PyTorch's default initialisation, ready for :func:`seeded_init_`.

    Default init of a large model (VGG-16's 138 M parameters) costs about a second and is thrown away
    anyway; building on the meta device and materialising empty storage skips it.  Integer buffers
    (BN's ``num_batches_tracked``) are zeroed; every float tensor must then be written by the caller.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for buf in module.buffers():
            if not buf.is_floating_point():
                buf.zero_()
    return module


def seeded_init_(
    model: nn.Module, seed: int, calibration_shape: Sequence[int] | None = None
) -> nn.Module:
    """Fill every conv/linear/batch-norm tensor from one ``torch.Generator`` seeded with ``seed``.

    Draws happen in ``model.modules()`` order, so the weights depend only on the architecture and the
    seed.  Conv/linear weights are He-normal (``std = sqrt(2 / fan_in)``), biases tiny, BN gamma ≈ 1,
    beta small, running mean small and running variance ≈ 1.  He init alone does not keep activations
    O(1) in real networks (max pooling, residual sums and linear projections all drift the scale), so
    when ``calibration_shape`` is given a seeded ``randn`` batch of that shape is pushed through
    :func:`calibrate_` to set each BN's running statistics, and to rescale each biased conv/linear (one
    not followed by BN), so that every layer sees unit-scale inputs.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            own = [t for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t.is_floating_point()]
            if own and not isinstance(m, (*_AFFINE_TYPES, *_BN_TYPES)):
                # Refuse rather than leave uninitialised (possibly empty) storage behind.
                raise TypeError(f"seeded_init_ does not know how to initialise {type(m).__name__}")
            if isinstance(m, _AFFINE_TYPES):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, _BN_TYPES):
                shape = (m.num_features,)
                if m.affine:
                    m.weight.copy_(1.0 + 0.1 * torch.randn(shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(shape, generator=gen))
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.copy_(0.1 * torch.randn(shape, generator=gen))
                    m.running_var.copy_(torch.exp(0.2 * torch.randn(shape, generator=gen)))
        if calibration_shape is not None:
            calibrate_(model, torch.randn(tuple(calibration_shape), generator=gen))
    model.eval()
    return model


def _quantise_scale(v: Tensor) -> Tensor:
    """Round positive values to a 2^(1/16) grid.

    The calibration pass runs real convolutions whose last bits can differ between CPUs and thread
    counts; snapping the derived statistics to a coarse grid makes the same seed give bit-identical
    weights on (almost) every machine, which lets workers rebuild a zoo model instead of shipping it.
    """
    return torch.exp2(torch.round(torch.log2(v) * _LOG_STEPS) / _LOG_STEPS)


def calibrate_(model: nn.Module, example: Tensor) -> None:
    """One eval-mode forward pass that makes every layer's output unit-scale on ``example``.

    A forward pre-hook on each BN sets its running mean/variance to the statistics of its actual input
    (so its output is ≈ N(beta, gamma²)); a forward hook on each biased conv/linear (by convention one not
    followed by BN) divides its weight and bias by its output's standard deviation and hands the
    rescaled output on, so later layers calibrate against what they will really see.  Hooks fire in
    execution order, so one pass calibrates the whole network.  Running statistics are stored with the
    BN's ``eps`` already subtracted, so that ``running_var + eps`` is the measured variance.
    """

    def bn_pre_hook(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        var = torch.where(torch.isfinite(var) & (var > 1e-8), var, torch.ones_like(var))
        var = _quantise_scale(var)
        step = var.sqrt() / 64
        mean = torch.where(torch.isfinite(mean), torch.round(mean / step) * step, torch.zeros_like(mean))
        assert isinstance(m, _BN_TYPES)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((var - m.eps).clamp_min(1e-12).to(m.running_var.dtype))

    def affine_hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        std = out.detach().double().std()
        if not bool(torch.isfinite(std)) or float(std) <= 1e-12:
            return out
        s = _quantise_scale(std)
        m.weight.div_(s.to(m.weight.dtype))
        if m.bias is not None:
            m.bias.div_(s.to(m.bias.dtype))
        return out / s.to(out.dtype)

    handles = []
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
        elif isinstance(m, _AFFINE_TYPES) and m.bias is not None:
            handles.append(m.register_forward_hook(affine_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
