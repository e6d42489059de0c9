"""``tilefleet sim``: the same flags and report as ``tilefleet bench``, on a simulated fleet of any size."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import add_model_args, check_in_flight, grid_arg, workload

SIM_EPILOG = """\
examples:
  tilefleet sim --devices pi3*6 --mode latency --frames 12          what bench would measure, in a second
  tilefleet sim --devices pi3*1000 --frames 10000 --grid 4x4 --profile-scheduler
  tilefleet sim --devices pi4*8 --rate 2 --streams 20 --duration 60 --poisson    20 cameras, open loop
  tilefleet sim --devices pi3*6 --scenario faults.toml --seed 3     a device dies, slows down, returns
  tilefleet sim --model resnet18 --devices pi3*2,pi4*2,laptop --mode throughput --json out.json
  tilefleet sim --devices pi3*6 --shared-link 20 --plot run.png     six Pis behind one 20 Mbit/s access point

The simulator runs tilefleet's real driver and scheduler on the device and link model emulated
devices obey (docs/simulation.md), computing no tensors. Scenario files script events:
  [[event]]
  at = 10.0
  kill = "pi3-2"     # or slow = "pi3-2" with factor = 10, revive = "pi3-2", join = "pi4"
  detect = 1.5       # seconds until the driver hears of the death
"""


def add_sim(sub: Any) -> None:
    s = sub.add_parser("sim", help="simulate a deployment on any number of devices (bench's flags and report)",
                       description="Plan a model for a fleet and run it in the discrete-event simulator: the real "
                                   "driver and scheduler, the emulation's device model, seeded. The report has "
                                   "bench's schema (correct is null: nothing is computed).",
                       epilog=SIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(s)
    s.add_argument("--devices", default="pi3*4", help="'profile*count,...' with no cap on the count")
    s.add_argument("--profiles", help="a TOML file of custom device profiles")
    s.add_argument("--grid", default="auto", help="ROWSxCOLS, or 'auto' (the planner, as bench)")
    s.add_argument("--stages", help="comma-separated layer boundaries (with an explicit --grid)")
    s.add_argument("--reuse", action="store_true", help="checkerboard overlap reuse (with an explicit --grid)")
    s.add_argument("--mode", choices=["latency", "throughput"], default="latency")
    s.add_argument("--frames", type=int, default=12, help="timed frames (after bench's warm-up frames)")
    s.add_argument("--in-flight", type=int, help="throughput mode: frames in flight (default as bench)")
    s.add_argument("--rate", type=float, help="open loop: frames per second per stream")
    s.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals instead of fixed spacing")
    s.add_argument("--streams", type=int, default=1, help="open loop: independent cameras, each at --rate")
    s.add_argument("--duration", type=float, help="open loop: seconds of arrivals (sets the frame count)")
    s.add_argument("--scenario", help="a TOML file of scripted events (kill, revive, slow, join)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0,
                   help="emulation's clock scale (bench prints it): simulate exactly what an emulated run does")
    s.add_argument("--shared-link", type=float, metavar="MBIT",
                   help="the devices share one medium of MBIT Mbit/s, as behind one Wi-Fi access point: every "
                        "transfer also waits for its air time there (default: each device has its own link)")
    s.add_argument("--profile-scheduler", action="store_true",
                   help="report the driver's and scheduler's CPU time per event (the transport excluded)")
    s.add_argument("--json", help="write the report as JSON to this file")
    s.add_argument("--plot", metavar="OUT.png",
                   help="draw a per-device timeline of a few frames and latency over time (needs matplotlib: "
                        "pip install 'tilefleet[plot]')")
    s.set_defaults(func=sim_command)


def sim_command(args: argparse.Namespace) -> int:
    from fleet.bench.simbench import SimOptions, sim_bench
    from sims.medium import check_mbps

    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be > 0 frames per second, got {args.rate}")
    if args.shared_link is not None:
        check_mbps(args.shared_link)
    check_in_flight(args.in_flight, args.mode)
    if args.plot:
        if Path(args.plot).suffix.lower() != ".png":
            raise ValueError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
        from fleet.bench.plot import pyplot

        try:
            pyplot()  # before the run: a long simulation should not end in a missing package
        except ImportError as e:
            print(f"tilefleet sim: error: {e}", file=sys.stderr)
            return 2
    opts = SimOptions(devices=args.devices, mode=args.mode, frames=args.frames, grid=grid_arg(args.grid),
                      stages=[int(v) for v in args.stages.split(",")] if args.stages else None, reuse=args.reuse,
                      in_flight=args.in_flight, rate=args.rate, poisson=args.poisson, streams=args.streams,
                      duration=args.duration, scenario=args.scenario, seed=args.seed, profiles_file=args.profiles,
                      scale=args.scale, shared_link_mbps=args.shared_link, trace=bool(args.plot))
    w = workload(args)
    from tqdm import tqdm

    # frames ended so far, on stderr; tqdm leaves it out when stderr is not a terminal (logs, pipes, CI)
    with tqdm(total=1, desc="frames", unit="frame", leave=False, dynamic_ncols=True, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            if done % 50 == 0 or done == total:
                bar.refresh()

        r = sim_bench(w, opts, progress)
    print(sim_table(r, args.profile_scheduler))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in r.items() if k != "trace"}, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        from fleet.bench.plot import plot_sim, sim_plot_data

        print(f"wrote {plot_sim(sim_plot_data(r), args.plot)}")
    return 0 if not r["failed"] or args.scenario else 1


def sim_table(r: dict[str, Any], profile: bool) -> str:
    from tiling.report import table  # here: tiling imports torch, which `tilefleet stop` does not need

    rows = [["plan", r["plan"]], ["devices", f"{r['devices_count']} ({r['devices']})"],
            ["frames", f"{r['frames']} timed after {r['warmup']} warm-up, {r['in_flight']} in flight"],
            ["latency p50 / p95 / p99 ms", " / ".join(f"{r['latency_ms'][q]:.0f}" for q in ("p50", "p95", "p99"))],
            ["fps", f"{r['fps']:.3f}"]]
    if "speedup" in r:
        rows.append(["speedup (one " + r["devices"].split(",")[0].split("*")[0] + ")", f"{r['speedup']:.2f}x"])
    rows += [["redundancy", f"{r['redundancy'] * 100:+.1f}%"], ["bytes moved", f"{r['bytes_moved'] / 2**20:.1f} MiB"],
             ["steals / retries", f"{r['steals']} / {r['retries']}"], ["failed frames", str(r["failed"])],
             *_shared_rows(r.get("shared_link")),
             ["planning", f"{r['plan_s']:.1f} s"], ["simulation", f"{r['sim_wall_s']:.2f} s wall, {r['events']} events"]]
    if profile:
        rows.append(["driver + scheduler", f"{r['us_per_event']:.1f} us CPU per event"])
    if r["failures"]:
        rows.append(["failures", "; ".join(r["failures"])[:200]])
    return table(["metric", "value"], rows)


def _shared_rows(ch: dict[str, float] | None) -> list[list[str]]:
    if not ch:
        return []
    text = (f"{ch['mbps']:g} Mbit/s: carried {ch['carried_mbps']:.2f} Mbit/s on average, "
            f"busy {ch['utilisation'] * 100:.0f}% of the run")
    return [["shared link", text]]
