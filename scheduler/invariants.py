"""Invariants of the scheduler's bookkeeping, checked from scratch.

Like dask's ``WorkerState.validate_state``: incremental bookkeeping is where
schedulers rot, so tests call this after every ``handle`` and it recomputes
everything (memory, counts, which device holds what) independently of the
incremental updates.  Each failed check raises ``AssertionError`` naming the
device, frame or tile and the two numbers that disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from scheduler.index import class_key
from scheduler.placement import cost_ns, tail_ns
from scheduler.records import DeviceRecord, FrameRecord, TileRecord, timing
from scheduler.stealing import PlannedTile, Queue, Thief, choose_steal_ns, make_queue

if TYPE_CHECKING:
    from scheduler.core import SchedulerCore


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _check_device(dev: DeviceRecord, frames: Mapping[int, FrameRecord], max_in_flight: int) -> None:
    d = dev.id
    if len(dev.in_flight) > max_in_flight:
        _fail(f"device {d}: {len(dev.in_flight)} tiles in flight > max {max_in_flight}")
    if len(set(dev.in_flight)) != len(dev.in_flight):
        _fail(f"device {d}: duplicate in-flight keys {dev.in_flight}")
    keys = dev.planned_keys()
    if len(set(keys)) != len(keys):
        _fail(f"device {d}: duplicate planned keys {keys}")
    if dev.planned != sorted(dev.planned):
        _fail(f"device {d}: planned queue out of priority order")
    if not dev.alive and (dev.in_flight or dev.planned or dev.tails or dev.memory_in_use()):
        _fail(f"lost device {d} still holds work or memory")
    weights: dict[tuple[str, int], int] = {}
    peak = 0
    for key in dev.in_flight:
        frame = frames.get(key[0])
        if frame is None:
            _fail(f"device {d}: in-flight tile {key} of unknown or retired frame")
            continue
        tile = frame.tiles[(key[1], key[2])]
        if tile.state != "in_flight" or d not in (tile.device, tile.backup):
            _fail(f"device {d}: in-flight tile {key} is {tile.state} on {tile.device} (copy: {tile.backup})")
        weights[tile.weight_key] = max(weights.get(tile.weight_key, 0), tile.weights)
        peak += tile.spec.peak_bytes + tile.spec.held_bytes
    for key in keys:
        frame = frames.get(key[0])
        if frame is None or frame.status != "active":
            _fail(f"device {d}: planned tile {key} of a frame that is not active")
            continue
        tile = frame.tiles[(key[1], key[2])]
        if tile.state != "planned" or tile.device != d:
            _fail(f"device {d}: planned tile {key} is {tile.state} on {tile.device}")
        if tile.missing:
            _fail(f"device {d}: planned tile {key} still waits on {sorted(tile.missing)}")
    tails = 0
    for fid, need in dev.tails.items():
        frame = frames.get(fid)
        if frame is None or frame.tail != "running" or frame.tail_device != d:
            _fail(f"device {d}: holds a tail for frame {fid} that is not running there")
        tails += need
    if tails != dev.tail_bytes:
        _fail(f"device {d}: tail bytes {dev.tail_bytes} != recomputed {tails}")
    held = {}
    for frame in frames.values():
        for t in frame.tiles.values():
            if t.holds and t.device == d:
                if frame.status != "active" or t.state != "done" or all(
                        frame.tiles[r].state == "done" for r in t.dependents if frame.tiles[r].spec.pin == t.spec.ref):
                    _fail(f"device {d}: holds maps of {t.key} that nothing needs (frame {frame.status}, tile {t.state})")
                held[t.key] = t.spec.held_bytes
    if held != dev.held or sum(held.values()) != dev.held_bytes:
        _fail(f"device {d}: held maps {dev.held} ({dev.held_bytes} B) != recomputed {held}")
    expected = sum(weights.values()) + peak + tails + sum(held.values())
    if expected != dev.memory_in_use():
        _fail(f"device {d}: memory bookkeeping {dev.memory_in_use()} != recomputed {expected}")
    if expected > dev.info.memory_bytes and not dev.overcommitted:
        _fail(f"device {d}: memory in use {expected} > budget {dev.info.memory_bytes}")


def _check_tile(tile: TileRecord, frame: FrameRecord, devices: Mapping[str, DeviceRecord]) -> None:
    k = tile.key
    if tile.backup is not None:
        copy = devices.get(tile.backup)
        if tile.state != "in_flight" or tile.backup == tile.device or copy is None or k not in copy.in_flight:
            _fail(f"tile {k} ({tile.state} on {tile.device}) has a speculative copy on {tile.backup} that "
                  "does not hold it")
    if tile.state == "in_flight":
        dev = devices.get(tile.device or "")
        if dev is None or k not in dev.in_flight:
            _fail(f"tile {k} is in flight on {tile.device} but that device does not hold it")
    elif tile.state == "planned":
        dev = devices.get(tile.device or "")
        if dev is None or k not in dev.planned_keys():
            _fail(f"tile {k} is planned on {tile.device} but not in its planned queue")
    if frame.status != "active":
        if tile.state in ("planned", "waiting"):
            _fail(f"tile {k} of ended frame {frame.frame_id} is still {tile.state}")
        return
    if tile.state == "dropped":
        _fail(f"tile {k} is dropped but frame {frame.frame_id} is active")
    undone = {dep for dep in tile.spec.deps if frame.tiles[dep].state != "done"}
    if tile.state == "done":
        undone = set()  # its inputs may run again (results lost with a device); it needs them no more
    if undone != tile.missing:
        _fail(f"tile {k}: missing deps {sorted(tile.missing)} != undone deps {sorted(undone)}")
    if tile.state != "waiting" and tile.missing:
        _fail(f"tile {k} is {tile.state} before deps {sorted(tile.missing)} are done")
    if tile.state == "waiting" and not tile.missing:
        _fail(f"tile {k} is ready but was never planned")
    if tile.state == "done" and tile.device is None:
        _fail(f"tile {k} is done but no device's result was accepted")


def _check_frame(frame: FrameRecord, devices: Mapping[str, DeviceRecord], retired: bool) -> None:
    fid = frame.frame_id
    for tile in frame.tiles.values():
        _check_tile(tile, frame, devices)
    if len(set(frame.stitched)) != len(frame.stitched):
        _fail(f"frame {fid}: a stage was stitched twice: {frame.stitched}")
    left = {
        s: sum(1 for t in frame.tiles.values() if t.spec.stage == s and t.state != "done")
        for s in frame.spec.stages
    }
    if frame.status != "failed":
        if left != {s: frame.left_in_stage.get(s, 0) for s in left}:
            _fail(f"frame {fid}: left_in_stage {frame.left_in_stage} != recomputed {left}")
        done_stages = sorted(s for s, n in left.items() if n == 0)
        if sorted(frame.stitched) != done_stages:
            _fail(
                f"frame {fid}: stitched {sorted(frame.stitched)} != complete stages {done_stages}"
            )
    all_done = all(t.state == "done" for t in frame.tiles.values())
    if frame.status == "completed":
        if not all_done or frame.tail != "done":
            _fail(f"frame {fid}: completed before every tile and the tail were done")
    elif frame.status == "active":
        if frame.tail == "blocked" and all_done:
            _fail(f"frame {fid}: every tile is done but the tail is not scheduled")
        if frame.tail != "blocked" and not all_done:
            _fail(f"frame {fid}: tail {frame.tail} while tiles remain")
        if frame.tail == "done":
            _fail(f"frame {fid}: tail done but the frame is still active")
    if frame.tail == "running":
        dev = devices.get(frame.tail_device or "")
        if dev is None or fid not in dev.tails:
            _fail(f"frame {fid}: tail running on {frame.tail_device}, which does not hold it")
    if retired:
        if frame.status == "active":
            _fail(f"frame {fid}: retired while still active")
        if any(t.state == "in_flight" for t in frame.tiles.values()) or frame.tail == "running":
            _fail(f"frame {fid}: retired while work of it still runs")
    elif frame.status != "active":
        draining = (
            any(t.state == "in_flight" for t in frame.tiles.values()) or frame.tail == "running"
        )
        if not draining:
            _fail(f"frame {fid}: ended and drained but never retired")


def check_invariants(
    devices: Mapping[str, DeviceRecord],
    frames: Mapping[int, FrameRecord],
    finished: Mapping[int, FrameRecord],
    max_in_flight: int,
) -> None:
    """Raise AssertionError if any invariant of the scheduler is broken."""
    both = set(frames) & set(finished)
    if both:
        _fail(f"frames both live and retired: {sorted(both)}")
    for dev in devices.values():
        _check_device(dev, frames, max_in_flight)
    for frame in frames.values():
        _check_frame(frame, devices, retired=False)
    for frame in finished.values():
        _check_frame(frame, devices, retired=True)


# ------------------------------------------------------------------ the indexes, from scratch


def ready_ns(core: SchedulerCore, dev: DeviceRecord, *, with_planned: bool = True) -> int:
    """When the device's work ends, recomputed from the tiles themselves (not the index)."""
    run_end, flight, planned = _timing_from_specs(core, dev)
    start = core._now_ns if run_end is None else max(core._now_ns, run_end)
    return start + flight + (planned if with_planned else 0)


