"""Helpers for the ONNX importer tests: export, run with onnxruntime, build graphs by hand, compare."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import tiling

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TOL = 1e-4


def export(model: nn.Module, x: torch.Tensor, opset: int, dynamo: bool = False) -> bytes:
    """ONNX bytes of ``model`` from the TorchScript exporter (``dynamo=False``) or the dynamo one."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            prog = torch.onnx.export(model.eval(), (x,), dynamo=True, opset_version=opset, verbose=False)
            assert prog is not None
            prog.save(f)
        else:
            torch.onnx.export(model.eval(), (x,), f, opset_version=opset, dynamo=False)
    return f.getvalue()


def run_ort(model: bytes | Any, x: torch.Tensor) -> list[torch.Tensor]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return [torch.from_numpy(np.asarray(o)) for o in outs]


def check(model: bytes | Any, x: torch.Tensor, grids: Sequence[tuple[int, int]] = ((2, 2), (3, 3)),
          **kw: Any) -> tuple[float, tiling.Plan]:
    """Import, run untiled and tiled, compare with onnxruntime; returns the largest error and the last plan."""
    gm = tiling.load_onnx(model)
    refs = run_ort(model, x)
    ref: Any = refs[0] if len(refs) == 1 else tuple(refs)
    with torch.no_grad():
        got = gm(x)
    worst = tiling.rel_error(got, ref)
    assert worst <= TOL, f"untiled import differs from onnxruntime: {worst:.3g}"
    plan = None
    for grid in grids:
        plan = tiling.partition(gm, x, grid=grid, **kw)
        err = tiling.rel_error(plan.run(x), ref)
        assert err <= TOL, f"tiled {grid} differs from onnxruntime: {err:.3g}"
        worst = max(worst, err)
    assert plan is not None
    return worst, plan


def make(nodes: Sequence[Any], x_shape: Sequence[int], out_shape: Sequence[int] | None = None, opset: int = 13,
         inits: Sequence[tuple[str, np.ndarray]] = (), outputs: Sequence[str] = ("y",)) -> Any:
    """A one-input float model built with ``onnx.helper`` (output shapes left to inference)."""
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(out_shape) if out_shape else None) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)
    onnx.checker.check_model(model, full_check=False) if out_shape else None
    return model


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (g.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def example(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
