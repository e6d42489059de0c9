"""Preprocessing inside the model: uint8 frames cross the network, the first stage normalises its own crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiling
from tiling import Preprocess, PreprocessError, with_preprocess
from tiling.preprocess import PRESETS


@pytest.fixture(scope="module")
def yolo() -> torch.nn.Module:
    return tiling.zoo.get("yolov2-16", input_size=32).model


def _frames(n: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ["imagenet", "darknet", "none", "imagenet,order=bgr"])
def test_tiled_uint8_plan_equals_float_model(yolo: torch.nn.Module, spec: str) -> None:
    pre = Preprocess.parse(spec)
    x = _frames()
    plan = tiling.partition(with_preprocess(yolo, pre), x, grid=(2, 2))
    with torch.no_grad():
        ref = yolo(pre.apply_float(x))
    got = plan.run(x)
    assert got.dtype == torch.float32 and tiling.rel_error(got, ref) <= 1e-4
    float_plan = tiling.partition(yolo, pre.apply_float(x), grid=(2, 2))
    assert len(plan.layers) == len(float_plan.layers) and plan.stop is None
    first = plan.stages[0]
    assert {"mul"} <= set(first.nodes)  # the conversion runs inside the first stage
    for t, f in zip(first.tiles, float_plan.stages[0].tiles):
        assert t.in_bytes * 4 == f.in_bytes  # one byte per value on the wire
        assert t.out_bytes == f.out_bytes


def test_uint8_plan_refuses_float_frames(yolo: torch.nn.Module) -> None:
    x = _frames()
    plan = tiling.partition(with_preprocess(yolo, "darknet"), x, grid=(2, 2))
    with pytest.raises(tiling.InputMismatch, match="raw uint8 frames"):
        plan.run(x.float() / 255)


def test_bgr_swaps_channels() -> None:
    x = _frames(h=4, w=4)
    rgb, bgr = Preprocess.parse("darknet"), Preprocess.parse("darknet,order=bgr")
    assert torch.equal(bgr.apply_float(x), rgb.apply_float(x).flip(1))


def test_presets_and_parsing() -> None:
    assert Preprocess.parse("imagenet") == PRESETS["imagenet"]
    assert Preprocess.parse("darknet").scale == pytest.approx(1 / 255) and PRESETS["darknet"].mean is None
    p = Preprocess.parse("none,scale=1/255,mean=0.5/0.5/0.5,std=0.25/0.25/0.25,layout=hwc,order=bgr")
    assert (p.scale, p.mean, p.std, p.layout, p.order) == (1 / 255, (0.5,) * 3, (0.25,) * 3, "hwc", "bgr")
    d = Preprocess.from_dict({"preset": "imagenet", "layout": "hwc"})
    assert d.mean == PRESETS["imagenet"].mean and d.layout == "hwc"
    assert Preprocess.from_dict(d.to_dict()).to_dict() == d.to_dict()


@pytest.mark.parametrize("bad,match", [
    ("imagenett", "unknown preprocessing preset"),
    ("imagenet,bgr", "key=value"),
    ({"preset": "none", "colour": "rgb"}, "unknown preprocessing keys"),
    ("none,layout=whc", "layout must be one of"),
    ("none,order=gbr", "order must be one of"),
    ("none,scale=0", "scale must be"),
    ("none,scale=abc", "fraction like 1/255"),
    ("none,mean=0.5/0.5,std=1/1/1", "mean has 2 channels but std has 3"),
    ("none,std=0/1/1", "std must be positive"),
])
def test_parse_errors(bad: object, match: str) -> None:
    with pytest.raises(PreprocessError, match=match):
        Preprocess.parse(bad)  # type: ignore[arg-type]


def test_to_nchw_is_declared_not_guessed() -> None:
    hwc = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    x = Preprocess.parse("imagenet,layout=hwc").to_nchw(hwc)
    assert x.shape == (1, 3, 4, 5) and x.dtype == torch.uint8 and x[0, 2, 1, 3] == hwc[1, 3, 2]
    chw = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    assert Preprocess.parse("imagenet").to_nchw(chw).shape == (2, 3, 4, 5)
    assert Preprocess.parse("imagenet,layout=hwc").to_nchw([hwc, hwc]).shape == (2, 3, 4, 5)
    with pytest.raises(PreprocessError, match="3 channels|5 channels"):
        Preprocess.parse("imagenet,layout=hwc").to_nchw(torch.zeros(3, 4, 5, dtype=torch.uint8))
    with pytest.raises(PreprocessError, match="uint8"):
        Preprocess.parse("imagenet").to_nchw(torch.zeros(3, 4, 5))
