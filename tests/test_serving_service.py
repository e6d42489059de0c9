"""The server end to end through the unmodified tritonclient (HTTP and gRPC), on a fake cluster.

The fake cluster runs each frame through the model itself in a thread (no Ray), so these tests
check the protocol, the transports, admission, timeouts, disconnects, the repository API, access
control and metrics in seconds. tests/test_serving_fleet.py repeats the essentials on a real
emulated fleet.
"""

from __future__ import annotations

import datetime
import ssl
import json
import threading
from types import SimpleNamespace
import time
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import tiling
from fleet.runtime.deployment import settle
from fleet.serving.errors import ErrorKind
from fleet.serving.repository import ConfigError, ModelConfig
from fleet.serving.security import SecurityError
from fleet.serving.server import ServeOptions, Server
from fleet.serving.service import ServiceOptions

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TINY_CFG = """[net]
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
filters=4
size=1
stride=1
pad=1
activation=leaky
"""
TOKEN = "s3cret-token-for-tests-0123456789"


class FakeDeployment:
    """Runs frames through the model in a thread; ``gate`` holds them back to fill queues. A cancelled
    frame's future fails at once, as the runtime's does (its thread runs on, its result is dropped)."""

    def __init__(self, model: Any, plan: tiling.Plan, gate: threading.Event) -> None:
        self.model = model
        self.plan = plan
        self.gate = gate
        self.pool = ThreadPoolExecutor(4)
        self.frames = 0
        self.cancelled: list[str] = []
        self.closed = False

    def submit(self, x: torch.Tensor) -> Future:
        self.plan.check_input(x)
        out: Future = Future()
        self.pool.submit(self._run, x).add_done_callback(lambda f: settle(out, f))
        return out

    def cancel(self, fut: Future, reason: str = "cancelled") -> bool:
        try:
            fut.set_exception(RuntimeError(reason))
        except InvalidStateError:
            return False
        self.cancelled.append(reason)
        return True

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(30)
        with torch.no_grad():
            y = self.model(x)
        self.frames += 1
        return y

    def stats(self, detail: bool = True) -> dict[str, Any]:
        return {"devices": {d: {"tiles": self.frames * 2, "busy_s": 0.1 * self.frames, "bytes_in": 10 * self.frames,
                                "alive": True, "steals": 0, "retries": 0} for d in ("d0", "d1")}}

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=False)


class FakeCluster:
    def __init__(self, usable_bytes: int = 1 << 30) -> None:
        self.usable_bytes = usable_bytes
        self.gate = threading.Event()
        self.gate.set()
        self.deployed: list[FakeDeployment] = []

    def plan(self, model: Any, example: torch.Tensor, grid: Any = "auto", **kw: Any) -> SimpleNamespace:
        return SimpleNamespace(model=model, plan=tiling.partition(model, example, grid=(1, 1) if grid == "auto"
                                                                  else grid))

    def deploy(self, planned: SimpleNamespace) -> FakeDeployment:
        d = FakeDeployment(planned.model, planned.plan, self.gate)
        self.deployed.append(d)
        return d

    def devices(self) -> list[dict[str, Any]]:
        return [{"id": f"d{i}", "usable_bytes": self.usable_bytes, "state": "alive"} for i in range(2)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, text in (("tiny", 'source = "tiny.cfg"\npriority = 1\n[deploy]\ngrid = "2x2"\n'),
                       ("tiny2", 'source = "tiny.cfg"\n[input]\nname = "images"\nshape = [3, 8, 8]\n'),
                       ("broken", "source = \n"), ("nofile", 'source = "gone.cfg"\n')):
        (root / name).mkdir()
        (root / name / "config.toml").write_text(text)
        (root / name / "tiny.cfg").write_text(TINY_CFG)
    return root


def configs(root: Path) -> dict[str, ModelConfig | ConfigError]:
    from fleet.serving.repository import scan

    return scan(root)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    cluster = FakeCluster()
    opts = ServeOptions(port=0, grpc_port=0, max_request_bytes=200_000, service=ServiceOptions(timeout_s=20))
    s = Server(cluster, configs(repo), opts, repository_dir=repo).start()
    s.service.load_startup(["tiny", "broken", "nofile"])
    s.cluster = cluster  # type: ignore[attr-defined]
    yield s
    s.stop()


def reference(repo: Path, x: np.ndarray) -> np.ndarray:
    m = tiling.load_darknet(str(repo / "tiny" / "tiny.cfg"))
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def scrape(url: str, **kw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_health_metadata_and_index(server: Server) -> None:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready()
    assert c.get_server_metadata()["name"] == "tilefleet"
    assert c.is_model_ready("tiny") and c.is_model_ready("tiny", "1") and not c.is_model_ready("broken")
    meta = c.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 4, 8, 8]}]
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["tiny"]["state"] == "READY" and index["tiny2"]["state"] == "UNAVAILABLE"
    assert "not valid TOML" in index["broken"]["reason"] and "gone.cfg" in index["nofile"]["reason"]
    g = grpcclient.InferenceServerClient(server.grpc_address)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("tiny") and not g.is_model_ready("broken")
    assert g.get_model_metadata("tiny").inputs[0].shape == [-1, 3, 16, 16]
    assert {m.name: m.state for m in g.get_model_repository_index().models}["broken"] == "UNAVAILABLE"


