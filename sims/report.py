"""The device catalog as a readable table (``tilefleet devices --catalog``)."""

from __future__ import annotations

from collections.abc import Mapping

from .catalog import BUILTIN, MiB, Profile


def _fmt_num(v: float) -> str:
    return f"{v:g}" if v >= 1 or v == 0 else f"{v:.3g}"


def catalog_table(extra: Mapping[str, Profile] | None = None) -> str:
    """All profiles as an aligned text table, sources last, for ``tilefleet devices`` and reports."""
    table: dict[str, Profile] = dict(BUILTIN)
    if extra:
        table.update(extra)
    head = [
        "profile", "GFLOP/s", "overhead ms", "memory MiB", "runtime MiB", "GPU", "link Mbit/s", "latency ms", "source"
    ]
    rows = [
        [
            p.name + ("" if p.emulated else " (real)"),
            _fmt_num(p.gflops),
            _fmt_num(p.tile_overhead_s * 1e3),
            _fmt_num(round(p.memory_bytes / MiB, 1)),
            _fmt_num(round(p.runtime_overhead_bytes / MiB, 1)),
            "yes" if p.gpu else "no",
            _fmt_num(p.link_mbps),
            _fmt_num(p.latency_s * 1e3),
            p.source,
        ]
        for p in table.values()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        mid = [c.rjust(wd) for c, wd in zip(cells[1:-1], widths[1:])]
        return "  ".join([first, *mid, cells[-1]]).rstrip()

    sep = "  ".join(["-" * wd for wd in widths] + ["-" * len(head[-1])])
    return "\n".join([line(head), sep, *(line(r) for r in rows)])
