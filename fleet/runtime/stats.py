"""Per-deployment statistics, kept by the driver thread and handed out only as snapshots.

The driver records every accepted result into a :class:`Counters` (one per device) and every
finished frame's latency; a client asking for ``Deployment.stats()`` gets a copy made on the driver
thread, so no client thread ever reads a structure the driver is writing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.report import Report

MAX_OVERHEADS = 100_000
MAX_LATENCIES = 20_000  # a long-running server keeps the most recent frames' latencies only (~2 MB)
MAX_TRACE = 20_000  # the last tiles' lanes for dep.trace() (~6 MB): a long run must not grow by its history


@dataclass
class Counters:
    """One device's work for one deployment (accepted results only)."""

    tiles: int = 0
    tails: int = 0
    busy_s: float = 0.0  # emulated compute time (the device's own clock), or host compute if not emulated
    host_compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    failures: int = 0
    host_too_slow: int = 0  # results the host finished after the emulated device would have delivered them
    worst_host_ratio: float = 0.0
    max_late_s: float = 0.0

    def record(self, report: Report, tail: bool = False) -> None:
        self.tails += tail
        self.tiles += not tail
        self.busy_s += report.busy_s
        self.host_compute_s += report.compute_s
        self.bytes_in += report.bytes_in
        self.bytes_out += report.bytes_out
        tl = report.timeline
        if tl:
            emulated = tl["compute_end"] - tl["compute_start"]
            self.worst_host_ratio = max(self.worst_host_ratio, report.compute_s / max(1e-9, emulated))
            late = report.computed_at - tl["done"]
            if report.computed_at and late > 1e-3:
                self.host_too_slow += 1  # the host finished after the emulated device would have: say so
                self.max_late_s = max(self.max_late_s, late)


@dataclass
class DeploymentStats:
    """What the driver knows of one deployment's frames and devices."""

    counters: dict[str, Counters] = field(default_factory=dict)
    latencies: OrderedDict[int, float] = field(default_factory=OrderedDict)
    overheads: list[float] = field(default_factory=list)  # dispatch overhead per tile (round trip - compute)
    frames_done: int = 0
    # tiles that continue after a reduce point: how many, the bytes of maps they took from another
    # device (0 while pinning holds), and the most partial bytes one of them fetched from others
    continued: int = 0
    continued_map_bytes: int = 0
    continued_partial_bytes_max: int = 0

    def record_continuation(self, map_bytes: int, partial_bytes: int) -> None:
        self.continued += 1
        self.continued_map_bytes += map_bytes
        self.continued_partial_bytes_max = max(self.continued_partial_bytes_max, partial_bytes)
    frames_cancelled: int = 0  # given up on (Deployment.cancel) before they finished

    def record_latency(self, frame: int, seconds: float) -> None:
        self.latencies[frame] = seconds
        self.frames_done += 1
        if len(self.latencies) > MAX_LATENCIES:
            self.latencies.popitem(last=False)

    def device(self, device: str) -> Counters:
        return self.counters.setdefault(device, Counters())

    def record_overhead(self, seconds: float) -> None:
        if len(self.overheads) < MAX_OVERHEADS:
            self.overheads.append(seconds)

    def reset(self) -> None:
        self.counters.clear()
        self.latencies.clear()
        self.overheads.clear()
        self.frames_done = 0
        self.continued = self.continued_map_bytes = self.continued_partial_bytes_max = 0
        self.frames_cancelled = 0

    def snapshot(self, devices: dict[str, bool], sched: dict[str, Any], weight_bytes: int,
                 detail: bool = True) -> dict[str, Any]:
        """A plain-data copy: per device counters with the scheduler's steals and retries, per frame latency.

        ``devices`` maps each device to whether it is alive; ``sched`` is ``Scheduler.stats()``.
        """
        out = {}
        for did, alive in devices.items():
            c = asdict(self.counters.get(did, Counters()))
            s = sched.get(did)
            out[did] = {**c, "alive": alive, "steals": s.steals if s else 0, "retries": s.retries if s else 0,
                        "speculated": s.speculated if s else 0, "speculation_wins": s.speculation_wins if s else 0,
                        # weights held from deploy on + the most tile memory ever in flight at once
                        "peak_bytes": (weight_bytes + s.peak_high_water) if (c["tiles"] and s) else 0}
        frames: dict[str, Any] = {"count": self.frames_done, "cancelled": self.frames_cancelled}
        if not detail:
            return {"devices": out, "frames": frames}
        frames["reduce"] = {"continued_tiles": self.continued, "map_bytes_moved": self.continued_map_bytes,
                            "max_partial_bytes_per_tile": self.continued_partial_bytes_max}
        lat = list(self.latencies.values())
        if lat:
            frames.update(p50_ms=percentile(lat, 50) * 1e3, p95_ms=percentile(lat, 95) * 1e3,
                          mean_ms=statistics.mean(lat) * 1e3)
        return {"devices": out, "frames": frames, "latency_s": dict(self.latencies),
                "dispatch_overhead_s": list(self.overheads)}


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass(frozen=True)
class TraceEvent:
    device: str
    lane: str  # rx, compute, tx
    name: str
    start: float
    end: float
    args: dict[str, Any] = field(default_factory=dict)


def trace_events(device: str, name: str, report: Report,
                 args: dict[str, Any] | None = None) -> list[TraceEvent]:
    """A result's lanes: emulated rx / compute / tx when the device is emulated, else its compute.
    ``args`` (the frame, and whether a tile or a tail) go with every lane, for plots and viewers."""
    tl = report.timeline
    a = args or {}
    if tl:
        return [TraceEvent(device, lane, name, tl[s], tl[e], a)
                for lane, s, e in (("rx", "rx_start", "rx_end"), ("compute", "compute_start", "compute_end"),
                                   ("tx", "tx_start", "tx_end")) if tl[e] > tl[s]]
    return [TraceEvent(device, "compute", name, report.finish - report.compute_s, report.finish, a)]


def write_chrome_trace(events: Sequence[TraceEvent], path: str | os.PathLike[str]) -> Path:
    """Chrome's trace format (chrome://tracing, Perfetto): one process per device, a thread per lane."""
    ids = {d: i for i, d in enumerate(sorted({e.device for e in events}))}
    lanes = {"rx": 1, "compute": 2, "tx": 3}
    out: list[dict[str, Any]] = []
    for d, i in ids.items():
        out.append({"name": "process_name", "ph": "M", "pid": i, "args": {"name": d}})
        for lane, tid in lanes.items():
            out.append({"name": "thread_name", "ph": "M", "pid": i, "tid": tid, "args": {"name": lane}})
    t0 = min((e.start for e in events), default=0.0)
    for e in events:
        out.append({"name": e.name, "ph": "X", "pid": ids[e.device], "tid": lanes.get(e.lane, 2),
                    "ts": (e.start - t0) * 1e6, "dur": max(0.0, e.end - e.start) * 1e6, "args": e.args})
    p = Path(path)
    p.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
    return p
