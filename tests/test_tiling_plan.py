"""Plans: accounting against DeepThings' figures, isolation of tiles, reuse, stages and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tiling
from helpers import assert_exact

MIB = 2**20


def yolov2_16() -> nn.Sequential:
    """YOLOv2 layers 0-15 written out here, independent of the zoo."""
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    c = 3
    for s in [(32, 3), "M", (64, 3), "M", (128, 3), (64, 1), (128, 3), "M", (256, 3), (128, 1), (256, 3), "M",
              (512, 3), (256, 1), (512, 3), (256, 1)]:
        if s == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        f, k = s  # type: ignore[misc]
        layers += [nn.Conv2d(c, f, k, 1, k // 2, bias=False), nn.BatchNorm2d(f), nn.LeakyReLU(0.1)]
        c = f
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def yolo() -> nn.Sequential:
    return yolov2_16()


@pytest.fixture(scope="module")
def x608() -> torch.Tensor:
    return torch.randn(1, 3, 608, 608)


@pytest.mark.parametrize("n,redundancy,reuse_red,peak_mib,sent", [
    (2, 24.7, 1.7, 20.0, 1.43),
    (3, 52.9, 6.9, 16.0, 1.93),
    (4, 84.5, 15.5, 11.6, 2.50),
    (5, 119.6, 27.6, 9.1, 3.16),
])
def test_deepthings_figures(yolo: nn.Module, x608: torch.Tensor, n: int, redundancy: float, reuse_red: float,
                            peak_mib: float, sent: float) -> None:
    plain = tiling.partition(yolo, x608, grid={"grid": (n, n), "deepthings": True})
    assert plain.stages[0].rows == tiling.deepthings_cuts(38, n)
    assert plain.untiled_flops == pytest.approx(26.0e9, rel=2e-3)
    assert plain.redundancy * 100 == pytest.approx(redundancy, abs=0.05)
    assert max(t.peak_bytes for t in plain.tiles) / MIB == pytest.approx(peak_mib, abs=0.05)
    assert sum(t.in_bytes for t in plain.tiles) / (3 * 608 * 608 * 4) == pytest.approx(sent, abs=0.005)
    reuse = tiling.partition(yolo, x608, grid={"grid": (n, n), "deepthings": True}, reuse=True)
    assert reuse.redundancy * 100 <= reuse_red + 0.1
    assert reuse.stages[0].weight_bytes / MIB == pytest.approx(13.1, abs=0.05)


def test_untiled_peak_and_weights(yolo: nn.Module, x608: torch.Tensor) -> None:
    plan = tiling.partition(yolo, x608, grid=(1, 1))
    assert plan.tiles[0].peak_bytes / MIB == pytest.approx(56.4, abs=0.05)
    assert plan.redundancy == 0.0


def test_yolo_5x5_exact_with_and_without_reuse(yolo: nn.Module) -> None:
    x = torch.randn(1, 3, 608, 608)
    ref = yolo(x)
    for reuse in (False, True):
        plan = tiling.partition(yolo, x, grid={"grid": (5, 5), "deepthings": True}, reuse=reuse)
        assert tiling.rel_error(plan.run(x), ref) <= 1e-4


def test_flops_match_flop_counter() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                      nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 6, 1)).eval()
    x = torch.randn(1, 3, 23, 17)
    for reuse in (False, True):
        plan = tiling.partition(m, x, grid=(3, 2), reuse=reuse)
        st = plan.stages[0]
        env = {plan.input_name: x}
        outs: dict = {}
        for i in st.order:
            tile = st.tiles[i]
            pieces = {}
            for p in tile.pieces_in:
                src = st.tiles[p.src]
                pieces.setdefault(p.node, []).append((p.box, outs[p.src][1][src.pieces_out.index(p)]))
            with FlopCounterMode(display=False) as fc:
                outs[i] = st.run_tile(tile, st.crop_inputs(tile, env), pieces)
            assert fc.get_total_flops() == tile.flops, (reuse, i)


def test_tile_reads_only_its_input_box() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                      nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Upsample(scale_factor=2),
                      nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 21, 18)
    plan = tiling.partition(m, x, grid=(3, 4))
    full = plan.run(x)
    st = plan.stages[0]
    for tile in st.tiles:
        b = tile.in_box
        poisoned = torch.full_like(x, math.nan)
        poisoned[:, :, b.h0:b.h1, b.w0:b.w1] = x[:, :, b.h0:b.h1, b.w0:b.w1]
        out, _ = st.run_tile(tile, st.crop_inputs(tile, {plan.input_name: poisoned}))
        got = out[st.reference]
        o = tile.out_box
        assert torch.isfinite(got).all()
        assert torch.allclose(got, full[:, :, o.h0:o.h1, o.w0:o.w1], atol=1e-5)


def test_reuse_dependencies_and_bytes(yolo: nn.Module, x608: torch.Tensor) -> None:
    plan = tiling.partition(yolo, x608, grid={"grid": (5, 5), "deepthings": True}, reuse=True)
    tiles = plan.tiles
    first = [t for t in tiles if t.group == 0]
    second = [t for t in tiles if t.group == 1]
    assert len(first) == 13 and len(second) == 12
    assert all(not t.deps and t.reuse_in_bytes == 0 for t in first)
    for t in second:
        assert t.deps and all(tiles[d].group == 0 and abs(tiles[d].row - t.row) + abs(tiles[d].col - t.col) == 1
                              for d in t.deps)
        assert t.reuse_in_bytes > 0
    assert sum(t.reuse_out_bytes for t in first) == sum(t.reuse_in_bytes for t in second)
    # the second group sends less input than without reuse
    plain = tiling.partition(yolo, x608, grid={"grid": (5, 5), "deepthings": True})
    assert sum(t.in_bytes for t in second) < sum(plain.tiles[t.index].in_bytes for t in second)


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (3, 3), (4, 3), (7, 7)])
def test_reuse_exact_on_branching_model(grid: tuple[int, int]) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
            self.c = nn.Conv2d(12, 4, 3, 2, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            z = F.relu(self.b(y)) + y
            return self.c(torch.cat([z, F.max_pool2d(y, 3, 1, 1)], 1))

    assert_exact(M(), torch.randn(1, 3, 29, 27), grid=grid, reuse=True)


def test_weighted_grid_moves_cuts() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 3, 40, 40)
    plan = assert_exact(m, x, grid=(1, 3), col_weights=[1, 2, 5])
    assert plan.stages[0].cols == [0, 3, 8, 20]
    plan = assert_exact(m, x, grid=(2, 1), row_weights=[3, 1])
    assert plan.stages[0].rows == [0, 15, 20]
    plan = assert_exact(m, x, cuts=([0, 7, 20], [0, 1, 2, 20]))
    assert len(plan.tiles) == 6


def test_several_stages(yolo: nn.Module) -> None:
    x = torch.randn(1, 3, 160, 224)
    plan = assert_exact(yolo, x, stages=[4, 8, 12], grids=[(4, 4), (3, 3), (2, 2), (1, 2)])
    assert [s.layers for s in plan.stages] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [len(s.tiles) for s in plan.stages] == [16, 9, 4, 2]
    assert plan.stages[1].inputs == plan.stages[0].outputs
    # several stages cut redundancy compared with one stage of the finest grid
    one = tiling.partition(yolo, x, grid=(4, 4))
    assert plan.redundancy < one.redundancy
    assert_exact(yolo, x, stages=[(0, 5), (5, 16)], grids=[(3, 3), (2, 2)], reuse=True)
    # names work as boundaries too: a stage ends after the layer that holds module '8' (layer 4's conv)
    named = tiling.partition(yolo, x, stages=["8"], grid=(2, 2))
    assert named.stages[0].layers == (0, 5)


def test_upto_stops_fusion(yolo: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    plan = assert_exact(yolo, x, grid=(2, 2), upto=5)
    assert plan.stages[0].layers == (0, 5)
    assert plan.stop is not None and "upto=5" in plan.stop.reason
    assert len(plan.tail.nodes) > 0


def test_skip_connection_counts_in_peak() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(F.relu(self.a(x))) + x

    plan = tiling.partition(Res(), torch.randn(1, 4, 10, 10), grid=(1, 1))
    # input (kept for the skip) + a's output + b's output + sum, all 4x10x10 float32
    assert plan.tiles[0].peak_bytes == 3 * 4 * 100 * 4


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_submodule_becomes_tail() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Untraceable(), nn.Conv2d(8, 2, 1)).eval()
    plan = assert_exact(m, torch.randn(1, 3, 12, 12), grid=(2, 2))
    assert plan.leaves == ["2"]
    assert plan.stages[0].nodes == ["_0", "_1"]


def test_untraceable_root_names_the_line() -> None:
    with pytest.raises(tiling.TraceFailure, match=r"test_tiling_plan.py:\d+.*(upto=|leaf_modules=)"):
        tiling.partition(Untraceable(), torch.randn(1, 8, 8, 8))


def test_leaf_modules_argument() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    plan = tiling.partition(m, torch.randn(1, 3, 8, 8), leaf_modules=[nn.Conv2d])
    assert plan.stages[0].nodes == ["_0", "_1"]  # Conv2d is a leaf already and local
    plan = assert_exact(m, torch.randn(1, 3, 8, 8), grid=(2, 2), upto="1")
    assert plan.stages[0].nodes == ["_0", "_1"]


# --- errors ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_plan() -> tiling.Plan:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)).eval()
    return tiling.partition(m, torch.randn(1, 3, 16, 12), grid=(2, 2))


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 4, 16, 12), r"\(C, H, W\) = \(3, 16, 12\)"),
    (torch.randn(1, 3, 15, 12), "partition again"),
    (torch.randn(3, 16, 12), "unsqueeze"),
    (torch.randn(1, 3, 16, 12, dtype=torch.float64), "dtype"),
    (torch.randn(0, 3, 16, 12), "empty"),
    ([1, 2, 3], "torch.Tensor"),
])
def test_bad_input(small_plan: tiling.Plan, x: object, match: str) -> None:
    with pytest.raises(tiling.InputMismatch, match=match):
        small_plan.run(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw,match", [
    (dict(grid=(9, 1), upto=2), "larger than the output size 8"),  # explicit upto: no fitting
    (dict(grid=(17, 1)), "largest grid that fits is 16x12"),
    (dict(grid=(0, 2)), "positive"),
    (dict(grid="5by5"), "5x5"),
    (dict(grid=(2, 2), row_weights=[1, -1]), "positive"),
    (dict(grid=(2, 2), row_weights=[1, 1, 1]), "3 row weights for a grid of 2"),
    (dict(cuts=([0, 4, 3, 8], [0, 6])), "strictly increasing"),
    (dict(cuts=([0, 4], [0, 6])), "end at the output row size 8"),
    (dict(stages=[1], grids=[(2, 2)]), "grids has 1 entries but there are 2 stages"),
])
def test_bad_grid(kw: dict, match: str) -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)).eval()
    with pytest.raises(tiling.GridError, match=match):
        tiling.partition(m, torch.randn(1, 3, 16, 12), **kw)


def test_nothing_tileable() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with pytest.raises(tiling.NotTileable, match="nothing .* spatially local"):
        tiling.partition(m, torch.randn(1, 3, 4, 4))


def test_bad_example() -> None:
    m = nn.Conv2d(3, 4, 3)
    with pytest.raises(tiling.InputMismatch, match="floating-point"):
        tiling.partition(m, torch.zeros(1, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(tiling.InputMismatch, match=r"\(N, C, H, W\)"):
        tiling.partition(m, torch.zeros(3, 8, 8))
    with pytest.raises(tiling.TraceFailure, match="example"):
        tiling.partition(m, torch.zeros(1, 5, 8, 8))


def test_summary_mentions_stop(yolo: nn.Module) -> None:
    m = nn.Sequential(yolo, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plan = tiling.partition(m, torch.randn(1, 3, 64, 64), grid=(2, 2))
    text = plan.summary()
    assert "redundancy" in text and "fusion stops at" in text and "AdaptiveAvgPool2d" in text


@pytest.mark.parametrize("grid,reuse", [((1, 1), False), ((3, 2), False), ((3, 3), True)])
def test_batch_norm_folded_only_where_unobserved(grid: tuple[int, int], reuse: bool) -> None:
    """conv -> bn pairs run as one conv, except where the conv's own output is read elsewhere."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False)
            self.c, self.bn_c = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = F.leaky_relu(self.bn_a(self.a(x)), 0.1)
            z = self.b(y)
            z = self.bn_b(z) + z  # the conv's output is read twice: not folded
            return self.bn_c(self.c(z))

    torch.manual_seed(3)
    m = M()
    for bn in (m.bn_a, m.bn_b, m.bn_c):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if bn.affine:
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -1, 1)
    plan = assert_exact(m, torch.randn(2, 3, 23, 19), grid=grid, reuse=reuse)
    prog = plan.stages[0].program
    assert sorted(prog._folded) == ["a", "c"]
    assert "bn_b" in prog.mods and "bn_a" not in prog.mods and "a" not in prog.mods
    unfolded = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers() if b.dtype.is_floating_point)
    assert prog.weight_bytes < unfolded * 4
