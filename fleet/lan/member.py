"""The process behind ``tilefleet join``: a Ray node in the head's cluster, and its supervisor.

Why supervise: Ray reads the head's address once and gives up when the head goes away (a raylet
exits about a minute after it loses the GCS), and a head that restarts is a new cluster that knows
none of the old nodes. So the join process watches both its Ray child and the head's agent: when
Ray exits, or the head's advert shows another ``instance`` (it restarted), it stops its old node,
waits for the head to answer again (the last agent address, then zeroconf by the cluster's name,
with backoff and one log line per try), puts it through the one trust check
(:func:`~fleet.lan.trust.check_head`, with the token file read again so a rotated token is used
once it is copied here) and starts a new node. The decisions (when to rejoin, how long to wait)
are the pure :func:`watch_verdict` and :func:`backoff_delay`.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from . import procs, raynode, state as statefiles, tls
from .agent import AgentClient, AgentError
from .discovery import HeadAdvert
from .state import LanError
from .tokens import Token, load_token
from .trust import pick_head

log = logging.getLogger("tilefleet.lan")

WATCH_S: Final = 0.5
"""How often the Ray child is looked at."""
HEAD_CHECK_S: Final = 2.0
"""How often the head's agent is asked for its instance (a new TCP connection, one small message)."""
BACKOFF_FIRST_S: Final = 1.0
BACKOFF_FACTOR: Final = 1.5
BACKOFF_MAX_S: Final = 10.0
"""Waits between tries to find the head again: 1, 1.5, 2.3, ... s, at most 10 s (a head takes about
10-20 s to restart; a longer cap would add that much to the time until devices are back)."""
RAY_KILL_S: Final = 3.0
"""How long a node of a cluster that is gone gets to stop before it is killed (nothing to drain)."""


@dataclass(frozen=True)
class JoinOptions:
    node_ip: str
    token: Token | None
    state: Path
    device_name: str | None = None
    client: bool = False  # a node that offers no CPUs (to run a driver on this machine)
    num_cpus: int | None = None
    address: str | None = None  # --address: find the head there again; else zeroconf by cluster name
    timeout: float = 5.0


class Outcome(enum.Enum):
    STOPPED = "stopped"
    RAY_EXITED = "Ray exited"
    HEAD_RESTARTED = "the head restarted"


def watch_verdict(ray_code: int | None, joined_instance: str, seen_instance: str | None) -> Outcome | None:
    """What one look at the node and the head says: rejoin (and why), or None (all is well).

    ``seen_instance`` is None when the head's agent did not answer: a head that is away may come
    back as the same instance (a network blip), so that alone is no reason to stop the node; if it
    stays away, Ray exits by itself.
    """
    if ray_code is not None:
        return Outcome.RAY_EXITED
    if joined_instance and seen_instance is not None and seen_instance != joined_instance:
        return Outcome.HEAD_RESTARTED
    return None


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt`` (0-based) to find the head again."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * BACKOFF_FACTOR ** max(0, attempt))


def run_join(o: JoinOptions, advert: HeadAdvert, client: AgentClient, prof: Any,
             on_up: Callable[[dict[str, Any]], None]) -> int:
    """Run this device's Ray node in the head's cluster until SIGTERM/SIGINT (0), joining again
    whenever Ray exits or the head restarts. ``advert`` and ``client`` are a head that passed
    :func:`~fleet.lan.trust.check_head`; a failure of the first join raises (nothing runs yet)."""
    stopper = procs.Stopper()
    link = client.probe()
    first = True
    while True:
        try:
            outcome = _join_once(o, advert, client, prof, stopper, on_up, link)
        except (LanError, AgentError) as e:
            if first:
                raise
            log.warning("tilefleet join: joining cluster %s again failed: %s", advert.cluster_name, e)
            outcome = Outcome.RAY_EXITED
        first = False
        if outcome is Outcome.STOPPED or stopper.event.wait(0.5):  # `leave` drains, then stops us
            return 0
        lost = time.monotonic()
        log.warning("tilefleet join: %s; waiting for the head of cluster %s to answer again", outcome.value,
                    advert.cluster_name)
        found = _wait_for_head(o, advert, stopper)
        if found is None:
            return 0
        advert, client, o = found
        log.warning("tilefleet join: the head of cluster %s at %s answers again (instance %s, %.1f s later); "
                    "joining again", advert.cluster_name, advert.host, advert.instance or "?", time.monotonic() - lost)


