"""Zoo-style architectures end to end: exact on several grids, and most of their FLOPs fused.

Run ``python -m pytest -q tests/test_tiling_archs.py -s`` to print the fused-share table.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

import tiling
from archs import ARCHS, build

GRIDS = ((2, 2), (3, 3))
TOL = 1e-4


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Each model partitioned once, planned and run on every grid (shared by the tests below)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ARCHS:
        model, x = build(name)
        with torch.no_grad():
            ref = model(x)
        part = tiling.Partitioner(model, x)
        plans = {g: part.plan(g) for g in GRIDS}
        errs = {g: tiling.rel_error(p.run(x), ref) for g, p in plans.items()}
        out[name] = dict(plans=plans, errs=errs, share=min(p.fused_share for p in plans.values()), part=part)
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_exact_on_every_grid(results: dict[str, dict[str, Any]], name: str) -> None:
    r = results[name]
    for g, err in r["errs"].items():
        assert err <= TOL, f"{name} grid {g}: relative error {err:.2e}"
    for plan in r["plans"].values():
        _check_pinned_boxes(plan)


def _check_pinned_boxes(plan: tiling.Plan) -> None:
    """A pinned input is exactly what the same-index tile of the producing stage hands on."""
    for st in plan.stages:
        for name, src in st.pinned.items():
            prod = plan.stages[src]
            assert prod.group == st.group and prod.grid == st.grid
            for t, p in zip(st.tiles, prod.tiles):
                assert t.in_boxes[name] == p.out_boxes[name]


def test_fused_share(results: dict[str, dict[str, Any]]) -> None:
    rows = [(n, r["share"], max(r["errs"].values())) for n, r in results.items()]
    print("\nmodel                 fused share  max rel error  grids")
    for n, share, err in rows:
        print(f"{n:22s} {share * 100:10.1f}%  {err:13.1e}  {', '.join(f'{a}x{b}' for a, b in GRIDS)}")
    shares = [s for _, s, _ in rows]
    assert statistics.median(shares) >= 0.90
    for name in ("mobilenetv3-small", "efficientnet-b0"):
        assert results[name]["share"] >= 0.80, name


def test_reduce_points_split_into_same_grid_stages(results: dict[str, dict[str, Any]]) -> None:
    plan = results["mobilenetv3-small"]["plans"][(3, 3)]
    points = plan.reduce_points
    assert points and all(p.op == "sum" for p in points.values())
    for st in plan.stages[1:]:
        assert st.grid == (3, 3) and st.reduced_in  # each later stage continues from a reduce point
    assert "reduce point" in plan.summary() and "fused share" in plan.summary()


def test_fixed_pool_fits_the_grid(results: dict[str, dict[str, Any]]) -> None:
    plan = results["resnet18-fixedpool"]["plans"][(2, 2)]
    assert plan.stop is not None and "AvgPool2d" in plan.stop.op and "smaller than the grid 2x2" in plan.stop.reason
    st = plan.stages[0]
    assert st.shapes[st.reference][1:] == (7, 7)


def test_export_captures_what_fx_cannot(results: dict[str, dict[str, Any]]) -> None:
    model, x = build("split-loop-export")
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    part = results["split-loop-export"]["part"]
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in part.gm.graph.nodes)
    plan = results["split-loop-export"]["plans"][(2, 2)]
    assert plan.tail.empty and plan.reduce_points
    x3 = torch.randn(3, *x.shape[1:])  # any batch: nothing in the graph was fixed to the example
    with torch.no_grad():
        assert tiling.rel_error(plan.run(x3), model(x3)) <= TOL


def test_fused_share_counts_only_split_stages(results: dict[str, dict[str, Any]]) -> None:
    part = results["efficientnet-b0"]["part"]
    assert part.plan((1, 1)).fused_share == 0.0
    model, x = build("efficientnet-b0")
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    assert part.plan((2, 2)).model_flops == fc.get_total_flops()
