"""The emulated device's timeline: when each tile's bytes and arithmetic would happen on the device.

Pure arithmetic on host-second timestamps: nothing here sleeps or reads a clock, so the simulator can
run thousands of frames in milliseconds, the emulating worker (:mod:`workers.emulation`) can ask
"when would this tile be done on a Pi 3?" and then wait until then, and tests can assert timelines
exactly. Both callers share this one model, which is what makes simulated and emulated runs agree.

The emulation model
-------------------
* **Compute.** A tile of ``flops`` takes ``flops / (gflops * 1e9) + tile_overhead_s`` seconds on the
  device, independent of how busy the host is (the host only has to be fast enough, see
  :func:`sims.catalog.clock_scale`). One tile computes at a time per device, FIFO by arrival.
* **Link.** Each device has one full-duplex link to the LAN: independent receive (rx) and transmit
  (tx) queues, each FIFO, each of bandwidth ``link_bps``. A transfer of ``b`` bytes occupies its queue
  for ``b / link_bps`` seconds and arrives ``latency_s`` after it leaves the link (latency is
  propagation: it delays the bytes, not the next transfer). Every byte that enters (rx) or leaves
  (tx) the device is charged on that device's link; the client (the driver that sends inputs and
  gathers outputs) has no limit, so a device-to-client transfer costs only the device's side.
* **Shared medium** (optional, :mod:`sims.medium`): devices behind one access point also take
  turns on one channel, so every transfer waits for its air time there as well.
* **Overlap.** Link and compute run concurrently, so the transfers of one tile overlap the
  computation of others: a tile's input can arrive while the previous tile computes, and a result
  can leave while the next tile computes.
* **Scale.** A scale factor ``s`` multiplies every emulated duration (compute, transfer, latency), to
  keep the emulation behind a host that is not much faster than the fastest emulated device.

So a tile admitted at ``now`` is received from ``max(now, rx_free)`` for ``s * bytes_in / link_bps``,
is at the device ``s * latency_s`` later, computes from ``max(that, compute_free)`` for
``s * slow_factor * (flops / (gflops * 1e9) + tile_overhead_s)``, is sent from
``max(compute_end, tx_free)`` for ``s * bytes_out / link_bps`` and is delivered ``s * latency_s``
after that. Queues are FIFO in *call* order: callers admit tiles in the order they reach the device
(the simulator in event-time order), and a zero-byte transfer still waits its turn and pays the
latency, as a message on an ordered connection would.

Between two devices (reuse halos sent to a neighbour, results passed worker to worker) the bytes go
through the sender's tx and the receiver's rx at once, at the slower of the two rates, once both are
free, and arrive after both devices' one-way latencies (:meth:`ClusterClock.transfer`); a device's
own transfers can also be charged one side at a time with :meth:`DeviceClock.charge_tx` and
:meth:`DeviceClock.charge_rx`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from sims.catalog import DeviceSpec, Profile, parse_spec
from sims.medium import SharedLink

__all__ = ["ClusterClock", "DeviceClock", "EmulatedStats", "Timeline"]


def _check_time(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number of seconds, got {v!r}")
    return float(v)


def _check_count(name: str, v: int) -> int:
    # Byte and FLOP counts come from the tiler as ints; a float here means a unit mix-up upstream.
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    return v


def _check_factor(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Timeline:
    """When one tile's input, arithmetic and output happen, in host seconds.

    ``arrive`` is when its input starts to be sent; ``rx_start``/``rx_end`` bracket the input on the
    device's rx link and ``ready`` is when it has fully arrived (``rx_end`` plus latency);
    ``compute_*`` bracket the arithmetic; ``tx_*`` the result on the tx link; ``done`` is when the
    result has been delivered. Kept as plain floats (and ``ready`` last, with a default) so it
    round-trips through ``dataclasses.asdict`` across process boundaries.
    """

    arrive: float
    rx_start: float
    rx_end: float
    compute_start: float
    compute_end: float
    tx_start: float
    tx_end: float
    done: float
    ready: float = field(default=math.nan)

    def __post_init__(self) -> None:
        if math.isnan(self.ready):
            object.__setattr__(self, "ready", self.rx_end)
        # Any inversion means a bug in the arithmetic (or a hand-built Timeline); catch it here rather
        # than as a negative wait in a benchmark report. One chained comparison: the simulator makes
        # a Timeline per tile, so this check is on its hot path.
        if not (self.arrive <= self.rx_start <= self.rx_end <= self.ready <= self.compute_start
                <= self.compute_end <= self.tx_start <= self.tx_end <= self.done):
            raise ValueError(f"timeline out of order: {self!r}")

    def as_dict(self) -> dict[str, float]:
        """Plain floats by field name: what crosses a process boundary in a worker's report."""
        return {f: float(getattr(self, f)) for f in _TIMELINE_FIELDS}

    @property
    def rx_s(self) -> float:
        """Seconds the input occupied the rx link."""
        return self.rx_end - self.rx_start

    @property
    def busy_compute_s(self) -> float:
        """Seconds the device's compute was busy with this tile."""
        return self.compute_end - self.compute_start

    @property
    def tx_s(self) -> float:
        """Seconds the result occupied the tx link."""
        return self.tx_end - self.tx_start

    @property
    def rx_wait_s(self) -> float:
        """Seconds the input waited for the rx link (earlier transfers still on it)."""
        return self.rx_start - self.arrive

    @property
    def compute_wait_s(self) -> float:
        """Seconds the tile sat on the device, input complete, waiting for earlier tiles to compute."""
        return self.compute_start - self.ready

    @property
    def tx_wait_s(self) -> float:
        """Seconds the result waited for the tx link."""
        return self.tx_start - self.compute_end

    @property
    def total_s(self) -> float:
        """From the first input byte leaving the client to the result delivered."""
        return self.done - self.arrive


