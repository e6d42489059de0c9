"""The real driver and scheduler in the simulated world: exact timings, faults, and random histories.

Everything here runs the unchanged :class:`fleet.runtime.driver.Driver` on :mod:`sims.world`'s event
heap, seeded, in milliseconds: the failure logic that used to run only on real Ray processes.
"""

from __future__ import annotations

import os

import pytest
import torch
from histories import TABLE, conv_net, devices, history, plan_of

import tiling
from fleet.runtime.driver import INPUT_LOST_GRACE_S
from sims.simulate import Scenario, ScenarioEvent, simulate
from sims.world import Faults

pytestmark = pytest.mark.sim


def test_one_tile_latency_is_the_device_model_exactly() -> None:
    plan = plan_of((1, 1), tail=False)
    (dev,) = devices("pi3")
    run = simulate(plan, [dev], frames=1, dispatch_s=0.0, report_s=0.0)
    p, t = dev.profile, plan.stages[0].tiles[0]
    expected = (t.in_bytes / p.link_bps + p.latency_s + t.flops / (p.gflops * 1e9) + p.tile_overhead_s
                + (t.out_bytes + t.reuse_out_bytes) / p.link_bps + p.latency_s)
    assert run.latency_s == [pytest.approx(expected, rel=1e-9)]
    # the runtime's own costs, the call out and the report back, come on top (host time, as at scale 1)
    run = simulate(plan, [dev], frames=1, dispatch_s=0.003, report_s=0.005)
    assert run.latency_s == [pytest.approx(expected + 0.008, rel=1e-9)]
    assert run.stats["devices"]["pi3-0"]["tiles"] == 1


def test_whole_frames_per_device_give_the_sum_of_speeds() -> None:
    """Link and compute overlap: each device's steady rate is set by its busiest resource."""
    plan = plan_of((1, 1), tail=False, size=64)
    devs = devices("pi3*2")
    p, t = devs[0].profile, plan.stages[0].tiles[0]
    per_frame = max(t.in_bytes / p.link_bps, t.flops / (p.gflops * 1e9) + p.tile_overhead_s,
                    (t.out_bytes + t.reuse_out_bytes) / p.link_bps)
    run = simulate(plan, devs, frames=80, in_flight=6, dispatch_s=0.0, report_s=0.0)
    assert run.fps == pytest.approx(2 / per_frame, rel=0.05)
    assert not run.failed


def test_a_frame_that_fits_nowhere_fails_with_a_reason() -> None:
    plan = plan_of((1, 1), tail=False, size=1024)
    run = simulate(plan, devices("pi3-24m"), frames=1)
    assert list(run.failed) == [0] and "bytes" in run.failed[0]


def test_two_of_four_devices_die_and_no_frame_is_lost() -> None:
    plan = plan_of((2, 2), size=96)
    events = [ScenarioEvent(0.2, "kill", "pi3-1", detect_s=0.5), ScenarioEvent(0.3, "kill", "pi3-2", detect_s=0.5)]
    run = simulate(plan, devices("pi3*4"), frames=60, in_flight=4, scenario=Scenario(events))
    assert max(run.ended.values()) > 1.0, "the deaths happen mid-stream"
    assert not run.failed and len(run.completed) == 60
    assert run.stats["devices"]["pi3-1"]["alive"] is False and run.stats["devices"]["pi3-2"]["alive"] is False


def test_every_device_dies_then_one_returns_and_frames_run_again() -> None:
    plan = plan_of((2, 2), size=96)
    devs = devices("pi3*2")
    events = [ScenarioEvent(0.3, "kill", "pi3-0", detect_s=0.5), ScenarioEvent(0.3, "kill", "pi3-1", detect_s=0.5),
              ScenarioEvent(5.0, "revive", "pi3-0", spec=devs[0])]
    run = simulate(plan, devs, frames=24, rate=2.0, scenario=Scenario(events))  # open loop: frames keep coming
    assert run.failed, "frames in flight when the last device died fail"
    assert all("device" in r or "no" in r for r in run.failed.values()), run.failed
    after = [f for f in run.completed if run.submitted[f] > 5.0]
    assert after, "after a device returns, the deployment serves again without being re-created"


def test_retries_exhausted_fail_the_frame_with_the_error() -> None:
    run = simulate(plan_of((2, 2)), devices("pi3*2"), frames=3, faults=Faults(fail=1.0), max_retries=2)
    assert len(run.failed) == 3 and all("SimulatedFailure" in r for r in run.failed.values())


def test_a_tail_that_fails_for_good_fails_its_frame() -> None:
    plan = plan_of((1, 1), tail=True)
    run = simulate(plan, devices("pi3"), frames=2, faults=Faults(fatal=1.0))
    assert len(run.failed) == 2 and all("SimulatedBug" in r for r in run.failed.values())


def test_duplicate_and_late_reports_complete_each_frame_once() -> None:
    run = simulate(plan_of((2, 2)), devices("pi3*3"), frames=40, in_flight=6,
                   faults=Faults(duplicate=0.5, late_s=0.2), seed=3)
    assert sorted(run.order) == list(range(40)) and not run.failed


