"""``tilefleet head --tls`` on a LAN of network namespaces: a cluster whose Ray traffic is TLS.

h0 runs ``tilefleet head --tls``; h1 joins; h2 joins with ``--client`` and runs the client; h3 and h4
try to attach Ray nodes of their own, with the token but without a certificate from the head's CA
(h3 with none, h4 with one from another CA), at the same time. Then
the head restarts without ``--tls`` and the same frames run again, for the TLS overhead (printed).

While the TLS frames run, every frame crossing the links of h0, h1 and h2 is captured
(``tests/capture.py``) and searched for the frames' float32 bytes: none may appear. The same search
over a plain TCP copy of one frame finds it, so the search can fail.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capture import Capture, float_pairs, float_pairs_found
from fleet.lan import tls
from lanops import TILEFLEET, alive_ips, copy_token, devices, lan_of, run_client, wait_for, wait_state
from netns import Host, Lan

pytestmark = pytest.mark.netns

RAY = str(Path(sys.executable).with_name("ray"))
FRAMES = 8


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    yield from lan_of(5)


@pytest.fixture(scope="module")
def cluster(lan: Lan) -> dict[str, Any]:
    h0, h1, h2, h3, h4 = lan.hosts
    head = h0.spawn([TILEFLEET, "head", "--name", "lab", "--tls"], name="head")
    head_state = wait_state(h0, "head", head)
    for h in (h1, h2, h3, h4):
        copy_token(h0, h)
    h1.run([TILEFLEET, "profile", "--json"], timeout=120)
    j1 = h1.spawn([TILEFLEET, "join", "--cluster", "lab", "--device-name", "h1"], name="join")
    j2 = h2.spawn([TILEFLEET, "join", "--cluster", "lab", "--client", "--device-name", "h2"], name="join")
    return {"head": head, "head_state": head_state, "procs": {"h1": j1, "h2": j2},
            "joins": {"h1": wait_state(h1, "join", j1), "h2": wait_state(h2, "join", j2)}}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _ray_env_of(host: Host) -> dict[str, str]:
    """The environment of the host's raylet (what Ray itself runs with)."""
    import subprocess

    for pid in subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                raw = Path(f"/proc/{pid}/environ").read_bytes()
                return dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)
        except OSError:
            continue
    raise AssertionError(f"no raylet in {host.name}")


def test_tls_cluster_runs_exact_frames(lan: Lan, cluster: dict[str, Any]) -> None:
    h0, h1, h2 = lan[0], lan[1], lan[2]
    hs = cluster["head_state"]
    assert hs["tls"] and Path(hs["tls"]["ca"]).exists()
    d = Path(hs["tls"]["ca"]).parent
    assert _mode(d) == 0o700 and all(_mode(p) == 0o600 for p in d.iterdir())
    assert (d / "ca.key").exists()
    for name, h in (("h1", h1), ("h2", h2)):
        t = cluster["joins"][name]["tls"]
        files = tls.TlsFiles(Path(t["ca"]), Path(t["cert"]), Path(t["key"]))
        assert not (files.cert.parent / "ca.key").exists()  # the CA key never left the head
        assert files.ca_cert.read_bytes() == (d / "ca.crt").read_bytes()
        tls.check_issued(files.cert.read_bytes(), files.ca_cert.read_bytes(), files.key.read_bytes(), h.ip)
        assert all(_mode(p) == 0o600 for p in (files.cert, files.key, files.ca_cert)) and _mode(files.key.parent) == 0o700
        env = _ray_env_of(h)
        assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_SERVER_CERT"] == str(files.cert), env
    assert "tls:    certificate" in h1.log(cluster["procs"]["h1"])
    with Capture([lan.veth(h) for h in (h0, h1, h2)]) as cap:
        res = run_client(lan, h2, FRAMES)
    assert res["frames"] == FRAMES and res["worst"] <= 1e-4, res
    frames = _client_frames()
    needles = float_pairs(frames)
    sent = sum(f.nbytes for f in frames)
    assert cap.bytes > sent and not cap.truncated, cap  # the frames crossed these links (as ciphertext)
    assert float_pairs_found(cap.data(), needles) == 0, f"plaintext frame bytes on the wire: {cap}"
    with Capture([lan.veth(h) for h in (h1, h2)]) as control:  # the same search finds a plaintext copy
        _send_plain(lan, h2, h1, frames[2].tobytes())
    found = float_pairs_found(control.data(), needles)
    assert found > 1000, control
    print(f"TLS frames: {cap}, 0 float pairs of the frames found; a plain copy of one frame: {found} found")
    assert sorted(res["stats"]) and all(s["tiles"] > 0 for s in res["stats"].values()), res["stats"]
    cluster["tls_seconds"] = res["seconds"]
    assert alive_ips(devices(h1, h0)) == sorted([h0.ip, h1.ip, h2.ip])


def _client_frames() -> list[np.ndarray]:
    """The frames :data:`lanops.CLIENT` sends (same model, size and seed)."""
    import torch

    from tiling import zoo

    x = zoo.example(zoo.get("yolov2-16", input_size=256))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(x.shape, generator=g).numpy() for _ in range(FRAMES + 2)]


_LISTEN = r"""
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 7777))
s.listen(1)
open(sys.argv[2], "w").close()
c, _ = s.accept()
n = 0
while (b := c.recv(1 << 16)):
    n += len(b)
print("received", n, flush=True)
"""
_SEND = r"""
import socket, sys
with socket.create_connection((sys.argv[1], 7777), timeout=10) as s:
    s.sendall(open(sys.argv[2], "rb").read())
"""


