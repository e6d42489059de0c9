"""The serving layer's pure parts: protocol decoding/validation/encoding, repository configs, the
admission queue, access rules. No server, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleet.serving import protocol as P
from fleet.serving import repository as R
from fleet.serving.admission import Admission, Ticket
from fleet.serving.errors import ErrorKind, ServingError
from fleet.serving.rest import route_label
from fleet.serving.security import bearer_ok, bind_refusal, is_loopback

META = P.ModelMetadata("m", (P.TensorSpec("input", "FP32", (-1, 3, 4, 4)),),
                       (P.TensorSpec("output", "FP32", (-1, 8, 2, 2)),), max_batch=4)


def body(inputs: list[dict], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def fp32(shape: list[int], data: object = None) -> dict:
    n = int(np.prod(shape))
    return {"name": "input", "shape": shape, "datatype": "FP32", "data": data if data is not None else [0.5] * n}


def kind(fn: object, *a: object) -> ErrorKind:
    with pytest.raises(ServingError) as e:
        fn(*a)  # type: ignore[operator]
    return e.value.kind


# --- decoding ------------------------------------------------------------------------------------

def test_json_tensor_nested_or_flat() -> None:
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    for data in (x.tolist(), x.ravel().tolist()):
        req = P.decode_rest("m", "", body([fp32([1, 3, 4, 4], data)]))
        c = P.check_request(req, META)
        assert c.batch.dtype == np.float32 and np.array_equal(c.batch, x) and not c.single
        assert [o.name for o in c.outputs] == ["output"] and not c.outputs[0].binary


def test_binary_tensor_extension_round_trip() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    head = body([{"name": "input", "shape": [2, 3, 4, 4], "datatype": "FP32",
                  "parameters": {"binary_data_size": x.nbytes}}],
                outputs=[{"name": "output", "parameters": {"binary_data": True}}], id="r1")
    req = P.decode_rest("m", "1", head + x.tobytes(), str(len(head)))
    c = P.check_request(req, META)
    assert np.array_equal(c.batch, x) and c.outputs == [P.RequestedOutput("output", True)]
    y = np.ones((2, 8, 2, 2), np.float32)
    out, n = P.encode_rest(P.InferResponse("m", "1", "r1", [P.OutputTensor("output", "FP32", y.shape, y, True)]))
    assert n is not None
    doc = json.loads(out[:n])
    assert doc["id"] == "r1" and doc["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    assert np.array_equal(np.frombuffer(out[n:], np.float32).reshape(y.shape), y)


def test_json_response_when_not_binary() -> None:
    y = np.arange(4, dtype=np.float32).reshape(1, 4)
    out, n = P.encode_rest(P.InferResponse("m", "1", "", [P.OutputTensor("output", "FP32", y.shape, y)]))
    assert n is None and json.loads(out)["outputs"][0]["data"] == [0, 1, 2, 3]


def test_binary_data_output_parameter_makes_all_outputs_binary() -> None:
    req = P.decode_rest("m", "", body([fp32([3, 4, 4])], parameters={"binary_data_output": True, "timeout": 2_000_000}))
    c = P.check_request(req, META)
    assert c.single and c.batch.shape == (1, 3, 4, 4) and c.outputs[0].binary and req.timeout_s == 2.0


def test_fp16_and_fp64_are_converted() -> None:
    for dt, np_dt in (("FP16", np.float16), ("FP64", np.float64)):
        x = np.full((1, 3, 4, 4), 0.25, np_dt)
        head = body([{"name": "input", "shape": [1, 3, 4, 4], "datatype": dt, "parameters": {"binary_data_size": x.nbytes}}])
        c = P.check_request(P.decode_rest("m", "", head + x.tobytes(), str(len(head))), META)
        assert c.batch.dtype == np.float32 and np.all(c.batch == 0.25)


@pytest.mark.parametrize("raw,header,what", [
    (b"not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (body([]), None, "non-empty list"),
    (body([{"shape": [1], "datatype": "FP32", "data": [1]}]), None, "'name'"),
    (body([{"name": "input", "shape": [3, 4], "datatype": "BF16", "data": []}]), None, "not supported"),
    (body([{"name": "input", "shape": [1, "a"], "datatype": "FP32", "data": [1]}]), None, "list of integers"),
    (body([{"name": "input", "shape": [1, -3], "datatype": "FP32", "data": [1]}]), None, "negative"),
    (body([fp32([1, 3, 4, 4], [1.0] * 5)]), None, "has 5 values"),
    (body([fp32([1, 3, 4, 4], [["a"]])]), None, "not a (nested) list"),
    (body([{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32"}]), None, "neither 'data'"),
    (body([fp32([3, 4, 4])]) + b"xx", "5000", "only"),
    (body([fp32([3, 4, 4])]), "abc", "integer"),
    (body([fp32([3, 4, 4])], parameters={"timeout": -1}), None, "microseconds"),
    (body([fp32([3, 4, 4])], outputs=[{"name": "output", "parameters": {"classification": 3}}]), None, "classification"),
])
def test_malformed_requests_say_what_is_wrong(raw: bytes, header: str | None, what: str) -> None:
    with pytest.raises(ServingError) as e:
        P.decode_rest("m", "", raw, header)
    assert e.value.kind is ErrorKind.INVALID and what in str(e.value)


def test_binary_lengths_checked() -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    good = {"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    head = body([good])
    for tail, msg in ((x.tobytes()[:-4], "goes past the end"), (x.tobytes() + b"1234", "add up to")):
        with pytest.raises(ServingError, match=msg):
            P.decode_rest("m", "", head + tail, str(len(head)))
    bad = dict(good, parameters={"binary_data_size": 12})
    head = body([bad])
    with pytest.raises(ServingError, match="needs 192"):
        P.decode_rest("m", "", head + b"x" * 12, str(len(head)))


# --- validation against the model ----------------------------------------------------------------

@pytest.mark.parametrize("inputs,what", [
    ([fp32([1, 3, 5, 4])], "does not match"),
    ([fp32([3, 4])], "does not match"),
    ([fp32([5, 3, 4, 4])], "1 to 4"),
    ([fp32([0, 3, 4, 4], [])], "1 to 4"),
    ([dict(fp32([1, 3, 4, 4]), name="x")], "no input 'x'"),
    ([fp32([1, 3, 4, 4]), fp32([1, 3, 4, 4])], "more than once"),
    ([dict(fp32([1, 3, 4, 4]), datatype="INT32", data=[1] * 48)], "not accepted"),
    ([dict(fp32([1, 3, 4, 4]), datatype="UINT8", data=[1] * 48)], "UINT8 only for models that declare"),
    ([fp32([1, 3, 4, 4], [float("nan")] * 48)], "NaN"),
])
def test_requests_checked_against_metadata(inputs: list[dict], what: str) -> None:
    with pytest.raises(ServingError) as e:
        P.check_request(P.decode_rest("m", "", body(inputs)), META)
    assert e.value.kind is ErrorKind.INVALID and what in str(e.value)


def test_unknown_output_and_version() -> None:
    req = P.decode_rest("m", "", body([fp32([3, 4, 4])], outputs=[{"name": "logits"}]))
    with pytest.raises(ServingError, match="no output 'logits'; its outputs: output"):
        P.check_request(req, META)
    assert kind(P.check_request, P.decode_rest("m", "7", body([fp32([3, 4, 4])])), META) is ErrorKind.NOT_FOUND


def test_uint8_frames_go_to_a_preprocessing_deployment_when_declared() -> None:
    meta = P.ModelMetadata("m", META.inputs, META.outputs, uint8=True)
    head = body([{"name": "input", "shape": [4, 4, 3], "datatype": "UINT8", "data": [7] * 48}])
    c = P.check_request(P.decode_rest("m", "", head), meta)
    assert c.raw_uint8 and c.batch.dtype == np.uint8 and c.batch.shape == (4, 4, 3)
    pre = R.build_preprocess("darknet,layout=hwc")
    assert pre.layout == "hwc" and pre.scale == pytest.approx(1 / 255) and R.build_preprocess(None) is None
    with pytest.raises(R.ConfigError, match="preprocess"):
        R.build_preprocess("rgb8 / 255")


def test_error_kinds_map_to_both_transports() -> None:
    assert ErrorKind.INVALID.http_status == 400 and ErrorKind.INVALID.grpc_code == "INVALID_ARGUMENT"
    assert ErrorKind.TIMEOUT.http_status == 504 and ErrorKind.TIMEOUT.grpc_code == "DEADLINE_EXCEEDED"
    assert ErrorKind.TOO_LARGE.http_status == 413 and ErrorKind.UNAVAILABLE.http_status == 503
    assert json.loads(P.error_body("bad")) == {"error": "bad"}


# --- repository configs --------------------------------------------------------------------------

def test_config_parses_every_key(tmp_path: Path) -> None:
    (tmp_path / "tiny.cfg").write_text("[net]\n")
    text = """
