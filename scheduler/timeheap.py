"""A heap of devices ordered by an estimated time that may move with the clock.

A device's estimated ready time is ``max(now, run_end) + rest``: ``run_end`` is when its running
tile should end, ``rest`` the work queued behind it.  While ``run_end > now`` the time is fixed
(a *static* entry, key ``run_end + rest``); once the running tile is overdue, or when nothing
runs, it is ``now + rest`` and slides with the clock (a *floating* entry, key ``rest``).  Inside
each of the two heaps the order never changes as the clock advances, so both stay valid heaps;
the best device is the better of the two tops.  The index moves a device from static to
floating when the clock passes its ``run_end`` (an expiry heap in :mod:`scheduler.index`).

Entries are deleted lazily: each carries a version, and only the version in ``cur`` counts.
The heaps are rebuilt when stale entries outnumber live ones, so memory stays O(devices).
``descending=True`` orders by latest time first (victims for stealing); ties always go to
the smaller device id, matching the objective tuples in :mod:`scheduler.placement`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

Entry = tuple[int, str, int]
"""``(sign * base, device id, version)``."""


class TimeHeap:
    """Devices by ``max(now, run_end) + rest``, ascending (or descending)."""

    __slots__ = ("_version", "cur", "floating", "sign", "static")

    def __init__(self, *, descending: bool = False) -> None:
        self.sign = -1 if descending else 1
        self.cur: dict[str, tuple[bool, int, int]] = {}  # id -> (static, base, version)
        self.static: list[Entry] = []
        self.floating: list[Entry] = []
        self._version = 0

    def __len__(self) -> int:
        return len(self.cur)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self.cur

    def set(self, device_id: str, static: bool, base: int) -> None:
        """Place the device: at ``base`` if static, else at ``now + base``."""
        old = self.cur.get(device_id)
        if old is not None and old[0] == static and old[1] == base:
            return
        self._version += 1
        self.cur[device_id] = (static, base, self._version)
        heapq.heappush(
            self.static if static else self.floating,
            (self.sign * base, device_id, self._version),
        )
        if len(self.static) + len(self.floating) > 2 * len(self.cur) + 32:
            self._rebuild()

    def discard(self, device_id: str) -> None:
        self.cur.pop(device_id, None)

    def time_of(self, device_id: str, now: int) -> int | None:
        got = self.cur.get(device_id)
        if got is None:
            return None
        return got[1] if got[0] else now + got[1]

    def _rebuild(self) -> None:
        self.static = [(self.sign * b, d, v) for d, (s, b, v) in self.cur.items() if s]
        self.floating = [(self.sign * b, d, v) for d, (s, b, v) in self.cur.items() if not s]
        heapq.heapify(self.static)
        heapq.heapify(self.floating)

    def _clean(self, heap: list[Entry]) -> Entry | None:
        cur = self.cur
        while heap:
            top = heap[0]
            got = cur.get(top[1])
            if got is not None and got[2] == top[2]:
                return top
            heapq.heappop(heap)
        return None

    def _rank(self, entry: Entry, static: bool, now: int) -> tuple[int, str]:
        """``(sign * time, id)``: the order across both heaps."""
        return (entry[0], entry[1]) if static else (entry[0] + self.sign * now, entry[1])

    def top(self, now: int) -> tuple[int, str] | None:
        """``(time, device id)`` of the first device in order, or None when empty."""
        best = self._best(now)
        if best is None:
            return None
        rank = best[0]
        return (self.sign * rank[0], rank[1])

    def _best(self, now: int) -> tuple[tuple[int, str], bool] | None:
        s = self._clean(self.static)
        f = self._clean(self.floating)
        if s is None:
            return None if f is None else (self._rank(f, False, now), False)
        rs = self._rank(s, True, now)
        if f is None:
            return (rs, True)
        rf = self._rank(f, False, now)
        return (rs, True) if rs <= rf else (rf, False)

    def _pop(self, now: int) -> tuple[tuple[int, str], bool, Entry] | None:
        best = self._best(now)
        if best is None:
            return None
        rank, static = best
        entry = heapq.heappop(self.static if static else self.floating)
        return rank, static, entry

    def _push_back(self, static: bool, entry: Entry) -> None:
        heapq.heappush(self.static if static else self.floating, entry)


class Walk:
    """Devices of several same-direction heaps in order, lazily; a context manager.

    Popped entries are pushed back on exit, so the heaps are unchanged afterwards; leave the
    ``with`` block before changing any device the walk saw.  Costs O(log n) per device seen.
    """

    def __init__(self, heaps: Sequence[TimeHeap], now: int) -> None:
        self.heaps = list(heaps)
        self.now = now
        self.taken: list[tuple[TimeHeap, bool, Entry]] = []

    def __enter__(self) -> Iterator[tuple[int, str]]:
        return self._walk()

    def __exit__(self, *exc: object) -> None:
        for heap, static, entry in self.taken:
            heap._push_back(static, entry)
        self.taken.clear()

    def _walk(self) -> Iterator[tuple[int, str]]:
        while True:
            pick: tuple[tuple[int, str], TimeHeap] | None = None
            for heap in self.heaps:
                best = heap._best(self.now)
                if best is not None and (pick is None or best[0] < pick[0]):
                    pick = (best[0], heap)
            if pick is None:
                return
            heap = pick[1]
            popped = heap._pop(self.now)
            assert popped is not None
            rank, static, entry = popped
            self.taken.append((heap, static, entry))
            yield (heap.sign * rank[0], rank[1])
