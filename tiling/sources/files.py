"""``load_model``: one entry point from a model file to an ``nn.Module`` the tiler can partition.

The kind is decided by the file, not guessed from its contents alone: ``.onnx`` is ONNX, ``.cfg``
Darknet, and ``.pt``/``.pth``/``.pt2``/``.ts``/``.jit``/``.torchscript`` a PyTorch archive, which is
TorchScript when the zip holds TorchScript code and a pickled module otherwise. Pickled modules
(``torch.save(model)``) are refused unless ``trust=True``: unpickling runs whatever code the file
names, so it is only safe for files you made yourself.

ONNX support (and the ``onnx`` package) is imported only when an ONNX model is loaded, so
``import tiling`` stays light on devices that only run tiles.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import TilingError
from .darknet import load_darknet

__all__ = ["MODEL_KINDS", "ModelFileError", "load_model", "load_onnx"]

MODEL_KINDS = {
    ".onnx": "ONNX model (opsets 9-21)",
    ".cfg": "Darknet cfg (weights= a .weights file; random seeded weights without)",
    ".pt": "TorchScript (torch.jit.save) or, with trust=True, a pickled module (torch.save(model))",
    ".pth": "as .pt", ".ts": "as .pt", ".jit": "as .pt", ".torchscript": "as .pt",
}


class ModelFileError(TilingError):
    """A model file that cannot be loaded: its kind, its contents, or a refused pickle."""


def load_onnx(source: Any, *, input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """Import an ONNX model (path, bytes or ``onnx.ModelProto``); see :mod:`tiling.sources.onnx`."""
    try:
        from .onnx import load_onnx as _load
    except ModuleNotFoundError as e:
        raise ModelFileError(f"loading ONNX models needs the onnx package ({e}); pip install onnx") from e
    return _load(source, input_shape=input_shape)


def load_model(path: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
               trust: bool = False, input_shape: Sequence[int] | None = None) -> nn.Module:
    """An eval-mode module from a model file; the accepted kinds are in :data:`MODEL_KINDS`.

    ``weights`` is a Darknet ``.weights`` file for a ``.cfg``, or a state dict (``torch.save(model.
    state_dict())``, read with ``weights_only=True``) for a PyTorch archive. ``input_shape`` fixes
    symbolic dimensions of an ONNX model.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in MODEL_KINDS:
        kinds = "; ".join(f"{k}: {v}" for k, v in MODEL_KINDS.items() if not v.startswith("as "))
        raise ModelFileError(f"unknown model file kind {ext or '(no extension)'!r} for {str(p)!r}; accepted: "
                             f"{kinds} (also {', '.join(k for k, v in MODEL_KINDS.items() if v == 'as .pt')})")
    if not p.is_file():
        raise ModelFileError(f"model file {str(p)!r} does not exist")
    if ext == ".onnx":
        if weights is not None:
            raise ModelFileError("an ONNX file carries its own weights; weights= is for .cfg and PyTorch files")
        return load_onnx(p, input_shape=input_shape)
    if ext == ".cfg":
        return load_darknet(p, weights)
    return _load_torch(p, trust, None if weights is None else Path(weights)).eval()


def _is_torchscript(p: Path) -> bool:
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torch(p: Path, trust: bool, weights: Path | None) -> nn.Module:
    if _is_torchscript(p):
        from .torchscript import load_torchscript

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; old files still load
            sm = torch.jit.load(str(p), map_location="cpu")
        if weights is not None:  # before conversion: freezing bakes the weights into the graph
            _load_state_dict(sm, weights)
        return load_torchscript(sm)
    try:  # safe: refuses anything but tensors and plain containers
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        if not trust:
            raise ModelFileError(
                f"{str(p)!r} is a pickled PyTorch object (torch.save(model)), not TorchScript. Unpickling runs "
                f"arbitrary code named in the file, so it is refused by default: pass trust=True only for a file "
                f"you made, or save the model with torch.jit.save(torch.jit.trace(model, x)) or export it to ONNX"
            ) from e
        obj = torch.load(p, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        if weights is not None:
            _load_state_dict(obj, weights)
        return obj
    raise ModelFileError(
        f"{str(p)!r} holds a {type(obj).__name__} (weights without an architecture, e.g. a state dict); build "
        f"the model in code and pass this file as weights=, or save a TorchScript or ONNX model instead")


def _load_state_dict(model: nn.Module, p: Path) -> None:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError) as e:
        raise ModelFileError(f"weights file {str(p)!r} is not a readable state dict ({e})") from e
    if not isinstance(state, dict):
        raise ModelFileError(f"weights file {str(p)!r} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"weights file {str(p)!r} does not fit the model: {e}") from e


def model_input_shape(path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[int, int, int] | None:
    """(C, H, W) a model file says its input is: a Darknet model's ``[net]`` size, an ONNX graph's
    static input shape; None when the file does not say (TorchScript, pickles)."""
    found = getattr(model, "input_shape", None)
    if found is not None:
        return tuple(int(v) for v in found)[-3:]  # type: ignore[return-value]
    if not str(path).lower().endswith(".onnx"):
        return None
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    return tuple(dims[1:]) if len(dims) == 4 and all(v > 0 for v in dims[1:]) else None  # type: ignore[return-value]
