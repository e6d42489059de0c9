"""``tilefleet sim``: the benchmark's questions answered by the simulator, in the benchmark's terms.

The real driver and scheduler run on the simulated fleet (:mod:`sims.simulate`); plans come from
the same planner, frames in flight and warm-up frames follow the same rules, and the report has
the same schema as :func:`fleet.bench.runner.run_bench` (``correct`` is None: nothing is computed).
Beyond bench: open-loop arrivals from several cameras, scripted events, any number of devices,
and the scheduler's own cost per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import tiling
from sims.catalog import DeviceSpec, parse_spec
from sims.profile_files import profiles
from sims.metrics import steady_fps, throughput_depth, trim_for
from sims.scenario import load_scenario
from sims.simulate import SimRun, simulate

from .runner import Workload, add_baselines, plan_label


@dataclass(frozen=True)
class SimOptions:
    devices: str
    mode: str = "latency"
    frames: int = 12
    grid: Any = "auto"
    stages: list[int] | None = None
    reuse: bool = False
    in_flight: int | None = None
    rate: float | None = None  # open loop: frames per second per stream
    poisson: bool = False
    streams: int = 1
    duration: float | None = None  # open loop: seconds of arrivals (sets the frame count)
    scenario: str | None = None
    seed: int = 0
    profiles_file: str | None = None
    trace: bool = False
    scale: float = 1.0  # emulation's clock scale, to compare with a bench run (bench reports its own)
    shared_link_mbps: float | None = None  # every device behind one channel of this bandwidth (sims.medium)


def sim_bench(w: Workload, o: SimOptions, on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Plan, simulate ``o.frames`` timed frames after the warm-up, and report like bench does."""
    table = profiles(o.profiles_file)
    specs = parse_spec(o.devices, table, max_devices=None)
    t0 = time.perf_counter()
    plan, choice = _plan(w, specs, o)
    plan_s = time.perf_counter() - t0
    warm = 2 if o.mode == "latency" else max(2, len(specs))
    depth = 1 if o.mode == "latency" else (o.in_flight or throughput_depth([s.profile.gflops for s in specs]))
    frames = o.frames
    if o.rate is not None and o.duration is not None:
        frames = max(1, int(round(o.rate * o.duration * max(1, o.streams))))
    total = frames + (0 if o.rate is not None else warm)
    scenario = load_scenario(o.scenario, specs, table) if o.scenario else None
    run = simulate(plan, specs, frames=total, in_flight=depth, rate=o.rate, poisson=o.poisson, streams=o.streams,
                   scale=o.scale, shared_link_mbps=o.shared_link_mbps,
                   scenario=scenario, seed=o.seed, trace=o.trace, frame_itemsize=w.example.element_size(),
                   on_progress=(lambda n: on_progress(n, total)) if on_progress else None)
    report = _report(w, o, plan, run, warm if o.rate is None else 0, depth)
    report.update(plan_s=plan_s, sim_wall_s=run.wall_s, events=run.events,
                  us_per_event=run.handle_cpu_s / max(1, run.events) * 1e6, devices_count=len(specs))
    if choice is not None:
        report["predicted"] = {"latency_ms": choice.predicted.latency_s / o.scale * 1e3,
                               "fps": choice.predicted.fps * o.scale}
    add_baselines(report, w, plan, specs, o.mode, False, o.devices, None)
    return report


def _plan(w: Workload, specs: list[DeviceSpec], o: SimOptions) -> tuple[tiling.Plan, Any]:
    model, example = w.model, w.example
    if w.preprocess is not None:
        model = tiling.with_preprocess(model, w.preprocess)
    if o.grid == "auto":
        from fleet.runtime.planner import choose_plan

        return choose_plan(model, example, specs, mode=o.mode, scale=o.scale, shared_link_mbps=o.shared_link_mbps)
    kw: dict[str, Any] = {"reuse": o.reuse, **({"stages": o.stages} if o.stages else {})}
    return tiling.partition(model, example, o.grid, **kw), None


def _report(w: Workload, o: SimOptions, plan: tiling.Plan, run: SimRun, warm: int, depth: int) -> dict[str, Any]:
    s = o.scale  # a run at emulation's clock scale reports in emulated seconds, as bench does
    timed = [f for f in run.completed if f >= warm]
    lat = np.asarray([run.ended[f] - run.submitted[f] for f in timed]) / s if timed else np.asarray([np.inf])
    done = sorted(run.ended[f] / s for f in timed)
    if o.mode == "throughput" or o.rate is not None:
        fps, k = steady_fps(done, trim=depth), trim_for(len(done), depth)
    else:
        fps, k = 1.0 / float(np.median(lat)), 0
    devs = run.stats["devices"]
    return {
        "model": w.name, "devices": o.devices, "mode": o.mode, "frames": len(timed), "warmup": warm, "scale": s,
        "in_flight": depth, "trim_k": k, "simulated": True,
        "latency_ms": {q: float(np.percentile(lat, v) * 1e3) for q, v in (("p50", 50), ("p95", 95), ("p99", 99))},
        "fps": fps, "deploy_s": 0.0, "correct": None, "max_rel_error": None,
        "redundancy": plan.redundancy, "plan": plan_label(plan), "plan_summary": plan.summary(),
        "max_device_peak_bytes": max((d["peak_bytes"] for d in devs.values()), default=0),
        "bytes_moved": int(sum(d["bytes_in"] + d["bytes_out"] for d in devs.values())),
        "steals": int(sum(d["steals"] for d in devs.values())),
        "retries": int(sum(d["retries"] for d in devs.values())),
        "speculated": int(sum(d["speculated"] for d in devs.values())),
        "failed": len(run.failed), "failures": sorted(set(run.failed.values()))[:5],
        "per_device": devs, "done_s": done,
        "latency_over_time": [(run.submitted[f] / s, (run.ended[f] - run.submitted[f]) / s) for f in sorted(timed)],
        "shared_link": run.shared_link,
        "trace": [e.__dict__ for e in run.trace[:20_000]] if o.trace else [],
    }

