"""``tilefleet up``: Ray's cluster launcher brings up a tilefleet cluster over real SSH.

h0 is the user's laptop; h1 becomes the head and h2, h3 the workers, each running a real OpenSSH
server (tests/netns.py). ``tilefleet up`` writes the YAML and runs ``ray up``, which logs into h1
to start ``tilefleet head``; Ray's monitor on h1 then logs into h2 and h3 to run ``tilefleet join``.
The result must be the same cluster ``tilefleet head``/``join`` by hand make: every node labelled
with its measured profile, token authentication on.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from netns import Lan, make_lan, netns_unavailable

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
TILEFLEET = str(BIN / "tilefleet")


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("rsync") is None:
        pytest.skip("ray up copies files with rsync (apt-get install rsync)")
    with make_lan(4) as net:
        yield net


def test_up_brings_up_the_cluster_over_ssh(lan: Lan, tmp_path: Path) -> None:
    laptop, head, workers = lan[0], lan[1], lan[2:]
    access = {h.name: lan.sshd(h) for h in (head, *workers)}
    for h in (head, *workers):
        (h.home / ".bashrc").write_text(f"export PATH={BIN}:$PATH\n")  # tilefleet and ray on the login PATH
    # the laptop's token and key; known hosts are the fixture's (ray up passes its own ssh options)
    token = laptop.home / ".config" / "tilefleet" / "token"
    token.parent.mkdir(parents=True, mode=0o700)
    token.write_text("a1" * 32)
    token.chmod(0o600)
    key = access[head.name].key
    out = laptop.home / "lab.yaml"
    res = laptop.run([TILEFLEET, "up", "--head", head.ip, "--workers", ",".join(w.ip for w in workers),
                      "--ssh-user", access[head.name].user, "--ssh-key", str(key), "--name", "lab",
                      "--remote-bin", TILEFLEET, "--out", str(out)], timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    cfg = yaml.safe_load(out.read_text())
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert not any("ray stop" in c for c in starts) and "a1a1" not in out.read_text()
    # Ray's monitor on the head starts the workers after `ray up` returns: wait for all three nodes
    deadline = time.monotonic() + 180
    devices: list[dict] = []
    while time.monotonic() < deadline:
        r = laptop.run([TILEFLEET, "devices", "--json", "--address", f"{head.ip}:6390"], timeout=60, check=False)
        try:
            heads = json.loads(r.stdout)["heads"]
            devices = [d for d in heads[0]["devices"] or [] if d["alive"]]
        except (ValueError, KeyError, IndexError, TypeError):
            devices = []
        if len(devices) == 3:
            break
        time.sleep(2)
    monitor = head.home / ".local" / "state" / "tilefleet"
    assert {d["ip"] for d in devices} == {head.ip, *(w.ip for w in workers)}, (
        devices, r.stdout, r.stderr, sorted(p.name for p in monitor.glob("*")))
    for d in devices:
        assert float(d["labels"]["tilefleet/gflops"]) > 0
    # each device holds the token owner-only, copied by ray up's file mounts
    for h in (head, *workers):
        copied = h.home / ".config" / "tilefleet" / "token"
        assert copied.read_text() == token.read_text() and copied.stat().st_mode & 0o777 == 0o600
