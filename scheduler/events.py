"""What goes into the state machine (events) and what comes out (instructions).

The split follows dask/distributed's worker state machine: the I/O shell owns
every side effect (Ray calls, sockets, clocks) and reports what happened as an
event; the state machine owns every decision and answers with instructions.
Because time only arrives inside events (``t``), a test or the simulator can
drive the exact same code on a fake clock.

Shell contract, in short:

* ``Dispatch(key, device)``: send the tile to the device (Ray task / actor
  call).  Report ``TileDone`` or ``TileFailed`` for it later, always naming
  the device it was sent to.  Before handling a ``TileDone``, ask
  ``Scheduler.expects(key, device)``: keep the tile's output only if True.
* ``Cancel(key, device)``: the tile was dispatched but has not started; drop
  it (``ray.cancel``).  If a result still arrives for it, report it anyway:
  the state machine ignores results it no longer expects.
* ``Stitch(frame_id, stage)``: every tile of that stage is done; stitch their
  outputs.  Emitted exactly once per frame and stage.
* ``RunTail(frame_id, device)``: run the layers after the last fused stage.
* ``Complete(frame_id)`` / ``FailFrame(frame_id, reason)``: the frame's one
  and only terminal instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.model import DeviceInfo, FrameSpec, TileKey

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class FrameSubmitted:
    """A new frame to run; its ready tiles are planned at once."""

    frame: FrameSpec
    t: float


@dataclass(frozen=True, slots=True)
class TileDone:
    """A device finished a tile.  ``compute_s`` feeds the busy-time stats."""

    key: TileKey
    device: str
    t: float
    compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class TileFailed:
    """A tile raised on a device.  ``retryable=False`` fails the frame at once
    (e.g. a shape error that will fail everywhere); ``True`` re-runs it."""

    key: TileKey
    device: str
    t: float
    error: str = ""
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class TailDone:
    """The tail of a frame finished on ``device``."""

    frame_id: int
    device: str
    t: float
    compute_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TailFailed:
    """The tail of a frame raised; retried like a tile."""

    frame_id: int
    device: str
    t: float
    error: str = ""
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class DeviceJoined:
    """A device became available (first time, or back after being lost)."""

    device: DeviceInfo
    t: float


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """A device is gone; everything it held must run elsewhere.

    ``results_lost``: the outputs of tiles it finished went with it (they were stored on its
    machine). Those still needed, by a tile not yet done or by the tail, then run again.
    """

    device_id: str
    t: float
    results_lost: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSlow:
    """The device now runs ``factor`` times slower than its profile (thermal
    throttling, a co-located job).  ``factor=1`` restores full speed."""

    device_id: str
    factor: float
    t: float


@dataclass(frozen=True, slots=True)
class DeviceBudget:
    """The device's memory budget is now ``memory_bytes`` (memory pressure from another process,
    or room given back). Tiles that no longer fit go elsewhere; a tile already running stays."""

    device_id: str
    memory_bytes: int
    t: float


@dataclass(frozen=True, slots=True)
class FrameCancelled:
    """Nobody wants the frame any more (its client disconnected, its deadline passed): it fails
    now with ``reason``.  Its planned tiles are dropped, tiles queued at devices are cancelled,
    running ones drain and their results are ignored.  A frame already ended is left alone."""

    frame_id: int
    t: float
    reason: str = "cancelled"


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed with nothing else happening; lets estimates age and
    stealing reconsider.  Optional for the shell."""

    t: float


Event = (
    FrameSubmitted
    | TileDone
    | TileFailed
    | TailDone
    | TailFailed
    | DeviceJoined
    | DeviceLost
    | DeviceSlow
    | DeviceBudget
    | FrameCancelled
    | Tick
)

# --------------------------------------------------------------------- instructions


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send tile ``key`` to ``device``."""

    key: TileKey
    device: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Drop tile ``key`` that was dispatched to ``device``: best effort, since a copy that already
    runs may still finish (a speculative race's loser); whatever it reports is ignored."""

    key: TileKey
    device: str


@dataclass(frozen=True, slots=True)
class Stitch:
    """Every tile of ``stage`` of ``frame_id`` is done: stitch the outputs."""

    frame_id: int
    stage: int


@dataclass(frozen=True, slots=True)
class RunTail:
    """Run the frame's tail on ``device`` (after the last stage is stitched)."""

    frame_id: int
    device: str


@dataclass(frozen=True, slots=True)
class Complete:
    """The frame is finished; emitted exactly once and never with FailFrame."""

    frame_id: int


@dataclass(frozen=True, slots=True)
class FailFrame:
    """The frame cannot finish; ``reason`` says why in words for a human."""

    frame_id: int
    reason: str


Instruction = Dispatch | Cancel | Stitch | RunTail | Complete | FailFrame


def event_device(event: Event) -> str | None:
    """The device an event concerns, if any (used by the log's story)."""
    if isinstance(event, (TileDone, TileFailed, TailDone, TailFailed)):
        return event.device
    if isinstance(event, (DeviceLost, DeviceSlow, DeviceBudget)):
        return event.device_id
    if isinstance(event, DeviceJoined):
        return event.device.id
    return None


def event_frame(event: Event) -> int | None:
    """The frame an event concerns, if any."""
    if isinstance(event, (TileDone, TileFailed)):
        return event.key[0]
    if isinstance(event, (TailDone, TailFailed, FrameCancelled)):
        return event.frame_id
    if isinstance(event, FrameSubmitted):
        return event.frame.frame_id
    return None


def instruction_frame(instruction: Instruction) -> int:
    """The frame an instruction concerns (every instruction concerns one)."""
    if isinstance(instruction, (Dispatch, Cancel)):
        return instruction.key[0]
    return instruction.frame_id


def instruction_device(instruction: Instruction) -> str | None:
    """The device an instruction addresses, if any."""
    if isinstance(instruction, (Dispatch, Cancel, RunTail)):
        return instruction.device
    return None