def _send_plain(lan: Lan, src: Host, dst: Host, payload: bytes) -> None:
    """``payload`` from ``src`` to ``dst`` over a bare TCP connection (no TLS)."""
    path, ready = lan.workdir / "plain.bin", lan.workdir / "plain.ready"
    path.write_bytes(payload)
    ready.unlink(missing_ok=True)
    listener = dst.spawn([sys.executable, "-c", _LISTEN, dst.ip, str(ready)], name="listen")
    wait_for(ready.exists, 30, lambda: dst.log(listener))
    src.run([sys.executable, "-c", _SEND, dst.ip, str(path)], timeout=30)
    wait_for(lambda: listener.poll() is not None, 30, lambda: dst.log(listener))
    assert f"received {len(payload)}" in dst.log(listener), dst.log(listener)


def _attempts(lan: Lan, tries: list[tuple[Host, str, dict[str, str], str]], seconds: float = 60) -> None:
    """Bare ``ray start``s with the token, one per host and all at once, each with the message its
    refusal prints. The cluster is watched until every attempt has been refused twice (the first
    try and a retry: Ray retries the head every few seconds) or ``seconds`` pass; then the attempts
    are killed. None may have joined, and each must have been refused, not merely slow."""
    procs = []
    for h, name, extra_env, refusal in tries:
        env = h.env({"RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN_PATH": str(h.home / ".config" / "tilefleet" / "token"), **extra_env})
        procs.append((h, name, refusal, h.spawn([RAY, "start", "--address", f"{lan[0].ip}:6379", "--node-ip-address",
                                                 h.ip, "--temp-dir", str(h.tmp / name), "--disable-usage-stats",
                                                 "--num-cpus", "1", "--block"], env=env, name=name)))

    def refused(h: Host, refusal: str, p: Any) -> bool:
        return len(re.findall(refusal, h.log(p))) >= 2

    deadline = time.monotonic() + seconds
    alive = alive_ips(devices(lan[1], lan[0]))
    while (time.monotonic() < deadline and not all(refused(h, r, p) for h, _, r, p in procs)
           and not any(h.ip in alive for h, _, _, _ in procs)):
        time.sleep(0.5)
        alive = alive_ips(devices(lan[1], lan[0]))
    alive = alive_ips(devices(lan[1], lan[0]))  # once more, after the last refusal was seen
    logs = {name: h.log(p)[-2000:] for h, name, _, p in procs}
    not_refused = {name: logs[name] for h, name, r, p in procs if not refused(h, r, p)}
    lan.stop(*(p for _, _, _, p in procs), timeout=0)  # throwaway: pid 1 of a PID namespace ignores SIGTERM
    joined = {name: logs[name] for h, name, _, _ in procs if h.ip in alive}
    assert not joined, f"joined a --tls cluster: {joined}"
    assert not not_refused, f"no refusal seen in {seconds:.0f} s: {not_refused}"


def test_nodes_without_a_certificate_from_the_head_are_refused(lan: Lan, cluster: dict[str, Any]) -> None:
    h3, h4 = lan[3], lan[4]
    before = alive_ips(devices(lan[1], lan[0]))
    other_ca, other_key = tls.make_ca("rogue")  # a certificate, but not from the cluster's CA
    key = tls.new_key_pem()
    files = tls.device_files(h4.tmp / "rogue-tls", "node",
                             tls.sign_csr(other_ca, other_key, tls.make_csr(key, h4.ip), h4.ip), other_ca, key, h4.ip)
    _attempts(lan, [(h3, "plain", {"RAY_USE_TLS": "0"},  # the token alone is not enough
                     r"Failed to connect to (GCS|the observability pubsub)"),
                    (h4, "rogue", files.env(), r"CERTIFICATE_VERIFY_FAILED")])
    assert alive_ips(devices(lan[1], lan[0])) == before


@pytest.mark.skipif(not os.environ.get("TILEFLEET_MEASURE"),
                    reason="a measurement, not a check (about 45 s): TILEFLEET_MEASURE=1 pytest tests/test_lan_tls_netns.py")
def test_tls_overhead_against_the_same_cluster_without_tls(lan: Lan, cluster: dict[str, Any]) -> None:
    if "tls_seconds" not in cluster:
        pytest.skip("the TLS frames (first test) did not run")
    h0, h1, h2 = lan[0], lan[1], lan[2]
    old = cluster["head_state"]["instance"]
    lan.stop(cluster["head"])  # SIGTERM, as `tilefleet stop` or Ctrl-C: Ray stops, the advert is withdrawn
    head = h0.spawn([TILEFLEET, "head", "--name", "lab"], name="head-plain")
    hs = wait_state(h0, "head", head, where=lambda st: st["instance"] != old)
    assert hs["tls"] is None
    for name, h in (("h1", h1), ("h2", h2)):  # the joins follow the head: no certificate now
        st = wait_state(h, "join", cluster["procs"][name], where=lambda st: st.get("instance") == hs["instance"])
        assert st["tls"] is None and _ray_env_of(h)["RAY_USE_TLS"] == "0"
    with Capture([lan.veth(h) for h in (h0, h1, h2)]) as cap:
        res = run_client(lan, h2, FRAMES)
    assert res["frames"] == FRAMES and res["worst"] <= 1e-4, res
    print(f"the same frames without TLS: {cap}, {float_pairs_found(cap.data(), float_pairs(_client_frames()))} "
          "float pairs of the frames found on the wire")
    tls_s, plain_s = cluster["tls_seconds"], res["seconds"]
    print(f"TLS overhead: {FRAMES} frames (YOLOv2-16 at 256, 3 nodes) took {tls_s:.2f} s with TLS and "
          f"{plain_s:.2f} s without ({(tls_s / plain_s - 1) * 100:+.0f}%; one run each, same cluster, same frames)")
    lan.stop(head)
