"""The command line as a user runs it: help, demo, plan, errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cli.main import main

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


def test_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--in-process", "--size", "160", "--grid", "3x3", "--reuse", "--tiles"]) == 0
    out = capsys.readouterr().out
    assert "check: relative error" in out and "OK" in out
    assert "redundancy" in out and "worst peak MiB" in out and "reuse in KiB" in out


@pytest.mark.ray
def test_demo_on_emulated_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "160", "--frames", "4", "--grid", "3x3"]) == 0
    out = capsys.readouterr().out
    assert "pi3-3" in out and "speedup" in out and "check: 4 results" in out and "OK" in out


@pytest.mark.ray
def test_run_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.json"
    assert main(["run", "--model", "resnet18", "--size", "64", "--devices", "pi4*2", "--frames", "3",
                 "--grid", "2x2", "--trace", str(trace)]) == 0
    assert trace.exists() and "tails" in capsys.readouterr().out
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "yolov2-16", "--size", "96", "--devices", "pi4*2", "--mode", "latency",
                 "--frames", "3", "--json", str(out)]) == 0
    import json

    r = json.loads(out.read_text())
    for key in ("speedup", "speedup_vs_best", "fps", "latency_ms", "redundancy", "max_device_peak_bytes",
                "bytes_moved", "steals", "retries", "correct", "plan", "device_list", "predicted"):
        assert key in r, key
    assert r["correct"] is True and r["latency_ms"]["p50"] > 0


@pytest.mark.ray
def test_dispatch_overhead_measures_every_tile() -> None:
    """What `tilefleet bench --dispatch` and `make bench` report (it once broke unnoticed)."""
    from fleet.bench.dispatch import dispatch_overhead

    d = dispatch_overhead(tiles=128, rounds=2)
    assert d["tiles"] == 128 and 0 < d["median_ms"] <= d["p95_ms"] and d["tiles_per_s"] > 0, d
    # Ray's own round trip for the same bytes, timed between the rounds
    assert 0 < d["ray_round_trip_ms"] and len(d["added_ms_by_round"]) == 2, d
    assert d["added_ms"] == pytest.approx(d["median_ms"] - d["ray_round_trip_ms"]), d


def test_devices_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--catalog"]) == 0
    out = capsys.readouterr().out
    assert "pi3-24m" in out and "laptop" in out and "source" in out.lower()


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
    (["demo", "--in-process", "--grid", "5by5"], "5x5"),
    (["demo", "--in-process", "--grid", "50x50"], "the largest grid that fits is"),
    (["run", "--devices", "pi5*2"], "pi4"),
    (["plan", "--model", "nosuchnet"], "yolov2-16"),
    (["plan", "--cfg", "/nonexistent.cfg"], "nonexistent"),
    (["sim", "--devices", "pi3*4", "--in-flight", "8"], "--mode throughput"),
    (["bench", "--devices", "pi3*4", "--mode", "throughput", "--in-flight", "0"], "at least 1"),
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


def test_plan_an_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from tiling import zoo

    zm = zoo.get("yolov2-16", input_size=64)
    path = tmp_path / "yolo16.onnx"
    torch.onnx.export(zm.model, zoo.example(zm), str(path), dynamo=False, opset_version=13)
    assert main(["plan", "--onnx", str(path), "--grid", "2x2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "2x2" in out
    assert main(["plan", "--model", str(path), "--grid", "2x2", "--preprocess", "darknet", "--check"]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.ray
def test_run_a_torchscript_file_on_emulated_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TorchScript file (the form a model trained elsewhere arrives in) deploys, tiled, and its results are exact."""
    import torch

    from tiling import zoo

    zm = zoo.get("resnet18", input_size=64)
    path = tmp_path / "resnet18.pt"
    torch.jit.save(torch.jit.trace(zm.model, zoo.example(zm)), str(path))
    assert main(["run", "--model", str(path), "--size", "64", "--devices", "pi4*2", "--frames", "3",
                 "--grid", "2x2"]) == 0
    out = capsys.readouterr().out
    assert "check: 3 results" in out and "OK" in out and "tails" in out


@pytest.mark.ray
def test_run_image_files_as_uint8_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(tmp_path / f"cam{i}.png")
    argv = ["run", "--model", "yolov2-16", "--size", "64", "--images", str(tmp_path), "--preprocess", "darknet",
            "--devices", "pi4*2", "--frames", "3", "--grid", "2x2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "check: 3 results" in out and "OK" in out
    assert main(["run", "--images", str(tmp_path), "--devices", "pi4", "--frames", "1"]) == 2
    assert "--preprocess" in capsys.readouterr().err
