"""Model zoo: every entry builds, runs, traces with fx, and has the published size and cost."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiling import zoo
from tiling.sources.darknet import load_darknet, parse_cfg

YOLOV2_CFG = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "yolov2.cfg"

# name -> (small input size, output shape at that size, output shape at the default size)
SMALL = {
    "yolov2-16": (64, (1, 256, 4, 4), (1, 256, 38, 38)),
    "yolov2": (64, (1, 425, 2, 2), (1, 425, 19, 19)),
    "vgg16": (64, (1, 1000), (1, 1000)),
    "resnet18": (64, (1, 1000), (1, 1000)),
    "mobilenetv2": (96, (1, 1000), (1, 1000)),
}
CHEAP_AT_DEFAULT = ("resnet18", "mobilenetv2")  # the YOLOs at 608 are checked on the meta device


@functools.cache
def _built(name: str, size: int | None = None, seed: int = 0) -> zoo.ZooModel:
    """Builds are the slow part (VGG-16 alone is 138 M parameters), so each is made once per session."""
    return zoo.get(name, input_size=size, seed=seed)


def _check_runs(zm: zoo.ZooModel, shape: tuple[int, ...]) -> None:
    x = zoo.example(zm)
    assert x.shape == (1, *zm.input_shape)
    gm = torch.fx.symbolic_trace(zm.model)
    with torch.no_grad():
        y, y_fx = zm.model(x), gm(x)
    assert tuple(y.shape) == shape
    assert torch.isfinite(y).all()
    assert 1e-2 < float(y.std()) < 1e2  # calibrated random weights: neither vanishing nor exploding
    assert torch.equal(y, y_fx)


def test_names() -> None:
    assert set(zoo.names()) == set(SMALL)


@pytest.mark.parametrize("name", list(SMALL))
def test_builds_runs_and_traces_small(name: str) -> None:
    size, shape, _ = SMALL[name]
    zm = _built(name, size)
    assert zm.name == name and zm.input_shape == (3, size, size)
    assert zm.description and zm.source
    assert not zm.model.training
    _check_runs(zm, shape)


def test_weights_do_not_depend_on_input_size() -> None:
    small, full = _built("resnet18", 64), zoo.get("resnet18")
    assert full.input_shape == (3, 224, 224)
    for (k, a), b in zip(small.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", CHEAP_AT_DEFAULT)
def test_runs_at_default_size(name: str) -> None:
    # Weights do not depend on input_size (above), so the small build stands in for the default one.
    default = (3, 608, 608) if name.startswith("yolo") else (3, 224, 224)
    zm = dataclasses.replace(_built(name, SMALL[name][0]), input_shape=default)
    _check_runs(zm, SMALL[name][2])


def test_seed_controls_weights() -> None:
    a, b, c = zoo.get("yolov2-16", input_size=32, seed=5), zoo.get("yolov2-16", input_size=32, seed=5), _built("yolov2-16", 64)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.model.layers[0].conv.weight, c.model.layers[0].conv.weight)


def _flops(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[dict[str, int], tuple[int, ...]]:
    """FLOPs per aten op and the output shape, on the meta device (shapes only: VGG at 224 costs nothing)."""
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = meta(torch.empty(1, *shape, device="meta"))
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}, tuple(y.shape)


def test_yolov2_16_cost_and_size() -> None:
    zm = _built("yolov2-16", 64)
    flops, out = _flops(zm.model, (3, 608, 608))  # the model is size-agnostic; DeepThings' workload is 608
    assert out == SMALL["yolov2-16"][2]
    assert abs(sum(flops.values()) / 1e9 - 26.0) < 0.05
    tensors = [*zm.model.parameters(), *(b for b in zm.model.buffers() if b.is_floating_point())]
    mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    assert abs(mib - 13.1) < 0.05


def test_vgg16_conv_macs() -> None:
    zm = _built("vgg16", 64)
    flops, out = _flops(zm.model, (3, 224, 224))
    assert out == (1, 1000)
    conv_macs = sum(n for op, n in flops.items() if "convolution" in op) / 2
    assert abs(conv_macs / 1e9 - 15.35) < 0.01
    convs = [m for m in zm.model.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in zm.model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    linears = [m for m in zm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(pools), len(linears)) == (13, 5, 3)


def test_architecture_counts() -> None:
    resnet = _built("resnet18", 64).model
    convs = [m for m in resnet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20  # stem + 16 in blocks + 3 downsample 1x1
    assert sum(p.numel() for p in resnet.parameters()) == 11_689_512  # the paper's ResNet-18 count
    mobilenet = _built("mobilenetv2", 96).model
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    depthwise = [m for m in mobilenet.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_yolov2_matches_the_real_cfg() -> None:
    if not YOLOV2_CFG.is_file():
        pytest.skip(f"{YOLOV2_CFG} is absent (the shared models folder is not checked out next to the repo)")
    real = load_darknet(YOLOV2_CFG, calibration_size=64)
    ours = _built("yolov2", 64).model
    assert ours.layer_names == real.layer_names
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in real.parameters()]
    # Every option the generated cfg sets has the real cfg's value (anchors compared as numbers).
    real_sections = parse_cfg(YOLOV2_CFG.read_text())
    our_sections = parse_cfg(zoo.yolov2_cfg())
    assert [s.name for s in our_sections] == [s.name for s in real_sections]
    for mine, theirs in zip(our_sections, real_sections):
        for key, value in mine.options.items():
            if key == "anchors":
                assert mine.get_floats(key) == theirs.get_floats(key)
            else:
                assert theirs.options.get(key) == value, (mine.where(key), key)


def test_errors() -> None:
    with pytest.raises(KeyError) as e:
        zoo.get("resnet1000")
    assert "resnet1000" in str(e.value) and "mobilenetv2" in str(e.value) and "yolov2-16" in str(e.value)
    with pytest.raises(KeyError):
        zoo.example("nope")
    with pytest.raises(ValueError, match="multiple of 32"):
        zoo.get("yolov2", input_size=100)
    with pytest.raises(ValueError, match=">= 32"):
        zoo.get("resnet18", input_size=(16, 64))


def test_example_and_frozen_record() -> None:
    x = zoo.example("resnet18", batch=2, seed=3)
    assert x.shape == (2, 3, 224, 224)
    assert torch.equal(x, zoo.example("resnet18", batch=2, seed=3))
    assert not torch.equal(x, zoo.example("resnet18", batch=2, seed=4))
    zm = _built("resnet18", 64)
    assert zoo.example(zm).shape == (1, 3, 64, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        zm.name = "other"  # type: ignore[misc]


def test_yolov2_full_size_shape_and_cost() -> None:
    flops, out = _flops(_built("yolov2", 64).model, (3, 608, 608))
    assert out == SMALL["yolov2"][2]
    assert abs(sum(flops.values()) / 1e9 - 62.94) < 0.05  # the BFLOPs Darknet's site lists for YOLOv2 608
