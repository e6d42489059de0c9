"""``tiling.load_model`` for each file kind, and ``load_images`` for PNG/JPEG frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiling
from tiling.sources import ImageError, ModelFileError


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(16, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.c1(x)), inplace=True)
        b = torch.cat([a, F.interpolate(F.max_pool2d(a, 2), scale_factor=2.0)], 1)
        y = F.hardtanh(self.c2(b) + 0.5, 0.0, 6.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = Small().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m, torch.randn(1, 3, 16, 16)


def _exact_and_fused(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> tiling.Plan:
    plan = tiling.partition(model, x, grid=(2, 2))
    with torch.no_grad():
        assert tiling.rel_error(plan.run(x), ref(x)) <= 1e-4
    native = tiling.partition(ref, x, grid=(2, 2))
    assert len(plan.layers) == len(native.layers)
    return plan


def test_torchscript_traced(tmp_path: Path, small: tuple[nn.Module, torch.Tensor]) -> None:
    m, x = small
    path = tmp_path / "small.pt"
    torch.jit.save(torch.jit.trace(m, x), str(path))
    loaded = tiling.load_model(path)
    assert isinstance(loaded, torch.fx.GraphModule)
    _exact_and_fused(loaded, m, x)


def test_torchscript_scripted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                      nn.Conv2d(8, 4, 3, padding=1), nn.Hardswish()).eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "seq.ts"
    torch.jit.save(torch.jit.script(m), str(path))
    _exact_and_fused(tiling.load_model(path), m, x)


def test_torchscript_control_flow_is_refused(tmp_path: Path, small: tuple[nn.Module, torch.Tensor]) -> None:
    m, _ = small
    path = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(m), str(path))  # F.interpolate keeps Python branches when scripted
    with pytest.raises(tiling.TilingError, match="torch.jit.trace"):
        tiling.load_model(path)


def test_onnx_file(tmp_path: Path, small: tuple[nn.Module, torch.Tensor]) -> None:
    from onnx_helpers import export  # skips this test alone when onnx/onnxruntime are absent

    m, x = small
    path = tmp_path / "small.onnx"
    path.write_bytes(export(m, x, 17))
    _exact_and_fused(tiling.load_model(path), m, x)
    with pytest.raises(ModelFileError, match="carries its own weights"):
        tiling.load_model(path, weights=path)


def test_darknet_cfg_with_and_without_weights(tmp_path: Path) -> None:
    from tiling.sources.darknet import save_darknet_weights
    from tiling.sources.zoo import yolov2_cfg

    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(yolov2_cfg(32, 32, layers=4))
    m = tiling.load_model(cfg)
    wpath = tmp_path / "tiny.weights"
    save_darknet_weights(m, wpath)
    m2 = tiling.load_model(cfg, weights=wpath)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_pickled_module_needs_trust(tmp_path: Path, small: tuple[nn.Module, torch.Tensor]) -> None:
    m, x = small
    path = tmp_path / "whole.pth"
    torch.save(m, path)
    with pytest.raises(ModelFileError, match="trust=True.*torch.jit.save"):
        tiling.load_model(path)
    loaded = tiling.load_model(path, trust=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_state_dict_is_weights_not_a_model(tmp_path: Path, small: tuple[nn.Module, torch.Tensor]) -> None:
    m, x = small
    sd = tmp_path / "sd.pt"
    torch.save(m.state_dict(), sd)
    with pytest.raises(ModelFileError, match="weights without an architecture"):
        tiling.load_model(sd)
    ts = tmp_path / "fresh.pt"
    torch.manual_seed(1)
    torch.jit.save(torch.jit.trace(Small().eval(), x), str(ts))
    loaded = tiling.load_model(ts, weights=sd)  # a TorchScript architecture, weights from a state dict
    with torch.no_grad():
        assert tiling.rel_error(loaded(x), m(x)) <= 1e-5


def test_unknown_kind_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"unknown model file kind '.h5'.*\.onnx.*\.cfg.*\.pt"):
        tiling.load_model(bad)
    with pytest.raises(ModelFileError, match="does not exist"):
        tiling.load_model(tmp_path / "missing.onnx")


def test_load_images(tmp_path: Path) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    a = g.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "b.png")
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(a[:, :, 0]).save(tmp_path / "c.png")  # grey becomes RGB
    (tmp_path / "notes.txt").write_text("ignored")
    frames = tiling.load_images(tmp_path)
    assert [f.shape for f in frames] == [(3, 10, 12)] * 3 and all(f.dtype == torch.uint8 for f in frames)
    assert torch.equal(frames[1], torch.from_numpy(a).permute(2, 0, 1))  # sorted by name: a.jpg, b.png, c.png
    assert torch.equal(frames[2][0], frames[2][1])
    assert tiling.load_images(tmp_path / "b.png", size=(5, 6))[0].shape == (3, 5, 6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png.*PNG and JPEG"):
        tiling.load_images(tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        tiling.load_images(tmp_path / "nope.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="holds no"):
        tiling.load_images(empty)
