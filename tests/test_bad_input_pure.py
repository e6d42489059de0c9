"""Bad input that needs no cluster: models, grids and plans, configuration files, Darknet files,
profile caches and the LAN's network input. Each case is its own test id; each error is typed and
its message says what was wrong and what is accepted (issue #10, "Bad input"; docs/errors.md).
The frames a deployment refuses or accepts are in test_bad_input.py, on a real Ray deployment.

Cases already covered exactly elsewhere are not repeated here (test_tiling_plan's bad inputs and
grids, test_darknet's unknown sections and missing keys, test_catalog's spec and TOML errors,
test_discovery / test_lan_limits' adverts, test_agent's malformed requests); see the report in
docs/errors.md for where each class is tested.
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

import tiling
from fleet.lan import agent as agent_mod
from fleet.lan import discovery as d
from fleet.lan import profiling
from fleet.lan.agent import Agent, AgentClient, AgentProtocolError, AgentUnreachable, encode_frame, read_frame
from fleet.lan.discovery import BadAdvert, HeadAdvert, HeadRegistry
from fleet.lan.profiling import ProfileCacheError
from fleet.lan.state import LanError
from fleet.lan.trust import local_versions, pick_head
from fleet.runtime.planner import choose_plan
from sims.catalog import BUILTIN, DeviceSpec, ProfileError, parse_spec
from sims.profile_files import load_profiles
from sims.scenario import ScenarioError, load_scenario
from tiling.sources.darknet import DarknetError, DarknetWeightsWarning, load_darknet
from tiling.sources.darknet_cfg import MAX_CFG_BYTES, MAX_LAYERS, MAX_MAP_VALUES

from helpers import assert_exact
from test_agent import TOKEN
from test_agent import advert as agent_advert
from test_darknet import WEIGHTS_CFG, _weights_bytes

MiB = 2**20


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result or exception, failing the test if it takes longer than ``seconds`` (a read
    that blocks on a FIFO would otherwise hang the suite instead of failing it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def assert_says(err: BaseException, *fragments: str) -> None:
    msg = str(err)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


# ==================================================================================================
# Models
# ==================================================================================================


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)).eval()


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Ignores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, 4, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * 2


@pytest.mark.parametrize(("model", "fragments"), [
    (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
     ["nothing in the model is spatially local", "AdaptiveAvgPool2d", "global reduction", "runs in the tail"]),
    (Ignores(), ["nothing in the model is spatially local", "no op reads the input"]),
], ids=["global-pool-first", "input-unused"])
def test_model_with_no_tileable_layer(model: nn.Module, fragments: list[str]) -> None:
    with pytest.raises(tiling.NotTileable) as e:
        tiling.partition(model.eval(), X, grid=(2, 2))
    assert_says(e.value, *fragments)


class FlattenInside(nn.Module):
    """A conv, then a softmax over the flattened map (not spatially local), then another conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y.flatten(1).softmax(-1).view_as(y))


@pytest.mark.parametrize("kw", [dict(upto="b"), dict(stages=["b"])], ids=["upto", "stages"])
def test_unsupported_layer_inside_a_requested_fused_range_is_named(kw: dict[str, Any]) -> None:
    with pytest.raises(tiling.NotTileable) as e:
        tiling.partition(FlattenInside().eval(), X, grid=(2, 2), **kw)
    what = next(iter(kw))
    assert_says(e.value, f"{what}='b' lies beyond where fusion must end", "flatten", "not an (N, C, H, W) tensor",
                "accepted: a layer before it", "0:a")


class WhileLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while x.abs().max() > 1:  # data-dependent loop
            x = self.a(x) / 2
        return x


class ValueToInt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(x.sum().item()) % 3  # a value read back from the data decides the shape
        return self.a(x)[:, : k + 1]


@pytest.mark.parametrize(("model", "line"), [(WhileLoop, "while x.abs().max() > 1:"),
                                             (ValueToInt, "k = int(x.sum().item()) % 3")], ids=["while", "item"])
def test_data_dependent_control_flow_names_the_line(model: type[nn.Module], line: str) -> None:
    # (an `if` on the data is test_tiling_plan.test_untraceable_root_names_the_line)
    with pytest.raises(tiling.TraceFailure) as e:
        tiling.partition(model().eval(), X, grid=(2, 2))
    assert_says(e.value, "test_bad_input_pure.py:", line, "leaf_modules=", "upto=")


class BnDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.a(x)))


