"""The LAN subcommands: ``profile``, ``head``, ``join``, ``leave``, ``stop`` and the LAN ``devices``.

``add_lan_commands(subparsers)`` adds the first five to ``tilefleet``'s parser; ``devices_lan`` is
the handler of ``tilefleet devices`` without ``--catalog`` (:func:`add_devices_lan_args` adds its
options). ``python -m fleet.cli.lan`` runs these commands alone; ``--detach`` re-runs itself that way.
Expected failures are one line on stderr and exit 2 (usage, configuration, refusals) or 1 (runtime).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleet import lan
from fleet.lan.agent import AgentClient, AgentError, HeadNotProven
from fleet.lan.discovery import static_heads
from fleet.lan.member import JoinOptions, run_join
from fleet.lan.node import HeadOptions, clean_stale, run_head, stop_one, tls_of_state
from fleet.lan.state import LanError
from fleet.lan.trust import check_head, collect_devices, pick_head


HEAD_EPILOG = """\
examples:
  tilefleet head                               cluster named after this host, Ray on 6379, agent on 6390
  tilefleet head --name lab --detach           in the background; `tilefleet stop` ends it
  tilefleet head --node-ip 192.168.1.10        pick the LAN address on a machine with several
  tilefleet head --num-cpus 0                  coordinate only: run no tiles on this machine

The join token is ~/.config/tilefleet/token (created on first use, mode 0600): copy it to every
device (same path there, or pass --token-file). Devices find the head by zeroconf (mDNS) or with
`tilefleet join --address HEAD_IP:6390`.
"""

JOIN_EPILOG = """\
examples:
  tilefleet join                               the only cluster on the LAN (zeroconf)
  tilefleet join --cluster lab --detach        cluster 'lab', in the background
  tilefleet join --address 192.168.1.10:6390   no multicast on this LAN: ask the head's agent
  tilefleet join --client                      a node that offers no CPUs, to run a driver here

