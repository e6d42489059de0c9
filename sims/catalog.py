"""The emulated device catalog: device profiles as data, each with its source.

Why a catalog at all: tilefleet's claims (speedup, memory footprint, behaviour under stealing) are made
against the devices of the papers it follows (DeepThings' Raspberry Pi 3 over Wi-Fi, MoDNN's phones),
which are not on the machine that runs the tests. Every such device becomes a :class:`Profile`: how
fast it computes a conv tile, what each tile costs on top of its arithmetic, how much memory tilefleet
may use there, and its link to the LAN. The emulator (:mod:`sims.clock`, :mod:`workers.emulation`) and
the simulator hold a device to exactly these figures, so a figure without a source would be an
unfalsifiable claim: every profile says where its numbers come from, and says ``assumption`` where
that is all it is.

The four profiles ``pi3``, ``pi3-24m``, ``pi4`` and ``laptop`` are fixed by tilefleet's spec; the
others are plausible classes (Jetson Nano CPU and GPU, a GPU server) and ``host``, the machine itself,
which is never emulated.

Clusters are written as specs such as ``"pi3*4,jetson-nano"`` (:func:`parse_spec`); custom profiles
come from a TOML file (:func:`sims.profile_files.load_profiles`). No Ray here, and torch only inside
:func:`sims.speed.measure_host_gflops`, so the catalog is cheap to import from the CLI and the pure tests.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # pragma: no cover - typing only
    from scheduler.model import DeviceInfo

__all__ = [
    "BUILTIN",
    "COMPARABLE_SCALE",
    "MAX_DEVICES",
    "SAFETY_MARGIN",
    "DeviceSpec",
    "Profile",
    "ProfileError",
    "host_profile",
    "parse_spec",
    "with_host_gflops",
]

MiB: Final = 2**20
GiB: Final = 2**30

MAX_DEVICES: Final = 64
MAX_PROFILE_FILE_BYTES: Final = 1 << 20  # a profile file is input: bounded before it is parsed
"""Most devices one spec may name: beyond this an emulated cluster on one machine means nothing."""

SAFETY_MARGIN: Final = 2.0
"""The host must be at least this many times faster than every emulated device (see :func:`clock_scale`)."""

COMPARABLE_SCALE: Final = 4.0
"""Runs whose clock scale exceeds this are not comparable to the papers' targets (see :func:`clock_scale`)."""

# A profile name ends up in device ids (``pi3-0``), spec strings and TOML table names, so it must not
# contain the spec's separators (``*`` and ``,``) or whitespace.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# Upper bounds on a profile's figures, far above any device: (field, limit, unit).
_LIMITS: Final = (
    ("gflops", 1e9, "GFLOP/s (an exaflop)"),
    ("link_mbps", 1e10, "Mbit/s (10 Pbit/s: tests model a free link as 1 Pbit/s)"),
    ("tile_overhead_s", 3600.0, "s"),
    ("latency_s", 3600.0, "s"),
    ("memory_bytes", float(1 << 50), "bytes (1 PiB)"),
)
LINK_MBPS_MIN: Final = 1e-3
MAX_SPEC_CHARS: Final = 4096
SPEC_DEVICES_MAX: Final = 1_000_000
"""Devices a spec may name at all (the simulator's cap; emulation has :data:`MAX_DEVICES`)."""


