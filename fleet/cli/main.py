"""The ``tilefleet`` command line: one subcommand a job, each with a ``--help`` that teaches."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import commands
from .common import add_model_args
from .sim import add_sim
from . import lan as lancli
from . import lanadmin
from . import serve as servecli

DESCRIPTION = """\
tilefleet splits CNN inference across a cluster of heterogeneous edge devices.

It fuses a stack of convolutional layers, cuts the stack's output into a grid of tiles
(DeepThings' Fused Tile Partitioning), and computes each tile from its own slightly larger
input region, so that tiles can run on different devices with no communication inside
the stack. The result is exactly the untiled model's output.
"""

EPILOG = """\
examples:
  tilefleet demo                               YOLOv2 layers 0-15 on 4 emulated Raspberry Pi 3s
  tilefleet demo --in-process --grid 5x5       DeepThings' 5x5 tiles, all in this process, checked
  tilefleet run --model resnet18 --devices pi3*2,pi4*2,laptop --frames 8
  tilefleet bench --devices pi3*6 --mode latency --frames 12 --json out.json
  tilefleet bench --soak --frames 10000 --plot soak.png   fail and revive a device for 10,000 frames
  tilefleet devices --catalog                  the emulated device profiles and their sources
  tilefleet head --name lab                    start a cluster on this machine (Ray head, agent, zeroconf)
  tilefleet join --cluster lab                 join this device to it (found by zeroconf)
  tilefleet devices                            the LAN's clusters and their devices
  tilefleet token rotate --restart-head        a new join token (devices with the old one are refused)
  sudo tilefleet service install join --cluster lab   rejoin at every boot (systemd)
  tilefleet plan --model vgg16 --grid 2x2      how a zoo model would be cut
  tilefleet plan --cfg yolov2.cfg --upto 16    the same for a Darknet config
  tilefleet models                             the model zoo
  tilefleet serve --model yolov2-16            serve it over the Open Inference Protocol (HTTP, gRPC)
  tilefleet loadtest URL --model M --rate 2    open-loop load against a server

Run 'tilefleet COMMAND --help' for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilefleet", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_run, _add_bench, add_sim, _add_devices, _add_lan, _add_lan_admin, _add_ray_up,
                _add_plan, _add_models, _add_serving):
        add(sub)
    return p


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="YOLOv2 layers 0-15 on an emulated cluster of 4 Raspberry Pi 3s",
                       description="Start a local Ray instance with emulated devices (default: 4 Raspberry Pi 3), "
                                   "deploy YOLOv2 layers 0-15 (DeepThings' workload), stream frames with a progress "
                                   "bar, check every result against the untiled model, and print per-device work "
                                   "and the speedup over one device. --in-process runs the tiles in this process "
                                   "instead (no Ray).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--devices", default="pi3*4", help="emulated devices, 'profile*count,...' (tilefleet devices --catalog)")
    d.add_argument("--frames", type=int, default=6, help="frames to stream")
    d.add_argument("--grid", default="auto", help="tile grid ROWSxCOLS, or 'auto' (chosen by the cost model)")
    d.add_argument("--mode", choices=["latency", "throughput"], default="latency",
                   help="what 'auto' optimises (throughput pays off over many more frames than the demo runs)")
    d.add_argument("--size", type=int, default=608, help="input height and width")
    d.add_argument("--in-process", action="store_true", help="plan and run every tile in this process (no Ray)")
    d.add_argument("--reuse", action="store_true", help="checkerboard order with DeepThings' overlap reuse")
    d.add_argument("--even", action="store_true",
                   help="with --in-process: even cuts (round(i*size/n)) instead of DeepThings' ceil(size/n) tiles")
    d.add_argument("--tiles", action="store_true", help="with --in-process: also print one row per tile")
    d.set_defaults(func=commands.demo)


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run frames of a model on an emulated (or real) cluster and check them",
                       description="Deploy a zoo model or a Darknet .cfg on a cluster, stream frames, check every "
                                   "result against the untiled model, and print per-device statistics.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(r)
    r.add_argument("--images", metavar="DIR",
                   help="run these PNG/JPEG files (a directory or one file) instead of random frames; needs "
                        "--preprocess (frames travel as uint8)")
    _cluster_args(r)
    r.add_argument("--frames", type=int, default=8, help="frames to stream")
    r.add_argument("--trace", help="write a Chrome trace (chrome://tracing, Perfetto) of the run to this file")
    r.set_defaults(func=commands.run)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure latency or throughput against the right baselines",
                       description="Benchmark a deployment: references are computed before the timed window and "
                                   "compared after it; latency is submit() to result with one frame in flight (p50, "
                                   "p95 after 2 warm-up frames); throughput is steady-state fps with k frames "
                                   "trimmed at each end. Speedups are over the untiled model on one device of the "
                                   "first listed kind (frame already there) and on the fastest device (client "
                                   "transfers included). --standard runs the standard set (make bench).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(b)
    _cluster_args(b, devices_default=argparse.SUPPRESS, devices_note=" (default pi3*4; pi4*4 with --soak)")
    b.add_argument("--frames", type=int, default=argparse.SUPPRESS,
                   help="timed frames (default 12, after 2 warm-up frames; 10000 with --soak)")
    b.add_argument("--in-flight", type=int, help="throughput mode: frames in flight (default 2 per device)")
    b.add_argument("--standalone", action="store_true",
                   help="also measure each device alone (for 'efficiency'; one run per device kind)")
    b.add_argument("--host-baseline", action="store_true",
                   help="also time plain torch on this host (2 threads, batch 1) in the same run")
    b.add_argument("--uint8-vs-float", action="store_true",
                   help="latency of raw uint8 camera frames (normalised on the devices) against float32 frames, "
                        "one cluster, alternating rounds")
    b.add_argument("--fidelity", action="store_true",
                   help="run the standard scenarios through bench and through the simulator, side by side")
    b.add_argument("--dispatch", action="store_true",
                   help="measure dispatch overhead instead: >= 1000 small tiles on host*2, against Ray's own round trip "
                        "for the same bytes in alternating rounds (added_ms: what tilefleet adds)")
    b.add_argument("--sweep", action="store_true",
                   help="measure grid='auto' against a sweep of fixed plans on the same cluster and frames")
    b.add_argument("--soak", action="store_true",
                   help="soak test: --frames small frames (a 3-conv model at --size, default 32; grid 2x2 unless "
                        "--grid) through the emulated cluster while its last device fails and comes back every "
                        "--fail-every frames; reports fps over time, RSS growth of the driver and of the workers that "
                        "never failed, and frames lost, duplicated or wrong; exits 1 if a target is missed")
    b.add_argument("--fail-every", type=int, default=300, metavar="FRAMES",
                   help="with --soak: frames per fail/revive cycle: the device is up half of it from its revival, "
                        "down the other half; a revival still under way a period later holds frames back")
    b.add_argument("--plot", metavar="PNG", help="with --soak: plot fps and RSS over the run to this PNG (needs matplotlib)")
    b.add_argument("--json", help="write the report as JSON to this file")
    b.add_argument("--standard", action="store_true", help="run the standard set and write JSON files to --out")
    b.add_argument("--out", default="bench-results", help="directory for --standard results")
    b.set_defaults(func=commands.bench)


