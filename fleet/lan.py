"""A real LAN cluster: ``tilefleet head``, ``join``, ``leave``, ``stop`` and the LAN ``devices``.

The decisions are pure functions tested on their own: where state and tokens live, reading and
creating the join token, Ray's label syntax, the ``ray start`` command lines, version checks
with what to install, state files that survive a crash (a dead pid is stale), and which address
this node has. The glue below them is thin: a ``ray start --block`` child in its own process
group (Ray 2.60 drains and stops its own processes on SIGTERM; whatever survives is killed by
pid), the agent (:mod:`fleet.agent`) and the zeroconf advert (:mod:`fleet.discovery`).

Token authentication is Ray's own (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in the
environment of every ``ray start``, the head's included: a node or driver without the token is
refused with ``InvalidAuthToken``); the same token keys the agent's mutual challenge, so a device
proves a head before it joins, and a head proves a device before it lists the cluster.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from .discovery import WIRE_VERSION, HeadAdvert, token_fingerprint
from .profiling import atomic_write

DEFAULT_RAY_PORT: Final = 6379
DEFAULT_AGENT_PORT: Final = 6390
HEALTH_CHECKS: Final = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                        "health_check_failure_threshold": 3}
"""Fast failure detection on the head: a lost device is noticed in about 1.5 s instead of 15 s."""
RAY_DRAIN_TIMEOUT_S: Final = 10
"""How long a ``ray start --block`` drains its node on SIGTERM (Ray's default is 30 s)."""
STOP_TIMEOUT_S: Final = 40.0
START_TIMEOUT_S: Final = 90.0
TOKEN_MIN: Final = 16
TOKEN_MAX: Final = 4096
_SOCKET_PATH_MAX: Final = 107  # AF_UNIX path limit; Ray's sockets live under <temp-dir>/session_*/sockets/
_RAY_SUFFIX_LEN: Final = 64    # len("/session_2026-11-24_22-40-05_802465_123456/sockets/plasma_store")
LABEL_PREFIX: Final = "tilefleet/"
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
"""Ray's label name and value syntax (Kubernetes'): ``ray._private.label_utils.LABEL_REGEX``."""
_CLUSTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")


class LanError(Exception):
    """An expected failure with one line saying what was wrong and what to do; ``code`` is the
    exit status (2 for usage and configuration, 1 for runtime failures)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------------------


def _xdg(var: str, default: str) -> Path:
    base = os.environ.get(var) or ""
    return Path(base) if os.path.isabs(base) else Path.home() / default  # the spec ignores relative values


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/tilefleet`` (``~/.config/tilefleet``): the token."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "tilefleet"


def state_dir() -> Path:
    """``$XDG_STATE_HOME/tilefleet`` (``~/.local/state/tilefleet``): state files, logs, cluster id."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "tilefleet"


def default_token_path() -> Path:
    return config_dir() / "token"


def ray_temp_dir(state: Path, role: str) -> Path:
    """Ray's ``--temp-dir`` for ``role`` ("head" or "node"): ``<state>/ray-<role>`` when that is
    short enough for Ray's Unix sockets, else ``/tmp/tilefleet-<uid>-<hash of state>/<role>``."""
    inside = Path(state) / f"ray-{role}"
    if len(str(inside)) + _RAY_SUFFIX_LEN <= _SOCKET_PATH_MAX:
        return inside
    digest = hashlib.sha256(str(Path(state).resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"tilefleet-{os.getuid()}-{digest}" / role


# --------------------------------------------------------------------------------------------------
# The join token
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A loaded token, where it came from, and what the user should be told about it."""

    path: Path
    value: bytes
    created: bool = False
    warning: str | None = None

    @property
    def fingerprint(self) -> str:
        return token_fingerprint(self.value)


def load_token(path: Path) -> Token:
    """Read and check a token file; :class:`LanError` (code 2) names the file and the fix.

    A token must be 16..4096 printable ASCII characters with no spaces (Ray sends it in an HTTP
    header); surrounding whitespace (a trailing newline) is ignored. A file others may read is
    used, with a warning.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise LanError(f"token file {path} is not a regular file; give the file copied from the head")
        with open(path, "rb") as f:
            raw = f.read(TOKEN_MAX + 1)
    except FileNotFoundError:
        raise LanError(f"token file {path} does not exist; copy the head's token file to this device "
                       "(`tilefleet head` prints where it is) or pass --token-file") from None
    except PermissionError:
        raise LanError(f"token file {path} cannot be read (permission denied); run as its owner "
                       "or fix its permissions (chmod 600)") from None
    except OSError as e:
        raise LanError(f"token file {path} cannot be read ({e.strerror or e})") from None
    value = raw.strip()
    if not value:
        raise LanError(f"token file {path} is empty; copy the head's token file to this device")
    if len(raw) > TOKEN_MAX or len(value) < TOKEN_MIN or not all(0x21 <= b <= 0x7E for b in value):
        raise LanError(f"token file {path} does not hold a token: one is {TOKEN_MIN}..{TOKEN_MAX} printable "
                       "ASCII characters without spaces (`tilefleet head` generates one)")
    warning = None
    if st.st_mode & 0o004:
        warning = (f"warning: token file {path} is readable by every user of this machine; "
                   f"anyone who reads it can join and run code on the cluster (chmod 600 {path})")
    return Token(path, value, warning=warning)


def create_token(path: Path) -> Token:
    """Generate a 256-bit token and write it atomically, mode 0600 in a 0700 directory."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32).encode()
    atomic_write(path, value)
    return Token(path, value, created=True)


def resolve_token(token_file: str | None, *, create: bool) -> Token:
    """The token to use: ``token_file`` if given (it must exist), else the default path, created
    if ``create`` (the head) and missing; a device without one gets a message saying to copy it."""
    if token_file:
        return load_token(Path(token_file))
    path = default_token_path()
    if not path.exists() and create:
        return create_token(path)
    return load_token(path)


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "0+unknown"


def local_versions() -> dict[str, str]:
    """What must match between a head and its devices (Ray refuses mismatched Ray or Python)."""
    return {"tilefleet_version": _package_version("tilefleet"), "wire_version": str(WIRE_VERSION),
            "ray_version": _package_version("ray"), "python_version": platform.python_version()}


def version_mismatch(advert: HeadAdvert, local: Mapping[str, str] | None = None) -> str | None:
    """None if this device can join ``advert``'s head, else one message naming every difference
    and what to install here."""
    mine = dict(local or local_versions())
    theirs = {"tilefleet_version": advert.tilefleet_version, "wire_version": str(advert.wire_version),
              "ray_version": advert.ray_version, "python_version": advert.python_version}
    fixes = {
        "tilefleet_version": lambda v: f"install tilefleet {v} here (the head's checkout, or "
                                       f"`pip install tilefleet=={v}`)",
        "wire_version": lambda v: "upgrade the older side: the join protocol differs",
        "ray_version": lambda v: f"`pip install 'ray=={v}'` here (Ray needs the same version on every node)",
        "python_version": lambda v: f"use Python {v} here (Ray needs the same Python on every node)",
    }
    what = {"tilefleet_version": "tilefleet", "wire_version": "wire protocol", "ray_version": "Ray",
            "python_version": "Python"}
    problems = [f"{what[k]} {theirs[k]} on the head, {mine[k]} here: {fixes[k](theirs[k])}"
                for k in theirs if theirs[k] != mine.get(k)]
    if not problems:
        return None
    return f"cannot join cluster {advert.cluster_name} at {advert.host}: " + "; ".join(problems)


def fingerprint_mismatch(advert: HeadAdvert, token: Token) -> str | None:
    """None if ``token`` is the one ``advert`` claims, else what to copy where."""
    if token.fingerprint == advert.token_fingerprint:
        return None
    return (f"your token (fingerprint {token.fingerprint}, {token.path}) is not the one of cluster "
            f"{advert.cluster_name} (fingerprint {advert.token_fingerprint}); copy the head's token file "
            f"(`tilefleet head` printed its path, by default ~/.config/tilefleet/token) to this device")


# --------------------------------------------------------------------------------------------------
# Labels and the ray start command lines
# --------------------------------------------------------------------------------------------------


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
    (:class:`fleet.profiling.DeviceProfile`) and its measured link to the head."""
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


def ray_env(base: Mapping[str, str], token_path: Path | None) -> dict[str, str]:
    """The environment of a ``ray start`` (and of our own Ray clients): token mode with the token
    file, or auth disabled when ``token_path`` is None (``--insecure``)."""
    env = dict(base)
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


def use_ray_auth(token_path: Path | None) -> None:
    """Set this process's Ray auth environment; call before this process first talks to Ray.

    Ray reads ``RAY_AUTH_MODE`` into its config when ``ray`` is imported, and caches the token it
    loaded, so both are refreshed here (the same calls Ray makes when it turns token mode on).
    """
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in ray_env({}, token_path).items() if k.startswith("RAY_AUTH")})
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


# --------------------------------------------------------------------------------------------------
# Names, addresses, ports
# --------------------------------------------------------------------------------------------------


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
        text = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return text
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(16)
    atomic_write(path, value.encode())
    return value


def pick_ip(candidates: Iterable[str]) -> str:
    """The only non-loopback, non-link-local IPv4 address among ``candidates``, else an error."""
    ips = []
    for c in candidates:
        try:
            ip = ipaddress.ip_address(c)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback and not ip.is_link_local and str(ip) not in ips:
            ips.append(str(ip))
    if len(ips) == 1:
        return ips[0]
    if not ips:
        raise LanError("this machine has no LAN IPv4 address; connect it to the LAN or pass --node-ip")
    raise LanError(f"this machine has several addresses ({', '.join(ips)}); pass --node-ip with the one on "
                   "the devices' LAN")


def choose_node_ip(explicit: str | None, head_host: str | None = None) -> str:
    """``--node-ip`` if given; else the address this host uses to reach ``head_host``; else the
    only LAN IPv4 address of this machine's interfaces."""
    if explicit:
        try:
            ip = ipaddress.ip_address(explicit)
        except ValueError:
            raise LanError(f"--node-ip {explicit!r} is not an IP address") from None
        mine = local_ips()
        if not ip.is_loopback and str(ip) not in mine:
            raise LanError(f"--node-ip {ip} is not an address of this machine (it has {', '.join(mine) or 'none'})")
        return str(ip)
    if head_host:
        try:
            with socket.socket(socket.AF_INET6 if ":" in head_host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((head_host, 9))  # UDP connect sends nothing: it asks the routing table
                return str(s.getsockname()[0])
        except OSError:
            pass
    return pick_ip(local_ips())


def local_ips() -> list[str]:
    """This machine's IPv4 addresses, as its interfaces list them."""
    import ifaddr

    return [ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]


def port_free(port: int, host: str = "") -> bool:
    """Whether a TCP listener could bind ``host:port`` now (wildcard: on every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# State files and processes
# --------------------------------------------------------------------------------------------------


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks (/proc), telling a pid apart from a reused one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at ``start`` if given."""
    now = _proc_start(pid)
    return now is not None and (start is None or now == start)


def write_state(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(dict(data), indent=1, sort_keys=True).encode())


def read_state(path: Path, *, live_only: bool = True) -> dict[str, Any] | None:
    """A state file whose process still runs; None (and the file removed) if it is missing,
    unreadable or stale (its pid is dead or belongs to another process now). ``live_only=False``
    returns a stale one too (to clean up after a process that was killed)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("pid"), int) and (
            not live_only or pid_alive(data["pid"], data.get("pid_start"))):
        return data
    remove_state(path)
    return None


def remove_state(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def own_identity() -> dict[str, int | None]:
    return {"pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def pids_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (e.g. a Ray temp dir), this one excluded."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and _proc_start(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def start_child(argv: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child in its own session and process group, its output in ``log_path`` (one run's only,
    so a failure's log tail is this run's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def terminate(pid: int, *, pgid: int | None = None, marker: str | None = None,
              timeout: float = STOP_TIMEOUT_S, start: int | None = None) -> list[int]:
    """SIGTERM ``pid`` and wait for it; then SIGKILL what is left of the processes naming
    ``marker`` and, if ``pid`` was alive (so the group is surely still ours, not a reused id),
    of process group ``pgid``. Returns the pids that had to be killed."""
    was_alive = pid_alive(pid, start)
    if was_alive:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pid_alive(pid, start) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    killed = []
    leftovers = set(_group_members(pgid) if pgid and was_alive else []) | set(pids_with(marker) if marker else [])
    if pid_alive(pid, start):
        leftovers.add(pid)
    for p in sorted(leftovers):
        try:
            os.kill(p, signal.SIGKILL)
            killed.append(p)
        except ProcessLookupError:
            pass
    _reap(pid)
    deadline = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously: return once they are gone
    while killed and time.monotonic() < deadline and any(pid_alive(p) for p in killed):
        _reap(pid)
        time.sleep(0.02)
    return killed


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Stopper:
    """SIGTERM and SIGINT set :attr:`event` (a second Ctrl-C too: cleanup is already under way)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.event.set())


# --------------------------------------------------------------------------------------------------
# Ray, from the outside (GCS client: no driver, no worker process)
# --------------------------------------------------------------------------------------------------


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
