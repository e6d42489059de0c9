"""The LAN-in-one-machine fixture itself: isolation, PID namespaces, mDNS, shaping, sshd, cleanup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netns import Host, Lan, Spawned, cleanup_stale, make_lan

pytestmark = pytest.mark.netns


def _wait_for(pred: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what()}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    """No such process, or only its zombie is left (awaiting its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# --- 1. reachability and isolation ----------------------------------------------------------------


def test_hosts_reach_each_other_and_nothing_else(lan: Lan) -> None:
    h0, h2 = lan[0], lan[2]
    assert h0.ping(h2.ip) is not None, f"no ICMP echo reply from {h2.ip} in {lan!r}"

    links = {line.split(": ")[1].split("@")[0] for line in h0.run(["ip", "-o", "link"]).stdout.splitlines()}
    assert links == {"lo", "eth0"}
    root_addrs = re.findall(r"\binet ([0-9.]+)/", subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                                               text=True, check=True).stdout)
    inside = h0.run(["ip", "-4", "-o", "addr"]).stdout
    assert not any(f" {a}/" in inside for a in root_addrs if a != "127.0.0.1")
    assert all(h0.ping(a, timeout=0.5) is None for a in root_addrs if a != "127.0.0.1")
    bridge_addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", lan.bridge], capture_output=True,
                                  text=True, check=True).stdout
    assert bridge_addrs == "", "the bridge must carry no address in the root namespace"


# --- 2. PID namespaces ----------------------------------------------------------------------------


