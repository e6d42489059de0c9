"""Camera frames as bytes against float32 frames: latency on one emulated cluster, in alternating rounds.

Both deployments run the same model on the same devices in the same run: one takes raw uint8
frames and normalises each crop on its device (``preprocess=``), the other takes float32 frames
normalised at the client. Latency mode, one frame in flight; rounds alternate so both see the
same machine (this VM's speed drifts between minutes).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import tiling

from .runner import load_workload, plan_label


def uint8_vs_float32(model: str = "yolov2-16", devices: str = "pi3*6", frames: int = 12, rounds: int = 3,
                     preprocess: str = "darknet", grid: Any = "auto") -> dict[str, Any]:
    import fleet

    w8 = load_workload(model, preprocess=preprocess)
    pre = w8.preprocess
    assert pre is not None
    g = torch.Generator().manual_seed(7)
    raw = [torch.randint(0, 256, w8.example.shape, generator=g, dtype=torch.uint8) for _ in range(frames)]
    flt = [pre.apply_float(x) for x in raw]
    lat: dict[str, list[float]] = {"uint8": [], "float32": []}
    with fleet.connect(emulate=devices) as cluster:
        d8 = cluster.deploy(w8.model, w8.example, grid=grid, preprocess=pre)
        d32 = cluster.deploy(w8.model, flt[0], grid=grid)
        for dep, xs in ((d8, raw[:1]), (d32, flt[:1])):  # warm-up
            dep(xs[0])
        per = max(1, frames // rounds)
        for r in range(rounds):
            for name, dep, xs in (("uint8", d8, raw), ("float32", d32, flt)):
                for x in xs[r * per:(r + 1) * per]:
                    t0 = time.monotonic()
                    y = dep(x)
                    lat[name].append(time.monotonic() - t0)
            with torch.no_grad():
                err = tiling.rel_error(y, w8.model(flt[min(len(flt) - 1, (r + 1) * per - 1)]))
        s = cluster.scale
        plans = {"uint8": d8.plan, "float32": d32.plan}
        sent = {k: sum(t.in_bytes for t in p.stages[0].tiles) for k, p in plans.items()}
    p50 = {k: statistics.median(v) / s * 1e3 for k, v in lat.items()}
    return {"model": w8.name, "devices": devices, "frames": frames, "rounds": rounds, "preprocess": pre.name,
            "p50_ms": p50, "ratio_uint8_over_float32": p50["uint8"] / p50["float32"],
            "input_bytes_per_frame": sent, "plans": {k: plan_label(p) for k, p in plans.items()},
            "last_rel_error": err, "scale": s}
