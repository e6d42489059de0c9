"""Readable tables of plans: what was fused, where fusion stopped, what tiles cost."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class PlanView(Protocol):
    """What a plan table reads of a :class:`tiling.Plan` (a protocol: this module stays below plan.py)."""

    stages: Sequence[Any]
    tail: Any
    leaves: Sequence[str]

    @property
    def stop(self) -> Any: ...

    @property
    def redundancy(self) -> float: ...

    @property
    def fused_share(self) -> float: ...

MIB = 2**20


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: Sequence[str], numeric: Sequence[bool]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric))

    numeric = [all(_isnum(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = [fmt(cells[0], numeric), "  ".join("-" * w for w in widths)]
    lines += [fmt(r, numeric) for r in cells[1:]]
    return "\n".join(lines)


def _isnum(s: str) -> bool:
    try:
        float(s.rstrip("%x").replace(",", "").lstrip("+"))
        return True
    except ValueError:
        return False


def plan_table(plan: PlanView) -> str:
    rows = []
    for s in plan.stages:
        lo, hi = s.layers
        c, h, w = s.shapes[s.reference]
        rows.append([
            s.index, f"{lo}-{hi - 1}", f"{s.grid[0]}x{s.grid[1]}{' reuse' if s.reuse else ''}", len(s.tiles), f"{c}x{h}x{w}",
            f"{s.untiled_flops / 1e9:.2f}", f"{s.redundancy * 100:+.1f}%",
            f"{max(t.peak_bytes for t in s.tiles) / MIB:.1f}",
            f"{sum(t.in_bytes for t in s.tiles) / MIB:.1f}",
            f"{s.weight_bytes / MIB:.1f}",
        ])
    out = table(["stage", "layers", "grid", "tiles", "output", "GFLOP", "redundancy", "worst peak MiB",
                 "input sent MiB", "weights MiB"], rows)
    stop = plan.stop
    out += f"\nwhole plan: redundancy {plan.redundancy * 100:+.1f}%, fused share {plan.fused_share * 100:.1f}% " \
           f"of the model's FLOPs (stages of 2+ tiles), {len(plan.tail.nodes)} tail node(s) run whole"
    for s in plan.stages:
        for p in s.reduces:
            users = [t.index for t in plan.stages if p.node in t.reduced_in]
            out += (f"\nreduce point {p.node} ({p.op} over {p.input}): stage {s.index} tiles send "
                    f"{p.partial_bytes} B each per frame, combined for stage(s) {users}")
        if s.pinned:
            out += f"\nstage {s.index} continues tile by tile from stage(s) {sorted(set(s.pinned.values()))}"
    if stop is not None:
        out += f"\nfusion stops at {stop}"
    if plan.leaves:
        out += f"\nuntraceable submodules kept whole: {', '.join(plan.leaves)}"
    return out
