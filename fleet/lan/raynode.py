"""Ray nodes as tilefleet starts them: labels (Ray's syntax), the ``ray start`` command lines and
environment (token auth, fast health checks), cluster names and ids, and what the GCS says about nodes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from .state import LanError, atomic_write
from .tls import TLS_ENV, TlsFiles, tls_env



DEFAULT_RAY_PORT: Final = 6379


DEFAULT_AGENT_PORT: Final = 6390


HEALTH_CHECKS: Final = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                        "health_check_failure_threshold": 3}
"""Fast failure detection on the head: a lost device is noticed in about 1.5 s instead of 15 s."""


RAY_DRAIN_TIMEOUT_S: Final = 10
"""How long a ``ray start --block`` drains its node on SIGTERM (Ray's default is 30 s)."""


LABEL_PREFIX: Final = "tilefleet/"


_LABEL_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
"""Ray's label name and value syntax (Kubernetes'): ``ray._private.label_utils.LABEL_REGEX``."""


_CLUSTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")


def label_text(text: str) -> str:
    """Any text made a valid Ray label value: other characters become '-', ends alphanumeric."""
    v = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    v = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", v)
    return v or "unknown"


def label_number(x: float, digits: int = 1) -> str:
    """A non-negative finite number as a label value (``12.5``; Ray allows digits and dots)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or x == float("inf"):
        raise ValueError(f"a label number must be finite and >= 0, got {x!r}")
    return f"{x:.{digits}f}" if digits else str(int(round(x)))


def validate_labels(labels: Mapping[str, str]) -> None:
    """Ray's label syntax (Kubernetes'): ``prefix/name`` keys, values of at most 63 characters,
    alphanumeric at both ends, ``-_.`` inside; ',' and '=' would break ``--labels`` anyway."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not all(_LABEL_RE.fullmatch(p) for p in prefix.split("."))) \
                or not _LABEL_RE.fullmatch(name):
            raise ValueError(f"label key {key!r} is not valid: [prefix/]name, each 1..63 letters, digits, "
                             "'-', '_' or '.', starting and ending alphanumeric")
        if key.startswith("ray.io/"):
            raise ValueError(f"label key {key!r}: the ray.io/ prefix is Ray's own")
        if value and not _LABEL_RE.fullmatch(value):
            raise ValueError(f"label {key}={value!r}: a value is at most 63 letters, digits, '-', '_' or '.', "
                             "starting and ending alphanumeric")


def encode_labels(labels: Mapping[str, str]) -> str:
    """``k=v,k=v`` for ``ray start --labels``, validated first."""
    validate_labels(labels)
    return ",".join(f"{k}={v}" for k, v in labels.items())


def device_labels(profile: Any, *, name: str, role: str, join_id: str | None = None,
                  link_mbps: float | None = None, latency_ms: float | None = None) -> dict[str, str]:
    """The labels a node carries: what the scheduler needs to price it, from its profile
    (:class:`fleet.lan.profiling.DeviceProfile`) and its measured link to the head."""
    labels = {
        "tilefleet/name": label_text(name),
        "tilefleet/role": role,
        "tilefleet/class": label_text(profile.klass),
        "tilefleet/gflops": label_number(profile.gpu_gflops if profile.gpu and profile.gpu_gflops else profile.gflops),
        "tilefleet/tile_overhead_ms": label_number(profile.tile_overhead_s * 1e3, 3),
        "tilefleet/memory_mb": label_number(profile.memory_bytes / 2**20, 0),
        "tilefleet/gpu": "1" if profile.gpu else "0",
        "tilefleet/threads": label_number(profile.threads, 0),
    }
    if link_mbps is not None:
        labels["tilefleet/link_mbps"] = label_number(link_mbps)
    if latency_ms is not None:
        labels["tilefleet/latency_ms"] = label_number(latency_ms, 3)
    if join_id is not None:
        labels["tilefleet/join_id"] = join_id
    validate_labels(labels)
    return labels


def ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (so versions match), else PATH's."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise LanError("the `ray` command is not installed with this Python; `pip install 'ray==2.60.*'`")
    return found


def ray_head_argv(ray: str, *, port: int, node_ip: str, temp_dir: Path, labels: Mapping[str, str],
                  num_cpus: int | None, autoscaling_config: str | None = None) -> list[str]:
    """``ray start --head --block`` with fast health checks and nothing optional (``autoscaling_config``:
    the file ``ray up`` writes, so its monitor starts the listed workers)."""
    argv = [ray, "start", "--head", "--block", "--port", str(port), "--node-ip-address", node_ip,
            "--temp-dir", str(temp_dir), "--labels", encode_labels(labels),
            "--system-config", json.dumps(HEALTH_CHECKS, separators=(",", ":")),
            "--include-dashboard=false", "--disable-usage-stats"]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if autoscaling_config is not None:
        argv += ["--autoscaling-config", autoscaling_config]
    return argv


def ray_node_argv(ray: str, *, head: str, node_ip: str, temp_dir: Path, labels: Mapping[str, str],
                  num_cpus: int | None) -> list[str]:
    """``ray start --address HEAD --block`` for a device (``num_cpus=0`` for a client)."""
    argv = [ray, "start", "--address", head, "--block", "--node-ip-address", node_ip,
            "--temp-dir", str(temp_dir), "--labels", encode_labels(labels), "--disable-usage-stats"]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    return argv


