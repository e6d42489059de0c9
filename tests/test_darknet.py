"""Darknet importer: cfg parsing, Darknet's layer arithmetic, .weights layout, fx traceability, errors."""

from __future__ import annotations

import copy
import math
import operator
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tiling.sources.darknet import (
    DarknetError,
    DarknetWeightsWarning,
    load_darknet,
    load_darknet_weights,
    parse_cfg,
    save_darknet_weights,
)
from tiling.sources.darknet_layers import DarknetMaxPool, Reorg

YOLOV2_CFG = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "yolov2.cfg"


def _trace_equal(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """fx traces the model and the traced module computes the same thing, bit for bit."""
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        want, got = model(x), gm(x)
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    else:
        assert torch.equal(want, got)
    return gm


def _all(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.forward_all(x)


# --------------------------------------------------------------------------------------------------
# The real yolov2.cfg
# --------------------------------------------------------------------------------------------------

# Darknet's printout for yolov2.cfg at 608: (kind, C, H, W) per layer.
_YOLOV2_EXPECTED = [
    ("convolutional", 32, 608), ("maxpool", 32, 304), ("convolutional", 64, 304), ("maxpool", 64, 152),
    ("convolutional", 128, 152), ("convolutional", 64, 152), ("convolutional", 128, 152), ("maxpool", 128, 76),
    ("convolutional", 256, 76), ("convolutional", 128, 76), ("convolutional", 256, 76), ("maxpool", 256, 38),
    ("convolutional", 512, 38), ("convolutional", 256, 38), ("convolutional", 512, 38),
    ("convolutional", 256, 38), ("convolutional", 512, 38), ("maxpool", 512, 19),
    ("convolutional", 1024, 19), ("convolutional", 512, 19), ("convolutional", 1024, 19),
    ("convolutional", 512, 19), ("convolutional", 1024, 19), ("convolutional", 1024, 19),
    ("convolutional", 1024, 19), ("route", 512, 38), ("convolutional", 64, 38), ("reorg", 256, 19),
    ("route", 1280, 19), ("convolutional", 1024, 19), ("convolutional", 425, 19), ("region", 425, 19),
]


@pytest.fixture(scope="module")
def yolov2() -> torch.nn.Module:
    if not YOLOV2_CFG.is_file():
        pytest.skip(f"{YOLOV2_CFG} is absent (the shared models folder is not checked out next to the repo)")
    return load_darknet(YOLOV2_CFG)


def test_yolov2_cfg_layers_and_shapes(yolov2: torch.nn.Module) -> None:
    assert yolov2.input_shape == (3, 608, 608)
    assert len(yolov2.layers) == len(yolov2.layer_names) == 32
    assert [n.rsplit("_", 1)[0] for n in yolov2.layer_names] == [k for k, _, _ in _YOLOV2_EXPECTED]
    expected = [(c, s, s) for _, c, s in _YOLOV2_EXPECTED]
    assert yolov2.layer_shapes == expected
    assert yolov2.layer_shapes[15] == (256, 38, 38)
    # The modules agree with the planned shapes at full size (on the meta device: shapes only, no FLOPs).
    meta = copy.deepcopy(yolov2).to("meta")
    outs = _all(meta, torch.empty(1, 3, 608, 608, device="meta"))
    assert [tuple(o.shape[1:]) for o in outs] == expected
    assert tuple(meta(torch.empty(2, 3, 608, 608, device="meta")).shape) == (2, 425, 19, 19)


def test_yolov2_cfg_forward_and_fx(yolov2: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))  # any multiple of 32 runs
    gm = _trace_equal(yolov2, x)
    with torch.no_grad():
        y = yolov2(x)
    assert y.shape == (1, 425, 5, 5) and torch.isfinite(y).all()
    heads = y.reshape(1, 5, 85, 5, 5)
    assert torch.allclose(heads[:, :, 5:].sum(dim=2), torch.ones(1, 5, 5, 5), atol=1e-5)  # class softmax
    logistic = heads[:, :, [0, 1, 4]]
    assert ((logistic >= 0) & (logistic <= 1)).all() and 0.05 < float(logistic.std()) < 0.45  # x, y, obj
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {"layers.0.conv", "layers.0.bn", "layers.0.act", "layers.30.conv"} <= targets
    assert "layers.30.act" not in targets  # linear activation leaves no node
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert functions.count(F.pad) == 5 and functions.count(F.max_pool2d) == 5


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def test_parse_tolerates_spaces_comments_and_paths(tmp_path: Path) -> None:
    text = """# a comment
[net]
 width = 8
height=8   # inline comment
channels =3
saturation = 1.5
; another comment

[convolutional]
filters = 4
size=3
pad=1
activation = leaky
batch_normalize=1
filters=99
"""
    sections = parse_cfg(text)
    assert [s.name for s in sections] == ["net", "convolutional"]
    assert sections[0].options["width"] == "8" and sections[0].options["saturation"] == "1.5"
    assert sections[1].options["filters"] == "4"  # first occurrence wins, as in Darknet
    path = tmp_path / "tiny.cfg"
    path.write_text(text)
    for cfg in (text, path, str(path)):
        m = load_darknet(cfg)
        assert m.input_shape == (3, 8, 8) and m.layer_shapes == [(4, 8, 8)]
        assert not m.training


def test_seed_reproducible() -> None:
    cfg = "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=4\nsize=3\npad=1\nbatch_normalize=1\n"
    a, b, c = load_darknet(cfg, seed=3), load_darknet(cfg, seed=3), load_darknet(cfg, seed=4)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.layers[0].conv.weight, c.layers[0].conv.weight)


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


