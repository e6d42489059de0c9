"""Dispatch overhead: what the driver adds to each tile beyond the worker's own compute."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn


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
        dep.reset_stats()
        t0 = time.monotonic()
        for _ in dep.stream([x] * frames, in_flight=2):
            pass
        wall = time.monotonic() - t0
        ov = np.asarray(dep.stats()["dispatch_overhead_s"])
        tile = dep.plan.tiles[0]
    return {"tiles": int(len(ov)), "median_ms": float(np.median(ov) * 1e3), "p95_ms": float(np.percentile(ov, 95) * 1e3),
            "tile_in_bytes": tile.in_bytes, "tile_out_bytes": tile.out_bytes, "tiles_per_s": len(ov) / wall}
