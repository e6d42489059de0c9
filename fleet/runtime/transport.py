"""What the driver needs of a world (a transport that moves work to devices, and a clock) and of a
deployment (the work of each tile and tail).

The driver (:mod:`fleet.runtime.driver`) is the same code on Ray and in the simulator; only the
transport and the clock differ. A deployment is a tiling plan on both
(:class:`~fleet.runtime.deployment.DeploymentState`); the simulator can also run bare
:class:`scheduler.FrameSpec` frames (:class:`sims.specs.SpecDeployment`) when a test needs exact
control of every tile's cost. A transport carries out work and reports back by calling the driver's
``on_report`` / ``on_tail_report`` / ``on_device_lost`` on the driver's own thread (Ray: the loop
of :mod:`fleet.runtime.loop`; the simulator: its event heap). Results stay where they were made:
the transport hands the driver an opaque *handle* per accepted tile (an object reference on Ray, a
token in the simulator), and the driver passes handles back when later work needs those outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from scheduler import FrameSpec, TileKey, TileRef
from tiling.geometry import Box
from tiling.reduce import ReducePoint
from workers.report import Cost

if TYPE_CHECKING:
    from .stats import DeploymentStats

Part = tuple[Box, Any, str]  # (box of the producer's output, handle of the producer's payload, output name)
Piece = tuple[Box, Any, int]  # (box, handle of the exporting tile's payload, index of the exported piece)


@dataclass(frozen=True)
class TileWork:
    """One tile to run: where each of its inputs comes from, and what it costs."""

    deployment: str
    key: TileKey
    frame: Any  # the frame batch (numpy on Ray; None in the simulator)
    frame_boxes: dict[str, Box]  # stage inputs cut from the frame itself
    sources: dict[str, list[Part]]  # stage inputs assembled from earlier tiles' outputs
    pieces: dict[str, list[Piece]]  # reuse pieces exported by neighbours (checkerboard reuse)
    cost: Cost
    reuse_in_bytes: int = 0  # bytes of ``pieces`` (the simulator charges them; Ray measures them)
    # reduce point -> (the point, handles of every tile whose partial combines into it, in tile order)
    reduced: dict[str, tuple[ReducePoint, list[Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TailWork:
    """The layers after the last fused stage, run whole on one device."""

    deployment: str
    frame_id: int
    parts: dict[str, list[Part]]  # last-stage outputs, by tile
    shapes: dict[str, tuple[int, ...]]  # (C, H, W) of each stitched output
    frame: Any  # given to the tail when it reads the frame itself, else None
    frame_name: str | None
    cost: Cost


@dataclass
class Gather:
    """How to assemble a frame's result where no tail runs: the last stage's outputs by tile."""

    parts: dict[str, list[Part]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class Transport(Protocol):
    """Moves work to devices and results back (Ray actors, or the simulated device model)."""

    def load(self, deployment: Any, devices: list[str]) -> None:
        """Give these devices a deployment's weights (blocking until they hold them)."""

    def unload(self, deployment: str, devices: list[str]) -> None: ...

    def dispatch(self, device: str, work: TileWork) -> None: ...

    def run_tail(self, device: str, work: TailWork) -> None: ...

    def cancel(self, key: TileKey, device: str) -> None:
        """Best effort: a queued copy that was re-placed elsewhere."""

    def forget(self, device: str) -> None:
        """The device is lost: drop whatever is still pending there (no report will be delivered)."""

    def result(self, deployment: Any, gather: Gather | None, tail_handle: Any) -> Any:
        """The frame's result: the tail's output (``tail_handle``), or the last stage stitched and
        finished in the client. The simulator computes no tensors and returns None."""

    def accepted(self, device: str) -> None:
        """A result of this device was accepted (Ray: counted per node for ``tilefleet devices``)."""


class Clock(Protocol):
    """Now, and timers (Ray: monotonic seconds and a timer heap; the simulator: its event heap)."""

    def now(self) -> float: ...

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None: ...


class Deployed(Protocol):
    """What the driver asks of a deployment: each frame's spec for the scheduler, the work of each
    tile and tail for the transport, and how the result is assembled; it keeps the statistics."""

    id: str
    stats: DeploymentStats
    closed: bool

    @property
    def weight_bytes(self) -> int: ...

    def frame_spec(self, fid: int) -> FrameSpec: ...

    def tile_work(self, key: TileKey, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TileWork:
        """``results``: the handle of every accepted tile of the frame; ``placed``: where each ran
        (this tile included)."""

    def tail_work(self, fid: int, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TailWork | None:
        """None: nothing to compute after the last stage."""

    def gather(self, results: Mapping[TileRef, Any]) -> Gather | None:
        """None: the tail's output is the result."""
