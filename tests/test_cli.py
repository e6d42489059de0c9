"""The command line as a user runs it: help, demo, plan, errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Fused Tile Partitioning" in out and "tilefleet demo" in out and "examples:" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: tilefleet" in capsys.readouterr().out


def test_demo_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "160", "--grid", "3x3", "--reuse", "--tiles"]) == 0
    out = capsys.readouterr().out
    assert "check: relative error" in out and "OK" in out
    assert "redundancy" in out and "worst peak MiB" in out and "reuse in KiB" in out


def test_plan_zoo_model_with_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "vgg16", "--size", "64", "--grid", "2x2", "--stages", "4", "--check"]) == 0
    out = capsys.readouterr().out
    assert "fusion stops at" in out and "OK" in out


def test_plan_darknet_cfg(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = shared_dir / "models" / "yolov2.cfg"
    assert main(["plan", "--cfg", str(cfg), "--size", "128", "--grid", "2x2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "fusion stops at" in out


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--grid", "5by5"], "5x5"),
    (["demo", "--grid", "50x50"], "larger than the output size"),
    (["plan", "--model", "nosuchnet"], "yolov2-16"),
    (["plan", "--cfg", "/nonexistent.cfg"], "nonexistent"),
])
def test_errors_exit_2_with_a_message(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and msg in err


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "tilefleet"
    if not exe.exists():
        pytest.skip("tilefleet is not installed in this interpreter's environment")
    out = subprocess.run([str(exe), "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "yolov2-16" in out.stdout
