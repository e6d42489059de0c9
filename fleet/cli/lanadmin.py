"""``tilefleet token`` (show, rotate) and ``tilefleet service`` (install, uninstall): a cluster's upkeep.

``add_admin_commands(subparsers)`` adds both to ``tilefleet``'s parser. Expected failures are one
line on stderr and exit 2 (usage, configuration) or 1 (runtime), as for the other LAN commands.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet import lan
from fleet.lan import service as svc
from fleet.lan.node import restart_head
from fleet.lan.state import LanError
from fleet.lan.tokens import create_token, load_token

TOKEN_EPILOG = """\
examples:
  tilefleet token show                         where the token is and its fingerprint (never the token)
  tilefleet token rotate --restart-head        new token; this machine's head restarts with it

Ray reads its token once, when it starts, so a running head keeps the old one until it restarts:
`rotate` refuses while a head runs here unless --restart-head. Devices with the old token are
refused at their next join (running `tilefleet join` processes try again by themselves, and get
in once the new token file is copied to them, at the same path).
"""

SERVICE_EPILOG = """\
examples:
  sudo tilefleet service install head --cluster lab --tls
  sudo tilefleet service install join --cluster lab
  tilefleet service install join --cluster lab --user-unit      no root: a systemd user unit
  tilefleet service install join --cluster lab --print          only print the unit
  sudo tilefleet service uninstall join --cluster lab

