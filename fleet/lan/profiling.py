"""What this device can do, measured: the core of ``tilefleet profile``.

Why measure at all: the catalog's profiles (:mod:`sims.catalog`) are the papers' devices, sourced
but assumed; a device joining a real cluster should be priced by its own figures. :func:`measure`
takes about ``seconds`` of torch work over conv shapes taken from YOLOv2-sized networks (an early
3-channel layer, a middle 64-channel one, a deep 256->512 one), because a matrix-multiply peak
would flatter the device, plus the fixed cost of a tiny conv call (the floor of per-tile
overhead). Link figures stay ``None`` here: they only mean something measured against a head.

Measuring costs a second of a busy device, so the result is cached per host in the user's cache
dir (:func:`cache_path`) and :func:`get` re-uses it. The cache is read as untrusted input (size
limits, msgpack limits, strict types), since a truncated or hand-edited file must fail clearly,
not become a nonsense profile.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
from sims.speed import conv_gflops, median_seconds

from .state import NotARegularFile, atomic_write, read_bounded

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sims.catalog import Profile

__all__ = [
    "CONV_SHAPES", "DeviceProfile", "ProfileCacheError", "cache_path", "get", "load", "measure", "save",
]

MiB: Final = 2**20
CACHE_MAX_BYTES: Final = 64 * 1024
CACHE_FORMAT: Final = 1
DEFAULT_LINK_MBPS: Final = 100.0
DEFAULT_LATENCY_S: Final = 2e-3

CONV_SHAPES: Final = ((3, 32, 152), (64, 64, 76), (256, 512, 19))
"""(in channels, out channels, side) of the 3x3 convs timed: YOLOv2-like early, middle, deep layers."""


class ProfileCacheError(ValueError):
    """The cached profile cannot be trusted; the message names the file and how to measure again."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device's measured figures, as ``tilefleet profile`` reports and caches them.

    ``gflops`` is the CPU's sustained 3x3-conv rate on ``threads`` torch threads (FLOPs counted as
    2 * MACs, as the catalog does); ``gpu_gflops`` the same on the GPU if there is one.
    ``tile_overhead_s`` is the time of a tiny conv call (the larger of CPU and GPU where both
    exist): a lower bound on what each tile costs, RPC excluded. ``memory_bytes`` is what the OS
    says is available now, not installed RAM, since that is what tiles can actually get.
    """

    name: str
    klass: str
    gflops: float
    tile_overhead_s: float
    memory_bytes: int
    cores: int
    gpu: bool
    gpu_name: str | None
    gpu_memory_bytes: int | None
    gpu_gflops: float | None
    link_mbps: float | None
    latency_s: float | None
    measured_at: float
    tilefleet_version: str
    threads: int = 1

    def to_catalog_profile(self, *, emulated: bool = False) -> Profile:
        """This device as a catalog :class:`~sims.catalog.Profile`, with sources for every figure.

        With a GPU, tiles run there (workers prefer CUDA), so its rate and memory are used. Link
        figures not yet measured become 100 Mbit/s and 2 ms, and the source says they are assumed.
        """
        from sims.catalog import Profile

        gflops = self.gpu_gflops if self.gpu and self.gpu_gflops else self.gflops
        memory = self.gpu_memory_bytes if self.gpu and self.gpu_memory_bytes else self.memory_bytes
        link = self.link_mbps if self.link_mbps is not None else DEFAULT_LINK_MBPS
        latency = self.latency_s if self.latency_s is not None else DEFAULT_LATENCY_S
        when = _dt.datetime.fromtimestamp(self.measured_at, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        what = (f"GPU {self.gpu_name}: conv rate and memory" if self.gpu and self.gpu_gflops
                else f"CPU conv rate on {self.threads} threads and available memory")
        link_src = (f"link {link:g} Mbit/s and latency {latency * 1e3:g} ms measured against a head"
                    if self.link_mbps is not None and self.latency_s is not None else
                    f"link {link:g} Mbit/s and latency {latency * 1e3:g} ms: assumption until measured "
                    "against a head")
        return Profile(
            name=_profile_name(self.name),
            gflops=float(gflops),
            tile_overhead_s=float(self.tile_overhead_s),
            memory_bytes=int(memory),
            runtime_overhead_bytes=min(700 * MiB, int(memory) // 2),
            gpu=self.gpu,
            link_mbps=float(link),
            latency_s=float(latency),
            klass=self.klass,
            source=(f"measured by tilefleet profile on {when} (tilefleet {self.tilefleet_version}): {what}; "
                    f"per-tile overhead = a tiny conv call; runtime overhead min(700 MiB, memory/2): "
                    f"assumption; {link_src}"),
            emulated=emulated,
        )


def _profile_name(hostname: str) -> str:
    # catalog names allow letters, digits, '.', '_' and '-' and must start alphanumeric
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname).lstrip("._-")
    return name[:63] or "device"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _available_memory() -> int:
    """MemAvailable (what can be allocated without swapping); sysconf figures where /proc is absent."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages_key in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            pages, page = os.sysconf(pages_key), os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
        if pages > 0 and page > 0:
            return int(pages) * int(page)
    return 0


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _board_model() -> str:
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return ""


