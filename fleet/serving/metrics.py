"""Prometheus metrics: requests in the style of Triton, devices from ``Deployment.stats()``.

Request metrics are recorded as requests finish. Device metrics are not kept here at all: a
custom collector asks every loaded deployment for a stats snapshot when Prometheus scrapes, so
the numbers are the runtime's own and cost nothing between scrapes.

Names follow Triton (``nv_inference_*``) where Triton has the metric. Differences, on purpose:
durations are histograms (``_bucket``/``_sum``/``_count``) where Triton exports cumulative
microsecond counters (the ``_sum`` series is that counter); counters carry the ``_total``
suffix the Prometheus client adds. Everything tilefleet-specific is ``tilefleet_*``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# microseconds, 100 us .. 100 s; fine between 1 and 10 ms, where the serving overhead's target (5 ms) is
US_BUCKETS = (100, 250, 500, 1e3, 2e3, 3e3, 4e3, 5e3, 7.5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6,
              1e7, 3e7, 1e8)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    """Every metric of one server, in its own registry (several servers in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model", "version"]
        self.success = Counter("nv_inference_request_success", "Successful inference requests", m, registry=r)
        self.failure = Counter("nv_inference_request_failure", "Failed inference requests, by reason",
                               [*m, "reason"], registry=r)
        self.count = Counter("nv_inference_count", "Frames inferred (a request's batch size counts each)", m,
                             registry=r)
        self.duration = Histogram("nv_inference_request_duration_us", "Request time in the server, receive to "
                                  "response sent (us)", m, buckets=US_BUCKETS, registry=r)
        self.queue = Histogram("nv_inference_queue_duration_us", "Time waiting in the admission queue (us)", m,
                               buckets=US_BUCKETS, registry=r)
        self.compute = Histogram("nv_inference_compute_infer_duration_us", "Deployment.submit to result: the "
                                 "fleet's time for the frames (us)", m, buckets=US_BUCKETS, registry=r)
        self.overhead = Histogram("tilefleet_serving_overhead_us", "The serving path's own time: request time "
                                  "minus queue and fleet time (receive, decode, validate, encode, send; us)", m,
                                  buckets=US_BUCKETS, registry=r)
        self.cancelled = Counter("tilefleet_frames_cancelled", "Frames given up in the fleet because their "
                                 "request was abandoned, by reason (timeout, cancelled: the client went away)",
                                 [*m, "reason"], registry=r)
        self.http = Counter("tilefleet_http_requests", "HTTP requests by route, method and status code",
                            ["route", "method", "status_code"], registry=r)
        self.grpc = Counter("tilefleet_grpc_requests", "gRPC calls by method and status code",
                            ["method", "status_code"], registry=r)
        self.up = Gauge("tilefleet_server_up", "1 while the server runs", registry=r)
        self.up.set(1)

    def attach(self, deployments: Callable[[], dict[str, Any]],
               queue_state: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Report the fleet's devices and queues at each scrape (the service's own views of them)."""
        self.registry.register(FleetCollector(deployments, queue_state))

    def request(self, model: str, failure: str | None, total_s: float, queue_s: float | None,
                compute_s: float | None, batch: int) -> None:
        labels = (model, "1")
        if failure is not None:
            self.failure.labels(*labels, failure).inc()
            return
        self.success.labels(*labels).inc()
        self.count.labels(*labels).inc(batch)
        self.duration.labels(*labels).observe(total_s * 1e6)
        if queue_s is not None:
            self.queue.labels(*labels).observe(queue_s * 1e6)
        if compute_s is not None:
            self.compute.labels(*labels).observe(compute_s * 1e6)
            self.overhead.labels(*labels).observe(max(0.0, total_s - (queue_s or 0.0) - compute_s) * 1e6)

    def frame_cancelled(self, model: str, reason: str) -> None:
        self.cancelled.labels(model, "1", reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class FleetCollector(Collector):
    """Per-device counters of every loaded deployment, read at scrape time.

    Counters are per (device, model) because ``Deployment.stats()`` is per deployment; steals,
    retries and up/down are the cluster's, reported once per device.
    """

    def __init__(self, deployments: Callable[[], dict[str, Any]],
                 queue_state: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.deployments = deployments
        self.queue_state = queue_state

    def collect(self) -> Iterator[Any]:
        dm = ["device", "model"]
        fams = {
            "tiles": CounterMetricFamily("tilefleet_device_tiles", "Tiles a device computed", labels=dm),
            "tails": CounterMetricFamily("tilefleet_device_tails", "Model tails a device ran", labels=dm),
            "busy_s": CounterMetricFamily("tilefleet_device_busy_seconds", "Device compute time (its own, "
                                          "emulated, clock)", labels=dm),
            "bytes_in": CounterMetricFamily("tilefleet_device_bytes_in", "Bytes sent to the device", labels=dm),
            "bytes_out": CounterMetricFamily("tilefleet_device_bytes_out", "Bytes the device sent back", labels=dm),
            "failures": CounterMetricFamily("tilefleet_device_failures", "Tiles that failed on the device",
                                            labels=dm),
        }
        peak = GaugeMetricFamily("tilefleet_device_peak_bytes", "Weights plus the most tile memory in flight at "
                                 "once", labels=dm)
        up = GaugeMetricFamily("tilefleet_device_up", "1 while the device is alive, 0 once lost", labels=["device"])
        steals = CounterMetricFamily("tilefleet_device_steals", "Tiles stolen by the device (cluster-wide)",
                                     labels=["device"])
        retries = CounterMetricFamily("tilefleet_device_retries", "Tiles re-run after a failure (cluster-wide)",
                                      labels=["device"])
        seen: set[str] = set()
        for model, dep in self.deployments().items():
            try:
                snap = dep.stats(detail=False)  # constant cost per scrape
            except Exception:  # noqa: BLE001 - a deployment closing during a scrape has no stats
                continue
            for device, d in snap.get("devices", {}).items():
                for key, fam in fams.items():
                    fam.add_metric([device, model], float(d.get(key, 0)))
                peak.add_metric([device, model], float(d.get("peak_bytes", 0)))
                if device not in seen:
                    seen.add(device)
                    up.add_metric([device], 1.0 if d.get("alive") else 0.0)
                    steals.add_metric([device], float(d.get("steals", 0)))
                    retries.add_metric([device], float(d.get("retries", 0)))
        yield from fams.values()
        yield from (peak, up, steals, retries)
        pending = GaugeMetricFamily("nv_inference_pending_request_count", "Requests waiting in the admission "
                                    "queue", labels=["model", "version"])
        flight = GaugeMetricFamily("tilefleet_frames_in_flight", "Requests whose frames are in the fleet",
                                   labels=["model"])
        for model, q in self.queue_state().items():
            pending.add_metric([model, "1"], float(q["waiting"]))
            flight.add_metric([model], float(q["in_flight"]))
        yield pending
        yield flight
