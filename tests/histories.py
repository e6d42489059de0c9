"""Small plans and random fault histories, one copy for the simulator's tests and Ray's.

A history is a fleet, a script of device events (kill, slow, revive, each just before a given
frame is submitted), a seeded policy of report faults, a plan and a stream of frames, all drawn
from one seed. ``tests/test_sim.py`` runs hundreds of them through the real driver in the
simulator; ``tests/test_histories_ray.py`` runs a few of the same scripts on real Ray, where a kill
is a SIGKILL and a slowdown the emulated worker's own (Ray has no report-fault injector and cannot
bring a killed worker back, so those parts stay the simulator's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

import tiling
from sims.catalog import DeviceSpec, parse_spec
from sims.profile_files import profiles
from sims.simulate import Scenario, ScenarioEvent
from sims.world import Faults

TABLE = profiles()


def conv_net(tail: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    if tail:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers).eval()


def example(size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def plan_of(grid: tuple[int, int], tail: bool = True, size: int = 32) -> tiling.Plan:
    return tiling.partition(conv_net(tail), example(size), grid=grid)


def devices(spec: str) -> list[DeviceSpec]:
    return parse_spec(spec, TABLE, max_devices=None)


@dataclass(frozen=True)
class History:
    seed: int
    spec: str  # the fleet, e.g. "pi3*2,pi4"
    events: tuple[ScenarioEvent, ...]  # in the order drawn (the scenario sorts them by frame)
    faults: Faults
    grid: tuple[int, int]
    tail: bool
    frames: int
    in_flight: int

    @property
    def scenario(self) -> Scenario:
        return Scenario(sorted(self.events, key=lambda e: e.before_frame or 0))

    def before(self, frame: int) -> list[ScenarioEvent]:
        """The events that happen just before ``frame`` is submitted, in order."""
        return [e for e in self.scenario.events if e.before_frame == frame]

    @property
    def injects_faults(self) -> bool:
        return self.faults != Faults()


def history(seed: int) -> History:
    """The history of ``seed``: up to six devices, 1-25 frames (1-6 in flight), up to four device
    events each just before a frame is submitted (so they fall inside the run in any world), report
    faults, a grid, a tail or none."""
    rng = random.Random(seed)
    spec = f"pi3*{rng.randint(1, 5)},pi4"
    devs = devices(spec)
    frames = rng.randint(1, 25)
    events = []
    for _ in range(rng.randint(0, 4)):
        d = rng.choice(devs)
        action = rng.choice(["kill", "slow", "revive"])
        events.append(ScenarioEvent(0.0, action, d.id, factor=rng.choice([2.0, 10.0]),
                                    detect_s=rng.uniform(0.1, 2.0), spec=d, before_frame=rng.randrange(frames)))
    faults = Faults(fail=rng.choice([0, 0.05, 0.2]), duplicate=rng.choice([0, 0.2]), late_s=rng.choice([0, 0.3]),
                    input_lost=rng.choice([0, 0.1]))
    grid = rng.choice([(1, 1), (2, 2), (1, 3)])
    tail = rng.random() < 0.5
    return History(seed, spec, tuple(events), faults, grid, tail, frames, rng.randint(1, 6))