def _timing_from_specs(core: SchedulerCore, dev: DeviceRecord) -> tuple[int | None, int, int]:
    costs = {
        k: cost_ns(core._tile(k).spec, dev.info, dev.speed)
        for k in [*dev.in_flight, *dev.planned_keys()]
    }
    run_end = None
    if dev.in_flight:
        run_end = round(dev.running_since * 1e9) + costs[dev.in_flight[0]]
    flight = sum(costs[k] for k in dev.in_flight[1:]) + sum(
        tail_ns(core._frames[f].spec, dev.info, dev.speed) for f in dev.tails
    )
    return run_end, flight, sum(costs[k] for k in dev.planned_keys())


def brute_queue(core: SchedulerCore, dev: DeviceRecord) -> Queue:
    """A victim's queue from scratch."""
    tiles = [core._tile(k) for k in dev.planned_keys()]
    planned = [PlannedTile(t.key, t.spec, t.need_bytes) for t in tiles]
    costs = [cost_ns(t.spec, dev.info, dev.speed) for t in tiles]
    return make_queue(dev.id, ready_ns(core, dev, with_planned=False), planned, costs)


def _check_device_timing(core: SchedulerCore, dev: DeviceRecord) -> None:
    d = dev.id
    held = set(dev.in_flight) | set(dev.planned_keys())
    if set(dev.costs) != held or set(dev.tail_costs) != set(dev.tails):
        _fail(f"device {d}: costs kept for {sorted(dev.costs)} but it holds {sorted(held)}")
    for key, cost in dev.costs.items():
        if cost != cost_ns(core._tile(key).spec, dev.info, dev.speed):
            _fail(f"device {d}: kept cost {cost} of {key} != recomputed")
    if timing(dev) != (dev.run_end_ns, dev.flight_ns, dev.planned_ns):
        _fail(f"device {d}: timing sums {dev.run_end_ns, dev.flight_ns, dev.planned_ns} drifted")
    if timing(dev) != _timing_from_specs(core, dev):
        _fail(f"device {d}: timing {timing(dev)} != {_timing_from_specs(core, dev)} from specs")
    needs = Counter(core._tile(k).need_bytes for k in dev.planned_keys())
    if needs != Counter(dev.needs) or dev.indexed_planned != len(dev.planned):
        _fail(f"device {d}: planned needs {dev.needs} != {dict(needs)}")


