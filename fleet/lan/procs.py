"""Processes: a ``ray start --block`` child in its own process group (Ray 2.60 drains and stops its own
processes on SIGTERM; whatever survives is killed by pid), pid liveness that survives pid reuse, and
a signal-driven stopper.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final



STOP_TIMEOUT_S: Final = 40.0


START_TIMEOUT_S: Final = 90.0


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
    """SIGTERM and SIGINT set :attr:`event` (a second Ctrl-C too: cleanup is already under way).

    With ``restart_signal``, SIGUSR1 sets :attr:`restart` instead: the head restarts in place
    (``tilefleet token rotate --restart-head`` sends it), which a stop request still overrides.
    """

    def __init__(self, *, restart_signal: bool = False) -> None:
        self.event = threading.Event()
        self.restart = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.event.set())
        if restart_signal:
            signal.signal(signal.SIGUSR1, lambda *_: self.restart.set())

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop or restart is asked for."""
        if self.event.wait(seconds):
            return True
        return self.restart.is_set()
