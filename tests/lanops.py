"""Shared steps of the LAN hardening tests on a netns LAN (``tests/netns.py``): what a user does
(start a head, copy a token, join), what a power cut does (kill every process of a host), and a
client script that runs exact frames and then looks for leftovers in Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from netns import Host, Lan, Spawned

TILEFLEET = str(Path(sys.executable).with_name("tilefleet"))
ROOT = Path(__file__).resolve().parents[1]
# Every program these tests start (tilefleet, Ray's workers, client scripts) runs this checkout's
# code, not whatever the environment's `tilefleet` script was installed from (a git worktree shares
# its environment with the main checkout).
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def state(host: Host, name: str) -> dict[str, Any] | None:
    p = host.home / ".local" / "state" / "tilefleet" / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def wait_for(pred: Callable[[], Any], timeout: float, what: Callable[[], str], step: float = 0.2) -> Any:
    """Until ``pred()`` is truthy (its value is returned); an AssertionError with ``what()`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {what()}")
        time.sleep(step)


def wait_state(host: Host, name: str, proc: Spawned, timeout: float = 120,
               where: Callable[[dict[str, Any]], bool] = lambda st: True) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = state(host, name)
        if st is not None and where(st):
            return st
        assert proc.poll() is None, f"{host.name}: tilefleet {name} exited:\n{host.log(proc)[-3000:]}"
        return None

    return wait_for(ready, timeout, lambda: f"{host.name}: tilefleet {name}:\n{host.log(proc)[-3000:]}")


def copy_token(src: Host, dst: Host) -> Path:
    token = src.home / ".config" / "tilefleet" / "token"
    target = dst.home / ".config" / "tilefleet" / "token"
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(token, tmp)
    tmp.chmod(0o600)
    tmp.replace(target)  # atomic, as a careful user's copy: a join never reads half a token
    return target


def devices(host: Host, head: Host, timeout: float = 30) -> list[dict[str, Any]] | None:
    """The head's device list as ``tilefleet devices`` shows it on ``host``, or None if it cannot list."""
    res = host.run([TILEFLEET, "devices", "--json", "--address", f"{head.ip}:6390", "--timeout", "3"],
                   timeout=timeout, check=False)
    try:
        heads = json.loads(res.stdout or "{}").get("heads", [])
    except ValueError:
        return None
    return heads[0]["devices"] if len(heads) == 1 and heads[0]["devices"] is not None else None


def alive_ips(devs: list[dict[str, Any]] | None) -> list[str]:
    return sorted(d["ip"] for d in devs or [] if d.get("alive"))


def power_cut(host: Host) -> None:
    """Every process of the host dies at once."""
    pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True,
                                        text=True).stdout.split(), 10, lambda: f"{host.name} still has processes")


def raylets(host: Host) -> int:
    """How many raylet processes run in the host (one per Ray node)."""
    pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
    n = 0
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        n += comm == "raylet"
    return n


def global_pid(init_pid: int, ns_pid: int) -> int:
    """The root namespace's pid of the process that is ``ns_pid`` in the PID namespace of ``init_pid``."""
    ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ns:
                continue
            nspid = re.search(r"^NSpid:\s+(.*)$", (entry / "status").read_text(), re.M)
        except OSError:
            continue
        if nspid and int(nspid[1].split()[-1]) == ns_pid:
            return int(entry.name)
    raise LookupError(f"no pid {ns_pid} in the PID namespace of {init_pid}")


def namespace_init(proc: Spawned) -> int:
    """The pid 1 of a process spawned with its own PID namespace (``unshare`` forked it)."""
    return int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])


def run_beside(host: Host, proc: Spawned, argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``host`` in the PID namespace of ``proc`` (as another shell on that machine
    would: it sees the processes whose pids the state files record)."""
    return subprocess.run(["nsenter", "-t", str(namespace_init(proc)), "-p", "-m", "-n", *argv], env=host.env(),
                          capture_output=True, text=True, timeout=timeout)


CLIENT = r"""
import json, re, sys, time
import ray, ray._private.internal_api, ray._private.state, torch
import fleet, tiling
from tiling import zoo

zm = zoo.get("yolov2-16", input_size=256)
x = zoo.example(zm)
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
frames = [torch.randn(x.shape, generator=g) for _ in range(n + 2)]
refs = [zm.model(f) for f in frames]  # before the timed window
with fleet.connect(cluster="lab", timeout=10) as c:
    devices = c.devices()
    dep = c.deploy(zm.model, x, stages=[8], grids=[(3, 3), (2, 2)])
    list(dep.stream(frames[:2], in_flight=4))  # warm-up: weights loaded, workers warm
    t0 = time.perf_counter()
    outs = list(dep.stream(frames[2:], in_flight=4))
    seconds = time.perf_counter() - t0
    worst = max(tiling.rel_error(y, r) for y, r in zip(outs, refs[2:]))
    stats = dep.stats()["devices"]
    dep.close()
from fleet.runtime.client import _lan_head  # a second, bare driver: what is left in Ray now?
address, node_ip = _lan_head("lab", None, False, 10)
ray.init(address=address, _node_ip_address=node_ip, log_to_driver=False)
deadline = time.monotonic() + 30
while True:
    alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
    if not alive or time.monotonic() > deadline:
        break
    time.sleep(0.5)
summary = ray._private.internal_api.memory_summary(stats_only=True)
m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", summary)
print(json.dumps({"frames": len(outs), "worst": worst, "seconds": seconds, "devices": devices, "stats": stats,
                  "alive_actors_after": len(alive), "plasma_mib_after": int(m[1]) if m else None,
                  "plasma_objects_after": int(m[2]) if m else None, "memory_summary": summary[-600:]}), flush=True)
"""


def run_client(lan: Lan, host: Host, frames: int, timeout: float = 300) -> dict[str, Any]:
    """Run :data:`CLIENT` on ``host`` (a node joined with ``--client``); its result."""
    script = lan.workdir / "lanops_client.py"
    script.write_text(CLIENT)
    # no PID namespace of its own: the driver finds its node's raylet by scanning the processes it sees
    proc = host.spawn([sys.executable, str(script), str(frames)], name="client", pidns=False)
    wait_for(lambda: proc.poll() is not None, timeout, lambda: host.log(proc)[-3000:], step=0.5)
    text = host.log(proc)
    assert proc.returncode == 0, text[-4000:]
    return json.loads([line for line in text.splitlines() if line.startswith('{"frames"')][-1])


def lan_of(n: int) -> Iterator[Lan]:
    """A module's LAN of ``n`` hosts (skipped, with the reason, where namespaces are unavailable)."""
    import pytest

    from netns import make_lan, netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with make_lan(n) as net:
        yield net
