"""Custom device profiles from a TOML file, checked like any other input (bounded, typed, named).

    [profiles.my-pi]
    base = "pi4"          # start from a catalog profile (optional)
    gflops = 6.5
    memory_mib = 2048

:func:`profiles` is the table a cluster spec is read against: the catalog's built-ins plus these.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from .catalog import BUILTIN, MAX_PROFILE_FILE_BYTES, MiB, Profile, ProfileError, _is_number, _suggest


# TOML key -> (Profile field, unit multiplier, kind). Units in the file are the ones people quote
# (ms, MiB, Mbit/s); the dataclass keeps SI seconds and bytes so arithmetic never needs a conversion.
_TOML_KEYS: Final[Mapping[str, tuple[str, float, str]]] = MappingProxyType(
    {
        "gflops": ("gflops", 1.0, "number"),
        "tile_overhead_ms": ("tile_overhead_s", 1e-3, "number"),
        "memory_mib": ("memory_bytes", float(MiB), "bytes"),
        "runtime_overhead_mib": ("runtime_overhead_bytes", float(MiB), "bytes"),
        "gpu": ("gpu", 1.0, "bool"),
        "link_mbps": ("link_mbps", 1.0, "number"),
        "latency_ms": ("latency_s", 1e-3, "number"),
        "klass": ("klass", 1.0, "str"),
        "source": ("source", 1.0, "str"),
    }
)


_KIND_WORDS: Final = {"number": "a number", "bytes": "a number (MiB)", "bool": "true or false", "str": "a string"}


def _check_type(v: Any, kind: str) -> bool:
    if kind in ("number", "bytes"):
        return _is_number(v) and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    return isinstance(v, str)


def load_profiles(path: str | os.PathLike[str]) -> dict[str, Profile]:
    """Read custom profiles from ``[profiles.NAME]`` tables of a TOML file.

    Keys: ``gflops``, ``tile_overhead_ms``, ``memory_mib``, ``runtime_overhead_mib``, ``gpu``,
    ``link_mbps``, ``latency_ms``, ``klass``, ``source``. Without ``base`` every key is required (a
    measured device should say everything it is, including where the figures come from); with
    ``base = "pi4"`` the missing keys come from that built-in profile, and ``source`` defaults to a
    note naming the base and what was changed. Custom profiles are always emulated, and may not reuse
    a built-in name, because results quoted against ``pi3`` must mean the spec's pi3.
    Errors name the file, the profile and the key.
    """
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, /dev/zero never end it
            raise ProfileError(f"{p}: not a regular file (a directory, device or pipe); expected a TOML "
                               "file of [profiles.NAME] tables")
        with open(p, "rb") as f:
            raw = f.read(MAX_PROFILE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(f"{p}: profile file not found") from None
    except OSError as e:
        raise ProfileError(f"{p}: cannot read profile file: {e}") from None
    if len(raw) > MAX_PROFILE_FILE_BYTES:
        raise ProfileError(f"{p}: {max(st.st_size, len(raw))} bytes; a profile file is at most "
                           f"{MAX_PROFILE_FILE_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{p}: not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{p}: not valid TOML: {e}") from None
    unknown_top = sorted(set(data) - {"profiles"})
    if unknown_top:
        raise ProfileError(
            f"{p}: unknown top-level key(s) {unknown_top}; profiles go in [profiles.NAME] tables"
        )
    tables = data.get("profiles", {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{p}: 'profiles' must be a table of [profiles.NAME] tables")
    out: dict[str, Profile] = {}
    for name, table in tables.items():
        out[name] = _profile_from_table(p, name, table)
    return out


def _profile_from_table(p: Path, name: str, table: Any) -> Profile:
    where = f"{p}: profile {name!r}"
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: must be a table ([profiles.{name}]), got {type(table).__name__}")
    if name in BUILTIN:
        raise ProfileError(f"{where}: redefines the built-in profile; pick a new name and set base = {name!r}")
    allowed = set(_TOML_KEYS) | {"base"}
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ProfileError(f"{where}: unknown key {key!r}{hint} allowed keys: {', '.join(sorted(allowed))}")
    kw: dict[str, Any] = {}
    base: Profile | None = None
    if "base" in table:
        b = table["base"]
        if not isinstance(b, str):
            raise ProfileError(f"{where}: key 'base' must be a string naming a built-in profile, got {b!r}")
        if b not in BUILTIN:
            raise ProfileError(f"{where}: key 'base' names unknown profile {b!r}{_suggest(b, BUILTIN)}")
        base = BUILTIN[b]
        kw = {f.name: getattr(base, f.name) for f in fields(Profile)}
    for key, (attr, mult, kind) in _TOML_KEYS.items():
        if key not in table:
            if base is None:
                raise ProfileError(f"{where}: missing key {key!r} (or set base = 'pi4' etc. to inherit it)")
            continue
        v = table[key]
        if not _check_type(v, kind):
            raise ProfileError(f"{where}: key {key!r} must be {_KIND_WORDS[kind]}, got {v!r}")
        if kind == "number":
            kw[attr] = float(v) * mult
        elif kind == "bytes":
            if v < 0:
                raise ProfileError(f"{where}: key {key!r} must be >= 0, got {v!r}")
            kw[attr] = int(round(v * mult))
        else:
            kw[attr] = v
    if base is not None and "source" not in table:
        changed = [k for k in _TOML_KEYS if k in table]
        kw["source"] = (
            f"{p.name}: {base.name} with {', '.join(changed) if changed else 'nothing'} changed; "
            f"{base.name}'s source: {base.source}"
        )
    kw["name"] = name
    kw["emulated"] = True
    try:
        return Profile(**kw)
    except ProfileError as e:
        raise ProfileError(f"{p}: {e}") from None


def profiles(extra_path: str | os.PathLike[str] | None = None) -> dict[str, Profile]:
    """Built-ins plus the custom profiles of ``extra_path`` (if given), by name."""
    out = dict(BUILTIN)
    if extra_path is not None:
        out.update(load_profiles(extra_path))
    return out
