"""ONNX importer: an ``.onnx`` model becomes an ``fx.GraphModule`` of ordinary torch modules and functions.

The tiler recognises spatially local ops by their torch form (``nn.Conv2d``, ``nn.MaxPool2d``,
``F.relu``, ``operator.add``, ``torch.cat`` ...; see :mod:`tiling.ops`). So the importer does not
run ONNX ops through an interpreter: it translates each node into the torch call a hand-written
model would make, which lets fusion reach as far in an imported model as in the native one.

Built on the ``onnx`` package only: ``onnx.shape_inference`` gives every value its static shape and
``numpy_helper`` reads initializers. Anything computable at import time (initializers, ``Constant``,
``Shape`` of a static tensor and the ``Gather``/``Concat``/``Unsqueeze`` arithmetic exporters build
on it) is folded into constants while the graph is built: each translation calls the builder, which
runs the torch function eagerly when no operand depends on the input. The graph that remains holds
only what depends on the input, and ``Reshape`` targets are plain numbers.

The batch dimension stays free where it leads a tensor (``Reshape``/``Flatten`` keep it as ``-1``),
so a plan made with batch 1 runs batches like a native model. Op translations live in
:mod:`tiling.sources.onnx_ops` (compute ops) and :mod:`tiling.sources.onnx_shape_ops` (tensor
plumbing); ``docs/models.md`` lists them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import onnx
from torch import fx

from .onnx_graph import Builder, OnnxImportError, UnsupportedOnnxOp
from .onnx_ops import HANDLERS

__all__ = ["MAX_OPSET", "MIN_OPSET", "OnnxImportError", "UnsupportedOnnxOp", "load_onnx"]

MIN_OPSET = 9
MAX_OPSET = 21
Source = Union[str, os.PathLike, bytes, onnx.ModelProto]


def load_onnx(source: Source, *, input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """Import an ONNX model (a path, serialized bytes or a ``ModelProto``) as an eval-mode ``fx.GraphModule``.

    Shapes must be static: a symbolic batch dimension becomes 1, any other symbolic dimension needs
    ``input_shape`` ((C, H, W) or (N, C, H, W)) for the model's single input.
    """
    model = _read(source)
    opset = _opset(model)
    if isinstance(source, onnx.ModelProto):  # the caller's: fix shapes on a copy
        model = _copy(model)
    _fix_input_shape(model, input_shape)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several unrelated types here
        raise OnnxImportError(f"ONNX shape inference failed ({type(e).__name__}: {e}); "
                              f"check the model with onnx.checker.check_model") from e
    gm = Builder(model, opset, HANDLERS).build()
    return gm.eval()


def _read(source: Source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(source))
        except Exception as e:  # noqa: BLE001
            raise OnnxImportError(f"the bytes given are not a serialized ONNX ModelProto ({e})") from e
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise OnnxImportError(f"ONNX file {str(path)!r} does not exist")
        try:
            return onnx.load(str(path))  # external data beside the file is loaded too
        except Exception as e:  # noqa: BLE001
            raise OnnxImportError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    raise OnnxImportError(f"expected a path, bytes or onnx.ModelProto, got {type(source).__name__}")


def _opset(model: onnx.ModelProto) -> int:
    versions = {o.domain: int(o.version) for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise OnnxImportError(f"the model imports no default-domain opset (imports: {versions})")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxImportError(
            f"opset {opset} is outside the opsets this importer knows ({MIN_OPSET} to {MAX_OPSET}); "
            f"export again with opset_version in that range or convert with "
            f"onnx.version_converter.convert_version(model, {MAX_OPSET})")
    return opset


def _fix_input_shape(model: onnx.ModelProto, input_shape: Sequence[int] | None) -> None:
    """Make the graph inputs' shapes static, in place: symbolic batch -> 1, the rest from ``input_shape``."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        want = list(input_shape) if input_shape is not None else None
        if want is not None:
            if len(inputs) != 1:
                raise OnnxImportError(f"input_shape is for single-input models; this one has {len(inputs)} inputs")
            if len(want) == len(dims) - 1:
                want = [1, *want]
            if len(want) != len(dims):
                raise OnnxImportError(f"input_shape {tuple(input_shape)} does not fit input '{vi.name}' "
                                      f"of rank {len(dims)}")
        for k, d in enumerate(dims):
            if want is not None:
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != want[k] and k > 0:
                    raise OnnxImportError(f"input '{vi.name}' has fixed dim {k} = {d.dim_value}, "
                                          f"input_shape says {want[k]}")
                d.ClearField("dim_param")
                d.dim_value = int(want[k])
            elif not (d.HasField("dim_value") and d.dim_value > 0):
                if k != 0:
                    raise OnnxImportError(
                        f"input '{vi.name}' has a symbolic dimension {k} ({d.dim_param or '?'}); pass "
                        f"input_shape=(C, H, W) to fix it (plans are made for one input size)")
                d.ClearField("dim_param")
                d.dim_value = 1


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


