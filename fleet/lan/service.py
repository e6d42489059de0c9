"""Devices that come back after a power cut: ``tilefleet service install head|join`` as a systemd unit.

Why systemd and these settings: a device on a shelf loses power and boots without anyone at a
keyboard. The unit runs the exact ``tilefleet head``/``join`` command line in the foreground
(``Type=simple``; no ``--detach``) as the user who owns the token and state, from that user's home,
with the environment tilefleet reads (``HOME``, the ``XDG_*`` dirs, ``PATH``). ``Restart=on-failure``
with ``StartLimitIntervalSec=0`` retries forever: a join that boots before its head exits 1 and is
tried again every ``RestartSec``; a clean stop (``systemctl stop``, exit 0) stays stopped.
``KillMode=mixed`` lets tilefleet stop its own Ray child in order (SIGTERM to the main process only,
SIGKILL to what is left after ``TimeoutStopSec``). A killed predecessor's Ray leftovers are cleaned
up by the next start (its state file names them).

Pure: :func:`unit_name`, :func:`command`, :func:`unit_text` and :func:`parse_unit` (the reverse, used
to check what was written and by the tests' supervisor). Thin glue: :func:`install` and
:func:`uninstall`, with the ``systemctl`` runner injected (tests never touch the machine's systemd).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .state import LanError, atomic_write

SYSTEM_UNIT_DIR: Final = Path("/etc/systemd/system")
RESTART_SEC: Final = 5
STOP_TIMEOUT_SEC: Final = 60
UNIT_MAX: Final = 64 * 1024
"""Largest unit file read back (ours are about 1 KiB)."""
ENV_KEYS: Final = ("HOME", "PATH", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "LANG")
"""The environment a unit carries over from the shell that installs it (what tilefleet reads)."""
_SAFE_WORD: Final = re.compile(r"[A-Za-z0-9_./:@+=,-]+")
ROLES: Final = ("head", "join")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class UnitSpec:
    """What a unit runs, as whom, where and with which environment."""

    role: str
    argv: tuple[str, ...]
    user: str
    working_dir: Path
    environment: Mapping[str, str] = field(default_factory=dict)
    cluster: str | None = None
    system: bool = True  # a system unit (User=, multi-user.target) or a user unit (default.target)


def unit_name(role: str, cluster: str | None) -> str:
    """``tilefleet-join-lab.service``: one unit per role and cluster, so a machine can be in two."""
    if role not in ROLES:
        raise LanError(f"a service is for `head` or `join`, not {role!r}")
    if cluster is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", cluster):
        raise LanError(f"cluster name {cluster!r}: use 1..63 letters, digits, '-', '_' or '.'")
    return f"tilefleet-{role}" + (f"-{cluster}" if cluster else "") + ".service"


def tilefleet_argv0() -> list[str]:
    """How to run this very tilefleet: the script beside this interpreter, else PATH's, else ``-m``."""
    beside = Path(sys.executable).with_name("tilefleet")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tilefleet")
    return [found] if found else [sys.executable, "-m", "fleet.cli.main"]


def command(role: str, *, cluster: str | None = None, address: str | None = None, token_file: str | None = None,
            tls: bool = False, node_ip: str | None = None, device_name: str | None = None,
            num_cpus: int | None = None, argv0: Sequence[str] | None = None) -> tuple[str, ...]:
    """The exact ``tilefleet head``/``join`` command line a unit runs (foreground, never ``--detach``)."""
    argv = [*(argv0 or tilefleet_argv0()), role]
    if role == "head":
        argv += ["--name", cluster] if cluster else []
        argv += ["--tls"] if tls else []
    else:
        if tls:
            raise LanError("--tls is the head's choice; a device follows what the head's advert says")
        argv += ["--cluster", cluster] if cluster else []
        argv += ["--address", address] if address else []
        argv += ["--device-name", device_name] if device_name else []
    argv += ["--node-ip", node_ip] if node_ip else []
    argv += ["--token-file", str(Path(token_file).expanduser().resolve())] if token_file else []
    argv += ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    return tuple(argv)


def quote(word: str) -> str:
    """One word of a unit file's command line: ``%`` and ``$`` escaped, quoted when needed."""
    if "\n" in word or "\x00" in word:
        raise LanError(f"{word!r:.60}: a unit's command line cannot hold a newline or NUL")
    word = word.replace("%", "%%").replace("$", "$$")
    if _SAFE_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(spec: UnitSpec) -> str:
    """The unit file for ``spec``."""
    what = f"tilefleet {spec.role}" + (f" (cluster {spec.cluster})" if spec.cluster else "")
    env = " ".join(quote(f"{k}={v}") for k, v in sorted(spec.environment.items()))
    lines = [
        "# Written by `tilefleet service install`; `tilefleet service uninstall` removes it.",
        "[Unit]", f"Description={what}",
        "After=network-online.target", "Wants=network-online.target",
        "StartLimitIntervalSec=0",  # never give up: a join may boot long before its head
        "", "[Service]", "Type=simple",
        *([f"User={spec.user}"] if spec.system else []),
        f"WorkingDirectory={_path_value(spec.working_dir)}",
        *([f"Environment={env}"] if env else []),
        "ExecStart=" + " ".join(quote(a) for a in spec.argv),
        "Restart=on-failure", f"RestartSec={RESTART_SEC}",
        "KillMode=mixed", f"TimeoutStopSec={STOP_TIMEOUT_SEC}",
        "", "[Install]", f"WantedBy={'multi-user.target' if spec.system else 'default.target'}", "",
    ]
    return "\n".join(lines)


