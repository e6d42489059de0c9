"""Scripted fleet events for the simulator, from a small TOML file.

    # a Pi overheats at 10 s, another dies at 20 s (noticed 1.5 s later) and is back at 40 s
    [[event]]
    at = 10.0
    slow = "pi3-2"
    factor = 10
    announce = false      # true: the device tells the driver at once (a thermal monitor would)

    [[event]]
    at = 20.0
    kill = "pi3-4"
    detect = 1.5

    [[event]]
    at = 40.0
    revive = "pi3-4"

    [[event]]
    at = 30.0
    join = "pi4"          # a new device of this profile (named pi4-N after the spec's own)

Every error names the file, the event and what is accepted; sizes are bounded (this is input).
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .catalog import DeviceSpec, Profile, ProfileError
from .simulate import Scenario, ScenarioEvent

MAX_BYTES = 1 << 20
MAX_EVENTS = 100_000
ACTIONS = ("kill", "revive", "slow", "join")


class ScenarioError(ValueError):
    """A scenario file that cannot be read; the message says where and what is accepted."""


def load_scenario(path: str | Path, devices: Sequence[DeviceSpec], table: Mapping[str, Profile]) -> Scenario:
    p = Path(path)
    try:
        if not stat.S_ISREG(p.stat().st_mode):  # a FIFO would block the read, /dev/zero never end it
            raise ScenarioError(f"{p}: not a regular file (a directory, device or pipe); expected a TOML file "
                                "of [[event]] tables")
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read the scenario: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise ScenarioError(f"{p}: more than {MAX_BYTES} bytes; a scenario is at most {MAX_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{p}: not a TOML file: {e}") from None
    return parse_scenario(data, devices, table, where=str(p))


def parse_scenario(data: Mapping[str, Any], devices: Sequence[DeviceSpec], table: Mapping[str, Profile], *,
                   where: str = "scenario") -> Scenario:
    unknown = sorted(set(data) - {"event"})
    if unknown:
        raise ScenarioError(f"{where}: unknown top-level key(s) {unknown}; events go in [[event]] tables")
    events = data.get("event", [])
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise ScenarioError(f"{where}: 'event' must be a list of at most {MAX_EVENTS} [[event]] tables")
    specs = {d.id: d for d in devices}
    joined: dict[str, int] = {}
    out = []
    for i, ev in enumerate(events):
        out.append(_event(ev, f"{where}: event {i + 1}", specs, table, joined))
    return Scenario(sorted(out, key=lambda e: e.at_s))


def _event(ev: Any, where: str, specs: dict[str, DeviceSpec], table: Mapping[str, Profile],
           joined: dict[str, int]) -> ScenarioEvent:
    if not isinstance(ev, dict):
        raise ScenarioError(f"{where}: must be a table")
    actions = [a for a in ACTIONS if a in ev]
    if len(actions) != 1:
        raise ScenarioError(f"{where}: needs exactly one of {', '.join(ACTIONS)} (the device id, or a profile for "
                            f"join), got {sorted(ev)}")
    allowed = {"at", actions[0], "detect", "factor"} | ({"announce"} if actions[0] == "slow" else set())
    if set(ev) - allowed:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(set(ev) - allowed)}; accepted: {sorted(allowed)}")
    at = _number(ev.get("at"), "at", where, minimum=0.0)
    action, target = actions[0], ev[actions[0]]
    if not isinstance(target, str):
        raise ScenarioError(f"{where}: {action} names a device id (or a profile for join), got {target!r}")
    if action == "join":
        if target not in table:
            raise ScenarioError(f"{where}: join: unknown profile {target!r}; profiles: {', '.join(sorted(table))}")
        k = sum(1 for d in specs if d.startswith(f"{target}-")) + joined.get(target, 0)
        joined[target] = joined.get(target, 0) + 1
        try:
            spec = DeviceSpec(f"{target}-{k}", table[target])
        except ProfileError as e:
            raise ScenarioError(f"{where}: {e}") from None
        return ScenarioEvent(at, "join", spec.id, spec=spec)
    if target not in specs:
        raise ScenarioError(f"{where}: {action}: no device {target!r}; devices: {', '.join(list(specs)[:20])}")
    factor = _number(ev.get("factor", 1.0), "factor", where, minimum=1e-3) if action == "slow" else 1.0
    detect = _number(ev.get("detect", 1.5), "detect", where, minimum=0.0)
    announce = ev.get("announce", False)
    if not isinstance(announce, bool):
        raise ScenarioError(f"{where}: announce must be true or false, got {announce!r}")
    return ScenarioEvent(at, action, target, factor=factor, detect_s=detect, spec=specs[target], announce=announce)


def _number(v: Any, key: str, where: str, minimum: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= minimum or v == float("inf"):
        raise ScenarioError(f"{where}: {key} must be a number >= {minimum:g} (seconds, or a factor), got {v!r}")
    return float(v)
