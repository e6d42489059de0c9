"""A bounded record of what the state machine was told and what it answered.

Like dask's ``stimulus_log`` + ``story()``: when a frame misbehaves in the
field, the question is always "what happened to *this* tile?".  Each handled
event is kept with the instructions it produced; internal moves that do not
show up as instructions (planning, stealing between planned queues) are kept
as transitions.  Both are deques with a maximum length so a long-running
gateway does not grow without bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from scheduler.events import (
    Cancel,
    Dispatch,
    Event,
    FailFrame,
    Instruction,
    Stitch,
    TileDone,
    TileFailed,
    event_device,
    event_frame,
    instruction_device,
    instruction_frame,
)
from scheduler.model import TileKey

Subject = TileKey | int | str
"""What a story is about: a tile key, a frame id, or a device id."""


class LogEntry(NamedTuple):
    """One handled event and the instructions it produced, in order."""

    t: float
    event: Event
    instructions: tuple[Instruction, ...]


class Transition(NamedTuple):
    """An internal state change of a tile, e.g. ``planned -> planned`` when
    stolen; ``detail`` says why in a word or two."""

    t: float
    key: TileKey
    start: str
    finish: str
    device: str | None
    detail: str


def _event_concerns(event: Event, subject: Subject) -> bool:
    if isinstance(subject, tuple):
        if isinstance(event, (TileDone, TileFailed)):
            return event.key == subject
        return False
    if isinstance(subject, str):
        return event_device(event) == subject
    return event_frame(event) == subject


def _instruction_concerns(instruction: Instruction, subject: Subject) -> bool:
    if isinstance(subject, tuple):
        if isinstance(instruction, (Dispatch, Cancel)):
            return instruction.key == subject
        if isinstance(instruction, Stitch):
            return (instruction.frame_id, instruction.stage) == subject[:2]
        if isinstance(instruction, FailFrame):
            return instruction.frame_id == subject[0]
        return False
    if isinstance(subject, str):
        return instruction_device(instruction) == subject
    return instruction_frame(instruction) == subject


def concerns(entry: LogEntry, subject: Subject) -> bool:
    """Whether the entry's event or any of its instructions is about ``subject``."""
    if _event_concerns(entry.event, subject):
        return True
    return any(_instruction_concerns(i, subject) for i in entry.instructions)


class EventLog:
    """Bounded log of :class:`LogEntry` and :class:`Transition` records."""

    def __init__(self, maxlen: int) -> None:
        self.entries: deque[LogEntry] = deque(maxlen=maxlen)
        self.transitions: deque[Transition] = deque(maxlen=maxlen)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[LogEntry]:
        return iter(self.entries)

    def record(self, t: float, event: Event, instructions: list[Instruction]) -> None:
        self.entries.append(LogEntry(t, event, tuple(instructions)))

    def note(
        self, t: float, key: TileKey, start: str, finish: str, device: str | None, detail: str
    ) -> None:
        self.transitions.append(Transition(t, key, start, finish, device, detail))

    def story(self, subject: Subject) -> list[LogEntry]:
        """Every kept entry that concerns ``subject``, oldest first.

        For a tile that is its Dispatch/Cancel instructions, its results, the
        Stitch of its stage and a FailFrame of its frame; for a frame id,
        everything about the frame; for a device id, everything addressed to
        or reported by the device.
        """
        return [e for e in self.entries if concerns(e, subject)]

    def tile_transitions(self, key: TileKey) -> list[Transition]:
        """Every kept internal transition of one tile, oldest first."""
        return [tr for tr in self.transitions if tr.key == key]
