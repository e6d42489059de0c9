"""CPU time per ``Scheduler.handle`` event on a fleet kept busy: ``python -m scheduler.perf``.

Why a module of its own: the scheduler's promise is that one decision costs the same at 10 and
at 10,000 devices, and that promise rots unless it is measured the same way every time.  The
workload drives the public API only (``handle``, the events, ``DeviceInfo``/``FrameSpec``), so
the very same driver measures an older checkout too: ``--baseline DIR`` runs it against
``DIR/scheduler`` in a subprocess, alternating rounds with the current tree, because this kind of
machine drifts in speed and only numbers taken side by side compare.

The fleet is three device classes (4, 8 and 16 GFLOP/s); every device holds two frames' worth of
work (``2 * devices`` frames in flight; a frame that ends is replaced at once), frames are a 4x4
grid of independent tiles or a single tile, plus a small tail.  Devices run the tiles they were
sent first in, first out at exactly their profile's speed; a tail runs beside them (the tail
policy sends every tail to the fastest device, which would otherwise become the bottleneck and
leave the rest of the fleet idle, which is not the load this measures).  Only ``handle`` is timed, with
``time.process_time()``, after a warm-up that fills the fleet.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from scheduler import (
    Complete,
    DeviceInfo,
    DeviceJoined,
    Dispatch,
    Event,
    FailFrame,
    FrameSpec,
    FrameSubmitted,
    RunTail,
    Scheduler,
    TailDone,
    TileDone,
    TileSpec,
    tail_cost_s,
    tile_cost_s,
)

GFLOPS = (4.0, 8.0, 16.0)


def fleet(n: int) -> list[DeviceInfo]:
    """``n`` devices in three classes; ids sort the same way as numbers."""
    width = len(str(n))
    return [
        DeviceInfo(f"d{i:0{width}d}", GFLOPS[i % 3], 0.002, 8 * 10**9, 1e9, 0.0005)
        for i in range(n)
    ]


def frame(frame_id: int, tiles: int) -> FrameSpec:
    """A 4x4 grid (``tiles=16``) or one tile: the same total work either way."""
    flops = 16 * 10**9 // tiles
    specs = tuple(TileSpec(0, i, flops, 200_000, 100_000, 1_000_000) for i in range(tiles))
    return FrameSpec(frame_id, specs, (10_000_000,), tail_flops=10**8, out_bytes=4_000)


@dataclass(slots=True)
class _Device:
    info: DeviceInfo
    queue: deque[tuple[str, tuple[int, int, int]]] = field(default_factory=deque)
    busy: bool = False


class Workload:
    """A tiny discrete-event loop around one scheduler; only ``handle`` is timed."""

    def __init__(self, devices: int, tiles: int) -> None:
        self.sched = Scheduler(max_in_flight_per_device=2, log_size=1000)
        self.tiles = tiles
        self.devices = {info.id: _Device(info) for info in fleet(devices)}
        self.specs: dict[int, FrameSpec] = {}
        self.heap: list[tuple[float, int, Event]] = []
        self.seq = 0
        self.next_frame = 0
        self.cpu = 0.0
        self.events = 0
        for dev in self.devices.values():
            self.feed(DeviceJoined(dev.info, 0.0), 0.0)
        for _ in range(2 * devices):
            self.submit(0.0)

    def submit(self, now: float) -> None:
        spec = frame(self.next_frame, self.tiles)
        self.specs[spec.frame_id] = spec
        self.next_frame += 1
        self.feed(FrameSubmitted(spec, now), now)

    def feed(self, event: Event, now: float) -> None:
        start = time.process_time()
        out = self.sched.handle(event)
        self.cpu += time.process_time() - start
        self.events += 1
        for ins in out:
            if isinstance(ins, Dispatch):
                self.enqueue(ins.device, ("tile", ins.key), now)
            elif isinstance(ins, RunTail):
                dev = self.devices[ins.device]
                cost = tail_cost_s(self.specs[ins.frame_id], dev.info)
                self.push(now + cost, TailDone(ins.frame_id, ins.device, now + cost))
            elif isinstance(ins, (Complete, FailFrame)):
                del self.specs[ins.frame_id]
                self.submit(now)

    def enqueue(self, device: str, job: tuple[str, tuple[int, int, int]], now: float) -> None:
        dev = self.devices[device]
        dev.queue.append(job)
        self.start(dev, now)

    def start(self, dev: _Device, now: float) -> None:
        if dev.busy or not dev.queue:
            return
        _, key = dev.queue.popleft()
        dev.busy = True
        cost = tile_cost_s(self.specs[key[0]].tiles[key[2]], dev.info)
        self.push(now + cost, TileDone(key, dev.info.id, now + cost))

    def push(self, t: float, event: Event) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, event))

    def run(self, events: int) -> None:
        stop = self.events + events
        while self.heap and self.events < stop:
            now, _, event = heapq.heappop(self.heap)
            assert isinstance(event, (TileDone, TailDone))
            dev = self.devices[event.device]
            if isinstance(event, TileDone):
                dev.busy = False
            self.feed(event, now)
            self.start(dev, now)


def measure(devices: int, tiles: int, events: int) -> float:
    """Microseconds of CPU per handled event, in steady state."""
    work = Workload(devices, tiles)
    work.run(max(events, 4 * devices))  # warm-up: the fleet settles into its steady state
    work.cpu, work.events = 0.0, 0
    work.run(events)
    return 1e6 * work.cpu / max(1, work.events)


def _worker(args: argparse.Namespace) -> None:
    rows = [(n, t, measure(n, t, args.events)) for n in args.devices for t in args.tiles]
    print(json.dumps(rows))


def _run_tree(root: Path, args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """Measure the scheduler package under ``root`` in a fresh interpreter."""
    code = (
        "import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; "
        f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
    )
    cmd = [sys.executable, "-c", code, str(root), "--worker", "--events", str(args.events)]
    cmd += ["--devices", *map(str, args.devices), "--tiles", *map(str, args.tiles)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [tuple(row) for row in json.loads(out.strip().splitlines()[-1])]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scheduler.perf", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--tiles", type=int, nargs="+", default=[16, 1])
    p.add_argument("--events", type=int, default=3000, help="timed events per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="a checkout whose scheduler/ to compare with")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    here = Path(__file__).resolve().parents[1]
    trees = {"after": here} if args.baseline is None else {"before": args.baseline, "after": here}
    samples: dict[tuple[str, int, int], list[float]] = {}
    for r in range(args.rounds):
        for name, root in trees.items():  # alternate trees within each round
            for n, t, us in _run_tree(root, args):
                samples.setdefault((name, n, t), []).append(us)
                print(f"round {r + 1}/{args.rounds} {name} {n} devices {t} tiles: {us:.1f} us",
                      file=sys.stderr, flush=True)
    print("devices tiles/frame " + " ".join(f"{name:>16}" for name in trees) + "   (us/event, median)")
    for n in args.devices:
        for t in args.tiles:
            cells = []
            for name in trees:
                xs = samples[(name, n, t)]
                cells.append(f"{statistics.median(xs):7.1f} [{min(xs):.0f}-{max(xs):.0f}]")
            print(f"{n:7d} {t:11d} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
