"""Small factories for tests and demos of the scheduler.

Kept in the package (not in a conftest) so the shell's and the simulator's
tests can build the same fleets and frames.  The defaults make arithmetic
easy: a 1 GFLOP/s device, 1e9-FLOP tiles, and a link so fast that transfers
cost nothing, so a tile takes exactly 1 s and instruction lists in tests are
predictable by hand.
"""

from __future__ import annotations

from scheduler.events import Event, Instruction
from scheduler.model import DeviceInfo, FrameSpec, TileRef, TileSpec
from scheduler.state import Scheduler

GB = 10**9
"""1e9: used both for FLOPs and bytes in tests."""


def device(
    device_id: str,
    gflops: float = 1.0,
    *,
    memory_bytes: int = 8 * GB,
    overhead_s: float = 0.0,
    link_bps: float = 1e15,
    latency_s: float = 0.0,
    gpu: bool = False,
    klass: str = "",
) -> DeviceInfo:
    """A device profile with test-friendly defaults (free, instant link)."""
    return DeviceInfo(device_id, gflops, overhead_s, memory_bytes, link_bps, latency_s, gpu, klass)


def independent_frame(
    frame_id: int,
    n: int,
    *,
    flops: int = GB,
    in_bytes: int = 0,
    out_bytes: int = 0,
    peak_bytes: int = 0,
    weights: int = 0,
    tail_flops: int = 0,
    deployment: str = "",
) -> FrameSpec:
    """One stage of ``n`` tiles without deps: the MoDNN map case."""
    tiles = tuple(TileSpec(0, i, flops, in_bytes, out_bytes, peak_bytes) for i in range(n))
    return FrameSpec(frame_id, tiles, (weights,), tail_flops, deployment=deployment)


def layered_frame(
    frame_id: int,
    stages: int,
    width: int,
    *,
    flops: int = GB,
    peak_bytes: int = 0,
    weights: int = 0,
    halo: int = 1,
    tail_flops: int = 0,
) -> FrameSpec:
    """``stages`` x ``width`` tiles where tile ``(s, i)`` needs the previous
    stage's tiles ``i-halo .. i+halo``: DeepThings' fused tile pyramid."""
    tiles: list[TileSpec] = []
    for s in range(stages):
        for i in range(width):
            deps: tuple[TileRef, ...] = ()
            if s > 0:
                deps = tuple((s - 1, j) for j in range(max(0, i - halo), min(width, i + halo + 1)))
            tiles.append(TileSpec(s, i, flops, 0, 0, peak_bytes, deps))
    return FrameSpec(frame_id, tuple(tiles), (weights,) * stages, tail_flops)


class Checked:
    """A scheduler whose every ``handle`` is followed by ``validate()``."""

    def __init__(
        self,
        scheduler: Scheduler | None = None,
        *,
        max_in_flight_per_device: int = 2,
        max_retries: int = 3,
        work_stealing: bool = True,
    ) -> None:
        self.s = scheduler or Scheduler(
            max_in_flight_per_device=max_in_flight_per_device,
            max_retries=max_retries,
            work_stealing=work_stealing,
        )

    def __call__(self, *events: Event) -> list[Instruction]:
        out = self.s.handle(*events)
        self.s.validate()
        return out
