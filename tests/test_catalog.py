"""The device catalog: the spec's fixed figures, cluster specs, profile files, host speed, clock scale."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from sims import catalog
from sims.catalog import (
    BUILTIN,
    MAX_DEVICES,
    DeviceSpec,
    Profile,
    ProfileError,
    parse_spec,
)
from sims.profile_files import load_profiles, profiles
from sims.report import catalog_table
from sims.speed import clock_scale, measure_host_gflops

MiB = 2**20
GiB = 2**30
EXAMPLE = Path(__file__).resolve().parents[1] / "sims" / "devices.toml"


def _profile(**kw: object) -> Profile:
    base = dataclasses.asdict(BUILTIN["pi3"])
    base.update(kw)
    return Profile(**base)  # type: ignore[arg-type]


# -- built-in profiles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "gflops", "overhead_s", "memory", "link_mbps", "latency_s"),
    [
        ("pi3", 4.0, 5e-3, 512 * MiB, 40.0, 3e-3),
        ("pi3-24m", 4.0, 5e-3, 24 * MiB, 40.0, 3e-3),
        ("pi4", 12.0, 3e-3, 2 * GiB, 100.0, 2e-3),
        ("laptop", 60.0, 1e-3, 8 * GiB, 300.0, 2e-3),
    ],
)
def test_fixed_profiles_have_the_spec_numbers(
    name: str, gflops: float, overhead_s: float, memory: int, link_mbps: float, latency_s: float
) -> None:
    p = BUILTIN[name]
    assert p.name == name
    assert p.gflops == gflops
    assert p.tile_overhead_s == pytest.approx(overhead_s, abs=1e-12)
    assert p.memory_bytes == memory
    assert p.link_mbps == link_mbps
    assert p.latency_s == pytest.approx(latency_s, abs=1e-12)
    assert p.link_bps == link_mbps * 1e6 / 8
    assert p.emulated and not p.gpu


def test_pi3_24m_is_deepthings_setting() -> None:
    p = BUILTIN["pi3-24m"]
    assert p.runtime_overhead_bytes == 0
    assert p.usable_bytes == 24 * MiB
    assert "DeepThings" in p.source


def test_runtime_overheads_leave_room() -> None:
    for p in BUILTIN.values():
        assert 0 <= p.runtime_overhead_bytes <= p.memory_bytes
        assert p.usable_bytes == p.memory_bytes - p.runtime_overhead_bytes
    assert BUILTIN["pi3"].usable_bytes == (512 - 160) * MiB
    assert "assumption" in BUILTIN["pi3"].source


def test_every_profile_has_a_source_and_expected_classes() -> None:
    assert {"pi3", "pi3-24m", "pi4", "laptop", "jetson-nano", "jetson-gpu", "gpu-server", "host"} <= set(BUILTIN)
    for p in BUILTIN.values():
        assert p.source.strip(), p.name
        assert p.klass.strip(), p.name
    assert BUILTIN["jetson-gpu"].gpu and BUILTIN["gpu-server"].gpu and not BUILTIN["jetson-nano"].gpu


def test_host_is_real_and_sized_from_this_machine() -> None:
    h = BUILTIN["host"]
    assert not h.emulated
    assert [p.name for p in BUILTIN.values() if not p.emulated] == ["host"]
    assert h.memory_bytes > 256 * MiB
    assert h.link_mbps == 10_000.0 and h.latency_s == 0.0
    assert catalog.host_profile(123.0).gflops == 123.0
    refined = catalog.with_host_gflops(BUILTIN, 55.0)
    assert refined["host"].gflops == 55.0 and refined["pi3"] is BUILTIN["pi3"]


def test_builtin_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        BUILTIN["pi3"] = BUILTIN["pi4"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUILTIN["pi3"].gflops = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"gflops": 0.0}, "gflops"),
        ({"gflops": -1.0}, "gflops"),
        ({"gflops": float("nan")}, "gflops"),
        ({"link_mbps": 0.0}, "link_mbps"),
        ({"tile_overhead_s": -1e-3}, "tile_overhead_s"),
        ({"latency_s": -1.0}, "latency_s"),
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"memory_bytes": 1.5}, "memory_bytes"),
        ({"runtime_overhead_bytes": -1}, "runtime_overhead_bytes"),
        ({"runtime_overhead_bytes": 600 * MiB}, "runtime_overhead_bytes"),
        ({"gpu": 1}, "gpu"),
        ({"source": ""}, "source"),
        ({"klass": " "}, "klass"),
        ({"name": "pi 3"}, "name"),
        ({"name": "pi3*2"}, "name"),
    ],
)
def test_profile_validation_names_profile_and_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ProfileError) as e:
        _profile(**kw)
    msg = str(e.value)
    assert field in msg
    assert repr(kw.get("name", "pi3")) in msg
    assert isinstance(e.value, ValueError)


def test_device_spec_info_matches_scheduler_view() -> None:
    (d,) = parse_spec("pi3")
    info = d.info()
    assert info.id == "pi3-0"
    assert info.memory_bytes == BUILTIN["pi3"].usable_bytes
    assert info.link_bps == BUILTIN["pi3"].link_bps
    assert info.klass == "raspberry-pi"


# -- cluster specs -------------------------------------------------------------------------------


def test_parse_spec_counts_ids_and_order() -> None:
    devs = parse_spec("pi3*4,jetson-nano")
    assert [d.id for d in devs] == ["pi3-0", "pi3-1", "pi3-2", "pi3-3", "jetson-nano-0"]
    assert all(isinstance(d, DeviceSpec) for d in devs)
    assert devs[0].profile is BUILTIN["pi3"] and devs[-1].profile is BUILTIN["jetson-nano"]


def test_parse_spec_whitespace_and_numbering_across_the_spec() -> None:
    assert [d.id for d in parse_spec("pi3*2, pi4*2, laptop")] == ["pi3-0", "pi3-1", "pi4-0", "pi4-1", "laptop-0"]
    assert [d.id for d in parse_spec(" pi3 , pi4 ,pi3 * 2 ")] == ["pi3-0", "pi4-0", "pi3-1", "pi3-2"]
    assert [d.id for d in parse_spec("host*2")] == ["host-0", "host-1"]
    assert [d.id for d in parse_spec("pi3-24m*2,pi3")] == ["pi3-24m-0", "pi3-24m-1", "pi3-0"]
    assert [d.id for d in parse_spec("Pi3")] == ["pi3-0"]  # an unambiguous case slip is accepted
    assert len(parse_spec(f"pi3*{MAX_DEVICES}")) == MAX_DEVICES


def test_parse_spec_is_stable() -> None:
    assert parse_spec("pi3*2,pi4") == parse_spec("pi3*2,pi4")


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("pi5", ["unknown device profile 'pi5'", "did you mean 'pi4'?", "known profiles:", "pi3-24m"]),
        ("pi3*2,jetsn-nano", ["'jetsn-nano'", "did you mean 'jetson-nano'?"]),
        ("gpu_server", ["did you mean 'gpu-server'?"]),
        ("zzzzzz", ["unknown device profile 'zzzzzz'", "known profiles:"]),
        ("pi3*0", ["bad count '0'", ">= 1"]),
        ("pi3*x", ["bad count 'x'"]),
        ("pi3*-1", ["bad count '-1'"]),
        ("pi3*", ["bad count ''"]),
        ("pi3*2*2", ["bad count '2*2'"]),
        ("pi3*1.5", ["bad count '1.5'"]),
        ("", ["empty cluster spec"]),
        ("   ", ["empty cluster spec"]),
        ("pi3,,pi4", ["empty entry 2"]),
        ("pi3,", ["empty entry 2"]),
        ("*3", ["missing profile name"]),
        (f"pi3*{MAX_DEVICES},pi4", [f"more than {MAX_DEVICES} devices"]),
        ("pi3*1000000000000", [f"more than {MAX_DEVICES} devices"]),
    ],
)
def test_parse_spec_errors_are_clear(spec: str, needles: list[str]) -> None:
    with pytest.raises(ProfileError) as e:
        parse_spec(spec)
    for n in needles:
        assert n in str(e.value)


def test_parse_spec_no_suggestion_when_nothing_is_close() -> None:
    with pytest.raises(ProfileError) as e:
        parse_spec("zzzzzz")
    assert "did you mean" not in str(e.value)


def test_parse_spec_with_extra_profiles() -> None:
    extra = {"phone": _profile(name="phone", gflops=8.0)}
    assert [d.id for d in parse_spec("phone*2,pi3", extra)] == ["phone-0", "phone-1", "pi3-0"]
    with pytest.raises(ProfileError, match="did you mean 'phone'"):
        parse_spec("phon", extra)


# -- profile files -------------------------------------------------------------------------------

GOOD = """
[profiles.pi4-fast]
base = "pi4"
gflops = 20.0
memory_mib = 1024

