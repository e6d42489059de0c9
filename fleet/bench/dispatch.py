"""Dispatch overhead: what the driver adds to each tile beyond the worker's own compute.

The round trip of a tile includes Ray's own round trip of an actor call, which on a small shared
host moves by tens of percent from minute to minute. So the same run also times bare Ray calls
with the same bytes in and out (an echo actor, one call in flight per actor, as the tiles), in
alternating rounds: ``added_ms``, the overhead above Ray's own, is the figure that compares across
runs and machines.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch
from torch import nn


@ray.remote(num_cpus=0, max_concurrency=32)
class Echo:
    """A bare actor with a tile call's shape: a crop in; a small report, a payload and partials out."""

    def run(self, deployment: str, stage: int, tile: int, inputs: dict[str, np.ndarray], out_bytes: int) -> Any:
        return {"ok": True, "tile": tile}, {"out": {"y": np.zeros(out_bytes // 4, np.float32)}, "exp": []}, {}


def ray_round_trips(actors: list[Any], crop: np.ndarray, out_bytes: int, calls: int) -> list[float]:
    """Seconds of each of ``calls`` bare actor calls, one in flight per actor."""
    pending: dict[Any, tuple[int, float]] = {}

    def send(i: int, n: int) -> None:
        refs = actors[i].run.options(num_returns=3).remote("echo", 0, n, {"x": crop}, out_bytes)
        pending[refs[0]] = (i, time.monotonic())

    out: list[float] = []
    for i in range(len(actors)):
        send(i, i)
    while len(out) < calls:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i, sent = pending.pop(ref)
            ray.get(ref)
            out.append(time.monotonic() - sent)
            send(i, len(out))
    ray.get(list(pending))
    return out[:calls]


def dispatch_overhead(tiles: int = 1200, rounds: int = 4) -> dict[str, Any]:
    """Median over many small tiles on host*2 of (driver round trip - worker execution time), and
    Ray's bare round trip for the same bytes, in ``rounds`` alternating rounds."""
    import fleet

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 8, 64, 64)  # 8x8 grid: tiles of 8x8 output, ~4 KB in and out
    per_frame = 64
    frames = max(rounds, -(-tiles // per_frame))
    # one tile in flight per device, so that the round trip holds no queueing behind another tile
    with fleet.connect(emulate="host*2", max_in_flight=1) as cluster:
        dep = cluster.deploy(model, x, grid=(8, 8))
        tile = dep.plan.tiles[0]
        box = next(iter(tile.in_boxes.values()))
        crop = np.ascontiguousarray(x.numpy()[:, :, box.h0:box.h1, box.w0:box.w1])
        echo = [Echo.remote() for _ in range(2)]
        ray_round_trips(echo, crop, tile.out_bytes, 20)
        for _ in dep.stream([x] * 2, in_flight=1):
            pass
        ov: list[float] = []
        bare: list[float] = []
        added_by_round: list[float] = []
        wall = 0.0
        for r in range(rounds):
            n = frames // rounds + (r < frames % rounds)
            dep.reset_stats()
            t0 = time.monotonic()
            for _ in dep.stream([x] * n, in_flight=2):
                pass
            wall += time.monotonic() - t0
            got = dep.stats()["dispatch_overhead_s"]
            rt = ray_round_trips(echo, crop, tile.out_bytes, len(got))
            ov += got
            bare += rt
            added_by_round.append(float(np.median(got) - np.median(rt)) * 1e3)
        for a in echo:
            ray.kill(a)
    med, ray_med = float(np.median(ov) * 1e3), float(np.median(bare) * 1e3)
    return {"tiles": len(ov), "median_ms": med, "p95_ms": float(np.percentile(ov, 95) * 1e3),
            "ray_round_trip_ms": ray_med, "added_ms": med - ray_med,
            "added_ms_by_round": added_by_round,
            "tile_in_bytes": tile.in_bytes, "tile_out_bytes": tile.out_bytes, "tiles_per_s": len(ov) / wall}
