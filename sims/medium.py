"""A shared medium: devices behind one Wi-Fi access point share its bandwidth.

Without it, every device has its own full-duplex link (:mod:`sims.clock`): four Pis on 40 Mbit/s
each move 160 Mbit/s in all. Behind one access point they do not: Wi-Fi is one half-duplex radio
channel, and only one station's frames are on the air at a time (CSMA/CA takes turns). So
``tilefleet sim --shared-link MBIT`` puts every byte that enters or leaves any device (the
device's rx and tx, a device-to-device transfer twice, as the access point relays it) on one
channel of ``MBIT`` Mbit/s.

The model: a FIFO channel in the order transfers are booked, work-conserving
--------------------------------------------------------------------------
A transfer of ``b`` bytes from a device whose own link runs at ``r`` needs ``b / min(r, MBIT)``
seconds of air time (a slow station holds the air longer: 802.11's airtime, not its bytes, is what
is shared). It is on the air only when nothing else is: from the moment it is ready, it takes the
channel's idle time until it has had its air time. Transfers are served in the order they are
booked; a later booking never delays an earlier one, and the channel is never idle while a
transfer waits. So the bytes carried in any interval never exceed ``MBIT`` times its length, and
with ``n`` devices sending at once each gets about ``1/n`` of the channel.

Why this and not processor sharing (every active transfer at ``MBIT / n`` at once): the device model
books a tile's whole timeline when the tile is dispatched (its input now, its result when its
compute will end), which is what keeps the simulator and the emulated workers on one model and
the simulator fast (no event per transfer). Processor sharing needs the set of concurrent
transfers to be known as time passes; booking in order gives the same throughput (both are
work-conserving at the channel's bandwidth) and differs only in which transfer finishes first. A
result booked for later therefore keeps its slot when the channel is busy in between: the
transfers booked after it fill the gaps around it (a transfer may be split by earlier bookings).

Pure arithmetic on seconds, seeded by nothing: the same bookings give the same answer.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

__all__ = ["SharedLink", "check_mbps"]


def check_mbps(v: float) -> float:
    """A shared link's bandwidth in Mbit/s: a finite number > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"the shared link's bandwidth must be a finite number of Mbit/s > 0 (e.g. 54 for "
                         f"802.11g, 150 for one 802.11n stream), got {v!r}; without a shared link every "
                         "device has its own link")
    return float(v)


@dataclass
class SharedLink:
    """One channel of ``mbps`` Mbit/s that every device's transfers cross, one at a time.

    ``log``: keep every transfer's pieces of air time (tests check them; a long run would not).
    """

    mbps: float
    scale: float = 1.0
    log: bool = False
    bytes: int = 0
    busy_s: float = 0.0
    transfers: int = 0
    pieces: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, transfer number)
    _starts: list[float] = field(default_factory=list, repr=False)  # booked air time: disjoint, sorted,
    _ends: list[float] = field(default_factory=list, repr=False)  # never touching

    def __post_init__(self) -> None:
        self.mbps = check_mbps(self.mbps)

    @property
    def bps(self) -> float:
        """Bytes per second."""
        return self.mbps * 1e6 / 8

    def airtime(self, nbytes: int, device_bps: float) -> float:
        """Seconds ``nbytes`` hold the channel from a device whose own link carries ``device_bps``."""
        return self.scale * nbytes / min(self.bps, device_bps)

    def carry(self, ready: float, nbytes: int, device_bps: float) -> tuple[float, float]:
        """Book ``nbytes`` ready at ``ready``; returns when its first byte goes on the air and when
        its last arrives (propagation latency is the caller's)."""
        seconds = self.airtime(nbytes, device_bps)
        self.bytes += nbytes
        self.busy_s += seconds
        self.transfers += 1
        return self._book(ready, seconds)

    def forget_before(self, t: float) -> None:
        """No booking will start before ``t`` again (the simulator's clock has passed it)."""
        k = bisect.bisect_right(self._ends, t)
        if k:
            del self._starts[:k]
            del self._ends[:k]

    def totals(self, span_s: float) -> dict[str, float]:
        """What the channel carried over a run of ``span_s`` seconds (for reports)."""
        span = span_s / self.scale if span_s > 0 else 0.0
        return {"mbps": self.mbps, "bytes": float(self.bytes), "transfers": float(self.transfers),
                "busy_s": self.busy_s / self.scale, "utilisation": (self.busy_s / self.scale / span) if span else 0.0,
                "carried_mbps": (self.bytes * 8 / 1e6 / span) if span else 0.0}

    def _book(self, ready: float, seconds: float) -> tuple[float, float]:
        if seconds <= 0:
            return ready, ready
        starts, ends = self._starts, self._ends
        i = lo = bisect.bisect_right(ends, ready)  # the first booking still on the air after ``ready``
        if i < len(starts) and starts[i] <= ready:  # the channel is busy at ``ready``: wait for that booking
            first, cur = starts[i], ends[i]
            i += 1
        else:
            first = cur = ready
        start, left = cur, seconds
        while True:
            gap_end = starts[i] if i < len(starts) else math.inf
            if gap_end - cur >= left:
                end = cur + left
                self._log(cur, end)
                break
            self._log(cur, gap_end)
            left -= gap_end - cur
            cur = ends[i]
            i += 1
        hi = end
        if i < len(starts) and starts[i] <= end:  # the gap is filled exactly: join the next booking
            hi = ends[i]
            i += 1
        if lo > 0 and ends[lo - 1] >= first:  # join the booking that ends where this one starts
            lo -= 1
            first = starts[lo]
        starts[lo:i] = [first]
        ends[lo:i] = [hi]
        return start, end

    def _log(self, a: float, b: float) -> None:
        if self.log and b > a:
            self.pieces.append((a, b, self.transfers))