def test_model_in_training_mode_is_tiled_in_eval_mode_with_a_warning() -> None:
    m = BnDropout().train()
    with pytest.warns(tiling.TrainingModeWarning) as rec:
        plan = tiling.partition(m, X, grid=(2, 2))
    assert_says(rec[0].message, "training mode", "bn (BatchNorm2d)", "drop (Dropout)", "cannot be tiled exactly",
                "model.eval()")
    assert m.training  # the caller's model is left as it was
    with torch.no_grad():
        assert tiling.rel_error(plan.run(X), m.eval()(X)) <= 1e-4


class OwnTrainingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * (0.5 if self.training else 1.0)


def test_own_module_reading_self_training_is_warned_about() -> None:
    with pytest.warns(tiling.TrainingModeWarning, match=r"the root \(OwnTrainingBranch\)"):
        tiling.partition(OwnTrainingBranch().train(), X, grid=(2, 2))


def test_training_mode_that_changes_nothing_is_silent() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.InstanceNorm2d(4)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tiling.TrainingModeWarning)
        tiling.partition(m, X, grid=(2, 2))


class MixedOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.a(x)
        return {"map": self.b(y), "label": "cat", "n": 3, "none": None, "pair": (y.mean(), 1.5), "list": [y, "x"]}


def test_outputs_that_mix_tensors_and_other_values_are_accepted_and_exact() -> None:
    plan = assert_exact(MixedOutputs(), X, grid=(2, 2))  # values, structure and types of the output
    out = plan.run(X)
    assert out["label"] == "cat" and out["n"] == 3 and out["none"] is None and out["pair"][1] == 1.5


# ==================================================================================================
# Grids and plans
# ==================================================================================================


def test_grid_no_output_can_hold_names_the_largest_that_fits() -> None:
    with pytest.raises(tiling.GridError) as e:
        tiling.partition(conv_net(), X, grid=(1, 1000))
    assert_says(e.value, "grid of 1x1000", "the largest grid that fits is 16x16")


@pytest.mark.parametrize(("kw", "fragments"), [
    (dict(row_weights=[0, 1]), ["row_weights must be positive finite numbers", "got 0"]),
    (dict(col_weights=[1, float("nan")]), ["col_weights must be positive finite numbers", "got nan"]),
    (dict(row_weights=[1, float("inf")]), ["row_weights", "got inf"]),
    (dict(row_weights=[True, 1]), ["row_weights", "got True"]),
    (dict(col_weights=["fast", 1]), ["col_weights", "got 'fast'"]),
    (dict(row_weights=5), ["row_weights must be a list of positive finite numbers, one per row", "got 5"]),
    (dict(col_weights=[1]), ["1 column weights for a grid of 2 columns"]),
], ids=["zero", "nan", "inf", "bool", "text", "not-a-list", "col-count"])
def test_bad_weights(kw: dict[str, Any], fragments: list[str]) -> None:
    # negative weights and a wrong row count: test_tiling_plan.test_bad_grid
    with pytest.raises(tiling.GridError) as e:
        tiling.partition(conv_net(), X, grid=(2, 2), **kw)
    assert_says(e.value, *fragments)


def test_numpy_weights_are_accepted_and_exact() -> None:
    assert_exact(conv_net(), X, grid=(2, 2), row_weights=np.array([1.0, 3.0], dtype=np.float32),
                 col_weights=np.array([2, 1]))


@pytest.mark.parametrize(("stages", "fragments"), [
    ([3, 1], ["stage boundaries must be increasing layer indices", "[3, 1]"]),
    ([2, 2], ["must be increasing", "[2, 2]"]),
    ([9], ["stages=9 is outside the 4 fusible layers: accepted 0..4"]),
    ([(0, 3), (2, 4)], ["must be consecutive (start, end) layer ranges from 0 to at most 4"]),
    (["nowhere"], ["stages='nowhere' names no fusible node or module; fusible layers: 0:_0"]),
], ids=["reversed", "repeated", "past-the-end", "overlapping-ranges", "unknown-name"])
def test_stages_out_of_order_or_unknown(stages: list[Any], fragments: list[str]) -> None:
    with pytest.raises(tiling.NotTileable) as e:
        tiling.partition(conv_net(), X, grid=(2, 2), stages=stages)
    assert_says(e.value, *fragments)