def test_a_device_joining_mid_stream_takes_work() -> None:
    devs = devices("pi3*2,pi4")
    events = [ScenarioEvent(0.3, "join", "pi4-0", spec=devs[2])]
    run = simulate(plan_of((2, 2), size=96), devs[:2], frames=60, in_flight=4, scenario=Scenario(events))
    assert max(run.ended.values()) > 0.6 and not run.failed and run.stats["devices"]["pi4-0"]["tiles"] > 0


def test_inputs_lost_are_retried_after_the_grace_period() -> None:
    plan = tiling.partition(conv_net(False), torch.randn(1, 3, 32, 32), stages=[1], grids=[(2, 2), (2, 2)])
    run = simulate(plan, devices("pi3*2"), frames=6, in_flight=2, faults=Faults(input_lost=0.3), seed=1)
    assert len(run.completed) >= 4 and max(run.latency_s) >= INPUT_LOST_GRACE_S  # held back, then retried
    assert all("InputLost" in r and "max_retries" in r for r in run.failed.values())  # retries stay bounded


@pytest.mark.parametrize("seed", range(int(os.environ.get("TILEFLEET_HISTORIES", "200"))))
def test_random_fault_histories_keep_the_invariants(seed: int) -> None:
    """Every frame ends exactly once (completed, or failed with a reason), nothing twice, whatever
    happens; the scheduler's invariants hold after every event. (tests/test_histories_ray.py runs
    a few of the same histories on Ray.)"""
    h = history(seed)
    run = simulate(plan_of(h.grid, tail=h.tail), devices(h.spec), frames=h.frames, in_flight=h.in_flight,
                   scenario=h.scenario, faults=h.faults, seed=seed, validate=True)
    assert sorted(run.order) == list(range(h.frames)), "every frame ends exactly once"
    assert all(reason for reason in run.failed.values()), "a failed frame says why"
    assert run.stats["frames"]["count"] == len(run.completed), "the driver delivered no frame twice"


def test_scenario_files_are_parsed_with_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sims.scenario import ScenarioError, load_scenario

    devs = devices("pi3*2")
    good = tmp_path / "s.toml"
    good.write_text('[[event]]\nat = 2.0\nkill = "pi3-1"\ndetect = 0.5\n\n[[event]]\nat = 1.0\nslow = "pi3-0"\n'
                    'factor = 10\nannounce = true\n\n[[event]]\nat = 3.0\njoin = "pi4"\n')
    sc = load_scenario(good, devs, TABLE)
    assert [(e.action, e.device) for e in sc.events] == [("slow", "pi3-0"), ("kill", "pi3-1"), ("join", "pi4-0")]
    assert [e.announce for e in sc.events] == [True, False, False]
    for text, msg in [('[[event]]\nat = 1\nkill = "pi9-0"\n', "no device 'pi9-0'"),
                      ('[[event]]\nat = -1\nkill = "pi3-0"\n', "at must be a number >= 0"),
                      ('[[event]]\nat = 1\nexplode = "pi3-0"\n', "needs exactly one of"),
                      ('[[event]]\nat = 1\njoin = "pi99"\n', "unknown profile"),
                      ('[[event]]\nat = 1\nslow = "pi3-0"\nannounce = 1\n', "announce must be true or false"),
                      ('[[event]]\nat = 1\nkill = "pi3-0"\nannounce = true\n', "unknown key"),
                      ("not toml [", "not a TOML file"), ("[other]\n", "unknown top-level")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ScenarioError, match=msg):
            load_scenario(bad, devs, TABLE)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ScenarioError, match="at most"):
        load_scenario(huge, devs, TABLE)


def test_sim_command_reports_like_bench(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from fleet.cli.main import main

    out = tmp_path / "r.json"
    argv = ["sim", "--model", "yolov2-16", "--size", "96", "--devices", "pi3*200", "--grid", "2x2", "--mode",
            "throughput", "--frames", "300", "--json", str(out), "--profile-scheduler"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["correct"] is None and r["simulated"] and r["devices_count"] == 200 and r["frames"] == 300
    assert set(r["latency_ms"]) == {"p50", "p95", "p99"} and r["fps"] > 0 and r["plan"] == "0-15:2x2"
    assert r["shared_link"] is None  # each device on its own link (tests/test_sim_plot.py: a shared one)
    assert "us CPU per event" in capsys.readouterr().out
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[event]]\nat = 0.5\nkill = "pi3-3"\ndetect = 1.5\n')
    argv = ["sim", "--size", "96", "--devices", "pi3*4", "--grid", "2x2", "--rate", "2", "--duration", "10",
            "--scenario", str(scenario), "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["failed"] == 0 and r["frames"] == 20 and r["per_device"]["pi3-3"]["alive"] is False


def test_the_event_loop_collects_rarely_and_gives_the_process_its_thresholds_back() -> None:
    import gc

    from sims.world import GC_THRESHOLDS, SimClock, rare_collections

    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    clock = SimClock()
    clock.call_at(1.0, lambda: seen.append(gc.get_threshold()))
    with rare_collections():  # nested (a planner simulating inside a simulation): restored once, at the end
        clock.run()
        assert gc.get_threshold() == GC_THRESHOLDS
    assert seen == [GC_THRESHOLDS] and gc.get_threshold() == before
