"""``tilefleet bench`` output: readable tables on the terminal, JSON for the record."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tiling.report import table

from .bench import load_workload, run_bench
from .commands import _grid_arg
from sims.predict import throughput_depth

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


def dispatch_overhead(tiles: int = 1200) -> dict[str, Any]:
    """Median over many small tiles on host*2 of (driver round trip - worker execution time)."""
    import fleet

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 8, 64, 64)  # 8x8 grid: tiles of 8x8 output, ~4 KB in and out
    per_frame = 64
    frames = -(-tiles // per_frame)
    # one tile in flight per device, so that the round trip holds no queueing behind another tile
    with fleet.connect(emulate="host*2", max_in_flight=1) as cluster:
        dep = cluster.deploy(model, x, grid=(8, 8))
        for _ in dep.stream([x] * 2, in_flight=1):
            pass
        dep.overheads.clear()
        t0 = time.monotonic()
        for _ in dep.stream([x] * frames, in_flight=2):
            pass
        wall = time.monotonic() - t0
        ov = np.asarray(dep.overheads)
        tile = dep.plan.tiles[0]
    return {"tiles": int(len(ov)), "median_ms": float(np.median(ov) * 1e3), "p95_ms": float(np.percentile(ov, 95) * 1e3),
            "tile_in_bytes": tile.in_bytes, "tile_out_bytes": tile.out_bytes, "tiles_per_s": len(ov) / wall}


def one(args: argparse.Namespace | None, name: str, model: str | None, cfg: str | None, size: int | None,
        devices: str, mode: str, frames: int, grid: Any = "auto", stages: list[int] | None = None,
        reuse: bool = False, in_flight: int | None = None, scale: float | None = None, address: str | None = None,
        standalone: bool = False, host: bool = False) -> dict[str, Any]:
    w = load_workload(model, cfg, size)
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
            r = one(args, name, "yolov2-16", None, None, **kw)
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
    r = one(args, "bench", args.model, args.cfg, args.size, args.devices, args.mode, args.frames, _grid_arg(args.grid),
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


SWEEP_FIXED: list[dict[str, Any]] = [
    {"grid": (2, 2)}, {"grid": (3, 3)}, {"grid": (4, 4)}, {"grid": (5, 5)}, {"grid": (2, 3)},
    {"grid": (3, 3), "reuse": True}, {"grid": (5, 5), "reuse": True},
    {"grid": (3, 2), "stages": [8]}, {"grid": (4, 4), "stages": [8, 12]}, {"grid": (3, 3), "stages": [4, 8, 12]},
]


def sweep(model: str | None, cfg: str | None, size: int | None, devices: str, mode: str, frames: int,
          scale: float | None = None) -> dict[str, Any]:
    """Measure the auto plan against a sweep of fixed plans on one cluster, same frames, same rules."""
    import fleet
    import tiling

    from .bench import frames_for

    w = load_workload(model, cfg, size)
    warm = 1
    xs = frames_for(w, frames + warm)
    with torch.no_grad():
        refs = [w.model(x) for x in xs]
    rows: list[dict[str, Any]] = []
    with fleet.connect(emulate=devices, scale=scale) as cluster:
        s = cluster.scale
        configs: list[tuple[str, Any, dict[str, Any]]] = [("auto", "auto", {"mode": mode})]
        configs += [(_label(c), c["grid"], {k: v for k, v in c.items() if k != "grid"}) for c in SWEEP_FIXED]
        for label, grid, kw in configs:
            try:
                dep = cluster.deploy(w.model, w.example, grid=grid, **kw)
            except (tiling.TilingError, ValueError) as e:
                rows.append({"plan": label, "error": str(e)})
                continue
            try:
                list(dep.stream(xs[:warm], in_flight=1))
                dep.reset_stats()
                depth = 1 if mode == "latency" else throughput_depth([d["gflops"] for d in cluster.devices()])
                done, outs = [], []
                t0 = time.monotonic()
                for y in dep.stream(xs[warm:], in_flight=depth):
                    outs.append(y)
                    done.append(time.monotonic())
                ok = max(tiling.rel_error(y, r) for y, r in zip(outs, refs[warm:])) <= 1e-4
                lat = list(dep.stats()["latency_s"].values())
                per_frame = (float(np.median(lat)) if mode == "latency" else (done[-1] - t0) / len(done)) / s
                row = {"plan": label, "measured_s": per_frame, "correct": ok}
                if dep.choice is not None:
                    p = dep.choice.predicted
                    row["plan"] = f"auto: {dep.choice.best.label}"
                    row["predicted_s"] = p.latency_s / s if mode == "latency" else 1.0 / (p.fps * s)
                rows.append(row)
            except fleet.FrameFailed as e:
                rows.append({"plan": label, "error": str(e)[:80]})
            finally:
                dep.close()
    measured = [r for r in rows if "measured_s" in r]
    best = min(measured, key=lambda r: r["measured_s"])
    auto = rows[0]
    return {"devices": devices, "mode": mode, "frames": frames, "scale": s, "rows": rows, "best": best["plan"],
            "auto_vs_best": auto.get("measured_s", float("inf")) / best["measured_s"],
            "auto_prediction_error": abs(auto.get("predicted_s", 0) - auto.get("measured_s", 1)) / auto.get("measured_s", 1)}


def _label(c: dict[str, Any]) -> str:
    g = c["grid"]
    text = f"{g[0]}x{g[1]}"
    if c.get("stages"):
        text = f"stages {c['stages']} " + text
    if c.get("reuse"):
        text += " reuse"
    return text


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