def _clip(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _show(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) or abs(v) < 10**15 else f"a {len(str(abs(v)))}-digit number"


class ProfileError(ValueError):
    """A profile, a cluster spec or a profile file is wrong; the message names what and where."""


@dataclass(frozen=True)
class Profile:
    """What one device class can do, as far as tilefleet's cost model and emulator care.

    ``gflops`` is the *sustained* conv rate (not a datasheet peak), because a fused tile is a stack
    of convolutions and that is what the cost model divides by. ``tile_overhead_s`` is what every tile
    costs regardless of its size (RPC, interpreter, kernel launches): it is what makes fine grids lose.
    ``memory_bytes`` is the budget tilefleet's work may use on the device, of which the runtime itself
    (Python, torch, a Ray worker) takes ``runtime_overhead_bytes`` before any tile runs; a tile must
    fit in :attr:`usable_bytes`. The link is full duplex, ``link_mbps`` each way, with one-way
    ``latency_s``. ``emulated`` is False only for ``host``, which runs at its own speed.
    """

    name: str
    gflops: float
    tile_overhead_s: float
    memory_bytes: int
    runtime_overhead_bytes: int
    gpu: bool
    link_mbps: float
    latency_s: float
    klass: str
    source: str = field(repr=False)  # long prose; reprs of specs and clocks stay readable without it
    emulated: bool = True

    def __post_init__(self) -> None:
        # Fail where a profile is built: a zero rate or a NaN latency would otherwise surface as an
        # infinite or NaN finish time deep inside a simulation, far from the typo that caused it.
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ProfileError(
                f"profile {self.name!r}: name must be letters, digits, '.', '_' or '-' "
                "(no '*', ',' or spaces: names appear in cluster specs and device ids)"
            )
        for key in ("gflops", "link_mbps"):
            v = getattr(self, key)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ProfileError(f"profile {self.name!r}: {key} must be a finite number > 0, got {v!r}")
        for key in ("tile_overhead_s", "latency_s"):
            v = getattr(self, key)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise ProfileError(f"profile {self.name!r}: {key} must be a finite number >= 0, got {v!r}")
        for key in ("memory_bytes", "runtime_overhead_bytes"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ProfileError(f"profile {self.name!r}: {key} must be an integer >= 0, got {v!r}")
        for key, top, what in _LIMITS:  # a typo of a few digits would otherwise pass as a device
            v = getattr(self, key)
            if v > top:
                raise ProfileError(f"profile {self.name!r}: {key} = {_show(v)} is absurd; accepted: at most {top:g} {what}")
        if self.link_mbps < LINK_MBPS_MIN:
            raise ProfileError(f"profile {self.name!r}: link_mbps = {self.link_mbps!r} is absurd; accepted: at least "
                               f"{LINK_MBPS_MIN:g} Mbit/s")
        if self.runtime_overhead_bytes > self.memory_bytes:
            raise ProfileError(
                f"profile {self.name!r}: runtime_overhead_bytes ({self.runtime_overhead_bytes}) exceeds "
                f"memory_bytes ({self.memory_bytes}): nothing would be left for tiles"
            )
        for key in ("gpu", "emulated"):
            v = getattr(self, key)
            if not isinstance(v, bool):
                raise ProfileError(f"profile {self.name!r}: {key} must be a bool, got {v!r}")
        for key in ("klass", "source"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip():
                raise ProfileError(f"profile {self.name!r}: {key} must be a non-empty string, got {v!r}")

    @property
    def link_bps(self) -> float:
        """Link bandwidth in bytes per second, the unit tile sizes come in."""
        return self.link_mbps * 1e6 / 8

    @property
    def usable_bytes(self) -> int:
        """Memory left for tiles (activations and weights) once the runtime has loaded."""
        return self.memory_bytes - self.runtime_overhead_bytes


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a cluster: a stable id (``pi3-0``) and its profile.

    Ids are derived from the spec alone, so the same spec names the same devices in every run, log
    and report, which is what makes runs comparable and stories (``story(tile)``) readable.
    """

    id: str
    profile: Profile

    def info(self) -> DeviceInfo:
        """The scheduler's view of this device; memory is what is left after the runtime's overhead.

        Imported lazily so the catalog does not drag the scheduler into every import.
        """
        from scheduler.model import DeviceInfo

        p = self.profile
        return DeviceInfo(
            self.id, p.gflops, p.tile_overhead_s, p.usable_bytes, p.link_bps, p.latency_s, p.gpu, p.klass
        )


def _is_number(v: object) -> bool:
    # bool is an int subclass; ``gflops = true`` in a TOML file is a mistake, not 1 GFLOP/s.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# Built-in profiles
# --------------------------------------------------------------------------------------------------

_DEEPTHINGS = "DeepThings (Zhao, Mirzazad Barijough, Gerstlauer; IEEE TCAD 2018)"
_RUNTIME_NOTE = "runtime overhead {mib} MiB: assumption (CPython + torch + one Ray worker)"


def _host_memory_bytes() -> int:
    """This machine's physical memory; 8 GiB where the OS will not say (the figure only sizes budgets)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB
    if pages <= 0 or page <= 0:
        return 8 * GiB
    return int(pages) * int(page)


HOST_GFLOPS_PLACEHOLDER: Final = 80.0
"""One thread of the reference machine (YOLOv2 layers 0-15 at 608, 26 GFLOP, in about 330 ms)."""


def host_profile(gflops: float | None = None) -> Profile:
    """The machine itself, never emulated: its memory from ``os.sysconf``, a LAN-class loopback.

    ``gflops`` defaults to a placeholder; pass :func:`measure_host_gflops`'s figure to make it real.
    It is a function, not only a constant, because only the caller knows whether a measurement
    (about 0.3 s of torch) is worth paying for.
    """
    mem = _host_memory_bytes()
    measured = gflops is not None
    g = HOST_GFLOPS_PLACEHOLDER if gflops is None else float(gflops)
    return Profile(
        name="host",
        gflops=g,
        tile_overhead_s=0.6e-3,
        memory_bytes=mem,
        runtime_overhead_bytes=min(700 * MiB, mem),
        gpu=False,
        link_mbps=10_000.0,
        latency_s=0.0,
        klass="host",
        source=(
            ("gflops measured by measure_host_gflops" if measured else
             "gflops placeholder 80 (one thread of the reference machine: YOLOv2 layers 0-15, 26 GFLOP, "
             "about 330 ms); refine with measure_host_gflops")
            + "; memory from os.sysconf; per-tile overhead 0.6 ms = a measured Ray actor call; runtime "
            "overhead 700 MiB = measured local Ray instance (about 620 MB) + one worker (about 80 MB); "
            "link 10 Gbit/s and zero latency: assumption (loopback, nothing emulated)"
        ),
        emulated=False,
    )


_BUILTIN_PROFILES: Final = (
    Profile(
        name="pi3",
        gflops=4.0,
        tile_overhead_s=5e-3,
        memory_bytes=512 * MiB,
        runtime_overhead_bytes=160 * MiB,
        gpu=False,
        link_mbps=40.0,
        latency_s=3e-3,
        klass="raspberry-pi",
        source=(
            f"Raspberry Pi 3 over Wi-Fi, the device of {_DEEPTHINGS}; speed, per-tile overhead, "
            "link (effective 802.11n) and latency are tilefleet spec figures (assumption, not "
            "measured); 512 MiB of the board's 1 GB left to tilefleet: assumption; "
            + _RUNTIME_NOTE.format(mib=160)
        ),
    ),
    Profile(
        name="pi3-24m",
        gflops=4.0,
        tile_overhead_s=5e-3,
        memory_bytes=24 * MiB,
        runtime_overhead_bytes=0,
        gpu=False,
        link_mbps=40.0,
        latency_s=3e-3,
        klass="raspberry-pi",
        source=(
            f"pi3 held to DeepThings' memory setting: {_DEEPTHINGS} report under 23 MB per device "
            "for YOLOv2 layers 0-15 with Darknet in C, so 24 MiB with no runtime overhead (their "
            "footprint counts only the network's data); speed, link and latency as pi3 (assumption)"
        ),
    ),
    Profile(
        name="pi4",
        gflops=12.0,
        tile_overhead_s=3e-3,
        memory_bytes=2 * GiB,
        runtime_overhead_bytes=200 * MiB,
        gpu=False,
        link_mbps=100.0,
        latency_s=2e-3,
        klass="raspberry-pi",
        source=(
            "Raspberry Pi 4 (Cortex-A72); speed, per-tile overhead and latency are tilefleet spec "
            "figures (assumption); 100 Mbit/s as the links of DeeperThings' evaluation; 2 GiB budget: "
            "assumption; runtime overhead 200 MiB: assumption (as pi3, plus larger 64-bit aarch64 "
            "torch and Ray wheels)"
        ),
    ),
    Profile(
        name="laptop",
        gflops=60.0,
        tile_overhead_s=1e-3,
        memory_bytes=8 * GiB,
        runtime_overhead_bytes=400 * MiB,
        gpu=False,
        link_mbps=300.0,
        latency_s=2e-3,
        klass="laptop",
        source=(
            "a recent x86 laptop on Wi-Fi 5; speed, per-tile overhead, link and latency are tilefleet "
            "spec figures (assumption); runtime overhead 400 MiB: assumption (x86 torch with oneDNN "
            "and a Ray worker are larger than on a Pi)"
        ),
    ),
    Profile(
        name="jetson-nano",
        gflops=10.0,
        tile_overhead_s=3e-3,
        memory_bytes=2 * GiB,
        runtime_overhead_bytes=300 * MiB,
        gpu=False,
        link_mbps=1000.0,
        latency_s=1e-3,
        klass="jetson",
        source=(
            "Jetson Nano on its CPU only (4x Cortex-A57, 4 GB shared LPDDR4, Gigabit Ethernet per "
            "NVIDIA's datasheet); 10 GFLOP/s, per-tile overhead and 1 ms wired latency: assumption; "
            "2 GiB of the 4 GB left after the OS: assumption; runtime overhead 300 MiB: assumption"
        ),
    ),
    Profile(
        name="jetson-gpu",
        gflops=200.0,
        tile_overhead_s=5e-3,
        memory_bytes=2 * GiB,
        runtime_overhead_bytes=900 * MiB,
        gpu=True,
        link_mbps=1000.0,
        latency_s=1e-3,
        klass="jetson",
        source=(
            "Jetson Nano's 128-core Maxwell GPU (NVIDIA lists 472 GFLOPS fp16, so about 236 fp32 "
            "peak); 200 GFLOP/s effective fp32 conv: assumption; per-tile overhead 5 ms (launches and "
            "synchronisation driven by a slow CPU): assumption; 2 GiB of the 4 GB shared memory: "
            "assumption; runtime overhead 900 MiB (CUDA context + torch + Ray worker): assumption"
        ),
    ),
    Profile(
        name="gpu-server",
        gflops=10_000.0,
        tile_overhead_s=0.5e-3,
        memory_bytes=24 * GiB,
        runtime_overhead_bytes=1536 * MiB,
        gpu=True,
        link_mbps=1000.0,
        latency_s=0.5e-3,
        klass="gpu-server",
        source=(
            "a server with one 24 GiB GPU on Gigabit Ethernet; 10 TFLOP/s sustained fp32 conv, "
            "per-tile overhead, latency and a 1.5 GiB runtime overhead (CUDA context + torch + Ray "
            "worker): assumption"
        ),
    ),
    host_profile(),
)


BUILTIN: Final[Mapping[str, Profile]] = MappingProxyType({p.name: p for p in _BUILTIN_PROFILES})
"""The built-in profiles by name, read-only: tests and reports rely on them never changing at run time."""


# --------------------------------------------------------------------------------------------------
# Cluster specs
# --------------------------------------------------------------------------------------------------


def _suggest(name: str, known: Iterable[str]) -> str:
    """A ``did you mean`` hint; typos in specs are the common error and the cheapest to fix."""
    known = sorted(known)
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    hint = f"; did you mean {lowered[close[0]]!r}?" if close else ""
    return f"{hint} known profiles: {', '.join(known)}"


def _lookup(name: str, table: Mapping[str, Profile], where: str) -> Profile:
    if name in table:
        return table[name]
    # Accept a case slip ("Pi3") when it is unambiguous; device ids then use the canonical name.
    folded = [k for k in table if k.lower() == name.lower()]
    if len(folded) == 1:
        return table[folded[0]]
    raise ProfileError(f"unknown device profile {_clip(name)} in {where}{_suggest(name, table)}")


def parse_spec(spec: str, extra: Mapping[str, Profile] | None = None, *,
               max_devices: int | None = MAX_DEVICES) -> list[DeviceSpec]:
    """Turn ``"pi3*2, pi4*2, laptop"`` into devices with stable ids (``pi3-0``, ``pi3-1``, ...).

    Ids are numbered per profile name across the whole spec (``"pi3, pi4, pi3"`` gives ``pi3-0``,
    ``pi4-0``, ``pi3-1``), so adding a device of another class never renames existing ones. Profiles
    in ``extra`` are looked up before the built-ins, which lets a profile file override nothing by
    accident yet still be used by name. Every error says what was wrong, where, and what is accepted.
    ``max_devices`` caps emulation (one machine emulates every device); the simulator passes None.
    """
    if not isinstance(spec, str):
        raise ProfileError(f"cluster spec must be a string such as 'pi3*4,jetson-nano', got {spec!r}")
    if len(spec) > MAX_SPEC_CHARS:
        raise ProfileError(f"cluster spec of {len(spec)} characters ({spec[:40]!r}...); a spec is at most "
                           f"{MAX_SPEC_CHARS} characters: write counts as profile*count")
    limit = SPEC_DEVICES_MAX if max_devices is None else max_devices
    table: dict[str, Profile] = dict(BUILTIN)
    if extra:
        table.update(extra)
    if not spec.strip():
        raise ProfileError(
            "empty cluster spec; write e.g. 'pi3*4,jetson-nano' (profile[*count], comma-separated)"
        )
    entries: list[tuple[Profile, int]] = []
    total = 0
    for pos, raw in enumerate(spec.split(","), start=1):
        item = raw.strip()
        where = f"entry {pos} ({_clip(item)}) of spec {_clip(spec)}"
        if not item:
            raise ProfileError(f"empty entry {pos} in cluster spec {_clip(spec)}; entries are profile[*count]")
        name, star, count_s = item.partition("*")
        name, count_s = name.strip(), count_s.strip()
        if star:
            digits = count_s.lstrip("0")
            if not re.fullmatch(r"[0-9]+", count_s) or not digits:
                raise ProfileError(
                    f"bad count {_clip(count_s)} in {where}: the count after '*' must be a whole number >= 1"
                )
            # int() of thousands of digits is slow (and refused by Python): any such count is over the limit
            count = int(digits) if len(digits) <= 12 else 10**12
        else:
            count = 1
        if not name:
            raise ProfileError(f"missing profile name in {where}")
        profile = _lookup(name, table, where)
        total += count
        if total > limit:
            if max_devices is None:
                raise ProfileError(f"cluster spec {_clip(spec)} names more than {limit} devices; the simulator "
                                   f"takes at most {limit}")
            raise ProfileError(
                f"cluster spec {_clip(spec)} names more than {max_devices} devices; one machine cannot emulate a "
                f"cluster that large meaningfully (`tilefleet sim` simulates up to {SPEC_DEVICES_MAX})"
            )
        entries.append((profile, count))
    seen: dict[str, int] = {}
    out: list[DeviceSpec] = []
    for profile, count in entries:
        for _ in range(count):
            k = seen.get(profile.name, 0)
            seen[profile.name] = k + 1
            out.append(DeviceSpec(f"{profile.name}-{k}", profile))
    return out


# --------------------------------------------------------------------------------------------------
# Profile files (TOML)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Host speed and the emulation clock scale
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Table for the CLI
# --------------------------------------------------------------------------------------------------


def with_host_gflops(table: Mapping[str, Profile], gflops: float) -> dict[str, Profile]:
    """A copy of ``table`` whose non-emulated profiles carry a measured rate instead of the placeholder."""
    return {
        k: (replace(v, gflops=float(gflops), source=host_profile(gflops).source) if not v.emulated else v)
        for k, v in table.items()
    }