@pytest.mark.parametrize("binary", [True, False])
def test_http_infer_equals_the_model(server: Server, repo: Path, binary: bool) -> None:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    r = c.infer("tiny", [inp], outputs=[out], request_id="abc")
    assert r.get_response()["id"] == "abc"
    assert tiling.rel_error(torch.from_numpy(np.array(r.as_numpy("output"))), torch.from_numpy(reference(repo, x))) <= 1e-6
    single = httpclient.InferInput("input", [3, 16, 16], "FP16")  # (C, H, W) and converted FP16
    single.set_data_from_numpy(x[0].astype(np.float16))
    y = c.infer("tiny", [single], model_version="1").as_numpy("output")
    assert y.shape == (4, 8, 8)


def test_grpc_infer_equals_the_model(server: Server, repo: Path) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_address)
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    y = g.infer("tiny", [inp], outputs=[grpcclient.InferRequestedOutput("output")]).as_numpy("output")
    assert tiling.rel_error(torch.from_numpy(np.array(y)), torch.from_numpy(reference(repo, x))) <= 1e-6


def test_bad_requests_get_the_right_codes_and_the_server_keeps_serving(server: Server) -> None:
    url = server.url
    good = {"inputs": [{"name": "input", "shape": [3, 16, 16], "datatype": "FP32", "data": [0.1] * 768}]}
    cases = [("/v2/models/tiny/infer", dict(good, inputs=[dict(good["inputs"][0], shape=[3, 8, 8], data=[0.1] * 192)]), 400, "[N, 3, 16, 16]"),
             ("/v2/models/nope/infer", good, 404, "unknown model 'nope'"),
             ("/v2/models/tiny/versions/3/infer", good, 404, "no version '3'"),
             ("/v2/models/broken/infer", good, 503, "not ready"),
             ("/v2/models/tiny/infer", {"inputs": "x"}, 400, "non-empty list")]
    for path, doc, status, text in cases:
        r = httpx.post(url + path, json=doc)
        assert r.status_code == status and text in r.json()["error"], (path, r.text)
    big = httpx.post(url + "/v2/models/tiny/infer", content=b"0" * 300_000)
    assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]
    assert httpx.get(url + "/v2/nothing").json()["error"]
    g = grpcclient.InferenceServerClient(server.grpc_address)
    bad = grpcclient.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    for model, status in (("tiny", "StatusCode.INVALID_ARGUMENT"), ("nope", "StatusCode.NOT_FOUND")):
        with pytest.raises(InferenceServerException) as e:
            g.infer(model, [bad])
        assert e.value.status() == status
    r = httpx.post(url + "/v2/models/tiny/infer", json=good)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [4, 8, 8]


