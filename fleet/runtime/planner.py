"""``grid="auto"``: choose stages, grids and reuse from a cost model (pure: no Ray).

The cost model is a simulation: each candidate plan is run, frame by frame, through the unchanged
scheduler on the devices' emulated clocks (:func:`sims.predict.predict`). That prices FLOPs with
redundancy, per-tile overheads, bytes over each link, transfers overlapping compute, memory
budgets (a tile that fits nowhere fails the candidate) and the scheduler's own placement, which a
closed-form formula would each approximate separately.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import tiling
from sims.catalog import DeviceSpec
from sims.metrics import throughput_depth
from sims.predict import Prediction, predict
from tiling.report import table

from .wiring import frame_spec, wire


NEAR_TIE = 0.02  # predictions this close are a tie for the cost model (its error is a few percent)
GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3), (3, 4), (4, 4), (5, 5)]


@dataclass
class PlanCandidate:
    label: str
    kwargs: dict[str, Any]
    prediction: Prediction | None = None
    error: str = ""
    note: str = ""

    def score(self, mode: str) -> float:
        p = self.prediction
        if p is None or p.failed or p.frames == 0:
            return float("inf")
        return p.latency_s if mode == "latency" else -p.fps


@dataclass
class Choice:
    mode: str
    best: PlanCandidate
    candidates: list[PlanCandidate] = field(default_factory=list)
    scale: float = 1.0

    def summary(self, top: int = 6) -> str:
        ranked = sorted(self.candidates, key=lambda c: c.score(self.mode))
        rows = []
        for c in ranked[:top]:
            p = c.prediction
            rows.append(["*" if c is self.best else "", c.label,
                         f"{p.latency_s / self.scale * 1e3:.0f}" if p else "-", f"{p.fps * self.scale:.2f}" if p else "-",
                         c.error[:60] if c.error else c.note])
        head = (f"grid='auto' ({self.mode} mode): {len(self.candidates)} candidate plans simulated on the "
                f"devices' emulated clocks (scale {self.scale:.3g}, shown in emulated units); "
                f"chosen: {self.best.label}")
        return head + "\n" + table(["", "candidate", "pred. latency ms", "pred. fps", "note"], rows)

    @property
    def predicted(self) -> Prediction:
        assert self.best.prediction is not None
        return self.best.prediction


def _within(score: float, best: float, tol: float) -> bool:
    """``score`` is no worse than ``best`` by more than ``tol`` (scores: lower is better, may be < 0)."""
    return score <= best + tol * abs(best)


def downsampling_boundaries(part: tiling.Partitioner) -> list[int]:
    """Layer boundaries right after a layer that shrinks the map: where stage cuts are cheapest."""
    out = []
    for layer in part.layers[:-1]:
        spec = part.fusion.specs[layer.anchor]
        if any(getattr(m, "s", 1) > 1 for m in spec.maps):
            out.append(layer.index + 1)
    return out


def candidates(part: tiling.Partitioner, n_devices: int) -> list[PlanCandidate]:
    ref = part.fusion.layers[-1].out_shape if part.fusion.layers else (1, 1, 1)
    h, w = ref[1], ref[2]
    grids = [g for g in GRIDS if g[0] <= h and g[1] <= w and g[0] * g[1] <= max(4, 3 * n_devices)]
    if n_devices > 1 and (1, n_devices) not in grids and n_devices <= w:
        grids.append((1, n_devices))
    out = [PlanCandidate(f"{g[0]}x{g[1]}", {"grid": g}) for g in grids]
    out += [PlanCandidate(f"{g[0]}x{g[1]} reuse", {"grid": g, "reuse": True}) for g in grids if g[0] * g[1] >= 4]
    bounds = downsampling_boundaries(part)
    sets = [[b] for b in bounds] + [list(c) for c in itertools.combinations(bounds[-3:], 2)]
    for st in sets:
        for g in grids:
            if g[0] * g[1] < 2:
                continue
            out.append(PlanCandidate(f"stages {st} {g[0]}x{g[1]}", {"stages": st, "grid": g}))
    return out


def evaluate(plan: tiling.Plan, devices: Sequence[DeviceSpec], mode: str, scale: float,
             long: bool = False, shared_link_mbps: float | None = None) -> Prediction:
    """The simulator's figures for ``plan`` on ``devices``: the real driver and scheduler on the
    device model, as many frames as a measurement of ``mode`` would run."""
    if mode == "latency":
        return predict(plan, devices, frames=3, in_flight=1, scale=scale, shared_link_mbps=shared_link_mbps)
    # steady state needs many frames per frame in flight; a short run ranks, a long run decides
    depth = throughput_depth([d.profile.gflops for d in devices])
    frames = 8 * depth if long else 4 * depth
    return predict(plan, devices, frames=frames, in_flight=depth, scale=scale, shared_link_mbps=shared_link_mbps)


def choose_plan(model: nn.Module, example: torch.Tensor, devices: Sequence[DeviceSpec], *, mode: str = "latency",
                scale: float = 1.0, shared_link_mbps: float | None = None,
                **fixed: Any) -> tuple[tiling.Plan, Choice]:
    """The candidate with the best predicted latency (or throughput), and the table of why
    (``shared_link_mbps``: the devices share one channel of that bandwidth, :mod:`sims.medium`)."""
    part = tiling.Partitioner(model, example, fixed.pop("leaf_modules", ()))
    cands = candidates(part, len(devices))
    plans: dict[int, tiling.Plan] = {}
    for i, c in enumerate(cands):
        try:
            plan = part.plan(**{**c.kwargs, **fixed})
            c.prediction = evaluate(plan, devices, mode, scale, shared_link_mbps=shared_link_mbps)
            plans[i] = plan
        except (tiling.TilingError, ValueError) as e:
            c.error = str(e)
    if mode == "throughput":  # re-rank the leaders with long runs
        for i in sorted(plans, key=lambda i: cands[i].score(mode))[:5]:
            cands[i].prediction = evaluate(plans[i], devices, mode, scale, long=True,
                                           shared_link_mbps=shared_link_mbps)
        ranked = sorted(plans, key=lambda i: cands[i].score(mode))
        for i in ranked[5:]:
            cands[i].note = "short run"
    best_i = min(range(len(cands)), key=lambda i: (cands[i].score(mode), i))
    if best_i in plans:
        # within the model's own error, the plan with fewer tiles wins: less dispatch overhead, fewer
        # halo transfers and fewer chances to be late than the simulation charges for
        top = cands[best_i].score(mode)
        near = [i for i in plans if _within(cands[i].score(mode), top, NEAR_TIE)]
        best_i = min(near, key=lambda i: (sum(len(s.tiles) for s in plans[i].stages), cands[i].score(mode), i))
        if best_i != min(range(len(cands)), key=lambda i: (cands[i].score(mode), i)):
            cands[best_i].note = f"fewest tiles within {NEAR_TIE:.0%}"
    best = cands[best_i]
    if best_i not in plans or not math.isfinite(best.score(mode)):
        reasons = "; ".join(sorted({c.error or (c.prediction.failed[0] if c.prediction and c.prediction.failed else "?")
                                    for c in cands}))[:500]
        budget = max((d.profile.usable_bytes for d in devices), default=0)
        needs = {i: memory_need(p, example.element_size()) for i, p in plans.items()}
        if needs and min(needs.values()) > budget:
            i = min(needs, key=lambda k: (needs[k], k))
            weights = sum(st.weight_bytes for st in plans[i].stages)
            fix = (f"stop fusion earlier with upto= (the fused weights alone are {weights / 2**20:.1f} MiB)" if weights > budget
                   else "try a finer grid= by hand or a smaller input")
            raise tiling.NoPlanFits(
                f"no candidate plan fits these devices' memory: the smallest ({cands[i].label}) needs {needs[i]} bytes "
                f"({needs[i] / 2**20:.1f} MiB) on one device, and the largest budget here is {budget} bytes "
                f"({budget / 2**20:.1f} MiB); add a device with at least {needs[i] / 2**20:.1f} MiB usable, or {fix} "
                f"({reasons[:300]})", needs[i], budget)
        raise tiling.NotTileable("no candidate plan fits these devices: " + reasons)
    return plans[best_i], Choice(mode, best, cands, scale)


def memory_need(plan: tiling.Plan, frame_itemsize: int = 4) -> int:
    """The memory budget one device needs to run ``plan`` at all: its largest tile with the
    deployment's weights, or its tail (what the scheduler checks a frame against)."""
    w = wire(plan)
    tail_weights = sum(p.numel() * p.element_size() for p in plan.tail.gm.parameters())
    spec = frame_spec(w, 0, "need", plan.tail.flops, int(np.prod(plan.input_shape)) * frame_itemsize,
                      plan.tail.out_bytes, tail_weights)
    return max([spec.tile_need_bytes(t) for t in spec.tiles] + [spec.tail_memory_bytes])