[profiles.phone]
gflops = 8
tile_overhead_ms = 4.0
memory_mib = 1024
runtime_overhead_mib = 200
gpu = false
link_mbps = 50.0
latency_ms = 4.0
klass = "phone"
source = "assumption"
"""


def test_load_profiles_good_file_with_base(tmp_path: Path) -> None:
    f = tmp_path / "devs.toml"
    f.write_text(GOOD)
    ps = load_profiles(f)
    assert list(ps) == ["pi4-fast", "phone"]
    fast, pi4 = ps["pi4-fast"], BUILTIN["pi4"]
    assert fast.gflops == 20.0 and fast.memory_bytes == 1024 * MiB
    assert fast.tile_overhead_s == pi4.tile_overhead_s and fast.link_mbps == pi4.link_mbps
    assert fast.latency_s == pi4.latency_s and fast.runtime_overhead_bytes == pi4.runtime_overhead_bytes
    assert fast.klass == pi4.klass and fast.emulated
    assert "pi4" in fast.source and "gflops" in fast.source and "memory_mib" in fast.source
    phone = ps["phone"]
    assert phone.gflops == 8.0 and isinstance(phone.gflops, float)
    assert phone.tile_overhead_s == pytest.approx(4e-3) and phone.latency_s == pytest.approx(4e-3)
    assert phone.runtime_overhead_bytes == 200 * MiB and phone.source == "assumption"
    merged = profiles(f)
    assert set(merged) == set(BUILTIN) | {"pi4-fast", "phone"}
    assert profiles() == dict(BUILTIN)
    assert [d.id for d in parse_spec("pi4-fast*2,phone", merged)] == ["pi4-fast-0", "pi4-fast-1", "phone-0"]


def test_example_file_loads() -> None:
    ps = load_profiles(EXAMPLE)
    assert ps and all(p.source for p in ps.values())
    assert "pi4-wired" in ps and ps["pi4-wired"].gflops == BUILTIN["pi4"].gflops


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ('[profiles.x]\nbase = "pi4"\ngflop = 3.0\n', ["'x'", "unknown key 'gflop'", "did you mean 'gflops'"]),
        ('[profiles.x]\nbase = "pi4"\ngflops = "fast"\n', ["'x'", "key 'gflops' must be a number"]),
        ('[profiles.x]\nbase = "pi4"\ngpu = 1\n', ["key 'gpu' must be true or false"]),
        ('[profiles.x]\nbase = "pi4"\ngflops = true\n', ["key 'gflops' must be a number"]),
        ('[profiles.x]\nbase = "pi4"\nmemory_mib = -5\n', ["key 'memory_mib' must be >= 0"]),
        ('[profiles.x]\nbase = "pi4"\nklass = 3\n', ["key 'klass' must be a string"]),
        ('[profiles.x]\nbase = "pi5"\n', ["key 'base' names unknown profile 'pi5'", "did you mean 'pi4'"]),
        ('[profiles.x]\nbase = 4\n', ["key 'base' must be a string"]),
        ("[profiles.x]\ngflops = 3.0\n", ["'x'", "missing key 'tile_overhead_ms'"]),
        ('[profiles.x]\nbase = "pi4"\ngflops = 0\n', ["'x'", "gflops must be a finite number > 0"]),
        ('[profiles.pi3]\nbase = "pi4"\n', ["'pi3'", "redefines the built-in profile"]),
        ('[profiles."a b"]\nbase = "pi4"\n', ["'a b'", "name must be"]),
        ("[profiles]\nx = 3\n", ["'x'", "must be a table"]),
        ("[devices.x]\ngflops = 3\n", ["unknown top-level key", "devices"]),
        ("profiles = 3\n", ["'profiles' must be a table"]),
        ("[profiles.x\n", ["not valid TOML"]),
    ],
)
def test_load_profiles_errors_name_file_profile_and_key(tmp_path: Path, body: str, needles: list[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_profiles(f)
    msg = str(e.value)
    assert str(f) in msg
    for n in needles:
        assert n in msg


def test_load_profiles_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match="not found") as e:
        load_profiles(f)
    assert str(f) in str(e.value)
    with pytest.raises(ProfileError):
        profiles(f)


def test_empty_profile_file_is_fine(tmp_path: Path) -> None:
    f = tmp_path / "empty.toml"
    f.write_text("# nothing yet\n")
    assert load_profiles(f) == {}


# -- clock scale ---------------------------------------------------------------------------------


def test_clock_scale_cases() -> None:
    pi3, pi4, laptop, host = (BUILTIN[n] for n in ("pi3", "pi4", "laptop", "host"))
    assert clock_scale([pi3, pi4], 80.0) == 1.0  # host far ahead: real time
    assert clock_scale([pi3, laptop], 80.0) == pytest.approx(1.5)  # laptop within 2x of the host
    assert clock_scale([laptop], 120.0) == pytest.approx(1.0)  # exactly 2x ahead: just enough
    assert clock_scale([laptop], 30.0) == pytest.approx(4.0)  # laptop beats the host
    assert clock_scale([BUILTIN["gpu-server"]], 80.0) == pytest.approx(250.0)
    assert clock_scale([host], 1.0) == 1.0  # the host is never emulated, so never counts
    assert clock_scale([], 80.0) == 1.0
    assert clock_scale([pi3, host], 4.0) == pytest.approx(2.0)
    assert catalog.COMPARABLE_SCALE == 4.0


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan"), float("inf")])
def test_clock_scale_rejects_bad_host(bad: float) -> None:
    with pytest.raises(ValueError, match="host_gflops"):
        clock_scale([BUILTIN["pi3"]], bad)


# -- host speed ----------------------------------------------------------------------------------


def test_measure_host_gflops_is_sane_quick_and_cached() -> None:
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    g = measure_host_gflops(seconds=0.2, threads=1, refresh=True)
    elapsed = time.perf_counter() - t0
    assert 1.0 <= g <= 10_000.0
    assert elapsed < 2.0
    assert torch.get_num_threads() == threads  # restored
    t0 = time.perf_counter()
    assert measure_host_gflops(threads=1) == g  # cached per process
    assert time.perf_counter() - t0 < 0.01


@pytest.mark.parametrize(("seconds", "threads"), [(0.0, 1), (-1.0, 1), (0.1, 0), (0.1, True)])
def test_measure_host_gflops_rejects_bad_arguments(seconds: float, threads: int) -> None:
    with pytest.raises(ValueError):
        measure_host_gflops(seconds, threads)


# -- table ---------------------------------------------------------------------------------------


def test_catalog_table_lists_everything() -> None:
    text = catalog_table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["profile", "GFLOP/s", "overhead"]
    assert "source" in lines[0] and set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(BUILTIN)
    row = next(line for line in lines if line.startswith("pi3 "))
    assert row.split()[1:9] == ["4", "5", "512", "160", "no", "40", "3", "Raspberry"]
    assert next(line for line in lines if line.startswith("pi3-24m")).split()[3:5] == ["24", "0"]
    assert "host (real)" in text
    assert "phone" in catalog_table({"phone": _profile(name="phone")})


def test_load_profiles_refuses_oversized_and_junk_files(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ProfileError, match="at most"):
        load_profiles(big)
    junk = tmp_path / "junk.toml"
    junk.write_bytes(b"\xff\xfe\x00[[[")
    with pytest.raises(ProfileError, match="UTF-8|TOML"):
        load_profiles(junk)
