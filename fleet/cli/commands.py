"""What the CLI's subcommands do; kept apart from argument parsing so each is callable from Python."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import grid_arg, parse_grid, progress, progress_iter, workload

MIB = 2**20

if TYPE_CHECKING:
    import torch


def run_with_progress(plan: Any, x: torch.Tensor) -> Any:
    """``plan.run`` with a progress bar over tiles (same result, same order)."""
    total = sum(len(s.tiles) for s in plan.stages)
    with progress(total, "tiles") as bar:
        return plan.run(x, on_tile=lambda _i: bar.update(1))


def tile_table(plan: Any) -> str:
    from tiling.report import table

    rows = []
    for s in plan.stages:
        for t in s.tiles:
            rows.append([s.index, t.index, f"{t.row},{t.col}", str(t.out_box), str(t.in_box), f"{t.flops / 1e9:.3f}",
                         f"{t.peak_bytes / MIB:.2f}", f"{t.in_bytes / 1024:.0f}", f"{t.reuse_in_bytes / 1024:.0f}",
                         ",".join(map(str, t.deps)) or "-"])
    return table(["stage", "tile", "row,col", "output box", "input box", "GFLOP", "peak MiB", "in KiB",
                  "reuse in KiB", "after"], rows)


def demo(args: argparse.Namespace) -> int:
    if args.in_process:
        return demo_in_process(args)
    from fleet.bench.runner import load_workload

    return _cluster_run(ClusterRun("tilefleet demo", load_workload("yolov2-16", None, args.size), frames=args.frames,
                                   devices=args.devices, grid=args.grid, mode=args.mode, reuse=args.reuse))


def demo_in_process(args: argparse.Namespace) -> int:
    import torch

    import tiling
    from tiling import zoo

    zm = zoo.get("yolov2-16", input_size=args.size)
    x = zoo.example(zm, batch=1, seed=1)
    grid = parse_grid(args.grid if args.grid != "auto" else "5x5")
    print(f"tilefleet demo: {zm.name} ({zm.description}) at {args.size}x{args.size}, grid {grid[0]}x{grid[1]}"
          f"{', overlap reuse' if args.reuse else ''}")
    t0 = time.perf_counter()
    plan = tiling.partition(zm.model, x, grid={"grid": grid, "deepthings": not args.even}, reuse=args.reuse)
    t_plan = time.perf_counter() - t0
    with torch.no_grad():
        zm.model(x)  # warm-up, so both timings below see the same state
        t0 = time.perf_counter()
        ref = zm.model(x)
        t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = run_with_progress(plan, x)
    t_tiled = time.perf_counter() - t0
    err = tiling.rel_error(y, ref)
    print()
    print(plan.summary())
    if args.tiles:
        print()
        print(tile_table(plan))
    tiles = plan.tiles
    whole = tiling.partition(zm.model, x, grid=(1, 1)).tiles[0].peak_bytes
    worst = max(t.peak_bytes for t in tiles)
    sent = sum(t.in_bytes for t in tiles) / (x[0].numel() * x.element_size())
    print()
    print(f"memory: worst tile {worst / MIB:.1f} MiB vs {whole / MIB:.1f} MiB untiled "
          f"({(1 - worst / whole) * 100:.0f}% less); input sent {sent:.2f}x the image")
    print(f"time: plan {t_plan * 1e3:.0f} ms, untiled {t_ref * 1e3:.0f} ms, all tiles in this process "
          f"{t_tiled * 1e3:.0f} ms ({torch.get_num_threads()} threads)")
    ok = err <= 1e-4
    print(f"check: relative error {err:.2e} against the untiled model: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _load(args: argparse.Namespace) -> tuple[Any, torch.Tensor, str]:
    w = workload(args)
    if w.preprocess is not None:
        import tiling

        return tiling.with_preprocess(w.model, w.preprocess), w.example, w.name
    return w.model, w.example, w.name


def plan(args: argparse.Namespace) -> int:
    import torch

    import tiling

    model, x, name = _load(args)
    grids = [parse_grid(g) for g in args.grid.split(",")]
    kw: dict[str, Any] = {"reuse": args.reuse}
    if args.stages:
        kw["stages"] = [int(s) if s.strip().isdigit() else s.strip() for s in args.stages.split(",")]
        kw["grids"] = grids if len(grids) > 1 else None
        if len(grids) == 1:
            kw["grid"] = grids[0]
    else:
        kw["grid"] = grids[0]
    if args.upto is not None:
        kw["upto"] = int(args.upto) if args.upto.isdigit() else args.upto
    p = tiling.partition(model, x, **kw)
    print(f"{name}: input {tuple(x.shape[1:])}, {len(p.layers)} fusible layers")
    print(p.summary())
    if args.tiles:
        print()
        print(tile_table(p))
    if args.check:
        with torch.no_grad():
            ref = model(x)
        err = tiling.rel_error(run_with_progress(p, x), ref)
        print(f"check: relative error {err:.2e}: {'OK' if err <= 1e-4 else 'MISMATCH'}")
        return 0 if err <= 1e-4 else 1
    return 0


def models(args: argparse.Namespace) -> int:
    from tiling import zoo
    from tiling.report import table

    rows = []
    for n in zoo.names():
        zm = zoo.get(n)
        rows.append([n, "x".join(map(str, zm.input_shape)), zm.description, zm.source])
    print(table(["name", "input", "what", "source"], rows))
    return 0


@dataclass(frozen=True)
class ClusterRun:
    """What ``demo`` and ``run`` ask of a cluster: a workload, devices, a plan request, frames."""

    title: str
    workload: Any  # fleet.bench.runner.Workload
    frames: int
    devices: str
    grid: str
    mode: str
    images: str | None = None
    reuse: bool = False
    stages: str | None = None
    address: str | None = None
    scale: float | None = None
    profiles_file: str | None = None
    trace: str | None = None
    nodes: bool = False

    def deploy_kw(self) -> tuple[Any, dict[str, Any]]:
        kw: dict[str, Any] = {"mode": self.mode}
        g = grid_arg(self.grid)
        if g != "auto":
            kw["reuse"] = self.reuse
            if self.stages:
                kw["stages"] = [int(v) for v in self.stages.split(",")]
        return g, kw


def _cluster_run(r: ClusterRun) -> int:
    """Deploy, stream frames with a progress bar, check each against the untiled model, report."""
    import torch

    import tiling

    w = r.workload
    xs = _frames(r, w)
    print(f"{r.title}: {w.name} {tuple(w.example.shape[1:])} on {r.address or r.devices}, {r.frames} frames, "
          f"grid {r.grid}, {r.mode} mode")
    with torch.no_grad():
        refs = [w.reference(x) for x in progress_iter(xs, "references (untiled, this host)")]
    outs, wall, st, profs, plan, scale = _stream(r, w, xs)
    errs = [tiling.rel_error(y, ref) for y, ref in zip(outs, refs)]
    print()
    print(_device_table(st, scale))
    print()
    per_frame = wall / scale / r.frames
    print(f"{r.frames} frames in {wall:.1f} s wall"
          + (f" (clock scale {scale:g}: {wall / scale:.1f} emulated s)" if scale != 1 else "")
          + f"; p50 latency {st['frames'].get('p50_ms', 0) / scale:.0f} ms")
    if any(p["emulated"] for p in profs.values()):
        print(_speedup_line(r, plan, per_frame))
    ok = max(errs) <= 1e-4
    print(f"check: {len(errs)} results against the untiled model, largest relative error {max(errs):.2e}: "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _frames(r: ClusterRun, w: Any) -> list[torch.Tensor]:
    """Random frames of the model's input, or image files (uint8, for a preprocessed deployment)."""
    from fleet.bench.runner import frames_for

    if r.images is None:
        return frames_for(w, r.frames)
    import tiling

    if w.preprocess is None:
        raise ValueError("--images gives raw uint8 frames: say how to normalise them with --preprocess "
                         "imagenet|darknet|none")
    h, wd = w.example.shape[-2:]
    imgs = [w.preprocess.to_nchw(im) for im in tiling.load_images(r.images, size=(int(h), int(wd)))]
    return [imgs[i % len(imgs)] for i in range(max(r.frames, len(imgs)))]


