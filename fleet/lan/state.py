"""Where the LAN layer keeps things: config and state directories, Ray's temp dirs, state files of running
processes (a dead pid is stale), and one atomic write for the token, state files and the profile cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from .procs import pid_alive



_SOCKET_PATH_MAX: Final = 107  # AF_UNIX path limit; Ray's sockets live under <temp-dir>/session_*/sockets/


_RAY_SUFFIX_LEN: Final = 64    # len("/session_2026-11-24_22-40-05_802465_123456/sockets/plasma_store")


STATE_MAX: Final = 64 * 1024
"""Largest state file read (ours are about 1 KiB); a bigger one is not ours and is treated as stale."""


class LanError(Exception):
    """An expected failure with one line saying what was wrong and what to do; ``code`` is the
    exit status (2 for usage and configuration, 1 for runtime failures)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


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


def write_state(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(dict(data), indent=1, sort_keys=True).encode())


def read_state(path: Path, *, live_only: bool = True) -> dict[str, Any] | None:
    """A state file whose process still runs; None (and the file removed) if it is missing,
    unreadable or stale (its pid is dead or belongs to another process now). ``live_only=False``
    returns a stale one too (to clean up after a process that was killed)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(STATE_MAX + 1)
        data = json.loads(raw) if len(raw) <= STATE_MAX else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file (mode 0600) and a rename: never half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class NotARegularFile(OSError):
    """A path that should be a file is a directory, a device or a FIFO (never read from those)."""


def read_bounded(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """At most ``limit + 1`` bytes of a regular file and its stat (the caller checks the length, so a
    file over the limit is refused without reading it all). Raises ``OSError``s, including
    :class:`NotARegularFile`, for the caller to word."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"{path} is not a regular file")
    with open(path, "rb") as f:
        return f.read(limit + 1), st
