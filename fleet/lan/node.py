"""The processes behind ``tilefleet head`` and ``join``: Ray as a child in its own process group, the
agent and the advert around it, a state file while it runs, and a clean stop (never ``ray stop``).

Nothing here prints: the CLI passes ``on_up`` to announce the running process and reads warnings
from the ``tilefleet.lan`` logger.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs, raynode, state as statefiles, trust
from .agent import Agent, AgentClient
from .discovery import HeadAdvert, ZeroconfAdvertiser
from .state import LanError
from .tokens import Token
from .trust import INSECURE_FINGERPRINT

log = logging.getLogger("tilefleet.lan")


@dataclass(frozen=True)
class HeadOptions:
    name: str
    node_ip: str
    token: Token | None  # None: --insecure
    state: Path  # the state directory (head.json, logs, Ray's temp dir)
    port: int = raynode.DEFAULT_RAY_PORT
    agent_port: int = raynode.DEFAULT_AGENT_PORT
    num_cpus: int | None = None
    autoscaling_config: str | None = None


@dataclass(frozen=True)
class JoinOptions:
    node_ip: str
    token: Token | None
    state: Path
    device_name: str | None = None
    client: bool = False  # a node that offers no CPUs (to run a driver on this machine)
    num_cpus: int | None = None


def serve_until_stopped(stopper: procs.Stopper, child: subprocess.Popen[bytes], what: str, ray_log: Path,
                         hint: str = "") -> int:
    """Block until SIGTERM/SIGINT (0) or until the Ray child dies (1, with its log tail and ``hint``)."""
    while not stopper.event.wait(0.5):
        if child.poll() is not None:
            log.error("%s: Ray exited unexpectedly (code %s)%s; the end of %s:\n%s", what, child.returncode, hint,
                      ray_log, procs.log_tail(ray_log))
            return 1
    return 0


def run_head(o: HeadOptions, prof: Any, on_up: Callable[[dict[str, Any]], None]) -> int:
    """Run a head until SIGTERM/SIGINT (0) or until Ray dies (1): Ray, the agent, the zeroconf advert.
    ``prof`` is this machine's :class:`~fleet.lan.profiling.DeviceProfile`; ``on_up`` gets the state
    written to ``head.json`` once everything is up."""
    name, node_ip, token, state = o.name, o.node_ip, o.token, o.state
    versions = trust.local_versions()
    advert = HeadAdvert(cluster_name=name, cluster_id=raynode.cluster_id(state), host=node_ip, ray_port=o.port,
                        agent_port=o.agent_port, tilefleet_version=versions["tilefleet_version"],
                        wire_version=int(versions["wire_version"]), ray_version=versions["ray_version"],
                        python_version=versions["python_version"],
                        token_fingerprint=token.fingerprint if token else INSECURE_FINGERPRINT)
    labels = raynode.device_labels(prof, name=socket.gethostname(), role="head")
    gcs_address = f"{node_ip}:{o.port}"
    gcs: dict[str, Any] = {}

    def devices() -> list[dict[str, Any]]:
        if "client" not in gcs:
            gcs["client"] = raynode.gcs_client(gcs_address)
        return raynode.list_devices(gcs["client"])

    try:
        agent = Agent(advert, token.value if token else None, devices, host=node_ip, port=o.agent_port)
    except OSError as e:
        raise LanError(f"cannot open the agent's port {node_ip}:{o.agent_port} ({e.strerror or e}); "
                       "pick another with --agent-port") from None
    stopper = procs.Stopper()
    temp = statefiles.ray_temp_dir(state, "head")
    temp.mkdir(parents=True, exist_ok=True, mode=0o700)
    ray_log = state / "ray-head.log"
    raynode.use_ray_auth(token.path if token else None)
    argv = raynode.ray_head_argv(raynode.ray_executable(), port=o.port, node_ip=node_ip, temp_dir=temp, labels=labels,
                             num_cpus=o.num_cpus, autoscaling_config=str(Path(o.autoscaling_config).expanduser())
                             if o.autoscaling_config else None)
    child = procs.start_child(argv, raynode.ray_env(os.environ, token.path if token else None), ray_log)
    zc = advertiser = None
    try:
        try:
            running = lambda: child.poll() is None and not stopper.event.is_set()  # noqa: E731
            raynode.wait_port(node_ip, o.port, procs.START_TIMEOUT_S, running)
            _wait_head_node(devices, running)
        except LanError as e:
            raise LanError(f"the Ray head {e}; the end of {ray_log}:\n{procs.log_tail(ray_log)}", 1) from None
        agent.start()
        try:
            import zeroconf

            zc = zeroconf.Zeroconf(interfaces=[node_ip])
            advertiser = ZeroconfAdvertiser(advert, zc)
            advertiser.start()
        except Exception as e:  # multicast may be unavailable; --address still works
            log.warning("warning: cannot advertise over zeroconf on %s (%s: %s); devices can join with "
                        "--address %s:%s", node_ip, type(e).__name__, e, node_ip, o.agent_port)
            advertiser = None
        st = {**procs.own_identity(), "role": "head", "node_ip": node_ip, "ray_port": o.port,
              "agent_port": o.agent_port, "cluster_name": name, "cluster_id": advert.cluster_id,
              "token_path": str(token.path) if token else None, "fingerprint": advert.token_fingerprint,
              "insecure": token is None, "temp_dir": str(temp), "log_path": str(ray_log), "ray_pid": child.pid,
              "ray_pgid": child.pid, "advertised": advertiser is not None}
        statefiles.write_state(state / "head.json", st)
        on_up(st)
        return serve_until_stopped(stopper, child, "tilefleet head", ray_log)
    finally:
        if advertiser is not None:
            advertiser.close()
        if zc is not None:
            zc.close()
        agent.close()
        procs.terminate(child.pid, pgid=child.pid, marker=str(temp))
        st_now = statefiles.read_state(state / "head.json")
        if st_now is not None and st_now.get("pid") == os.getpid():
            statefiles.remove_state(state / "head.json")


def _wait_head_node(devices: Callable[[], list[dict[str, Any]]], running: Callable[[], bool]) -> None:
    """Until the head's own node is alive in the GCS (port open is not enough: the raylet comes after)."""
    deadline = time.monotonic() + procs.START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if not running():
            raise LanError("exited or was stopped before it was up", 1)
        try:
            if any(d["is_head"] and d["alive"] for d in devices()):
                return
        except Exception as e:  # the GCS may not answer yet
            last = f" (last error: {type(e).__name__}: {str(e)[:200]})"
        time.sleep(0.3)
    raise LanError(f"did not report its node alive within {procs.START_TIMEOUT_S:g} s{last}", 1)


