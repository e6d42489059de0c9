"""Bad frames on a real emulated Ray deployment (one Ray instance for the module): every refused
frame is a typed ``tiling.InputMismatch`` whose message says what was wrong and what is accepted;
frames of other dtypes, strides, layouts and array types are accepted and exact; and after each
case the deployment serves the next good frame with the untiled model's result (issue #10, "Bad
input"; docs/errors.md). Cases that need no cluster are in test_bad_input_pure.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fleet
import tiling

pytestmark = pytest.mark.ray

C, H, W = 3, 24, 24
SHAPE = f"({C}, {H}, {W}) or (N, {C}, {H}, {W})"
TOL = 1e-4
PRE = "none,scale=1/255,mean=0.5/0.5/0.5,std=0.25/0.25/0.25"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)).eval()


MODEL = _model()


def frame(seed: int = 1, n: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if n is None else (n,)), C, H, W, generator=g)


def untiled(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(x.unsqueeze(0) if x.dim() == 3 else x)


@pytest.fixture(scope="module")
def cluster() -> Iterator[fleet.Cluster]:
    with fleet.connect(emulate="pi3*2", max_in_flight=2) as c:
        yield c


@pytest.fixture(scope="module")
def dep(cluster: fleet.Cluster) -> fleet.Deployment:
    return cluster.deploy(MODEL, frame(0, 1), grid=(2, 2))


@pytest.fixture(scope="module")
def dep_u8(cluster: fleet.Cluster) -> fleet.Deployment:
    """A deployment that declares preprocessing: raw uint8 frames in."""
    return cluster.deploy(MODEL, torch.zeros(1, C, H, W, dtype=torch.uint8), grid=(2, 2), preprocess=PRE)


def serves(dep: fleet.Deployment, seed: int = 7) -> None:
    """The next good frame gets the untiled model's result."""
    x = frame(seed)
    y = dep(x, timeout=60)
    assert y.shape == untiled(x).shape[1:] and tiling.rel_error(y, untiled(x)[0]) <= TOL


def refused(dep: fleet.Deployment, x: Any, *fragments: str) -> None:
    with pytest.raises(tiling.InputMismatch) as e:
        dep(x, timeout=60)
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in {str(e.value)!r}"
    assert isinstance(e.value, ValueError)
    serves(dep)


# --------------------------------------------------------------------------------------------------
# refused frames
# --------------------------------------------------------------------------------------------------


def _nan() -> torch.Tensor:
    x = frame()
    x[1, 2, 3] = float("nan")
    return x


def _inf_in_second_frame() -> torch.Tensor:
    x = frame(n=3)
    x[1, 0, 0, :2] = float("inf")
    return x


def _sparse() -> torch.Tensor:
    return frame(n=1).to_sparse()