def _add_devices(sub: Any) -> None:
    dv = sub.add_parser("devices", help="the devices on the LAN and in its clusters (--catalog: emulation profiles)",
                        description="Browse the LAN (zeroconf, or --address) for tilefleet heads and list each "
                                    "cluster's devices: name, address, class, measured GFLOP/s, memory, GPU, link, "
                                    "state and tiles done. With --catalog, list the emulation catalog instead: "
                                    "every device profile with its figures and their source.",
                        epilog="examples:\n  tilefleet devices\n  tilefleet devices --cluster lab --json\n"
                               "  tilefleet devices --address 192.168.1.10:6390\n  tilefleet devices --catalog\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dv.add_argument("--catalog", action="store_true", help="the emulation catalog (built-in and custom profiles)")
    dv.add_argument("--profiles", help="with --catalog: a TOML file of custom profiles")
    lancli.add_devices_lan_args(dv)
    dv.set_defaults(func=_devices)


def _add_lan(sub: Any) -> None:
    lancli.add_lan_commands(sub)


def _add_lan_admin(sub: Any) -> None:
    lanadmin.add_admin_commands(sub)


def _add_ray_up(sub: Any) -> None:
    for name, summary in (("cluster-config", "write a `ray up` YAML for LAN devices (local provider, over SSH)"),
                          ("up", "write that YAML and run `ray up` on it")):
        cc = sub.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=summary[0].upper() + summary[1:] + ". Every node starts through "
                            "`tilefleet head` / `tilefleet join` (token, measured labels, no `ray stop`). The devices "
                            "need an SSH server that accepts --ssh-key for --ssh-user, rsync, and the same Python, Ray "
                            "and tilefleet versions as this machine, with `tilefleet` on the login PATH (or "
                            "--remote-bin).",
                            epilog=f"examples:\n  tilefleet {name} --head 192.168.1.10 --workers 192.168.1.11,192.168.1.12 "
                                   "--ssh-user pi\n  tilefleet up --head 10.0.0.2 --workers 10.0.0.3 --remote-bin "
                                   "/opt/venv/bin/tilefleet --out lab.yaml\n")
        cc.add_argument("--head", required=True, metavar="IP", help="the head device's address")
        cc.add_argument("--workers", required=True, metavar="IPS", help="the other devices, comma-separated")
        cc.add_argument("--ssh-user", help="user ray up logs in as (default: yours)")
        cc.add_argument("--ssh-key", help="private key ray up logs in with (default: ~/.ssh/id_ed25519)")
        cc.add_argument("--token-file", help="the join token to copy to every device (default: ~/.config/tilefleet/token)")
        cc.add_argument("--insecure", action="store_true", help="no token: anyone on the LAN can join")
        cc.add_argument("--name", default="tilefleet", help="cluster name")
        cc.add_argument("--remote-bin", default="tilefleet", help="the tilefleet command on the devices")
        cc.add_argument("--out", default="tilefleet-cluster.yaml", help="where to write the YAML")
        cc.set_defaults(func=_cluster_config, launch=(name == "up"))


