"""How runs are measured, one definition for bench, the simulator and the planner: steady-state
throughput with the pipeline's fill and drain trimmed, and how many frames keep a fleet busy."""

from __future__ import annotations

from collections.abc import Sequence


def steady_fps(done: Sequence[float], trim: int = 0) -> float:
    """Frames per second between the k-th and the (N-1-k)-th completion, k trimmed at each end.

    ``k`` is at least the number of frames in flight: while the pipeline fills, and once the last
    frame is submitted and it drains, frames complete faster than in steady state, and a window
    that includes the drain overstates throughput. The benchmark harness uses the same formula.
    """
    n = len(done)
    if n < 2:
        return 0.0
    k = trim_for(n, trim)
    span = done[n - 1 - k] - done[k]
    gap = 0.3 * span / max(1, n - 1 - 2 * k)  # well under the mean spacing of completions
    a, b = _burst_end(done, k, gap), _burst_end(done, n - 1 - k, gap)
    # measure between the ends of two bursts: with whole frames per device, completions come in
    # bursts, and a window that opens inside one would count frames finished before it
    return (b - a) / (done[b] - done[a]) if done[b] > done[a] else float("inf")


def _burst_end(done: Sequence[float], i: int, gap: float) -> int:
    while i + 1 < len(done) and done[i + 1] - done[i] < gap:
        i += 1
    return i


def trim_for(n: int, in_flight: int) -> int:
    """Frames trimmed at each end: the number in flight, but always leaving half the frames."""
    return min(max(in_flight, n // 8), max(0, (n - 2) // 4))


def throughput_depth(gflops: Sequence[float], cap: int = 48) -> int:
    """Frames to keep in flight for steady-state throughput on a mixed cluster.

    Results come back in submission order, so the slowest device's frame blocks the window: the
    window must hold what every device does while the slowest finishes one frame, i.e. the sum of
    speeds relative to the slowest, plus one per device for the pipeline (and never under 2 each).
    """
    if not gflops:
        return 2
    lo = min(gflops)
    return int(min(cap, max(2 * len(gflops), round(sum(g / lo for g in gflops)) + len(gflops))))
