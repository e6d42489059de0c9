"""The serving overhead of this checkout against another one, in alternating rounds.

    python -m fleet.serving.overhead --baseline ../other-checkout              # an instant fake fleet
    python -m fleet.serving.overhead --baseline ../other-checkout --devices 'pi4*4' --rounds 6

One server per checkout (its own process, ``PYTHONPATH`` set to the checkout), both up for the whole
run; each round sends closed-loop binary requests (one client, ``tilefleet loadtest``'s) to each
server in turn, the order alternating from round to round, so slow spells of a shared machine hit
both alike. After each round the server's own ``tilefleet_serving_overhead_us`` histogram is read
(the request's time in the server minus its queue and fleet time): its median (interpolated in the
buckets, as the docs' figures) and its mean (``_sum / _count``, exact), with the server process's
CPU time per request, which a busy machine disturbs less than the times. Medians over the rounds
are printed side by side, and the median of the rounds' differences. Without ``--devices`` the servers front an *instant* deployment (each frame's
result is ready at once: only the serving path is measured); with it, a real emulated fleet.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRIC = "tilefleet_serving_overhead_us"

# Runs inside each checkout (only APIs both sides have): the model's config, a fake cluster whose
# deployment answers at once, the real server.
INSTANT_SERVER = r"""
import signal, sys, threading
from concurrent.futures import Future
from types import SimpleNamespace
import torch
import tiling
from fleet.serving import repository
from fleet.serving.server import ServeOptions, Server

model, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = repository.single(model, grid="1x1", mode="latency", input_shape=(3, size, size))

class Instant:
    def submit(self, x):
        f = Future()
        f.set_result(self.out)
        return f
    def cancel(self, f, reason=""):
        return False
    def stats(self, detail=True):
        return {"devices": {}, "frames": {"count": 0}}
    def close(self):
        pass

class Cluster:
    def plan(self, model, example, grid="auto", **kw):
        return SimpleNamespace(plan=tiling.partition(model, example, grid=(1, 1)), model=model, example=example)
    def deploy(self, planned):
        d = Instant()
        with torch.no_grad():
            d.out = planned.model(planned.example)
        return d
    def devices(self):
        return [{"id": "d0", "usable_bytes": 1 << 40, "state": "alive"}]

server = Server(Cluster(), {cfg.name: cfg}, ServeOptions(port=port, grpc_port=None)).start()
print(server.service.load_startup(), flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histogram(text: str, model: str) -> tuple[dict[float, float], float, float]:
    """The overhead histogram of ``model`` in a scrape: cumulative counts by upper bound, sum, count."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith(METRIC) or s.labels.get("model") != model:
                continue
            if s.name.endswith("_bucket"):
                buckets[float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
    return buckets, total, count


def median_us(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The median of the observations between two scrapes of a histogram, linear within its bucket."""
    bounds = sorted(after)
    delta = [after[b] - before.get(b, 0.0) for b in bounds]
    n = delta[-1] if delta else 0.0
    if n <= 0:
        return None
    lo, below = 0.0, 0.0
    for bound, cum in zip(bounds, delta):
        if cum >= n / 2:
            if bound == float("inf"):
                return lo
            return lo + (bound - lo) * ((n / 2 - below) / max(cum - below, 1e-12))
        lo, below = bound, cum
    return None


def start(checkout: Path, model: str, size: int, devices: str | None, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]))
    if devices:
        argv = [sys.executable, "-m", "fleet.cli.main", "serve", "--devices", devices, "--model", model, "--size",
                str(size), "--grid", "2x2", "--port", str(port), "--grpc-port", "-1"]
    else:
        script = workdir / "instant_server.py"
        script.write_text(INSTANT_SERVER)
        argv = [sys.executable, str(script), model, str(size), str(port)]
    log = open(workdir / f"server-{port}.log", "wb")  # noqa: SIM115 - kept open for the process's life
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=checkout), f"http://127.0.0.1:{port}"


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout:g} s")


def run(checkouts: dict[str, Path], model: str, size: int, devices: str | None, rounds: int,
        seconds: float) -> dict[str, list[dict[str, Any]]]:
    import httpx

    from . import loadtest

    out: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="tilefleet-overhead-") as tmp:
        servers = {name: start(path, model, size, devices, Path(tmp)) for name, path in checkouts.items()}
        try:
            for proc, url in servers.values():
                wait_ready(proc, url)
            targets = {name: loadtest.prepare(url, model) for name, (_, url) in servers.items()}
            for name in servers:  # warm-up: first requests pay for lazy imports and allocations
                loadtest.run(targets[name], concurrency=1, duration=min(3.0, seconds))
            names = list(servers)
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    proc, url = servers[name]
                    b0, s0, c0 = histogram(httpx.get(url + "/metrics").text, model)
                    cpu0 = cpu_s(proc.pid)
                    rep = loadtest.run(targets[name], concurrency=1, duration=seconds)[0]
                    cpu1 = cpu_s(proc.pid)
                    b1, s1, c1 = histogram(httpx.get(url + "/metrics").text, model)
                    n = c1 - c0
                    row = {"p50_ms": (median_us(b0, b1) or 0.0) / 1e3, "mean_ms": (s1 - s0) / n / 1e3 if n else 0.0,
                           "client_p50_ms": rep["p50_ms"], "cpu_ms": (cpu1 - cpu0) / n * 1e3 if n else 0.0,
                           "requests": int(n)}
                    out[name].append(row)
                    print(f"round {r + 1} {name:>9}: overhead p50 {row['p50_ms']:.2f} ms, mean {row['mean_ms']:.2f} ms, "
                          f"client p50 {row['client_p50_ms']:.2f} ms, server CPU {row['cpu_ms']:.2f} ms/request, "
                          f"{int(n)} requests", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleet.serving.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="another checkout to compare with")
    p.add_argument("--model", default="yolov2-16")
    p.add_argument("--size", type=int, default=608)
    p.add_argument("--devices", help="an emulated fleet, e.g. 'pi4*4' (default: an instant fake deployment)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=15.0, help="per server and round")
    a = p.parse_args(argv)
    here = Path(__file__).resolve().parents[2]
    res = run({"baseline": Path(a.baseline).resolve(), "this": here}, a.model, a.size, a.devices, a.rounds, a.seconds)
    print(f"\nmedians over {a.rounds} rounds ({a.devices or 'instant deployment'}, {a.model} at {a.size}, "
          "one client, binary tensors):")
    keys = (("p50_ms", "overhead p50"), ("mean_ms", "overhead mean"), ("client_p50_ms", "client p50"),
            ("cpu_ms", "server CPU/request"))
    print(f"{'':>15}" + "".join(f"  {label:>18}" for _, label in keys) + "  requests")
    for name, rows in res.items():
        print(f"{name:>15}" + "".join(f"  {statistics.median(r[k] for r in rows):>15.2f} ms" for k, _ in keys)
              + f"  {sum(r['requests'] for r in rows)}")
    pairs = list(zip(res["baseline"], res["this"]))  # the same round: the same spell of the machine
    print(f"{'this - baseline':>15}" + "".join(f"  {statistics.median(t[k] - b[k] for b, t in pairs):>+15.2f} ms"
                                              for k, _ in keys) + "  (median of the rounds' differences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
