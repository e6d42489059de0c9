"""Plots of runs, as PNG files (matplotlib, the ``plot`` extra: ``pip install 'tilefleet[plot]'``).

``tilefleet sim --plot``: what each device did during a few frames (a Gantt chart: tiles, tails,
and the transfers the device model timed) above every frame's latency against when it was
submitted. The data is pulled out of the report first (:func:`sim_plot_data`, pure, tested on its
own); drawing it is the only part that needs matplotlib, imported here and nowhere else
(:func:`pyplot`, on the Agg backend: no display needed). ``tilefleet loadtest --plot``
(:func:`plot_load`) and ``tilefleet bench --soak --plot`` (:func:`plot_soak`) are drawn here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_EXTRA = "pip install 'tilefleet[plot]'"
MAX_ROWS = 32  # devices drawn in the timeline; a bigger fleet shows its first MAX_ROWS that worked


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"plotting needs matplotlib: {PLOT_EXTRA} (or drop --plot)") from None
    return plt


@dataclass(frozen=True)
class Bar:
    device: str
    kind: str  # "tile" or "tail" (compute), "rx" or "tx" (the device's link)
    frame: int
    start: float  # seconds since the first bar
    end: float


@dataclass(frozen=True)
class SimPlotData:
    devices: list[str]  # timeline rows, top to bottom, in fleet order
    bars: list[Bar]
    frames: list[int]  # the frames the timeline shows
    latency: list[tuple[float, float]]  # (submitted, s; latency, ms) of every timed frame
    hidden_devices: int  # devices that worked on those frames but had no row left
    title: str


def sim_plot_data(report: Mapping[str, Any], frames: int = 4) -> SimPlotData:
    """The first ``frames`` timed frames (after the warm-up) of a ``tilefleet sim`` report run with a
    trace, as bars per device; and latency over time for every timed frame."""
    trace: Sequence[Mapping[str, Any]] = report.get("trace") or []
    seen = sorted({int(e["args"]["frame"]) for e in trace if "frame" in e.get("args", {})})
    timed = [f for f in seen if f >= report.get("warmup", 0)] or seen
    chosen = timed[:frames]
    wanted = set(chosen)
    events = [e for e in trace if e.get("args", {}).get("frame") in wanted]
    t0 = min((e["start"] for e in events), default=0.0)
    scale = report.get("scale", 1.0) or 1.0
    bars = [Bar(e["device"], e["args"].get("kind", "tile") if e["lane"] == "compute" else e["lane"],
                int(e["args"]["frame"]), (e["start"] - t0) / scale, (e["end"] - t0) / scale) for e in events]
    busy = {b.device for b in bars}
    order = [d for d in report.get("per_device", {}) if d in busy]
    order += sorted(busy - set(order))
    rows = order[:MAX_ROWS]
    shown = set(rows)
    latency = [(float(t), float(lat) * 1e3) for t, lat in report.get("latency_over_time", [])]
    title = (f"{report.get('model', '')} on {report.get('devices', '')}: {report.get('plan', '')}, "
             f"{report.get('mode', '')} mode")
    return SimPlotData(rows, [b for b in bars if b.device in shown], chosen, latency, len(order) - len(rows), title)


_LANES = {"rx": (0.62, 0.22), "tile": (0.3, 0.3), "tail": (0.3, 0.3), "tx": (0.08, 0.22)}  # (offset, height)


def plot_sim(data: SimPlotData, path: str | Path) -> Path:
    """A timeline of the chosen frames above latency over time; returns the PNG's path."""
    plt = pyplot()
    from matplotlib.patches import Patch

    rows = max(1, len(data.devices))
    fig, (top, low) = plt.subplots(2, 1, figsize=(11, 3 + 0.32 * rows + 2.5),
                                   gridspec_kw={"height_ratios": [0.6 + 0.3 * rows, 2.5]})
    colours = plt.get_cmap("tab10")
    colour = {f: colours(i % 10) for i, f in enumerate(data.frames)}
    y = {d: rows - 1 - i for i, d in enumerate(data.devices)}
    for b in data.bars:
        off, h = _LANES[b.kind]
        top.broken_barh([(b.start * 1e3, max(b.end - b.start, 0.0) * 1e3)], (y[b.device] + off, h),
                        facecolors=colour[b.frame], alpha=0.45 if b.kind in ("rx", "tx") else 0.95,
                        edgecolor="black" if b.kind == "tail" else "none", hatch="//" if b.kind == "tail" else None)
    top.set_yticks([y[d] + 0.5 for d in data.devices], data.devices)
    top.set_ylim(0, rows)
    top.set_xlabel("ms since the first of these frames' work began (rx above, tx below each device's compute)")
    more = f"; {data.hidden_devices} more devices not drawn" if data.hidden_devices else ""
    top.set_title(f"{data.title}\nframes {', '.join(map(str, data.frames))}{more}", fontsize=10)
    handles = [Patch(color=colour[f], label=f"frame {f}") for f in data.frames]
    if any(b.kind == "tail" for b in data.bars):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="tail"))
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if data.latency:
        xs, ys = zip(*data.latency)
        low.plot(xs, ys, marker=".", linestyle="-", linewidth=0.6)
    low.ticklabel_format(useOffset=False)
    low.set_ylim(bottom=0)
    low.set_xlabel("submitted at (s)")
    low.set_ylabel("latency (ms)")
    low.set_title("latency per frame over time", fontsize=10)
    low.grid(True, alpha=0.3)
    return _save(plt, fig, path, dpi=110)


def plot_load(reports: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """``tilefleet loadtest --plot``: latency percentiles against offered load."""
    plt = pyplot()
    xs = [r["offered_rps"] for r in reports]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        ax.plot(xs, [r[key] if r[key] is not None else float("nan") for r in reports], marker="o",
                label=key.removesuffix("_ms"))
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_yscale("log")
    ax.set_title(title or "latency against offered load (open loop)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, path)


def plot_soak(r: Mapping[str, Any], path: str | Path) -> Path:
    """``tilefleet bench --soak --plot``: frames per second in windows and RSS over the run."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    wins = r["fps_windows"]
    fps = [w["fps"] or float("nan") for w in wins]
    ax1.step([0.0] + [w["t_end_s"] for w in wins], fps[:1] + fps, where="pre", label="fps per window")
    ax1.axhline(r["fps"], color="grey", linestyle=":", label=f"overall {r['fps']:.1f}")
    for _, what, t in r["events"]:
        ax1.axvline(t, color="red" if what == "fail" else "green", alpha=0.25, linewidth=0.8)
    ax1.set_ylabel("frames / s")
    ax1.set_title(f"soak: {r['frames']} frames of {r['model']} on {r['devices']} ({r['victim']} fails and returns; "
                  "red: fail, green: revive)", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    ts = [s["t_s"] for s in r["rss_samples"]]
    for name in r["rss"]:
        ax2.plot(ts, [s.get(name, float("nan")) for s in r["rss_samples"]], label=name)
    ax2.set_xlabel("seconds into the timed run")
    ax2.set_ylabel("RSS (MB)")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
