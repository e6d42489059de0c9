"""Integer geometry: boxes, axis maps and cuts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiling import GridError
from tiling.geometry import (Box, Upsample, Window, bbox_of_difference, check_cuts, deepthings_cuts,
                             even_cuts, scale_cuts, weighted_cuts)


def test_even_cuts_follow_round() -> None:
    assert even_cuts(38, 5) == [0, 8, 15, 23, 30, 38]
    assert even_cuts(38, 4) == [round(i * 38 / 4) for i in range(5)]
    assert even_cuts(7, 7) == list(range(8))


def test_deepthings_cuts() -> None:
    assert deepthings_cuts(38, 5) == [0, 8, 16, 24, 32, 38]
    assert deepthings_cuts(38, 3) == [0, 13, 26, 38]


def test_weighted_cuts_proportional() -> None:
    assert weighted_cuts(38, [1, 1]) == [0, 19, 38]
    assert weighted_cuts(40, [1, 3]) == [0, 10, 40]
    assert weighted_cuts(10, [1, 1000]) == [0, 1, 10]  # never an empty part


@given(st.integers(1, 300), st.lists(st.floats(0.01, 100), min_size=1, max_size=12))
def test_weighted_cuts_partition(size: int, weights: list[float]) -> None:
    if len(weights) > size:
        with pytest.raises(GridError):
            weighted_cuts(size, weights)
        return
    cuts = weighted_cuts(size, weights)
    assert cuts[0] == 0 and cuts[-1] == size and all(b > a for a, b in zip(cuts, cuts[1:]))
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    ideal = [w / sum(weights) * size for w in weights]
    assert all(abs(s - i) <= len(weights) for s, i in zip(sizes, ideal))


@pytest.mark.parametrize("bad", [[0, 5], [1, 10], [0, 5, 5, 10], [0, 6, 4, 10], [0, 2.5, 10], "x"])
def test_check_cuts_rejects(bad: object) -> None:
    with pytest.raises(GridError):
        check_cuts(bad, 10, "row")  # type: ignore[arg-type]


@pytest.mark.parametrize("size,parts", [(5, 6), (5, 0), (5, -1)])
def test_grid_too_large_or_not_positive(size: int, parts: int) -> None:
    with pytest.raises(GridError, match="grid"):
        even_cuts(size, parts)


def test_weights_must_be_positive() -> None:
    with pytest.raises(GridError, match="positive"):
        weighted_cuts(10, [1, 0])
    with pytest.raises(GridError, match="positive"):
        weighted_cuts(10, [1, float("nan")])


def test_window_need() -> None:
    assert Window(3, 1, 1, 1).need(0, 4) == (-1, 5)
    assert Window(2, 2, 1, 0).need(1, 3) == (2, 6)
    assert Window(3, 2, 2, 2).need(0, 1) == (-2, 3)
    assert Upsample(2).need(3, 6) == (1, 3)
    assert Upsample(3).need(0, 1) == (0, 1)


def test_box_ops() -> None:
    a, b = Box(0, 4, 0, 4), Box(2, 6, 3, 5)
    assert a.intersect(b) == Box(2, 4, 3, 4)
    assert a.union(b) == Box(0, 6, 0, 5)
    assert a.union(Box(0, 0, 0, 0)) == a
    assert Box(-2, 3, 1, 9).clip(2, 8) == Box(0, 2, 1, 8)
    assert a.contains(Box(1, 2, 1, 2)) and not a.contains(b)


def test_bbox_of_difference() -> None:
    box = Box(0, 10, 0, 10)
    assert bbox_of_difference(box, [Box(0, 10, 0, 3)]) == Box(0, 10, 3, 10)
    assert bbox_of_difference(box, [Box(0, 10, 0, 3), Box(0, 10, 8, 10), Box(0, 2, 0, 10)]) == Box(2, 10, 3, 8)
    assert bbox_of_difference(box, [box]).empty
    assert bbox_of_difference(box, [Box(4, 6, 4, 6)]) == box  # a hole inside leaves the bounding box


def test_scale_cuts() -> None:
    assert scale_cuts([0, 3, 7, 10], 10, 20) == [0, 6, 14, 20]
    assert scale_cuts([0, 3, 10], 10, 10) == [0, 3, 10]
