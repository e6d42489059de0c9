"""What the CLI's subcommands do; kept apart from argument parsing so each is callable from Python."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

MIB = 2**20


def _grid(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a grid looks like 5x5 (rows x cols), got {text!r}") from None
    return (r, c)


def _progress(total: int, desc: str, unit: str = "tile") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def run_with_progress(plan: Any, x: torch.Tensor) -> Any:
    """``plan.run`` with a progress bar over tiles (same result, same order)."""
    import tiling

    total = sum(len(s.tiles) for s in plan.stages)
    env = {plan.input_name: x}
    with _progress(total, "tiles") as bar:
        for stage in plan.stages:
            env.update(tiling.run_stage(stage, env, on_tile=lambda _i: bar.update(1)))
    return plan.tail.run(env)


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
    return _cluster_run(args, model="yolov2-16", cfg=None, size=args.size, frames=args.frames, devices=args.devices,
                        grid=args.grid, mode=args.mode, reuse=args.reuse, stages=None, address=None, scale=None,
                        profiles_file=None, trace=None, title="tilefleet demo")


def demo_in_process(args: argparse.Namespace) -> int:
    import tiling
    from tiling import zoo

    zm = zoo.get("yolov2-16", input_size=args.size)
    x = zoo.example(zm, batch=1, seed=1)
    grid = _grid(args.grid if args.grid != "auto" else "5x5")
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
    from tiling import zoo

    if args.cfg:
        from tiling import load_darknet

        model = load_darknet(args.cfg)
        c, h, w = model.input_shape
        if args.size:
            h = w = args.size
        torch.manual_seed(0)
        return model, torch.randn(1, c, h, w), args.cfg
    zm = zoo.get(args.model, input_size=args.size)
    return zm.model, zoo.example(zm), zm.name


def plan(args: argparse.Namespace) -> int:
    import tiling

    model, x, name = _load(args)
    grids = [_grid(g) for g in args.grid.split(",")]
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


def _grid_arg(text: str) -> Any:
    return "auto" if text == "auto" else _grid(text)


def _cluster_run(args: argparse.Namespace, *, model: str | None, cfg: str | None, size: int | None, frames: int,
                 devices: str, grid: str, mode: str, reuse: bool, stages: str | None, address: str | None,
                 scale: float | None, profiles_file: str | None, trace: str | None, title: str) -> int:
    """Deploy, stream frames with a progress bar, check each against the untiled model, report."""
    import fleet
    import tiling
    from tiling.report import table

    from .bench import frames_for, load_workload, standalone_s

    w = load_workload(model, cfg, size)
    xs = frames_for(w, frames)
    print(f"{title}: {w.name} {tuple(w.example.shape[1:])} on {address or devices}, {frames} frames, "
          f"grid {grid}, {mode} mode")
    with torch.no_grad():
        refs = [w.model(x) for x in _progress_iter(xs, "references (untiled, this host)")]
    kw: dict[str, Any] = {"mode": mode}
    g = _grid_arg(grid)
    if g != "auto":
        kw["reuse"] = reuse
        if stages:
            kw["stages"] = [int(v) for v in stages.split(",")]
    with fleet.connect(address, emulate=None if address else devices, scale=scale,
                       profiles_file=profiles_file, nodes=bool(getattr(args, "nodes", False))) as cluster:
        t0 = time.monotonic()
        dep = cluster.deploy(w.model, w.example, grid=g, **kw)
        print(f"deployed in {time.monotonic() - t0:.1f} s (weights shipped once per device)")
        print(dep.plan_summary())
        outs = []
        t0 = time.monotonic()
        depth = 1 if mode == "latency" else 2 * len(cluster.devices())
        with _progress(frames, "frames", "frame") as bar:
            for y in dep.stream(xs, in_flight=depth):
                outs.append(y)
                bar.update(1)
        wall = time.monotonic() - t0
        errs = [tiling.rel_error(y, r) for y, r in zip(outs, refs)]
        st = dep.stats()
        if trace:
            print(f"trace written to {dep.trace(trace)}")
        s = cluster.scale
        rows = []
        for did, d in st["devices"].items():
            rows.append([did, d["tiles"], d["tails"], f"{d['busy_s'] / s:.2f}", f"{d['bytes_in'] / MIB:.1f}",
                         f"{d['bytes_out'] / MIB:.1f}", f"{d['peak_bytes'] / MIB:.1f}", d["steals"], d["retries"],
                         "alive" if d["alive"] else "lost"])
        print()
        print(table(["device", "tiles", "tails", "busy s", "MiB in", "MiB out", "peak MiB", "steals", "retries",
                     "state"], rows))
        profs = {x["id"]: x for x in cluster.devices()}
    plan = dep.plan
    emu = [p for p in profs.values() if p["emulated"]]
    print()
    per_frame = wall / s / frames
    print(f"{frames} frames in {wall:.1f} s wall" + (f" (clock scale {s:g}: {wall / s:.1f} emulated s)" if s != 1 else "")
          + f"; p50 latency {st['frames'].get('p50_ms', 0) / s:.0f} ms")
    if emu:
        from sims.catalog import parse_spec, profiles

        first = parse_spec(devices, profiles(profiles_file))[0].profile
        base = standalone_s(plan.untiled_flops + plan.tail.flops, first)
        print(f"one {first.name} alone (untiled, frame already there): {base:.2f} s per frame; "
              f"here {per_frame:.2f} s per frame: speedup {base / per_frame:.2f}x")
    ok = max(errs) <= 1e-4
    print(f"check: {len(errs)} results against the untiled model, largest relative error {max(errs):.2e}: "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _progress_iter(items: list[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    return _cluster_run(args, model=args.model, cfg=args.cfg, size=args.size, frames=args.frames,
                        devices=args.devices, grid=args.grid, mode=args.mode, reuse=args.reuse, stages=args.stages,
                        address=args.address, scale=args.scale, profiles_file=args.profiles, trace=args.trace,
                        title="tilefleet run")


def devices(args: argparse.Namespace) -> int:
    from sims.catalog import catalog_table, load_profiles

    extra = load_profiles(args.profiles) if args.profiles else None
    print(catalog_table(extra))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .benchcli import bench_command

    return bench_command(args)
