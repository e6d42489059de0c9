"""Shared test helpers: exactness checks against the untiled model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import tiling

TOL = 1e-4


def assert_exact(model: nn.Module, x: torch.Tensor, **kw: Any) -> tiling.Plan:
    """Partition, run tiled, and compare with the untiled model (relative error <= 1e-4)."""
    model = model.eval()
    plan = tiling.partition(model, x, **kw)
    with torch.no_grad():
        ref = model(x)
    got = plan.run(x)
    err = tiling.rel_error(got, ref)
    assert err <= TOL, f"relative error {err:.3g} > {TOL} with {kw}"
    _assert_same_structure(got, ref)
    return plan


def _assert_same_structure(a: Any, b: Any) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
    elif isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for k in b:
            _assert_same_structure(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same_structure(u, v)