def _guess_klass(gpu: bool) -> str:
    """A catalog class label; ``host`` (what discovery falls back to) when nothing more is known."""
    model = _board_model().lower()
    if "raspberry pi" in model:
        return "raspberry-pi"
    if "jetson" in model or Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if gpu:
        return "gpu-server"
    if any(Path("/sys/class/power_supply").glob("BAT*")):
        return "laptop"
    return "host"


def _conv_rate(torch: Any, device: Any, budget_s: float, bar: Any, sync: Any = None) -> tuple[float, float]:
    """(GFLOP/s over :data:`CONV_SHAPES`, tiny-conv seconds) on ``device``: the per-tile overhead is
    the time of a conv too small to cost anything but the call itself."""
    rate = conv_gflops(CONV_SHAPES, budget_s * 0.9, device=device, sync=sync, on_shape=lambda: bar.update(1))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(1, 8, 4, 4, generator=gen).to(device)
        w = torch.randn(8, 8, 1, 1, generator=gen).to(device)
        tiny = median_seconds(lambda: torch.nn.functional.conv2d(x, w), budget_s * 0.1, sync=sync, min_runs=20)
    bar.update(1)
    return rate, tiny


def _tilefleet_version() -> str:
    try:
        from importlib.metadata import version

        return version("tilefleet")
    except Exception:  # running from a checkout that is not installed
        return "0+unknown"