def test_spawn_gets_a_pid_namespace_that_dies_with_its_pid_1(lan: Lan) -> None:
    h1 = lan[1]
    # pid 1 ends up as `sleep`, which has no SIGTERM handler, so only SIGKILL ends it (pid-1 rule);
    # the setsid'd sleep has left the process group, so only the kernel's PID-namespace teardown ends it.
    proc = h1.spawn(["sh", "-c", "echo pid=$$; setsid sleep 301 & sleep 0.2; ps -e -o pid=,comm=; echo listed; "
                                 "exec sleep 300"], name="pidns")
    _wait_for(lambda: "listed" in h1.log(proc), 10, lambda: h1.log(proc))
    lines = h1.log(proc).splitlines()
    assert lines[0] == "pid=1"
    ps = [line.split() for line in lines[1:lines.index("listed")]]
    assert {int(pid) for pid, _ in ps} <= {1, 2, 3, 4}, ps  # sh, the setsid child, sleep 0.2 (gone), ps
    assert {comm for _, comm in ps} <= {"sh", "setsid", "sleep", "ps"}, ps

    (init,) = _children(proc.pid)  # proc.pid is the outer `unshare`, which forked the namespace's pid 1
    nspid = Path(f"/proc/{init}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    assert nspid == [str(init), "1"]
    (escaped,) = _children(init)
    assert os.getpgid(escaped) != proc.pid, "the setsid'd child should be outside the process group"

    t0 = time.monotonic()
    lan.stop(proc, timeout=1)
    assert time.monotonic() - t0 < 5
    _wait_for(lambda: _gone(init) and _gone(escaped), 5, lambda: f"pids {init}, {escaped} still alive")


# --- 3. mDNS across namespaces --------------------------------------------------------------------

ADVERTISE = r"""
import signal, sys, threading, time
import zeroconf
from fleet.lan.discovery import HeadAdvert, ZeroconfAdvertiser
from fleet.lan.tokens import token_fingerprint
ip = sys.argv[1]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())  # pid 1 of its PID namespace: must handle SIGTERM
t0 = time.monotonic()
zc = zeroconf.Zeroconf(interfaces=[ip])
advert = HeadAdvert(cluster_name="netns-lan", cluster_id="0123456789abcdef", host=ip, ray_port=6379,
                    agent_port=52365, tilefleet_version="0.1.0", wire_version=1, ray_version="2.60.0",
                    python_version="3.11.7", token_fingerprint=token_fingerprint(b"netns-token"))
with ZeroconfAdvertiser(advert, zc):
    print(f"registered in {time.monotonic() - t0:.3f} s", flush=True)
    stop.wait()
zc.close()
"""

BROWSE = r"""
import json, signal, sys, threading, time
from dataclasses import asdict
import zeroconf
from fleet.lan.discovery import HeadRegistry, ZeroconfBrowser
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
def say(event, **kw):
    print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)
class Printer:
    def added(self, advert): say("added", **asdict(advert))
    def updated(self, advert): say("updated", **asdict(advert))
    def removed(self, cluster_id): say("removed", cluster_id=cluster_id)
zc = zeroconf.Zeroconf(interfaces=[sys.argv[1]])
with ZeroconfBrowser(HeadRegistry([Printer()]), zc):
    say("browsing")
    stop.wait()
zc.close()
"""


def _events(host: Host, proc: Spawned) -> list[dict[str, object]]:
    return [json.loads(line) for line in host.log(proc).splitlines() if line.startswith("{")]


def _event(host: Host, proc: Spawned, name: str) -> dict[str, object] | None:
    return next((e for e in _events(host, proc) if e["event"] == name), None)


def test_zeroconf_discovery_across_namespaces(lan: Lan) -> None:
    h0, h1 = lan[0], lan[1]
    browser = h1.spawn([sys.executable, "-c", BROWSE, h1.ip], name="browse")
    try:
        _wait_for(lambda: _event(h1, browser, "browsing") is not None, 20, lambda: h1.log(browser))
        started = time.time()
        advertiser = h0.spawn([sys.executable, "-c", ADVERTISE, h0.ip], name="advertise")
        _wait_for(lambda: _event(h1, browser, "added") is not None, 20,
                  lambda: f"browser:\n{h1.log(browser)}\nadvertiser:\n{h0.log(advertiser)}")
        added = _event(h1, browser, "added")
        assert added is not None
        assert (added["host"], added["ray_port"], added["agent_port"]) == (h0.ip, 6379, 52365)
        assert (added["cluster_name"], added["cluster_id"]) == ("netns-lan", "0123456789abcdef")

        stopped = time.time()
        lan.stop(advertiser)  # SIGTERM: the advertiser unregisters, sending goodbye packets
        _wait_for(lambda: _event(h1, browser, "removed") is not None, 10, lambda: h1.log(browser))
        removed = _event(h1, browser, "removed")
        assert removed is not None and removed["cluster_id"] == "0123456789abcdef"
        print(f"advert seen {float(added['t']) - started:.2f} s after starting the advertiser "
              f"({h0.log(advertiser).strip()}); removal seen {float(removed['t']) - stopped:.2f} s after stopping it")
    finally:
        lan.stop(browser)


# --- 4. traffic shaping ---------------------------------------------------------------------------

RECEIVE = r"""
import json, socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(30)
conn, _ = srv.accept()
conn.settimeout(30)
received, first = 0, None
while chunk := conn.recv(1 << 16):
    first = first or time.monotonic()
    received += len(chunk)
print(json.dumps({"bytes": received, "seconds": time.monotonic() - first}), flush=True)
"""

SEND = r"""
import socket, sys, time
deadline = time.monotonic() + 10
while True:  # until the receiver listens
    try:
        sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.02)
sock.sendall(b"x" * int(sys.argv[3]))
sock.close()
"""


def _throughput_mbit(lan: Lan, src: Host, dst: Host, nbytes: int = 2_000_000) -> float:
    """TCP goodput from ``src`` to ``dst`` in Mbit/s, timed by the receiver (first byte to EOF)."""
    receiver = dst.spawn([sys.executable, "-c", RECEIVE, dst.ip, "5201"], pidns=False, name="receive")
    try:
        src.run([sys.executable, "-c", SEND, dst.ip, "5201", str(nbytes)], timeout=60)
        receiver.wait(timeout=60)
        result = json.loads(dst.log(receiver).strip().splitlines()[-1])
    finally:
        lan.stop(receiver)
    assert result["bytes"] == nbytes
    return nbytes * 8 / result["seconds"] / 1e6


def test_tbf_shaping_limits_both_directions(lan: Lan) -> None:
    h0, h2 = lan[0], lan[2]
    unshaped = _throughput_mbit(lan, h0, h2)
    lan.shape(h2, 8)
    try:
        towards = _throughput_mbit(lan, h0, h2)  # limited by the qdisc on the bridge-side veth
        away = _throughput_mbit(lan, h2, h0)  # limited by the qdisc on h2's eth0
    finally:
        lan.unshape(h2)
    print(f"unshaped {unshaped:.0f} Mbit/s; shaped to 8 Mbit/s: {towards:.2f} towards h2, {away:.2f} from h2")
    for rate in (towards, away):
        assert 4 <= rate <= 10.4, f"shaped to 8 Mbit/s but measured {rate:.2f} Mbit/s"
    assert unshaped > 4 * max(towards, away), f"unshaped {unshaped:.1f} Mbit/s"
    assert "tbf" not in h2.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


# --- 5. sshd --------------------------------------------------------------------------------------


def test_sshd_in_a_host_accepts_key_login_from_another(lan: Lan) -> None:
    h0, h1 = lan[0], lan[1]
    access = lan.sshd(h1)
    assert (access.host, access.port) == (h1.ip, 22)
    out = h0.run(access.argv("hostname -I; echo HOME=$HOME")).stdout.split()
    assert h1.ip in out and f"HOME={h1.home}" in out, out
    assert lan.sshd(h1) is access  # one server per host


# --- 6. cleanup -----------------------------------------------------------------------------------


def test_make_lan_cleans_up_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), make_lan(2, shaped={1: 8}) as lan:
        names = {h.ns for h in lan.hosts}
        links = {lan.bridge} | {link for link in _links() if link.startswith(lan.bridge.removesuffix("-br"))}
        assert len(links) == 3 and names <= _namespaces()
        assert "tbf" in subprocess.run(["tc", "qdisc", "show", "dev", lan.veth(lan[1])],
                                       capture_output=True, text=True, check=True).stdout
        h1 = lan[1]
        # Each ends on SIGTERM: a plain child, a pid 1 with a handler, and (not on SIGTERM) a setsid'd
        # daemon outside every group, which close() finds by its network namespace.
        h1.spawn(["sleep", "300"], pidns=False)
        h1.spawn(["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"])
        h1.spawn(["sh", "-c", "setsid sleep 300 & exec sleep 300"], pidns=False)
        # sleep; unshare, sh and its sleep; sleep and the setsid'd sleep
        _wait_for(lambda: len(_netns_pids(h1.ns)) == 6, 5, lambda: f"processes in h1: {_netns_pids(h1.ns)}")
        pids = _netns_pids(h1.ns)
        workdir = lan.workdir
        t0 = time.monotonic()
        raise RuntimeError("boom")
    assert time.monotonic() - t0 < 5, "nothing here should have waited for the SIGTERM grace period"
    assert not names & _namespaces()
    assert not links & _links()
    assert not workdir.exists()
    _wait_for(lambda: all(_gone(p) for p in pids), 5, lambda: f"{[p for p in pids if not _gone(p)]} alive")
    lan.close()  # idempotent


def test_cleanup_stale_removes_crashed_runs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with make_lan(1) as crashed, make_lan(1) as live:
        (crashed.workdir / "owner").write_text(f"{dead.pid} 0\n")  # as if its test run had crashed
        removed = cleanup_stale()
        assert crashed[0].ns in removed and crashed.bridge in removed and str(crashed.workdir) in removed
        assert crashed[0].ns not in _namespaces() and crashed.bridge not in _links()
        assert not crashed.workdir.exists()
        assert live[0].ns in _namespaces() and live.bridge in _links() and live.workdir.exists()
