"""A few of the simulator's random fault histories on real Ray (one Ray instance for the module).

``tests/test_sim.py`` runs hundreds of histories (:mod:`histories`) through the driver in the
simulator; here three of the same seeds run on emulated devices in real worker processes: the same
fleet, plan and frames, each kill a SIGKILL of the device's worker (``cluster.fail``) and each
slowdown the worker's own (``cluster.slow``), just before the same frame is submitted. Ray has no
injector for the simulator's report faults and cannot bring a killed worker back, so the chosen
histories revive nothing and their report faults stay the simulator's. The invariants are the
simulator's, plus what only a real run can show: every frame completes exactly once or fails with a
reason, none is delivered twice, results come back in stream order and equal the untiled model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch

import fleet
import tiling
from histories import History, conv_net, devices, example, history, plan_of
from sims.simulate import simulate

pytestmark = pytest.mark.ray

# 79: two of three devices die mid-stream (2x2 tiles and a tail), no frame may fail; 8: two of three die
# and the survivor runs 10x slower, unannounced (whole frames); 127: both devices die, so the frames
# after that fail, each with its reason
SEEDS = (79, 8, 127)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray for the module; each history connects its own emulated fleet to it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 2**20, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def outcome(f: Future) -> tuple[str, object]:
    try:
        return "ok", f.result(timeout=TIMEOUT_S)
    except fleet.FrameFailed as e:
        return "failed", str(e)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_simulated_fault_history_keeps_its_invariants_on_ray(ray_instance: None, seed: int) -> None:
    h: History = history(seed)
    assert any(e.action == "kill" for e in h.events) and not any(e.action == "revive" for e in h.events)
    sim = simulate(plan_of(h.grid, tail=h.tail), devices(h.spec), frames=h.frames, in_flight=h.in_flight,
                   scenario=h.scenario, faults=h.faults, seed=seed)
    assert sorted(sim.order) == list(range(h.frames))  # the simulator's verdict on the same history

    model, x0 = conv_net(h.tail), example()
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(x0.shape, generator=g) for _ in range(h.frames)]
    killed: set[str] = set()
    with fleet.connect(emulate=h.spec) as cluster:
        dep = cluster.deploy(model, x0, grid=h.grid)
        futures: list[Future] = []
        for k, x in enumerate(frames):
            for ev in h.before(k):
                if ev.device in killed:
                    continue  # already dead: nothing to kill or slow
                if ev.action == "kill":
                    cluster.fail(ev.device)
                    killed.add(ev.device)
                else:
                    cluster.slow(ev.device, ev.factor)
            if len(futures) >= h.in_flight:  # the closed loop: wait for the frame that leaves the window
                outcome(futures[len(futures) - h.in_flight])
            futures.append(dep.submit(x))
        results = [outcome(f) for f in futures]
        stats = dep.stats()
    done = [k for k, (kind, _) in enumerate(results) if kind == "ok"]
    failed = {k: why for k, (kind, why) in enumerate(results) if kind == "failed"}
    assert len(done) + len(failed) == h.frames, "every frame ends, completed or failed"
    assert all(failed.values()), "a failed frame says why"
    assert stats["frames"]["count"] == len(done), "no frame was delivered twice"
    with torch.no_grad():
        for k in done:  # in submission order, each equal to the untiled model on its own frame
            assert tiling.rel_error(results[k][1], model(frames[k])) <= 1e-4, k
    assert bool(failed) == bool(sim.failed), "the history ends the same way in both worlds"
    survivors = {d.id for d in devices(h.spec)} - killed
    if survivors:
        assert not failed, f"{sorted(survivors)} survived, yet frames failed: {failed}"
    else:  # from the frame before which the last device died, nothing can complete
        last = max(e.before_frame or 0 for e in h.events if e.action == "kill")
        assert all(k in failed for k in range(last, h.frames)), failed
