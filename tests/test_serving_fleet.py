"""The server on a real local Ray instance with emulated devices (one instance for the module):
results through the unmodified tritonclient equal the untiled model, several models share the
fleet, models load and unload at run time, and the per-device metrics follow the work."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

import fleet
import tiling
from fleet.serving import loadtest
from fleet.serving.repository import scan
from fleet.serving.server import ServeOptions, Server
from tiling import zoo

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.ray

MODELS = {"det": ("yolov2-16", 'source = "yolov2-16"\ninput_size = 64\n[deploy]\ngrid = "2x2"\n'),
          "cls": ("resnet18", 'source = "resnet18"\ninput_size = 64\npriority = 1\n[deploy]\ngrid = "2x2"\n')}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("repo")
    for name, (_, text) in MODELS.items():
        (root / name).mkdir()
        (root / name / "config.toml").write_text(text)
    (root / "cam").mkdir()  # camera frames: raw HWC bytes, normalised on the devices
    (root / "cam" / "config.toml").write_text('source = "yolov2-16"\ninput_size = 64\npreprocess = "darknet,layout=hwc"\n'
                                              '[deploy]\ngrid = "2x2"\n')
    with fleet.connect(emulate="pi4*2", max_in_flight=2) as cluster:
        s = Server(cluster, scan(root), ServeOptions(port=0, grpc_port=0), repository_dir=root).start()
        try:
            assert s.service.load_startup() == {"det": "READY", "cls": "READY", "cam": "READY"}
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def refs() -> dict[str, torch.nn.Module]:
    return {name: zoo.get(src, input_size=64).model for name, (src, _) in MODELS.items()}


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def check(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    assert tuple(y.shape) == tuple(ref.shape)
    assert tiling.rel_error(torch.from_numpy(np.array(y)), ref) <= 1e-4


def tiles(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == "tilefleet_device_tiles_total":
                out[s.labels["device"]] = out.get(s.labels["device"], 0) + s.value
    return out


@pytest.mark.parametrize("model", ["det", "cls"])
def test_both_transports_equal_the_untiled_model(server: Server, refs: dict, model: str) -> None:
    h = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    g = grpcclient.InferenceServerClient(server.grpc_address)
    x = frames(2, 1)
    hi = httpclient.InferInput("input", list(x.shape), "FP32")
    hi.set_data_from_numpy(x)
    check(refs[model], x, h.infer(model, [hi]).as_numpy("output"))
    gi = grpcclient.InferInput("input", [3, 64, 64], "FP32")
    gi.set_data_from_numpy(x[0])
    check(refs[model], x[:1], g.infer(model, [gi]).as_numpy("output")[None])


def test_concurrent_requests_of_two_models_share_the_fleet(server: Server, refs: dict) -> None:
    before = tiles(server.url)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
            model = ("det", "cls")[i % 2]
            x = frames(1, 100 + i)
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            check(refs[model], x, c.infer(model, [inp]).as_numpy("output"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    after = tiles(server.url)
    assert set(after) == {"pi4-0", "pi4-1"}
    assert sum(after.values()) > sum(before.values()) and all(after[d] >= before.get(d, 0) for d in after)
    assert server.service.queue_state() == {"det": {"waiting": 0, "in_flight": 0},
                                            "cls": {"waiting": 0, "in_flight": 0},
                                            "cam": {"waiting": 0, "in_flight": 0}}


def test_unload_and_load_at_run_time(server: Server, refs: dict) -> None:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    c.unload_model("cls")
    assert not c.is_model_ready("cls") and c.is_model_ready("det")
    x = frames(1, 7)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="not ready"):
        c.infer("cls", [inp])
    check(refs["det"], x, c.infer("det", [inp]).as_numpy("output"))
    c.load_model("cls")
    check(refs["cls"], x, c.infer("cls", [inp]).as_numpy("output"))
    e = server.service.entries["cls"]
    assert e.weight_bytes >= sum(s.weight_bytes for s in e.deployment.plan.stages) > 0


def test_loadtest_open_and_closed_loop(server: Server) -> None:
    target = loadtest.prepare(server.url, "det")
    closed = loadtest.run(target, concurrency=2, duration=2.0)[0]
    assert closed["ok"] > 0 and not closed["errors"] and closed["p50_ms"] is not None
    opened = loadtest.run(target, rates=[4.0], duration=2.0)[0]
    assert opened["sent"] == 8 and opened["ok"] == 8 and opened["p99_ms"] >= opened["p50_ms"]


def test_uint8_camera_frames_are_served(server: Server, refs: dict) -> None:
    """HWC uint8 frames through tritonclient: they cross to the devices as bytes and come back equal to
    the untiled model on the normalised frame."""
    g = grpcclient.InferenceServerClient(server.grpc_address)
    meta = g.get_model_metadata("cam", as_json=True)
    assert meta["inputs"][0]["datatype"] == "UINT8"
    x = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    gi = grpcclient.InferInput("input", list(x.shape), "UINT8")
    gi.set_data_from_numpy(x)
    y = g.infer("cam", [gi]).as_numpy("output")
    pre = tiling.Preprocess.parse("darknet,layout=hwc")
    with torch.no_grad():
        ref = refs["det"](pre.apply_float(pre.to_nchw(torch.from_numpy(x))))
    assert tiling.rel_error(torch.from_numpy(np.array(y)), ref) <= 1e-4
    bad = grpcclient.InferInput("input", [1, 64, 64, 3], "FP32")
    bad.set_data_from_numpy(frames(1, 2).transpose(0, 2, 3, 1).copy())
    with pytest.raises(InferenceServerException, match="UINT8|uint8"):
        g.infer("cam", [bad])


def test_abandoned_requests_are_cancelled_in_the_fleet(server: Server, refs: dict) -> None:
    """Requests whose client gives up while their frame is in the fleet (a gRPC deadline, an HTTP
    client that hangs up) are cancelled there: the runtime counts the frames cancelled, the server's
    counter follows, their slots free, and the next request is exact."""
    cluster = server.service.cluster
    dep = server.service.entries["det"].deployment
    x = frames(1, 11)

    def cancelled() -> float:
        fams = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
        return sum(s.value for f in fams for s in f.samples if s.name == "tilefleet_frames_cancelled_total"
                   and s.labels["model"] == "det")

    before, runtime_before = cancelled(), dep.stats(detail=False)["frames"]["cancelled"]
    for d in ("pi4-0", "pi4-1"):
        cluster.slow(d, 20.0)  # a frame takes about 1 s now: both requests are in flight when they give up
    try:
        g = grpcclient.InferenceServerClient(server.grpc_address)
        gi = grpcclient.InferInput("input", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            g.infer("det", [gi], client_timeout=0.3)
        assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        h = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=0.3)
        hi = httpclient.InferInput("input", list(x.shape), "FP32")
        hi.set_data_from_numpy(x)
        with pytest.raises(Exception, match="(?i)timed? ?out"):
            h.infer("det", [hi])
        deadline = time.monotonic() + 10
        while (cancelled() - before < 2 or server.service.queue_state()["det"]["in_flight"]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled() - before == 2 and server.service.queue_state()["det"]["in_flight"] == 0
        assert dep.stats(detail=False)["frames"]["cancelled"] - runtime_before == 2
    finally:
        for d in ("pi4-0", "pi4-1"):
            cluster.slow(d, 1.0)
    h = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    hi = httpclient.InferInput("input", list(x.shape), "FP32")
    hi.set_data_from_numpy(x)
    check(refs["det"], x, h.infer("det", [hi]).as_numpy("output"))
