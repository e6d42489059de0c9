"""``tilefleet bench``: latency or throughput of a deployment, checked and compared side by side.

Timing rules (the same for every row a report compares):
- references are computed before the timed window and compared after it;
- latency: ``submit()`` to the future resolving at the client, one frame in flight, p50/p95 over
  the frames after 2 warm-up frames; deploy time (weights shipped) is reported separately;
- throughput warms up with at least one frame per device, at the timed depth;
- throughput: steady state, fps = (N - 2k) / (t_done[N-k] - t_done[k]), k frames trimmed at
  each end, with the number in flight reported;
- emulated runs on a scaled clock (s > 1) are reported in emulated seconds (wall / s), with s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import tiling
from tiling.sources.files import MODEL_KINDS, model_input_shape
from sims.catalog import Profile, parse_spec
from sims.profile_files import profiles
from sims.metrics import throughput_depth

MIB = 2**20


@dataclass
class Workload:
    name: str
    model: nn.Module
    example: torch.Tensor  # what the deployment is given: uint8 NCHW frames when ``preprocess`` is set
    preprocess: tiling.Preprocess | None = None

    def reference(self, x: torch.Tensor) -> Any:
        """The untiled model on a frame as the deployment receives it."""
        if self.preprocess is not None:
            x = self.preprocess.apply_float(x)
        return self.model(x)


def load_workload(model: str | None = None, cfg: str | None = None, size: int | None = None, *,
                  weights: str | None = None, trust: bool = False, preprocess: str | None = None) -> Workload:
    """A zoo model by name, or a model file (ONNX, Darknet cfg, TorchScript, a trusted pickle), with a
    seeded example at the model's own input size (``size`` overrides height and width)."""
    from tiling import zoo

    path = cfg or (model if model and (Path(model).suffix.lower() in MODEL_KINDS or "/" in model) else None)
    if path is None:
        zm = zoo.get(model or "yolov2-16", input_size=size)
        return _with_example(zm.name, zm.model, tuple(zoo.example(zm).shape[1:]), preprocess)
    shape = (3, size, size) if size else None
    m = tiling.load_model(path, weights=weights, trust=trust, input_shape=shape)
    found = model_input_shape(path, m)  # ONNX and Darknet files say their input size
    if found is None and shape is None:
        raise ValueError(f"{path} does not say its input size: pass --size (frames are 3 x SIZE x SIZE)")
    c, h, w = found if found is not None else shape  # type: ignore[misc]
    if size:
        h = w = size
    return _with_example(path, m, (c, h, w), preprocess)


def _with_example(name: str, model: nn.Module, chw: tuple[int, ...], preprocess: str | None) -> Workload:
    g = torch.Generator().manual_seed(0)
    if preprocess is None:
        return Workload(name, model, torch.randn(1, *chw, generator=g))
    pre = tiling.Preprocess.parse(preprocess)
    return Workload(name, model, torch.randint(0, 256, (1, *chw), generator=g, dtype=torch.uint8), pre)


