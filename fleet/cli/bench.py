"""``tilefleet bench`` output: readable tables on the terminal, JSON for the record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from tiling.report import table

from fleet.bench.dispatch import dispatch_overhead
from fleet.bench.runner import load_workload, run_bench
from fleet.bench.sweep import sweep

from .common import grid_arg, workload

MIB = 2**20
TORCH_ROUNDS = 4  # plain torch and the cluster alternate in this many rounds (host runs)

# the standard set (make bench): the targets of the runtime issue, one JSON file each
STANDARD = [
    ("pi3x6-latency", dict(devices="pi3*6", mode="latency", frames=12)),
    ("pi3x6-throughput", dict(devices="pi3*6", mode="throughput", frames=50)),
    ("pi3-24mx6-latency", dict(devices="pi3-24m*6", mode="latency", frames=12)),
    ("mixed-throughput", dict(devices="pi3*2,pi4*2,laptop", mode="throughput", frames=120, standalone=True)),
    ("host2-throughput", dict(devices="host*2", mode="throughput", frames=48, host=True)),
    ("host2-latency", dict(devices="host*2", mode="latency", frames=24, host=True)),
]


def report_table(r: dict[str, Any]) -> str:
    rows = [["plan", r["plan"]], ["clock scale", f"{r['scale']:g}"],
            ["latency p50 / p95 ms", f"{r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f}"],
            ["fps", f"{r['fps']:.3f}"]]
    if "speedup" in r:
        rows += [["speedup (one " + r["devices"].split(",")[0].split("*")[0] + ")", f"{r['speedup']:.2f}x"],
                 ["speedup vs best device", f"{r['speedup_vs_best']:.2f}x"]]
    if "efficiency" in r:
        rows.append(["efficiency", f"{r['efficiency']:.3f}"])
    if "host_baseline" in r:
        hb = r["host_baseline"]
        rows.append([f"plain torch ({hb['threads']} threads)", f"p50 {hb['p50_ms']:.0f} ms, {hb['fps']:.2f} fps "
                                                             f"({hb['frames']} frames in {hb['rounds']} rounds)"])
        for key, what in (("vs_torch_fps", "fps ratio (cluster / torch)"), ("vs_torch_p50", "p50 ratio (cluster / torch)")):
            if key in r:
                each = ", ".join(f"{v:.2f}" for v in r[f"{key}_rounds"])
                rows.append([what, f"{r[key]:.2f} (median of rounds: {each})"])
    if "predicted" in r:
        rows.append(["predicted (cost model)", f"{r['predicted']['latency_ms']:.0f} ms, {r['predicted']['fps']:.3f} fps "
                                               f"({r['prediction_error'] * 100:.1f}% off)"])
    rows += [["redundancy", f"{r['redundancy'] * 100:+.1f}%"],
             ["max device peak", f"{r['max_device_peak_bytes'] / MIB:.1f} MiB"],
             ["bytes moved", f"{r['bytes_moved'] / MIB:.1f} MiB"], ["steals / retries", f"{r['steals']} / {r['retries']}"],
             ["deploy", f"{r['deploy_s']:.1f} s"], ["correct", str(r["correct"])]]
    if r.get("host_too_slow"):
        rows.append(["WARNING", f"{r['host_too_slow']} tiles finished on the host after their emulated delivery "
                                f"(up to {r.get('max_late_ms', 0):.0f} ms late): do not count this run"])
    return table(["metric", "value"], rows)


def one(args: argparse.Namespace | None, name: str, w: Any, devices: str, mode: str, frames: int,
        grid: Any = "auto", stages: list[int] | None = None, reuse: bool = False, in_flight: int | None = None,
        scale: float | None = None, address: str | None = None, standalone: bool = False,
        host: bool = False) -> dict[str, Any]:
    r = run_bench(w, devices, mode=mode, frames=frames, grid=grid, stages=stages, reuse=reuse, in_flight=in_flight,
                  scale=scale, address=address, standalone=standalone, torch_rounds=TORCH_ROUNDS if host else 0,
                  nodes=bool(getattr(args, "nodes", False)))
    r["name"] = name
    return r


def bench_command(args: argparse.Namespace) -> int:
    if args.sweep:
        r = sweep(args.model, args.cfg, args.size, args.devices, args.mode, args.frames, args.scale)
        print(sweep_table(r))
        if args.json:
            Path(args.json).write_text(json.dumps(_jsonable(r), indent=2))
        return 0
    if args.dispatch:
        d = dispatch_overhead()
        print(table(["metric", "value"], [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in d.items()]))
        if args.json:
            Path(args.json).write_text(json.dumps(d, indent=2))
        return 0
    if args.standard:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = []
        for name, kw in STANDARD:
            print(f"== {name}: {kw}")
            r = one(args, name, load_workload("yolov2-16"), **kw)
            print(report_table(r))
            (out / f"{name}.json").write_text(json.dumps(_jsonable(r), indent=2))
            summary.append([name, r["plan"], f"{r.get('speedup', 0):.2f}x", f"{r['fps']:.3f}",
                            f"{r['latency_ms']['p50']:.0f}", f"{r.get('efficiency', float('nan')):.3f}",
                            f"{r['max_device_peak_bytes'] / MIB:.1f}", r["correct"]])
        d = dispatch_overhead()
        (out / "dispatch.json").write_text(json.dumps(d, indent=2))
        print(table(["run", "plan", "speedup", "fps", "p50 ms", "efficiency", "peak MiB", "correct"], summary))
        print(f"dispatch overhead: median {d['median_ms']:.2f} ms over {d['tiles']} tiles")
        return 0
    r = one(args, "bench", workload(args), args.devices, args.mode, args.frames, grid_arg(args.grid),
            [int(v) for v in args.stages.split(",")] if args.stages else None, args.reuse, args.in_flight,
            args.scale, args.address, args.standalone, args.host_baseline)
    print(r["plan_summary"])
    print()
    print(report_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(r), indent=2))
        print(f"written to {args.json}")
    return 0 if r["correct"] else 1


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def sweep_table(r: dict[str, Any]) -> str:
    rows = []
    for row in r["rows"]:
        rows.append([row["plan"], f"{row['measured_s'] * 1e3:.0f}" if "measured_s" in row else "-",
                     f"{row['predicted_s'] * 1e3:.0f}" if "predicted_s" in row else "",
                     row.get("correct", ""), row.get("error", "")[:50]])
    head = (f"sweep on {r['devices']} ({r['mode']} mode, ms per frame, emulated): auto is "
            f"{(r['auto_vs_best'] - 1) * 100:+.1f}% from the best measured plan ({r['best']}); its prediction is "
            f"{r['auto_prediction_error'] * 100:.1f}% off")
    return head + "\n" + table(["plan", "measured ms", "predicted ms", "correct", "note"], rows)