def _stream(r: ClusterRun, w: Any, xs: list[torch.Tensor]) -> tuple[list[Any], float, dict[str, Any],
                                                                    dict[str, Any], Any, float]:
    """Connect, deploy, stream every frame; (outputs, wall s, stats, device figures, plan, clock scale)."""
    import fleet

    g, kw = r.deploy_kw()
    with fleet.connect(r.address, emulate=None if r.address else r.devices, scale=r.scale,
                       profiles_file=r.profiles_file, nodes=r.nodes) as cluster:
        t0 = time.monotonic()
        dep = cluster.deploy(w.model, w.example, grid=g, preprocess=w.preprocess, **kw)
        print(f"deployed in {time.monotonic() - t0:.1f} s (weights shipped once per device)")
        print(dep.plan_summary())
        outs = []
        t0 = time.monotonic()
        depth = 1 if r.mode == "latency" else 2 * len(cluster.devices())
        with progress(r.frames, "frames", "frame") as bar:
            for y in dep.stream(xs, in_flight=depth):
                outs.append(y)
                bar.update(1)
        wall = time.monotonic() - t0
        st = dep.stats()
        if r.trace:
            print(f"trace written to {dep.trace(r.trace)}")
        profs = {x["id"]: x for x in cluster.devices()}
        return outs, wall, st, profs, dep.plan, cluster.scale


def _device_table(st: dict[str, Any], scale: float) -> str:
    from tiling.report import table

    rows = []
    for did, d in st["devices"].items():
        rows.append([did, d["tiles"], d["tails"], f"{d['busy_s'] / scale:.2f}", f"{d['bytes_in'] / MIB:.1f}",
                     f"{d['bytes_out'] / MIB:.1f}", f"{d['peak_bytes'] / MIB:.1f}", d["steals"], d["retries"],
                     "alive" if d["alive"] else "lost"])
    return table(["device", "tiles", "tails", "busy s", "MiB in", "MiB out", "peak MiB", "steals", "retries",
                  "state"], rows)


def _speedup_line(r: ClusterRun, plan: Any, per_frame: float) -> str:
    from fleet.bench.runner import standalone_s
    from sims.catalog import parse_spec
    from sims.profile_files import profiles

    first = parse_spec(r.devices, profiles(r.profiles_file))[0].profile
    base = standalone_s(plan.untiled_flops + plan.tail.flops, first)
    return (f"one {first.name} alone (untiled, frame already there): {base:.2f} s per frame; "
            f"here {per_frame:.2f} s per frame: speedup {base / per_frame:.2f}x")


def run(args: argparse.Namespace) -> int:
    return _cluster_run(ClusterRun("tilefleet run", workload(args), frames=args.frames, devices=args.devices,
                                   grid=args.grid, mode=args.mode, images=args.images, reuse=args.reuse,
                                   stages=args.stages, address=args.address, scale=args.scale,
                                   profiles_file=args.profiles, trace=args.trace, nodes=bool(args.nodes)))


def devices(args: argparse.Namespace) -> int:
    from sims.profile_files import load_profiles
    from sims.report import catalog_table

    extra = load_profiles(args.profiles) if args.profiles else None
    print(catalog_table(extra))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    return bench_command(args)