def test_maxpool_size2_stride1_pads_bottom_right_with_minus_inf() -> None:
    m = load_darknet("[net]\nwidth=3\nheight=3\nchannels=1\n[maxpool]\nsize=2\nstride=1\n")
    assert m.layer_shapes == [(1, 3, 3)]
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0], [7.0, -8.0, -9.0]]).reshape(1, 1, 3, 3)
    # Window (i, j) covers rows i..i+1, cols j..j+1, clipped at the bottom/right; hand-computed:
    expected = torch.tensor([[5.0, 5.0, 3.0], [7.0, 5.0, -6.0], [7.0, -8.0, -9.0]]).reshape(1, 1, 3, 3)
    with torch.no_grad():
        assert torch.equal(m(x), expected)  # zero padding would give 0 at (1,2), (2,1), (2,2)
    assert m.layers[0].pad == (0, 1, 0, 1)


def test_maxpool_size2_stride2_shapes_follow_darknet() -> None:
    for n, out in ((38, 19), (19, 10), (5, 3)):  # (w + 1 - 2) // 2 + 1 = ceil(w / 2)
        m = load_darknet(f"[net]\nwidth={n}\nheight={n}\nchannels=1\n[maxpool]\nsize=2\nstride=2\n")
        assert m.layer_shapes == [(1, out, out)]
        with torch.no_grad():
            assert m(torch.randn(1, 1, n, n)).shape == (1, 1, out, out)


def _darknet_maxpool_reference(x: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """Direct transcription of Darknet's rule: windows at -padding//2 + i*stride, -inf outside the image."""
    n, c, h, w = x.shape
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    out = torch.empty(n, c, oh, ow)
    off = -(padding // 2)
    for i in range(oh):
        for j in range(ow):
            rows = [r for r in range(off + i * stride, off + i * stride + size) if 0 <= r < h]
            cols = [q for q in range(off + j * stride, off + j * stride + size) if 0 <= q < w]
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].amax(dim=(2, 3))
    return out


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 4),
    stride=st.integers(1, 3),
    pad_frac=st.integers(0, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
)
def test_maxpool_matches_darknet_windows(size: int, stride: int, pad_frac: int, h: int, w: int) -> None:
    padding = min(pad_frac, size - 1)  # Darknet's default is size - 1
    assume(h + padding >= size and w + padding >= size)  # Darknet needs at least one window
    x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    got = DarknetMaxPool(size, stride, padding)(x)
    assert torch.equal(got, _darknet_maxpool_reference(x, size, stride, padding))


# --------------------------------------------------------------------------------------------------
# Reorg
# --------------------------------------------------------------------------------------------------


