"""Pricing this host's workers by timing the model itself in the workers' executor."""

from __future__ import annotations

import statistics

import torch
from torch import nn

import tiling
from sims.catalog import Profile
from sims.speed import median_seconds

from .nodes import LABEL_SOURCE


def this_host(p: Profile) -> bool:
    """A worker on this machine, priced by timing the model here (LAN devices bring their own figures)."""
    return not p.emulated and p.source != LABEL_SOURCE


def calibrate(model: nn.Module, example: torch.Tensor, concurrent: int = 1) -> float:
    """This host's real GFLOP/s on this model as a worker runs it (one thread, NHWC, BN folded).

    The catalog's conv micro-benchmark flatters the host (early layers with 3 input channels run
    far slower), and plain torch on the model is not what a worker runs, so workers on this host
    are priced by timing the model's whole-frame stages in the workers' own executor, in
    ``concurrent`` threads at once: workers sharing the host's cores slow each other down
    (memory bandwidth, caches), and a lone measurement would promise too much.
    """
    from concurrent.futures import ThreadPoolExecutor

    from workers.executor import TileExecutor

    plan = tiling.partition(model, example[:1], grid=(1, 1))
    x = example[:1].numpy()
    old = torch.get_num_threads()
    ex = TileExecutor(threads=1)
    ex.load("calibrate", {s.index: s.program for s in plan.stages})

    def frame() -> None:
        env = {plan.input_name: x}
        for st in plan.stages:
            r = ex.run("calibrate", st.index, st.tiles[0].geometry, {n: env[n] for n in st.inputs})
            if not hasattr(r, "outputs"):
                raise RuntimeError(f"calibration run failed: {r}")
            env.update(r.outputs)

    try:
        with ThreadPoolExecutor(max(1, concurrent)) as pool:
            # each thread: one warm-up frame (it allocates), then one timed frame, as before
            times = list(pool.map(lambda _: median_seconds(frame, 0.0, min_runs=1, warmup=1), range(max(1, concurrent))))
    finally:
        torch.set_num_threads(old)
    return max(0.1, plan.untiled_flops / statistics.median(times) / 1e9)
