"""Measuring speed, once for the whole project: the median time of a call, and conv GFLOP/s.

The catalog prices this host with it (:func:`sims.catalog.measure_host_gflops`), ``tilefleet
profile`` measures a LAN device with it (:mod:`fleet.lan.profiling`), and the runtime times a
model in the workers' own executor with it (:mod:`fleet.runtime.calibrate`). One rule everywhere:
warm up (allocator, kernel selection), repeat for a time budget, take the *median* run, which
ignores the odd run preempted by another process while still describing sustained speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .catalog import SAFETY_MARGIN, Profile, _is_number

FLOPS_PER_MAC = 2  # FLOPs are counted as 2 * multiply-accumulates, as FlopCounterMode counts them


def median_seconds(fn: Callable[[], Any], budget_s: float, *, sync: Callable[[], Any] | None = None,
                   min_runs: int = 3, warmup: int = 2, max_runs: int = 10_000) -> float:
    """Median seconds per call of ``fn`` over at least ``min_runs`` calls and about ``budget_s``."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= max_runs:
            break
    times.sort()
    return times[len(times) // 2]


def conv_gflops(shapes: Iterable[tuple[int, int, int]], budget_s: float, *, device: Any = "cpu",
                sync: Callable[[], Any] | None = None, on_shape: Callable[[], Any] | None = None) -> float:
    """GFLOP/s of 3x3 stride-1 convolutions ``(c_in, c_out, side)`` on ``device``: total FLOPs over
    total median time, i.e. weighted like a network built of these layers."""
    import torch  # local: the catalog stays importable (and cheap) without torch

    shapes = list(shapes)
    gen = torch.Generator().manual_seed(0)
    share = budget_s / max(1, len(shapes))
    flops = seconds = 0.0
    with torch.inference_mode():
        for cin, cout, side in shapes:
            x = torch.randn(1, cin, side, side, generator=gen).to(device)
            w = (torch.randn(cout, cin, 3, 3, generator=gen) * 0.05).to(device)
            seconds += median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), share, sync=sync,
                                      min_runs=5, warmup=3)
            flops += FLOPS_PER_MAC * cin * cout * 9 * side * side
            if on_shape:
                on_shape()
    return flops / max(seconds, 1e-12) / 1e9


_HOST_GFLOPS: dict[int, float] = {}


def measure_host_gflops(seconds: float = 0.3, threads: int = 1, *, refresh: bool = False) -> float:
    """Sustained conv GFLOP/s of this machine on ``threads`` torch threads, cached per process.

    Emulation is only honest while the host outruns every emulated device (:func:`clock_scale`), so
    the host's speed must be known, and known for the shape of work tiles do: a 64->64 3x3 conv on
    1x64x76x76, a YOLOv2-sized layer (0.43 GFLOP, counted as 2 * MACs), not a matrix-multiply peak.
    After a warm-up (allocator, oneDNN kernel selection), runs repeat for about ``seconds``; the rate
    comes from the *median* run, which ignores the odd run preempted by a concurrent process while
    still describing sustained, not best-case, speed. torch's thread count is restored afterwards,
    since workers set their own. The first measurement per thread count is kept (``refresh=True``
    measures again): the figure sizes the clock scale, which must not drift within one run.
    """
    if not (_is_number(seconds) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if not refresh and threads in _HOST_GFLOPS:
        return _HOST_GFLOPS[threads]

    import torch  # local: the catalog must stay importable (and cheap) without paying for torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rate = conv_gflops([(64, 64, 76)], seconds)
    finally:
        torch.set_num_threads(before)
    _HOST_GFLOPS[threads] = rate
    return rate


def clock_scale(profiles: Sequence[Profile], host_gflops: float) -> float:
    """How much to slow the emulated clock so the host stays well ahead of every emulated device.

    An emulated tile really runs on the host and then waits until its emulated finish time; if the
    host needs longer than the emulated device would, the device is emulated *too slow* and the
    result is silently wrong. With :data:`SAFETY_MARGIN` = 2 (room for Ray, the driver and other
    workers sharing the host) the scale is ``s = max(1, 2 * max(emulated gflops) / host_gflops)``,
    and every emulated duration (compute, transfer, latency) is multiplied by ``s``. Non-emulated
    profiles (``host``) do not count. Relative results survive scaling, but absolute ones drift as
    Ray's own real, unscaled costs shrink in comparison: runs with ``s > 4``
    (:data:`COMPARABLE_SCALE`) are not comparable to the targets (DeepThings' and MoDNN's figures),
    and reports should say so.
    """
    if not (_is_number(host_gflops) and math.isfinite(host_gflops) and host_gflops > 0):
        raise ValueError(f"host_gflops must be a finite number > 0, got {host_gflops!r}")
    fastest = max((p.gflops for p in profiles if p.emulated), default=0.0)
    return max(1.0, SAFETY_MARGIN * fastest / host_gflops)
