"""Invariants of the scheduler's bookkeeping, checked from scratch.

Like dask's ``WorkerState.validate_state``: incremental bookkeeping is where
schedulers rot, so tests call this after every ``handle`` and it recomputes
everything (memory, counts, which device holds what) independently of the
incremental updates.  Each failed check raises ``AssertionError`` naming the
device, frame or tile and the two numbers that disagree.
"""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.records import DeviceRecord, FrameRecord, TileRecord


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
        if tile.state != "in_flight" or tile.device != d:
            _fail(f"device {d}: in-flight tile {key} is {tile.state} on {tile.device}")
        weights[tile.weight_key] = max(weights.get(tile.weight_key, 0), tile.weights)
        peak += tile.spec.peak_bytes
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
    expected = sum(weights.values()) + peak + tails
    if expected != dev.memory_in_use():
        _fail(f"device {d}: memory bookkeeping {dev.memory_in_use()} != recomputed {expected}")
    if expected > dev.info.memory_bytes:
        _fail(f"device {d}: memory in use {expected} > budget {dev.info.memory_bytes}")


def _check_tile(tile: TileRecord, frame: FrameRecord, devices: Mapping[str, DeviceRecord]) -> None:
    k = tile.key
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