Before anything starts, the head must prove it holds this device's token (a challenge the head
answers with an HMAC), and tilefleet, Ray and Python versions must match the head's.
"""


# --------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is an integer 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is an integer 1..65535, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 600], got {text!r}")
    return value


def _token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", metavar="F",
                   help="the cluster's join token (default: $XDG_CONFIG_HOME/tilefleet/token, "
                        "~/.config/tilefleet/token)")
    p.add_argument("--insecure", action="store_true",
                   help="no token: anyone on the LAN can join and run code (only on a network you own)")


def add_lan_commands(sub: Any) -> None:
    """Add ``profile``, ``head``, ``join``, ``leave`` and ``stop`` to ``tilefleet``'s subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    pr = sub.add_parser(
        "profile", help="measure this device (conv GFLOP/s, per-tile overhead, memory, link to the head)",
        description="Measure this device: 3x3-conv GFLOP/s and per-tile overhead (about --seconds of torch work), "
                    "available memory, cores and GPU; cached per host and reused unless --refresh. With a head "
                    "known (the one this device joined, or --address), also the link's bandwidth and one-way "
                    "latency to it. --json prints the emulation catalog's profile format.",
        epilog="examples:\n  tilefleet profile\n  tilefleet profile --refresh --seconds 3\n"
               "  tilefleet profile --address 192.168.1.10:6390 --json > me.json\n", formatter_class=raw)
    pr.add_argument("--json", action="store_true", help="print the profile as JSON (sims.catalog.Profile fields)")
    pr.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    pr.add_argument("--seconds", type=_seconds, default=1.0, help="measuring time when measuring (default 1)")
    pr.add_argument("--address", metavar="HOST[:AGENTPORT]", help="measure the link to this head's agent")
    _token_args(pr)
    pr.set_defaults(func=profile)

    h = sub.add_parser(
        "head", help="start a cluster's head on this machine (Ray head, agent, zeroconf advert)",
        description="Start the head of a tilefleet cluster: a Ray head with token authentication, fast failure "
                    "detection and this device's labels (the head computes tiles too unless --num-cpus 0), the "
                    "tilefleet agent that lets devices check the head and measure their link, and a zeroconf "
                    "advert (_tilefleet._tcp.local.). Runs in the foreground until Ctrl-C or SIGTERM, which "
                    "withdraw the advert and stop Ray; --detach runs it in the background.",
        epilog=HEAD_EPILOG, formatter_class=raw)
    h.add_argument("--name", help="cluster name devices join by (default: this host's name)")
    h.add_argument("--port", type=_port, default=lan.DEFAULT_RAY_PORT, help="Ray's GCS port (default 6379)")
    h.add_argument("--agent-port", type=_port, default=lan.DEFAULT_AGENT_PORT,
                   help="the tilefleet agent's TCP port (default 6390)")
    h.add_argument("--node-ip", metavar="IP", help="this machine's address on the devices' LAN (default: its only one)")
    _token_args(h)
    h.add_argument("--tls", action="store_true",
                   help="encrypt Ray's traffic: a CA in the state dir signs a certificate for every device as it "
                        "joins (after the token challenge); nodes without one are refused (docs/security.md)")
    h.add_argument("--detach", action="store_true", help="run in the background; `tilefleet stop` ends it")
    h.add_argument("--num-cpus", type=_count, metavar="N", help="CPUs this machine offers to tiles (default: all)")
    h.add_argument("--autoscaling-config", metavar="YAML",
                   help="passed to `ray start` (what `ray up` writes on the head: its monitor then starts the "
                        "workers the YAML lists; see `tilefleet cluster-config`)")
    h.set_defaults(func=head)

    j = sub.add_parser(
        "join", help="join this device to a cluster (found by zeroconf or --address)",
        description="Find a head (zeroconf, or --address for the head's agent), check versions and the token's "
                    "fingerprint, make the head prove it holds the token, measure the link to it, profile this "
                    "device, and start a Ray node labelled with those figures. Foreground until Ctrl-C or SIGTERM; "
                    "--detach runs it in the background (`tilefleet leave` drains and ends it).",
        epilog=JOIN_EPILOG, formatter_class=raw)
    j.add_argument("--cluster", metavar="NAME", help="the cluster to join when several are on the LAN")
    j.add_argument("--address", metavar="HOST[:AGENTPORT]", help="the head's agent, instead of zeroconf (port 6390)")
    j.add_argument("--node-ip", metavar="IP", help="this device's address (default: the one that reaches the head)")
    j.add_argument("--device-name", metavar="NAME", help="this device's name in the cluster (default: host name)")
    _token_args(j)
    j.add_argument("--client", action="store_true",
                   help="offer no CPUs (labelled role=client): a node to run a driver on")
    j.add_argument("--detach", action="store_true", help="run in the background; `tilefleet leave` ends it")
    j.add_argument("--num-cpus", type=_count, metavar="N", help="CPUs this device offers to tiles (default: all)")
    j.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                   help="seconds to look for the head and for each answer of its agent (default 5)")
    j.set_defaults(func=join)

    lv = sub.add_parser("leave", help="drain this device's node and stop it",
                        description="Ask the head to drain this device's Ray node (running work moves elsewhere), "
                                    "then stop the local `tilefleet join`.")
    lv.set_defaults(func=leave)

    st = sub.add_parser("stop", help="stop this machine's tilefleet head and join processes",
                        description="Stop the `tilefleet head` and `tilefleet join` processes of this machine (by the "
                                    "pids in their state files, ~/.local/state/tilefleet), and whatever Ray processes "
                                    "they leave behind. Never touches other Ray instances.")
    st.set_defaults(func=stop)


def add_devices_lan_args(p: argparse.ArgumentParser) -> None:
    """The LAN options of ``tilefleet devices`` (the parser keeps ``--catalog`` for the catalog)."""
    p.add_argument("--cluster", metavar="NAME", help="only this cluster")
    p.add_argument("--address", metavar="HOST[:AGENTPORT]",
                   help="ask these heads' agents (comma-separated), not zeroconf")
    p.add_argument("--json", action="store_true", help="print heads and devices as JSON")
    p.add_argument("--timeout", type=_seconds, default=3.0, metavar="S",
                   help="seconds to browse and to wait for answers")
    _token_args(p)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _token(args: argparse.Namespace, *, create: bool) -> lan.Token | None:
    """None in insecure mode (with the loud warning); else the token, with what to tell the user."""
    if args.insecure:
        if args.token_file:
            raise LanError("--insecure and --token-file contradict each other; pick one")
        _err("WARNING: --insecure: no token, anyone who can reach this LAN can join the cluster and run code on it")
        return None
    token = lan.resolve_token(args.token_file, create=create)
    if token.created:
        print(f"created the join token {token.path} (mode 0600); devices need a copy of it at the same path "
              f"(or pass --token-file)")
    if token.warning:
        _err(token.warning)
    return token


def _token_args_of(token: lan.Token | None) -> list[str]:
    return ["--insecure"] if token is None else ["--token-file", str(token.path)]


def _profile(refresh: bool = False, seconds: float = 1.0) -> Any:
    from fleet.lan import profiling

    try:
        return profiling.get(refresh=refresh, seconds=seconds, progress=True)
    except ValueError as e:  # ProfileCacheError says how to fix it
        raise LanError(str(e)) from None


