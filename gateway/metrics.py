"""A worker's gauges, refreshed once a second from its sessions and leases (never per message)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import Worker

from .pins import PIN_REASONS as _CHECKED

PIN_REASONS = (*_CHECKED, "load")  # LOAD cannot be undone, so it is never checked


class WorkerMetrics:
    def __init__(self, worker: Worker) -> None:
        from prometheus_client import Gauge

        self.worker = worker
        self.sessions = Gauge("pgfleet_client_sessions", "Client sessions logged in or logging in",
                              multiprocess_mode="livesum")
        self.pinned = Gauge("pgfleet_pinned_sessions", "Sessions pinned to their backend, by reason",
                            ["reason"], multiprocess_mode="livesum")
        self.waiting = Gauge("pgfleet_sessions_waiting", "Sessions waiting for a backend",
                             multiprocess_mode="livesum")
        self.held = Gauge("pgfleet_worker_backends", "Backends leased to workers, by state",
                          ["state"], multiprocess_mode="livesum")
        self._timer = worker.loop.call_later(1.0, self.refresh)

    def refresh(self) -> None:
        sessions = self.worker.sessions
        reasons: Counter[str] = Counter()
        waiting = 0
        for s in sessions:  # tens of thousands: the common case must cost next to nothing
            if s.pins:
                reasons.update(s.pins)
            if s.waiting:
                waiting += 1
        self.sessions.set(len(sessions))
        for r in (*PIN_REASONS, *(set(reasons) - set(PIN_REASONS))):
            self.pinned.labels(r).set(reasons.get(r, 0))
        self.waiting.set(waiting)
        leases = self.worker.leases
        idle = sum(len(v) for v in leases.idle.values())
        self.held.labels("idle").set(idle)
        self.held.labels("busy").set(len(leases.held) - idle)
        self._timer = self.worker.loop.call_later(1.0, self.refresh)