def _path_value(path: Path) -> str:
    text = str(path)
    if "\n" in text or not path.is_absolute():
        raise LanError(f"{text!r:.60}: a unit's working directory must be an absolute path on one line")
    return text.replace("%", "%%")


def _unquote(text: str) -> list[str]:
    words = shlex.split(text, posix=True)
    return [w.replace("$$", "$").replace("%%", "%") for w in words]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as ``{section: {key: [values]}}`` (a key may repeat); size-limited, and lines that
    are not ``key=value`` inside a section are errors, not guesses."""
    if len(text) > UNIT_MAX:
        raise LanError(f"unit file is {len(text)} characters; tilefleet's are under {UNIT_MAX}")
    out: dict[str, dict[str, list[str]]] = {}
    section: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, eq, value = line.partition("=")
        if section is None or not eq or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()):
            raise LanError(f"unit file line {n} is not `key=value` inside a [section]: {raw[:80]!r}")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def service_of(text: str) -> tuple[tuple[str, ...], dict[str, str], Path | None, str, float]:
    """(command, environment, working dir, restart policy, restart delay) of a unit's ``[Service]``."""
    svc = parse_unit(text).get("Service", {})
    if len(svc.get("ExecStart", [])) != 1:
        raise LanError("the unit needs exactly one ExecStart=")
    env: dict[str, str] = {}
    for value in svc.get("Environment", []):
        for word in _unquote(value):
            k, _, v = word.partition("=")
            env[k] = v
    wd = svc.get("WorkingDirectory", [None])[-1]
    return (tuple(_unquote(svc["ExecStart"][0])), env, Path(wd.replace("%%", "%")) if wd else None,
            svc.get("Restart", ["no"])[-1], float(svc.get("RestartSec", ["0.1"])[-1]))


# --------------------------------------------------------------------------------------------------
# Glue: which user, where units go, systemctl
# --------------------------------------------------------------------------------------------------


def invoking_user() -> tuple[str, Path]:
    """(user, home) the unit runs as: whoever ran ``sudo`` if it was sudo, else this user."""
    name = os.environ.get("SUDO_USER") if os.geteuid() == 0 else None
    entry = pwd.getpwnam(name) if name else pwd.getpwuid(os.getuid())
    return entry.pw_name, Path(entry.pw_dir)


def unit_dir(system: bool) -> Path:
    """Where the unit goes: ``/etc/systemd/system`` (root), else ``~/.config/systemd/user``."""
    if system:
        return SYSTEM_UNIT_DIR
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def systemd_running() -> bool:
    """Whether systemd manages this machine now (it is PID 1): ``systemctl`` can enable units."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(system: bool, *args: str) -> list[str]:
    return ["systemctl", *([] if system else ["--user"]), *args]


def install(spec: UnitSpec, directory: Path, *, run: Runner | None, start: bool = False) -> list[str]:
    """Write the unit (0644: no secret in it, the token stays in its own file) and enable it with
    ``run`` (``systemctl``); ``run`` None: say what to run instead. Returns what happened, in lines."""
    name = unit_name(spec.role, spec.cluster)
    path = directory / name
    text = unit_text(spec)
    if service_of(text)[0] != spec.argv:  # the written command must be read back exactly
        raise LanError(f"cannot write {spec.argv!r} as a unit's command line exactly")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
    path.chmod(0o644)
    done = [f"wrote {path}", f"  runs: {shlex.join(spec.argv)}", f"  as:   {spec.user} in {spec.working_dir}"]
    steps = [_systemctl(spec.system, "daemon-reload"), _systemctl(spec.system, "enable", name)]
    if start:
        steps.append(_systemctl(spec.system, "start", name))
    if run is None:
        done.append("systemd is not running here; to enable it where it is: " + "; ".join(map(shlex.join, steps)))
        return done
    for argv in steps:
        res = run(argv)
        if res.returncode != 0:
            raise LanError(f"`{shlex.join(argv)}` failed ({(res.stderr or res.stdout).strip()[:300]}); the unit is "
                           f"written at {path}: fix the problem and run it again")
    done.append(f"enabled {name}: it starts at boot" + (" and runs now" if start else
                                                        f"; start it now with: {shlex.join(steps[-1][:-2] + ['start', name])}"))
    if not spec.system:
        done.append(f"a user unit runs only while {spec.user} is logged in unless lingering is on: "
                    f"loginctl enable-linger {spec.user}")
    return done


def uninstall(role: str, cluster: str | None, directory: Path, *, system: bool, run: Runner | None) -> list[str]:
    """Disable and stop the unit (``run``), then remove its file."""
    name = unit_name(role, cluster)
    path = directory / name
    if not path.exists():
        return [f"no {name} in {directory}: nothing to remove"]
    done = []
    if run is not None:
        for argv in (_systemctl(system, "disable", "--now", name), _systemctl(system, "daemon-reload")):
            res = run(argv)
            if res.returncode != 0:
                done.append(f"note: `{shlex.join(argv)}` failed: {(res.stderr or res.stdout).strip()[:200]}")
    path.unlink()
    done.append(f"removed {path}")
    if run is None:
        done.append("systemd is not running here; where it is, also run: "
                    f"{shlex.join(_systemctl(system, 'disable', name))}")
    return done
