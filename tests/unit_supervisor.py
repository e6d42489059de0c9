"""A tiny stand-in for systemd, for tests: run a unit's ``ExecStart`` with its environment and
working directory, and restart it as its ``Restart=`` policy says (``no``, ``on-failure``,
``always``), after ``RestartSec``. SIGTERM stops the service (SIGTERM to the main process only, as
``KillMode=mixed``) and the supervisor. As pid 1 of a PID namespace it also reaps orphans (a killed
join's Ray child ends up here, as it would under init).

``python tests/unit_supervisor.py UNIT_FILE`` prints one line per start and exit, for the test to read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


def restart_wanted(policy: str, returncode: int) -> bool:
    """systemd's rule: ``on-failure`` restarts after a non-zero exit or a signal other than the four
    "clean" ones (SIGHUP, SIGINT, SIGTERM, SIGPIPE); ``always`` always; ``no`` never."""
    if policy == "always":
        return True
    if policy == "on-failure":
        if returncode < 0:
            return signal.Signals(-returncode) not in CLEAN_SIGNALS
        return returncode != 0
    if policy == "no":
        return False
    raise ValueError(f"Restart={policy} is not supported by this test supervisor")


def main(unit_file: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fleet.lan.service import service_of

    argv, env, wd, policy, delay = service_of(Path(unit_file).read_text())
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    starts = 0
    while not stopping:
        starts += 1
        child = subprocess.Popen(list(argv), env={**os.environ, **env}, cwd=wd)
        print(f"supervisor: start {starts}: pid {child.pid}", flush=True)
        code = _wait_reaping(child)
        print(f"supervisor: pid {child.pid} exited with {code}", flush=True)
        if stopping or not restart_wanted(policy, code):
            return 0
        print(f"supervisor: restarting in {delay:g} s (Restart={policy})", flush=True)
        time.sleep(delay)
    return 0


def _wait_reaping(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status (negative: killed by that signal), reaping every other child meanwhile."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return child.wait()
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
