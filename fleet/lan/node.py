"""The process behind ``tilefleet head`` (``join`` is in :mod:`~fleet.lan.member`): Ray as a child in
its own process group, the agent and the advert around it, a state file while it runs, a restart in
place on SIGUSR1, and a clean stop (never ``ray stop``).

Nothing here prints: the CLI passes ``on_up`` to announce the running process and reads warnings
from the ``tilefleet.lan`` logger.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import procs, raynode, state as statefiles, tls, trust
from .agent import Agent
from .discovery import HeadAdvert, ZeroconfAdvertiser
from .state import LanError
from .tokens import Token, load_token
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
    tls: bool = False


RESTART = -1
"""What :func:`serve_until_stopped` returns when a restart (SIGUSR1) was asked for."""


def serve_until_stopped(stopper: procs.Stopper, child: subprocess.Popen[bytes], what: str, ray_log: Path,
                        hint: str = "") -> int:
    """Block until SIGTERM/SIGINT (0), a restart request (:data:`RESTART`) or until the Ray child
    dies (1, with its log tail and ``hint``)."""
    while not stopper.wait(0.5):
        if child.poll() is not None:
            log.error("%s: Ray exited unexpectedly (code %s)%s; the end of %s:\n%s", what, child.returncode, hint,
                      ray_log, procs.log_tail(ray_log))
            return 1
    return 0 if stopper.event.is_set() else RESTART


def run_head(o: HeadOptions, prof: Any, on_up: Callable[[dict[str, Any]], None]) -> int:
    """Run a head until SIGTERM/SIGINT (0) or until Ray dies (1): Ray, the agent, the zeroconf advert.
    ``prof`` is this machine's :class:`~fleet.lan.profiling.DeviceProfile`; ``on_up`` gets the state
    written to ``head.json`` each time everything is up.

    SIGUSR1 restarts all three in place with the token file read again (``tilefleet token rotate
    --restart-head``): Ray reads its token only when it starts. Running devices notice the new
    head (its advert's instance changes) and join again, if their token is the new one.
    """
    stopper = procs.Stopper(restart_signal=True)
    while True:
        code = _head_once(o, prof, stopper, on_up)
        if code != RESTART or stopper.event.is_set():
            return 0 if stopper.event.is_set() else code
        stopper.restart.clear()
        if o.token is not None:
            o = replace(o, token=load_token(o.token.path))
        log.warning("tilefleet head: restarting cluster %s (token fingerprint %s); devices join again by "
                    "themselves if they hold this token", o.name, o.token.fingerprint if o.token else "none")


def _head_once(o: HeadOptions, prof: Any, stopper: procs.Stopper, on_up: Callable[[dict[str, Any]], None]) -> int:
    """One life of the head: Ray, agent, advert up; then serve until stopped, restarted or Ray dies."""
    name, node_ip, token, state = o.name, o.node_ip, o.token, o.state
    versions = trust.local_versions()
    advert = HeadAdvert(cluster_name=name, cluster_id=raynode.cluster_id(state), host=node_ip, ray_port=o.port,
                        agent_port=o.agent_port, tilefleet_version=versions["tilefleet_version"],
                        wire_version=int(versions["wire_version"]), ray_version=versions["ray_version"],
                        python_version=versions["python_version"],
                        token_fingerprint=token.fingerprint if token else INSECURE_FINGERPRINT, tls=o.tls,
                        instance=secrets.token_hex(8))
    labels = raynode.device_labels(prof, name=socket.gethostname(), role="head")
    gcs_address = f"{node_ip}:{o.port}"
    gcs: dict[str, Any] = {}
    tls_files = tls.head_files(state, name, node_ip) if o.tls else None

    def devices() -> list[dict[str, Any]]:
        if "client" not in gcs:
            gcs["client"] = raynode.gcs_client(gcs_address)
        return raynode.list_devices(gcs["client"])

    try:
        agent = Agent(advert, token.value if token else None, devices, host=node_ip, port=o.agent_port,
                      signer=tls.Signer(state) if o.tls else None)
    except OSError as e:
        raise LanError(f"cannot open the agent's port {node_ip}:{o.agent_port} ({e.strerror or e}); "
                       "pick another with --agent-port") from None
    temp = statefiles.ray_temp_dir(state, "head")
    temp.mkdir(parents=True, exist_ok=True, mode=0o700)
    ray_log = state / "ray-head.log"
    raynode.use_ray_auth(token.path if token else None, tls_files)
    argv = raynode.ray_head_argv(raynode.ray_executable(), port=o.port, node_ip=node_ip, temp_dir=temp, labels=labels,
                                 num_cpus=o.num_cpus, autoscaling_config=str(Path(o.autoscaling_config).expanduser())
                                 if o.autoscaling_config else None)
    child = procs.start_child(argv, raynode.ray_env(os.environ, token.path if token else None, tls_files), ray_log)
    zc = advertiser = None
    try:
        try:
            running = lambda: child.poll() is None and not stopper.event.is_set()  # noqa: E731
            raynode.wait_port(node_ip, o.port, procs.START_TIMEOUT_S, running)
            _wait_head_node(devices, running)
        except LanError as e:
            raise LanError(f"the Ray head {e}; the end of {ray_log}:\n{procs.log_tail(ray_log)}", 1) from None
        agent.start()
        zc, advertiser = _advertise(advert, node_ip, o.agent_port)
        st = {**procs.own_identity(), "role": "head", "node_ip": node_ip, "ray_port": o.port,
              "agent_port": o.agent_port, "cluster_name": name, "cluster_id": advert.cluster_id,
              "token_path": str(token.path) if token else None, "fingerprint": advert.token_fingerprint,
              "insecure": token is None, "temp_dir": str(temp), "log_path": str(ray_log), "ray_pid": child.pid,
              "ray_pgid": child.pid, "advertised": advertiser is not None, "instance": advert.instance,
              "tls": _tls_state(tls_files), "num_cpus": o.num_cpus, "autoscaling_config": o.autoscaling_config}
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


def _tls_state(files: tls.TlsFiles | None) -> dict[str, str] | None:
    return None if files is None else {"ca": str(files.ca_cert), "cert": str(files.cert), "key": str(files.key)}


def tls_of_state(st: dict[str, Any]) -> tls.TlsFiles | None:
    """The TLS files a head or join state file names (for ``leave``'s own Ray client), or None."""
    t = st.get("tls")
    if not isinstance(t, dict):
        return None
    return tls.TlsFiles(Path(t["ca"]), Path(t["cert"]), Path(t["key"]))


def _advertise(advert: HeadAdvert, node_ip: str, agent_port: int) -> tuple[Any, Any]:
    """(zeroconf, advertiser), or (None, None) with a warning where multicast is unavailable."""
    zc = None
    try:
        import zeroconf

        zc = zeroconf.Zeroconf(interfaces=[node_ip])
        advertiser = ZeroconfAdvertiser(advert, zc)
        advertiser.start()
        return zc, advertiser
    except Exception as e:  # multicast may be unavailable; --address still works
        if zc is not None:
            zc.close()
        log.warning("warning: cannot advertise over zeroconf on %s (%s: %s); devices can join with "
                    "--address %s:%s", node_ip, type(e).__name__, e, node_ip, agent_port)
        return None, None


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


def restart_head(state: Path, timeout: float = procs.START_TIMEOUT_S + 30) -> dict[str, Any]:
    """Ask this machine's running head to restart in place (SIGUSR1: Ray, agent and advert again,
    the token file read again); its new state once it is up again."""
    st = statefiles.read_state(state / "head.json")
    if st is None:
        raise LanError(f"no tilefleet head runs on this machine (state in {state})", 1)
    os.kill(st["pid"], signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = statefiles.read_state(state / "head.json", live_only=False)
        if now is not None and now.get("pid") == st["pid"] and now.get("instance") != st.get("instance"):
            return now
        if not procs.pid_alive(st["pid"], st.get("pid_start")):
            raise LanError(f"the head (pid {st['pid']}) exited while restarting; see its output or log "
                           f"({state / 'head.log'} when it was started with --detach)", 1)
        time.sleep(0.3)
    raise LanError(f"the head (pid {st['pid']}) did not come back within {timeout:g} s; see its output", 1)


def clean_stale(path: Path, what: str) -> str | None:
    """A state file whose process died without cleaning up (killed, power cut): stop what is left of
    its Ray processes and remove it, so a new start does not share a temp dir with them. What was
    done, or None if there was nothing stale."""
    st = statefiles.read_state(path, live_only=False)
    if st is None or procs.pid_alive(st["pid"], st.get("pid_start")):
        return None
    return stop_one(path, what)


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