_TIMELINE_FIELDS = ("arrive", "rx_start", "rx_end", "compute_start", "compute_end", "tx_start", "tx_end", "done",
                    "ready")


@dataclass(frozen=True)
class EmulatedStats:
    """What one emulated device has done since its last reset; the basis of utilisation reports."""

    tiles: int = 0
    compute_busy_s: float = 0.0
    rx_busy_s: float = 0.0
    tx_busy_s: float = 0.0
    bytes_rx: int = 0
    bytes_tx: int = 0
    flops: int = 0


class _Link:
    """One direction of a link: a FIFO queue that is busy until ``free_at``."""

    __slots__ = ("busy_s", "free_at", "nbytes")

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy_s = 0.0
        self.nbytes = 0

    def occupy(self, start: float, duration: float, nbytes: int) -> float:
        """Hold the link from ``start`` (already >= free_at) for ``duration``; return the end."""
        end = start + duration
        self.free_at = max(self.free_at, end)
        self.busy_s += duration
        self.nbytes += nbytes
        return end


class DeviceClock:
    """One emulated device's three resources (rx link, compute, tx link) and their FIFO queues.

    The clock starts idle with every resource free at time 0 (timestamps are whatever host-seconds
    origin the caller uses). It holds only "free at" times and counters, so it is cheap to copy,
    reset and drive from a simulator. With a ``medium`` (devices behind one access point,
    :mod:`sims.medium`), every transfer also needs its air time on that shared channel.
    """

    def __init__(self, profile: Profile, scale: float = 1.0, medium: SharedLink | None = None) -> None:
        if not isinstance(profile, Profile):
            raise TypeError(f"profile must be a sims.catalog.Profile, got {type(profile).__name__}")
        self.profile = profile
        self.scale = _check_factor("scale", scale)
        self.medium = medium
        self._rx = _Link()
        self._tx = _Link()
        self._compute_free = 0.0
        self._compute_busy = 0.0
        self._tiles = 0
        self._flops = 0

    def __repr__(self) -> str:
        return (
            f"DeviceClock({self.profile.name!r}, scale={self.scale:g}, rx_free={self._rx.free_at:.6g}, "
            f"compute_free={self._compute_free:.6g}, tx_free={self._tx.free_at:.6g})"
        )

    # -- durations ----------------------------------------------------------------------------------

    def compute_time(self, flops: int, slow_factor: float = 1.0) -> float:
        """Emulated seconds of compute for one tile, scale and slowdown included."""
        p = self.profile
        return self.scale * slow_factor * (flops / (p.gflops * 1e9) + p.tile_overhead_s)

    def transfer_time(self, nbytes: int) -> float:
        """Emulated seconds ``nbytes`` occupy this device's link (either direction), scale included."""
        return self.scale * nbytes / self.profile.link_bps

    @property
    def latency(self) -> float:
        """Emulated one-way latency, scale included."""
        return self.scale * self.profile.latency_s

    # -- queue state --------------------------------------------------------------------------------

    @property
    def rx_free(self) -> float:
        """When the rx link has sent everything queued so far."""
        return self._rx.free_at

    @property
    def compute_free(self) -> float:
        """When the device has computed every tile admitted so far."""
        return self._compute_free

    @property
    def tx_free(self) -> float:
        """When the tx link has sent everything queued so far."""
        return self._tx.free_at

    @property
    def stats(self) -> EmulatedStats:
        """A snapshot of the counters (a frozen copy: later calls do not change it)."""
        return EmulatedStats(
            tiles=self._tiles,
            compute_busy_s=self._compute_busy,
            rx_busy_s=self._rx.busy_s,
            tx_busy_s=self._tx.busy_s,
            bytes_rx=self._rx.nbytes,
            bytes_tx=self._tx.nbytes,
            flops=self._flops,
        )

    def reset(self) -> None:
        """Idle again, counters zeroed: one clock per device across repeated runs of a benchmark."""
        self._rx = _Link()
        self._tx = _Link()
        self._compute_free = 0.0
        self._compute_busy = 0.0
        self._tiles = 0
        self._flops = 0

    # -- charging -----------------------------------------------------------------------------------

    def admit(
        self, now: float, bytes_in: int, flops: int, bytes_out: int, *, slow_factor: float = 1.0
    ) -> Timeline:
        """Queue one tile whose input starts arriving at ``now``; return when each part happens.

        ``slow_factor`` (> 1: slower) stretches only the compute, because what it models (thermal
        throttling, a co-located job) slows the processor, not the radio.
        """
        now = _check_time("now", now)
        bytes_in = _check_count("bytes_in", bytes_in)
        flops = _check_count("flops", flops)
        bytes_out = _check_count("bytes_out", bytes_out)
        slow_factor = _check_factor("slow_factor", slow_factor)
        lat = self.latency

        rx_start, rx_end = self._carry(self._rx, now, bytes_in)
        ready = rx_end + lat

        compute_start = max(ready, self._compute_free)
        busy = self.compute_time(flops, slow_factor)
        compute_end = compute_start + busy
        self._compute_free = compute_end
        self._compute_busy += busy
        self._tiles += 1
        self._flops += flops

        tx_start, tx_end = self._carry(self._tx, compute_end, bytes_out)
        return Timeline(
            arrive=now,
            rx_start=rx_start,
            rx_end=rx_end,
            compute_start=compute_start,
            compute_end=compute_end,
            tx_start=tx_start,
            tx_end=tx_end,
            done=tx_end + lat,
            ready=ready,
        )

    def charge_tx(self, now: float, nbytes: int) -> float:
        """Send ``nbytes`` more from this device (e.g. a reuse halo to a neighbour); return its arrival.

        It queues behind everything already on the tx link, so extra traffic delays later results,
        which is exactly the cost data reuse trades against recomputation.
        """
        now = _check_time("now", now)
        nbytes = _check_count("nbytes", nbytes)
        return self._carry(self._tx, now, nbytes)[1] + self.latency

    def charge_rx(self, now: float, nbytes: int) -> float:
        """Receive ``nbytes`` more on this device (e.g. a neighbour's halo); return when it has arrived."""
        now = _check_time("now", now)
        nbytes = _check_count("nbytes", nbytes)
        return self._carry(self._rx, now, nbytes)[1] + self.latency

    def _carry(self, link: _Link, ready: float, nbytes: int) -> tuple[float, float]:
        """One transfer on one direction of the link, FIFO behind what it holds (and, with a shared
        medium, once the channel has carried it too); returns (start, end)."""
        start = max(ready, link.free_at)
        if self.medium is None or nbytes == 0:
            return start, link.occupy(start, self.transfer_time(nbytes), nbytes)
        start, end = self.medium.carry(start, nbytes, self.profile.link_bps)
        return start, link.occupy(start, end - start, nbytes)