def frames_for(w: Workload, n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if w.preprocess is not None:
        return [torch.randint(0, 256, w.example.shape, generator=g, dtype=torch.uint8) for _ in range(n)]
    return [torch.randn(w.example.shape, generator=g) for _ in range(n)]


def standalone_s(flops: int, p: Profile, in_bytes: int = 0, out_bytes: int = 0, client: bool = False) -> float:
    """The untiled model on one emulated device: frame already there, or sent from the client."""
    t = flops / (p.gflops * 1e9) + p.tile_overhead_s
    if client:
        t += in_bytes / p.link_bps + out_bytes / p.link_bps + 2 * p.latency_s
    return t


def _fps(done: list[float], in_flight: int) -> tuple[float, int]:
    from sims.metrics import steady_fps, trim_for

    return steady_fps(done, in_flight), trim_for(len(done), in_flight)


@dataclass
class _Measured:
    """What one benchmark run observed (in wall seconds; the report converts to emulated units)."""

    lat: list[float]
    done: list[float]
    rounds: list[dict[str, Any]]
    depth: int
    warm: int
    errs: list[float]
    deploy_s: float
    stats: dict[str, Any]
    summary: str
    plan: tiling.Plan
    choice: Any
    devs: list[dict[str, Any]]
    scale: float


def run_bench(w: Workload, devices: str, *, mode: str = "latency", frames: int = 12, grid: Any = "auto",
              stages: list[int] | None = None, reuse: bool = False, in_flight: int | None = None,
              scale: float | None = None, address: str | None = None, progress: bool = True,
              standalone: bool = False, torch_rounds: int = 0, torch_threads: int = 2,
              nodes: bool = False) -> dict[str, Any]:
    """Run ``frames`` timed frames (after 2 warm-up frames) and report by the timing rules above.

    ``torch_rounds`` > 0 also measures plain torch (batch 1, ``torch_threads`` threads, in this
    process) in that many rounds alternating with the cluster's, for ``host*N`` comparisons.
    """
    specs = parse_spec(devices, profiles()) if not address else []
    kw: dict[str, Any] = {"mode": mode}
    if grid != "auto":  # stages and reuse only go with an explicit grid; 'auto' chooses them
        kw.update(reuse=reuse, **({"stages": stages} if stages else {}))
    m = _measure(w, devices, len(specs), mode=mode, frames=frames, grid=grid, kw=kw, in_flight=in_flight,
                 scale=scale, address=address, progress=progress, torch_rounds=torch_rounds,
                 torch_threads=torch_threads, nodes=nodes)
    report = _report(w, devices, mode, frames, m)
    if m.rounds:
        report.update(_versus_torch(m.rounds, mode, torch_threads))
    if specs:
        add_baselines(report, w, m.plan, specs, mode, standalone, devices, scale)
    return report


def _measure(w: Workload, devices: str, n_specs: int, *, mode: str, frames: int, grid: Any, kw: dict[str, Any],
             in_flight: int | None, scale: float | None, address: str | None, progress: bool, torch_rounds: int,
             torch_threads: int, nodes: bool) -> _Measured:
    import fleet

    # 2 warm-up frames; in throughput mode at least one per device, streamed at the timed depth,
    # so that every worker has run (and allocated for) a whole frame before the clock starts
    warm = 2 if mode == "latency" else max(2, n_specs or 2)
    xs = frames_for(w, frames + warm)
    with torch.no_grad():  # references before the timed window
        refs = [w.reference(x) for x in xs]
    with fleet.connect(address, emulate=None if address else devices, scale=scale, nodes=nodes) as cluster:
        t0 = time.monotonic()
        dep = cluster.deploy(w.model, w.example, grid=grid, preprocess=w.preprocess, **kw)
        deploy_s = time.monotonic() - t0
        # warm-up frames first, then counters reset, so every statistic covers the timed window only
        depth = 1 if mode == "latency" else (in_flight or throughput_depth(
            [d["gflops"] for d in cluster.devices() if d["state"] == "alive"]))
        outs: list[Any] = list(dep.stream(xs[:warm], in_flight=min(depth, warm)))
        dep.reset_stats()
        timed = xs[warm:]
        bar = _bar(len(timed), progress)
        # with a torch baseline, rounds alternate plain torch and the cluster on the same frames, so
        # that both see the same machine (this VM's speed drifts by tens of percent between minutes)
        blocks = [list(b) for b in np.array_split(np.arange(len(timed)), max(1, torch_rounds))]
        rounds: list[dict[str, Any]] = []
        lat: list[float] = []
        done: list[float] = []
        for b in blocks:
            block = [timed[i] for i in b]
            base = _torch_block(w.reference, block, torch_threads) if torch_rounds else None
            o, lt, d = _fleet_block(dep, block, mode, depth, bar)
            outs += o
            lat += lt
            done += d
            if base is not None:
                # each round's own steady state (k frames trimmed at its ends), once
                rounds.append({"torch_s": base, "lat": lt, "fps_k": _fps(d, depth) if mode == "throughput" else None})
        if mode == "throughput":
            lat = [v for v in dep.stats()["latency_s"].values()]
        bar.close()
        m = _Measured(lat, done, rounds, depth, warm, [tiling.rel_error(y, r) for y, r in zip(outs, refs)], deploy_s,
                      dep.stats(), dep.plan_summary(), dep.plan, dep.choice, cluster.devices(), cluster.scale)
        dep.close()
    return m


def _report(w: Workload, devices: str, mode: str, frames: int, m: _Measured) -> dict[str, Any]:
    s, plan, stats = m.scale, m.plan, m.stats
    timed_lat = np.asarray(m.lat) / s
    if mode == "throughput" and m.rounds:  # each round's steady state, then the median over rounds
        fps, k = float(np.median([r["fps_k"][0] for r in m.rounds])) * s, m.rounds[0]["fps_k"][1]
    elif mode == "throughput":
        fps, k = _fps(m.done, m.depth)
        fps *= s  # wall-clock completions, on the emulated clock
    else:
        fps, k = 1.0 / float(np.median(timed_lat)), 0  # timed_lat is already on the emulated clock
    devs = stats["devices"].values()
    report: dict[str, Any] = {
        "model": w.name, "devices": devices, "mode": mode, "frames": frames, "warmup": m.warm, "scale": s,
        "in_flight": m.depth, "trim_k": k,
        "latency_ms": {"p50": float(np.percentile(timed_lat, 50) * 1e3), "p95": float(np.percentile(timed_lat, 95) * 1e3)},
        "fps": fps, "deploy_s": m.deploy_s, "correct": bool(max(m.errs) <= 1e-4), "max_rel_error": float(max(m.errs)),
        "redundancy": plan.redundancy, "plan": plan_label(plan), "plan_summary": m.summary,
        "max_device_peak_bytes": max((d["peak_bytes"] for d in devs), default=0),
        "bytes_moved": int(sum(d["bytes_in"] + d["bytes_out"] for d in devs)),
        "steals": int(sum(d["steals"] for d in devs)),
        "retries": int(sum(d["retries"] for d in devs)),
        "speculated": int(sum(d["speculated"] for d in devs)),
        "host_too_slow": int(sum(d["host_too_slow"] for d in devs)),
        "max_late_ms": float(max((d["max_late_s"] for d in devs), default=0.0) * 1e3),
        "per_device": stats["devices"], "device_list": m.devs,
        "done_s": [(t - m.done[0]) / s for t in m.done],
    }
    if m.choice is not None:
        p = m.choice.predicted
        # the simulation ran on the scaled clock; report it in emulated units like the measurement
        report["predicted"] = {"latency_ms": p.latency_s / s * 1e3, "fps": p.fps * s}
        meas = report["latency_ms"]["p50"] / 1e3 if mode == "latency" else 1.0 / fps
        pred = p.latency_s / s if mode == "latency" else 1.0 / (p.fps * s)
        report["prediction_error"] = abs(pred - meas) / meas
    return report


def add_baselines(report: dict[str, Any], w: Workload, plan: tiling.Plan, specs: list[Any], mode: str,
                   standalone: bool, devices: str, scale: float | None) -> None:
    """Speedups over the untiled model on one device of the first kind, and on the fastest one."""
    flops = plan.untiled_flops + plan.tail.flops
    in_bytes = int(np.prod(plan.input_shape)) * 4
    out_bytes = plan.tail.out_bytes or sum(int(np.prod(st.shapes[o])) * 4 for st in plan.stages[-1:] for o in st.outputs)
    first, best = specs[0].profile, max((sp.profile for sp in specs), key=lambda p: p.gflops)
    base_first = standalone_s(flops, first)
    base_best = standalone_s(flops, best, in_bytes, out_bytes, client=True)
    per_frame = report["latency_ms"]["p50"] / 1e3 if mode == "latency" else 1.0 / report["fps"]
    report["baseline_s"] = {"first": base_first, "best_with_transfers": base_best}
    report["speedup"] = base_first / per_frame
    report["speedup_vs_best"] = base_best / per_frame
    if standalone:
        report["standalone_fps"] = standalone_fps(w, devices, frames=10, scale=scale)
        report["efficiency"] = report["fps"] / sum(report["standalone_fps"].values())


def standalone_fps(w: Workload, devices: str, *, frames: int, scale: float | None) -> dict[str, float]:
    """Each device's throughput alone, by the same harness (frames start at the client)."""
    out: dict[str, float] = {}
    cache: dict[str, float] = {}
    for spec in parse_spec(devices, profiles()):
        name = spec.profile.name
        if name not in cache:
            r = run_bench(w, name, mode="throughput", frames=frames, grid="auto", scale=scale, progress=False)
            cache[name] = r["fps"]
        out[spec.id] = cache[name]
    return out


def _fleet_block(dep: Any, xs: list[torch.Tensor], mode: str, depth: int,
                 bar: Any) -> tuple[list[Any], list[float], list[float]]:
    """Outputs, latencies (latency mode) and completion times of ``xs`` run on the deployment."""
    outs: list[Any] = []
    lat: list[float] = []
    done: list[float] = []
    if mode == "latency":
        for x in xs:
            t = time.monotonic()
            outs.append(dep.submit(x).result(timeout=600))
            lat.append(time.monotonic() - t)
            done.append(time.monotonic())
            bar.update(1)
    else:
        for y in dep.stream(xs, in_flight=depth):
            outs.append(y)
            done.append(time.monotonic())
            bar.update(1)
    return outs, lat, done


def _torch_block(model: Callable[[torch.Tensor], Any], xs: list[torch.Tensor], threads: int) -> list[float]:
    """Plain torch, batch 1, ``threads`` threads: seconds per frame (after one untimed frame)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model(xs[0])
            times = []
            for x in xs:
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
        return times
    finally:
        torch.set_num_threads(old)


def _versus_torch(rounds: list[dict[str, Any]], mode: str, threads: int) -> dict[str, Any]:
    """Plain torch against the cluster, round by round (each ratio from back-to-back blocks)."""
    base = np.concatenate([r["torch_s"] for r in rounds])
    hb = {"p50_ms": float(np.median(base) * 1e3), "fps": float(1.0 / np.mean(base)), "threads": threads,
          "frames": int(len(base)), "rounds": len(rounds)}
    if mode == "throughput":
        ratios = [r["fps_k"][0] * float(np.mean(r["torch_s"])) for r in rounds]
        key = "vs_torch_fps"
    else:
        ratios = [float(np.median(r["lat"]) / np.median(r["torch_s"])) for r in rounds]
        key = "vs_torch_p50"
    return {"host_baseline": hb, key: float(np.median(ratios)), f"{key}_rounds": ratios}


def plan_label(plan: tiling.Plan) -> str:
    parts = [f"{s.layers[0]}-{s.layers[1] - 1}:{s.grid[0]}x{s.grid[1]}{' reuse' if s.reuse else ''}" for s in plan.stages]
    return ", ".join(parts)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, on: bool) -> Any:
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="frames", unit="frame", leave=False, dynamic_ncols=True)
