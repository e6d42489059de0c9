"""Reduce points, shape-preserving reshapes, grid fitting and ATen capture, one idea per test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiling
from helpers import assert_exact


class Gate(nn.Module):
    """conv -> global reduction -> 1x1 conv -> gate, applied by multiply (SE) or add (GC)."""

    def __init__(self, how: str = "mean") -> None:
        super().__init__()
        self.how = how
        self.conv, self.fc, self.out = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.how == "mean":
            g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
            z = y * g
        elif self.how == "amax":
            z = y + self.fc(torch.amax(y, dim=(2, 3), keepdim=True))
        else:  # no keepdim, re-expanded by indexing, then broadcast explicitly
            g = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)).flatten(1))[:, :, None, None]
            z = y * g.expand_as(y)
        return self.out(z)


@pytest.mark.parametrize("how", ["mean", "amax", "expand"])
@pytest.mark.parametrize("grid", [(2, 2), (3, 2), (4, 5)])
def test_reduce_point_exact(how: str, grid: tuple[int, int]) -> None:
    plan = assert_exact(Gate(how), torch.randn(2, 3, 13, 11), grid=grid)
    assert len(plan.stages) == 2 and plan.tail.empty
    assert plan.stages[1].pinned == {"relu": 0} and plan.stages[1].reduced_in == list(plan.reduce_points)


def test_partials_own_a_partition_and_divide_once() -> None:
    """Owned boxes cover the reduced map exactly once (halos never count), the divisor is H * W."""
    x = torch.randn(1, 3, 13, 11)
    plan = tiling.partition(Gate(), x, grid=(3, 2))
    (point,) = plan.reduce_points.values()
    assert point.divisor == 13 * 11 and point.stage == 0 and point.partial_bytes == 6 * 4
    owned = [t.geometry.owned[point.node] for t in plan.stages[0].tiles]
    assert sum(b.area for b in owned) == 13 * 11
    assert all(a.intersect(b).empty for i, a in enumerate(owned) for b in owned[i + 1:])
    halo = [t.out_boxes["relu"] for t in plan.stages[0].tiles]
    assert any(h.area > o.area for h, o in zip(halo, owned))  # tiles hand on more than they own
    st = plan.stages[0]
    parts = [st.run_tile(t, st.crop_inputs(t, {plan.input_name: x}))[0][point.key] for t in st.tiles]
    with torch.no_grad():
        ref = F.relu(plan.stages[0].program.mods["conv"](x)).mean((2, 3), keepdim=True)
    assert torch.allclose(tiling.combine(point, parts), ref, rtol=1e-6, atol=1e-7)


def test_reduce_points_off_gives_fusion_end() -> None:
    plan = assert_exact(Gate(), torch.randn(1, 3, 12, 12), grid=(2, 2), reduce_points=False)
    assert len(plan.stages) == 1 and "reduce_points=False" in plan.stop.reason  # type: ignore[union-attr]


class Shuffle(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        if self.style == "view":
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        elif self.style == "permute":
            y = y.reshape(n, 4, 2, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        elif self.style == "unflatten":
            y = y.unflatten(1, (2, 4)).transpose(1, 2).reshape(n, -1, h, w)
        else:  # split and chunk
            p, q = y.chunk(2, dim=1)
            r, s = torch.split(q, [1, 3], dim=1)
            y = torch.cat([s, p, r], 1)
        return self.b(y)


@pytest.mark.parametrize("style", ["view", "permute", "unflatten", "split"])
def test_shuffles_are_fused(style: str) -> None:
    plan = assert_exact(Shuffle(style), torch.randn(2, 3, 10, 9), grid=(3, 2))
    assert plan.tail.empty and plan.stop is None


class Mixer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        if self.how == "view":
            y = y.view(n, c * 2, h // 2, w)  # folds rows into channels
            return self.b(y)
        if self.how == "transpose":
            return y.transpose(2, 3)
        return y.permute(0, 2, 3, 1)


@pytest.mark.parametrize("how,reason", [("view", "mixes the spatial dims"), ("transpose", "moves the height dim"),
                                        ("permute", "moves the batch or a spatial dim")])
def test_reshape_mixing_space_ends_fusion(how: str, reason: str) -> None:
    plan = assert_exact(Mixer(how), torch.randn(1, 3, 8, 6), grid=(2, 2))
    assert plan.stages[0].nodes == ["a"] and reason in plan.stop.reason  # type: ignore[union-attr]


def fixed_pool() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


def test_fit_grid_and_the_largest_grid_that_fits() -> None:
    x = torch.randn(1, 3, 16, 16)
    plan = assert_exact(fixed_pool(), x, grid=(2, 2))
    assert plan.stop is not None and plan.stop.node == "_3" and "smaller than the grid 2x2" in plan.stop.reason
    assert plan.stages[0].shapes[plan.stages[0].reference][1:] == (4, 4)
    plan = assert_exact(fixed_pool(), x, grid=(5, 5))  # ends before the 4x4 conv too
    assert plan.stages[0].shapes[plan.stages[0].reference][1:] == (8, 8)
    with pytest.raises(tiling.GridError, match="largest grid that fits is 8x8"):
        tiling.partition(fixed_pool(), x, grid=(9, 9))


def test_upto_and_stages_override_fitting() -> None:
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(tiling.GridError, match="larger than the output size 1"):
        tiling.partition(fixed_pool(), x, grid=(2, 2), upto=3)
    with pytest.raises(tiling.GridError, match="larger than the output size 1"):
        tiling.partition(fixed_pool(), x, stages=[1], grids=[(2, 2), (2, 2)])
    plan = assert_exact(fixed_pool(), x, grid=(2, 2), upto=2)
    assert "upto=2" in plan.stop.reason  # type: ignore[union-attr]


class AtenZoo(nn.Module):
    """fx fails on the loop over a split; export records every op below at ATen level."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = torch.cat([F.hardswish(t) for t in torch.split(y, 4, dim=1)], 1)
        y = F.max_pool2d(F.pad(y, (1, 0, 0, 1)), 2)
        y = F.avg_pool2d(self.c2(y), 3, 1, 1, count_include_pad=False)
        y = y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
        return F.interpolate(y[:, 2:], scale_factor=2, mode="nearest")


@pytest.mark.parametrize("grid", [(2, 2), (3, 2)])
def test_export_path_aten_ops(grid: tuple[int, int]) -> None:
    m = AtenZoo().eval()
    m.bn.running_mean.uniform_(-1, 1)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    plan = assert_exact(m, torch.randn(2, 3, 17, 15), grid=grid)
    assert plan.tail.empty and plan.stop is None and len(plan.stages) == 2


def test_neither_fx_nor_export_names_the_line() -> None:
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither fx nor export can capture it
                return x
            return -x

    with pytest.raises(tiling.TraceFailure, match=r"test_tiling_reduce.py:\d+.*torch.export"):
        tiling.partition(Bad(), torch.randn(1, 3, 8, 8))
