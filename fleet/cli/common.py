"""Small pieces every command shares: grid arguments and progress bars."""

from __future__ import annotations

from typing import Any


def parse_grid(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a grid looks like 5x5 (rows x cols), got {text!r}") from None
    return (r, c)


def progress(total: int, desc: str, unit: str = "tile") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def grid_arg(text: str) -> Any:
    return "auto" if text == "auto" else parse_grid(text)


def progress_iter(items: list[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