def _add_plan(sub: Any) -> None:
    pl = sub.add_parser("plan", help="show how a model would be partitioned (no execution)",
                        description="Partition a zoo model or a Darknet .cfg and print the plan: stages, grids, "
                                    "redundancy, per-tile peak memory, where fusion stops and why.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(pl)
    pl.add_argument("--grid", default="5x5", help="ROWSxCOLS, or several comma-separated, one per stage")
    pl.add_argument("--stages", help="comma-separated layer boundaries, e.g. 4,8,12")
    pl.add_argument("--upto", help="stop fusion before this layer index (or after this module name)")
    pl.add_argument("--reuse", action="store_true", help="checkerboard overlap reuse")
    pl.add_argument("--tiles", action="store_true", help="also print one row per tile")
    pl.add_argument("--check", action="store_true", help="also run the plan and compare with the untiled model")
    pl.set_defaults(func=commands.plan)


def _add_models(sub: Any) -> None:
    m = sub.add_parser("models", help="list the model zoo", description="List the models built in code.")
    m.set_defaults(func=commands.models)


def _add_serving(sub: Any) -> None:
    servecli.add_commands(sub)


def _devices(args: argparse.Namespace) -> int:
    return commands.devices(args) if args.catalog else lancli.devices_lan(args)


def _cluster_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleet.lan import clusterconfig as cc

    try:
        opts = cc.options_from_args(args.head, cc.parse_hosts(args.workers), args.ssh_user, args.ssh_key,
                                    args.token_file, args.insecure, name=args.name, remote_bin=args.remote_bin)
    except cc.ClusterConfigError as e:
        print(f"tilefleet {args.command}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.write_text(cc.dump(cc.build(opts)))
    out.chmod(0o600)
    print(f"wrote {out}: head {opts.head}, workers {', '.join(opts.workers)}, ssh {opts.ssh_user} with {opts.ssh_key}")
    if not args.launch:
        print(f"bring it up with: ray up -y {out}   (or: tilefleet up ...)")
        return 0
    try:
        return cc.launch(out)
    except cc.ClusterConfigError as e:
        print(f"tilefleet {args.command}: error: {e}", file=sys.stderr)
        return 1


def _cluster_args(p: argparse.ArgumentParser, devices_default: str = "pi3*4", devices_note: str = "") -> None:
    p.add_argument("--devices", default=devices_default, help="emulated devices, 'profile*count,...'" + devices_note)
    p.add_argument("--address", help="an existing Ray cluster ('auto' or ray://host:10001) instead of emulation")
    p.add_argument("--grid", default="auto", help="ROWSxCOLS, or 'auto' (chosen by the cost model)")
    p.add_argument("--stages", help="comma-separated layer boundaries, e.g. 4,8,12 (with an explicit --grid)")
    p.add_argument("--reuse", action="store_true", help="checkerboard overlap reuse (with an explicit --grid)")
    p.add_argument("--mode", choices=["latency", "throughput"], default="latency", help="what to optimise and measure")
    p.add_argument("--scale", type=float, help="emulation clock scale (default: chosen so the host stays ahead)")
    p.add_argument("--profiles", help="a TOML file of custom device profiles")
    p.add_argument("--nodes", action="store_true",
                   help="make each emulated device its own Ray node on this machine (own object store: stage "
                        "outputs cross nodes as on a LAN; costs about 0.3 GB and 1 s per device to start)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the library's warnings, one line each
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError) as e:  # our typed errors derive from these
        print(f"tilefleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
