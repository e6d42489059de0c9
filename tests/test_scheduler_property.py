"""Property test: any fleet, any frames, any order of results and mishaps.

A randomised shell answers the scheduler's instructions in random order,
sometimes fails tiles, loses, slows and adds devices, and replays late or
duplicate results.  Whatever happens: ``validate()`` passes after every
event, nothing deadlocks, every frame ends exactly once, ``Stitch`` comes
once per stage after all its tiles were accepted, and ``Complete`` only
when every tile was accepted exactly once.
"""

from __future__ import annotations

import dataclasses

from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduler import (
    Cancel,
    Complete,
    DeviceBudget,
    DeviceInfo,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    Event,
    FailFrame,
    FrameCancelled,
    FrameSpec,
    FrameSubmitted,
    Instruction,
    RunTail,
    Scheduler,
    Stitch,
    TailDone,
    TailFailed,
    TileDone,
    Tick,
    TileFailed,
    TileKey,
    TileRef,
    TileSpec,
)
from scheduler.testing import GB, device

pytestmark = pytest.mark.unit


@st.composite
def fleets(draw: st.DrawFn) -> list[DeviceInfo]:
    n = draw(st.integers(1, 4))
    return [
        device(
            f"d{i}",
            draw(st.sampled_from([1.0, 2.0, 4.0, 12.0])),
            memory_bytes=draw(st.sampled_from([600, 2_000, 10**6])),
            gpu=draw(st.booleans()),
            overhead_s=draw(st.sampled_from([0.0, 0.01])),
        )
        for i in range(n)
    ]


