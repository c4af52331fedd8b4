"""Backend bookkeeping of one Postgres instance: pools per (database, user) under one cap.

This module decides which lease request gets which backend, when a backend is
opened, reset or closed. It does no IPC itself: requests arrive as
``LeaseRequest`` objects whose callbacks deliver the outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .connect import BackendConn, BackendError, open_backend

log = logging.getLogger("pgfleet.pooler")

Key = tuple[str, str]  # (database, user)

RETRY_DELAY = 0.25
PRESSURE_INTERVAL = 0.05
STARVE_AFTER = 0.2


@dataclass(eq=False)
class PooledBackend:
    id: int
    key: Key
    conn: BackendConn
    state: str = "idle"  # idle | leased | resetting
    owner: object | None = None
    idle_since: float = field(default_factory=time.monotonic)
    # What the last holder left on the backend, handed to the next one so it can
    # replay only the difference: settings it SET and statements it prepared.
    applied: dict[str, str] = field(default_factory=dict)
    prepared: list[str] = field(default_factory=list)


@dataclass(eq=False)
class LeaseRequest:
    """One wish for a backend of ``key``; exactly one of grant/fail is called, unless cancelled."""

    key: Key
    grant: Callable[[PooledBackend], None]
    fail: Callable[[dict[str, str]], None]
    owner: object | None = None
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)


class PoolManager:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socket_path: str,
        cap: int,
        on_pressure: Callable[[dict[object, int]], None] = lambda excess: None,
    ) -> None:
        self.loop = loop
        self.socket_path = socket_path
        self.cap = cap
        self.on_pressure = on_pressure
        self.backends: dict[int, PooledBackend] = {}
        self.opening = 0
        self.waiters: deque[LeaseRequest] = deque()
        self._ids = itertools.count(1)
        # When each holder was last asked to give backends back.
        self._asked: dict[object, float] = {}
        self._pressure_timer: asyncio.TimerHandle | None = None
        self.opened_total = 0
        self.closed_total = 0

    # -- accounting ---------------------------------------------------------------------------
    def total(self) -> int:
        return len(self.backends) + self.opening

    def stats(self) -> dict[str, int]:
        states = {"idle": 0, "leased": 0, "resetting": 0}
        for b in self.backends.values():
            states[b.state] += 1
        return {
            **states,
            "opening": self.opening,
            "waiting": len(self.waiters),
            "opened_total": self.opened_total,
            "closed_total": self.closed_total,
        }

    # -- requests -----------------------------------------------------------------------------
    def request(self, req: LeaseRequest, urgent: bool = False) -> None:
        """Queue ``req``; ``urgent`` ones (pgfleet's own short catalog lookups, which
        logins wait on) go first."""
        if urgent:
            self.waiters.appendleft(req)
        else:
            self.waiters.append(req)
        self._pump()

    def cancel(self, req: LeaseRequest) -> None:
        req.cancelled = True
        try:
            self.waiters.remove(req)
        except ValueError:
            pass

    def release(self, backend_id: int, state: str, carry: dict | None = None) -> None:
        """A lease comes back: 'clean' (reusable as is), 'dirty' (needs a reset) or 'dead'.

        ``carry`` holds what the holder knows of the backend's state now: its reported
        parameters, the settings it applied and the statements prepared on it.
        """
        b = self.backends.get(backend_id)
        if b is None or b.state != "leased":
            return
        self._asked.pop(b.owner, None)  # it answered: it may be asked again at once
        b.owner = None
        if carry:
            b.conn.params = dict(carry.get("params") or b.conn.params)
            b.applied = dict(carry.get("applied") or {})
            b.prepared = list(carry.get("prepared") or ())
        if state == "clean":
            self._make_idle(b)
        elif state == "dirty":
            b.state = "resetting"
            self.loop.create_task(self._reset(b))
        else:
            self._close(b)
        self._pump()

    def owner_gone(self, owner: object) -> None:
        """A worker died or disconnected: its leases are in an unknown state, so close them."""
        self._asked.pop(owner, None)
        for b in [b for b in self.backends.values() if b.owner is owner]:
            self._close(b)
        for req in [r for r in self.waiters if r.owner is owner]:
            self.cancel(req)
        self._pump()

    def close_all(self) -> None:
        for b in list(self.backends.values()):
            self._close(b)

    # -- the scheduler ------------------------------------------------------------------------
    def _pump(self) -> None:
        """Serve waiters in arrival order while there is a backend or room for one."""
        starved = False
        for req in list(self.waiters):
            if req.cancelled:
                self._drop_waiter(req)
                continue
            b = self._idle_for(req.key)
            if b is not None:
                self._drop_waiter(req)
                self._grant(b, req)
                continue
            if self.total() < self.cap or self._evict_idle(keep=req.key):
                self._drop_waiter(req)
                self._open_for(req)
                continue
            starved = True
            break
        if starved:
            # Ask holders to give back now; a holder already asked is asked again only
            # once it has released something or PRESSURE_INTERVAL has passed, and we look
            # again after that interval while anyone waits (a holder busy with its own
            # clients sends nothing that would wake us).
            now = time.monotonic()
            ask = {
                o: n
                for o, n in self.excess_by_owner().items()
                if now - self._asked.get(o, 0.0) >= PRESSURE_INTERVAL
            }
            if ask:
                for o in ask:
                    self._asked[o] = now
                self.on_pressure(ask)
            if self._pressure_timer is None:
                self._pressure_timer = self.loop.call_later(
                    PRESSURE_INTERVAL, self._pressure_again
                )

    def _pressure_again(self) -> None:
        self._pressure_timer = None
        self._pump()

    def excess_by_owner(self) -> dict[object, int]:
        """For every holder, how many backends it has beyond its max-min fair share.

        A holder's demand is what it holds plus what it waits for; shares come from
        water-filling the cap over those demands. Only holders above their share are
        asked to give backends back, so a busy worker keeps its leases (and its
        transactions cost no IPC) unless another one is short.
        """
        held: dict[object, int] = {}
        for b in self.backends.values():
            if b.state == "leased":
                held[b.owner] = held.get(b.owner, 0) + 1
        demand = dict(held)
        for r in self.waiters:
            if not r.cancelled:
                demand[r.owner] = demand.get(r.owner, 0) + 1
        share = water_fill(self.cap, demand)
        excess = {o: max(0, h - share.get(o, 0)) for o, h in held.items()}
        # Shares are whole backends, so a tie (2 workers wanting the only backend) can
        # leave a waiter with a share of 0. Once it has waited STARVE_AFTER, the largest
        # holder gives one back anyway, so that backends take turns and nobody starves.
        now = time.monotonic()
        oldest = next((r for r in self.waiters if not r.cancelled), None)
        if oldest is not None and now - oldest.since > STARVE_AFTER:
            donors = [o for o in held if o is not oldest.owner]
            if donors:
                donor = max(donors, key=lambda o: held[o])
                excess[donor] = max(excess[donor], 1)
        return excess

    def _drop_waiter(self, req: LeaseRequest) -> None:
        try:
            self.waiters.remove(req)
        except ValueError:
            pass

    def _idle_for(self, key: Key) -> PooledBackend | None:
        best = None
        for b in self.backends.values():
            if b.state == "idle" and b.key == key and (best is None or b.idle_since > best.idle_since):
                best = b
        return best

    def _evict_idle(self, keep: Key) -> bool:
        """Close the longest-idle backend of another pool to make room; False if none."""
        victim = None
        for b in self.backends.values():
            if b.state == "idle" and b.key != keep and (victim is None or b.idle_since < victim.idle_since):
                victim = b
        if victim is None:
            return False
        self._close(victim)
        return True

    def _grant(self, b: PooledBackend, req: LeaseRequest) -> None:
        self.loop.remove_reader(b.conn.sock.fileno())
        b.state = "leased"
        b.owner = req.owner
        try:
            req.grant(b)
        except Exception:
            log.exception("lease grant failed; closing backend %s", b.id)
            self._close(b)

    def _open_for(self, req: LeaseRequest) -> None:
        self.opening += 1
        self.loop.create_task(self._open(req))

    async def _open(self, req: LeaseRequest) -> None:
        database, user = req.key
        try:
            conn = await open_backend(self.loop, self.socket_path, database, user)
        except BackendError as exc:
            self.opening -= 1
            if req.cancelled:
                pass
            elif exc.transient:
                # Postgres is down or starting: keep the request, try again shortly.
                self.loop.call_later(RETRY_DELAY, self._retry, req)
            else:
                req.fail(exc.fields)
            self._pump()
            return
        except Exception:
            self.opening -= 1
            log.exception("opening a backend failed")
            self.loop.call_later(RETRY_DELAY, self._retry, req)
            return
        self.opening -= 1
        self.opened_total += 1
        b = PooledBackend(next(self._ids), req.key, conn, state="resetting")
        self.backends[b.id] = b
        if req.cancelled:
            self._make_idle(b)
            self._pump()
        else:
            self._grant(b, req)

    def _retry(self, req: LeaseRequest) -> None:
        if not req.cancelled:
            self.waiters.appendleft(req)
            self._pump()

    async def _reset(self, b: PooledBackend) -> None:
        b.applied, b.prepared = {}, []
        try:
            await b.conn.query(self.loop, "DISCARD ALL")
        except (BackendError, OSError):
            self._close(b)
            self._pump()
            return
        if b.id in self.backends:
            self._make_idle(b)
            self._pump()

    def _make_idle(self, b: PooledBackend) -> None:
        b.state = "idle"
        b.idle_since = time.monotonic()
        self.loop.add_reader(b.conn.sock.fileno(), self._idle_readable, b)

    def _idle_readable(self, b: PooledBackend) -> None:
        """An idle backend should say nothing; data or EOF means it is going away."""
        try:
            data = b.conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            log.info("idle backend %s (pid %s) sent unsolicited data; closing", b.id, b.conn.pid)
        self._close(b)
        self._pump()

    def _close(self, b: PooledBackend) -> None:
        if self.backends.pop(b.id, None) is None:
            return
        self.closed_total += 1
        try:
            self.loop.remove_reader(b.conn.sock.fileno())
        except (ValueError, OSError):
            pass
        if b.state != "leased":
            try:
                b.conn.sock.sendall(b"X\x00\x00\x00\x04")
            except OSError:
                pass
        b.conn.close()


def water_fill(capacity: int, demand: dict[object, int]) -> dict[object, int]:
    """Max-min fair integer shares of ``capacity``: nobody gets more than it asks for,
    and what the small askers leave is split evenly among the rest."""
    share = {k: 0 for k in demand}
    left = capacity
    active = sorted((d, i, k) for i, (k, d) in enumerate(demand.items()) if d > 0)
    while active and left > 0:
        each = left // len(active)
        if each == 0:
            for _, _, k in active[:left]:
                share[k] += 1
            break
        d, _, k = active[0]
        give = min(each, d - share[k])
        for _, _, kk in active:
            share[kk] += give
        left -= give * len(active)
        active = [(d, i, kk) for d, i, kk in active if share[kk] < d]
    return share
