"""Test tiers: unmarked tests are pure unit tests; other tiers carry their marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytest_plugins = ["netns"]  # the lan / lan_factory fixtures (tests/netns.py)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TIERS = ("sim", "ray", "netns", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference material not found at {SHARED} (../shared beside the checkout, as in CI)")
    return SHARED
