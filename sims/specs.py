"""Hand-made frames on the simulated fleet: the scheduler's own tests, on the real driver.

The scheduler is tested with frames whose every tile has a cost chosen by hand
(:mod:`scheduler.testing`: a 1 GFLOP tile on a 1 GFLOP/s device takes exactly 1 s), on devices
given as :class:`scheduler.DeviceInfo`. Those frames have no tiling plan behind them, so they run
through :class:`SpecDeployment`: the driver asks it for each tile's work as it asks a plan, and the
simulated transport charges the tile's FLOPs and bytes on the device model. Everything else is
:func:`sims.simulate.simulate`: the same driver, the same event heap, the same faults.

    run = simulate_specs([device("a"), device("b")], [independent_frame(0, 8)],
                         hidden_slowdown={"a": 5.0}, validate=True)
    run.makespan, run.assignments, run.device_stats["a"].steals

Frames run in list order: frame ``i`` of the list is the driver's frame ``i`` (its own
``frame_id`` is replaced), submitted at ``submit_times[i]``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scheduler import DeviceInfo, FrameSpec, TileKey, TileRef, TileSpec
from workers.report import Cost

from .catalog import DeviceSpec, Profile
from .simulate import Scenario, ScenarioEvent, SimRun, simulate

if TYPE_CHECKING:
    from fleet.runtime.stats import DeploymentStats
    from fleet.runtime.transport import TailWork, TileWork


def device_spec(info: DeviceInfo) -> DeviceSpec:
    """The simulator's device for a scheduler profile: the same figures and no runtime overhead, so
    ``device_spec(info).info()`` is ``info`` (with ``klass`` "test" where it had none: a profile names
    its class)."""
    return DeviceSpec(info.id, Profile(
        name=info.klass or info.id, gflops=info.gflops, tile_overhead_s=info.tile_overhead_s,
        memory_bytes=info.memory_bytes, runtime_overhead_bytes=0, gpu=info.gpu, link_mbps=info.link_bps * 8 / 1e6,
        latency_s=info.latency_s, klass=info.klass or "test", source="a scheduler.DeviceInfo (sims.specs)"))


@dataclass
class SpecDeployment:
    """A deployment of bare :class:`FrameSpec` frames: each tile costs what its spec says (its input
    is charged in full wherever its producers ran), and nothing is computed."""

    frames: Sequence[FrameSpec]
    id: str = "specs"
    closed: bool = False
    stats: DeploymentStats = field(init=False)
    _tiles: dict[int, dict[TileRef, TileSpec]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from fleet.runtime.stats import DeploymentStats

        self.stats = DeploymentStats()

    @property
    def weight_bytes(self) -> int:
        return max((sum(f.stage_weights_bytes) for f in self.frames), default=0)

    def frame_spec(self, fid: int) -> FrameSpec:
        if fid >= len(self.frames):
            raise IndexError(f"frame {fid}: this deployment has {len(self.frames)} frames")
        return dataclasses.replace(self.frames[fid], frame_id=fid)

    def tile_work(self, key: TileKey, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TileWork:
        from fleet.runtime.transport import TileWork

        tiles = self.frames[key[0]].tiles
        by_ref = self._tiles.get(id(tiles))
        if by_ref is None:  # frames usually share one tuple of tiles: index it once
            by_ref = self._tiles[id(tiles)] = {t.ref: t for t in tiles}
        tile = by_ref[key[1:]]
        return TileWork(self.id, key, None, {}, {}, {}, Cost(tile.flops, tile.in_bytes, tile.out_bytes))

    def tail_work(self, fid: int, device: str, x: Any, results: Mapping[TileRef, Any],
                  placed: Mapping[TileRef, str]) -> TailWork:
        from fleet.runtime.transport import TailWork

        spec = self.frames[fid]
        return TailWork(self.id, fid, {}, {}, None, None, Cost(spec.tail_flops, spec.tail_in_bytes, spec.out_bytes))

    def gather(self, results: Mapping[TileRef, Any]) -> None:
        return None  # nothing is computed: the result is None


def simulate_specs(devices: Sequence[DeviceInfo], frames: Sequence[FrameSpec], *,
                   submit_times: Sequence[float] | None = None, hidden_slowdown: Mapping[str, float] | None = None,
                   scenario: Scenario | None = None, learn_speed: bool = False, work_stealing: bool = True,
                   speculate_after: float | None = None, max_in_flight_per_device: int = 2, max_retries: int = 3,
                   validate: bool = False, in_flight: int | None = None, **kw: Any) -> SimRun:
    """Run ``frames`` on ``devices`` through the real driver on the simulated transport.

    Frames arrive at ``submit_times`` (all at 0 by default; nondecreasing), or closed-loop
    ``in_flight`` at a time. ``hidden_slowdown`` makes a device really that many times slower from
    the start without telling the scheduler; ``scenario`` kills, slows (``announce=True``: told),
    revives or adds devices (build a joining device's spec with :func:`device_spec`). No dispatch
    cost is added, so a tile takes exactly what its spec costs on the device model. The scheduler's
    own policies stay off unless asked for (``learn_speed``, ``speculate_after``), so a test sees
    placement and stealing alone. Other keywords go to
    :func:`~sims.simulate.simulate` (``faults``, ``seed``, ``trace``, ``shared_link_mbps``, ...).
    """
    if in_flight is None:
        times = list(submit_times) if submit_times is not None else [0.0] * len(frames)
        if len(times) != len(frames):
            raise ValueError(f"submit_times must have one entry per frame: {len(times)} times, {len(frames)} frames")
        if any(b < a for a, b in itertools.pairwise(times)):
            raise ValueError("submit_times must be nondecreasing: frame i of the list is submitted i-th")
        kw["arrivals"] = times
    elif submit_times is not None:
        raise ValueError("give submit_times or in_flight, not both")
    specs = [device_spec(d) for d in devices]
    events = [ScenarioEvent(0.0, "slow", d, factor=f) for d, f in (hidden_slowdown or {}).items()]
    events += scenario.events if scenario else []
    return simulate(SpecDeployment(list(frames)), specs, frames=len(frames), in_flight=in_flight or 1,
                    scenario=Scenario(events), dispatch_s=kw.pop("dispatch_s", 0.0),
                    report_s=kw.pop("report_s", 0.0), learn_speed=learn_speed,
                    speculate_after=speculate_after, work_stealing=work_stealing, max_in_flight_per_device=max_in_flight_per_device,
                    max_retries=max_retries, validate=validate, record=kw.pop("record", True), **kw)
