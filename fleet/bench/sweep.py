"""The auto plan against a sweep of fixed plans, on one cluster and the same frames."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sims.metrics import throughput_depth

from .runner import frames_for, load_workload


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


    w = load_workload(model, cfg, size)
    warm = 1
    xs = frames_for(w, frames + warm)
    with torch.no_grad():
        refs = [w.reference(x) for x in xs]
    rows: list[dict[str, Any]] = []
    with fleet.connect(emulate=devices, scale=scale) as cluster:
        s = cluster.scale
        configs: list[tuple[str, Any, dict[str, Any]]] = [("auto", "auto", {"mode": mode})]
        configs += [(_label(c), c["grid"], {k: v for k, v in c.items() if k != "grid"}) for c in SWEEP_FIXED]
        for label, grid, kw in configs:
            try:
                dep = cluster.deploy(w.model, w.example, grid=grid, preprocess=w.preprocess, **kw)
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
