"""A cluster that outlives its failures, on a LAN of network namespaces, set up as a user would.

h0 runs ``tilefleet head``; h1 joins under its systemd unit (run by the tests' Restart= supervisor,
``tests/unit_supervisor.py``); h2 joins by hand; h3 joins with ``--client`` and runs the client.
In order: a join killed with SIGKILL comes back through its unit; the head loses power and starts
again, and every device rejoins by itself (the time is printed); a client re-creates its deployment
and runs exact frames, after which Ray holds no orphaned actors or objects; the token is rotated,
and only devices given the new one get back in.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lanops import (TILEFLEET, lan_of, alive_ips, copy_token, devices, global_pid, namespace_init, power_cut, raylets,
                    run_beside, run_client, state, wait_for, wait_state)
from netns import Lan

pytestmark = pytest.mark.netns

SUPERVISOR = str(Path(__file__).with_name("unit_supervisor.py"))
REJOIN_BOUND_S = 60.0


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    yield from lan_of(4)


@pytest.fixture(scope="module")
def cluster(lan: Lan) -> dict[str, Any]:
    h0, h1, h2, h3 = lan.hosts
    head = h0.spawn([TILEFLEET, "head", "--name", "lab"], name="head")
    head_state = wait_state(h0, "head", head)
    for h in (h1, h2, h3):
        copy_token(h0, h)
    for h in (h1, h2):  # one at a time, as separate machines would (they share this VM's cores)
        h.run([TILEFLEET, "profile", "--json"], timeout=120)
    units = lan.workdir / "units"
    h1.run([TILEFLEET, "service", "install", "join", "--cluster", "lab", "--device-name", "h1",
            "--unit-dir", str(units)], timeout=60)
    unit = units / "tilefleet-join-lab.service"
    # RestartSec=5 as written; 1 s here so the test waits less (the policy under test is Restart=)
    unit.write_text(unit.read_text().replace("RestartSec=5", "RestartSec=1"))
    sup = h1.spawn([sys.executable, SUPERVISOR, str(unit)], name="unit")
    j2 = h2.spawn([TILEFLEET, "join", "--cluster", "lab", "--device-name", "h2"], name="join")
    j3 = h3.spawn([TILEFLEET, "join", "--cluster", "lab", "--client", "--device-name", "h3"], name="join")
    joins = {"h1": wait_state(h1, "join", sup), "h2": wait_state(h2, "join", j2), "h3": wait_state(h3, "join", j3)}
    return {"head": head, "head_state": head_state, "sup": sup, "procs": {"h1": sup, "h2": j2, "h3": j3},
            "joins": joins}


def test_a_killed_join_comes_back_through_its_unit(lan: Lan, cluster: dict[str, Any]) -> None:
    h0, h1 = lan[0], lan[1]
    before = cluster["joins"]["h1"]
    sup = cluster["sup"]
    pid = global_pid(namespace_init(sup), before["pid"])
    os.kill(pid, signal.SIGKILL)  # the join dies; its Ray child lives on, orphaned (as after an OOM kill)
    after = wait_state(h1, "join", sup, where=lambda st: st["node_id"] != before["node_id"])
    log = h1.log(sup)
    assert "exited with -9" in log and "restarting" in log and "start 2" in log, log
    assert "cleaned up after tilefleet join" in log, log  # the new join stopped the orphaned Ray first
    assert raylets(h1) == 1
    # the orphaned Ray was stopped just now: the head marks its node dead after its health checks
    # (about 1.5 s), so wait for that, as for the new node's arrival
    def settled() -> list[dict[str, Any]] | None:
        devs = devices(lan[3], h0) or []
        alive = {d["node_id"] for d in devs if d["alive"]}
        return devs if after["node_id"] in alive and before["node_id"] not in alive else None

    devs = wait_for(settled, 30, lambda: f"devices: {devices(lan[3], h0)}")
    by_node = {d["node_id"]: d for d in devs}
    assert by_node[after["node_id"]]["alive"] and not by_node.get(before["node_id"], {"alive": False})["alive"]
    assert alive_ips(devs).count(h1.ip) == 1
    cluster["joins"]["h1"] = after


def test_head_power_cut_devices_rejoin_and_frames_run(lan: Lan, cluster: dict[str, Any]) -> None:
    h0, h1, h2, h3 = lan.hosts
    old = {name: st["node_id"] for name, st in cluster["joins"].items()}
    old_instance = cluster["head_state"]["instance"]
    power_cut(h0)
    t0 = time.time()
    head = h0.spawn([TILEFLEET, "head", "--name", "lab"], name="head")
    head_state = wait_state(h0, "head", head, where=lambda st: st["instance"] != old_instance)  # the old one stays
    head_up = time.time() - t0
    procs = cluster["procs"]
    joins = {h.name: wait_state(h, "join", procs[h.name], timeout=REJOIN_BOUND_S + 30,
                                where=lambda st: st.get("instance") == head_state["instance"]) for h in (h1, h2, h3)}
    back = max(st["joined_at"] for st in joins.values()) - t0
    devs = wait_for(lambda: devices(h3, h0), 30, lambda: "no device list")
    assert alive_ips(devs) == sorted(h.ip for h in lan.hosts), devs  # each once, nothing stale alive
    assert not {d["node_id"] for d in devs} & set(old.values())
    for h in (h1, h2, h3):
        assert raylets(h) == 1, h.name
        assert "joining again" in h.log(procs[h.name]), h.log(procs[h.name])[-2000:]
    each = ", ".join(f"{n}: {st['joined_at'] - t0:.1f} s" for n, st in joins.items())
    print(f"head restarted: its node up {head_up:.1f} s after it was started again; every device back "
          f"{back:.1f} s after ({each})")
    assert back < REJOIN_BOUND_S
    cluster.update(head=head, head_state=head_state, joins=joins)
    res = run_client(lan, h3, 6)
    assert res["frames"] == 6 and res["worst"] <= 1e-4, res
    assert {d["state"] for d in res["devices"]} == {"alive"} and len(res["devices"]) == 3, res["devices"]
    assert res["alive_actors_after"] == 0 and res["plasma_objects_after"] == 0, res
    print(f"after the restart: 6 exact frames in {res['seconds']:.2f} s; afterwards {res['alive_actors_after']} "
          f"live actors and {res['plasma_objects_after']} objects ({res['plasma_mib_after']} MiB) in the object store")


def test_token_rotation_keeps_out_devices_with_the_old_token(lan: Lan, cluster: dict[str, Any]) -> None:
    h0, h1, h2, h3 = lan.hosts
    procs = cluster["procs"]
    old_instance = cluster["head_state"]["instance"]
    res = run_beside(h0, cluster["head"], [TILEFLEET, "token", "rotate", "--restart-head"])
    assert "restarted with it" in res.stdout, res.stdout + res.stderr
    new = wait_for(lambda: (st := state(h0, "head")) and st["instance"] != old_instance and st, 30, lambda: "head")
    copy_token(h0, h1)  # h1 gets the new token; h2 is forgotten
    j1 = wait_state(h1, "join", procs["h1"], timeout=REJOIN_BOUND_S + 30,
                    where=lambda st: st.get("instance") == new["instance"])
    wait_for(lambda: "is not the one of cluster lab" in h2.log(procs["h2"]), 60, lambda: h2.log(procs["h2"])[-2000:])
    devs = wait_for(lambda: devices(h1, h0), 30, lambda: "no device list")
    assert h1.ip in alive_ips(devs) and h2.ip not in alive_ips(devs), devs
    assert procs["h2"].poll() is None  # h2's join waits, and gets back in once it has the new token
    copy_token(h0, h2)
    wait_state(h2, "join", procs["h2"], timeout=REJOIN_BOUND_S + 30,
               where=lambda st: st.get("instance") == new["instance"])
    assert j1["node_id"] in {d["node_id"] for d in devices(h1, h0) or [] if d["alive"]}
