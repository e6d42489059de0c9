"""What a worker says about one tile or tail: a typed report, the contract between workers and driver.

A report is a value, never an exception: success carries the work's timings and byte counts, failure
names the error and whether a retry may help. The Ray worker returns one per call (beside the payload,
which stays in its object store); the simulator makes the same reports from its device model, so
the driver reads one type in both worlds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cost:
    """What a unit of work asks of a device: arithmetic and the bytes that cross its link."""

    flops: int
    in_bytes: int  # bytes that reach the device over its link (crops, or outputs of tiles elsewhere)
    out_bytes: int  # bytes it sends back (its outputs and reuse pieces)


@dataclass(frozen=True)
class Report:
    """One tile's or tail's outcome on a device.

    ``timeline`` (emulated devices) holds the device's own rx / compute / tx instants on the host's
    clock; ``compute_s`` is the host's real compute time (0 in the simulator).
    """

    device: str
    ok: bool
    arrive: float = 0.0
    finish: float = 0.0
    compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    computed_at: float = 0.0
    torch_device: str = "cpu"
    timeline: dict[str, float] | None = None
    error: str = ""
    message: str = ""
    retryable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def busy_s(self) -> float:
        """Seconds the device was computing: its emulated compute interval, else the host's time."""
        tl = self.timeline
        return (tl["compute_end"] - tl["compute_start"]) if tl else self.compute_s

    @property
    def reason(self) -> str:
        return f"{self.error}: {self.message}"
