"""``tilefleet head --tls`` on a LAN of network namespaces: a cluster whose Ray traffic is TLS.

h0 runs ``tilefleet head --tls``; h1 joins; h2 joins with ``--client`` and runs the client; h3 tries
to attach Ray nodes of its own, with the token but without a certificate from the head's CA. Then
the head restarts without ``--tls`` and the same frames run again, for the TLS overhead (printed).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.lan import tls
from lanops import TILEFLEET, alive_ips, copy_token, devices, lan_of, run_client, wait_state
from netns import Host, Lan

pytestmark = pytest.mark.netns

RAY = str(Path(sys.executable).with_name("ray"))
FRAMES = 8


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    yield from lan_of(4)


@pytest.fixture(scope="module")
def cluster(lan: Lan) -> dict[str, Any]:
    h0, h1, h2, h3 = lan.hosts
    head = h0.spawn([TILEFLEET, "head", "--name", "lab", "--tls"], name="head")
    head_state = wait_state(h0, "head", head)
    for h in (h1, h2, h3):
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
    res = run_client(lan, h2, FRAMES)
    assert res["frames"] == FRAMES and res["worst"] <= 1e-4, res
    assert sorted(res["stats"]) and all(s["tiles"] > 0 for s in res["stats"].values()), res["stats"]
    cluster["tls_seconds"] = res["seconds"]
    assert alive_ips(devices(h1, h0)) == sorted([h0.ip, h1.ip, h2.ip])


def _attach(lan: Lan, h: Host, name: str, extra_env: dict[str, str], seconds: float = 25) -> str:
    """A bare ``ray start`` in ``h`` with the token: given ``seconds`` to join, then ended (all of it)."""
    env = h.env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(h.home / ".config" / "tilefleet" / "token"),
                 **extra_env})
    proc = h.spawn([RAY, "start", "--address", f"{lan[0].ip}:6379", "--node-ip-address", h.ip, "--temp-dir",
                    str(h.tmp / name), "--disable-usage-stats", "--num-cpus", "1", "--block"], env=env, name=name)
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline and h.ip not in alive_ips(devices(lan[1], lan[0])):
        time.sleep(1)
    joined = h.ip in alive_ips(devices(lan[1], lan[0]))
    lan.stop(proc)
    assert not joined, f"{name} joined a --tls cluster:\n{h.log(proc)[-2000:]}"
    return h.log(proc)


def test_nodes_without_a_certificate_from_the_head_are_refused(lan: Lan, cluster: dict[str, Any]) -> None:
    h3 = lan[3]
    before = alive_ips(devices(lan[1], lan[0]))
    _attach(lan, h3, "plain", {"RAY_USE_TLS": "0"})  # the token alone is not enough
    other_ca, other_key = tls.make_ca("rogue")  # a certificate, but not from the cluster's CA
    key = tls.new_key_pem()
    d = h3.tmp / "rogue-tls"
    files = tls.device_files(d, "node", tls.sign_csr(other_ca, other_key, tls.make_csr(key, h3.ip), h3.ip),
                             other_ca, key, h3.ip)
    _attach(lan, h3, "rogue", files.env())
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
    res = run_client(lan, h2, FRAMES)
    assert res["frames"] == FRAMES and res["worst"] <= 1e-4, res
    tls_s, plain_s = cluster["tls_seconds"], res["seconds"]
    print(f"TLS overhead: {FRAMES} frames (YOLOv2-16 at 256, 3 nodes) took {tls_s:.2f} s with TLS and "
          f"{plain_s:.2f} s without ({(tls_s / plain_s - 1) * 100:+.0f}%; one run each, same cluster, same frames)")
    lan.stop(head)