def test_timeout_and_disconnect_are_cleaned_up(server: Server) -> None:
    cluster = server.cluster  # type: ignore[attr-defined]
    svc = server.service
    dep = svc.entries["tiny"].deployment
    good = {"inputs": [{"name": "input", "shape": [3, 16, 16], "datatype": "FP32", "data": [0.1] * 768}]}
    before = scrape(server.url)
    g = grpcclient.InferenceServerClient(server.grpc_address)
    inp = grpcclient.InferInput("input", [3, 16, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((3, 16, 16), np.float32))

    def settled(in_flight: int, waiting: int = 0) -> None:  # the server's own state, not a fixed sleep
        deadline = time.monotonic() + 5
        while svc.queue_state()["tiny"] != {"waiting": waiting, "in_flight": in_flight}:
            assert time.monotonic() < deadline, svc.queue_state()
            time.sleep(0.02)

    cluster.gate.clear()
    blockers: list[threading.Thread] = []
    try:
        # frames in the fleet whose request is given up are cancelled there, and their slot frees:
        # a timeout (parameters.timeout), a client that disconnects, a gRPC deadline
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v2/models/tiny/infer", json=dict(good, parameters={"timeout": 300_000}))
        assert r.status_code == 504 and "timeout (0.3 s)" in r.json()["error"] and time.monotonic() - t0 < 5
        assert dep.cancelled == ["cancelled: the request's timeout passed"]
        settled(in_flight=0)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v2/models/tiny/infer", json=good, timeout=0.5)
        with pytest.raises(InferenceServerException) as e:
            g.infer("tiny", [inp], client_timeout=0.3)
        assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        settled(in_flight=0)
        assert len(dep.cancelled) == 3 and "cancelled: the client went away" in dep.cancelled
        # 4 frames fill the 4 slots; then a client that gives up while its request is queued
        blockers = [threading.Thread(target=httpx.post, args=(server.url + "/v2/models/tiny/infer",),
                                     kwargs={"json": good, "timeout": 30}) for _ in range(4)]
        for b in blockers:
            b.start()
        settled(in_flight=4)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v2/models/tiny/infer", json=good, timeout=0.5)
        settled(in_flight=4)  # the disconnected request left the queue
        with pytest.raises(InferenceServerException) as e:
            g.infer("tiny", [inp], client_timeout=0.3)  # the gRPC deadline bounds the wait in the queue
        assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        settled(in_flight=4)
        assert len(dep.cancelled) == 3  # nothing of theirs reached the fleet
    finally:
        cluster.gate.set()
    for b in blockers:
        b.join(10)
    settled(in_flight=0)
    m = scrape(server.url)
    fail = {dict(k[1]).get("reason"): v for k, v in m.items() if k[0] == "nv_inference_request_failure_total"}
    assert fail.get("timeout", 0) >= 1 and fail.get("cancelled", 0) >= 1

    def cancelled(scraped: dict) -> float:
        return sum(v for k, v in scraped.items() if k[0] == "tilefleet_frames_cancelled_total")

    assert cancelled(m) - cancelled(before) == 3
    assert m[("tilefleet_frames_cancelled_total", (("model", "tiny"), ("reason", "timeout"), ("version", "1")))] >= 1
    # and the server keeps serving
    assert httpx.post(server.url + "/v2/models/tiny/infer", json=good).status_code == 200


def test_repository_load_unload_and_memory(server: Server, repo: Path) -> None:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    c.load_model("tiny2")
    assert c.is_model_ready("tiny2") and c.get_model_metadata("tiny2")["inputs"][0]["name"] == "images"
    x = np.ones((1, 3, 8, 8), np.float32)
    inp = httpclient.InferInput("images", [1, 3, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    assert c.infer("tiny2", [inp]).as_numpy("output").shape == (1, 4, 4, 4)
    c.unload_model("tiny2")
    assert not c.is_model_ready("tiny2")
    with pytest.raises(InferenceServerException, match="not ready"):
        c.infer("tiny2", [inp])
    with pytest.raises(InferenceServerException, match="not valid TOML"):
        c.load_model("broken")
    g = grpcclient.InferenceServerClient(server.grpc_address)
    g.load_model("tiny2", config=json.dumps({"source": "tiny.cfg", "input_size": 32}))
    assert g.get_model_metadata("tiny2").inputs[0].shape == [-1, 3, 32, 32]
    g.unload_model("tiny2")
    # memory: shrink the devices until a second model no longer fits beside the first
    cluster = server.cluster  # type: ignore[attr-defined]
    usable = cluster.usable_bytes
    tiny = server.service.entries["tiny"]
    cluster.usable_bytes = tiny.weight_bytes + tiny.peak_bytes + 10
    try:
        with pytest.raises(InferenceServerException, match="does not fit"):
            c.load_model("tiny2")
        assert "does not fit" in {m["name"]: m for m in c.get_model_repository_index()}["tiny2"]["reason"]
        assert cluster.deployed[-1].closed  # the refused deployment was closed again
    finally:
        cluster.usable_bytes = usable
    assert c.is_model_ready("tiny")


def test_metrics_report_requests_and_devices(server: Server) -> None:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    before = scrape(server.url)
    inp = httpclient.InferInput("input", [1, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    for _ in range(3):
        c.infer("tiny", [inp])
    after = scrape(server.url)
    key = ("nv_inference_request_success_total", (("model", "tiny"), ("version", "1")))
    assert after[key] - before.get(key, 0) == 3
    tiles = ("tilefleet_device_tiles_total", (("device", "d0"), ("model", "tiny")))
    assert after[tiles] > before.get(tiles, 0)
    for name in ("nv_inference_request_duration_us_count", "nv_inference_queue_duration_us_count",
                 "nv_inference_compute_infer_duration_us_count", "tilefleet_serving_overhead_us_count"):
        assert after[(name, (("model", "tiny"), ("version", "1")))] >= 3
    assert after[("tilefleet_device_up", (("device", "d0"),))] == 1
    assert after[("tilefleet_frames_in_flight", (("model", "tiny"),))] == 0
    assert any(k[0] == "tilefleet_http_requests_total" for k in after)


def test_refuses_lan_bind_without_token(repo: Path) -> None:
    with pytest.raises(SecurityError, match="--auth-token-file"):
        Server(FakeCluster(), {}, ServeOptions(host="0.0.0.0", port=0, grpc_port=0))
    with pytest.raises(SecurityError, match="both --tls-cert and --tls-key"):
        Server(FakeCluster(), {}, ServeOptions(port=0, tls_cert="x.pem"))


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_token_and_tls_on_both_ports(repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cert, key = _self_signed(tmp_path)
    opts = ServeOptions(host="localhost", port=0, grpc_port=0, token_file=str(token_file), tls_cert=str(cert),
                        tls_key=str(key))
    with Server(FakeCluster(), {"tiny": configs(repo)["tiny"]}, opts, repository_dir=None).start() as s:
        s.service.load_startup()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert s.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as h:
            assert h.get(s.url + "/v2/health/ready").status_code == 200  # probes need no token
            r = h.get(s.url + "/v2/models/tiny")
            assert r.status_code == 401 and "Bearer" in r.json()["error"]
            assert h.get(s.url + "/v2/models/tiny", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert h.get(s.url + "/v2/models/tiny", headers=auth).json()["name"] == "tiny"
            assert h.get(s.url + "/metrics").status_code == 401
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/v2/health/live")  # not trusting the self-signed certificate
        hc = httpclient.InferenceServerClient(s.url.removeprefix("https://"), ssl=True,
                                              ssl_options={"ca_certs": str(cert)})
        assert hc.get_model_metadata("tiny", headers=auth)["name"] == "tiny"
        with pytest.raises(InferenceServerException, match="bearer token"):
            hc.get_model_metadata("tiny")
        g = grpcclient.InferenceServerClient(s.grpc_address, ssl=True, root_certificates=str(cert))
        assert g.is_server_live()
        with pytest.raises(InferenceServerException) as e:
            g.get_model_metadata("tiny")
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        inp = grpcclient.InferInput("input", [1, 3, 16, 16], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        assert g.infer("tiny", [inp], headers={"authorization": f"Bearer {TOKEN}"}).as_numpy("output").shape == (1, 4, 8, 8)
        assert ErrorKind.UNAUTHENTICATED.http_status == 401


def test_loadtest_command_prints_a_table(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli.main import main

    out = tmp_path / "lt.json"
    assert main(["loadtest", server.url, "--model", "tiny", "--rate", "5,10", "--duration", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "achieved/s" in text and "p99 ms" in text
    reports = json.loads(out.read_text())
    assert [r["offered_rps"] for r in reports] == [5, 10] and reports[1]["ok"] == 10