def test_plan_no_device_can_hold_names_the_smallest_budget_needed() -> None:
    tiny = dataclasses.replace(BUILTIN["pi3"], name="tiny", memory_bytes=2 * MiB, runtime_overhead_bytes=0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 256, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1)).eval()  # 2.8 MiB of weights
    with pytest.raises(tiling.NoPlanFits) as e:
        choose_plan(model, torch.randn(1, 3, 8, 8), [DeviceSpec("tiny-0", tiny), DeviceSpec("tiny-1", tiny)])
    err = e.value
    assert isinstance(err, tiling.NotTileable) and err.budget_bytes == 2 * MiB and err.need_bytes > 2.8 * MiB
    assert_says(err, f"needs {err.need_bytes} bytes", f"the largest budget here is {2 * MiB} bytes",
                f"add a device with at least {err.need_bytes / MiB:.1f} MiB", "the fused weights alone are 2.8 MiB")


# ==================================================================================================
# Configuration: device specs, profile TOML, scenario files
# ==================================================================================================


@pytest.mark.parametrize(("spec", "kw", "fragments"), [
    (None, {}, ["cluster spec must be a string such as 'pi3*4,jetson-nano'", "got None"]),
    (b"pi3*2", {}, ["cluster spec must be a string", "got b'pi3*2'"]),
    ("pi3*" + "9" * 5000, {}, ["cluster spec of 5004 characters", "at most 4096 characters"]),
    ("pi3*" + "9" * 4000, {}, ["names more than 64 devices", "simulates up to 1000000"]),
    ("pi3*10000000000", {"max_devices": None}, ["names more than 1000000 devices; the simulator takes at most"]),
    ("pi3\x00*2", {}, ["unknown device profile 'pi3\\x00'", "did you mean 'pi3'?", "known profiles:"]),
    ("x" * 1000, {}, ["unknown device profile 'xxxx", "'...", "known profiles:"]),
], ids=["none", "bytes", "too-long", "count-of-4000-digits", "simulator-cap", "nul-byte", "long-name-clipped"])
def test_malformed_device_specs(spec: Any, kw: dict[str, Any], fragments: list[str]) -> None:
    # counts such as 0, -1, 1.5, 2*2 and unknown names: test_catalog.test_parse_spec_errors_are_clear
    with pytest.raises(ProfileError) as e:
        parse_spec(spec, **kw)
    assert_says(e.value, *fragments)
    assert len(str(e.value)) < 800  # long input is clipped, not echoed


@pytest.mark.parametrize(("body", "fragments"), [
    ('[profiles.x]\nbase = "pi4"\nmemory_mib = 1e300\n', ["memory_bytes = a 307-digit number is absurd",
                                                          "accepted: at most 1.1259e+15 bytes (1 PiB)"]),
    ('[profiles.x]\nbase = "pi4"\ngflops = 1e12\n', ["gflops = 1e+12 is absurd", "at most 1e+09 GFLOP/s"]),
    ('[profiles.x]\nbase = "pi4"\nlink_mbps = 1e-300\n', ["link_mbps = 1e-300 is absurd", "at least 0.001 Mbit/s"]),
    ('[profiles.x]\nbase = "pi4"\nlatency_ms = 1e10\n', ["latency_s = 1e+07 is absurd", "at most 3600 s"]),
    ('[profiles.x]\nbase = "pi4"\ngflops = nan\n', ["key 'gflops' must be a number", "got nan"]),
], ids=["memory", "gflops", "link", "latency", "nan"])
def test_absurd_profile_figures(tmp_path: Path, body: str, fragments: list[str]) -> None:
    f = tmp_path / "p.toml"
    f.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_profiles(f)
    assert_says(e.value, str(f), "'x'", *fragments)


