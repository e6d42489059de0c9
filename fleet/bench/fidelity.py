"""How far the simulator is from the emulated cluster: the same scenarios through bench and sim.

Each scenario runs once on Ray (emulated devices, real tensors) and once in the simulator, same
model, devices, plan rule, frames and frames in flight; the report puts fps and p50 latency side
by side with their ratio. ``tilefleet bench --fidelity`` prints it (docs/benchmarks.md keeps a copy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .runner import load_workload, run_bench
from .simbench import SimOptions, sim_bench

# (devices, mode, frames): the scenarios
SCENARIOS: list[tuple[str, str, int]] = [
    ("pi3*6", "latency", 12),
    ("pi3*6", "throughput", 50),
    ("pi3*2,pi4*3", "throughput", 60),
    ("pi4*2,laptop", "latency", 12),
    ("pi3*2,pi4*2,laptop", "throughput", 80),
]


def fidelity(model: str = "yolov2-16", scenarios: list[tuple[str, str, int]] | None = None,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    w = load_workload(model)
    for devices, mode, frames in scenarios or SCENARIOS:
        bench = run_bench(w, devices, mode=mode, frames=frames, progress=False)
        # the same inputs: bench's emulation runs at a clock scale when a fast profile is in the mix
        sim = sim_bench(w, SimOptions(devices=devices, mode=mode, frames=frames, scale=bench["scale"]))
        row = {"devices": devices, "mode": mode, "frames": frames,
               "bench_plan": bench["plan"], "sim_plan": sim["plan"],
               "bench_fps": bench["fps"], "sim_fps": sim["fps"], "fps_ratio": sim["fps"] / bench["fps"],
               "bench_p50_ms": bench["latency_ms"]["p50"], "sim_p50_ms": sim["latency_ms"]["p50"],
               "p50_ratio": sim["latency_ms"]["p50"] / bench["latency_ms"]["p50"],
               "bench_correct": bench["correct"], "host_too_slow": bench["host_too_slow"],
               "commands": [f"tilefleet bench --model {model} --devices '{devices}' --mode {mode} --frames {frames}",
                            f"tilefleet sim --model {model} --devices '{devices}' --mode {mode} --frames {frames} "
                            f"--scale {bench['scale']:.3g}"]}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