def run_join(o: JoinOptions, advert: HeadAdvert, client: AgentClient, prof: Any,
             on_up: Callable[[dict[str, Any]], None]) -> int:
    """Run this device's Ray node in the head's cluster until SIGTERM/SIGINT (0) or until Ray dies (1).
    ``advert`` and ``client`` are a head that passed :func:`~fleet.lan.trust.check_head`."""
    token, node_ip, state = o.token, o.node_ip, o.state
    link = client.probe()
    join_id = secrets.token_hex(8)
    name = o.device_name or socket.gethostname()
    role = "client" if o.client else "device"
    labels = raynode.device_labels(prof, name=name, role=role, join_id=join_id,
                               link_mbps=min(link.down_mbps, link.up_mbps), latency_ms=link.latency_ms)
    temp = statefiles.ray_temp_dir(state, "node")
    temp.mkdir(parents=True, exist_ok=True, mode=0o700)
    ray_log = state / "ray-node.log"
    argv = raynode.ray_node_argv(raynode.ray_executable(), head=f"{advert.host}:{advert.ray_port}", node_ip=node_ip,
                             temp_dir=temp, labels=labels, num_cpus=0 if o.client else o.num_cpus)
    stopper = procs.Stopper()
    child = procs.start_child(argv, raynode.ray_env(os.environ, token.path if token else None), ray_log)
    try:
        node_id = _wait_joined(client, token, join_id, lambda: child.poll() is None and not stopper.event.is_set(),
                               ray_log)
        client.close()
        st = {**procs.own_identity(), "role": role, "name": labels["tilefleet/name"], "node_id": node_id,
              "node_ip": node_ip, "head_host": advert.host, "ray_port": advert.ray_port,
              "agent_host": client.host, "agent_port": client.port, "cluster_name": advert.cluster_name,
              "cluster_id": advert.cluster_id, "token_path": str(token.path) if token else None,
              "insecure": token is None, "temp_dir": str(temp), "log_path": str(ray_log), "ray_pid": child.pid,
              "ray_pgid": child.pid, "join_id": join_id, "down_mbps": link.down_mbps, "up_mbps": link.up_mbps,
              "latency_ms": link.latency_ms}
        statefiles.write_state(state / "join.json", st)
        on_up(st)
        hint = (f". If the head at {advert.host} went away (or this device lost the network), Ray gives up "
                "after about a minute: check with `tilefleet devices`, then run `tilefleet join` again once "
                "the head is back")
        return serve_until_stopped(stopper, child, "tilefleet join", ray_log, hint)
    finally:
        client.close()
        procs.terminate(child.pid, pgid=child.pid, marker=str(temp))
        st_now = statefiles.read_state(state / "join.json")
        if st_now is not None and st_now.get("pid") == os.getpid():
            statefiles.remove_state(state / "join.json")


def _wait_joined(client: AgentClient, token: Token | None, join_id: str, running: Callable[[], bool],
                 ray_log: Path) -> str:
    """The new node's id, once the head lists it alive (found by its one-off join id label)."""
    deadline = time.monotonic() + procs.START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not running():
            raise LanError(f"Ray could not join the head (it exited, or this was stopped); the end of {ray_log}:\n"
                           f"{procs.log_tail(ray_log)}", 1)
        for d in client.devices(token.value if token else None, insecure=token is None):
            if d.get("labels", {}).get("tilefleet/join_id") == join_id and d.get("alive"):
                return str(d["node_id"])
        time.sleep(0.5)
    raise LanError(f"the head did not list this node within {procs.START_TIMEOUT_S:g} s; the end of {ray_log}:\n"
                   f"{procs.log_tail(ray_log)}", 1)


def stop_one(path: Path, what: str) -> str | None:
    """Stop the process of a state file (and its Ray leftovers, even if it died); what happened."""
    st = statefiles.read_state(path, live_only=False)
    if st is None:
        return None
    alive = procs.pid_alive(st["pid"], st.get("pid_start"))
    killed = procs.terminate(st["pid"], start=st.get("pid_start"), pgid=st.get("ray_pgid"),
                           marker=st.get("temp_dir"), timeout=procs.STOP_TIMEOUT_S)
    statefiles.remove_state(path)
    status = f"stopped {what} (pid {st['pid']})" if alive else f"cleaned up after {what} (pid {st['pid']} was gone)"
    return status + (f"; killed {len(killed)} leftover process(es): {killed}" if killed else "")