class ClusterClock:
    """One :class:`DeviceClock` per device id, all on one scale: the simulator's view of the fleet."""

    def __init__(
        self, devices: Iterable[DeviceSpec] | Mapping[str, Profile] = (), scale: float = 1.0
    ) -> None:
        self.scale = _check_factor("scale", scale)
        self._clocks: dict[str, DeviceClock] = {}
        items = devices.items() if isinstance(devices, Mapping) else ((d.id, d.profile) for d in devices)
        for device_id, profile in items:
            self.add(device_id, profile)

    @classmethod
    def from_spec(
        cls, spec: str, scale: float = 1.0, extra: Mapping[str, Profile] | None = None
    ) -> ClusterClock:
        """A cluster straight from a spec string such as ``"pi3*4,jetson-nano"``."""
        return cls(parse_spec(spec, extra), scale)

    def add(self, device_id: str, profile: Profile) -> DeviceClock:
        """A device joins, idle; joining twice is a caller bug (the old clock's queues would be lost)."""
        if device_id in self._clocks:
            raise ValueError(f"device {device_id!r} already has a clock")
        clock = DeviceClock(profile, self.scale)
        self._clocks[device_id] = clock
        return clock

    def remove(self, device_id: str) -> DeviceClock:
        """A device leaves (or fails); its clock is returned for its final stats."""
        try:
            return self._clocks.pop(device_id)
        except KeyError:
            raise KeyError(f"no device {device_id!r}; known: {sorted(self._clocks)}") from None

    def __getitem__(self, device_id: str) -> DeviceClock:
        try:
            return self._clocks[device_id]
        except KeyError:
            raise KeyError(f"no device {device_id!r}; known: {sorted(self._clocks)}") from None

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._clocks

    def __iter__(self) -> Iterator[str]:
        return iter(self._clocks)

    def __len__(self) -> int:
        return len(self._clocks)

    @property
    def ids(self) -> list[str]:
        """Device ids in the order they joined."""
        return list(self._clocks)

    def admit(
        self,
        device_id: str,
        now: float,
        bytes_in: int,
        flops: int,
        bytes_out: int,
        *,
        slow_factor: float = 1.0,
    ) -> Timeline:
        """:meth:`DeviceClock.admit` on one device."""
        return self[device_id].admit(now, bytes_in, flops, bytes_out, slow_factor=slow_factor)

    def transfer(self, src: str, dst: str, now: float, nbytes: int) -> float:
        """Bytes from one device to another; return when they have arrived at ``dst``.

        The bytes stream through the sender's tx and the receiver's rx at the same time, so both are
        held from when both are free, for as long as the slower of the two needs; they arrive after
        both one-way latencies (device to LAN, LAN to device). A transfer to itself is free.
        """
        now = _check_time("now", now)
        nbytes = _check_count("nbytes", nbytes)
        if src == dst:
            return now
        a, b = self[src], self[dst]
        start = max(now, a._tx.free_at, b._rx.free_at)
        duration = max(a.transfer_time(nbytes), b.transfer_time(nbytes))
        a._tx.occupy(start, duration, nbytes)
        end = b._rx.occupy(start, duration, nbytes)
        return end + a.latency + b.latency

    def reset(self) -> None:
        """Every device idle again, counters zeroed."""
        for clock in self._clocks.values():
            clock.reset()

    @property
    def stats(self) -> dict[str, EmulatedStats]:
        """Per-device counters by id."""
        return {k: c.stats for k, c in self._clocks.items()}
