"""A dry run: drive the unchanged state machine on a simulated clock.

This is a tiny discrete-event loop with a heap.  Each simulated device runs
what it was dispatched first in, first out; a tile takes its transfer +
compute estimate on that device at its *actual* speed, which may differ from
what the scheduler believes (``hidden_slowdown``), so tests can show that
stealing copes with a device that is slower than its profile.  Scripted
events (``DeviceSlow``, ``DeviceLost``, ``DeviceJoined``, ``Tick``) are fed in
at their timestamps and also change the simulated fleet.

It proves the scheduler needs nothing but events: the Ray shell and this loop
call the same ``handle`` and obey the same instructions.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.events import (
    Cancel,
    Complete,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    Event,
    FailFrame,
    FrameSubmitted,
    Instruction,
    RunTail,
    TailDone,
    TileDone,
)
from scheduler.model import DeviceInfo, FrameSpec, TileKey
from scheduler.placement import compute_s, tail_cost_s, tile_cost_s
from scheduler.records import DeviceStats
from scheduler.state import Scheduler

Job = tuple[str, TileKey]
"""``("tile", key)`` or ``("tail", (frame_id, -1, -1))``."""


@dataclass(frozen=True, slots=True)
class SimResult:
    """What a dry run produced.

    ``assignments`` maps each tile to the device whose result was accepted;
    ``makespan`` is when the last frame ended; ``ended`` maps a frame to its
    end time; ``instructions`` are all instructions in the order emitted.
    """

    assignments: dict[TileKey, str]
    makespan: float
    completed: tuple[int, ...]
    failed: dict[int, str]
    ended: dict[int, float]
    stats: dict[str, DeviceStats]
    instructions: tuple[Instruction, ...]
    events: int


@dataclass(slots=True)
class _SimDevice:
    info: DeviceInfo
    speed: float
    alive: bool = True
    generation: int = 0
    queue: deque[Job] = field(default_factory=deque)
    current: Job | None = None


@dataclass(order=True, slots=True)
class _Pending:
    t: float
    seq: int
    event: Event = field(compare=False)
    device: str | None = field(compare=False, default=None)
    generation: int = field(compare=False, default=-1)


class _Loop:
    def __init__(
        self,
        sched: Scheduler,
        frames: Mapping[int, FrameSpec],
        hidden: Mapping[str, float],
        validate: bool,
    ) -> None:
        self.sched = sched
        self.frames = frames
        self.hidden = hidden
        self.validate = validate
        self.heap: list[_Pending] = []
        self.seq = 0
        self.devices: dict[str, _SimDevice] = {}
        self.announced: dict[str, float] = {}
        self.assignments: dict[TileKey, str] = {}
        self.ended: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.completed: list[int] = []
        self.instructions: list[Instruction] = []
        self.count = 0

    def push(self, t: float, event: Event, device: str | None = None, generation: int = -1) -> None:
        self.seq += 1
        heapq.heappush(self.heap, _Pending(t, self.seq, event, device, generation))

    # ------------------------------------------------------------ simulated fleet

    def _actual_speed(self, d: str) -> float:
        return self.announced.get(d, 1.0) * self.hidden.get(d, 1.0)

    def _start_next(self, dev: _SimDevice, now: float) -> None:
        if dev.current is not None or not dev.queue or not dev.alive:
            return
        job = dev.queue.popleft()
        dev.current = job
        speed = self._actual_speed(dev.info.id)
        kind, key = job
        done: Event
        if kind == "tile":
            spec = next(t for t in self.frames[key[0]].tiles if (t.stage, t.index) == key[1:])
            cost = tile_cost_s(spec, dev.info, speed)
            busy = compute_s(spec.flops, dev.info, speed)
            done = TileDone(key, dev.info.id, now + cost, busy, spec.in_bytes, spec.out_bytes)
        else:
            frame = self.frames[key[0]]
            cost = tail_cost_s(frame, dev.info, speed)
            done = TailDone(
                key[0], dev.info.id, now + cost, compute_s(frame.tail_flops, dev.info, speed)
            )
        self.push(now + cost, done, dev.info.id, dev.generation)

    def _apply_to_fleet(self, event: Event, now: float) -> None:
        if isinstance(event, DeviceJoined):
            d = event.device.id
            old = self.devices.get(d)
            if old is not None and old.alive:
                return  # duplicate announcement: the scheduler ignores it too
            generation = 0 if old is None else old.generation + 1
            self.devices[d] = _SimDevice(event.device, 1.0, generation=generation)
            self.announced[d] = 1.0
        elif isinstance(event, DeviceLost) and event.device_id in self.devices:
            dev = self.devices[event.device_id]
            dev.alive, dev.current = False, None
            dev.queue.clear()
            dev.generation += 1
        elif isinstance(event, DeviceSlow):
            self.announced[event.device_id] = event.factor

    def _obey(self, instructions: list[Instruction], now: float) -> None:
        for ins in instructions:
            self.instructions.append(ins)
            if isinstance(ins, Dispatch):
                dev = self.devices[ins.device]
                dev.queue.append(("tile", ins.key))
                self._start_next(dev, now)
            elif isinstance(ins, Cancel):
                dev = self.devices[ins.device]
                if ("tile", ins.key) in dev.queue:
                    dev.queue.remove(("tile", ins.key))
            elif isinstance(ins, RunTail):
                dev = self.devices[ins.device]
                dev.queue.append(("tail", (ins.frame_id, -1, -1)))
                self._start_next(dev, now)
            elif isinstance(ins, Complete):
                self.completed.append(ins.frame_id)
                self.ended[ins.frame_id] = now
            elif isinstance(ins, FailFrame):
                self.failed[ins.frame_id] = ins.reason
                self.ended[ins.frame_id] = now

    # ------------------------------------------------------------------- the loop

    def run(self, max_events: int) -> None:
        while self.heap and self.count < max_events:
            item = heapq.heappop(self.heap)
            event, now = item.event, item.t
            if item.device is not None:
                dev = self.devices[item.device]
                if not dev.alive or dev.generation != item.generation:
                    continue  # completion from a device that was lost meanwhile
                dev.current = None
                self._start_next(dev, now)
            else:
                self._apply_to_fleet(event, now)
            self.count += 1
            produced = self.sched.handle(event)
            if self.validate:
                self.sched.validate()
            if (
                isinstance(event, TileDone)
                and event.key not in self.assignments
                and self.sched.accepted(event.key) == event.device
            ):
                self.assignments[event.key] = event.device
            self._obey(produced, now)


def simulate(
    devices: Sequence[DeviceInfo],
    frames: Sequence[FrameSpec],
    *,
    scheduler: Scheduler | None = None,
    submit_times: Sequence[float] | None = None,
    hidden_slowdown: Mapping[str, float] | None = None,
    script: Sequence[Event] = (),
    validate: bool = False,
    max_events: int = 1_000_000,
) -> SimResult:
    """Run ``frames`` on ``devices`` with a fresh (or the given) scheduler.

    Devices join at t=0, frames are submitted at ``submit_times`` (all at 0 by
    default), ``script`` events fire at their own ``t``.  ``hidden_slowdown``
    makes a device really run that many times slower without telling the
    scheduler.  ``validate=True`` checks the invariants after every event.
    """
    sched = scheduler if scheduler is not None else Scheduler()
    loop = _Loop(sched, {f.frame_id: f for f in frames}, hidden_slowdown or {}, validate)
    for info in devices:
        loop.push(0.0, DeviceJoined(info, 0.0))
    times = list(submit_times) if submit_times is not None else [0.0] * len(frames)
    if len(times) != len(frames):
        raise ValueError("submit_times must have one entry per frame")
    for frame, t in zip(frames, times, strict=True):
        loop.push(t, FrameSubmitted(frame, t))
    for event in script:
        loop.push(event.t, event)
    loop.run(max_events)
    return SimResult(
        assignments=dict(sorted(loop.assignments.items())),
        makespan=max(loop.ended.values(), default=0.0),
        completed=tuple(loop.completed),
        failed=dict(loop.failed),
        ended=dict(loop.ended),
        stats=sched.stats(),
        instructions=tuple(loop.instructions),
        events=loop.count,
    )
