"""Device profiling: a short real measurement, its catalog form, and the cache read as untrusted input."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fleet.lan import profiling as p
from fleet.lan.profiling import DeviceProfile, ProfileCacheError
from sims.catalog import Profile


@pytest.fixture(scope="module")
def measured() -> DeviceProfile:
    return p.measure(seconds=0.2)


def sample(**kw: Any) -> DeviceProfile:
    base = dict(
        name="pi-kitchen", klass="raspberry-pi", gflops=4.5, tile_overhead_s=2e-4, memory_bytes=900 * p.MiB,
        cores=4, gpu=False, gpu_name=None, gpu_memory_bytes=None, gpu_gflops=None, link_mbps=None,
        latency_s=None, measured_at=1_700_000_000.0, tilefleet_version=p._tilefleet_version(), threads=4,
    )
    base.update(kw)
    return DeviceProfile(**base)


def test_measure_returns_sane_values(measured: DeviceProfile) -> None:
    m = measured
    assert 1 <= m.gflops <= 10_000
    assert 0 < m.tile_overhead_s < 0.1
    assert m.memory_bytes > 0 and m.cores >= 1 and 1 <= m.threads
    assert m.gpu is False and m.gpu_name is None and m.gpu_gflops is None and m.gpu_memory_bytes is None
    assert m.link_mbps is None and m.latency_s is None  # only measurable against a head
    assert m.name and m.klass and m.tilefleet_version
    assert abs(m.measured_at - time.time()) < 600


def test_measure_restores_torch_threads_and_rejects_bad_seconds() -> None:
    import torch

    before = torch.get_num_threads()
    p.measure(seconds=0.05, threads=1, progress=True)
    assert torch.get_num_threads() == before
    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="seconds"):
            p.measure(seconds=bad)  # type: ignore[arg-type]


def test_to_catalog_profile_validates(measured: DeviceProfile) -> None:
    prof = measured.to_catalog_profile()
    assert isinstance(prof, Profile)
    assert prof.gflops == measured.gflops and prof.memory_bytes == measured.memory_bytes
    assert prof.runtime_overhead_bytes == min(700 * p.MiB, measured.memory_bytes // 2)
    assert prof.link_mbps == 100.0 and prof.latency_s == 0.002 and not prof.emulated
    assert "measured by tilefleet profile on" in prof.source and "assumption until measured" in prof.source


def test_to_catalog_profile_odd_hostname_small_memory_gpu_and_measured_link() -> None:
    small = sample(name="my box (2)", memory_bytes=512 * p.MiB).to_catalog_profile()
    assert small.name == "my-box--2-" and small.runtime_overhead_bytes == 256 * p.MiB
    gpu = sample(gpu=True, gpu_name="Orin", gpu_memory_bytes=8 * 2**30, gpu_gflops=900.0,
                 link_mbps=940.0, latency_s=3e-4).to_catalog_profile()
    assert gpu.gpu and gpu.gflops == 900.0 and gpu.memory_bytes == 8 * 2**30
    assert gpu.runtime_overhead_bytes == 700 * p.MiB and gpu.link_mbps == 940.0
    assert "assumption until measured" not in gpu.source and "Orin" in gpu.source


def test_save_load_round_trip(tmp_path: Path, measured: DeviceProfile) -> None:
    path = tmp_path / "sub" / "profile.msgpack"
    assert p.load(path) is None
    assert p.save(measured, path) == path
    assert p.load(path) == measured
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [x.name for x in path.parent.iterdir()] == ["profile.msgpack"]  # no temp file left
    p.save(sample(), path)  # overwrite
    assert p.load(path) == sample()


def test_cache_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = p.cache_path()
    assert path.parent == tmp_path / "tilefleet" and path.name.startswith("profile-")
    assert path.suffix == ".msgpack"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert p.cache_path().parent == Path.home() / ".cache" / "tilefleet"


def _assert_cache_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ProfileCacheError) as e:
        p.load(path)
    msg = str(e.value)
    assert str(path) in msg and "tilefleet profile --refresh" in msg
    for f in fragments:
        assert f in msg
    assert isinstance(e.value, ValueError)


def test_corrupt_cache(tmp_path: Path) -> None:
    path = tmp_path / "c.msgpack"
    path.write_bytes(b"\xc1\xc1 not msgpack")
    _assert_cache_error(path, "not a valid profile file")
    good = msgpack.packb({"format": 1, "profile": asdict(sample())})
    path.write_bytes(good[: len(good) // 2])  # truncated
    _assert_cache_error(path)
    path.write_bytes(msgpack.packb([1, 2, 3]))
    _assert_cache_error(path, "format-1")
    path.write_bytes(msgpack.packb({"format": 99, "profile": {}}))
    _assert_cache_error(path, "format-1")
    path.write_bytes(msgpack.packb({1: 2}))  # non-string map key: strict_map_key
    _assert_cache_error(path)


def test_oversized_cache(tmp_path: Path) -> None:
    path = tmp_path / "big.msgpack"
    path.write_bytes(b"\x00" * (64 * 1024 + 1))
    _assert_cache_error(path, "larger than 64 KiB")
    doc = asdict(sample()) | {"name": "x" * 5000}  # small file, but over the string limit
    path.write_bytes(msgpack.packb({"format": 1, "profile": doc}))
    _assert_cache_error(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gflops", "fast"),
        ("gflops", True),
        ("gflops", -1.0),
        ("gflops", float("inf")),
        ("memory_bytes", 1.5),
        ("cores", 0),
        ("gpu", 1),
        ("gpu_name", 3),
        ("name", ""),
        ("link_mbps", [100]),
    ],
)
def test_wrong_types_in_cache(tmp_path: Path, field: str, value: Any) -> None:
    path = tmp_path / "t.msgpack"
    doc = asdict(sample()) | {field: value}
    path.write_bytes(msgpack.packb({"format": 1, "profile": doc}))
    _assert_cache_error(path, repr(field))


def test_missing_or_extra_fields_in_cache(tmp_path: Path) -> None:
    path = tmp_path / "f.msgpack"
    doc = asdict(sample())
    del doc["cores"]
    path.write_bytes(msgpack.packb({"format": 1, "profile": doc | {"evil": 1}}))
    _assert_cache_error(path, "missing ['cores']", "unexpected ['evil']")


def test_get_uses_the_cache_unless_refresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[float] = []

    def fake_measure(seconds: float = 1.0, progress: bool = False) -> DeviceProfile:
        calls.append(seconds)
        return sample(gflops=float(len(calls)))

    monkeypatch.setattr(p, "measure", fake_measure)
    first = p.get(seconds=0.3)
    assert calls == [0.3] and first.gflops == 1.0 and p.cache_path().exists()
    assert p.get() == first and len(calls) == 1
    again = p.get(refresh=True)
    assert len(calls) == 2 and again.gflops == 2.0 and p.get() == again
    # a cache written by another tilefleet version is measured again
    p.save(replace(again, tilefleet_version="0.0.1"))
    assert p.get().gflops == 3.0 and len(calls) == 3
    # a corrupt cache is reported, not silently replaced; --refresh overwrites it
    p.cache_path().write_bytes(b"garbage")
    with pytest.raises(ProfileCacheError):
        p.get()
    assert p.get(refresh=True).gflops == 4.0
    explicit = tmp_path / "elsewhere.msgpack"
    assert p.get(path=explicit).gflops == 5.0 and p.load(explicit) is not None
    assert os.path.exists(explicit)
