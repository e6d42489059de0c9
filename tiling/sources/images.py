"""Image files as uint8 CHW tensors: the frames a client feeds a :func:`tiling.with_preprocess` model.

Pillow decodes PNG and JPEG; every image is converted to RGB (grey, palette and alpha images
included), so a directory of mixed files gives frames of one kind. Frames stay uint8: normalisation
belongs to the model's first stage (see :mod:`tiling.preprocess`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import TilingError

__all__ = ["IMAGE_SUFFIXES", "ImageError", "load_image", "load_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageError(TilingError):
    """An image path that is missing, empty, of an unknown kind or not decodable."""


def _size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def load_image(path: str | os.PathLike[str], size: int | Sequence[int] | None = None) -> Tensor:
    """One image as a (3, H, W) uint8 tensor, resized (bilinear, by Pillow) to ``size`` = H or (H, W)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ModuleNotFoundError as e:
        raise ImageError(f"reading images needs Pillow ({e}); pip install pillow") from e
    p = Path(path)
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            hw = _size(size)
            if hw is not None:
                im = im.resize((hw[1], hw[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"image {str(p)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read {str(p)!r} as an image ({type(e).__name__}: {e}); "
                         f"accepted: PNG and JPEG") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_images(path: str | os.PathLike[str], size: int | Sequence[int] | None = None) -> list[Tensor]:
    """A file, or every PNG/JPEG in a directory sorted by name, as (3, H, W) uint8 tensors.

    Without ``size`` images keep their own sizes (stack them only when they agree).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"directory {str(p)!r} holds no {', '.join(IMAGE_SUFFIXES)} files")
        return [load_image(f, size) for f in files]
    if not p.exists():
        raise ImageError(f"image path {str(p)!r} does not exist")
    return [load_image(p, size)]
