"""Property test: random DAGs of local ops, random grids, exact against the untiled model."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tiling

Spec = tuple[str, int, int, dict[str, Any]]  # op, first input, second input, params


class RandomNet(nn.Module):
    """Interprets a list of op specs; every op's output is appended to a list of values."""

    def __init__(self, specs: list[Spec], channels: list[int], outputs: list[int]) -> None:
        super().__init__()
        self.specs = specs
        self.outputs = outputs
        self.convs = nn.ModuleDict()
        for i, (op, a, _b, p) in enumerate(specs):
            if op == "conv":
                self.convs[str(i)] = nn.Conv2d(channels[a], p["cout"], p["k"], p["s"], p["pad"], p["d"], p["g"])

    def forward(self, x):
        vals = [x]
        for i, (op, a, b, p) in enumerate(self.specs):
            u = vals[a]
            if op == "conv":
                y = self.convs[str(i)](u)
            elif op == "max":
                y = F.max_pool2d(u, p["k"], p["s"], p["pad"], ceil_mode=p["ceil"])
            elif op == "avg":
                y = F.avg_pool2d(u, p["k"], p["s"], p["pad"], ceil_mode=p["ceil"], count_include_pad=p["incl"])
            elif op == "pad":
                y = F.pad(u, p["pads"], value=p["value"])
            elif op == "up":
                y = F.interpolate(u, scale_factor=p["f"], mode="nearest")
            elif op == "act":
                y = [torch.relu, torch.sigmoid, F.silu, lambda t: F.leaky_relu(t, 0.1)][p["which"]](u)
            elif op == "add":
                y = u + vals[b]
            elif op == "mul":
                y = u * vals[b]
            elif op == "cat":
                y = torch.cat([u, vals[b]], 1)
            else:  # slice
                y = u[:, p["c0"]:p["c1"]]
            vals.append(y)
        outs = [vals[o] for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


@st.composite
def nets(draw: st.DrawFn) -> tuple[RandomNet, torch.Tensor, Any]:
    c0 = draw(st.integers(1, 4))
    h, w = draw(st.integers(4, 24)), draw(st.integers(4, 24))
    shapes = [(c0, h, w)]
    specs: list[Spec] = []
    for _ in range(draw(st.integers(1, 7))):
        a = draw(st.integers(0, len(shapes) - 1))
        c, hh, ww = shapes[a]
        op = draw(st.sampled_from(["conv", "conv", "max", "avg", "pad", "up", "act", "add", "mul", "cat", "slice"]))
        p: dict[str, Any] = {}
        b = 0
        if op == "conv":
            k = draw(st.integers(1, 5))
            s = draw(st.integers(1, 3))
            d = draw(st.integers(1, 2))
            pad = draw(st.integers(0, (d * (k - 1)) // 2 + 1))
            g = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            cout = g * draw(st.integers(1, 3))
            p = dict(k=k, s=s, d=d, pad=pad, g=g, cout=cout)
            oh, ow = (hh + 2 * pad - d * (k - 1) - 1) // s + 1, (ww + 2 * pad - d * (k - 1) - 1) // s + 1
            new = (cout, oh, ow)
        elif op in ("max", "avg"):
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 3))
            pad = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans())
            p = dict(k=k, s=s, pad=pad, ceil=ceil, incl=draw(st.booleans()))
            ref = torch.zeros(1, 1, hh, ww)
            if hh + 2 * pad < k or ww + 2 * pad < k:
                continue
            fn = F.max_pool2d if op == "max" else F.avg_pool2d
            new = (c, *fn(ref, k, s, pad, ceil_mode=ceil).shape[2:])
        elif op == "pad":
            pads = tuple(draw(st.integers(-1, 2)) for _ in range(4))
            p = dict(pads=pads, value=draw(st.sampled_from([0.0, 1.5])))
            new = (c, hh + pads[2] + pads[3], ww + pads[0] + pads[1])
        elif op == "up":
            f = draw(st.integers(2, 3))
            p = dict(f=f)
            new = (c, hh * f, ww * f)
            if hh * f > 48 or ww * f > 48:
                continue
        elif op == "act":
            p = dict(which=draw(st.integers(0, 3)))
            new = (c, hh, ww)
        elif op in ("add", "mul", "cat"):
            same = [i for i, s in enumerate(shapes) if s[1:] == (hh, ww) and (op == "cat" or s[0] == c)]
            b = draw(st.sampled_from(same))
            new = (c + shapes[b][0], hh, ww) if op == "cat" else (c, hh, ww)
        else:
            c0_ = draw(st.integers(0, c - 1))
            p = dict(c0=c0_, c1=draw(st.integers(c0_ + 1, c)))
            new = (p["c1"] - c0_, hh, ww)
        if min(new) < 1:
            continue
        specs.append((op, a, b, p))
        shapes.append(new)
    if not specs:
        specs.append(("act", 0, 0, dict(which=0)))
        shapes.append(shapes[0])
    last = len(shapes) - 1
    outputs = [last] if draw(st.booleans()) or last < 2 else [last, draw(st.integers(1, last - 1))]
    net = RandomNet(specs, [s[0] for s in shapes], outputs).eval()
    x = torch.randn(draw(st.integers(1, 2)), c0, h, w)
    return net, x, draw(st.data())


@settings(max_examples=int(os.environ.get("TILEFLEET_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets())
def test_random_local_graphs_are_exact(case: tuple[RandomNet, torch.Tensor, Any]) -> None:
    net, x, data = case
    probe = tiling.partition(net, x)
    st0 = probe.stages[0]
    rh, rw = st0.shapes[st0.reference][1:]
    grid = (data.draw(st.integers(1, rh)), data.draw(st.integers(1, rw)))
    reuse = data.draw(st.booleans())
    plan = tiling.partition(net, x, grid=grid, reuse=reuse)
    with torch.no_grad():
        ref = net(x)
    err = tiling.rel_error(plan.run(x), ref)
    assert err <= 1e-4, (grid, reuse, net.specs)
    for stage in plan.stages:  # strided ops may skip pixels the model computes: redundancy can be < 0
        assert stage.flops >= 0  # (dead nodes are computed by the model, by no tile)
