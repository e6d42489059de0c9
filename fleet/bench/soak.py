"""``tilefleet bench --soak``: thousands of small frames through an emulated cluster while one device
fails and comes back, checking that nothing is lost, duplicated or wrong and that memory stays flat.

The run:
- a small conv model (:func:`soak_model`) with ``DISTINCT`` distinct inputs, cycled; the untiled
  model's output for each is computed once, before the run, and every result is compared with it
  (consecutive frames have different inputs, so a result given to the wrong frame is wrong);
- frames are kept ``in_flight`` deep (the throughput harness's depth) and collected in order;
  *lost*: a frame whose future failed or timed out; *wrong*: relative error > 1e-4; *duplicated*:
  frames the driver completed beyond those the client received (each frame is submitted once);
- the last device (the *victim*) is up for ``period / 2`` frames from its revival (and until it
  has taken a tile since), then :meth:`fleet.Cluster.fail` kills it, and ``period / 2`` frames
  later :meth:`fleet.Cluster.revive` brings it back on a thread while frames keep flowing; a
  revival still under way ``period`` frames later holds new frames back until it is done (a new
  worker process takes seconds on a loaded host), so a cycle stays within 2 periods;
- warm-up runs until the first cycle is complete (at least ``period`` frames); then the RSS of
  this process (the driver) and of every worker that never fails is read, statistics are reset,
  and ``frames`` timed frames run; the RSS is read again at the end.

The pure parts (the fail/revive state machine, frames per second in windows, RSS growth, the
verdict) are functions of plain data, tested without Ray.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tiling

from fleet.runtime.stats import MAX_TRACE

from .runner import Workload, _bar, plan_label

SOAK_DEVICES = "pi4*4"
SOAK_FRAMES = 10_000
SOAK_PERIOD = 300  # frames per fail/revive cycle (plus the revival's own time)
SOAK_SIZE = 32
DISTINCT = 16  # distinct inputs, cycled (more than any depth in flight)
WINDOWS = 20  # rows of the frames-per-second table
RSS_TARGET_MB = 50.0
TOL = 1e-4
MB = 1e6  # RSS figures are in MB (10^6 bytes), as the target is stated
RESULT_TIMEOUT_S = 120.0


# --- pure parts ----------------------------------------------------------------------------------------
def soak_model(size: int = SOAK_SIZE) -> Workload:
    """A small conv model (3 convs, 2 max pools, about 4 MFLOP at 32x32), seeded."""
    with torch.random.fork_rng(devices=[]):  # the same weights every run, the caller's RNG untouched
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    g = torch.Generator().manual_seed(0)
    return Workload(f"soak-conv3 {size}x{size}", model, torch.randn(1, 3, size, size, generator=g))


@dataclass
class Chaos:
    """When the victim fails and comes back, frame by frame (no Ray, no clock: see :meth:`step`).

    ``up`` for ``period // 2`` frames -> ``fail`` -> ``down`` for ``period // 2`` frames -> ``revive``
    -> ``reviving`` until the revival is done (after ``period`` frames: ``wait`` for it) ->
    ``returning`` until the victim takes a tile -> ``up`` (a cycle is complete; its up time counts
    from the revival).
    """

    period: int
    state: str = "up"
    since: int = 0  # the frame at which the current state (returning and up: the revival) began
    cycles: int = 0  # complete cycles: failed, revived, took a tile again

    def step(self, frame: int, revived: bool, took_tile: bool) -> str | None:
        """What to do before submitting ``frame``: 'fail', 'revive', 'wait' (for the revival, then
        step again) or None. ``revived``: the revival under way is done; ``took_tile``: the victim
        took a tile since it was revived."""
        half = max(1, self.period // 2)
        if self.state == "reviving" and not revived and frame - self.since >= self.period:
            return "wait"
        if self.state == "reviving" and revived:
            self.state, self.since = "returning", frame
        if self.state == "returning" and took_tile:
            self.state = "up"
            self.cycles += 1
        if self.state == "up" and frame - self.since >= half:
            self.state, self.since = "down", frame
            return "fail"
        if self.state == "down" and frame - self.since >= half:
            self.state, self.since = "reviving", frame
            return "revive"
        return None


def fps_windows(done: Sequence[float], n_windows: int = WINDOWS, events: Sequence[Sequence[Any]] = (),
                cpu: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Frames per second in ``n_windows`` consecutive windows of completions.

    ``done``: completion times (s) of the timed frames in order, from the start of the timed run
    (t = 0). Window ``[a, b)`` lasts from the completion of frame ``a - 1`` (or 0) to that of ``b - 1``.
    ``events``: (frame, what, ...) tuples, listed in the window holding that frame. ``cpu``: this
    process's CPU seconds at each completion (from the same start): each window's CPU per frame,
    which a busy host inflates far less than wall time (a driver doing more work per frame shows).
    """
    n = len(done)
    if n == 0:
        return []
    k = max(1, min(n_windows, n))
    bounds = [round(i * n / k) for i in range(k + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        t0 = done[a - 1] if a > 0 else 0.0
        t1 = done[b - 1]
        out.append({"frames": [a, b], "t_start_s": t0, "t_end_s": t1,
                    "fps": (b - a) / (t1 - t0) if t1 > t0 else None,  # None: no measurable time
                    "events": [f"{e[1]}@{e[0]}" for e in events if a <= e[0] < b]})
        if cpu is not None:
            out[-1]["cpu_ms_per_frame"] = (cpu[b - 1] - (cpu[a - 1] if a > 0 else 0.0)) / (b - a) * 1e3
    return out


def fps_summary(windows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Min, median and max of the windows' fps, and the first and last window's (a trend shows)."""
    fps = sorted(w["fps"] for w in windows if w["fps"] is not None)
    if not fps:
        return {}
    return {"min": fps[0], "median": statistics.median(fps), "max": fps[-1], "first": windows[0]["fps"] or 0.0,
            "last": windows[-1]["fps"] or 0.0}


def rss_growth(warm: dict[str, int], end: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per process: RSS after warm-up and at the end, and the growth, in MB."""
    return {name: {"warm_mb": warm[name] / MB, "end_mb": end[name] / MB, "growth_mb": (end[name] - warm[name]) / MB}
            for name in warm if name in end}


def verdict(r: dict[str, Any], rss_target_mb: float = RSS_TARGET_MB) -> tuple[bool, str]:
    """Whether the soak met its targets, and one line saying so."""
    misses = []
    bad = {k: r[k] for k in ("lost", "duplicated", "wrong") if r[k]}
    if bad:
        misses.append(", ".join(f"{v} {k}" for k, v in bad.items()))
    growth = max((v["growth_mb"] for v in r["rss"].values()), default=0.0)
    worst = max(r["rss"], key=lambda n: r["rss"][n]["growth_mb"]) if r["rss"] else "-"
    if growth >= rss_target_mb:
        miss = f"RSS of {worst} grew {growth:.1f} MB (target < {rss_target_mb:g} MB)"
        h = r.get("driver_history")
        if worst == "driver" and h:
            miss += (f"; the driver's bounded histories were still filling: {h['trace_events']:,} trace events "
                     f"(kept up to {h['trace_cap']:,}), finished frames kept by the scheduler "
                     f"{min(h['frames_since_start'], h['scheduler_finished_frames_cap']):,} "
                     f"(up to {h['scheduler_finished_frames_cap']:,})")
        misses.append(miss)
    if r["cycles"] < 1:
        misses.append("no fail/revive cycle completed (more --frames or a shorter --fail-every)")
    if r["revive_errors"]:
        misses.append(f"{len(r['revive_errors'])} revival(s) failed: {r['revive_errors'][0]}")
    if r["revived_without_tile_frames"] > r["fail_every"]:
        misses.append(f"the revived device took no tile in the last {r['revived_without_tile_frames']} frames")
    if not r["never_failed_pids_unchanged"]:
        misses.append("a worker that was never failed was replaced")
    head = (f"{r['frames']} frames: {r['lost']} lost, {r['duplicated']} duplicated, {r['wrong']} wrong; "
            f"{r['cycles']} fail/revive cycles; max RSS growth {growth:.1f} MB ({worst})")
    if misses:
        return False, f"FAIL: {head}; missed: {'; '.join(misses)}"
    return True, f"PASS: {head} < {rss_target_mb:g} MB"


def read_rss(pid: int) -> int:
    """Resident set size of a process in bytes (psutil when installed, else /proc/PID/status)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process(pid).memory_info().rss)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def rss_source() -> str:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "/proc/PID/status VmRSS"
    return "psutil"


# --- the run ---------------------------------------------------------------------------------------------
@dataclass
class _Victim:
    """The failing device's side of the run: the revival thread and the tile count it came back with."""

    cluster: Any
    dep: Any
    device: str
    thread: threading.Thread | None = None
    tiles_at_revival: int | None = None  # its tile count right after its last revival
    revive_s: list[float] = field(default_factory=list)
    waited_s: list[float] = field(default_factory=list)  # frames held back for a slow revival
    errors: list[str] = field(default_factory=list)

    def tiles(self) -> int:
        return int(self.dep.stats(detail=False)["devices"][self.device]["tiles"])

    def revive(self) -> None:
        self.tiles_at_revival = None

        def work() -> None:
            try:
                self.revive_s.append(self.cluster.revive(self.device))
                self.tiles_at_revival = self.tiles()
            except Exception as e:  # noqa: BLE001 - the verdict reports it
                self.errors.append(f"{type(e).__name__}: {e}")

        self.thread = threading.Thread(target=work, name="soak-revive", daemon=True)
        self.thread.start()

    def revived(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def took_tile(self) -> bool:
        """Whether it took a tile since its revival (one statistics call on the driver thread)."""
        return self.tiles_at_revival is not None and self.tiles() > self.tiles_at_revival

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=300)


def run_soak(devices: str = SOAK_DEVICES, frames: int = SOAK_FRAMES, period: int = SOAK_PERIOD, *,
             size: int = SOAK_SIZE, grid: Any = (2, 2), in_flight: int | None = None, scale: float | None = None,
             progress: bool = True, windows: int = WINDOWS,
             on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring); ``report["ok"]`` and
    ``report["verdict"]`` say whether it met the targets."""
    import fleet
    from sims.metrics import throughput_depth

    if frames < 1 or period < 2:
        raise ValueError(f"--frames must be >= 1 and --fail-every >= 2, got {frames} and {period}")
    w = soak_model(size)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(w.example.shape, generator=g) for _ in range(DISTINCT)]
    with torch.no_grad():
        refs = [w.model(x) for x in xs]
    say = on_event or (lambda _: None)
    t_start = time.monotonic()
    with fleet.connect(emulate=devices, scale=scale) as cluster:
        ids = [d["id"] for d in cluster.devices()]
        if len(ids) < 2:
            raise ValueError(f"the soak fails one device and needs another to carry on: --devices {devices!r}")
        dep = cluster.deploy(w.model, w.example, grid=grid)
        depth = in_flight or throughput_depth([d["gflops"] for d in cluster.devices()])
        soak = _Soak(cluster, dep, _Victim(cluster, dep, ids[-1]), ids[:-1], Chaos(period), _Loop(dep, xs, refs, depth),
                     say, progress)
        soak.warm_up()
        soak.timed(frames)
        report = {"mode": "soak", "model": w.name, "devices": devices, "grid": plan_label(dep.plan),
                  "tiles_per_frame": sum(len(s.tiles) for s in dep.plan.stages), "scale": cluster.scale,
                  "in_flight": depth, "frames": frames, "fail_every": period, "distinct_inputs": DISTINCT,
                  **soak.report(windows), "total_s": time.monotonic() - t_start}
        report["tiles_expected"] = soak.run.delivered * report["tiles_per_frame"]
        dep.close()
    report["ok"], report["verdict"] = verdict(report)
    return report


@dataclass
class _Soak:
    """One soak on a connected cluster: warm-up, then the timed frames, then what they showed."""

    cluster: Any
    dep: Any
    victim: _Victim
    steady: list[str]  # the devices that never fail
    chaos: Chaos
    run: _Loop
    say: Callable[[str], None]
    progress: bool
    frame: int = 0  # frames submitted so far, warm-up included
    warm_frames: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    warm_rss: dict[str, int] = field(default_factory=dict)
    events: list[tuple[int, str, float]] = field(default_factory=list)  # (timed frame, what, s into the run)
    samples: list[dict[str, Any]] = field(default_factory=list)
    cycles_before: int = 0
    wall: float = 0.0
    load: list[float] = field(default_factory=list)

    def warm_up(self) -> None:
        """At least one period, until one whole cycle is done (fail, revive, a tile taken again); then
        the RSS baseline, and statistics start afresh."""
        bar = _bar(None, self.progress)  # type: ignore[arg-type]  # (tqdm: no total, a counter)
        chaos = self.chaos
        while not (chaos.cycles >= 1 and chaos.state == "up" and self.frame >= chaos.period):
            _chaos_step(chaos, self.victim, self.frame, self.say)
            self.run.submit(self.frame)
            self.frame += 1
            bar.update(1)
        self.run.drain()
        bar.close()
        self.warm_frames = self.frame
        self.pids = {d["id"]: d["pid"] for d in self.cluster.devices()}
        gc.collect()
        self.warm_rss = _rss(self.pids, self.steady)
        self.dep.reset_stats()
        self.run.reset()
        self.victim.revive_s.clear()
        self.victim.waited_s.clear()
        self.cycles_before = chaos.cycles
        self.say(f"warm-up done after {self.frame} frames; RSS "
                 + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in self.warm_rss.items()))

    def timed(self, frames: int) -> None:
        bar = _bar(frames, self.progress)
        self.samples = [_sample(0, 0.0, self.warm_rss)]
        every = max(1, frames // 100)
        self.load = [os.getloadavg()[0]]
        t0 = self.run.start_clock()
        for j in range(frames):
            what = _chaos_step(self.chaos, self.victim, self.frame, self.say)
            if what:
                self.events.append((j, what, time.monotonic() - t0))
            self.run.submit(self.frame, timed=True)
            self.frame += 1
            bar.update(1)
            if j % every == 0 and j:
                self.samples.append(_sample(j, time.monotonic() - t0, _rss(self.pids, self.steady, quiet=True)))
        self.run.drain()
        self.wall = time.monotonic() - t0
        self.load.append(os.getloadavg()[0])
        bar.close()
        self.victim.join()

    def report(self, windows: int) -> dict[str, Any]:
        """What the timed run showed (after it, with every frame collected)."""
        chaos, victim, run = self.chaos, self.victim, self.run
        since = self.frame - chaos.since if chaos.state == "returning" and not victim.took_tile() else 0
        gc.collect()
        end_rss = _rss(self.pids, self.steady)
        self.samples.append(_sample(len(run.done), self.wall, end_rss))
        snap = self.dep.stats(detail=False)
        core = self.cluster.driver.core
        # what the driver keeps by design, up to a bound, and so grows until full (see the verdict)
        history = self.cluster.driver.call(lambda: {"trace_events": len(core.trace), "trace_cap": MAX_TRACE,
                                                    "scheduler_finished_frames_cap": core.sched.log_size,
                                                    "frames_since_start": core.next_frame})
        still = {d["id"]: d["pid"] for d in self.cluster.devices()}
        wins = fps_windows(run.done, windows, self.events, run.cpu)
        devs = snap["devices"].values()
        return {
            "warmup_frames": self.warm_frames, "victim": victim.device, "never_failed": self.steady,
            "wall_s": self.wall, "fps": len(run.done) / self.wall if self.wall > 0 else 0.0,
            "host_load_1min": self.load, "host_cpus": os.cpu_count(),
            "fps_windows": wins, "fps_summary": fps_summary(wins),
            # each frame is submitted once and its future read once: a second completion of a frame would
            # show in the driver's count of completed frames (or crash the driver, and every frame is lost)
            "lost": run.lost, "duplicated": max(0, snap["frames"]["count"] - run.delivered), "wrong": run.wrong,
            "max_rel_error": run.max_err, "errors": run.errors[:5], "driver_frames_done": snap["frames"]["count"],
            "tiles_accepted": int(sum(d["tiles"] for d in devs)), "retries": int(sum(d["retries"] for d in devs)),
            "host_too_slow": int(sum(d["host_too_slow"] for d in devs)),
            "cycles": chaos.cycles - self.cycles_before, "events": [list(e) for e in self.events],
            "victim_state": chaos.state, "revived_without_tile_frames": since,
            "revive_s": victim.revive_s, "revive_errors": victim.errors, "revive_waits_s": victim.waited_s,
            "never_failed_pids_unchanged": all(still[d] == self.pids[d] for d in self.steady),
            "rss_source": rss_source(), "rss_target_mb": RSS_TARGET_MB, "rss": rss_growth(self.warm_rss, end_rss),
            "rss_samples": self.samples, "driver_history": history,
        }


def _chaos_step(chaos: Chaos, victim: _Victim, frame: int, say: Callable[[str], None]) -> str | None:
    revived = victim.revived()
    took = chaos.state == "returning" and victim.took_tile()
    what = chaos.step(frame, revived, took)
    if what == "wait":
        t = time.monotonic()
        victim.join()
        victim.waited_s.append(time.monotonic() - t)
        say(f"frame {frame}: waited {victim.waited_s[-1]:.1f} s for the revival of {victim.device}")
        chaos.step(frame, True, False)
    elif what == "fail":
        victim.cluster.fail(victim.device)
        say(f"frame {frame}: failed {victim.device}")
    elif what == "revive":
        victim.revive()
        say(f"frame {frame}: reviving {victim.device}")
    return what


class _Loop:
    """Frames in flight, collected in order and checked against the reference of their input."""

    def __init__(self, dep: Any, xs: list[torch.Tensor], refs: list[Any], depth: int) -> None:
        self.dep, self.xs, self.refs, self.depth = dep, xs, refs, depth
        self.window: list[tuple[int, bool, Any]] = []
        self.t0 = self.c0 = 0.0
        self.reset()

    def reset(self) -> None:
        self.lost = self.wrong = self.delivered = 0
        self.max_err = 0.0
        self.errors: list[str] = []
        self.done: list[float] = []
        self.cpu: list[float] = []

    def start_clock(self) -> float:
        """The timed run starts: completion times and CPU seconds count from now."""
        self.t0, self.c0 = time.monotonic(), time.process_time()
        return self.t0

    def submit(self, frame: int, timed: bool = False) -> None:
        self.window.append((frame, timed, self.dep.submit(self.xs[frame % DISTINCT])))
        while len(self.window) >= self.depth:
            self._collect()

    def drain(self) -> None:
        while self.window:
            self._collect()

    def _collect(self) -> None:
        frame, timed, fut = self.window.pop(0)
        try:
            y = fut.result(timeout=RESULT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a lost frame: counted, and the run goes on
            self.lost += 1
            self.errors.append(f"frame {frame}: {type(e).__name__}: {e}")
            y = None
        if timed:
            self.done.append(time.monotonic() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
        if y is None:
            return
        self.delivered += 1
        err = tiling.rel_error(y, self.refs[frame % DISTINCT])
        self.max_err = max(self.max_err, err)
        if not err <= TOL:
            self.wrong += 1
            self.errors.append(f"frame {frame}: relative error {err:.3g} > {TOL:g}")


def _rss(pids: dict[str, int], steady: Sequence[str], quiet: bool = False) -> dict[str, int]:
    out = {"driver": read_rss(os.getpid())}
    for d in steady:
        try:
            out[d] = read_rss(pids[d])
        except OSError:
            if not quiet:
                raise
    return out


def _sample(frame: int, t: float, rss: dict[str, int]) -> dict[str, Any]:
    return {"frame": frame, "t_s": t, **{k: v / MB for k, v in rss.items()}}
