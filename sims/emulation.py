"""Device emulation as a wrapper: the real tile runs on the host, the result waits for the emulated clock.

The timing model lives in :mod:`sims.clock` (pure, shared with the simulator); this module only
carries a profile into a worker process and keeps that device's clock there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sims.catalog import Profile
from sims.clock import DeviceClock, Timeline


@dataclass
class Emulation:
    profile: Profile
    scale: float = 1.0
    slow_factor: float = 1.0

    def __post_init__(self) -> None:
        self.clock = DeviceClock(self.profile, self.scale)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Emulation:
        return cls(Profile(**d["profile"]), float(d.get("scale", 1.0)), float(d.get("slow_factor", 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"profile": dataclasses.asdict(self.profile), "scale": self.scale, "slow_factor": self.slow_factor}

    def admit(self, now: float, bytes_in: int, flops: int, bytes_out: int) -> TimelineView:
        return TimelineView(self.clock.admit(now, bytes_in, flops, bytes_out, slow_factor=self.slow_factor))


@dataclass(frozen=True)
class TimelineView:
    timeline: Timeline

    @property
    def done(self) -> float:
        return float(self.timeline.done)

    def as_dict(self) -> dict[str, float]:
        return self.timeline.as_dict()
