"""Which waiting request enters the fleet next: the serving layer's admission queue (pure).

The runtime's scheduler is shared by every deployment on a cluster and serves frames FIFO by
submit order, so whatever reaches ``Deployment.submit`` first is served first. Admission is
therefore decided here, before submit, and bounded: at most ``capacity`` frames of all models are
in the fleet at once (by default 2 per alive device, enough to keep every device busy while the
next frame's tiles travel), and at most ``limit`` of any one model. When a slot frees, the
waiting request with the highest model ``priority`` goes next; among equal priorities, the one
that arrived first (FIFO across models, which is a fair share when the models' loads are equal).
Priority is strict: a steady stream of high-priority requests starves lower ones, and a request
that waits past its deadline is failed with a timeout rather than kept.

Not thread-safe by design: :class:`fleet.serving.service.InferenceService` holds one lock around
it, and the tests drive it step by step with a fake clock.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorKind, ServingError


@dataclass(eq=False)
class Ticket:
    """One request's frames on their way through admission and the deployment."""

    model: str
    priority: int
    deadline: float | None  # clock time after which the request is failed rather than started
    payload: Any = None
    enqueued: float = 0.0
    seq: int = 0
    started: float | None = None  # when it was submitted to the deployment
    finished: float | None = None
    state: str = "new"  # new -> queued -> running -> done; or abandoned
    ahead: int = 0  # requests queued before it when it arrived (for the timeout message)
    meta: dict[str, Any] = field(default_factory=dict)


class Admission:
    """Per-model FIFO queues, a shared bound on frames in flight and strict model priorities."""

    def __init__(self, capacity: int, max_queue: int = 256, clock: Callable[[], float] | None = None) -> None:
        import time

        self.capacity = max(1, capacity)
        self.max_queue = max_queue
        self.clock = clock or time.monotonic
        self.queues: dict[str, deque[Ticket]] = {}
        self.limits: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self._seq = itertools.count()

    @property
    def in_flight(self) -> int:
        return sum(self.running.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def add_model(self, model: str, limit: int) -> None:
        self.queues.setdefault(model, deque())
        self.limits[model] = max(1, limit)
        self.running.setdefault(model, 0)

    def remove_model(self, model: str) -> list[Ticket]:
        """Stop admitting ``model``; its waiting tickets are returned (abandoned) for the caller to fail."""
        q = self.queues.pop(model, deque())
        self.limits.pop(model, None)
        for t in q:
            t.state = "abandoned"
        return list(q)

    def enqueue(self, t: Ticket) -> None:
        if t.model not in self.queues:
            raise ServingError(ErrorKind.UNAVAILABLE, f"model '{t.model}' is not loaded")
        if self.waiting >= self.max_queue:
            raise ServingError(ErrorKind.UNAVAILABLE,
                               f"the server's queue is full ({self.max_queue} requests waiting, {self.in_flight} "
                               "frames in flight); retry later or lower the request rate")
        t.enqueued = self.clock()
        t.seq = next(self._seq)
        t.ahead = self.waiting
        t.state = "queued"
        self.queues[t.model].append(t)

    def next(self) -> tuple[Ticket | None, list[Ticket]]:
        """The ticket to start now (or None) and the tickets that expired while waiting.

        The chosen ticket is marked running; the caller submits it and calls :meth:`done` when its
        result (or failure) arrives.
        """
        now = self.clock()
        expired = []
        for q in self.queues.values():
            while q and (q[0].state != "queued" or (q[0].deadline is not None and q[0].deadline <= now)):
                t = q.popleft()
                if t.state == "queued":
                    t.state = "abandoned"
                    expired.append(t)
        if self.in_flight >= self.capacity:
            return None, expired
        best: Ticket | None = None
        for model, q in self.queues.items():
            if q and self.running[model] < self.limits[model]:
                head = q[0]
                if best is None or (-head.priority, head.seq) < (-best.priority, best.seq):
                    best = head
        if best is None:
            return None, expired
        self.queues[best.model].popleft()
        best.state = "running"
        best.started = now
        self.running[best.model] += 1
        return best, expired

    def done(self, t: Ticket) -> None:
        """A started ticket's frame left the fleet (result, failure, or abandoned by its client)."""
        if t.started is not None and t.finished is None:
            t.finished = self.clock()
            if t.model in self.running:
                self.running[t.model] = max(0, self.running[t.model] - 1)
        if t.state == "running":
            t.state = "done"

    def abandon(self, t: Ticket) -> bool:
        """The client gave up (timeout, disconnect). True if the ticket had not started (it never will)."""
        if t.state in ("queued", "new"):
            t.state = "abandoned"
            q = self.queues.get(t.model)
            if q is not None:
                try:
                    q.remove(t)
                except ValueError:
                    pass
            return True
        if t.state == "running":
            t.state = "abandoned"  # still counted as running until its frame leaves the fleet (done)
        return False