def _detach(command: list[str], state_file: Path, log_path: Path, summary: Callable[[dict[str, Any]], str]) -> int:
    """Run ``python -m fleet.cli.lan COMMAND`` in a new session and wait until its state file says it is up."""
    argv = [sys.executable, "-m", "fleet.cli.lan", *command]
    child = lan.start_child(argv, os.environ, log_path)
    deadline = time.monotonic() + lan.START_TIMEOUT_S + 30
    while time.monotonic() < deadline:
        state = lan.read_state(state_file)
        if state is not None and state.get("pid") == child.pid:
            print(summary(state))
            print(f"  running in the background (pid {child.pid}); log: {log_path}")
            return 0
        if child.poll() is not None:
            _err(f"tilefleet {command[0]} failed in the background (exit {child.returncode}); the end of {log_path}:\n"
                 f"{lan.log_tail(log_path)}")
            return child.returncode or 1
        time.sleep(0.2)
    lan.terminate(child.pid, pgid=child.pid)
    _err(f"tilefleet {command[0]} did not come up within {lan.START_TIMEOUT_S + 30:g} s; the end of {log_path}:\n"
         f"{lan.log_tail(log_path)}")
    return 1


def _clean_stale(path: Path, what: str) -> None:
    """A previous run that was killed (power cut, SIGKILL) may have left Ray running: stop it first."""
    done = clean_stale(path, what)
    if done:
        _err(f"note: {done}")


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected errors become one line and an exit code, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LanError as e:
            _err(f"tilefleet {args.command}: error: {e}")
            return e.code
        except AgentError as e:
            _err(f"tilefleet {args.command}: error: {e}")
            return 2 if isinstance(e, HeadNotProven) else 1

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# --------------------------------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------------------------------


def head_summary(st: dict[str, Any]) -> str:
    where = f"{st['node_ip']}:{st['agent_port']}"
    token = "none (--insecure)" if st.get("insecure") else f"{st['token_path']} (fingerprint {st['fingerprint']})"
    return "\n".join([
        f"tilefleet head: cluster {st['cluster_name']} (id {st['cluster_id'][:8]}) is up",
        f"  ray:    {st['node_ip']}:{st['ray_port']}",
        f"  agent:  {where}"
        + ("" if st.get("advertised") else "  (not advertised over zeroconf: join with --address)"),
        f"  token:  {token}" + ("" if st.get("insecure") else ": copy it to every device"),
        f"  tls:    Ray's traffic encrypted; CA {st['tls']['ca']} (devices get certificates as they join)"
        if st.get("tls") else "  tls:    off (Ray's traffic is authenticated by the token, not encrypted; --tls)",
        f"  join:   tilefleet join --cluster {st['cluster_name']}   or   tilefleet join --address {where}",
        "  stop:   Ctrl-C in the foreground, or `tilefleet stop`",
    ])


@_guard
def head(args: argparse.Namespace) -> int:
    """Start the head (see the parser's description)."""
    state = lan.state_dir()
    _clean_stale(state / "head.json", "tilefleet head")
    running = lan.read_state(state / "head.json")
    if running is not None:
        raise LanError(f"a tilefleet head already runs on this machine (pid {running['pid']}, cluster "
                       f"{running['cluster_name']} at {running['node_ip']}:{running['ray_port']}); "
                       "`tilefleet stop` ends it")
    name = lan.check_cluster_name(args.name or lan.default_cluster_name())
    if args.port == args.agent_port:
        raise LanError(f"--port and --agent-port are both {args.port}; give them different ports")
    node_ip = lan.choose_node_ip(args.node_ip)
    if ipaddress.ip_address(node_ip).is_loopback:
        _err(f"warning: --node-ip {node_ip} is a loopback address: only this machine can join this head")
    token = _token(args, create=True)
    if args.tls and token is None:
        raise LanError("--tls needs the join token (devices get their certificates after proving they hold it); "
                       "drop --insecure")
    if not lan.port_free(args.port):
        raise LanError(f"port {args.port} (Ray's GCS) is in use on this machine (another Ray head?); "
                       "pick another with --port")
    if not lan.port_free(args.agent_port, node_ip):
        raise LanError(f"port {args.agent_port} (the tilefleet agent) is in use on {node_ip}; "
                       "pick another with --agent-port")
    if args.detach:
        command = ["head", "--name", name, "--port", str(args.port), "--agent-port", str(args.agent_port),
                   "--node-ip", node_ip, *_token_args_of(token)]
        if args.num_cpus is not None:
            command += ["--num-cpus", str(args.num_cpus)]
        command += ["--tls"] if args.tls else []
        if args.autoscaling_config:
            command += ["--autoscaling-config", str(Path(args.autoscaling_config).expanduser())]
        return _detach(command, state / "head.json", state / "head.log", head_summary)
    opts = HeadOptions(name=name, node_ip=node_ip, token=token, state=state, port=args.port,
                       agent_port=args.agent_port, num_cpus=args.num_cpus,
                       autoscaling_config=str(Path(args.autoscaling_config).expanduser())
                       if args.autoscaling_config else None, tls=args.tls)
    return run_head(opts, _profile(), lambda st: print(head_summary(st), flush=True))


