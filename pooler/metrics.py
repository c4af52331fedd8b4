"""The pooler's gauges, refreshed once a second from PoolManager.stats()."""

from __future__ import annotations

from .pool import PoolManager


class PoolerMetrics:
    def __init__(self, pool: PoolManager) -> None:
        from prometheus_client import Counter, Gauge

        self.pool = pool
        self.backends = Gauge("pgfleet_pool_backends", "Postgres backends by state",
                              ["state"], multiprocess_mode="liveall")
        self.waiting = Gauge("pgfleet_pool_waiting", "Lease requests waiting for a backend",
                             multiprocess_mode="liveall")
        self.user_held = Gauge("pgfleet_pool_user_backends", "Backends held per user",
                               ["user"], multiprocess_mode="liveall")
        self.user_share = Gauge("pgfleet_pool_user_share", "Max-min fair share per user",
                                ["user"], multiprocess_mode="liveall")
        self.opened = Counter("pgfleet_pool_backends_opened", "Backends opened")
        self.closed = Counter("pgfleet_pool_backends_closed", "Backends closed")
        self._seen = (0, 0)
        self._timer = pool.loop.call_later(1.0, self.refresh)

    def refresh(self) -> None:
        st = self.pool.stats()
        for state in ("idle", "leased", "resetting", "opening"):
            self.backends.labels(state).set(st[state])
        self.waiting.set(st["waiting"])
        for user, u in st["users"].items():
            self.user_held.labels(user).set(u["held"])
            self.user_share.labels(user).set(u["share"])
        opened, closed = st["opened_total"], st["closed_total"]
        self.opened.inc(opened - self._seen[0])
        self.closed.inc(closed - self._seen[1])
        self._seen = (opened, closed)
        self._timer = self.pool.loop.call_later(1.0, self.refresh)
