"""``tilefleet sim --plot`` and ``--shared-link``: the data a plot draws, the PNG, and clear errors."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from fleet.bench.plot import MAX_ROWS, Bar, sim_plot_data
from fleet.cli.main import main

pytestmark = pytest.mark.sim

PNG = b"\x89PNG\r\n\x1a\n"


def ev(device: str, lane: str, frame: int, start: float, end: float, kind: str = "tile") -> dict:
    return {"device": device, "lane": lane, "name": f"f{frame}", "start": start, "end": end,
            "args": {"frame": frame, "kind": kind}}


def test_plot_data_takes_the_first_timed_frames_per_device_in_fleet_order() -> None:
    trace = [ev("b", "compute", 0, 1.0, 2.0),  # a warm-up frame: not drawn
             ev("b", "rx", 2, 10.0, 10.5), ev("b", "compute", 2, 10.5, 12.0), ev("b", "tx", 2, 12.0, 12.25),
             ev("a", "compute", 3, 11.0, 13.0), ev("a", "compute", 3, 13.0, 13.5, kind="tail"),
             ev("c", "compute", 9, 20.0, 21.0)]  # beyond the frames asked for
    report = {"trace": trace, "warmup": 2, "scale": 2.0, "per_device": {"a": {}, "b": {}, "c": {}},
              "latency_over_time": [(0.5, 1.25), (1.0, 1.5)], "model": "m", "devices": "x*3", "plan": "p",
              "mode": "latency"}
    d = sim_plot_data(report, frames=2)
    assert d.frames == [2, 3] and d.devices == ["a", "b"] and d.hidden_devices == 0
    assert sorted(d.bars, key=lambda b: (b.start, b.kind)) == [  # seconds from the first bar, in emulated units
        Bar("b", "rx", 2, 0.0, 0.25), Bar("b", "tile", 2, 0.25, 1.0), Bar("a", "tile", 3, 0.5, 1.5),
        Bar("b", "tx", 2, 1.0, 1.125), Bar("a", "tail", 3, 1.5, 1.75)]
    assert d.latency == [(0.5, 1250.0), (1.0, 1500.0)]


def test_a_big_fleet_draws_its_first_rows_and_says_how_many_more() -> None:
    n = MAX_ROWS + 5
    trace = [ev(f"d{i}", "compute", 0, i, i + 1) for i in range(n)]
    d = sim_plot_data({"trace": trace, "per_device": {f"d{i}": {} for i in range(n)}})
    assert d.devices == [f"d{i}" for i in range(MAX_ROWS)] and d.hidden_devices == 5
    assert {b.device for b in d.bars} == set(d.devices)


def test_sim_plot_writes_a_png_of_a_run_on_a_shared_link(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "run.png", tmp_path / "r.json"
    argv = ["sim", "--size", "96", "--devices", "pi3*3,pi4", "--grid", "2x2", "--mode", "throughput", "--frames",
            "16", "--shared-link", "20", "--plot", str(png), "--json", str(out)]
    assert main(argv) == 0
    data = png.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000
    r = json.loads(out.read_text())
    ch = r["shared_link"]
    assert ch["mbps"] == 20 and 0 < ch["carried_mbps"] <= 20 and 0 < ch["utilisation"] <= 1
    assert "trace" not in r


def test_plot_data_of_a_real_run_has_every_tile_of_each_frame_once() -> None:
    from fleet.bench.runner import load_workload
    from fleet.bench.simbench import SimOptions, sim_bench

    r = sim_bench(load_workload("yolov2-16", None, 96), SimOptions("pi3*3", frames=6, grid=(2, 2), trace=True))
    d = sim_plot_data(r, frames=3)
    assert d.frames == [2, 3, 4]  # latency mode: 2 warm-up frames
    assert Counter(b.frame for b in d.bars if b.kind == "tile") == {2: 4, 3: 4, 4: 4}
    assert set(d.devices) <= {"pi3-0", "pi3-1", "pi3-2"} and all(b.end >= b.start >= 0 for b in d.bars)
    assert len(d.latency) == 6 and all(lat > 0 for _, lat in d.latency)


def test_without_matplotlib_plot_says_what_to_install_before_simulating(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["sim", "--devices", "pi3*2", "--grid", "1x1", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr()
    assert "pip install 'tilefleet[plot]'" in err.err and "latency" not in err.out  # nothing was simulated
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("flags", "msg"), [
    (["--shared-link", "0"], r"Mbit/s > 0 .*got 0\.0"),
    (["--shared-link", "-5"], r"Mbit/s > 0 .*got -5\.0"),
    (["--shared-link", "nan"], r"Mbit/s > 0"),
    (["--plot", "out.jpg"], r"ending in \.png, got .out\.jpg."),
])
def test_bad_sim_flags_say_what_is_accepted(flags: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--devices", "pi3*2", "--grid", "1x1", *flags]) == 2
    import re

    assert re.search(msg, capsys.readouterr().err)