REFUSED: dict[str, tuple[Callable[[], Any], list[str]]] = {
    # rank, channels, spatial size
    "rank-2": (lambda: torch.randn(H, W), [SHAPE, "got a 2-D tensor of shape (24, 24)"]),
    "rank-5": (lambda: torch.randn(1, 1, C, H, W), [SHAPE, "got a 5-D tensor"]),
    "scalar": (lambda: torch.tensor(1.0), [SHAPE, "got a 0-D tensor"]),
    "channels": (lambda: torch.randn(4, H, W), ["fixed to (C, H, W) = (3, 24, 24), got (4, 24, 24)",
                                                "partition again: cluster.deploy(model, an_example_of_that_size)"]),
    "spatial": (lambda: torch.randn(2, C, H, W + 8), ["fixed to (C, H, W) = (3, 24, 24), got (3, 24, 32)"]),
    # NaN and Inf are refused: they would spread through every overlapping tile
    "nan": (_nan, ["frame 0 holds 1 NaN and 0 Inf values", "frames must be finite", "torch.nan_to_num"]),
    "inf-in-batch": (_inf_in_second_frame, ["frame 1 of the batch holds 0 NaN and 2 Inf values", "finite"]),
    "float64-overflow": (lambda: frame().double() * 1e300, ["torch.float64 frame holds values up to",
                                                            "beyond torch.float32's range", "scale it"]),
    # dtypes without preprocessing
    "uint8-without-preprocess": (lambda: torch.zeros(C, H, W, dtype=torch.uint8),
                                 ["uint8 frames need a declared preprocessing", "preprocess=", "or send float frames"]),
    "bool": (lambda: frame() > 0, ["floating-point dtype (float16, bfloat16, float32, float64", "got torch.bool",
                                   "x.float()"]),
    "complex": (lambda: torch.complex(frame(), frame(2)), ["floating-point dtype", "got torch.complex64", "x.real"]),
    "int64": (lambda: torch.ones(C, H, W, dtype=torch.int64), ["floating-point dtype", "got torch.int64",
                                                               "uint8, with preprocess= at deploy"]),
    "int16-numpy": (lambda: np.ones((C, H, W), np.int16), ["floating-point dtype", "got torch.int16"]),
    # empty inputs
    "empty-batch": (lambda: torch.empty(0, C, H, W), ["the batch is empty (shape (0, 3, 24, 24))",
                                                     "send at least one frame", SHAPE]),
    "zero-height": (lambda: torch.empty(C, 0, W), ["got (3, 0, 24) (an empty frame)"]),
    "zero-width": (lambda: torch.empty(1, C, H, 0), ["got (3, 24, 0) (an empty frame)"]),
    # not arrays, or arrays of no numbers
    "none": (lambda: None, [SHAPE, "torch tensors or numpy arrays; got NoneType"]),
    "string": (lambda: "frame.png", [SHAPE, "got str"]),
    "list-of-strings": (lambda: ["a.png", "b.png"], ["got list", "torch.stack(frames)", "dep.stream(frames)"]),
    "dict": (lambda: {"image": frame()}, [SHAPE, "got dict"]),
    "numpy-strings": (lambda: np.array(["a", "b"]), ["got a numpy array of dtype <U1 (not numbers)"]),
    "numpy-objects": (lambda: np.empty((C, H, W), dtype=object), ["numpy array of dtype object (not numbers)"]),
    "sparse": (_sparse, ["dense", "got a torch.sparse_coo tensor", "x.to_dense()"]),
    "meta": (lambda: torch.empty(C, H, W, device="meta"), ["on the meta device, which holds no values"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_frame_is_refused_and_serving_continues(dep: fleet.Deployment, case: str) -> None:
    make, fragments = REFUSED[case]
    refused(dep, make(), *fragments)


def test_float_frame_to_a_uint8_deployment_is_refused(dep_u8: fleet.Deployment) -> None:
    with pytest.raises(tiling.InputMismatch) as e:
        dep_u8(frame())
    assert "takes raw uint8 frames (CHW, 0-255)" in str(e.value) and "got torch.float32" in str(e.value)
    u8 = torch.randint(0, 256, (C, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ref = tiling.with_preprocess(MODEL, tiling.Preprocess.parse(PRE))(u8.unsqueeze(0))[0]
    assert tiling.rel_error(dep_u8(u8), ref) <= TOL  # the uint8 deployment serves on


# --------------------------------------------------------------------------------------------------
# accepted frames: converted, or taken as they are, and exact
# --------------------------------------------------------------------------------------------------


def _channels_last() -> torch.Tensor:
    return frame(n=2).contiguous(memory_format=torch.channels_last)


def _strided() -> torch.Tensor:
    big = torch.randn(2, C + 2, 2 * H, W + 5)
    return big[:, 1:C + 1, ::2, 5:]  # non-contiguous view: channel, row-step and column offsets


def _numpy_chw_view() -> np.ndarray:
    hwc = np.ascontiguousarray(frame(4).permute(1, 2, 0).numpy())
    return hwc.transpose(2, 0, 1)  # a (C, H, W) view of an HWC buffer: non-contiguous


def _numpy_readonly() -> np.ndarray:
    a = np.frombuffer(frame(5).numpy().tobytes(), dtype=np.float32).reshape(C, H, W)
    assert not a.flags.writeable
    return a


ACCEPTED: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.Tensor]]] = {
    # (frame, what it means as a float32 tensor)
    "float16": (lambda: frame().half(), lambda x: x.float()),
    "bfloat16": (lambda: frame().bfloat16(), lambda x: x.float()),
    "float64": (lambda: frame().double(), lambda x: x.float()),
    "non-contiguous": (_strided, lambda x: x.contiguous()),
    "transposed": (lambda: frame().transpose(1, 2), lambda x: x.contiguous()),
    "channels-last": (_channels_last, lambda x: x.contiguous()),
    "requires-grad": (lambda: frame().requires_grad_(), lambda x: x.detach()),
    "numpy-float32": (lambda: frame(n=2).numpy(), torch.from_numpy),
    "numpy-float64": (lambda: frame().double().numpy(), lambda a: torch.from_numpy(a).float()),
    "numpy-non-contiguous": (_numpy_chw_view, lambda a: torch.from_numpy(np.ascontiguousarray(a))),
    "numpy-big-endian": (lambda: frame().numpy().astype(">f4"), lambda a: torch.from_numpy(a.astype("<f4"))),
    "numpy-read-only": (_numpy_readonly, lambda a: torch.from_numpy(a.copy())),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_frame_is_accepted_and_exact(dep: fleet.Deployment, case: str) -> None:
    make, meaning = ACCEPTED[case]
    x = make()
    ref = untiled(meaning(x))
    y = dep(x, timeout=60)
    if np.ndim(x) == 3:
        ref = ref[0]
    assert y.shape == ref.shape and tiling.rel_error(y, ref) <= TOL
    serves(dep)


def test_uint8_frames_accepted_where_preprocessing_is_declared(dep_u8: fleet.Deployment) -> None:
    g = torch.Generator().manual_seed(9)
    u8 = torch.randint(0, 256, (2, C, H, W), dtype=torch.uint8, generator=g)
    ref = tiling.with_preprocess(MODEL, tiling.Preprocess.parse(PRE))(u8)
    assert tiling.rel_error(dep_u8(u8), ref) <= TOL
    assert tiling.rel_error(dep_u8(u8.numpy()[0]), ref[0]) <= TOL  # a numpy frame too


# --------------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------------


def test_empty_stream_returns_nothing(dep: fleet.Deployment) -> None:
    assert list(dep.stream([])) == []
    assert list(dep.stream(iter(()))) == []
    serves(dep)


class CameraUnplugged(RuntimeError):
    pass


def test_stream_whose_source_raises_midway_delivers_earlier_frames_then_raises(dep: fleet.Deployment) -> None:
    frames = [frame(20 + i) for i in range(3)]

    def source() -> Iterator[torch.Tensor]:
        yield from frames
        raise CameraUnplugged("camera unplugged")

    got: list[torch.Tensor] = []
    with pytest.raises(CameraUnplugged, match="camera unplugged"):
        for y in dep.stream(source(), in_flight=2):
            got.append(y)
    assert len(got) == 3  # every frame sent before the error is delivered, in order
    for x, y in zip(frames, got):
        assert tiling.rel_error(y, untiled(x)[0]) <= TOL
    serves(dep)


def test_stream_with_a_bad_frame_midway_delivers_earlier_frames_then_refuses(dep: fleet.Deployment) -> None:
    good = [frame(30), frame(31)]
    got: list[torch.Tensor] = []
    with pytest.raises(tiling.InputMismatch, match=r"got \(3, 12, 12\)"):
        for y in dep.stream([*good, torch.randn(C, 12, 12), frame(32)], in_flight=4):
            got.append(y)
    assert len(got) == 2 and all(tiling.rel_error(y, untiled(x)[0]) <= TOL for x, y in zip(good, got))
    serves(dep)


@pytest.mark.parametrize(("frames", "fragments"), [
    (None, ["stream() takes an iterable of frames", "got NoneType"]),
    (3, ["an iterable of frames (a list, a generator, an (N, C, H, W) batch)", "got int"]),
    (torch.randn(C, H, W), ["got one (3, 24, 24) frame", "pass [frame]"]),
], ids=["none", "int", "one-frame"])
def test_stream_of_something_that_is_not_frames(dep: fleet.Deployment, frames: Any, fragments: list[str]) -> None:
    with pytest.raises(tiling.InputMismatch) as e:
        list(dep.stream(frames))
    for f in fragments:
        assert f in str(e.value)
    serves(dep)


def test_a_batch_streams_frame_by_frame(dep: fleet.Deployment) -> None:
    batch = frame(40, n=3)
    outs = list(dep.stream(batch))
    assert len(outs) == 3 and all(tiling.rel_error(y, untiled(x)[0]) <= TOL for x, y in zip(batch, outs))