def _check_filed(core: SchedulerCore, dev: DeviceRecord) -> None:
    """The device sits in exactly the index entries its state calls for, at the right time."""
    index, now, d = core._index, core._now_ns, dev.id
    if not dev.alive:
        if dev.klass is not None or dev.victim_bucket is not None or dev.costs:
            _fail(f"lost device {d} is still indexed")
        return
    key = class_key(dev.info, dev.speed)
    cls = index.classes.get(key)
    if dev.klass != key or cls is None or d not in cls.members:
        _fail(f"device {d}: filed in class {dev.klass}, belongs in {key}")
        return
    run_end, flight, planned = timing(dev)
    static = run_end is not None and run_end > now
    base = (run_end if static and run_end is not None else 0) + flight
    if cls.ready.cur.get(d, (None, None))[:2] != (static, base + planned):
        _fail(f"device {d}: ready index {cls.ready.cur.get(d)} != {(static, base + planned)}")
    thief = not dev.planned and len(dev.in_flight) < index.max_in_flight
    if thief != (d in cls.thieves) or (thief and cls.thieves.cur[d][:2] != (static, base)):
        _fail(f"device {d}: thief index {cls.thieves.cur.get(d)} wrong (thief: {thief})")
    bucket = min(dev.needs) if dev.planned else None
    heap = index.victims.get(bucket) if bucket is not None else None
    if dev.victim_bucket != bucket or (
        heap is not None and heap.cur.get(d, (None, None))[:2] != (static, base + planned)
    ):
        _fail(f"device {d}: victim bucket {dev.victim_bucket} != {bucket} or wrong time")
    if static and (run_end, d) not in index.expiry:
        _fail(f"device {d}: running tile ends at {run_end} but nothing expires it")


