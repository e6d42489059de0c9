"""Every local op, at image borders and at cuts, against the untiled op."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiling
from helpers import assert_exact

torch.manual_seed(0)


def grids_for(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """1x1, a few odd grids and the finest grid (one tile per output pixel)."""
    plan = tiling.partition(model, x)
    h, w = plan.stages[0].shapes[plan.stages[0].reference][1:]
    cands = {(1, 1), (2, 3), (3, 2), (min(4, h), min(5, w)), (h, w), (1, w), (h, 1)}
    return sorted(g for g in cands if g[0] <= h and g[1] <= w)


def check_all_grids(model: nn.Module, x: torch.Tensor) -> None:
    for g in grids_for(model, x):
        assert_exact(model, x, grid=g)
    assert_exact(model, x, grid=grids_for(model, x)[-1], reuse=True)


class Seq(nn.Sequential):
    pass


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=0),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=4, stride=3, padding=1),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(0, 2)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same", dilation=2),
    dict(kernel_size=3, padding="valid", dilation=3),
    dict(kernel_size=3, padding=2, dilation=2, stride=2),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=7, stride=2, padding=3),
]


@pytest.mark.parametrize("kw", CONVS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_conv(kw: dict) -> None:
    m = nn.Conv2d(4, 6, **kw)
    check_all_grids(m, torch.randn(2, 4, 17, 13))


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_and_depthwise_conv(groups: int) -> None:
    m = Seq(nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 3, 2, 1, groups=groups))
    check_all_grids(m, torch.randn(1, 8, 15, 19))


def test_asymmetric_padding_via_zero_pad() -> None:
    m = Seq(nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(3, 5, 3, 2), nn.ConstantPad2d((1, 2, 0, 1), 0.5),
            nn.Conv2d(5, 4, 2))
    check_all_grids(m, torch.randn(1, 3, 14, 11))


def test_negative_padding_crops() -> None:
    class M(nn.Module):
        def forward(self, x):
            return F.relu(F.pad(x, (-1, 2, 1, -2)))

    check_all_grids(M(), torch.randn(1, 2, 9, 10))


POOLS = list(itertools.product([2, 3], [1, 2, 3], [0, 1], [False, True]))


@pytest.mark.parametrize("k,s,p,ceil", POOLS)
def test_max_pool(k: int, s: int, p: int, ceil: bool) -> None:
    if p > k // 2:
        pytest.skip("padding must be at most half the kernel")
    m = nn.MaxPool2d(k, s, p, ceil_mode=ceil)
    x = torch.randn(1, 3, 13, 10) - 5.0  # all negative: a zero pad would show up as a wrong max
    check_all_grids(m, x)


def test_max_pool_dilation() -> None:
    check_all_grids(nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), torch.randn(1, 2, 16, 15) - 3)


@pytest.mark.parametrize("k,s,p,ceil,incl", list(itertools.product([2, 3], [1, 2], [0, 1], [False, True], [False, True])))
def test_avg_pool(k: int, s: int, p: int, ceil: bool, incl: bool) -> None:
    if p > k // 2:
        pytest.skip("padding must be at most half the kernel")
    m = nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=incl)
    check_all_grids(m, torch.randn(1, 3, 11, 14) + 2.0)


def test_avg_pool_divisor_override() -> None:
    class M(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, divisor_override=5)

    check_all_grids(M(), torch.randn(1, 2, 12, 9))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_nearest_upsample_unaligned_cuts(factor: int) -> None:
    m = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=factor, mode="nearest"),
            nn.Conv2d(4, 2, 3, padding=1))
    x = torch.randn(1, 3, 7, 5)
    check_all_grids(m, x)
    # cuts that fall inside an upsampled block
    h, w = 7 * factor, 5 * factor
    assert_exact(m, x, cuts=([0, 1, h // 2 + 1, h], [0, w - 1, w]))


def test_interpolate_functional_nearest() -> None:
    class M(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="nearest") * 2 + 1

    check_all_grids(M(), torch.randn(1, 2, 5, 6))


ACTS = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(), nn.GELU(),
        nn.ELU(), nn.Mish(), nn.Hardsigmoid(), nn.PReLU(4), nn.Identity(), nn.Dropout(0.5), nn.ReLU(inplace=True)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_pointwise_modules(act: nn.Module) -> None:
    m = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act, nn.MaxPool2d(2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    plan = assert_exact(m, torch.randn(1, 3, 10, 9), grid=(3, 2))
    assert len(plan.stages[0].nodes) == 4 and plan.tail.empty


def test_functional_ops_branch_merge_cat_slice() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 5, padding=2)

        def forward(self, x):
            y = F.leaky_relu(self.a(x), 0.1)
            u, v = self.b(y), self.c(y)
            z = torch.cat([u * v, y + u, torch.sigmoid(v)], dim=1)
            z = z[:, 4:20]
            w = F.max_pool2d(z, 3, 2, 1)
            return torch.relu(w) - 0.5 * F.avg_pool2d(z, 2, 2, ceil_mode=True, count_include_pad=False)

    x = torch.randn(2, 3, 16, 16)
    check_all_grids(M(), x)


def test_constant_operands() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("bias", torch.rand(1, 4, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.conv.weight, self.conv.bias, 1, 1) + self.bias * 2.0

    plan = assert_exact(M(), torch.randn(1, 3, 9, 9), grid=(3, 3))
    assert plan.tail.empty


def test_squeeze_excitation_gate_ends_fusion_without_reduce_points() -> None:
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.conv(x)
            g = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
            return y * g

    plan = assert_exact(SE(), torch.randn(1, 3, 12, 12), grid=(2, 2), reduce_points=False)
    assert plan.stages[0].nodes == ["conv"]
    assert any("adaptive_avg_pool2d" in str(s) and "reduce_points=False" in s.reason for s in plan.stops)
    assert any("broadcast over space" in s.reason or "not fused" in s.reason for s in plan.stops)
    # with reduce points (the default) the gate is fused: two stages on one grid, nothing in the tail
    plan = assert_exact(SE(), torch.randn(1, 3, 12, 12), grid=(2, 2))
    assert [len(s.tiles) for s in plan.stages] == [4, 4] and plan.tail.empty


def test_multi_output_two_scales() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.down = nn.Conv2d(8, 8, 3, 2, 1)
            self.head1 = nn.Conv2d(8, 5, 1)
            self.head2 = nn.Conv2d(16, 5, 3, padding=1)

        def forward(self, x):
            a = F.relu(self.stem(x))
            b = F.relu(self.down(a))
            up = F.interpolate(b, scale_factor=2, mode="nearest")
            return {"small": self.head1(b), "large": self.head2(torch.cat([up, a], 1))}

    x = torch.randn(1, 3, 20, 14)
    plan = assert_exact(Heads(), x, grid=(3, 3))
    st = plan.stages[0]
    assert st.shapes[st.reference][1:] == (10, 7)
    check_all_grids(Heads(), x)


def test_global_pool_tail_and_structure() -> None:
    m = Seq(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    plan = assert_exact(m, torch.randn(3, 3, 11, 9), grid=(2, 2))
    assert plan.stop is not None and "AdaptiveAvgPool2d" in plan.stop.op
    assert len(plan.tail.nodes) == 3


@pytest.mark.parametrize("batch", [1, 3])
def test_any_batch_size(batch: int) -> None:
    m = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    plan = tiling.partition(m, torch.randn(1, 3, 10, 10), grid=(2, 2))
    x = torch.randn(batch, 3, 10, 10)
    assert tiling.rel_error(plan.run(x), m(x)) < 1e-5


def test_float64() -> None:
    m = Seq(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1)).double()
    assert_exact(m, torch.randn(1, 3, 9, 11, dtype=torch.float64), grid=(3, 4))
