"""``tilefleet cluster-config`` and ``tilefleet up``: a Ray cluster launcher YAML for LAN devices.

For users who prefer Ray's own launcher (``ray up``) to one ``tilefleet join`` per device. The
YAML uses Ray's on-premises ``local`` provider (SSH to listed addresses) and starts every node
through tilefleet itself, so a launched cluster is the same as a joined one: token authentication,
measured profiles in node labels, the agent and the zeroconf advert. What it takes care of, each a
known sharp edge of ``ray up`` on a LAN:

- no ``ray stop`` in the start commands (Ray's defaults run it; on a shared host it ends every Ray
  instance there, not only this cluster's);
- ``RAY_enable_autoscaler_v2=0`` on the head: with the local provider, autoscaler v2 started only
  one of two workers;
- the token travels as a file mount (owner-only on the devices) and is never written into the YAML;
- ``--node-ip-address`` is set on the head; workers choose the interface that routes to the head
  (hosts with several interfaces otherwise pick the wrong one);
- ``ray up`` exports ``OMP_NUM_THREADS=1``; the start commands unset it, and each tile worker sets
  torch's thread count from the cores the device offers.

What ``ray up`` needs on the devices: an SSH server that accepts the key given here for the user
given here, ``rsync``, and the same Python, Ray and tilefleet versions as this machine, with
``tilefleet`` on the login shell's PATH (or ``--remote-bin``).

The builder is pure (addresses and options in, a dict out); only :func:`launch` runs anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ClusterConfigError", "LaunchOptions", "build", "dump", "launch", "parse_hosts"]

REMOTE_TOKEN = "~/.config/tilefleet/token"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NEVER_IDLE_MIN = 60 * 24 * 365  # the local provider's nodes are the user's devices: never "scale them down"


class ClusterConfigError(ValueError):
    """An option of cluster-config or up is wrong; the message says which and what to pass."""


@dataclass(frozen=True)
class LaunchOptions:
    head: str
    workers: tuple[str, ...]
    ssh_user: str
    ssh_key: Path
    token_file: Path | None
    name: str = "tilefleet"
    remote_bin: str = "tilefleet"
    ray_port: int = 6379
    agent_port: int = 6390
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for host in (self.head, *self.workers):
            _check_host(host)
        if self.head in self.workers:
            raise ClusterConfigError(f"{self.head} is both the head and a worker; list it once, as --head")
        if len(set(self.workers)) != len(self.workers):
            raise ClusterConfigError("a worker address is listed twice")
        if not _NAME_RE.fullmatch(self.name):
            raise ClusterConfigError(f"cluster name {self.name!r}: use 1..63 letters, digits, '.', '_' or '-'")
        if not self.ssh_user or any(c.isspace() for c in self.ssh_user):
            raise ClusterConfigError(f"ssh user {self.ssh_user!r} is not a user name")
        for port in (self.ray_port, self.agent_port):
            if not 1 <= port <= 65535:
                raise ClusterConfigError(f"port {port} is not in 1..65535")
        for k in self.extra_env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ClusterConfigError(f"environment variable name {k!r} is not valid")


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not re.fullmatch(r"(?!-)[A-Za-z0-9.-]{1,253}(?<!-)", host):
        raise ClusterConfigError(f"{host!r} is not an IP address or host name")


def parse_hosts(text: str) -> tuple[str, ...]:
    """``"10.0.0.2,10.0.0.3"`` or whitespace-separated: a tuple of addresses, each checked."""
    hosts = tuple(h for h in re.split(r"[,\s]+", text.strip()) if h)
    for h in hosts:
        _check_host(h)
    return hosts


def _env_prefix(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def build(o: LaunchOptions) -> dict[str, Any]:
    """The ``ray up`` configuration for these devices (a plain dict, ready for YAML)."""
    env = _env_prefix(o.extra_env)
    common = "unset OMP_NUM_THREADS; "  # ray up exports 1: tile workers set their own thread counts
    head_cmd = (f"{common}{env + ' ' if env else ''}RAY_enable_autoscaler_v2=0 {o.remote_bin} head --detach "
                f"--name {shlex.quote(o.name)} --node-ip {o.head} --port {o.ray_port} --agent-port {o.agent_port} "
                f"--token-file {REMOTE_TOKEN} --autoscaling-config ~/ray_bootstrap_config.yaml")
    worker_cmd = (f"{common}{env + ' ' if env else ''}{o.remote_bin} join --detach "
                  f"--address $RAY_HEAD_IP:{o.agent_port} --token-file {REMOTE_TOKEN}")
    n = len(o.workers)
    cfg: dict[str, Any] = {
        "cluster_name": o.name,
        "provider": {"type": "local", "head_ip": o.head, "worker_ips": list(o.workers)},
        "auth": {"ssh_user": o.ssh_user, "ssh_private_key": str(o.ssh_key)},
        "min_workers": n,
        "max_workers": n,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": NEVER_IDLE_MIN,
        "file_mounts": {},
        "cluster_synced_files": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [head_cmd],
        "worker_start_ray_commands": [worker_cmd],
    }
    if o.token_file is not None:
        # a file mount, not a literal: the YAML may be shared or committed, the token must not be
        cfg["file_mounts"][REMOTE_TOKEN] = str(o.token_file)
        cfg["setup_commands"].append(f"chmod 700 ~/.config/tilefleet && chmod 600 {REMOTE_TOKEN}")
    else:
        cfg["head_start_ray_commands"] = [head_cmd.replace(f"--token-file {REMOTE_TOKEN}", "--insecure")]
        cfg["worker_start_ray_commands"] = [worker_cmd.replace(f"--token-file {REMOTE_TOKEN}", "--insecure")]
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    import yaml

    header = ("# Written by `tilefleet cluster-config`. Bring it up with `ray up -y <this file>` "
              "(or `tilefleet up`).\n# Start commands go through tilefleet head/join: token, labels, "
              "no `ray stop`.\n")
    return header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=1000)


def launch(config_path: Path, *, yes: bool = True, timeout_s: float = 900,
           env: dict[str, str] | None = None) -> int:
    """Run ``ray up`` on the written file, streaming its output; returns its exit code.

    Raises :class:`ClusterConfigError` when ``ray up`` runs past ``timeout_s``."""
    ray = Path(sys.executable).with_name("ray")
    argv = [str(ray) if ray.exists() else "ray", "up", str(config_path), "--no-config-cache",
            "--disable-usage-stats", "--log-style", "record"] + (["-y"] if yes else [])
    full_env = {**os.environ, **(env or {})}
    try:
        return subprocess.run(argv, env=full_env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired as e:
        raise ClusterConfigError(f"`ray up` did not finish within {timeout_s:.0f} s; check that every device "
                                 "accepts the SSH key and has the same Ray and Python versions") from e


def options_from_args(head: str, workers: Sequence[str], ssh_user: str | None, ssh_key: str | None,
                      token_file: str | None, insecure: bool, **kw: Any) -> LaunchOptions:
    """Check the command line's options and fill in defaults (current user, ~/.ssh/id_ed25519)."""
    user = ssh_user or os.environ.get("USER") or _whoami()
    key = Path(ssh_key).expanduser() if ssh_key else _default_key()
    if not key.is_file():
        raise ClusterConfigError(f"SSH key {key} does not exist; pass --ssh-key (ray up logs into every device with it)")
    tok: Path | None = None
    if not insecure:
        from .state import default_token_path

        tok = Path(token_file).expanduser() if token_file else default_token_path()
        if not tok.is_file():
            raise ClusterConfigError(f"token file {tok} does not exist; run `tilefleet head` once to create one, "
                                     "pass --token-file, or --insecure to launch without authentication")
    return LaunchOptions(head=head, workers=tuple(workers), ssh_user=user, ssh_key=key.resolve(),
                         token_file=tok.resolve() if tok else None, **kw)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _default_key() -> Path:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        p = Path.home() / ".ssh" / name
        if p.is_file():
            return p
    return Path.home() / ".ssh" / "id_ed25519"
