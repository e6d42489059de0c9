"""tilefleet's scheduler: a pure, event-driven state machine.

Feed it events with :meth:`Scheduler.handle`; carry out the instructions it
returns.  It never does I/O, never reads a clock and never imports Ray, so
the same code runs under the Ray shell, the simulator (:func:`simulate`) and
table-driven tests.
"""

from __future__ import annotations

from scheduler.events import (
    Cancel,
    Complete,
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
from scheduler.sim import SimResult, simulate
from scheduler.state import Scheduler

__all__ = [
    "Cancel",
    "Candidate",
    "Complete",
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
    "SimResult",
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
    "simulate",
    "tail_cost_s",
    "tile_cost_s",
]
