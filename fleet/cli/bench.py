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
from fleet.bench.soak import SOAK_DEVICES, SOAK_FRAMES, SOAK_SIZE
from fleet.bench.sweep import sweep

from .common import check_in_flight, grid_arg, workload

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


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--frames and --devices: the parser leaves them unset when not given, as their defaults depend on --soak."""
    soak = bool(getattr(args, "soak", False))
    if not hasattr(args, "frames"):
        args.frames = SOAK_FRAMES if soak else 12
    if not hasattr(args, "devices"):
        args.devices = SOAK_DEVICES if soak else "pi3*4"
    return args


def bench_command(args: argparse.Namespace) -> int:
    with_defaults(args)
    if getattr(args, "soak", False):
        return _soak(args)
    if args.sweep:
        r = sweep(args.model, args.cfg, args.size, args.devices, args.mode, args.frames, args.scale)
        print(sweep_table(r))
        if args.json:
            Path(args.json).write_text(json.dumps(_jsonable(r), indent=2))
        return 0
    if args.fidelity:
        return _fidelity(args)
    if args.uint8_vs_float:
        from fleet.bench.camera import uint8_vs_float32

        r = uint8_vs_float32(args.model if "/" not in args.model else "yolov2-16", args.devices, args.frames,
                             preprocess=args.preprocess or "darknet", grid=grid_arg(args.grid))
        print(table(["frames as", "p50 ms", "input bytes per frame", "plan"],
                    [[k, f"{r['p50_ms'][k]:.0f}", f"{r['input_bytes_per_frame'][k]:,}", r["plans"][k]]
                     for k in ("uint8", "float32")]))
        print(f"uint8 / float32 p50: {r['ratio_uint8_over_float32']:.3f} ({r['frames']} frames each, "
              f"{r['rounds']} alternating rounds; last relative error {r['last_rel_error']:.1e})")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 0
    if args.dispatch:
        d = dispatch_overhead()
        print(table(["metric", "value"], [[k, _figure(v)] for k, v in d.items()]))
        print(f"added_ms: the median overhead above Ray's own round trip for the same bytes, timed in "
              f"{len(d['added_ms_by_round'])} alternating rounds (compare this one across runs)")
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
        print(f"dispatch overhead: median {d['median_ms']:.2f} ms over {d['tiles']} tiles, "
              f"{d['added_ms']:.2f} ms above Ray's own round trip ({d['ray_round_trip_ms']:.2f} ms)")
        return 0
    check_in_flight(args.in_flight, args.mode)
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


def _fidelity(args: argparse.Namespace) -> int:
    """The simulator against the emulated cluster on the standard scenarios, one row each."""
    from fleet.bench.fidelity import fidelity

    def show(r: dict[str, Any]) -> None:
        print(f"{r['devices']} {r['mode']}: bench {r['bench_fps']:.3f} fps p50 {r['bench_p50_ms']:.0f} ms; "
              f"sim {r['sim_fps']:.3f} fps p50 {r['sim_p50_ms']:.0f} ms", flush=True)

    rows = fidelity(args.model if args.model and "/" not in args.model else "yolov2-16", on_row=show)
    print(table(["devices", "mode", "plan (bench / sim)", "fps bench", "fps sim", "sim/bench", "p50 ms bench",
                 "p50 ms sim", "sim/bench"],
                [[r["devices"], r["mode"], r["bench_plan"] + (" / same" if r["sim_plan"] == r["bench_plan"]
                                                              else " / " + r["sim_plan"]),
                  f"{r['bench_fps']:.3f}", f"{r['sim_fps']:.3f}", f"{r['fps_ratio']:.3f}",
                  f"{r['bench_p50_ms']:.0f}", f"{r['sim_p50_ms']:.0f}", f"{r['p50_ratio']:.3f}"] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["bench_correct"] for r in rows) else 1


def _soak(args: argparse.Namespace) -> int:
    """``--soak``: the run is :func:`fleet.bench.soak.run_soak`; this prints it and sets the exit status."""
    from fleet.bench.plot import plot_soak
    from fleet.bench.soak import run_soak

    if args.address or getattr(args, "nodes", False):
        raise ValueError("--soak fails and revives emulated devices on this machine: not with --address or --nodes")
    if args.plot:  # before a run of minutes, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'tilefleet[plot]' (or drop --plot)") from None
    from tqdm import tqdm

    r = run_soak(args.devices, args.frames, args.fail_every, size=args.size or SOAK_SIZE,
                 grid=(2, 2) if args.grid == "auto" else grid_arg(args.grid), in_flight=args.in_flight,
                 scale=args.scale, on_event=tqdm.write)
    print(soak_table(r))
    if args.plot:
        plot_soak(r, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(r), indent=2))
        print(f"written to {args.json}")
    print(r["verdict"])
    return 0 if r["ok"] else 1


def soak_table(r: dict[str, Any]) -> str:
    """The soak report: the run, frames per second in windows, RSS per process."""
    fs = r["fps_summary"]
    revive = sorted(r["revive_s"])
    rows = [["model", r["model"]], ["devices", f"{r['devices']} (fails and returns: {r['victim']})"],
            ["plan", f"{r['grid']}, {r['in_flight']} frames in flight, clock scale {r['scale']:g}"],
            ["frames", f"{r['frames']} timed after {r['warmup_frames']} warm-up, {r['distinct_inputs']} distinct inputs"],
            ["wall", f"{r['wall_s']:.1f} s timed ({r['total_s']:.1f} s in all); host load (1 min) "
                     + " -> ".join(f"{v:.1f}" for v in r.get("host_load_1min", [])) + f" on {r.get('host_cpus')} CPUs"],
            ["fps", f"{r['fps']:.1f} overall; windows min {fs.get('min', 0):.1f} / median {fs.get('median', 0):.1f} / "
                    f"max {fs.get('max', 0):.1f}; first {fs.get('first', 0):.1f}, last {fs.get('last', 0):.1f}"],
            ["fail/revive cycles", f"{r['cycles']} (every {r['fail_every']} frames + the revival; revival "
                                   + (f"median {revive[len(revive) // 2]:.1f} s, max {revive[-1]:.1f} s)" if revive
                                      else "none)")],
            ["lost / duplicated / wrong", f"{r['lost']} / {r['duplicated']} / {r['wrong']} "
                                          f"(max relative error {r['max_rel_error']:.1e})"],
            ["tiles accepted", f"{r['tiles_accepted']} ({r['tiles_expected']} = frames x tiles per frame); "
                               f"retries {r['retries']}; late on the host {r['host_too_slow']}"]]
    out = [table(["soak", "value"], rows), ""]
    out.append(table(["frames", "until s", "fps", "driver CPU ms/frame", "events"],
                     [[f"{w['frames'][0]}-{w['frames'][1] - 1}", f"{w['t_end_s']:.1f}",
                       f"{w['fps']:.1f}" if w["fps"] is not None else "-",
                       f"{w['cpu_ms_per_frame']:.2f}" if "cpu_ms_per_frame" in w else "-", _events(w["events"])]
                      for w in r["fps_windows"]]))
    out.append("")
    out.append(table(["process", "RSS after warm-up MB", "RSS at end MB", "growth MB"],
                     [[name, f"{v['warm_mb']:.1f}", f"{v['end_mb']:.1f}", f"{v['growth_mb']:+.1f}"]
                      for name, v in r["rss"].items()]) + f"\n(RSS from {r['rss_source']}; target: growth < "
               f"{r['rss_target_mb']:g} MB for the driver and every worker that never failed)")
    return "\n".join(out)


def _events(events: list[str]) -> str:
    kinds = [e.split("@")[0] for e in events]
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))


def _figure(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return ", ".join(_figure(x) for x in v)
    return str(v)