def _reorg_reference(flat: list[float], c: int, h: int, w: int, batch: int, s: int, forward: bool) -> list[float]:
    """Darknet's reorg index rule, written out element by element from its definition.

    Element (b, k, j, i) of a (c, h, w) buffer is paired with element (b, k mod c', j*s + d div s,
    i*s + d mod s) of the same buffer viewed as (c', h*s, w*s), where c' = c / s² and d = k div c'.
    Darknet's layer (forward=0) reads the second into the first; forward=1 writes the first into the second.
    """
    cq = c // (s * s)
    out = [math.nan] * len(flat)
    for b in range(batch):
        for k in range(c):
            d = k // cq
            for j in range(h):
                for i in range(w):
                    a = ((b * c + k) * h + j) * w + i
                    z = ((b * cq + k % cq) * (h * s) + j * s + d // s) * (w * s) + i * s + d % s
                    if forward:
                        out[z] = flat[a]
                    else:
                        out[a] = flat[z]
    return out


@pytest.mark.parametrize("shape", [(2, 8, 4, 6), (1, 4, 2, 2), (1, 64, 38, 38)])
def test_reorg_matches_darknet_index_rule(shape: tuple[int, int, int, int]) -> None:
    n, c, h, w = shape
    x = torch.arange(n * c * h * w, dtype=torch.float32).reshape(shape)
    ref = _reorg_reference(x.flatten().tolist(), c, h, w, n, 2, forward=False)
    got = Reorg(2)(x)
    assert got.shape == (n, c * 4, h // 2, w // 2)
    assert got.flatten().tolist() == ref
    # It is not space-to-depth (which AlexeyAB's fork computes instead).
    assert not torch.equal(got, F.pixel_unshuffle(x, 2))


def test_reorg_reverse_matches_darknet_index_rule() -> None:
    n, c, h, w = 2, 8, 3, 5
    x = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    ref = _reorg_reference(x.flatten().tolist(), c, h, w, n, 2, forward=True)
    got = Reorg(2, reverse=True)(x)
    assert got.shape == (n, c // 4, h * 2, w * 2)
    assert got.flatten().tolist() == ref


# --------------------------------------------------------------------------------------------------
# Small networks written in the tests
# --------------------------------------------------------------------------------------------------

TINY_YOLOV2 = """
[net]
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
batch_normalize=1
filters=16
size=3
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=32
size=3
pad=1
activation=leaky

[route]
layers=-3

[convolutional]
batch_normalize=1
filters=4
size=1
activation=leaky

[reorg]
stride=2

[route]
layers=-1,-4

[convolutional]
filters=16
size=1
activation=linear

[region]
anchors=1,1,2,2
classes=3
coords=4
num=2
softmax=1
"""


def test_tiny_yolov2() -> None:
    m = load_darknet(TINY_YOLOV2)
    assert m.layer_shapes == [
        (8, 16, 16), (8, 8, 8), (16, 8, 8), (16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4),
        (16, 8, 8), (4, 8, 8), (16, 4, 4), (48, 4, 4), (16, 4, 4), (16, 4, 4),
    ]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outs = _all(m, x)
    assert [tuple(o.shape[1:]) for o in outs] == m.layer_shapes
    # maxpool size=2 stride=1: -inf on the bottom/right only
    a = outs[2]
    for i in range(8):
        for j in range(8):
            assert torch.equal(outs[3][:, :, i, j], a[:, :, i : i + 2, j : j + 2].amax(dim=(2, 3)))
    assert torch.equal(outs[7], outs[4])
    assert torch.equal(outs[9], Reorg(2)(outs[8]))
    assert torch.equal(outs[10], torch.cat([outs[9], outs[6]], dim=1))
    raw, y = outs[11].reshape(2, 2, 8, 4, 4), outs[12].reshape(2, 2, 8, 4, 4)
    assert torch.allclose(y[:, :, [0, 1, 4]], torch.sigmoid(raw[:, :, [0, 1, 4]]))
    assert torch.equal(y[:, :, 2:4], raw[:, :, 2:4])
    assert torch.allclose(y[:, :, 5:], torch.softmax(raw[:, :, 5:], dim=2))
    assert m.layers[12].anchors == (1.0, 1.0, 2.0, 2.0)
    _trace_equal(m, x)


YOLOV3_LIKE = """
[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[shortcut]
from=-3
activation=linear

[convolutional]
batch_normalize=1
filters=32
size=3
stride=2
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 3,4,5
anchors = 10,13, 16,30, 33,23, 30,61, 62,45, 59,119
classes=2
num=6

[route]
layers = -3

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

[upsample]
stride=2

[route]
layers = -1, 4

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=mish

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 0,1,2
anchors = 10,13, 16,30, 33,23, 30,61, 62,45, 59,119
classes=2
num=6
"""


def test_yolov3_like_returns_tuple_of_heads() -> None:
    m = load_darknet(YOLOV3_LIKE)
    assert m.output_indices == (7, 14)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(x)
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [(1, 21, 8, 8), (1, 21, 16, 16)]
    outs = _all(m, x)
    assert torch.equal(outs[4], outs[3] + outs[1])  # shortcut from=-3
    assert torch.equal(outs[8], outs[5])
    assert torch.equal(outs[10], outs[9].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.equal(outs[11], torch.cat([outs[10], outs[4]], dim=1))
    for head, raw in ((outs[7], outs[6]), (outs[14], outs[13])):
        h, r = head.reshape(1, 3, 7, *head.shape[2:]), raw.reshape(1, 3, 7, *raw.shape[2:])
        assert torch.equal(h[:, :, 2:4], r[:, :, 2:4])
        keep = [0, 1, 4, 5, 6]
        assert torch.allclose(h[:, :, keep], torch.sigmoid(r[:, :, keep]))
    assert m.layers[7].anchors == (30.0, 61.0, 62.0, 45.0, 59.0, 119.0)
    assert torch.equal(out[0], outs[7]) and torch.equal(out[1], outs[14])
    _trace_equal(m, x)


def test_route_groups_take_channel_slices() -> None:
    cfg = """
[net]
width=8
height=8
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
pad=1
activation=leaky
[route]
layers=-1
groups=2
group_id=1
[convolutional]
batch_normalize=1
filters=6
size=1
activation=relu
[route]
layers=0,2
groups=2
group_id=0
[convolutional]
filters=7
size=3
pad=1
groups=7
activation=logistic
"""
    m = load_darknet(cfg)
    assert m.layer_shapes == [(8, 8, 8), (4, 8, 8), (6, 8, 8), (7, 8, 8), (7, 8, 8)]
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = _all(m, x)
    assert torch.equal(outs[1], outs[0][:, 4:8])
    assert torch.equal(outs[3], torch.cat([outs[0][:, 0:4], outs[2][:, 0:3]], dim=1))
    gm = _trace_equal(m, x)
    slices = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem]
    assert len(slices) == 3  # x[:, a:b] on the channel axis, one per routed input


def test_classifier_sections() -> None:
    cfg = """
[net]
width=8
height=8
channels=3
[convolutional]
filters=10
size=3
pad=1
activation=relu
[maxpool]
size=2
stride=2
[dropout]
probability=.5
[avgpool]
[softmax]
groups=1
[cost]
type=sse
"""
    m = load_darknet(cfg)
    assert m.layer_shapes[-1] == (10, 1, 1)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x)
    assert y.shape == (3, 10, 1, 1)
    assert torch.allclose(y.sum(dim=1), torch.ones(3, 1, 1))
    _trace_equal(m, x)


# --------------------------------------------------------------------------------------------------
# .weights files, built byte by byte here
# --------------------------------------------------------------------------------------------------

WEIGHTS_CFG = """
[net]
width=6
height=6
channels=2
[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky
[convolutional]
filters=3
size=1
activation=linear
[convolutional]
batch_normalize=1
filters=6
size=1
groups=3
activation=linear
"""
# (in_channels, filters, size, groups, batch_normalize) of the three convs above
_WEIGHTS_LAYERS = [(2, 4, 3, 1, True), (4, 3, 1, 1, False), (3, 6, 1, 3, True)]


def _weights_bytes(version: tuple[int, int, int], seen: int) -> tuple[bytes, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(7)
    header = struct.pack("<3i", *version)
    header += struct.pack("<q", seen) if version[0] * 10 + version[1] >= 2 else struct.pack("<i", seen)
    body, layers = [], []
    for c, n, k, g, bn in _WEIGHTS_LAYERS:
        rec = {"biases": rng.normal(size=n).astype("<f4")}
        if bn:
            rec["scales"] = rng.normal(1, 0.2, size=n).astype("<f4")
            rec["mean"] = rng.normal(size=n).astype("<f4")
            var = rng.uniform(0.5, 2.0, size=n)
            var[0] = 1e-9  # sqrt(var) ~ 3e-5: there the +1e-6 of Darknet's formula shows
            rec["var"] = var.astype("<f4")
        rec["weights"] = rng.normal(size=n * (c // g) * k * k).astype("<f4")
        for key in ("biases", "scales", "mean", "var", "weights"):
            if key in rec:
                body.append(rec[key].tobytes())
        layers.append(rec)
    return header + b"".join(body), layers


@pytest.mark.parametrize(("version", "header_len"), [((0, 2, 0), 20), ((0, 1, 0), 16), ((1, 0, 5), 20)])
def test_weights_reader(tmp_path: Path, version: tuple[int, int, int], header_len: int) -> None:
    data, layers = _weights_bytes(version, seen=123456)
    assert len(data) == header_len + 4 * sum(
        n * (4 if bn else 1) + n * (c // g) * k * k for c, n, k, g, bn in _WEIGHTS_LAYERS
    )
    path = tmp_path / "w.weights"
    path.write_bytes(data)
    m = load_darknet(WEIGHTS_CFG, weights=path)
    header = load_darknet_weights(load_darknet(WEIGHTS_CFG), data)
    assert (header.major, header.minor, header.revision, header.seen) == (*version, 123456)

    for block, rec, (c, n, k, g, bn) in zip(m.layers, layers, _WEIGHTS_LAYERS):
        assert torch.equal(block.conv.weight, torch.from_numpy(rec["weights"].astype(np.float32)).reshape(n, c // g, k, k))
        if bn:
            assert block.conv.bias is None and block.bn.eps == 0.0
            assert torch.equal(block.bn.weight, torch.from_numpy(rec["scales"].astype(np.float32)))
            assert torch.equal(block.bn.bias, torch.from_numpy(rec["biases"].astype(np.float32)))
            assert torch.equal(block.bn.running_mean, torch.from_numpy(rec["mean"].astype(np.float32)))
        else:
            assert torch.equal(block.conv.bias, torch.from_numpy(rec["biases"].astype(np.float32)))

    # Batch norm reproduces Darknet's (x - mean) / (sqrt(var) + 1e-6) * scale + bias.
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    rec = layers[0]
    as64 = {key: torch.from_numpy(rec[key].astype(np.float64))[:, None, None] for key in ("scales", "mean", "var", "biases")}
    want = (x.double() - as64["mean"]) / (as64["var"].sqrt() + 1e-6) * as64["scales"] + as64["biases"]
    with torch.no_grad():
        got = m.layers[0].bn(x)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # The +1e-6 matters for the tiny variance (channel 0): eps inside the sqrt would be 3 % off.
    wrong = (x.double() - as64["mean"]) / (as64["var"] + 1e-6).sqrt() * as64["scales"] + as64["biases"]
    assert not torch.allclose(got.double()[:, 0], wrong[:, 0], rtol=1e-2)

    # Whole first layer: conv, Darknet BN, leaky 0.1.
    inp = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    w = torch.from_numpy(rec["weights"].astype(np.float64)).reshape(4, 2, 3, 3)
    z = F.conv2d(inp.double(), w, padding=1)
    z = (z - as64["mean"]) / (as64["var"].sqrt() + 1e-6) * as64["scales"] + as64["biases"]
    with torch.no_grad():
        assert torch.allclose(m.layers[0](inp).double(), F.leaky_relu(z, 0.1), rtol=1e-4, atol=1e-4)


def test_weights_round_trip(tmp_path: Path) -> None:
    data, _ = _weights_bytes((0, 2, 0), seen=5)
    src = tmp_path / "src.weights"
    src.write_bytes(data)
    m = load_darknet(WEIGHTS_CFG, weights=src)
    out = tmp_path / "out.weights"
    save_darknet_weights(m, out, seen=5)
    saved = out.read_bytes()
    assert len(saved) == len(data) and saved[:20] == data[:20]
    a, b = np.frombuffer(data[20:], "<f4"), np.frombuffer(saved[20:], "<f4")
    assert np.allclose(a, b, rtol=1e-5, atol=1e-12)
    # A random-weight model survives save -> load, including the old int32-seen header.
    r = load_darknet(TINY_YOLOV2, seed=11)
    for version in ((0, 2, 0), (0, 1, 0)):
        path = tmp_path / f"tiny{version[1]}.weights"
        save_darknet_weights(r, path, version=version)
        r2 = load_darknet(TINY_YOLOV2, weights=path)
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(r(x), r2(x), rtol=1e-5, atol=1e-6)
        for (k, v1), v2 in zip(r.state_dict().items(), r2.state_dict().values()):
            assert torch.allclose(v1.double(), v2.double(), rtol=1e-5, atol=1e-9), k


def test_weights_truncated_and_trailing(tmp_path: Path) -> None:
    data, _ = _weights_bytes((0, 2, 0), seen=0)
    with pytest.raises(DarknetError, match=rf"expected {len(data)} bytes .* found {len(data) - 4}"):
        load_darknet(WEIGHTS_CFG, weights=data[:-4])
    with pytest.raises(DarknetError, match="too short"):
        load_darknet(WEIGHTS_CFG, weights=data[:10])
    with pytest.warns(DarknetWeightsWarning, match="8 trailing bytes"):
        load_darknet(WEIGHTS_CFG, weights=data + b"\0" * 8)
    with pytest.raises(DarknetError, match="cannot read weights"):
        load_darknet(WEIGHTS_CFG, weights=tmp_path / "missing.weights")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

_NET = "[net]\nwidth=8\nheight=8\nchannels=3\n"


def test_unknown_section_names_index_line_and_accepted() -> None:
    cfg = _NET + "[convolutional]\nfilters=4\nsize=1\n[frobnicate]\nx=1\n"
    with pytest.raises(DarknetError) as e:
        load_darknet(cfg)
    msg = str(e.value)
    assert "layer 1 [frobnicate]" in msg and "line 8" in msg and "unknown" in msg and "[convolutional]" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(DarknetError, match=r"layer 0 \[connected\] at cfg line 5.*not supported"):
        load_darknet(_NET + "[connected]\noutput=10\n")


def test_missing_key_names_section_and_line() -> None:
    cfg = _NET + "\n[maxpool]\nsize=2\nstride=2\n\n[convolutional]\nsize=3\npad=1\n"
    with pytest.raises(DarknetError, match=r"layer 1 \[convolutional\] at cfg line 10: missing required key 'filters'"):
        load_darknet(cfg)
    with pytest.raises(DarknetError, match=r"section \[net\] at cfg line 1: missing required key 'channels'"):
        load_darknet("[net]\nwidth=8\nheight=8\n[maxpool]\n")


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("[route]\nlayers=-3\n", r"layer 1 \[route\] at cfg line 8 \(key 'layers' on line 9\): 'layers' refers to layer -3 -> -2"),
        ("[shortcut]\nfrom=5\n", r"layer 1 \[shortcut\].*does not exist"),
        ("[convolutional]\nfilters=2\nsize=1\nactivation=sparkly\n", r"unknown activation 'sparkly'; accepted: .*leaky"),
        ("[convolutional]\nfilters=2\nsize=x\n", r"'size=x' is not an integer"),
        ("[reorg]\nstride=3\n", r"\[reorg\].*stride"),
        ("[region]\nclasses=1\nnum=1\n", r"\[region\].*channels"),
        ("[convolutional]\nfilters=2\nsize=1\nxnor=1\n", r"'xnor=1' is not supported"),
    ],
)
def test_layer_errors(body: str, pattern: str) -> None:
    with pytest.raises(DarknetError, match=pattern):
        load_darknet(_NET + "[convolutional]\nfilters=4\nsize=1\n" + body)


def test_structural_errors(tmp_path: Path) -> None:
    with pytest.raises(DarknetError, match="first section must be"):
        load_darknet("[convolutional]\nfilters=1\nsize=1\n")
    with pytest.raises(DarknetError, match="not 'key=value'"):
        load_darknet(_NET + "[maxpool]\nsize 2\n")
    with pytest.raises(DarknetError, match="no layers"):
        load_darknet(_NET)
    with pytest.raises(DarknetError, match="cannot read cfg"):
        load_darknet(tmp_path / "missing.cfg")


def test_invalid_calibration_size() -> None:
    with pytest.raises(DarknetError, match=r"calibration_size \(6, 6\) is not a valid input size.*\[reorg\]"):
        load_darknet(TINY_YOLOV2, calibration_size=6)