def ray_env(base: Mapping[str, str], token_path: Path | None, tls: TlsFiles | None = None) -> dict[str, str]:
    """The environment of a ``ray start`` (and of our own Ray clients): token mode with the token
    file, or auth disabled when ``token_path`` is None (``--insecure``); TLS with ``tls``'s files,
    else TLS off (a stray ``RAY_USE_TLS`` from the shell must not half-configure a node)."""
    env = tls_env(base, tls)
    env.pop("RAY_AUTH_TOKEN", None)  # a stray inline token would win over the file
    env.pop("RAY_ADDRESS", None)
    if token_path is None:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    else:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(token_path).resolve())
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = str(RAY_DRAIN_TIMEOUT_S)
    return env


def use_ray_auth(token_path: Path | None, tls: TlsFiles | None = None) -> None:
    """Set this process's Ray auth and TLS environment; call before this process first talks to Ray.

    Ray reads ``RAY_AUTH_MODE`` and ``RAY_USE_TLS`` into its config when ``ray`` is imported, and
    caches the token it loaded, so both are refreshed here (the same calls Ray makes when it turns
    token mode on).
    """
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", *TLS_ENV):
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in ray_env({}, token_path, tls).items()
                       if k.startswith("RAY_AUTH") or k in TLS_ENV})
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def default_cluster_name() -> str:
    """The host's short name, made an advert-safe cluster name."""
    host = socket.gethostname().split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", host).strip("-_")[:63]
    return name or "tilefleet"


def check_cluster_name(name: str) -> str:
    if not _CLUSTER_NAME_RE.fullmatch(name):
        raise LanError(f"cluster name {name!r}: use 1..63 letters, digits, '-', '_' or '.'")
    return name


def cluster_id(state: Path) -> str:
    """This machine's stable cluster id (32 hex), created once in the state dir."""
    path = Path(state) / "cluster_id"
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()  # 32 hex and a newline: anything longer is not ours
        if re.fullmatch(rb"[0-9a-f]{32}", text):
            return text.decode()
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(16)
    atomic_write(path, value.encode())
    return value


def gcs_client(address: str) -> Any:
    """A GCS client for ``address``; the auth environment must be set (:func:`use_ray_auth`)."""
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def wait_port(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Until ``host:port`` accepts a connection; :class:`LanError` (code 1) if ``alive`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise LanError("exited before it was up", 1)
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise LanError(f"did not open port {port} within {timeout:g} s", 1)


_STATE_NAMES: Final = {0: "alive", 1: "dead"}


_SNAPSHOT_DRAINING: Final = 3  # NodeSnapshot.State.DRAINING


def list_devices(gcs: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The cluster's nodes with their tilefleet labels and the tiles each has done (the runtime
    counts them in Ray's internal KV, ``tilefleet/tiles/<node id>`` in namespace ``tilefleet``)."""
    infos = gcs.get_all_node_info(timeout=timeout)
    keys = [b"tilefleet/tiles/" + nid.hex().encode() for nid in infos]
    done = gcs.internal_kv_multi_get(keys, namespace=b"tilefleet", timeout=timeout) if keys else {}
    out = []
    for (nid, info), key in zip(infos.items(), keys):
        state = _STATE_NAMES.get(int(info.state), "unknown")
        if state == "alive" and int(info.state_snapshot.state) == _SNAPSHOT_DRAINING:
            state = "draining"
        raw = done.get(key, b"0")
        tiles = int(raw) if raw.isdigit() and len(raw) < 19 else 0
        resources = dict(info.resources_total)
        out.append({
            "node_id": nid.hex(), "ip": str(info.node_manager_address), "alive": state in ("alive", "draining"),
            "state": state, "is_head": bool(info.is_head_node),
            "labels": {k: str(v) for k, v in info.labels.items() if k.startswith(LABEL_PREFIX)},
            "cpus": float(resources.get("CPU", 0.0)), "gpus": float(resources.get("GPU", 0.0)),
            "memory_bytes": int(resources.get("memory", 0)), "tiles_done": tiles,
        })
    return out


def drain(address: str, node_id: str, deadline_s: float = 10.0) -> str:
    """Ask the GCS to drain ``node_id`` (hex); returns what happened, in words."""
    from ray.core.generated import autoscaler_pb2

    host, _, port = address.rpartition(":")
    try:  # Ray's own client waits about 40 s for an absent GCS; a plain connect says so at once
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as e:
        return f"could not reach the head's GCS at {address} ({e.strerror or e}), so it did not drain this node"
    try:
        accepted, why = gcs_client(address).drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "tilefleet leave", int(time.time() * 1000 + deadline_s * 1000), timeout=5)
    except Exception as e:  # best effort: the stop that follows ends the node anyway
        return f"could not ask the head to drain this node ({type(e).__name__}: {str(e)[:200]})"
    return "the head drained this node" if accepted else f"the head refused to drain this node: {why}"
