"""CPU time per ``Scheduler.handle`` event on a fleet kept busy: ``python -m sims.perf``.

Why a module of its own: the scheduler's promise is that one decision costs the same at 10 and
at 10,000 devices, and that promise rots unless it is measured the same way every time. The
workload runs in the simulator's one loop (:func:`sims.specs.simulate_specs`: the real driver on
the simulated transport), and only ``handle`` is timed, with ``time.process_time()``, after a
warm-up that fills the fleet; ``--baseline DIR`` runs ``python -m sims.perf`` of another checkout
(one that has this module) in a subprocess, alternating rounds with the current tree, because
this kind of machine drifts in speed and only numbers taken side by side compare.

The fleet is three device classes (4, 8 and 16 GFLOP/s); every device holds two frames' worth of
work (``2 * devices`` frames in flight; a frame that ends is replaced at once), frames are a 4x4
grid of independent tiles or a single tile. The tail costs nothing to compute (the tail policy
sends every tail to the fastest device, which would otherwise become the bottleneck and leave the
rest of the fleet idle, which is not the load this measures), but the scheduler still places it.
(Before this ran on the simulator, ``scheduler/perf.py`` had a loop of its own; its numbers were
taken with tails beside the tiles and no device model, so they compare only roughly.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from scheduler import DeviceInfo, FrameSpec, TileSpec

from .specs import simulate_specs

GFLOPS = (4.0, 8.0, 16.0)


def fleet(n: int) -> list[DeviceInfo]:
    """``n`` devices in three classes; ids sort the same way as numbers."""
    width = len(str(n))
    return [DeviceInfo(f"d{i:0{width}d}", GFLOPS[i % 3], 0.002, 8 * 10**9, 1e9, 0.0005) for i in range(n)]


def frame(tiles: int) -> FrameSpec:
    """A 4x4 grid (``tiles=16``) or one tile: the same total work either way."""
    flops = 16 * 10**9 // tiles
    specs = tuple(TileSpec(0, i, flops, 200_000, 100_000, 1_000_000) for i in range(tiles))
    return FrameSpec(0, specs, (10_000_000,), tail_flops=0, out_bytes=4_000)


def measure(devices: int, tiles: int, events: int) -> float:
    """Microseconds of CPU in ``Scheduler.handle`` per event, in steady state."""
    per_frame = tiles + 2  # submitted, each tile done, the tail done
    warm = math.ceil(max(events, 4 * devices) / per_frame)  # the fleet settles into its steady state
    timed = math.ceil(events / per_frame)
    depth = 2 * devices
    run = simulate_specs(fleet(devices), [frame(tiles)] * (warm + timed + depth), in_flight=depth,
                         record=False, warmup=warm, until=warm + timed)  # the fleet is still full at the end
    return 1e6 * run.sched_cpu_s / max(1, run.events)


def _worker(args: argparse.Namespace) -> None:
    rows = [(n, t, measure(n, t, args.events)) for n in args.devices for t in args.tiles]
    print(json.dumps(rows))


def _run_tree(root: Path, args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """Measure the checkout at ``root`` (its own ``sims.perf``) in a fresh interpreter."""
    cmd = [sys.executable, "-m", "sims.perf", "--worker", "--events", str(args.events)]
    cmd += ["--devices", *map(str, args.devices), "--tiles", *map(str, args.tiles)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root, env=env).stdout
    return [tuple(row) for row in json.loads(out.strip().splitlines()[-1])]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sims.perf", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--tiles", type=int, nargs="+", default=[16, 1])
    p.add_argument("--events", type=int, default=3000, help="timed events per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="a checkout (with sims/perf.py) whose scheduler to compare with")
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