def _fifo(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_profile_file_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    p = _fifo(tmp_path, "p.toml") if kind == "fifo" else tmp_path
    with pytest.raises(ProfileError) as e:
        within(5, lambda: load_profiles(p))
    assert_says(e.value, "not a regular file", "expected a TOML file of [profiles.NAME] tables")


TABLE = dict(BUILTIN)


@pytest.mark.parametrize(("body", "fragments"), [
    ("event = [1, 2]\n", ["event 1: must be a table"]),
    ('[[event]]\nat = nan\nkill = "pi3-0"\n', ["event 1: at must be a number >= 0", "got nan"]),
    ('[[event]]\nat = 1\nslow = "pi3-0"\nfactor = inf\n', ["factor must be a number >= 0.001", "got inf"]),
    ('[[event]]\nat = 1\nkill = "pi3-0"\nwhen = 3\n', ["unknown key(s) ['when']", "accepted: ['at', 'detect'"]),
    ('[[event]]\nat = 1\nkill = 3\n', ["kill names a device id (or a profile for join), got 3"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00", ["not a TOML file"]),
], ids=["not-tables", "nan-time", "inf-factor", "unknown-key", "id-not-text", "binary"])
def test_malformed_scenario_files(tmp_path: Path, body: str | bytes, fragments: list[str]) -> None:
    # unknown devices and profiles, negative times, oversized files: test_sim
    f = tmp_path / "s.toml"
    f.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(ScenarioError) as e:
        load_scenario(f, parse_spec("pi3*2"), TABLE)
    assert_says(e.value, str(f), *fragments)


def test_scenario_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    p = _fifo(tmp_path, "s.toml")
    with pytest.raises(ScenarioError) as e:
        within(5, lambda: load_scenario(p, parse_spec("pi3"), TABLE))
    assert_says(e.value, "not a regular file", "[[event]] tables")


# ==================================================================================================
# Darknet cfg and weights files
# ==================================================================================================

NET = "[net]\nwidth=8\nheight=8\nchannels=3\n"
CONV = "[convolutional]\nfilters=4\nsize=1\n"


@pytest.mark.parametrize(("cfg", "fragments"), [
    (b"\x89PNG\r\n\x1a\n\x00\xff", ["is not UTF-8 text", "offset", "expected a Darknet .cfg: [net] and [layer] sections"]),
    ("[net]\nwidth=1000000\nheight=1000000\nchannels=3\n" + CONV,
     ["section [net] at cfg line 1", "(3, 1000000, 1000000)", f"at most {MAX_MAP_VALUES} values"]),
    (NET + "[convolutional]\nfilters=1000000000\nsize=3\n", ["layer 0 [convolutional] at cfg line 5",
                                                               "(1000000000, 6, 6)", "at most"]),
    (NET + "[convolutional]\nfilters=30000\nsize=1\n[convolutional]\nfilters=30000\nsize=1\n",
     ["layer 1 [convolutional]", "30000 filters of 30000x1x1", "at most 268435456 per layer"]),
    (NET + CONV + "[upsample]\nstride=1000000\n", ["layer 1 [upsample]", "(4, 8000000, 8000000)", "at most"]),
    (NET + "[maxpool]\nsize=1\nstride=1\n" * (MAX_LAYERS + 1), [f"{MAX_LAYERS + 1} layers", f"at most {MAX_LAYERS}"]),
    (NET + CONV + "[shortcut]\nfrom=-1\nalpha=nan\n", ["layer 1 [shortcut]", "'alpha=nan' is not a finite number"]),
    (NET + CONV + "[yolo]\nclasses=1\nnum=1\nanchors=1,inf\n", ["'anchors=1,inf' holds a value that is not a finite"]),
    (NET + "[convolutional\nfilters=4\n", ["cfg line 5: malformed section header '[convolutional'", "expected '[name]'"]),
    (NET + "[\x00\x01junk]\nx=1\n", ["is an unknown section; accepted sections: [net], [convolutional]"]),
    (NET + "[convolutional]\nfilters=" + "9" * 5000 + "\nsize=1\n", ["is not an integer", "..."]),
], ids=["binary-junk", "absurd-net", "absurd-filters", "absurd-weights", "absurd-upsample", "too-many-layers",
        "nan-float", "inf-in-list", "broken-header", "junk-section", "huge-integer"])
def test_bad_darknet_cfg(cfg: str | bytes, fragments: list[str]) -> None:
    # unknown/unsupported sections, missing keys, bad references: test_darknet
    t0 = time.monotonic()
    with pytest.raises(DarknetError) as e:
        load_darknet(cfg)
    assert_says(e.value, *fragments)
    assert len(str(e.value)) < 800 and time.monotonic() - t0 < 10  # refused before anything is built


@pytest.mark.parametrize("kind", ["oversized", "fifo", "directory"])
def test_cfg_file_that_is_too_big_or_not_a_file(tmp_path: Path, kind: str) -> None:
    if kind == "oversized":
        p = tmp_path / "big.cfg"
        p.write_text(NET + CONV + "#" * MAX_CFG_BYTES)
        fragments = [f"larger than {MAX_CFG_BYTES} bytes", "a few KiB of text"]
    else:
        p = _fifo(tmp_path, "f.cfg") if kind == "fifo" else tmp_path
        fragments = ["cannot read cfg file", "not a regular file"]
    with pytest.raises(DarknetError) as e:
        within(5, lambda: load_darknet(p))
    assert_says(e.value, *fragments)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_weights_that_are_not_a_file(tmp_path: Path, kind: str) -> None:
    p = _fifo(tmp_path, "w.weights") if kind == "fifo" else Path("/dev/zero")  # /dev/zero: never ends
    with pytest.raises(DarknetError) as e:
        within(5, lambda: load_darknet(WEIGHTS_CFG, weights=p))
    assert_says(e.value, "cannot read weights file", "not a regular file", "expected a Darknet .weights file")


def test_weights_far_too_long_warn_without_being_read_whole(tmp_path: Path) -> None:
    # (4 trailing bytes and a truncated file: test_darknet.test_weights_truncated_and_trailing)
    data, _ = _weights_bytes((0, 2, 0), seen=0)
    p = tmp_path / "huge.weights"
    p.write_bytes(data)
    extra = 8 * 2**30
    os.truncate(p, len(data) + extra)  # sparse: 8 GiB of zeros the reader must not load
    with pytest.warns(DarknetWeightsWarning, match=f"{extra} trailing bytes"):
        model = within(10, lambda: load_darknet(WEIGHTS_CFG, weights=p))
    ref = load_darknet(WEIGHTS_CFG, weights=data)
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# ==================================================================================================
# Profile caches
# ==================================================================================================


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_profile_cache_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    # corrupt, truncated, oversized and mistyped caches: test_profiling
    p = _fifo(tmp_path, "c.msgpack") if kind == "fifo" else tmp_path
    with pytest.raises(ProfileCacheError) as e:
        within(5, lambda: profiling.load(p))
    assert_says(e.value, str(p), "not a regular file", "tilefleet profile --refresh")


# ==================================================================================================
# Network: adverts, the agent, joining
# ==================================================================================================


def _txt(**override: Any) -> dict[Any, Any]:
    t: dict[Any, Any] = dict(agent_advert(TOKEN).to_txt())
    t.update(override)
    return t


@pytest.mark.parametrize(("txt", "key", "fragments"), [
    (_txt(ray_port=6379), "ray_port", ["value must be bytes or text", "got int"]),
    (_txt(**{"x-vendor": "v" * 300}), "x-vendor", ["TXT entry is 309 bytes", "at most 255"]),
    (_txt(cluster_id="\x00\x01\x02"), "cluster_id", ["must be 1..63 letters, digits"]),
    (None, "*", ["the TXT record must be a mapping, got NoneType"]),
    ({7: b"x"}, "*", ["keys must be UTF-8 text"]),
], ids=["int-value", "oversized-unknown-field", "control-chars", "none", "int-key"])
def test_txt_records_with_garbage(txt: Any, key: str, fragments: list[str]) -> None:
    # bad ports, fingerprints, names, versions, missing keys, non-UTF-8: test_discovery, test_lan_limits
    with pytest.raises(BadAdvert) as e:
        HeadAdvert.from_txt(txt, "10.0.0.5")
    assert e.value.key == key
    assert_says(e.value, *fragments)
    HeadRegistry().apply_add("junk._tilefleet._tcp.local.", txt, "10.0.0.5")  # discovery logs it, never raises


def _threads_settle(baseline: int, timeout: float = 10.0) -> int:
    """Wait until the thread count is back to ``baseline`` (or the timeout); return the count."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


@pytest.fixture
def quick_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    monkeypatch.setattr(agent_mod, "IO_TIMEOUT_S", 0.5)
    a = Agent(agent_advert(TOKEN), TOKEN, lambda: [], host="127.0.0.1", port=0)
    a.start()
    yield a
    a.close()


def _serves(a: Agent) -> None:
    with AgentClient(*a.address, timeout=5) as c:
        assert c.info().cluster_name == "lab"


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # what we sent after the agent closed came back as a reset
        return True


@pytest.mark.parametrize("how", ["stall", "trickle"])
def test_agent_drops_a_stalled_or_trickling_connection_without_leaking_a_thread(quick_agent: Agent, how: str) -> None:
    baseline = threading.active_count()  # the agent's accept thread, no connection
    t0 = time.monotonic()
    with socket.create_connection(quick_agent.address, timeout=5) as s:
        payload = encode_frame({"op": "info"})
        if how == "stall":
            s.sendall(payload[:2])  # half a header, then nothing
        else:  # one byte per 0.1 s, each well inside a per-read timeout, until the agent hangs up
            for b in payload[:-1]:
                if select.select([s], [], [], 0.1)[0]:  # readable: the agent closed the connection
                    break
                s.sendall(bytes([b]))
        assert _closed_by_peer(s)
    assert time.monotonic() - t0 < 5
    assert _threads_settle(baseline) <= baseline
    _serves(quick_agent)


def test_agent_busy_with_stalled_connections_recovers(quick_agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "IO_TIMEOUT_S", 2.0)  # the stalled ones outlast the connection that is refused
    baseline = threading.active_count()
    stalled = [socket.create_connection(quick_agent.address, timeout=10) for _ in range(agent_mod.MAX_CONNECTIONS)]
    try:
        for s in stalled:
            s.sendall(b"\x00")
        with socket.create_connection(quick_agent.address, timeout=10) as extra:  # one too many: told so
            reply = read_frame(extra, 2**20)
        assert reply["ok"] is False and "busy" in reply["error"] and "try again" in reply["error"]
        assert all(_closed_by_peer(s) for s in stalled)  # each dropped at its deadline
    finally:
        for s in stalled:
            s.close()
    assert _threads_settle(baseline) <= baseline
    _serves(quick_agent)


class FakeServer:
    """A plain TCP server on localhost that is not a tilefleet agent: ``reply(conn)`` answers."""

    def __init__(self, reply: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.reply = reply
        self.done = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            try:
                self.reply(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def _http(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def _silent(conn: socket.socket) -> None:
    pass  # accepts and says nothing


def _hangup(conn: socket.socket) -> None:
    conn.recv(1024)  # the request, then a hang-up without a word
    conn.close()


def _bad_advert(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(encode_frame({"ok": True, "advert": {"cluster_name": "lab"}, "host": "10.0.0.5"}))


@pytest.mark.parametrize(("reply", "error", "fragments"), [
    (_http, AgentProtocolError, ["sent a bad message", "it starts b'HTTP'", "expected a tilefleet agent",
                                 "is something else listening there?"]),
    (_silent, AgentUnreachable, ["stopped answering (2 s timeout)"]),
    (_hangup, AgentProtocolError, ["closed the connection", "expected a tilefleet agent"]),
    (_bad_advert, AgentProtocolError, ["sent a bad advert", "advert key 'cluster_id': missing"]),
], ids=["http-server", "silent-server", "hangs-up", "bad-advert"])
def test_join_where_something_else_listens(reply: Callable[[socket.socket], None], error: type[Exception],
                                           fragments: list[str]) -> None:
    server = FakeServer(reply)
    try:
        t0 = time.monotonic()
        with pytest.raises(error) as e:
            within(20, lambda: pick_head(None, address=server.address, timeout=2))
        assert time.monotonic() - t0 < 10  # generous: a behaviour check, not a benchmark
        assert_says(e.value, server.address, *fragments)
    finally:
        server.close()


def test_join_where_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        address = f"127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(AgentUnreachable) as e:
            pick_head(None, address=address, timeout=2)
        assert time.monotonic() - t0 < 10
    assert_says(e.value, f"no tilefleet agent at {address} (connection refused)", "is `tilefleet head` running there")


def test_join_a_head_of_another_wire_version() -> None:
    v = local_versions()
    adv = dataclasses.replace(agent_advert(TOKEN), wire_version=d.WIRE_VERSION + 1, tilefleet_version=v["tilefleet_version"],
                              ray_version=v["ray_version"], python_version=v["python_version"])
    a = Agent(adv, None, lambda: [], host="127.0.0.1", port=0)
    a.start()
    try:
        with pytest.raises(LanError) as e:
            pick_head(None, address=f"127.0.0.1:{a.address[1]}", timeout=2)
    finally:
        a.close()
    assert_says(e.value, "cannot join cluster lab", f"wire protocol {d.WIRE_VERSION + 1} on the head, "
                f"{d.WIRE_VERSION} here", "upgrade the older side")
    assert "Ray" not in str(e.value) and "Python" not in str(e.value)  # only what differs


def test_join_where_a_peer_answers_an_over_long_msgpack_array() -> None:
    big = msgpack.packb(list(range(5000)), use_bin_type=True)  # a well-framed reply, over the array limit

    def reply(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(len(big).to_bytes(4, "big") + big)

    server = FakeServer(reply)
    try:
        with pytest.raises(AgentProtocolError) as e:
            within(20, lambda: pick_head(None, address=server.address, timeout=2))
    finally:
        server.close()
    assert_says(e.value, "sent a bad message (message is not valid msgpack", "expected a tilefleet agent")
