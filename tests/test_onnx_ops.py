"""ONNX edge cases built by hand with ``onnx.helper``: each compared with onnxruntime, untiled and tiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_helpers import check, example, helper, make, run_ort, weights

import tiling
from tiling.sources.onnx import OnnxImportError, UnsupportedOnnxOp

X = (1, 3, 13, 11)  # odd sizes: SAME padding and ceil_mode windows differ from the even case


def _conv(name: str = "c", x: str = "x", y: str = "y", w: str = "w", **attrs: object) -> object:
    return helper.make_node("Conv", [x, w], [y], name=name, **attrs)


@pytest.mark.parametrize("attrs", [
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(pads=[2, 1, 2, 1], dilations=[2, 2]),  # onnxruntime refuses dilation with SAME
    dict(auto_pad="VALID"),
    dict(pads=[0, 1, 2, 0]),  # asymmetric: an explicit pad joins the conv's layer
    dict(pads=[1, 1, 1, 1], group=3),
], ids=["same_upper_s2", "same_lower_s2", "dilated", "valid", "asym", "groups"])
def test_conv_padding(attrs: dict) -> None:
    cin = 1 if attrs.get("group") == 3 else 3
    wshape = (6, cin, 4, 3) if "group" not in attrs else (6, cin, 3, 3)
    model = make([_conv(**attrs), helper.make_node("Relu", ["y"], ["z"])], X, outputs=["z"],
                 inits=[("w", weights(*wshape))])
    _, plan = check(model, example(*X))
    assert plan.stop is None and len(plan.layers) == 1


def test_batch_norm_and_activations() -> None:
    c = 4
    g = np.random.default_rng(1)
    nodes = [
        _conv(y="a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("LeakyRelu", ["bn"], ["l"], alpha=0.1),
        helper.make_node("HardSigmoid", ["l"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("HardSwish", ["bn"], ["hw"]),
        helper.make_node("Mul", ["hs", "k"], ["m1"]),  # broadcast per-channel initializer
        helper.make_node("Sub", ["m1", "hw"], ["s1"]),
        helper.make_node("Div", ["s1", "two"], ["d1"]),
        helper.make_node("Sigmoid", ["d1"], ["y"]),
    ]
    inits = [("w", weights(c, 3, 3, 3)), ("s", g.uniform(0.5, 1.5, c).astype(np.float32)),
             ("b", g.standard_normal(c).astype(np.float32)), ("m", g.standard_normal(c).astype(np.float32)),
             ("v", g.uniform(0.5, 2, c).astype(np.float32)), ("k", g.standard_normal((c, 1, 1)).astype(np.float32)),
             ("two", np.array(2.0, np.float32))]
    _, plan = check(make(nodes, X, opset=15, inits=inits), example(*X))
    assert plan.stop is None


@pytest.mark.parametrize("opset", [10, 13])
def test_clip_bounds_as_attributes_or_inputs(opset: int) -> None:
    if opset < 11:
        clip = helper.make_node("Clip", ["a"], ["y"], min=-0.5, max=0.7)
        inits = [("w", weights(4, 3, 3, 3))]
    else:
        clip = helper.make_node("Clip", ["a", "lo", ""], ["y"])  # only a lower bound
        inits = [("w", weights(4, 3, 3, 3)), ("lo", np.array(-0.25, np.float32))]
    model = make([_conv(y="a", pads=[1, 1, 1, 1]), clip], X, opset=opset, inits=inits)
    _, plan = check(model, example(*X))
    assert plan.stop is None


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 0, 2, 2], dilations=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER")),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 2, 0], count_include_pad=1)),
], ids=["max_ceil", "max_ceil_pad", "max_same", "max_dil_asym", "avg_ceil", "avg_ceil_incl", "avg_same_lower",
        "avg_asym_incl"])
def test_pools(op: str, attrs: dict) -> None:
    opset = 19 if attrs.get("dilations") else 13
    nodes = [_conv(y="a", pads=[1, 1, 1, 1]), helper.make_node(op, ["a"], ["y"], name="pool", **attrs)]
    _, plan = check(make(nodes, X, opset=opset, inits=[("w", weights(4, 3, 3, 3))]), example(*X))
    assert plan.stop is None  # average pools PyTorch cannot express natively fuse as sum / count pools


@pytest.mark.parametrize("form", ["scales", "sizes", "half_pixel_x3", "upsample9", "resize10", "non_integer"])
def test_resize_forms(form: str) -> None:
    opset, inits, extra = 13, [("w", weights(4, 3, 3, 3))], {}
    if form == "scales":
        ins = ["a", "", "sc"]
        inits.append(("sc", np.array([1, 1, 2, 2], np.float32)))
        extra = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif form == "sizes":
        ins = ["a", "", "", "sz"]
        inits.append(("sz", np.array([1, 4, 26, 22], np.int64)))
    elif form == "half_pixel_x3":
        ins = ["a", "", "sc"]
        inits.append(("sc", np.array([1, 1, 3, 3], np.float32)))
    elif form == "non_integer":  # not local: an exact gather that ends fusion
        ins = ["a", "", "", "sz"]
        inits.append(("sz", np.array([1, 4, 20, 15], np.int64)))
    else:
        opset = 9 if form == "upsample9" else 10
        ins = ["a", "sc"]
        inits.append(("sc", np.array([1, 1, 2, 3], np.float32)))
    op = "Upsample" if form == "upsample9" else "Resize"
    nodes = [_conv(y="a", pads=[1, 1, 1, 1]), helper.make_node(op, ins, ["r"], **extra),
             _conv(name="c2", x="r", w="w2", pads=[1, 1, 1, 1])]
    inits.append(("w2", weights(2, 4, 3, 3)))
    _, plan = check(make(nodes, X, opset=opset, inits=inits), example(*X))
    assert (plan.stop is None) == (form != "non_integer")


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_forms_and_concat(opset: int) -> None:
    if opset == 11:
        split = helper.make_node("Split", ["a"], ["p", "q"], axis=1, split=[2, 4])
        inits: list = []
    elif opset == 13:
        split = helper.make_node("Split", ["a", "sp"], ["p", "q"], axis=1)
        inits = [("sp", np.array([2, 4], np.int64))]
    else:
        split = helper.make_node("Split", ["a"], ["p", "q"], axis=1, num_outputs=2)
        inits = []
    nodes = [_conv(y="a", pads=[1, 1, 1, 1]), split, helper.make_node("Relu", ["q"], ["rq"]),
             helper.make_node("Concat", ["rq", "p"], ["y"], axis=-3)]
    _, plan = check(make(nodes, X, opset=opset, inits=[("w", weights(6, 3, 3, 3)), *inits]), example(*X))
    assert plan.stop is None


def test_pad_slice_and_classifier_tail() -> None:
    """Pad (input form), channel Slice, then the tail: ReduceMean (axes input), Flatten, Gemm, Softmax."""
    nodes = [
        helper.make_node("Pad", ["x", "pads", "val"], ["px"], mode="constant"),
        _conv(x="px", y="a"),
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["s"]),
        helper.make_node("ReduceMean", ["s", "rax"], ["m"], keepdims=1),
        helper.make_node("Flatten", ["m"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1, alpha=0.5),
        helper.make_node("Softmax", ["g"], ["y"], axis=-1),
    ]
    inits = [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64)), ("val", np.array(0.5, np.float32)),
             ("w", weights(6, 3, 3, 3)), ("st", np.array([1], np.int64)), ("en", np.array([5], np.int64)),
             ("ax", np.array([1], np.int64)), ("rax", np.array([2, 3], np.int64)), ("gw", weights(7, 4)),
             ("gb", weights(7))]
    _, plan = check(make(nodes, X, opset=18, inits=inits), example(*X))
    assert plan.stop is not None and "mean" in str(plan.stop)


def test_shape_arithmetic_folds_to_a_plain_reshape() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (what exporters emit) folds into one reshape."""
    nodes = [
        _conv(y="a", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["a"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["a", "target"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0]),
    ]
    inits = [("w", weights(4, 3, 3, 3)), ("zero", np.array(0, np.int64)), ("ax0", np.array([0], np.int64)),
             ("minus1", np.array([-1], np.int64))]
    model = make(nodes, X, inits=inits)
    gm = tiling.load_onnx(model)
    ops = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops == ["reshape", "permute"], ops
    x2 = example(2, *X[1:], seed=3)
    assert tiling.rel_error(gm(x2), torch.stack([gm(x2[i:i + 1])[:, 0] for i in range(2)], 1)) <= 1e-6
    check(model, example(*X))


def test_conv_transpose_is_exact_and_ends_fusion() -> None:
    nodes = [_conv(y="a", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["a", "wt"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1],
                              output_padding=[1, 0])]
    _, plan = check(make(nodes, X, opset=13, inits=[("w", weights(4, 3, 3, 3)), ("wt", weights(4, 2, 3, 3))]),
                    example(*X))
    assert plan.stop is not None and "ConvTranspose2d" in str(plan.stop)


def test_unsupported_op_names_type_node_and_opset() -> None:
    nodes = [_conv(y="a", pads=[1, 1, 1, 1]), helper.make_node("LpNormalization", ["a"], ["y"], name="norm7")]
    model = make(nodes, X, opset=13, inits=[("w", weights(4, 3, 3, 3))])
    with pytest.raises(UnsupportedOnnxOp, match=r"LpNormalization.*'norm7'.*opset 13"):
        tiling.load_onnx(model)


def test_bad_sources_and_opsets(tmp_path: object) -> None:
    with pytest.raises(OnnxImportError, match="does not exist"):
        tiling.load_onnx("/nonexistent/model.onnx")
    with pytest.raises(OnnxImportError, match="not a serialized ONNX"):
        tiling.load_onnx(b"\x00garbage\xff" * 3)
    old = make([helper.make_node("Relu", ["x"], ["y"])], X, opset=8)
    with pytest.raises(OnnxImportError, match="opset 8 is outside"):
        tiling.load_onnx(old)


def test_symbolic_dims_need_input_shape() -> None:
    model = make([_conv(pads=[1, 1, 1, 1])], ["N", 3, "H", "W"], inits=[("w", weights(4, 3, 3, 3))])
    with pytest.raises(OnnxImportError, match="input_shape"):
        tiling.load_onnx(model)
    gm = tiling.load_onnx(model, input_shape=(3, 13, 11))
    x = example(*X)
    assert tiling.rel_error(gm(x), run_ort(model, x)[0]) <= 1e-5