source = "tiny.cfg"
priority = 5
max_batch = 2
preprocess = { layout = "HWC", scale = 255 }
[input]
name = "images"
shape = [3, 32, 48]
[deploy]
grid = "2X3"
stages = [4, 8]
mode = "throughput"
reuse = true
"""
    c = R.parse("det", text, tmp_path)
    assert c.source == str((tmp_path / "tiny.cfg").resolve()) and c.input_name == "images"
    assert c.input_shape == (3, 32, 48) and c.grid == "2x3" and c.stages == (4, 8) and c.priority == 5
    assert c.preprocess == {"layout": "HWC", "scale": 255}
    assert c.deploy_kwargs() == ((2, 3), {"mode": "throughput", "reuse": True, "stages": [4, 8]})
    assert R.parse("z", 'source = "vgg16"\ninput_size = 64').input_shape == (3, 64, 64)
    assert R.parse("z", 'source = "vgg16"').deploy_kwargs() == ("auto", {"mode": "latency"})


@pytest.mark.parametrize("text,what", [
    ("source = ", "not valid TOML"),
    ("gird = '5x5'\nsource = 'vgg16'", "unknown key gird; accepted:"),
    ("priority = 1", "'source' must name the model"),
    ("source = 'missing.cfg'", "does not exist"),
    ("source = 'vgg16'\n[deploy]\ngrid = 'five'", "ROWSxCOLS"),
    ("source = 'vgg16'\n[deploy]\nstages = [4]", "needs an explicit deploy.grid"),
    ("source = 'vgg16'\n[deploy]\nmode = 'fast'", "latency, throughput"),
    ("source = 'vgg16'\n[input]\nshape = [1, 3, 8, 8]", "[C, H, W]"),
    ("source = 'vgg16'\n[input]\ndatatype = 'UINT8'", "needs a 'preprocess'"),
    ("source = 'vgg16'\n[input]\ncolour = 1", "unknown key input.colour"),
    ("source = 'vgg16'\npreprocess = 3", "string or a table"),
    ("source = 'vgg16'\nmax_batch = 0", "max_batch must be an integer from 1"),
])
def test_bad_configs_say_what_is_accepted(tmp_path: Path, text: str, what: str) -> None:
    with pytest.raises(R.ConfigError) as e:
        R.parse("m", text, tmp_path)
    assert what in str(e.value)


def test_scan_keeps_broken_folders_with_their_reason(tmp_path: Path) -> None:
    for name, text in (("good", 'source = "vgg16"'), ("broken", "source = ")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(text)
    (tmp_path / "empty").mkdir()
    found = R.scan(tmp_path)
    assert isinstance(found["good"], R.ModelConfig)
    assert isinstance(found["broken"], R.ConfigError) and "not valid TOML" in str(found["broken"])
    assert isinstance(found["empty"], R.ConfigError) and "no config.toml" in str(found["empty"])
    assert R.from_dict("x", {"source": "vgg16", "deploy": {"grid": "2x2"}}, None).grid == "2x2"


def test_single_model_from_name_or_file(tmp_path: Path) -> None:
    assert R.single("yolov2-16").name == "yolov2-16"
    f = tmp_path / "net.cfg"
    f.write_text("[net]\n")
    assert R.single(str(f)).name == "net"
    with pytest.raises(R.ConfigError, match="does not exist"):
        R.single(str(tmp_path / "nope.cfg"))


# --- admission -----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_admission_fifo_across_models_within_capacity() -> None:
    a = Admission(capacity=2, clock=Clock())
    a.add_model("a", 2)
    a.add_model("b", 2)
    ts = [Ticket(m, 0, None) for m in "abab"]
    for t in ts:
        a.enqueue(t)
    first, _ = a.next()
    second, _ = a.next()
    assert (first, second) == (ts[0], ts[1]) and a.next() == (None, [])  # full
    a.done(first)
    assert a.next()[0] is ts[2]


def test_admission_priority_and_per_model_limit() -> None:
    a = Admission(capacity=3, clock=Clock())
    a.add_model("low", 3)
    a.add_model("high", 1)
    lows = [Ticket("low", 0, None) for _ in range(3)]
    highs = [Ticket("high", 10, None) for _ in range(2)]
    for t in lows + highs:
        a.enqueue(t)
    order = [a.next()[0] for _ in range(3)]
    assert order == [highs[0], lows[0], lows[1]]  # high first, but only 1 of it in flight
    a.done(highs[0])
    assert a.next()[0] is highs[1]


def test_admission_expires_and_abandons() -> None:
    clock = Clock()
    a = Admission(capacity=1, clock=clock)
    a.add_model("m", 1)
    running, waiting, late = Ticket("m", 0, 10.0), Ticket("m", 0, 5.0), Ticket("m", 0, 50.0)
    for t in (running, waiting, late):
        a.enqueue(t)
    assert a.next()[0] is running
    assert a.abandon(late) and late.state == "abandoned"
    clock.t = 6.0
    assert a.next() == (None, [waiting])  # past its deadline while the slot was busy
    assert not a.abandon(running) and a.in_flight == 1  # running: its slot frees when its frame leaves
    a.done(running)
    assert a.in_flight == 0 and a.waiting == 0


def test_admission_bounds_the_queue_and_unknown_models() -> None:
    a = Admission(capacity=1, max_queue=1, clock=Clock())
    a.add_model("m", 1)
    a.enqueue(Ticket("m", 0, None))
    assert kind(a.enqueue, Ticket("m", 0, None)) is ErrorKind.UNAVAILABLE
    assert kind(a.enqueue, Ticket("x", 0, None)) is ErrorKind.UNAVAILABLE
    dropped = a.remove_model("m")
    assert len(dropped) == 1 and dropped[0].state == "abandoned"


# --- access --------------------------------------------------------------------------------------

def test_bind_rules_and_bearer() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert bind_refusal("127.0.0.1", None, False) is None
    assert "--auth-token-file" in (bind_refusal("0.0.0.0", None, False) or "")
    assert bind_refusal("0.0.0.0", "t" * 20, False) is None and bind_refusal("0.0.0.0", None, True) is None
    assert bearer_ok(None, None) and bearer_ok("Bearer abc", "abc")
    assert not bearer_ok(None, "abc") and not bearer_ok("Bearer abd", "abc") and not bearer_ok("abc", "abc")


def test_route_labels_drop_names() -> None:
    assert route_label("/v2/models/yolo/versions/1/infer") == "/v2/models/{name}/versions/{version}/infer"
    assert route_label("/v2/repository/models/yolo/load") == "/v2/repository/models/{name}/load"
    assert route_label("/metrics") == "/metrics"


# --- load test schedules -------------------------------------------------------------------------

def test_open_loop_schedule_is_fixed_in_advance() -> None:
    from fleet.serving.loadtest import send_times

    assert send_times(4, 1.0) == [0.0, 0.25, 0.5, 0.75]
    p = send_times(50, 20.0, poisson=True, seed=3)
    assert p == send_times(50, 20.0, poisson=True, seed=3) and p == sorted(p) and max(p) < 20.0
    assert abs(len(p) / 20.0 - 50) < 5  # about the offered rate
    gaps = np.diff(p)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.15  # exponential gaps: coefficient of variation ~1
    with pytest.raises(ValueError):
        send_times(0, 1.0)


def test_latency_counts_from_the_scheduled_send() -> None:
    from fleet.serving.loadtest import Result, summarize

    # a server stalled for 1 s: requests scheduled during the stall all see it (no coordinated omission)
    res = [Result(0.0, 0.1, "ok"), Result(0.5, 1.6, "ok"), Result(1.0, 1.7, "ok"), Result(1.5, 1.8, "503")]
    s = summarize(res, 2.0, 2.0)
    assert s["sent"] == 4 and s["ok"] == 3 and s["errors"] == {"503": 1}
    assert s["max_ms"] == pytest.approx(1100) and s["p50_ms"] == pytest.approx(700)
    assert s["achieved_rps"] == pytest.approx(1.5)


# --- the commands' argument errors ---------------------------------------------------------------

def test_serve_refuses_a_lan_bind_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli.main import main

    assert main(["serve", "--model", "yolov2-16", "--host", "0.0.0.0"]) == 2
    assert "without an auth token" in capsys.readouterr().err
    assert main(["serve", "--model", "yolov2-16", "--grid", "five"]) == 2
    assert "ROWSxCOLS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["loadtest", "http://127.0.0.1:1", "--model", "m"])  # needs --rate or --concurrency


def test_model_files_are_served_under_their_stem(tmp_path: Path) -> None:
    """An ONNX file (or any kind tiling.load_model reads) is a model source; its input size comes from the file."""
    import torch

    from fleet.serving.models import build_model

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "edge.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 20, 24), str(path), dynamo=False, opset_version=13)
    cfg = R.single(str(path))
    assert cfg.name == "edge"
    model, example = build_model(cfg)
    assert tuple(example.shape) == (1, 3, 20, 24)
    with torch.no_grad():
        assert torch.allclose(model(example), net(example), atol=1e-5)


def test_overhead_median_is_interpolated_within_its_bucket() -> None:
    from fleet.serving.overhead import histogram, median_us

    inf = float("inf")
    before = {1000.0: 1.0, 2000.0: 1.0, inf: 1.0}
    after = {1000.0: 3.0, 2000.0: 7.0, inf: 9.0}  # 8 new: 2 up to 1 ms, 4 in (1, 2] ms, 2 above
    assert median_us(before, after) == 1500.0
    assert median_us(after, after) is None
    text = ('# TYPE tilefleet_serving_overhead_us histogram\n'
            'tilefleet_serving_overhead_us_bucket{le="1000.0",model="m",version="1"} 3.0\n'
            'tilefleet_serving_overhead_us_bucket{le="+Inf",model="m",version="1"} 4.0\n'
            'tilefleet_serving_overhead_us_sum{model="m",version="1"} 5000.0\n'
            'tilefleet_serving_overhead_us_count{model="m",version="1"} 4.0\n')
    assert histogram(text, "m") == ({1000.0: 3.0, inf: 4.0}, 5000.0, 4.0)