@st.composite
def frames(draw: st.DrawFn, frame_id: int) -> FrameSpec:
    stages = draw(st.integers(1, 3))
    tiles: list[TileSpec] = []
    widths: list[int] = []
    for s in range(stages):
        width = draw(st.integers(1, 4))
        for i in range(width):
            deps: tuple[TileRef, ...] = ()
            if s > 0:
                prev = [(s - 1, j) for j in range(widths[-1])]
                deps = tuple(draw(st.lists(st.sampled_from(prev), max_size=3, unique=True)))
            peak = draw(st.sampled_from([0, 100, 300]))
            pin = deps[0] if deps and draw(st.booleans()) else None  # continues on maps held there
            tiles.append(
                TileSpec(s, i, draw(st.sampled_from([GB // 10, GB])), 1_000, 100, peak, deps, pin=pin)
            )
        widths.append(width)
    held = draw(st.sampled_from([0, 50, 200]))
    pinned = {t.pin for t in tiles if t.pin is not None}
    tiles = [dataclasses.replace(t, held_bytes=held) if t.ref in pinned else t for t in tiles]
    weights = tuple(draw(st.sampled_from([0, 200, 500])) for _ in range(stages))
    model = draw(st.sampled_from(["", "other"]))
    return FrameSpec(
        frame_id, tuple(tiles), weights, GB, out_bytes=draw(st.sampled_from([0, 50])), deployment=model
    )


class Shell:
    """A random but honest shell: it only reports on work it was given,
    plus deliberate late duplicates."""

    def __init__(self, sched: Scheduler, specs: dict[int, FrameSpec]) -> None:
        self.s = sched
        self.specs = specs
        self.now = 0.0
        self.tiles: list[tuple[TileKey, str]] = []  # dispatched, not answered, device alive
        self.tails: list[tuple[int, str]] = []
        self.stale: list[Event] = []  # results nobody should accept any more
        self.ended: Counter[int] = Counter()
        self.stitched: Counter[tuple[int, int]] = Counter()
        self.accepted: dict[TileKey, str] = {}
        self.tail_started: set[int] = set()
        self.alive: set[str] = set()
        self.rerun = 0  # accepted results lost with their device and accepted again later

    def send(self, event: Event) -> None:
        before = self.s.accepted(event.key) if isinstance(event, TileDone) else None
        expected = isinstance(event, TileDone) and self.s.expects(event.key, event.device)
        out = self.s.handle(event)
        self.s.validate()
        if isinstance(event, TileDone):
            now = self.s.accepted(event.key)
            assert expected == (before is None and now is not None), "expects() lied"
            if before is None and now is not None:
                assert now == event.device
                assert event.key not in self.accepted, f"{event.key} accepted twice"
                self.accepted[event.key] = now
            else:
                assert now == before, f"{event.key} re-accepted from {now}"
        self.obey(out)
        total_done = sum(st.tiles_done for st in self.s.stats().values())
        assert total_done == len(self.accepted) + self.rerun, "a result was accepted twice"

    def obey(self, out: list[Instruction]) -> None:
        for ins in out:
            if isinstance(ins, Dispatch):
                assert ins.device in self.alive
                assert self.ended[ins.key[0]] == 0, f"dispatch for ended frame {ins.key[0]}"
                self.tiles.append((ins.key, ins.device))
            elif isinstance(ins, Cancel):
                self.tiles.remove((ins.key, ins.device))
                self.stale.append(TileDone(ins.key, ins.device, self.now))
            elif isinstance(ins, Stitch):
                self.stitched[(ins.frame_id, ins.stage)] += 1
                assert self.stitched[(ins.frame_id, ins.stage)] == 1, f"stitched twice: {ins}"
                spec = self.specs[ins.frame_id]
                for t in spec.tiles:
                    if t.stage == ins.stage:
                        assert (ins.frame_id, t.stage, t.index) in self.accepted
            elif isinstance(ins, RunTail):
                spec = self.specs[ins.frame_id]
                for stage in spec.stages:
                    assert self.stitched[(ins.frame_id, stage)] == 1, "tail before stitching"
                self.tails.append((ins.frame_id, ins.device))
            elif isinstance(ins, Complete):
                self.ended[ins.frame_id] += 1
                spec = self.specs[ins.frame_id]
                assert all((ins.frame_id, t.stage, t.index) in self.accepted for t in spec.tiles)
                assert ins.frame_id in self.tail_started
            elif isinstance(ins, FailFrame):
                self.ended[ins.frame_id] += 1
                assert ins.reason
            if isinstance(ins, (Complete, FailFrame)):
                assert self.ended[ins.frame_id] == 1, f"frame {ins.frame_id} ended twice"

    def lose(self, d: str, results_lost: bool = False) -> None:
        self.alive.discard(d)
        for key, dev in [x for x in self.tiles if x[1] == d]:
            self.tiles.remove((key, dev))
            self.stale.append(TileDone(key, dev, self.now))
        for fid, dev in [x for x in self.tails if x[1] == d]:
            self.tails.remove((fid, dev))
            self.stale.append(TailDone(fid, dev, self.now))
        self.send(DeviceLost(d, self.now, results_lost=results_lost))
        if results_lost:  # results the scheduler now runs again are no longer accepted
            for key in [k for k, dev in self.accepted.items() if dev == d and self.s.accepted(k) is None]:
                del self.accepted[key]
                self.rerun += 1
                self.stitched[(key[0], key[1])] = 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=fleets(),
    specs=st.integers(1, 3).flatmap(lambda n: st.tuples(*(frames(i) for i in range(n)))),
    max_in_flight=st.integers(1, 3),
    max_retries=st.integers(0, 2),
    data=st.data(),
)
def test_any_history_keeps_the_invariants(
    fleet: list[DeviceInfo],
    specs: tuple[FrameSpec, ...],
    max_in_flight: int,
    max_retries: int,
    data: st.DataObject,
) -> None:
    speculate = data.draw(st.sampled_from([None, 1.5, 3.0]), label="speculate_after")
    sched = Scheduler(max_in_flight_per_device=max_in_flight, max_retries=max_retries, log_size=50,
                      speculate_after=speculate)
    shell = Shell(sched, {f.frame_id: f for f in specs})
    lost: dict[str, DeviceInfo] = {}
    for info in fleet:
        shell.alive.add(info.id)
        shell.send(DeviceJoined(info, 0.0))
    to_submit = list(specs)
    mishaps = data.draw(st.integers(0, 6), label="mishaps")
    spare = 0
    for _ in range(400):
        if not to_submit and not (shell.tiles or shell.tails):
            # Nothing outstanding: every frame must have ended, or it never will.
            stuck = [f.frame_id for f in specs if not shell.ended[f.frame_id]]
            assert not stuck, f"deadlock: frames {stuck} never ended"
            break
        shell.now += data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="dt")
        # Only actions that do something, so every step makes progress.
        actions: list[str] = []
        if shell.tiles:
            actions += ["tile"] * 6
        if shell.tails:
            actions += ["tail"] * 3
        if to_submit:
            actions += ["submit"] * 3
        if speculate is not None:
            actions += ["tick"] * 3
        if mishaps > 0:
            actions += (
                ["join"] + ["lose", "slow", "budget"] * bool(shell.alive) + ["stale"] * bool(shell.stale)
            )
            actions += ["fail", "fatal"] * bool(shell.tiles) + ["tailfail"] * bool(shell.tails)
            actions += ["cancel"] * (len(to_submit) < len(specs))
        action = data.draw(st.sampled_from(actions), label="action")
        if action in ("fail", "fatal", "lose", "slow", "budget", "join", "stale", "tailfail", "cancel"):
            mishaps -= 1
        if action == "submit":
            shell.send(FrameSubmitted(to_submit.pop(0), shell.now))
        elif action == "tick":
            shell.send(Tick(shell.now))
        elif action in ("tile", "fail", "fatal") and shell.tiles:
            key, dev = shell.tiles.pop(
                data.draw(st.integers(0, len(shell.tiles) - 1), label="which")
            )
            if action == "tile":
                shell.send(
                    TileDone(
                        key, dev, shell.now, compute_s=data.draw(st.sampled_from([0.0, 0.5, 3.0]))
                    )
                )
                shell.stale.append(TileDone(key, dev, shell.now))
            else:
                shell.send(TileFailed(key, dev, shell.now, "boom", retryable=action == "fail"))
        elif action in ("tail", "tailfail") and shell.tails:
            fid, dev = shell.tails.pop(
                data.draw(st.integers(0, len(shell.tails) - 1), label="which tail")
            )
            if action == "tail":
                shell.tail_started.add(fid)
                shell.send(TailDone(fid, dev, shell.now))
                shell.stale.append(TailDone(fid, dev, shell.now))
            else:
                shell.send(
                    TailFailed(fid, dev, shell.now, "nan", retryable=data.draw(st.booleans()))
                )
        elif action == "lose" and shell.alive:
            d = data.draw(st.sampled_from(sorted(shell.alive)), label="lost")
            lost[d] = (
                next(i for i in [*fleet, *lost.values()] if i.id == d)
                if d.startswith("d")
                else device(d, 4.0)
            )
            shell.lose(d, results_lost=data.draw(st.booleans(), label="results lost"))
        elif action == "slow" and shell.alive:
            d = data.draw(st.sampled_from(sorted(shell.alive)), label="slowed")
            shell.send(DeviceSlow(d, data.draw(st.sampled_from([1.0, 2.0, 5.0])), shell.now))
        elif action == "budget" and shell.alive:
            d = data.draw(st.sampled_from(sorted(shell.alive)), label="squeezed")
            shell.send(DeviceBudget(d, data.draw(st.sampled_from([0, 300, 600, 10**6])), shell.now))
        elif action == "join":
            rejoin = data.draw(st.booleans(), label="rejoin") if lost else False
            if rejoin:
                info = lost.pop(data.draw(st.sampled_from(sorted(lost)), label="back"))
            else:
                spare += 1
                info = device(
                    f"x{spare}", 4.0, memory_bytes=data.draw(st.sampled_from([600, 10**6]))
                )
            shell.alive.add(info.id)
            shell.send(DeviceJoined(info, shell.now))
        elif action == "cancel":  # a client gives up on a submitted frame, ended or not
            submitted = [f.frame_id for f in specs if f not in to_submit]
            fid = data.draw(st.sampled_from(submitted), label="cancelled")
            shell.send(FrameCancelled(fid, shell.now, "cancelled: the client went away"))
        elif action == "stale" and shell.stale:
            shell.send(shell.stale[data.draw(st.integers(0, len(shell.stale) - 1), label="stale")])
    else:
        raise AssertionError("history did not finish in 400 steps")
    for f in specs:
        assert shell.ended[f.frame_id] == 1, (
            f"frame {f.frame_id} ended {shell.ended[f.frame_id]} times"
        )
        status = sched.frame_status(f.frame_id)
        assert status in ("completed", "failed")
    for d in sched.device_ids(alive_only=False):
        assert sched.in_flight(d) == [] and sched.planned(d) == []
    # What the generated histories covered (see --hypothesis-show-statistics).
    stats = sched.stats().values()
    completed = sum(sched.frame_status(f.frame_id) == "completed" for f in specs)
    event(f"completed {completed}/{len(specs)}")
    event(f"steals: {any(x.steals for x in stats)}")
    event(f"cancels: {any(x.cancelled for x in stats)}")
    event(f"requeued: {any(x.requeued for x in stats)}")
    event(f"retries: {sched.retries > 0}")
    event(f"speculated: {sched.speculations > 0}, a copy won: {sched.speculation_wins > 0}")
    event(f"maps held for pinned tiles: {any(x.peak_high_water for x in stats) and any(t.held_bytes for f in specs for t in f.tiles)}")
