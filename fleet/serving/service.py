"""The inference service: the one core both transports call.

It owns the models (loaded, loading, or not ready with a reason), one deployment per loaded model
on one shared cluster, the admission queue in front of them, and the per-request timings the
metrics report. REST (:mod:`.rest`) and gRPC (:mod:`.rpc`) only decode, call :meth:`submit`, wait
for :attr:`Pending.future`, encode, and report back through :meth:`finish`.

Threads: client-facing calls come from the HTTP event loop and the gRPC thread pool; a request
that finds a free slot is handed to ``Deployment.submit`` by the thread that received it (no
thread hop on the way in); one dispatcher thread moves queued requests in as slots free. Results
arrive on the runtime's driver thread, which only records them and wakes the dispatcher. One lock
guards the model table and the admission queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import repository
from .admission import Admission, Ticket
from .errors import ErrorKind, ServingError, invalid, not_found, unavailable
from .models import (LOADING, READY, UNAVAILABLE, UNLOADING, ModelEntry, as_numpy, build_model, fit_error,
                     metadata_for, name_outputs, plan_memory)
from .protocol import (CheckedInput, InferRequest, InferResponse, ModelMetadata, OutputTensor, check_request,
                       check_version, datatype_of)
from .repository import ConfigError, ModelConfig

log = logging.getLogger("tilefleet.serving")

SERVER_NAME = "tilefleet"
EXTENSIONS = ["binary_tensor_data", "model_repository", "metrics"]


class ClusterLike(Protocol):
    """What the service needs of :class:`fleet.runtime.client.Cluster` (a fake in unit tests)."""

    def plan(self, model: Any, example: torch.Tensor, grid: Any = "auto", **kw: Any) -> Any: ...

    def deploy(self, model: Any = None, example: Any = None, grid: Any = "auto", **kw: Any) -> Any: ...

    def devices(self) -> list[dict[str, Any]]: ...


@dataclass(eq=False)
class Pending:
    """One accepted request, from decode to the response being sent."""

    request: InferRequest
    checked: CheckedInput
    ticket: Ticket
    received: float  # clock time the transport started receiving it
    deadline: float
    timeout_s: float
    future: Future[InferResponse] = field(default_factory=Future)

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)


@dataclass
class ServiceOptions:
    per_device_in_flight: int = 2
    max_queue: int = 256
    timeout_s: float = 30.0  # a request's deadline unless it asks for a shorter one
    unload_wait_s: float = 60.0


class InferenceService:
    """Models on one cluster behind the Open Inference Protocol's operations."""

    def __init__(self, cluster: ClusterLike, configs: dict[str, ModelConfig | ConfigError] | None = None, *,
                 repository_dir: Path | None = None, options: ServiceOptions | None = None,
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic,
                 version: str = "0") -> None:
        self.cluster = cluster
        self.repository_dir = repository_dir
        self.options = options or ServiceOptions()
        self.metrics = metrics
        self.clock = clock
        self.version = version
        self._lock = threading.Condition()
        self._load_lock = threading.Lock()  # one load or unload at a time: deploy is heavy
        self.entries: dict[str, ModelEntry] = {}
        for name, cfg in (configs or {}).items():
            self._set_config(name, cfg)
        self.admission = Admission(self._capacity(), self.options.max_queue, clock)
        self.started_up = False
        self.closed = False
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="tilefleet-admission", daemon=True)
        self._dispatcher.start()

    # --- server ----------------------------------------------------------------------------------
    def live(self) -> bool:
        return not self.closed

    def ready(self) -> bool:
        """Startup loading is over and the cluster has an alive device."""
        if self.closed or not self.started_up:
            return False
        try:
            return any(d.get("state") == "alive" for d in self.cluster.devices())
        except Exception:  # noqa: BLE001 - a cluster that cannot answer is not ready
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS}

    def load_startup(self, names: list[str] | None = None) -> dict[str, str]:
        """Load the given models (default: every configured one); each failure stays as that model's reason."""
        out = {}
        for name in names if names is not None else list(self.entries):
            try:
                self.load(name)
                out[name] = READY
            except ServingError as e:
                out[name] = f"{UNAVAILABLE}: {e}"
        self.started_up = True
        return out

    # --- models ----------------------------------------------------------------------------------
    def entry(self, name: str, version: str = "") -> ModelEntry:
        with self._lock:
            e = self.entries.get(name)
        if e is None:
            raise not_found(f"unknown model '{name}'; models: {', '.join(sorted(self.entries)) or 'none'}")
        if e.metadata is not None:
            check_version(e.metadata, version)
        elif version not in ("", "1"):
            raise not_found(f"model '{name}' has no version '{version}'; versions: 1")
        return e

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.entry(name, version).ready

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        e = self.entry(name, version)
        if e.metadata is None:
            raise unavailable(f"model '{name}' is {e.state}: {e.reason}")
        return e.metadata

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index: every model with its state and, when not READY, the reason."""
        if self.repository_dir is not None:
            for name, cfg in repository.scan(self.repository_dir).items():
                with self._lock:
                    known = name in self.entries
                if not known:
                    self._set_config(name, cfg)
        with self._lock:
            rows = [{"name": e.name, "version": "1", "state": e.state, "reason": "" if e.ready else e.reason}
                    for e in sorted(self.entries.values(), key=lambda e: e.name)]
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    def deployments(self) -> dict[str, Any]:
        """Loaded models' deployments (for the metrics collector)."""
        with self._lock:
            return {e.name: e.deployment for e in self.entries.values() if e.ready and e.deployment is not None}

    def load(self, name: str, config: dict[str, Any] | None = None) -> None:
        """Load (or reload) ``name`` from the repository, or from ``config`` (the same keys as a config.toml)."""
        with self._load_lock:
            cfg = self._resolve_config(name, config)
            old = self.entries.get(name)
            if old is not None and old.state in (READY, LOADING):
                self._unload_locked(old, "reloaded")
            entry = ModelEntry(name, cfg if isinstance(cfg, ModelConfig) else None, LOADING, "loading")
            with self._lock:
                self.entries[name] = entry
            if isinstance(cfg, ConfigError):
                self._not_ready(entry, str(cfg))
                raise invalid(f"failed to load '{name}': {cfg}")
            try:
                self._deploy(entry, cfg)
            except ServingError as e:
                self._not_ready(entry, str(e))
                raise ServingError(e.kind, f"failed to load '{name}': {e}") from None
            except Exception as e:  # noqa: BLE001 - anything the runtime raises leaves the model NOT READY
                log.exception("loading %s failed", name)
                self._not_ready(entry, f"{type(e).__name__}: {e}")
                raise invalid(f"failed to load '{name}': {type(e).__name__}: {e}") from None

    def unload(self, name: str) -> None:
        with self._load_lock:
            e = self.entry(name)
            self._unload_locked(e, "unloaded")

    def _resolve_config(self, name: str, config: dict[str, Any] | None) -> ModelConfig | ConfigError:
        folder = self.repository_dir / name if self.repository_dir is not None else None
        if config is not None:
            try:
                return repository.from_dict(name, config, folder if folder and folder.is_dir() else None)
            except ConfigError as e:
                return e
        if self.repository_dir is not None:
            if not (self.repository_dir / name).is_dir():
                raise not_found(f"no model '{name}' in the repository {self.repository_dir}")
            return repository.read(self.repository_dir, name)  # read again: edits apply on the next load
        e = self.entries.get(name)
        if e is None or e.config is None:
            raise not_found(f"unknown model '{name}'; models: {', '.join(sorted(self.entries)) or 'none'}")
        return e.config

    def _deploy(self, entry: ModelEntry, cfg: ModelConfig) -> None:
        try:
            model, example = build_model(cfg)
            entry.preprocess = repository.build_preprocess(cfg.preprocess)
        except ConfigError as e:
            raise invalid(str(e)) from None
        with torch.no_grad():
            meta = metadata_for(cfg, example, model(example))
        grid, kw = cfg.deploy_kwargs()
        if entry.preprocess is not None:  # raw UINT8 frames, normalised on the devices
            example = torch.randint(0, 256, example.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            if entry.preprocess.layout == "hwc":
                example = example.permute(0, 2, 3, 1).contiguous()  # frames arrive as the camera gives them
            kw["preprocess"] = entry.preprocess
        loaded = {e.name: (e.weight_bytes, e.peak_bytes) for e in self.entries.values() if e.ready}
        planned = self.cluster.plan(model, example, grid, **kw)
        need = plan_memory(planned.plan)
        why = fit_error(cfg.name, need, loaded, self.cluster.devices())
        if why:
            raise invalid(why)  # refused before any weights travel
        dep = self.cluster.deploy(planned=planned)
        with self._lock:
            entry.deployment, entry.metadata = dep, meta
            entry.weight_bytes, entry.peak_bytes = need
            entry.state, entry.reason = READY, ""
            self.admission.capacity = self._capacity()
            self.admission.add_model(cfg.name, cfg.max_in_flight or self.admission.capacity)
            self._lock.notify_all()
        log.info("model %s READY: weights %.1f MiB per device", cfg.name, need[0] / 2**20)

    def _unload_locked(self, e: ModelEntry, reason: str) -> None:
        with self._lock:
            if e.state != READY:
                e.state, e.reason = UNAVAILABLE, reason
                return
            e.state, e.reason = UNLOADING, "unloading"
            dropped = self.admission.remove_model(e.name)
        for t in dropped:
            self._fail_ticket(t, unavailable(f"model '{e.name}' was {reason} while the request waited"))
        end = self.clock() + self.options.unload_wait_s
        with self._lock:  # let frames already in the fleet finish: their clients get their results
            while self.admission.running.get(e.name, 0) and self.clock() < end:
                self._lock.wait(timeout=0.1)
            dep, e.deployment = e.deployment, None
            e.state, e.reason = UNAVAILABLE, reason
        if dep is not None:
            dep.close()

    def _not_ready(self, entry: ModelEntry, reason: str) -> None:
        with self._lock:
            entry.state, entry.reason = UNAVAILABLE, reason
        log.warning("model %s NOT READY: %s", entry.name, reason)

    def _set_config(self, name: str, cfg: ModelConfig | ConfigError) -> None:
        entry = ModelEntry(name, cfg if isinstance(cfg, ModelConfig) else None)
        if isinstance(cfg, ConfigError):
            entry.reason = str(cfg)
        with self._lock:
            self.entries[name] = entry

    def _capacity(self) -> int:
        try:
            alive = sum(d.get("state") == "alive" for d in self.cluster.devices())
        except Exception:  # noqa: BLE001
            alive = 1
        return max(1, alive) * self.options.per_device_in_flight

    # --- inference -------------------------------------------------------------------------------
    def submit(self, req: InferRequest, received: float | None = None) -> Pending:
        """Validate ``req`` and queue it; raises :class:`ServingError` for anything wrong with it."""
        e = self.entry(req.model, req.version)
        if not e.ready or e.metadata is None:
            raise unavailable(f"model '{req.model}' is not ready ({e.state}: {e.reason})")
        checked = check_request(req, e.metadata)
        timeout = min(self.options.timeout_s, req.timeout_s or self.options.timeout_s)
        now = self.clock()
        start = received if received is not None else now
        cfg = e.config
        ticket = Ticket(req.model, cfg.priority if cfg else 0, start + timeout, payload=checked.batch)
        pending = Pending(req, checked, ticket, start, start + timeout, timeout)
        ticket.meta["pending"] = pending
        with self._lock:
            self.admission.enqueue(ticket)
            # a free slot: start it here (usually this very request) rather than waking the
            # dispatcher, whose thread hop cost 0.1-0.7 ms on a busy 2-core box; a full fleet
            # leaves it queued, and the dispatcher starts it when a slot frees
            now_ticket, expired = self.admission.next()
        self._expire(expired)
        if now_ticket is not None:
            self._start(now_ticket)
        return pending

    def abandon(self, p: Pending, kind: ErrorKind = ErrorKind.TIMEOUT) -> ServingError:
        """The transport gave up on ``p`` (its deadline passed, or its client left): the error to report.
        A queued request leaves the queue; a frame already in the fleet is cancelled there."""
        with self._lock:
            never_started = self.admission.abandon(p.ticket)
            running = self.admission.running.get(p.ticket.model, 0)
            first = "abandoned" not in p.ticket.meta
            p.ticket.meta.setdefault("abandoned", kind)
            submitted = p.ticket.meta.get("frame") if first else None  # None while still being submitted
            self._lock.notify_all()
        if submitted is not None:
            self._cancel_frame(p.ticket, submitted, kind)
        where = (f"it waited in the queue with {p.ticket.ahead} request(s) ahead of it and never started"
                 if never_started else f"its frame was in the fleet with {running - 1} other(s) of this model")
        if kind is ErrorKind.CANCELLED:
            err = ServingError(kind, f"the client went away; {where}")
        else:
            err = ServingError(kind, f"model '{p.request.model}': no result within the request's timeout "
                                     f"({p.timeout_s:g} s); {where}")
        if not p.future.done():
            p.future.set_exception(err)
        return err

    def finish(self, p: Pending | None, model: str, error: ServingError | None, total_s: float) -> None:
        """The transport sent the response (or the error): record the request's timings."""
        if self.metrics is None:
            return
        t = p.ticket if p is not None else None
        queue_s = compute_s = None
        if t is not None and t.started is not None:
            queue_s = t.started - t.enqueued
            if t.finished is not None:
                compute_s = t.finished - t.started
        batch = p.checked.batch.shape[0] if p is not None else 0
        self.metrics.request(model, error.kind.reason if error else None, total_s, queue_s, compute_s, batch)

    def wait(self, p: Pending) -> InferResponse:
        """Block until ``p``'s response (for the threaded gRPC transport)."""
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return p.future.result(timeout=p.remaining(self.clock()))
        except FutureTimeout:
            raise self.abandon(p) from None

    def queue_state(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {m: {"waiting": len(q), "in_flight": self.admission.running.get(m, 0)}
                    for m, q in self.admission.queues.items()}

    def _dispatch_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self.closed:
                        return
                    ticket, expired = self.admission.next()
                    if ticket is not None or expired:
                        break
                    self._lock.wait(timeout=0.25)  # also notices deadlines passing in the queue
            self._expire(expired)
            if ticket is not None:
                self._start(ticket)

    def _expire(self, expired: list[Ticket]) -> None:
        for t in expired:
            self._fail_ticket(t, ServingError(ErrorKind.TIMEOUT, f"model '{t.model}': the request waited "
                                              f"{self.clock() - t.enqueued:.2f} s in the queue, past its timeout"))

    def _start(self, t: Ticket) -> None:
        with self._lock:
            e = self.entries.get(t.model)
            dep = e.deployment if e is not None else None
        try:
            if dep is None:
                raise unavailable(f"model '{t.model}' was unloaded")
            batch = t.payload if t.payload.flags.writeable else np.array(t.payload)
            fut = dep.submit(torch.from_numpy(batch))
        except Exception as err:  # noqa: BLE001 - a refused submit fails this request only
            self._frame_left(t)
            self._fail_ticket(t, err if isinstance(err, ServingError) else invalid(str(err)))
            return
        with self._lock:  # abandon() reads this under the lock: exactly one of the two cancels a frame
            t.meta["frame"] = (dep, fut)
            gone = t.meta.get("abandoned")
        if gone is not None:  # its client gave up while the frame was being submitted
            self._cancel_frame(t, (dep, fut), gone)
        fut.add_done_callback(lambda f: self._on_result(t, f))

    def _cancel_frame(self, t: Ticket, submitted: tuple[Any, Future[Any]], kind: ErrorKind) -> None:
        """Give up the frame of an abandoned request in the fleet, so the devices stop spending time
        on it; its slot frees when the runtime has failed it (``_on_result``)."""
        dep, fut = submitted
        why = ("cancelled: the client went away" if kind is ErrorKind.CANCELLED
               else "cancelled: the request's timeout passed")
        try:
            cancelled = dep.cancel(fut, why)
        except Exception:  # noqa: BLE001 - a deployment closing meanwhile: its frames end anyway
            log.exception("cancelling a frame of %s", t.model)
            return
        if cancelled and self.metrics is not None:
            self.metrics.frame_cancelled(t.model, kind.reason)

    def _on_result(self, t: Ticket, f: Future[Any]) -> None:
        """On the runtime's driver thread: free the slot, then hand the result to the waiting request."""
        self._frame_left(t)
        p: Pending = t.meta["pending"]
        if p.future.done():
            return  # abandoned (timeout or disconnect): nobody waits for it
        try:
            p.future.set_result(self._response(p, f.result()))
        except Exception as err:  # noqa: BLE001
            if not p.future.done():
                p.future.set_exception(err if isinstance(err, ServingError)
                                       else ServingError(ErrorKind.INTERNAL, f"model '{t.model}': {err}"))

    def _frame_left(self, t: Ticket) -> None:
        with self._lock:
            self.admission.done(t)
            # wake the dispatcher (or an unload waiting for the model's frames) only when one has
            # something to do: a needless wake-up is a thread switch on every frame
            if self.admission.waiting or any(e.state == UNLOADING for e in self.entries.values()):
                self._lock.notify_all()

    def _fail_ticket(self, t: Ticket, err: ServingError) -> None:
        p: Pending = t.meta["pending"]
        if not p.future.done():
            p.future.set_exception(err)

    def _response(self, p: Pending, result: Any) -> InferResponse:
        wanted = {o.name: o.binary for o in p.checked.outputs}
        outs = []
        for name, tensor in name_outputs(result):
            if name in wanted:
                arr = as_numpy(tensor)
                if p.checked.single:
                    arr = arr[0]
                outs.append(OutputTensor(name, datatype_of(arr.dtype), tuple(arr.shape), arr, wanted[name]))
        r = p.request
        return InferResponse(r.model, "1", r.id, outs)

    def close(self) -> None:
        """Unload every model and stop the dispatcher (the cluster is the caller's to close)."""
        for e in list(self.entries.values()):
            try:
                with self._load_lock:
                    self._unload_locked(e, "server stopped")
            except Exception:  # noqa: BLE001
                log.exception("unloading %s", e.name)
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        self._dispatcher.join(timeout=5)
