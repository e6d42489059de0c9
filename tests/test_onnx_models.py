"""ONNX import of whole models: exported torch models and Darknet YOLOv2, untiled and tiled, against onnxruntime.

Also checks that fusion reaches as far in the imported model as in the native one: the importer
emits the same torch ops (``nn.Conv2d``, ``F.relu``, ``operator.add``, ``torch.cat`` ...).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from onnx_helpers import check, example, export
from torch import Tensor, nn

import tiling
from tiling import zoo


class Residual(nn.Module):
    """Residual adds, a depthwise conv, an SE gate (mean + sigmoid + mul), concat, upsample, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.down = nn.Conv2d(16, 8, 3, 2, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = F.hardswish(self.pw(F.leaky_relu(self.dw(x), 0.1))) + x
        g = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y * g
        z = torch.cat([y, F.interpolate(F.max_pool2d(y, 2), scale_factor=2.0, mode="nearest")], 1)
        z = F.relu6(self.down(z))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class Local(nn.Module):
    """Everything local: the whole model is one fused stage (no SE gate, no classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.c1(x))
        b = F.avg_pool2d(torch.sigmoid(self.c2(a)) * a - a / 2, 3, 2, 1, count_include_pad=False)
        c = torch.cat([F.interpolate(b, scale_factor=2.0, mode="nearest"), a], 1)
        return F.hardsigmoid(self.c3(c))


@functools.cache
def _exported(name: str, opset: int, dynamo: bool, size: int) -> tuple[bytes, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = {"residual": Residual, "local": Local}[name]().eval() if name in ("residual", "local") else \
        zoo.get(name, input_size=size).model
    if name == "vgg16":
        model = model.features  # the 400 MB classifier adds nothing the others do not test
    x = example(1, 3, size, size)
    return export(model, x, opset, dynamo), model, x


CASES = [  # (model, opset, dynamo exporter); each exporter and opset meets residuals, depthwise, SE, concat, upsample
    ("residual", 11, False), ("residual", 17, False), ("residual", 18, True),
    ("local", 13, False), ("local", 18, True),
    ("resnet18", 13, False), ("mobilenetv2", 11, False), ("yolov2-16", 17, False),
]
SIZES = {"residual": 32, "local": 24, "resnet18": 64, "mobilenetv2": 64, "yolov2-16": 64}
GRIDS = {"resnet18": ((2, 2),), "mobilenetv2": ((2, 2),)}  # fused outputs are 2x2 at 64


@pytest.mark.parametrize("name,opset,dynamo", CASES, ids=[f"{n}-op{o}-{'dynamo' if d else 'ts'}" for n, o, d in CASES])
def test_exported_models_match_onnxruntime_tiled(name: str, opset: int, dynamo: bool) -> None:
    data, model, x = _exported(name, opset, dynamo, SIZES[name])
    err, plan = check(data, x, GRIDS.get(name, ((2, 2), (3, 3))))
    native = tiling.partition(model, x, grid=(2, 2))
    # fusion reaches as far: same number of fused layers, same stages, same fused output shape
    assert len(plan.layers) == len(native.layers), (plan.layers, native.layers)
    assert len(plan.stages) == len(native.stages)
    assert [s.shapes[s.reference] for s in plan.stages] == [s.shapes[s.reference] for s in native.stages]
    assert (plan.stop is None) == (native.stop is None)


def test_batch_stays_free() -> None:
    data, model, x = _exported("residual", 17, False, 32)
    gm = tiling.load_onnx(data)
    xb = example(3, 3, 32, 32, seed=1)
    plan = tiling.partition(gm, x, grid=(2, 2))
    with torch.no_grad():
        assert tiling.rel_error(plan.run(xb), model(xb)) <= 1e-4


def _yolo_cfg(shared_dir: object, size: int) -> str:
    from pathlib import Path

    path = Path(str(shared_dir)) / "models" / "yolov2.cfg"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the DeepThings YOLOv2 cfg lives in ../shared/models)")
    text = path.read_text()
    text = re.sub(r"(?m)^width=\d+", f"width={size}", text, count=1)
    return re.sub(r"(?m)^height=\d+", f"height={size}", text, count=1)


def test_darknet_yolov2_roundtrip(shared_dir: object) -> None:
    """YOLOv2 from the shared cfg, exported at 96x96 and imported back: layers 0-15 tiled equal onnxruntime."""
    model = tiling.load_darknet(_yolo_cfg(shared_dir, 96), calibration_size=96)
    x = example(1, 3, 96, 96)
    data = export(model, x, 13)
    err, plan = check(data, x, grids=((2, 2),), upto=16)
    assert len(plan.layers) == 16 and plan.stages[0].shapes[plan.stages[0].reference] == (256, 6, 6)
    native = tiling.partition(model, x, grid=(2, 2))
    full = tiling.partition(tiling.load_onnx(data), x, grid=(2, 2))
    assert len(full.layers) == len(native.layers)