def _join_once(o: JoinOptions, advert: HeadAdvert, client: AgentClient, prof: Any, stopper: procs.Stopper,
               on_up: Callable[[dict[str, Any]], None], link: Any) -> Outcome:
    """One node's life: start Ray, wait until the head lists it, write the state, then watch."""
    token, node_ip, state = o.token, o.node_ip, o.state
    join_id = secrets.token_hex(8)
    name = o.device_name or socket.gethostname()
    role = "client" if o.client else "device"
    labels = raynode.device_labels(prof, name=name, role=role, join_id=join_id,
                                   link_mbps=min(link.down_mbps, link.up_mbps), latency_ms=link.latency_ms)
    files = None
    if advert.tls:
        if token is None:
            raise LanError(f"cluster {advert.cluster_name} uses TLS, which needs the join token; drop --insecure")
        files = tls.obtain(client, token.value, tls.tls_dir(state), "node", node_ip)
    temp = statefiles.ray_temp_dir(state, "node")
    temp.mkdir(parents=True, exist_ok=True, mode=0o700)
    ray_log = state / "ray-node.log"
    argv = raynode.ray_node_argv(raynode.ray_executable(), head=f"{advert.host}:{advert.ray_port}", node_ip=node_ip,
                                 temp_dir=temp, labels=labels, num_cpus=0 if o.client else o.num_cpus)
    child = procs.start_child(argv, raynode.ray_env(os.environ, token.path if token else None, files), ray_log)
    outcome = Outcome.STOPPED
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
              "latency_ms": link.latency_ms, "instance": advert.instance, "joined_at": time.time(),
              "tls": None if files is None else {"ca": str(files.ca_cert), "cert": str(files.cert),
                                                 "key": str(files.key)}}
        statefiles.write_state(state / "join.json", st)
        on_up(st)
        outcome = _watch(child, client.host, client.port, advert.instance, stopper, o.timeout)
        if outcome is Outcome.RAY_EXITED:
            log.error("tilefleet join: Ray exited (code %s); the end of %s:\n%s", child.returncode, ray_log,
                      procs.log_tail(ray_log))
        return outcome
    finally:
        client.close()
        quick = outcome is not Outcome.STOPPED or not stopper.event.is_set()
        procs.terminate(child.pid, pgid=child.pid, marker=str(temp),
                        timeout=RAY_KILL_S if quick else procs.STOP_TIMEOUT_S)
        st_now = statefiles.read_state(state / "join.json")
        if st_now is not None and st_now.get("pid") == os.getpid():
            statefiles.remove_state(state / "join.json")


def _watch(child: subprocess.Popen[bytes], host: str, port: int, instance: str, stopper: procs.Stopper,
           timeout: float) -> Outcome:
    """Until stopped, Ray exits or the head shows another instance."""
    next_check = time.monotonic() + HEAD_CHECK_S
    while not stopper.event.wait(WATCH_S):
        seen = None
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + HEAD_CHECK_S
            seen = _head_instance(host, port, min(timeout, HEAD_CHECK_S))
        verdict = watch_verdict(child.poll(), instance, seen)
        if verdict is not None:
            return verdict
    return Outcome.STOPPED


def _head_instance(host: str, port: int, timeout: float) -> str | None:
    """The instance the head's agent advertises now, or None if it does not answer (or answers nonsense)."""
    try:
        with AgentClient(host, port, timeout=timeout) as c:
            return c.info().instance
    except AgentError:
        return None


def _wait_for_head(o: JoinOptions, last: HeadAdvert,
                   stopper: procs.Stopper) -> tuple[HeadAdvert, AgentClient, JoinOptions] | None:
    """The head again, trusted (token file read again each try), or None if stopped while waiting."""
    attempt = 0
    while not stopper.event.is_set():
        try:
            token = load_token(o.token.path) if o.token is not None else None
            advert, client = _find_again(o, last, token)
            return advert, client, replace(o, token=token)
        except (LanError, AgentError) as e:
            delay = backoff_delay(attempt)
            attempt += 1
            log.warning("tilefleet join: cluster %s: %s; trying again in %.1f s (Ctrl-C or `tilefleet leave` "
                        "to give up)", last.cluster_name, e, delay)
            if stopper.event.wait(delay):
                return None
    return None


def _find_again(o: JoinOptions, last: HeadAdvert, token: Token | None) -> tuple[HeadAdvert, AgentClient]:
    """``--address`` if it was given; else the last head's agent, then zeroconf by the cluster's name."""
    timeout = min(o.timeout, 3.0)
    if o.address:
        return pick_head(token, cluster=last.cluster_name, address=o.address, timeout=timeout, node_ip=o.node_ip)
    try:
        return pick_head(token, cluster=last.cluster_name, address=f"{last.host}:{last.agent_port}",
                         timeout=timeout, node_ip=o.node_ip)
    except AgentError:  # not there (yet): it may have come back elsewhere
        return pick_head(token, cluster=last.cluster_name, timeout=timeout, node_ip=o.node_ip)


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
