"""``tilefleet bench --soak``: the pure parts (fail/revive cycles, fps windows, RSS growth, verdict)
without Ray, and a 500-frame soak through the CLI on one emulated Ray cluster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.bench.soak import Chaos, fps_summary, fps_windows, read_rss, rss_growth, verdict
from fleet.cli.bench import soak_table
from fleet.cli.main import main


def _run_chaos(period: int, frames: int, revive_takes: int) -> list[tuple[int, str]]:
    """Drive the state machine as the soak does: a revival takes ``revive_takes`` frames unless waited
    for; the revived device takes a tile at once."""
    chaos, out, revived_at = Chaos(period), [], None
    for f in range(frames):
        revived = revived_at is not None and f >= revived_at + revive_takes
        what = chaos.step(f, revived, chaos.state == "returning")
        if what == "wait":
            revived_at = f - revive_takes  # the shell waits: done now
            chaos.step(f, True, False)
        if what:
            out.append((f, what))
            if what == "revive":
                revived_at = f
    return out


def test_chaos_fails_and_revives_in_cycles_and_waits_for_a_tile() -> None:
    ev = _run_chaos(100, 600, revive_takes=20)
    assert ev[:4] == [(50, "fail"), (100, "revive"), (170, "fail"), (220, "revive")]
    # a revival slower than a period is waited for: a cycle stays within 2 periods
    ev = _run_chaos(100, 500, revive_takes=1000)
    assert ev[:5] == [(50, "fail"), (100, "revive"), (200, "wait"), (250, "fail"), (300, "revive")]
    # a revived device that takes no tile is never failed again
    chaos = Chaos(100)
    for f in range(200):
        assert chaos.step(f, revived=True, took_tile=False) in (None, "fail", "revive")
    assert chaos.state == "returning" and chaos.cycles == 0 and chaos.since == 101
    # it counts its up time from its revival (frame 101): it came back late, so it fails at once
    assert chaos.step(200, revived=True, took_tile=True) == "fail" and chaos.cycles == 1


def test_fps_windows_and_summary() -> None:
    done = [0.1 * (i + 1) for i in range(10)]  # 10 fps, then a stall
    done[5:] = [t + 1.0 for t in done[5:]]
    wins = fps_windows(done, 2, events=[(3, "fail", 0.35), (7, "revive", 1.8)])
    assert [w["frames"] for w in wins] == [[0, 5], [5, 10]]
    assert wins[0]["fps"] == pytest.approx(10.0) and wins[1]["fps"] == pytest.approx(5 / 1.5)
    assert wins[0]["events"] == ["fail@3"] and wins[1]["events"] == ["revive@7"]
    s = fps_summary(wins)
    assert s["min"] == pytest.approx(5 / 1.5) and s["max"] == pytest.approx(10.0) and s["first"] == s["max"]
    assert len(fps_windows(done, 50)) == 10  # never more windows than frames
    assert fps_windows([], 5) == [] and fps_summary([]) == {}
    assert fps_windows([0.0, 0.0], 1)[0]["fps"] is None  # no measurable time: no figure (JSON stays valid)
    cpu = fps_windows(done, 2, cpu=[0.001 * (i + 1) for i in range(5)] + [0.005 + 0.003 * (i + 1) for i in range(5)])
    assert [w["cpu_ms_per_frame"] for w in cpu] == pytest.approx([1.0, 3.0])


def test_rss_growth_and_verdict() -> None:
    g = rss_growth({"driver": 100_000_000, "w": 50_000_000}, {"driver": 130_000_000, "w": 49_000_000})
    assert g["driver"] == {"warm_mb": 100.0, "end_mb": 130.0, "growth_mb": 30.0}
    assert g["w"]["growth_mb"] == -1.0
    r: dict[str, Any] = {"frames": 500, "lost": 0, "duplicated": 0, "wrong": 0, "rss": g, "cycles": 2,
                         "revive_errors": [], "revived_without_tile_frames": 0, "fail_every": 100,
                         "never_failed_pids_unchanged": True}
    ok, line = verdict(r)
    assert ok and line.startswith("PASS") and "30.0 MB (driver)" in line
    ok, line = verdict(r, rss_target_mb=20)
    assert not ok and "RSS of driver grew 30.0 MB" in line
    ok, line = verdict({**r, "lost": 1, "wrong": 2, "cycles": 0})
    assert not ok and "1 lost, 2 wrong" in line and "no fail/revive cycle" in line
    assert read_rss(os.getpid()) > 10_000_000


def test_soak_table_reads_a_report() -> None:
    wins = fps_windows([0.5, 1.0], 2, [(1, "fail", 0.7)])
    r = {"model": "m", "devices": "pi4*2", "victim": "pi4-1", "grid": "0-4:2x2", "in_flight": 4, "scale": 1.0,
         "frames": 2, "warmup_frames": 100, "distinct_inputs": 16, "wall_s": 1.0, "total_s": 9.0, "fps": 2.0,
         "fps_summary": fps_summary(wins), "fps_windows": wins, "revive_s": [2.0], "cycles": 1, "fail_every": 100,
         "lost": 0, "duplicated": 0, "wrong": 0, "max_rel_error": 1e-7, "tiles_accepted": 8, "tiles_expected": 8,
         "retries": 0, "host_too_slow": 0, "rss_source": "/proc", "rss_target_mb": 50.0,
         "rss": rss_growth({"driver": 1}, {"driver": 2})}
    text = soak_table(r)
    assert "1 fail" in text and "growth MB" in text and "pi4-1" in text


def test_bench_defaults_depend_on_soak_and_bad_combinations_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli.bench import with_defaults
    from fleet.cli.main import build_parser

    plain = with_defaults(build_parser().parse_args(["bench"]))
    assert (plain.frames, plain.devices) == (12, "pi3*4")
    soak = with_defaults(build_parser().parse_args(["bench", "--soak"]))
    assert (soak.frames, soak.devices, soak.fail_every) == (10_000, "pi4*4", 300)
    given = with_defaults(build_parser().parse_args(["bench", "--soak", "--frames", "50", "--devices", "pi3*2"]))
    assert (given.frames, given.devices) == (50, "pi3*2")
    assert main(["bench", "--soak", "--address", "auto"]) == 2
    assert "--soak fails and revives emulated devices" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["bench", "--soak", "--plot", "soak.png"]) == 2
    assert "--plot needs matplotlib: pip install 'tilefleet[plot]'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_soak_500_frames_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real path (CLI, emulated Ray cluster, fail + revive): every frame once and exact. RSS growth is
    a benchmark figure and is only checked to be reported here."""
    out = tmp_path / "soak.json"
    args = ["bench", "--soak", "--frames", "500", "--fail-every", "100", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(tmp_path / "soak.png")]
    except ImportError:
        pass
    rc = main(args)
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert ("PASS" if rc == 0 else "FAIL") in printed.splitlines()[-1]
    assert (r["lost"], r["duplicated"], r["wrong"]) == (0, 0, 0), r["errors"]
    assert r["frames"] == 500 and r["driver_frames_done"] == 500 and r["max_rel_error"] <= 1e-4
    assert r["cycles"] >= 1 and not r["revive_errors"]
    assert any(what == "fail" for _, what, _ in r["events"]) and any(what == "revive" for _, what, _ in r["events"])
    assert r["never_failed_pids_unchanged"]
    assert set(r["rss"]) == {"driver", "pi4-0", "pi4-1", "pi4-2"}  # pi4-3 is the one that fails
    assert all(set(v) == {"warm_mb", "end_mb", "growth_mb"} and v["warm_mb"] > 0 for v in r["rss"].values())
    assert len(r["fps_windows"]) == 20 and r["fps"] > 0 and r["fps_windows"][0]["cpu_ms_per_frame"] > 0
    if "--plot" in args:
        assert (tmp_path / "soak.png").stat().st_size > 0
