"""Load generation against any Open Inference Protocol server (``tilefleet loadtest``).

Open loop (``rates``): requests leave on a schedule fixed before the run, whether or not earlier
ones have come back, and each latency is measured from its *scheduled* send time. A server that
falls behind therefore shows its queueing in the latencies instead of silently slowing the
sender down (coordinated omission). Closed loop (``concurrency``): N clients each send the next
request when the previous one returns; latency is from the actual send.

The schedule and the summary are pure functions; only :func:`run` touches the network (httpx,
binary tensors, one frame built once and sent every time).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Result:
    scheduled: float  # seconds from the run's start (open loop), or the actual send (closed loop)
    done: float
    outcome: str  # "ok", an HTTP status ("503"), or an exception's name ("ConnectError")


def send_times(rate: float, duration: float, poisson: bool = False, seed: int = 0) -> list[float]:
    """Send times in [0, duration): evenly spaced at ``rate`` per second, or a Poisson process."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got rate={rate}, duration={duration}")
    if not poisson:
        return [i / rate for i in range(int(rate * duration))]
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def summarize(results: Sequence[Result], offered: float | None, duration: float) -> dict[str, Any]:
    """Achieved throughput (ok responses per second of the run, last response included), latency
    percentiles in ms over ok responses, and errors by kind."""
    ok = [r for r in results if r.outcome == "ok"]
    span = max([duration, *(r.done for r in results)]) if results else duration
    lat = np.asarray([(r.done - r.scheduled) * 1e3 for r in ok]) if ok else np.zeros(0)
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) if lat.size else None for q in (50, 90, 99)}
    return {"offered_rps": offered, "sent": len(results), "ok": len(ok), "achieved_rps": len(ok) / span if span else 0.0,
            **pct, "max_ms": float(lat.max()) if lat.size else None,
            "errors": dict(Counter(r.outcome for r in results if r.outcome != "ok")), "duration_s": span}


@dataclass
class Target:
    """Where and what to send: the model's input from its metadata, one random frame."""

    url: str
    model: str
    headers: dict[str, str]
    body: bytes
    verify: Any = True
    timeout_s: float = 60.0

    @property
    def infer_url(self) -> str:
        return f"{self.url.rstrip('/')}/v2/models/{self.model}/infer"


def prepare(url: str, model: str, token: str | None = None, verify: Any = True, batch: int = 1,
            timeout_s: float = 60.0) -> Target:
    """Read the model's metadata and build one binary-tensor request body for it."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url.rstrip('/')}/v2/models/{model}", headers=headers, verify=verify, timeout=30)
    if r.status_code != 200:
        raise ValueError(f"{url}: model '{model}' metadata: HTTP {r.status_code}: {r.text[:200]}")
    spec = r.json()["inputs"][0]
    if spec["datatype"] != "FP32":
        raise ValueError(f"model '{model}' input is {spec['datatype']}; loadtest sends FP32 frames")
    shape = [batch, *spec["shape"][1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    head = json.dumps({"inputs": [{"name": spec["name"], "shape": shape, "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    headers = {**headers, "Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}
    return Target(url, model, headers, head + x.tobytes(), verify, timeout_s)


async def _one(client: Any, target: Target, t0: float, scheduled: float, out: list[Result]) -> None:
    try:
        r = await client.post(target.infer_url, content=target.body, headers=target.headers)
        outcome = "ok" if r.status_code == 200 else str(r.status_code)
    except Exception as e:  # noqa: BLE001 - every failure is a result of the run
        outcome = type(e).__name__
    out.append(Result(scheduled, time.monotonic() - t0, outcome))


async def open_loop(target: Target, rate: float, duration: float, poisson: bool = False) -> list[Result]:
    import httpx

    times = send_times(rate, duration, poisson)
    out: list[Result] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(verify=target.verify, timeout=target.timeout_s, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        for t in times:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(client, target, t0, t, out)))
        await asyncio.gather(*tasks)
    return out


async def closed_loop(target: Target, concurrency: int, duration: float) -> list[Result]:
    import httpx

    out: list[Result] = []
    async with httpx.AsyncClient(verify=target.verify, timeout=target.timeout_s) as client:
        t0 = time.monotonic()

        async def worker() -> None:
            while time.monotonic() - t0 < duration:
                await _one(client, target, t0, time.monotonic() - t0, out)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def run(target: Target, *, rates: Sequence[float] = (), concurrency: int | None = None, duration: float = 10.0,
        poisson: bool = False) -> list[dict[str, Any]]:
    """One summary per offered rate (open loop), or one for the closed loop."""
    if concurrency is not None:
        res = asyncio.run(closed_loop(target, concurrency, duration))
        return [dict(summarize(res, None, duration), concurrency=concurrency)]
    return [summarize(asyncio.run(open_loop(target, r, duration, poisson)), r, duration) for r in rates]