def measure(seconds: float = 1.0, progress: bool = False, *, threads: int | None = None) -> DeviceProfile:
    """Measure this device in about ``seconds`` (twice that with a GPU, which is timed too).

    ``threads`` defaults to every core this process may use: the device's capacity. torch's own
    thread count is restored afterwards. ``progress`` shows a tqdm bar on stderr.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or not 0 < seconds <= 600:
        raise ValueError(f"seconds must be a number in (0, 600], got {seconds!r}")
    import torch
    from tqdm import tqdm

    cores = _cores()
    n = cores if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    has_gpu = bool(torch.cuda.is_available())
    steps = (len(CONV_SHAPES) + 1) * (2 if has_gpu else 1)
    before = torch.get_num_threads()
    with tqdm(total=steps, desc="profiling", unit="step", disable=not progress, leave=False) as bar:
        try:
            torch.set_num_threads(n)
            gflops, overhead = _conv_rate(torch, torch.device("cpu"), float(seconds), bar)
        finally:
            torch.set_num_threads(before)
        gpu_name = gpu_mem = gpu_gflops = None
        if has_gpu:
            dev = torch.device("cuda", 0)
            props = torch.cuda.get_device_properties(dev)
            gpu_name, gpu_mem = str(props.name), int(props.total_memory)
            gpu_gflops, gpu_overhead = _conv_rate(torch, dev, float(seconds), bar,
                                                  sync=lambda: torch.cuda.synchronize(dev))
            overhead = max(overhead, gpu_overhead)
    return DeviceProfile(
        name=socket.gethostname() or "device",
        klass=_guess_klass(has_gpu),
        gflops=float(gflops),
        tile_overhead_s=float(overhead),
        memory_bytes=_available_memory(),
        cores=cores,
        gpu=has_gpu,
        gpu_name=gpu_name,
        gpu_memory_bytes=gpu_mem,
        gpu_gflops=gpu_gflops,
        link_mbps=None,
        latency_s=None,
        measured_at=time.time(),
        tilefleet_version=_tilefleet_version(),
        threads=n,
    )


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/tilefleet/profile-<host>.msgpack`` (``~/.cache`` by default): one per host,
    so a home directory shared over NFS by several devices never hands one device another's figures."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # the spec ignores relative values
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()).lstrip(".") or "device"
    return root / "tilefleet" / f"profile-{host}.msgpack"


def save(profile: DeviceProfile, path: Path | None = None) -> Path:
    """Write the cache atomically (temp file + rename) and readable by its owner only."""
    path = Path(path) if path is not None else cache_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, msgpack.packb({"format": CACHE_FORMAT, "profile": asdict(profile)}, use_bin_type=True))
    return path


_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "name": (str,), "klass": (str,), "gflops": (float, int), "tile_overhead_s": (float, int),
    "memory_bytes": (int,), "cores": (int,), "gpu": (bool,), "gpu_name": (str, type(None)),
    "gpu_memory_bytes": (int, type(None)), "gpu_gflops": (float, int, type(None)),
    "link_mbps": (float, int, type(None)), "latency_s": (float, int, type(None)),
    "measured_at": (float, int), "tilefleet_version": (str,), "threads": (int,),
}
_POSITIVE: Final = ("gflops", "cores", "threads", "gpu_gflops", "link_mbps", "measured_at")


def _cache_error(path: Path, problem: str) -> ProfileCacheError:
    return ProfileCacheError(
        f"profile cache {path}: {problem}; run `tilefleet profile --refresh` to measure this device again"
    )


def load(path: Path | None = None) -> DeviceProfile | None:
    """The cached profile, or None if there is none; raises :class:`ProfileCacheError` if it is bad."""
    path = Path(path) if path is not None else cache_path()
    try:
        data, _ = read_bounded(path, CACHE_MAX_BYTES)  # a regular file only: a FIFO would block the read
    except FileNotFoundError:
        return None
    except NotARegularFile:
        raise _cache_error(path, "is not a regular file (a directory, device or pipe)") from None
    except OSError as e:
        raise _cache_error(path, f"cannot be read ({e.strerror or e})") from None
    if len(data) > CACHE_MAX_BYTES:
        raise _cache_error(path, f"is larger than {CACHE_MAX_BYTES // 1024} KiB, too large to be a profile")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=4096, max_bin_len=0,
                              max_array_len=64, max_map_len=64, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for corrupt or over-limit input
        raise _cache_error(path, f"is not a valid profile file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or type(doc.get("format")) is not int or doc["format"] != CACHE_FORMAT \
            or not isinstance(doc.get("profile"), dict):
        raise _cache_error(path, f"is not a format-{CACHE_FORMAT} tilefleet profile")
    raw = doc["profile"]
    names = {f.name for f in fields(DeviceProfile)}
    if set(raw) != names:
        missing, extra = sorted(names - set(raw)), sorted(set(raw) - names)
        raise _cache_error(path, f"has the wrong fields (missing {missing}, unexpected {extra})")
    for key, types in _TYPES.items():
        v = raw[key]
        bad = not isinstance(v, types) or (isinstance(v, bool) and bool not in types)
        if not bad and isinstance(v, (int, float)) and not isinstance(v, bool):
            bad = not math.isfinite(v) or v < 0 or (key in _POSITIVE and v <= 0)
        if not bad and isinstance(v, str):
            bad = not v.strip() or len(v) > 255
        if bad:
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _cache_error(path, f"field {key!r} must be {wanted} (finite, non-negative), got {v!r:.80}")
    return DeviceProfile(**raw)


def get(refresh: bool = False, seconds: float = 1.0, progress: bool = False, *,
        path: Path | None = None) -> DeviceProfile:
    """This device's profile: the cached one unless ``refresh``, else measured now and cached.

    A cache written by another tilefleet version is measured again, since what is measured may
    have changed; a corrupt cache raises (its message says to use ``--refresh``) rather than being
    silently replaced, so a broken cache dir is noticed.
    """
    if not refresh:
        cached = load(path)
        if cached is not None and cached.tilefleet_version == _tilefleet_version():
            return cached
    profile = measure(seconds=seconds, progress=progress)
    save(profile, path)
    return profile