# --------------------------------------------------------------------------------------------------
# join, leave, stop
# --------------------------------------------------------------------------------------------------


def join_summary(st: dict[str, Any]) -> str:
    return "\n".join([
        f"tilefleet join: this device is node {st['node_id'][:12]} of cluster {st['cluster_name']} "
        f"(head {st['head_host']}:{st['ray_port']})",
        f"  as:     {st['name']} at {st['node_ip']}, role {st['role']}",
        f"  link:   {st['down_mbps']:.1f} Mbit/s down, {st['up_mbps']:.1f} Mbit/s up, "
        f"{st['latency_ms']:.2f} ms one-way",
        f"  tls:    certificate {st['tls']['cert']}" if st.get("tls") else "  tls:    off",
        "  rejoin: by itself when the head restarts (this process waits for it)",
        "  leave:  Ctrl-C in the foreground, or `tilefleet leave`",
    ])


@_guard
def join(args: argparse.Namespace) -> int:
    """Join a cluster (see the parser's description)."""
    state = lan.state_dir()
    _clean_stale(state / "join.json", "tilefleet join")
    running = lan.read_state(state / "join.json")
    if running is not None:
        raise LanError(f"this machine already joined cluster {running['cluster_name']} (pid {running['pid']}); "
                       "`tilefleet leave` first")
    token = _token(args, create=False)
    advert, client = pick_head(token, cluster=args.cluster, address=args.address, timeout=args.timeout,
                               node_ip=args.node_ip)
    with client:
        node_ip = lan.choose_node_ip(args.node_ip, advert.host)
        if args.detach:
            command = ["join", "--address", f"{client.host}:{client.port}", "--node-ip", node_ip,
                       "--timeout", str(args.timeout), *_token_args_of(token)]
            command += ["--client"] if args.client else []
            command += ["--device-name", args.device_name] if args.device_name else []
            command += ["--num-cpus", str(args.num_cpus)] if args.num_cpus is not None else []
            return _detach(command, state / "join.json", state / "join.log", join_summary)
        opts = JoinOptions(node_ip=node_ip, token=token, state=state, device_name=args.device_name,
                           client=args.client, num_cpus=args.num_cpus, address=args.address, timeout=args.timeout)
        return run_join(opts, advert, client, _profile(), lambda st: print(join_summary(st), flush=True))


@_guard
def stop(args: argparse.Namespace) -> int:
    """Stop this machine's head and join processes."""
    state = lan.state_dir()
    done = [m for m in (stop_one(state / "join.json", "tilefleet join"),
                        stop_one(state / "head.json", "tilefleet head")) if m]
    if not done:
        print(f"nothing to stop: no tilefleet head or join runs on this machine (state in {state})")
    for line in done:
        print(line)
    return 0


@_guard
def leave(args: argparse.Namespace) -> int:
    """Drain this device's node, then stop the join process."""
    path = lan.state_dir() / "join.json"
    st = lan.read_state(path)
    if st is None:
        print("nothing to leave: this machine runs no `tilefleet join`")
        return 0
    lan.use_ray_auth(Path(st["token_path"]) if st.get("token_path") else None, tls_of_state(st))
    print(lan.drain(f"{st['head_host']}:{st['ray_port']}", st["node_id"]))
    print(stop_one(path, "tilefleet join"))
    return 0


# --------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------


