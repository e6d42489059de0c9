"""The LAN commands: pure decisions (tokens, labels, argv, versions, state), refusals through the
CLI against a real agent, and one real head + join + devices + stop run on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import lan
from fleet.cli import lan as lancli
from fleet.lan import discovery as d
from fleet.lan import procs, profiling, tokens
from fleet.lan.trust import INSECURE_FINGERPRINT
from fleet.lan.agent import Agent
from fleet.lan.discovery import HeadAdvert
from fleet.lan import LanError
from lanops import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME with the XDG dirs inside it, and no Ray settings leaking in."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var, sub in (("XDG_CONFIG_HOME", "cfg"), ("XDG_STATE_HOME", "st"), ("XDG_CACHE_HOME", "cache")):
        monkeypatch.setenv(var, str(h / sub))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    return h


def sample_profile(**kw: Any) -> profiling.DeviceProfile:
    base = dict(name="pi-kitchen", klass="raspberry-pi", gflops=4.5, tile_overhead_s=2e-4, memory_bytes=900 * 2**20,
                cores=4, gpu=False, gpu_name=None, gpu_memory_bytes=None, gpu_gflops=None, link_mbps=None,
                latency_s=None, measured_at=1_700_000_000.0, tilefleet_version=profiling._tilefleet_version(),
                threads=4)
    base.update(kw)
    return profiling.DeviceProfile(**base)


# --- tokens ---------------------------------------------------------------------------------------


def test_head_creates_the_token_0600_in_a_0700_dir(home: Path) -> None:
    t = lan.resolve_token(None, create=True)
    assert t.created and t.path == home / "cfg" / "tilefleet" / "token"
    assert (t.path.stat().st_mode & 0o777) == 0o600 and (t.path.parent.stat().st_mode & 0o777) == 0o700
    assert len(t.value) == 64 and t.warning is None
    again = lan.resolve_token(None, create=True)
    assert not again.created and again.value == t.value and again.fingerprint == tokens.token_fingerprint(t.value)


def test_device_without_a_token_is_told_to_copy_it(home: Path) -> None:
    with pytest.raises(LanError, match="does not exist; copy the head's token file") as e:
        lan.resolve_token(None, create=False)
    assert e.value.code == 2


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "is empty"), (b"  \n", "is empty"), (b"short", "does not hold a token"),
    (b"has spaces inside the token value", "does not hold a token"), (b"x" * 5000, "does not hold a token"),
])
def test_bad_token_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    f = tmp_path / "token"
    f.write_bytes(content)
    f.chmod(0o600)
    with pytest.raises(LanError, match=fragment):
        lan.load_token(f)


def test_token_file_checks(tmp_path: Path) -> None:
    with pytest.raises(LanError, match="is not a regular file"):
        lan.load_token(tmp_path)
    f = tmp_path / "token"
    f.write_bytes(b"0123456789abcdef0123\n")  # the trailing newline of a hand-copied file is ignored
    f.chmod(0o644)
    t = lan.load_token(f)
    assert t.value == b"0123456789abcdef0123" and t.warning and "readable by every user" in t.warning
    if os.geteuid() != 0:  # root reads anything
        f.chmod(0)
        with pytest.raises(LanError, match="permission denied"):
            lan.load_token(f)


# --- labels and argv ------------------------------------------------------------------------------


def test_device_labels_pass_rays_own_validation() -> None:
    from ray._private.label_utils import validate_node_label_syntax

    labels = lan.device_labels(sample_profile(name="weird host!"), name="weird host!.", role="device",
                               join_id="0123abcd", link_mbps=94.25, latency_ms=1.5)
    validate_node_label_syntax(labels)  # raises on anything Ray would refuse
    assert labels["tilefleet/name"] == "weird-host" and labels["tilefleet/gflops"] == "4.5"
    assert labels["tilefleet/memory_mb"] == "900" and labels["tilefleet/link_mbps"] == "94.2"
    assert labels["tilefleet/latency_ms"] == "1.500" and labels["tilefleet/tile_overhead_ms"] == "0.200"
    assert labels["tilefleet/gpu"] == "0" and labels["tilefleet/threads"] == "4"


@pytest.mark.parametrize("labels", [
    {"tilefleet/name": "-bad"}, {"tilefleet/name": "a,b"}, {"tilefleet/name": "a=b"}, {"tilefleet/x": "y" * 64},
    {"bad key/name": "v"}, {"tilefleet/": "v"}, {"ray.io/node-id": "v"},
])
def test_invalid_labels_are_refused_like_ray_does(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        lan.encode_labels(labels)


def test_label_helpers() -> None:
    assert lan.label_text("__--") == "unknown" and lan.label_text("Pi 4 (8GB)") == "Pi-4--8GB"
    assert lan.label_number(12.345) == "12.3" and lan.label_number(3.6, 0) == "4"
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            lan.label_number(bad)  # type: ignore[arg-type]


def test_ray_start_command_lines(tmp_path: Path) -> None:
    labels = {"tilefleet/role": "head", "tilefleet/gflops": "12.5"}
    argv = lan.ray_head_argv("ray", port=7000, node_ip="10.0.0.5", temp_dir=tmp_path, labels=labels, num_cpus=None)
    assert argv[:4] == ["ray", "start", "--head", "--block"]
    opts = dict(zip(argv[4::2], argv[5::2]))
    assert opts["--port"] == "7000" and opts["--node-ip-address"] == "10.0.0.5" and opts["--temp-dir"] == str(tmp_path)
    assert opts["--labels"] == "tilefleet/role=head,tilefleet/gflops=12.5"
    assert json.loads(opts["--system-config"]) == lan.HEALTH_CHECKS
    assert "--include-dashboard=false" in argv and "--disable-usage-stats" in argv and "--num-cpus" not in argv
    node = lan.ray_node_argv("ray", head="10.0.0.5:7000", node_ip="10.0.0.7", temp_dir=tmp_path, labels=labels,
                             num_cpus=0)
    assert node[:5] == ["ray", "start", "--address", "10.0.0.5:7000", "--block"] and node[-2:] == ["--num-cpus", "0"]
    assert "--head" not in node


def test_ray_env(tmp_path: Path) -> None:
    env = lan.ray_env({"RAY_AUTH_TOKEN": "stray", "PATH": "/bin"}, tmp_path / "token")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str((tmp_path / "token").resolve())
    assert "RAY_AUTH_TOKEN" not in env and env["PATH"] == "/bin"
    assert lan.ray_env({"RAY_AUTH_TOKEN_PATH": "x"}, None)["RAY_AUTH_MODE"] == "disabled"


def test_ray_temp_dir_stays_short_enough_for_unix_sockets(tmp_path: Path) -> None:
    assert lan.ray_temp_dir(Path("/s"), "head") == Path("/s/ray-head")
    deep = tmp_path / ("x" * 60)
    t = lan.ray_temp_dir(deep, "node")
    assert len(str(t)) + 64 <= 107 and t.name == "node" and t == lan.ray_temp_dir(deep, "node")
    assert lan.ray_temp_dir(deep, "head") != t


# --- versions and fingerprints --------------------------------------------------------------------


def advert(**kw: Any) -> HeadAdvert:
    v = lan.local_versions()
    base = dict(cluster_name="lab", cluster_id="0123456789abcdef0123456789abcdef", host="127.0.0.1", ray_port=6379,
                agent_port=6390, tilefleet_version=v["tilefleet_version"], wire_version=d.WIRE_VERSION,
                ray_version=v["ray_version"], python_version=v["python_version"],
                token_fingerprint=tokens.token_fingerprint(b"0123456789abcdef0123"))
    base.update(kw)
    return HeadAdvert(**base)


def test_version_mismatch_says_what_differs_and_what_to_install() -> None:
    assert lan.version_mismatch(advert()) is None
    msg = lan.version_mismatch(advert(ray_version="2.61.0", python_version="3.11.9"))
    assert msg is not None and "cluster lab" in msg
    assert "Ray 2.61.0 on the head" in msg and "pip install 'ray==2.61.0'" in msg
    assert "Python 3.11.9 on the head" in msg and "use Python 3.11.9 here" in msg
    assert "tilefleet" not in msg.split(":")[1]
    msg = lan.version_mismatch(advert(tilefleet_version="0.2.0"), local={**lan.local_versions()})
    assert msg is not None and "tilefleet 0.2.0 on the head" in msg


def test_fingerprint_mismatch_names_both(tmp_path: Path) -> None:
    tok = lan.Token(tmp_path / "t", b"another-token-0123456789")
    msg = lan.fingerprint_mismatch(advert(), tok)
    assert msg is not None and tok.fingerprint in msg and advert().token_fingerprint in msg
    assert "copy the head's token file" in msg
    assert lan.fingerprint_mismatch(advert(), lan.Token(tmp_path / "t", b"0123456789abcdef0123")) is None


# --- state files and processes --------------------------------------------------------------------


def test_state_files_and_stale_pids(tmp_path: Path) -> None:
    path = tmp_path / "st" / "head.json"
    lan.write_state(path, {**lan.own_identity(), "cluster_name": "lab"})
    assert (path.stat().st_mode & 0o777) == 0o600
    assert lan.read_state(path)["cluster_name"] == "lab"  # type: ignore[index]
    dead = subprocess.Popen(["true"])
    dead.wait()
    lan.write_state(path, {"pid": dead.pid, "pid_start": 1})
    assert lan.read_state(path, live_only=False) is not None
    assert lan.read_state(path) is None and not path.exists()  # stale: ignored and removed
    lan.write_state(path, {"pid": os.getpid(), "pid_start": 1})  # a live pid, but not the process recorded
    assert lan.read_state(path) is None
    path.write_text("{not json")
    assert lan.read_state(path) is None and lan.read_state(tmp_path / "missing.json") is None


def test_cluster_id_is_stable(tmp_path: Path) -> None:
    cid = lan.cluster_id(tmp_path)
    assert len(cid) == 32 and lan.cluster_id(tmp_path) == cid


def test_node_ip_choice() -> None:
    assert lan.pick_ip(["127.0.0.1", "fe80::1", "169.254.1.1", "10.0.0.7", "bogus"]) == "10.0.0.7"
    with pytest.raises(LanError, match="no LAN IPv4 address"):
        lan.pick_ip(["127.0.0.1"])
    with pytest.raises(LanError, match="several addresses .10.0.0.7, 192.168.1.2.*--node-ip"):
        lan.pick_ip(["10.0.0.7", "192.168.1.2"])
    assert lan.choose_node_ip("127.0.0.1") == "127.0.0.1"
    with pytest.raises(LanError, match="203.0.113.77 is not an address of this machine"):
        lan.choose_node_ip("203.0.113.77")
    with pytest.raises(LanError, match="not an IP address"):
        lan.choose_node_ip("head.local")
    assert lan.choose_node_ip(None, "127.0.0.1") == "127.0.0.1"  # the address that routes to the head


def test_drain_gives_up_at_once_without_a_gcs() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        t0 = time.monotonic()
        msg = lan.drain(f"127.0.0.1:{s.getsockname()[1]}", "ab" * 28)
    assert "could not reach the head's GCS" in msg and time.monotonic() - t0 < 5


def test_port_free() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        assert not lan.port_free(port) and not lan.port_free(port, "127.0.0.1")
    assert lan.port_free(port)


def test_terminate_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker-dir")
    child = subprocess.Popen(["sh", "-c", f"trap '' TERM; sleep 60 & sleep 60 # {marker}"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(procs._group_members(child.pid)) < 3 and time.monotonic() < deadline:  # sh and both sleeps
        time.sleep(0.05)
    killed = lan.terminate(child.pid, pgid=child.pid, marker=marker, timeout=0.5)
    child.wait(timeout=5)
    assert child.pid in killed and not lan.pids_with(marker)
    assert not [p for p in procs._group_members(child.pid)]


# --- the CLI's refusals (no Ray) ------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = lancli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("head", "join", "profile"):
        with pytest.raises(SystemExit):
            lancli.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"tilefleet {cmd}" in out


def test_head_refuses_a_bad_token_file_and_starts_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["head", "--token-file", str(home / "nope"), "--port", "1", "--agent-port", "2",
                          "--node-ip", "127.0.0.1"], capsys)
    assert rc == 2 and "token file" in err and "does not exist" in err and "Traceback" not in err
    assert not (home / "st" / "tilefleet" / "head.json").exists()


def test_head_refuses_a_busy_port(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("", 0)) as s:
        port = s.getsockname()[1]
        rc, _, err = run_cli(["head", "--port", str(port), "--agent-port", str(port + 1 if port < 65535 else 1),
                              "--node-ip", "127.0.0.1"], capsys)
    assert rc == 2 and f"port {port} (Ray's GCS) is in use" in err and "--port" in err


def test_stop_and_leave_with_nothing_running(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(["stop"], capsys)
    assert rc == 0 and "nothing to stop" in out
    rc, out, _ = run_cli(["leave"], capsys)
    assert rc == 0 and "nothing to leave" in out


def test_join_without_a_head(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lan.create_token(lan.default_token_path())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        rc, _, err = run_cli(["join", "--address", f"127.0.0.1:{port}"], capsys)
    assert rc == 1 and "no tilefleet agent at 127.0.0.1" in err and "is `tilefleet head` running" in err


@pytest.fixture
def fake_head(home: Path) -> Iterator[Any]:
    """Start an agent (no Ray) with a chosen advert and token; the device's token is the default one."""
    mine = lan.create_token(lan.default_token_path())
    agents: list[Agent] = []

    def start(token: bytes | None, **kw: Any) -> str:
        kw.setdefault("token_fingerprint", mine.fingerprint)
        a = Agent(advert(**kw), token, lambda: [], host="127.0.0.1", port=0)
        a.start()
        agents.append(a)
        return f"127.0.0.1:{a.address[1]}"

    start.token = mine  # type: ignore[attr-defined]
    yield start
    for a in agents:
        a.close()


