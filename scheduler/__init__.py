"""tilefleet's scheduler: a pure, event-driven state machine.

Feed it events with :meth:`Scheduler.handle`; carry out the instructions it
returns.  It never does I/O, never reads a clock and never imports Ray, so
the same code runs under the driver (on Ray, and in the simulator of
:mod:`sims`) and in table-driven tests.
"""

from __future__ import annotations

from scheduler.stragglers import SPECULATE_AFTER, SPECULATE_MIN_S, SPECULATION_SHARE
from scheduler.events import (
    Cancel,
    Complete,
    DeviceBudget,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    Event,
    FailFrame,
    FrameCancelled,
    FrameSubmitted,
    Instruction,
    RunTail,
    Stitch,
    TailDone,
    TailFailed,
    Tick,
    TileDone,
    TileFailed,
)
from scheduler.log import LogEntry, Transition
from scheduler.model import DeviceInfo, FrameSpec, TileKey, TileRef, TileSpec, frame_problems
from scheduler.placement import Candidate, tail_cost_s, tile_cost_s
from scheduler.records import DeviceStats
from scheduler.state import Scheduler

__all__ = [
    "SPECULATE_AFTER",
    "SPECULATE_MIN_S",
    "SPECULATION_SHARE",
    "Cancel",
    "Candidate",
    "Complete",
    "DeviceBudget",
    "DeviceInfo",
    "DeviceJoined",
    "DeviceLost",
    "DeviceSlow",
    "DeviceStats",
    "Dispatch",
    "Event",
    "FailFrame",
    "FrameCancelled",
    "FrameSpec",
    "FrameSubmitted",
    "Instruction",
    "LogEntry",
    "RunTail",
    "Scheduler",
    "Stitch",
    "TailDone",
    "TailFailed",
    "Tick",
    "TileDone",
    "TileFailed",
    "TileKey",
    "TileRef",
    "TileSpec",
    "Transition",
    "frame_problems",
    "tail_cost_s",
    "tile_cost_s",
]
