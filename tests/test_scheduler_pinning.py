"""Continuations across a reduce point run where their maps are held; speculative copies race.

Exact instruction lists on hand-built frames, every state checked by ``validate()``.
"""

from __future__ import annotations

import pytest

from scheduler import (
    Cancel,
    DeviceJoined,
    DeviceSlow,
    Dispatch,
    FrameSpec,
    FrameSubmitted,
    RunTail,
    Scheduler,
    Stitch,
    Tick,
    TileDone,
    TileSpec,
)
from scheduler.testing import GB, Checked, device

pytestmark = pytest.mark.unit
HELD = 1000


def reduce_frame(fid: int) -> FrameSpec:
    """Stage 0: two map tiles; stage 1: each continues on its own maps after combining both
    partials (a reduce point), so it depends on both and is pinned to its own."""
    maps = tuple(TileSpec(0, i, GB, 0, 0, 100, held_bytes=HELD) for i in range(2))
    cont = tuple(TileSpec(1, i, GB, 0, 0, 100, deps=((0, 0), (0, 1)), pin=(0, i)) for i in range(2))
    return FrameSpec(fid, maps + cont, (0, 0), 0)


def test_a_continuation_runs_where_its_maps_are_even_when_elsewhere_is_faster() -> None:
    h = Checked()
    assert h(DeviceJoined(device("a"), 0.0), DeviceJoined(device("b"), 0.0)) == []
    assert h(FrameSubmitted(reduce_frame(1), 0.0)) == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "b")]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == []
    assert h.s.stats()["a"].memory_in_use == HELD  # its maps stay for (1, 1, 0)
    assert h(DeviceSlow("b", 10.0, 1.0)) == []
    # b is now 10x slower, yet (1,1,1) continues on b's maps: it goes to b, and is never stolen
    assert h(TileDone((1, 0, 1), "b", 1.0)) == [
        Stitch(1, 0), Dispatch((1, 1, 0), "a"), Dispatch((1, 1, 1), "b")]
    assert h(TileDone((1, 1, 0), "a", 2.0)) == []
    assert h.s.stats()["a"].memory_in_use == 0  # released once the continuation is done
    assert h.s.stats()["b"].memory_in_use == HELD + 100
    assert h.s.stats()["a"].steals == 0


def test_held_maps_bound_how_many_frames_park_at_the_barrier() -> None:
    """A device holding maps for continuations that cannot run yet takes no more map tiles than fit."""
    h = Checked()
    budget = 100 + 2 * HELD  # room for two frames' held maps, plus one tile's peak
    assert h(DeviceJoined(device("a", memory_bytes=budget), 0.0)) == []
    out = h(*(FrameSubmitted(reduce_frame(f), 0.0) for f in range(4)))
    assert out == [Dispatch((0, 0, 0), "a")]  # one map tile at a time: its peak plus what it will hold
    assert h(TileDone((0, 0, 0), "a", 1.0)) == [Dispatch((0, 0, 1), "a")]
    assert h(TileDone((0, 0, 1), "a", 2.0)) == [Stitch(0, 0), Dispatch((0, 1, 0), "a")]
    assert h.s.stats()["a"].memory_in_use <= budget


def test_an_overdue_tile_is_copied_to_an_idle_device_and_the_first_result_wins() -> None:
    h = Checked(Scheduler(speculate_after=2.0))
    assert h(DeviceJoined(device("a"), 0.0), DeviceJoined(device("b"), 0.0)) == []
    frame = FrameSpec(1, (TileSpec(0, 0, GB, 0, 0, 0), TileSpec(0, 1, GB, 0, 0, 0)), (0,), 0)
    assert h(FrameSubmitted(frame, 0.0)) == [Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 1), "b")]
    assert h.s.next_deadline() == pytest.approx(2.0)  # each tile is expected to take 1 s
    assert h(TileDone((1, 0, 1), "b", 1.0)) == []
    assert h(Tick(2.0)) == [Dispatch((1, 0, 0), "b")]  # a's tile is overdue and b is idle: a copy
    assert h(TileDone((1, 0, 0), "b", 3.0)) == [Cancel((1, 0, 0), "a"), Stitch(1, 0), RunTail(1, "b")]
    assert h(TileDone((1, 0, 0), "a", 50.0)) == []  # the loser's late result is dropped
    stats = h.s.stats()
    assert (stats["b"].speculated, stats["b"].speculation_wins, stats["b"].tiles_done) == (1, 1, 2)
    assert stats["a"].speed > 1.0  # a is now known to be slow


def test_pinned_tiles_are_never_copied() -> None:
    h = Checked(Scheduler(speculate_after=2.0))
    assert h(DeviceJoined(device("a"), 0.0), DeviceJoined(device("b"), 0.0)) == []
    h(FrameSubmitted(reduce_frame(1), 0.0))
    h(TileDone((1, 0, 0), "a", 1.0), TileDone((1, 0, 1), "b", 1.0))
    assert h(TileDone((1, 1, 1), "b", 2.0)) == []  # b idle, a's continuation still running
    assert h(Tick(10.0)) == []  # overdue, but its maps are only on a


# --- memory pressure ---------------------------------------------------------------------------------

def test_a_device_whose_budget_shrinks_gets_no_tile_it_cannot_hold() -> None:
    from scheduler import DeviceBudget
    from scheduler.testing import independent_frame

    h = Checked()
    assert h(DeviceJoined(device("a"), 0.0), DeviceJoined(device("b"), 0.0)) == []
    frame = independent_frame(1, 6, peak_bytes=1000)
    assert h(FrameSubmitted(frame, 0.0)) == [
        Dispatch((1, 0, 0), "a"), Dispatch((1, 0, 2), "a"), Dispatch((1, 0, 1), "b"), Dispatch((1, 0, 3), "b")]
    # another process takes a's memory: its queued tile is cancelled, its running one stays
    assert h(DeviceBudget("a", 500, 0.5)) == [Cancel((1, 0, 2), "a")]
    assert h.s.planned("a") == [] and h.s.in_flight("a") == [(1, 0, 0)]
    assert h(TileDone((1, 0, 0), "a", 1.0)) == []  # free now, but nothing fits in 500 bytes
    assert all(k[2] != 0 for k in h.s.planned("b")) and len(h.s.planned("b")) == 3
    back = h(DeviceBudget("a", 10_000, 1.5))  # room again: a steals back what helps
    assert back and all(isinstance(i, Dispatch) and i.device == "a" for i in back), back


def test_a_budget_too_small_for_any_device_fails_the_frame_with_the_numbers() -> None:
    from scheduler import DeviceBudget, FailFrame
    from scheduler.testing import independent_frame

    h = Checked()
    assert h(DeviceJoined(device("a"), 0.0)) == []
    h(FrameSubmitted(independent_frame(1, 2, peak_bytes=1000), 0.0))
    out = h(DeviceBudget("a", 10, 0.1))
    assert any(isinstance(i, FailFrame) and "budget shrank to 10 bytes" in i.reason for i in out), out