def test_join_refuses_other_versions(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    addr = fake_head(fake_head.token.value, ray_version="9.9.9")
    rc, _, err = run_cli(["join", "--address", addr], capsys)
    assert rc == 2 and "Ray 9.9.9 on the head" in err and "pip install 'ray==9.9.9'" in err


def test_join_refuses_another_clusters_token(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    theirs = b"the-heads-token-0123456789"
    addr = fake_head(theirs, token_fingerprint=tokens.token_fingerprint(theirs))
    rc, _, err = run_cli(["join", "--address", addr], capsys)
    assert rc == 2 and f"your token (fingerprint {fake_head.token.fingerprint}" in err
    assert "copy the head's token" in err


def test_join_refuses_a_rogue_head(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    addr = fake_head(b"rogue-does-not-know-it-0123")  # advertises our fingerprint, holds another token
    rc, _, err = run_cli(["join", "--address", addr], capsys)
    assert rc == 2 and "failed the join challenge" in err and "not joining" in err
    assert not (lan.state_dir() / "join.json").exists()


def test_join_insecure_mismatches(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    addr = fake_head(None, token_fingerprint=INSECURE_FINGERPRINT)
    rc, _, err = run_cli(["join", "--address", addr], capsys)
    assert rc == 2 and "runs without a token" in err and "--insecure" in err


def test_profile_json_with_link_to_a_head(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    profiling.save(sample_profile())
    addr = fake_head(fake_head.token.value)
    rc, out, err = run_cli(["profile", "--json", "--address", addr], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    from sims.catalog import Profile

    prof = Profile(**doc)  # the catalog's own validation
    assert prof.gflops == 4.5 and prof.klass == "raspberry-pi" and prof.link_mbps > 1
    assert "measured against a head" in prof.source
    rc, out, _ = run_cli(["profile"], capsys)
    assert rc == 0 and "not measured: no head known" in out and "4.5 on 4 threads" in out


def test_devices_lan_lists_a_heads_devices(fake_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    addr = fake_head(fake_head.token.value)
    rc, out, _ = run_cli(["devices", "--address", addr, "--json"], capsys)
    assert rc == 0 and json.loads(out)["heads"][0]["devices"] == []
    other = fake_head(b"x" * 20, token_fingerprint=tokens.token_fingerprint(b"x" * 20))
    rc, out, _ = run_cli(["devices", "--address", other], capsys)
    assert rc == 1 and "not your cluster" in out


# --- the real thing: head + join + devices + stop on this machine ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _tf(env: dict[str, str], *argv: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet.cli.lan", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.ray
@pytest.mark.slow
def test_head_join_devices_leave_stop(home: Path, tmp_path: Path) -> None:
    profiling.save(sample_profile(name="itest", klass="host", gflops=20.0, cores=2, threads=2))  # skip measuring
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_port, agent_port = _free_port(), _free_port()
    while agent_port == ray_port:
        agent_port = _free_port()
    state = home / "st" / "tilefleet"
    temps = [str(lan.ray_temp_dir(state, role)) for role in ("head", "node")]
    try:
        recorded = _head_join_devices(env, state, tmp_path, ray_port, f"127.0.0.1:{agent_port}")
        r = _tf(env, "stop", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "stopped tilefleet head" in r.stdout and "join" not in r.stdout, r.stdout
        assert not [pid for pid in recorded if lan.pid_alive(pid)], "a recorded process survived `tilefleet stop`"
        assert not (state / "head.json").exists() and not (state / "join.json").exists()
        assert not [p for t in temps for p in lan.pids_with(t)], "a Ray process of this run survived"
    finally:  # nothing of this run may outlive it, even when it failed
        if (state / "head.json").exists() or (state / "join.json").exists():
            _tf(env, "stop", timeout=120)
        for pid in [p for t in temps for p in lan.pids_with(t)]:
            os.kill(pid, signal.SIGKILL)
        for t in temps:  # Ray's session dirs live outside tmp_path when its path is too long for sockets
            if not Path(t).is_relative_to(tmp_path):
                shutil.rmtree(Path(t).parent, ignore_errors=True)


def _bare_ray_start_refused(env: dict[str, str], ray_port: int, tmp_path: Path) -> bool:
    """Run `ray start` against the head without the token until the head has refused it twice (its
    first try and a retry), then stop it: left alone it retries for about 20 s before giving up."""
    bare_temp = tempfile.mkdtemp(prefix="tf-bare-")  # short: Ray's socket paths must fit
    log = tmp_path / "bare-ray-start.log"
    with log.open("w") as f:
        p = subprocess.Popen([lan.ray_executable(), "start", "--address", f"127.0.0.1:{ray_port}", "--block",
                              "--temp-dir", bare_temp, "--num-cpus", "0"],
                             env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: log.read_text().count("InvalidAuthToken") >= 2 or p.poll() is not None, 60,
                 lambda: log.read_text()[-2000:], step=0.1)
        return "InvalidAuthToken" in log.read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        shutil.rmtree(bare_temp, ignore_errors=True)


def _head_join_devices(env: dict[str, str], state: Path, tmp_path: Path, ray_port: int, agent: str) -> list[int]:
    """Start a head and a device, check what `devices` shows and what is refused, let the device
    leave; the pids recorded."""
    r = _tf(env, "head", "--name", "itest", "--port", str(ray_port), "--agent-port", agent.rpartition(":")[2],
            "--node-ip", "127.0.0.1", "--num-cpus", "1", "--detach")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created the join token" in r.stdout and "cluster itest" in r.stdout
    r = _tf(env, "join", "--address", agent, "--num-cpus", "1", "--device-name", "dev1", "--detach")
    assert r.returncode == 0, r.stdout + r.stderr
    head_st = json.loads((state / "head.json").read_text())
    join_st = json.loads((state / "join.json").read_text())

    r = _tf(env, "devices", "--address", agent, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    (h,) = json.loads(r.stdout)["heads"]
    assert h["advert"]["cluster_name"] == "itest" and h["advert"]["ray_port"] == ray_port
    devs = h["devices"]
    assert len(devs) == 2 and all(x["alive"] for x in devs)
    by_role = {x["labels"]["tilefleet/role"]: x for x in devs}
    assert by_role["head"]["is_head"] and by_role["head"]["labels"]["tilefleet/gflops"] == "20.0"
    dev = by_role["device"]
    assert dev["node_id"] == join_st["node_id"] and dev["labels"]["tilefleet/name"] == "dev1"
    assert float(dev["labels"]["tilefleet/link_mbps"]) > 1 and dev["tiles_done"] == 0

    # a device with another token is refused before anything starts; the cluster is unchanged
    wrong = tmp_path / "wrong-token"
    wrong.write_text("ffffffffffffffffffffffffffffffff")
    wrong.chmod(0o600)
    r = _tf({**env, "XDG_STATE_HOME": str(tmp_path / "other-state")}, "join", "--address", agent,
            "--token-file", str(wrong), timeout=30)
    assert r.returncode == 2 and "is not the one of cluster itest" in r.stderr, r.stderr
    # and Ray itself refuses a node without the token (no ~/.ray/auth_token in this HOME either)
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    assert _bare_ray_start_refused(bare, ray_port, tmp_path)
    r = _tf(env, "devices", "--address", agent, "--json", timeout=30)
    assert len(json.loads(r.stdout)["heads"][0]["devices"]) == 2

    # leave drains the device's node and stops it; the head sees it dead
    r = _tf(env, "leave", timeout=60)
    assert r.returncode == 0 and "the head drained this node" in r.stdout and "stopped tilefleet join" in r.stdout, \
        r.stdout + r.stderr
    r = _tf(env, "devices", "--address", agent, "--json", timeout=30)
    states = {x["node_id"]: x["state"] for x in json.loads(r.stdout)["heads"][0]["devices"]}
    assert states[join_st["node_id"]] == "dead" and list(states.values()).count("alive") == 1
    return [head_st["pid"], head_st["ray_pid"], join_st["pid"], join_st["ray_pid"]]
