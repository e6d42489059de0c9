"""Predict a deployment's latency and throughput: the simulator, run on a candidate plan.

The planner's predictor *is* the simulator (:mod:`sims.simulate`): the real driver and the
unchanged scheduler on the device model emulated workers obey, plus the runtime's per-tile
dispatch cost. So a prediction and an emulated run differ only by what the host adds, which is
what ``plan_summary()`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import tiling

from .catalog import DeviceSpec
from .simulate import simulate


@dataclass
class Prediction:
    latency_s: float  # median per-frame latency (latency mode: one frame in flight)
    fps: float  # steady-state frames per second
    makespan_s: float
    frames: int
    tiles_per_device: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def predict(plan: tiling.Plan, devices: Sequence[DeviceSpec], *, frames: int = 4, in_flight: int = 1,
            scale: float = 1.0, max_in_flight_per_device: int = 2,
            shared_link_mbps: float | None = None) -> Prediction:
    """Run ``frames`` frames of ``plan``, ``in_flight`` at a time, on the simulated fleet (its
    devices behind one shared channel of ``shared_link_mbps``, if given)."""
    run = simulate(plan, devices, frames=frames, in_flight=in_flight, scale=scale,
                   max_in_flight_per_device=max_in_flight_per_device, shared_link_mbps=shared_link_mbps)
    lat = sorted(run.latency_s)
    tiles = {d: c["tiles"] for d, c in run.stats["devices"].items()}
    return Prediction(lat[len(lat) // 2] if lat else float("inf"), run.fps, max(run.ended.values(), default=0.0),
                      len(run.ended), tiles, sorted(set(run.failed.values())))
