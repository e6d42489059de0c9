"""Frame preprocessing, defined once for the project: uint8 frames in, the model's float input out.

Cameras and image files give 8-bit frames. Normalising them on the client would send four bytes per
value across the network; instead :func:`with_preprocess` puts the conversion *inside* the model as
per-pixel ops (``x * scale``, ``- mean``, ``/ std``, a channel swap by slices and ``cat``), which the
tiler fuses into the first stage: every device receives its own uint8 crop (one byte per value) and
converts only that.

Layout is declared, never guessed: a (H, W, 3) frame and a (3, H, W') frame can have the same
shape. :meth:`Preprocess.to_nchw` turns declared ``hwc`` frames into NCHW with a uint8 permute (no
size change) on the client; the model itself always takes NCHW.

    pre = Preprocess.parse("imagenet")            # or "darknet", "none", "imagenet,layout=hwc"
    model = with_preprocess(model, pre)           # takes (N, 3, H, W) uint8
    plan = tiling.partition(model, frames_uint8, grid=(2, 2))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import TilingError

__all__ = ["PRESETS", "Preprocess", "PreprocessError", "Preprocessed", "with_preprocess"]

ORDERS = ("rgb", "bgr")
LAYOUTS = ("chw", "hwc")
KEYS = ("preset", "scale", "mean", "std", "order", "layout")


class PreprocessError(TilingError):
    """A preprocessing description or a frame that does not fit it."""


@dataclass(frozen=True)
class Preprocess:
    """How raw uint8 frames become the model's input: ``((swap(x) * scale) - mean) / std``.

    ``order`` is the channel order the model expects; frames are taken as RGB (what Pillow and most
    decoders give), so ``bgr`` reverses the channels (the swap is its own inverse, so it equally
    feeds OpenCV's BGR frames to an RGB model). ``mean``/``std`` are in the model's channel order.
    ``layout`` is how frames arrive (``chw`` or ``hwc``); only :meth:`to_nchw` uses it.
    """

    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    order: str = "rgb"
    layout: str = "chw"
    name: str = "custom"

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0):
            raise PreprocessError(f"scale must be a finite non-zero number, got {self.scale!r}")
        for what in ("mean", "std"):
            v = getattr(self, what)
            if v is not None and (not v or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in v)):
                raise PreprocessError(f"{what} must be a non-empty list of finite numbers, got {v!r}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise PreprocessError(f"mean has {len(self.mean)} channels but std has {len(self.std)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise PreprocessError(f"std must be positive, got {self.std}")
        if self.order not in ORDERS:
            raise PreprocessError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.layout not in LAYOUTS:
            raise PreprocessError(f"layout must be one of {LAYOUTS} (declared, never guessed), got {self.layout!r}")

    # --- parsing ------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Preprocess | Mapping[str, Any] | None) -> Preprocess:
        """A preset name with optional overrides: ``"imagenet"``, ``"darknet,layout=hwc"``,
        ``"none,scale=1/255,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,order=bgr"``."""
        if isinstance(text, Preprocess):
            return text
        if text is None:
            return PRESETS["none"]
        if isinstance(text, Mapping):
            return cls.from_dict(text)
        if not isinstance(text, str):
            raise PreprocessError(f"expected a preset name or a dict, got {type(text).__name__}")
        head, *rest = [p.strip() for p in text.split(",") if p.strip()] or [""]
        fields: dict[str, Any] = {"preset": head}
        for part in rest:
            key, sep, val = part.partition("=")
            if not sep:
                raise PreprocessError(f"expected key=value after the preset in {text!r}, got {part!r}; "
                                      f"keys: {', '.join(KEYS[1:])}")
            fields[key.strip()] = val.strip().split("/") if key.strip() in ("mean", "std") else val.strip()
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """From a config table: ``{"preset": "imagenet", "layout": "hwc"}`` or every field spelled out."""
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise PreprocessError(f"unknown preprocessing keys {unknown}; accepted: {', '.join(KEYS)}")
        preset = d.get("preset", "none")
        if preset not in PRESETS:
            raise PreprocessError(f"unknown preprocessing preset {preset!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[preset]
        changes: dict[str, Any] = {}
        if "scale" in d:
            changes["scale"] = _number(d["scale"], "scale")
        for what in ("mean", "std"):
            if what in d:
                v = d[what]
                changes[what] = None if v is None or v == "none" else tuple(_number(a, what) for a in _seq(v, what))
        for what in ("order", "layout"):
            if what in d:
                changes[what] = str(d[what]).lower()
        name = preset if not changes else f"{preset}+custom"
        return dataclasses.replace(base, name=name, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The inverse of :meth:`from_dict` (every field spelled out)."""
        return {"scale": self.scale, "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None, "order": self.order, "layout": self.layout}

    # --- frames ---------------------------------------------------------------------------------------
    def to_nchw(self, frames: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> Tensor:
        """A uint8 (N, C, H, W) batch from frames in the declared layout (one frame or a batch)."""
        if isinstance(frames, (list, tuple)):
            frames = torch.stack([self.to_nchw(f)[0] for f in frames]) if frames else None  # type: ignore[assignment]
            if frames is None:
                raise PreprocessError("no frames given")
            return frames  # type: ignore[return-value]
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if not isinstance(x, Tensor):
            raise PreprocessError(f"frames must be a tensor or numpy array, got {type(frames).__name__}")
        if x.dtype != torch.uint8:
            raise PreprocessError(f"frames must be uint8 (raw 0-255 pixels), got {x.dtype}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise PreprocessError(f"a frame is 3-D ({self.layout.upper()}) and a batch 4-D, got shape {tuple(x.shape)}")
        if self.layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        c = x.shape[1]
        want = len(self.mean) if self.mean else len(self.std) if self.std else None
        if want is not None and c != want:
            raise PreprocessError(f"frames declared {self.layout.upper()} have {c} channels (shape "
                                  f"{tuple(x.shape)} as NCHW), the preprocessing expects {want}")
        return x.contiguous()

    def apply_float(self, x: Tensor) -> Tensor:
        """The float input the model sees for uint8 NCHW frames (what :func:`with_preprocess` computes)."""
        return Preprocessed.normalise(x, self, *_buffers(self))


def _number(v: Any, what: str) -> float:
    try:
        return float(Fraction(v)) if isinstance(v, str) else float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        raise PreprocessError(f"{what} must be a number or a fraction like 1/255, got {v!r}") from None


def _seq(v: Any, what: str) -> Sequence[Any]:
    if isinstance(v, str):
        return v.replace(",", "/").split("/")
    if isinstance(v, (list, tuple)):
        return v
    raise PreprocessError(f"{what} must be a list of per-channel numbers, got {v!r}")


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rgb", "chw", "imagenet"),
    "darknet": Preprocess(1 / 255, None, None, "rgb", "chw", "darknet"),
    "none": Preprocess(1.0, None, None, "rgb", "chw", "none"),
}


def _buffers(pre: Preprocess) -> tuple[Tensor | None, Tensor | None]:
    mean = None if pre.mean is None else torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = None if pre.std is None else torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std


class Preprocessed(nn.Module):
    """``model(normalise(frames))`` for uint8 NCHW frames; the normalisation is pointwise, so it fuses."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.pre = pre
        mean, std = _buffers(pre)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @staticmethod
    def normalise(x: Tensor, pre: Preprocess, mean: Tensor | None, std: Tensor | None) -> Tensor:
        if pre.order == "bgr":  # channel slices and cat: both are ops the tiler fuses
            x = torch.cat([x[:, 2:3], x[:, 1:2], x[:, 0:1]], 1)
        y = x * pre.scale  # uint8 * float promotes to float32: the conversion itself
        if mean is not None:
            y = y - mean
        if std is not None:
            y = y / std
        return y

    def forward(self, x: Tensor) -> Any:
        return self.model(self.normalise(x, self.pre, self.mean, self.std))


def with_preprocess(model: nn.Module, pre: Preprocess | str | Mapping[str, Any]) -> Preprocessed:
    """Wrap ``model`` so that it takes uint8 (N, C, H, W) frames and normalises them itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return Preprocessed(model, Preprocess.parse(pre)).eval()