The unit runs the same command you would type, as you (or whoever ran sudo), from your home, and
restarts it on failure forever (a device that boots before its head keeps trying). It holds no
secret: the token stays in its file.
"""


def add_admin_commands(sub: Any) -> None:
    """Add ``token`` and ``service`` to ``tilefleet``'s subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("token", help="show or rotate the cluster's join token",
                       description="Show where the join token is and its fingerprint, or replace it with a new "
                                   "one (rotate).", epilog=TOKEN_EPILOG, formatter_class=raw)
    tsub = t.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    for name, summary in (("show", "the token's path, fingerprint and mode"),
                          ("rotate", "write a new token (the old one stops working at the next join)")):
        p = tsub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        p.add_argument("--token-file", metavar="F", help="the token file (default: ~/.config/tilefleet/token)")
        if name == "rotate":
            p.add_argument("--restart-head", action="store_true",
                           help="restart this machine's running head with the new token (devices rejoin once "
                                "they have it)")
        p.set_defaults(func=token_show if name == "show" else token_rotate)

    s = sub.add_parser("service", help="install a systemd unit that runs `head` or `join` at boot",
                       description="Write a systemd unit that runs `tilefleet head` or `tilefleet join` at boot and "
                                   "after failures (Restart=on-failure), and enable it with systemctl; or remove it.",
                       epilog=SERVICE_EPILOG, formatter_class=raw)
    ssub = s.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    ins = ssub.add_parser("install", help="write and enable the unit")
    uni = ssub.add_parser("uninstall", help="disable and remove the unit")
    for p in (ins, uni):
        p.add_argument("role", choices=svc.ROLES, help="what the unit runs")
        p.add_argument("--cluster", metavar="NAME", help="the cluster's name (head: --name; join: --cluster)")
        p.add_argument("--user-unit", action="store_true",
                       help="a systemd user unit (~/.config/systemd/user) instead of a system unit (needs root)")
        p.add_argument("--unit-dir", metavar="DIR", help=argparse.SUPPRESS)  # tests: write units elsewhere
    ins.add_argument("--address", metavar="HOST[:AGENTPORT]", help="join: the head's agent instead of zeroconf")
    ins.add_argument("--token-file", metavar="F", help="the token file the unit passes (default: the default path)")
    ins.add_argument("--tls", action="store_true", help="head: encrypt Ray's traffic (tilefleet head --tls)")
    ins.add_argument("--node-ip", metavar="IP", help="this machine's LAN address, if it has several")
    ins.add_argument("--device-name", metavar="NAME", help="join: this device's name in the cluster")
    ins.add_argument("--num-cpus", type=int, metavar="N", help="CPUs offered to tiles")
    ins.add_argument("--now", action="store_true", help="also start it now")
    ins.add_argument("--print", action="store_true", help="print the unit instead of installing it")
    ins.set_defaults(func=service_install)
    uni.set_defaults(func=service_uninstall)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _guarded(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except LanError as e:
        _err(f"tilefleet {args.command}: error: {e}")
        return e.code


# --------------------------------------------------------------------------------------------------
# token
# --------------------------------------------------------------------------------------------------


def _token_path(args: argparse.Namespace) -> Path:
    return Path(args.token_file).expanduser() if args.token_file else lan.default_token_path()


def token_show(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        t = load_token(_token_path(args))
        print(f"token {t.path}: fingerprint {t.fingerprint}, mode {t.path.stat().st_mode & 0o777:o}")
        if t.warning:
            _err(t.warning)
        return 0

    return _guarded(run, args)


def token_rotate(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        path = _token_path(args)
        state = lan.state_dir()
        head = lan.read_state(state / "head.json")
        ours = head is not None and head.get("token_path") and Path(head["token_path"]).resolve() == path.resolve()
        if ours and not args.restart_head:
            raise LanError(f"the head running here (pid {head['pid']}) uses {path}, and Ray reads its token only "  # type: ignore[index]
                           "when it starts; pass --restart-head to rotate and restart it (devices rejoin by "
                           "themselves once they have the new token), or stop the head first")
        old = load_token(path).fingerprint if path.exists() else None
        new = create_token(path)
        print(f"rotated the join token {path}: fingerprint {old or 'none'} -> {new.fingerprint} (mode 0600)")
        print("  copy it to every device, at the same path (or their --token-file); devices with the old one "
              "are refused at their next join")
        if ours:
            st = restart_head(state)
            print(f"  the head of cluster {st['cluster_name']} restarted with it (pid {st['pid']}, instance "
                  f"{st['instance']}); running joins with the new token rejoin by themselves")
        elif args.restart_head:
            print("  no head runs here with this token: its next start uses the new one")
        return 0

    return _guarded(run, args)


# --------------------------------------------------------------------------------------------------
# service
# --------------------------------------------------------------------------------------------------


def _runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _directory(args: argparse.Namespace, system: bool) -> Path:
    return Path(args.unit_dir) if args.unit_dir else svc.unit_dir(system)


def _system(args: argparse.Namespace) -> bool:
    import os

    system = not args.user_unit
    if system and os.geteuid() != 0 and not args.unit_dir and not getattr(args, "print", False):
        raise LanError("a system unit (started at boot for everyone) needs root: run it with sudo, or pass "
                       "--user-unit for a unit of your own")
    return system


def service_install(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        import os

        system = _system(args)
        user, home = svc.invoking_user()
        argv = svc.command(args.role, cluster=args.cluster, address=args.address, token_file=args.token_file,
                           tls=args.tls, node_ip=args.node_ip, device_name=args.device_name, num_cpus=args.num_cpus)
        env = {k: os.environ[k] for k in svc.ENV_KEYS if k in os.environ}
        env["HOME"] = str(home)
        spec = svc.UnitSpec(role=args.role, argv=argv, user=user, working_dir=home, environment=env,
                            cluster=args.cluster, system=system)
        if args.print:
            print(svc.unit_text(spec), end="")
            return 0
        directory = _directory(args, system)
        live = svc.systemd_running() and not args.unit_dir
        for line in svc.install(spec, directory, run=_runner if live else None, start=args.now):
            print(line)
        return 0

    return _guarded(run, args)


def service_uninstall(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        system = _system(args)
        live = svc.systemd_running() and not args.unit_dir
        for line in svc.uninstall(args.role, args.cluster, _directory(args, system), system=system,
                                  run=_runner if live else None):
            print(line)
        return 0

    return _guarded(run, args)
