"""The CUDA path of the tile executor (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiling
from tiling import zoo
from workers.executor import TileExecutor, TileResult

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_tiles_on_cuda_equal_cpu_reference() -> None:
    zm = zoo.get("yolov2-16", input_size=160)
    x = zoo.example(zm)
    plan = tiling.partition(zm.model, x, grid=(3, 3))
    ex = TileExecutor(threads=1, prefer_cuda=True)
    assert ex.device.type == "cuda" and not torch.backends.cuda.matmul.allow_tf32
    ex.load("d", {0: plan.stages[0].program})
    st = plan.stages[0]
    (out,) = st.outputs
    full = np.zeros((1, *st.shapes[out]), np.float32)
    for t in st.tiles:
        b = t.in_box
        r = ex.run("d", 0, t.geometry, {plan.input_name: x.numpy()[:, :, b.h0:b.h1, b.w0:b.w1]})
        assert isinstance(r, TileResult) and r.device == "cuda"
        o = t.out_box
        full[:, :, o.h0:o.h1, o.w0:o.w1] = r.outputs[out]
    assert tiling.rel_error(torch.from_numpy(full), zm.model(x)) <= 1e-4


def test_cpu_chosen_when_cuda_is_absent_or_not_wanted() -> None:
    ex = TileExecutor(threads=1, prefer_cuda=False)
    assert ex.device.type == "cpu"
