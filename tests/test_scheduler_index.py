"""The fleet indexes answer exactly what a scan of every device would.

``validate()`` recomputes every index from the records after each event (``check_index``); the
histories here are built to stress them: several interchangeable devices per class (so heap
ties and lazy deletion matter), memory budgets that exclude some tiles, clock jumps past the
estimated end of running tiles (static -> floating entries), slowdowns that move devices
between classes, losses with and without their results, and rejoins.  Then the indexed
placement and steal choices are compared with brute force on the same states.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduler import (
    DeviceInfo,
    DeviceJoined,
    DeviceLost,
    DeviceSlow,
    Dispatch,
    Event,
    FrameSpec,
    FrameSubmitted,
    Instruction,
    RunTail,
    Scheduler,
    TailDone,
    Tick,
    TileDone,
    TileFailed,
    TileKey,
    TileSpec,
)
from scheduler.invariants import brute_queue, ready_ns
from scheduler.placement import best_device_ns, effective_gflops
from scheduler.stealing import Steal, Thief, choose_steal_ns
from scheduler.testing import GB, device

pytestmark = pytest.mark.unit

CLASSES = [(1.0, 10**6), (2.0, 10**6), (2.0, 700), (8.0, 10**6)]  # (gflops, memory)


@st.composite
def class_fleets(draw: st.DrawFn) -> list[DeviceInfo]:
    """Up to 12 devices drawn from a few classes, so most have an identical twin."""
    n = draw(st.integers(2, 12))
    out = []
    for i in range(n):
        gflops, memory = draw(st.sampled_from(CLASSES))
        out.append(device(f"d{i:02d}", gflops, memory_bytes=memory, overhead_s=0.01))
    return out


def grid(frame_id: int, tiles: int, peak: int, weights: int, deployment: str) -> FrameSpec:
    specs = tuple(
        TileSpec(0, i, GB // (1 + i % 3), 1_000 * (1 + i % 2), 100, peak) for i in range(tiles)
    )
    return FrameSpec(frame_id, specs, (weights,), GB // 10, deployment=deployment)


class Driver:
    """An honest shell that answers in random order and validates after every event."""

    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        self.now = 0.0
        self.tiles: list[tuple[TileKey, str]] = []
        self.tails: list[tuple[int, str]] = []
        self.alive: set[str] = set()

    def send(self, event: Event) -> list[Instruction]:
        out = self.s.handle(event)
        self.s.validate()
        for ins in out:
            if isinstance(ins, Dispatch):
                self.tiles.append((ins.key, ins.device))
            elif isinstance(ins, RunTail):
                self.tails.append((ins.frame_id, ins.device))
        cancelled = {(i.key, i.device) for i in out if type(i).__name__ == "Cancel"}
        self.tiles = [t for t in self.tiles if t not in cancelled]
        return out

    def lose(self, d: str, results_lost: bool) -> None:
        self.alive.discard(d)
        self.tiles = [t for t in self.tiles if t[1] != d]
        self.tails = [t for t in self.tails if t[1] != d]
        self.send(DeviceLost(d, self.now, results_lost=results_lost))


def run_history(
    data: st.DataObject, fleet: list[DeviceInfo], sched: Scheduler, steps: int, burst: int = 0
) -> Driver:
    drv = Driver(sched)
    for info in fleet:
        drv.alive.add(info.id)
        drv.send(DeviceJoined(info, 0.0))
    lost: dict[str, DeviceInfo] = {}
    for frame_id in range(1, burst + 1):  # enough work to queue up on every device
        drv.send(FrameSubmitted(grid(frame_id, 9, 0, 0, "a"), 0.0))
    frame_id = burst
    for _ in range(steps):
        # Big jumps let running tiles overrun their estimate (static -> floating entries).
        drv.now += data.draw(st.sampled_from([0.0, 0.05, 0.4, 1.0, 3.0]), label="dt")
        actions = ["submit", "tick", "join", "lose", "slow"]
        actions += ["tile"] * 6 * bool(drv.tiles) + ["fail"] * bool(drv.tiles)
        actions += ["tail"] * 3 * bool(drv.tails)
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "submit":
            frame_id += 1
            tiles = data.draw(st.sampled_from([1, 4, 9]), label="tiles")
            peak = data.draw(st.sampled_from([0, 100, 400]), label="peak")
            weights = data.draw(st.sampled_from([0, 200]), label="weights")
            model = data.draw(st.sampled_from(["a", "b"]), label="model")
            drv.send(FrameSubmitted(grid(frame_id, tiles, peak, weights, model), drv.now))
        elif action in ("tile", "fail"):
            key, dev = drv.tiles.pop(data.draw(st.integers(0, len(drv.tiles) - 1), label="which"))
            if action == "tile":
                drv.send(TileDone(key, dev, drv.now, compute_s=data.draw(st.sampled_from([0.0, 0.5]))))
            else:
                drv.send(TileFailed(key, dev, drv.now, "oom"))
        elif action == "tail":
            fid, dev = drv.tails.pop(data.draw(st.integers(0, len(drv.tails) - 1), label="tail"))
            drv.send(TailDone(fid, dev, drv.now))
        elif action == "tick":
            drv.send(Tick(drv.now))
        elif action == "join" and lost:
            info = lost.pop(data.draw(st.sampled_from(sorted(lost)), label="back"))
            drv.alive.add(info.id)
            drv.send(DeviceJoined(info, drv.now))
        elif action == "lose" and len(drv.alive) > 1:
            d = data.draw(st.sampled_from(sorted(drv.alive)), label="lost")
            lost[d] = next(i for i in fleet if i.id == d)
            drv.lose(d, data.draw(st.booleans(), label="results lost"))
        elif action == "slow" and drv.alive:
            d = data.draw(st.sampled_from(sorted(drv.alive)), label="slowed")
            drv.send(DeviceSlow(d, data.draw(st.sampled_from([1.0, 2.0, 4.0])), drv.now))
    return drv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=class_fleets(), max_in_flight=st.integers(1, 3), data=st.data())
def test_random_histories_keep_the_indexes_exact(
    fleet: list[DeviceInfo], max_in_flight: int, data: st.DataObject
) -> None:
    sched = Scheduler(max_in_flight_per_device=max_in_flight, max_retries=5, log_size=200)
    run_history(data, fleet, sched, steps=60)  # validate() after every event is the assertion


def brute_steal(s: Scheduler) -> tuple[str, Steal] | None:
    """Every thief in (fastest, earliest free, id) order against every victim."""
    alive = [d for d in s._devices.values() if d.alive]
    queues = [brute_queue(s, d) for d in alive if d.planned]
    thieves = sorted(
        (d for d in alive if not d.planned and len(d.in_flight) < s.max_in_flight_per_device),
        key=lambda d: (-effective_gflops(d.info, d.speed), ready_ns(s, d), d.id),
    )
    for d in thieves:
        steal = choose_steal_ns(Thief(d.info, d.speed, ready_ns(s, d)), queues, skip_unfit=True)
        if steal is not None:
            return d.id, steal
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=class_fleets(),
    stealing=st.booleans(),
    probes=st.lists(
        st.tuples(st.sampled_from([GB // 7, GB, 3 * GB]), st.sampled_from([0, 10**5]),
                  st.sampled_from([0, 500, 900])),
        min_size=1,
        max_size=5,
    ),
    data=st.data(),
)
def test_indexed_choices_equal_brute_force(
    fleet: list[DeviceInfo],
    stealing: bool,
    probes: list[tuple[int, int, int]],
    data: st.DataObject,
) -> None:
    # Without stealing the planned queues stay unbalanced, so there is a steal to choose.
    sched = Scheduler(max_in_flight_per_device=2, work_stealing=stealing, log_size=200)
    drv = run_history(data, fleet, sched, steps=data.draw(st.integers(0, 30), label="steps"), burst=3)
    # Drain some devices only: they go idle while the others keep their queues.
    draining = set(data.draw(st.lists(st.sampled_from(sorted(drv.alive)), min_size=1, max_size=4), label="drain"))
    for _ in range(data.draw(st.integers(5, 30), label="drain steps")):
        mine = [t for t in drv.tiles if t[1] in draining]
        if not mine:
            break
        drv.tiles.remove(mine[0])
        drv.now += 0.01
        drv.send(TileDone(mine[0][0], mine[0][1], drv.now))
    alive = [d for d in sched._devices.values() if d.alive]
    for flops, in_bytes, need in probes:
        tile = TileSpec(0, 0, flops, in_bytes, 0, need)
        want = best_device_ns(tile, need, [(d.info, d.speed, ready_ns(sched, d)) for d in alive])
        got = sched._index.best(tile, need, sched._now_ns)
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert got[0] == want[0]
    chosen = sched._choose_steal()
    assert chosen == brute_steal(sched)
    event(f"a steal to choose: {chosen is not None}")
    event(f"devices moving with the clock: {any(d.alive and d.in_flight and (d.run_end_ns or 0) <= sched._now_ns for d in alive)}")


def test_interchangeable_devices_tie_to_the_smallest_id() -> None:
    """Twenty identical idle devices: the heap's tie-break is the objective's (smallest id)."""
    s = Scheduler(max_in_flight_per_device=1)
    s.handle(*(DeviceJoined(device(f"d{i:02d}"), 0.0) for i in reversed(range(20))))
    out = s.handle(FrameSubmitted(grid(1, 4, 0, 0, ""), 0.0))
    assert [i.device for i in out if isinstance(i, Dispatch)] == ["d00", "d01", "d02", "d03"]
    s.validate()


def test_an_overdue_device_moves_with_the_clock() -> None:
    """A running tile past its estimate keeps the device busy 'from now on': placement must see
    its ready time move, not the stale estimate (the expiry heap re-files it)."""
    s = Scheduler(max_in_flight_per_device=1)
    s.handle(DeviceJoined(device("a"), 0.0), DeviceJoined(device("b", 0.5), 0.0))
    assert s.handle(FrameSubmitted(grid(1, 1, 0, 0, ""), 0.0)) == [Dispatch((1, 0, 0), "a")]
    s.handle(Tick(5.0))  # a's 1 s tile is 4 s overdue: a is ready at now + 0, b too
    s.validate()
    assert s._index.best(TileSpec(0, 0, GB, 0, 0, 0), 0, s._now_ns) is not None
    assert ready_ns(s, s._devices["a"]) == s._now_ns