@_guard
def profile(args: argparse.Namespace) -> int:
    """Measure (or recall) this device's profile, plus its link to a known head."""
    prof = _profile(refresh=args.refresh, seconds=args.seconds)
    target, explicit = None, bool(args.address)
    if args.address:
        try:
            ((host, port),) = static_heads(args.address, default_port=lan.DEFAULT_AGENT_PORT)
        except ValueError as e:
            raise LanError(f"--address: {e}") from None
        target = (host, port, None if args.insecure else lan.resolve_token(args.token_file, create=False))
    link_note = "not measured: no head known (join one, or pass --address HOST:AGENTPORT)"
    st = None if args.address else lan.read_state(lan.state_dir() / "join.json")
    if st is not None:
        try:
            target = (st["agent_host"], st["agent_port"],
                      None if st.get("insecure") else lan.load_token(Path(st["token_path"])))
        except LanError as e:
            link_note = f"not measured: {e}"
    if target is not None:
        host, port, token = target
        try:
            with AgentClient(host, port) as client:
                check_head(client.info(), client, token, versions=False)
                link = client.probe()
            prof = dataclasses.replace(prof, link_mbps=min(link.down_mbps, link.up_mbps),
                                       latency_s=link.latency_ms / 1e3)
            link_note = (f"{link.down_mbps:.1f} Mbit/s down, {link.up_mbps:.1f} up, {link.latency_ms:.2f} ms one-way "
                         f"to {host}:{port}")
        except AgentError as e:
            if explicit:
                raise
            link_note = f"not measured: {e}"
    if args.json:
        print(json.dumps(dataclasses.asdict(prof.to_catalog_profile(emulated=False)), indent=1))
        return 0
    from tiling.report import table

    gpu = f"{prof.gpu_name}, {prof.gpu_gflops:.1f} GFLOP/s" if prof.gpu and prof.gpu_gflops else "none"
    rows = [["name", prof.name], ["class", prof.klass],
            ["conv GFLOP/s", f"{prof.gflops:.1f} on {prof.threads} threads"],
            ["per-tile overhead", f"{prof.tile_overhead_s * 1e3:.3f} ms"],
            ["available memory", f"{prof.memory_bytes / 2**20:.0f} MiB"], ["cores", str(prof.cores)], ["GPU", gpu],
            ["link to head", link_note],
            ["measured", time.strftime("%Y-%m-%d %H:%M", time.localtime(prof.measured_at))]]
    print(table(["figure", "value"], rows))
    return 0


# --------------------------------------------------------------------------------------------------
# devices (LAN)
# --------------------------------------------------------------------------------------------------


def devices_table(devices: Sequence[dict[str, Any]]) -> str:
    from tiling.report import table

    rows = []
    for d in sorted(devices, key=lambda d: (not d["is_head"], d["labels"].get("tilefleet/name", ""), d["node_id"])):
        lab = d["labels"]
        rows.append([lab.get("tilefleet/name", "?"), d["node_id"][:12], d["ip"], lab.get("tilefleet/class", "?"),
                     f"{d['cpus']:g}", lab.get("tilefleet/gflops", "?"), lab.get("tilefleet/memory_mb", "?"),
                     "yes" if lab.get("tilefleet/gpu") == "1" else "no", lab.get("tilefleet/link_mbps", "-"),
                     lab.get("tilefleet/role", "?"), d["state"], d["tiles_done"]])
    return table(["name", "node", "address", "class", "CPUs", "GFLOP/s", "memory MiB", "GPU", "link Mbit/s", "role",
                  "state", "tiles done"], rows)


@_guard
def devices_lan(args: argparse.Namespace) -> int:
    """``tilefleet devices`` on the LAN: the heads found and each one's devices."""
    heads = collect_devices(address=args.address, cluster=args.cluster, token_file=args.token_file,
                            insecure=args.insecure, timeout=args.timeout)
    if args.json:
        print(json.dumps({"heads": heads}, indent=1))
    elif not heads:
        where = args.address or "zeroconf (mDNS) on this LAN"
        print(f"no tilefleet head found via {where}" + (f" for cluster {args.cluster}" if args.cluster else ""))
    for h in heads if not args.json else []:
        a = h["advert"]
        if a:
            print(f"cluster {a['cluster_name']} (id {a['cluster_id'][:8]}): Ray at {a['host']}:{a['ray_port']}, agent "
                  f"{h['agent']}; tilefleet {a['tilefleet_version']}, Ray {a['ray_version']}, "
                  f"Python {a['python_version']}")
        else:
            print(f"agent {h['agent']}")
        print(f"  {h['error']}" if h["error"] else devices_table(h["devices"]))
        print()
    if not heads:
        return 1
    return 0 if any(h["devices"] is not None for h in heads) else 1


# --------------------------------------------------------------------------------------------------
# python -m fleet.cli.lan (what --detach runs)
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tilefleet", description="tilefleet's LAN commands")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_lan_commands(sub)
    dv = sub.add_parser("devices", help="the LAN's heads and their devices")
    add_devices_lan_args(dv)
    dv.set_defaults(func=devices_lan)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the LAN library's warnings, as lines
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
