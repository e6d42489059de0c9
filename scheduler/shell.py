"""The shell contract, written once beside the state machine (as dask keeps ``BaseWorker`` beside
``WorkerState``): which instruction means what, and which event answers it.

A shell feeds :meth:`Scheduler.handle` and carries out what it returns. Every shell (the driver
on Ray, the driver in the simulator, test doubles) subclasses :class:`Shell`, so each instruction
type has exactly one handler and an instruction nobody handles raises instead of vanishing.

| instruction                  | the shell does                                     | answered by                     |
|------------------------------|----------------------------------------------------|---------------------------------|
| ``Dispatch(key, device)``    | send the tile to the device                        | ``TileDone`` / ``TileFailed``   |
| ``Cancel(key, device)``      | best-effort cancel of a queued copy                | whatever comes back is reported |
| ``Stitch(frame, stage)``     | the stage's outputs are complete (nothing to move: | nothing                         |
|                              | consumers stitch from where the tiles ran)         |                                 |
| ``RunTail(frame, device)``   | run the layers after the last stage on the device  | ``TailDone`` / ``TailFailed``   |
| ``Complete(frame)``          | deliver the frame's result, exactly once           | nothing                         |
| ``FailFrame(frame, reason)`` | fail the frame with the reason, exactly once       | nothing                         |

Devices are reported with ``DeviceJoined`` / ``DeviceLost`` / ``DeviceSlow`` whenever the shell
learns of them; results the state no longer expects (``Scheduler.expects``) are late duplicates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from scheduler.events import Cancel, Complete, Dispatch, FailFrame, Instruction, RunTail, Stitch


class UnknownInstruction(TypeError):
    """The state machine emitted an instruction type this shell has no handler for (a bug)."""


class Shell(ABC):
    """Carries out instructions: one method per instruction type, nothing dropped silently."""

    _HANDLERS: ClassVar[dict[type, Callable[[Any, Any], None]]] = {
        Dispatch: lambda s, i: s.dispatch(i),
        Cancel: lambda s, i: s.cancel(i),
        Stitch: lambda s, i: s.stitch(i),
        RunTail: lambda s, i: s.run_tail(i),
        Complete: lambda s, i: s.complete(i),
        FailFrame: lambda s, i: s.fail_frame(i),
    }

    def execute(self, instructions: Iterable[Instruction]) -> None:
        for ins in instructions:
            handler = self._HANDLERS.get(type(ins))
            if handler is None:
                raise UnknownInstruction(f"no handler for {ins!r}; a shell handles "
                                         f"{', '.join(t.__name__ for t in self._HANDLERS)}")
            handler(self, ins)

    @abstractmethod
    def dispatch(self, ins: Dispatch) -> None: ...

    @abstractmethod
    def cancel(self, ins: Cancel) -> None: ...

    def stitch(self, ins: Stitch) -> None:
        """Nothing to move by default: tile outputs stay where they were made, and whoever needs a
        stage whole (the next stage's tiles, the tail, the final result) stitches it there."""

    @abstractmethod
    def run_tail(self, ins: RunTail) -> None: ...

    @abstractmethod
    def complete(self, ins: Complete) -> None: ...

    @abstractmethod
    def fail_frame(self, ins: FailFrame) -> None: ...