def _check_tops(core: SchedulerCore) -> None:
    """Each heap's top is the brute-force first device (lazy deletion kept them honest)."""
    now = core._now_ns
    for cls in core._index.classes.values():
        devs = [core._devices[m] for m in cls.members]
        if [m for m in cls.members] != sorted(d.id for d in devs if d.alive):
            _fail(f"class {cls.key}: members {cls.members} unsorted or not alive")
        want = min(((ready_ns(core, d), d.id) for d in devs), default=None)
        if cls.ready.top(now) != want:
            _fail(f"class {cls.key}: ready top {cls.ready.top(now)} != brute force {want}")
        thieves = [d for d in devs if d.id in cls.thieves]
        want = min(((ready_ns(core, d), d.id) for d in thieves), default=None)
        if cls.thieves.top(now) != want:
            _fail(f"class {cls.key}: thief top {cls.thieves.top(now)} != brute force {want}")
    for bucket, heap in core._index.victims.items():
        want2 = min(((-ready_ns(core, core._devices[d]), d) for d in heap.cur), default=None)
        got = heap.top(now)
        if not heap or got is None or want2 is None or (-got[0], got[1]) != want2:
            _fail(f"victim bucket {bucket}: top {got} != brute force {want2}")


def _check_settled(core: SchedulerCore) -> None:
    """Nothing a full scan would still do: no slot to fill, no tail to place, no steal."""
    index, alive = core._index, [d for d in core._devices.values() if d.alive]
    if index.dirty or index.freed or core._tails_new:
        _fail("settling left devices or tails unprocessed")
    for dev in alive:
        free_slot = dev.planned and len(dev.in_flight) < core.max_in_flight_per_device
        if free_slot and dev.has_room_for(core._tile(dev.planned[0][1])):
            _fail(f"device {dev.id}: a free slot and a planned head that fits, not filled")
    for frame in core._frames.values():
        if frame.status == "active" and frame.tail == "pending":
            need = frame.spec.tail_memory_bytes
            if frame.frame_id not in core._tails_waiting:
                _fail(f"frame {frame.frame_id}: pending tail not waiting for room")
            if any(need <= d.free_bytes() for d in alive):
                _fail(f"frame {frame.frame_id}: pending tail fits somewhere now")
    if not core.work_stealing:
        return
    queues = [brute_queue(core, d) for d in alive if d.planned]
    for dev in alive:
        if not dev.planned and len(dev.in_flight) < core.max_in_flight_per_device:
            thief = Thief(dev.info, dev.speed, ready_ns(core, dev))
            steal = choose_steal_ns(thief, queues, skip_unfit=True)
            if steal is not None:
                _fail(f"device {dev.id} could still steal {steal}")


def check_index(core: SchedulerCore) -> None:
    """Recompute every index from the records and compare (tests only: O(devices * queue))."""
    index = core._index
    for dev in core._devices.values():
        if dev.alive:
            _check_device_timing(core, dev)
        _check_filed(core, dev)
        results = Counter(
            f.frame_id
            for f in core._frames.values()
            for t in f.tiles.values()
            if t.state == "done" and t.device == dev.id
        )
        if results != Counter(dev.results):
            _fail(f"device {dev.id}: results index {dev.results} != {dict(results)}")
    alive = [d for d in core._devices.values() if d.alive]
    if Counter(d.info.memory_bytes for d in alive) != index.memory:
        _fail(f"memory sizes {dict(index.memory)} != alive devices'")
    if index.planned_total != sum(len(d.planned) for d in core._devices.values()):
        _fail(f"planned total {index.planned_total} drifted")
    flying = sum(len(d.in_flight) for d in core._devices.values())
    if core._flying != flying:
        _fail(f"tiles in flight counted {core._flying} != {flying} on the devices")
    copies = sum(t.backup is not None for f in core._frames.values() for t in f.tiles.values())
    if core._speculative != copies:
        _fail(f"speculative tiles counted {core._speculative} != {copies} with a copy")
    if sum(len(c.members) for c in index.classes.values()) != len(alive):
        _fail("a class lists a device that is not alive, or an alive device has no class")
    if any(not heap for heap in index.victims.values()):
        _fail("an empty victim bucket was kept")
    _check_tops(core)
    _check_settled(core)
