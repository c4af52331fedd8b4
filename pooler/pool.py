"""Backend bookkeeping of one Postgres instance: pools per (database, user) under one cap.

This module decides which lease request gets which backend, when a backend is
opened, reset or closed. It does no IPC itself: requests arrive as
``LeaseRequest`` objects whose callbacks deliver the outcome.

Fairness is max-min (water-filling) at two levels, both recomputed from the
current state whenever it matters:

* between **users** (role names; a user's pools in several databases count
  together, and a per-user limit caps all of them): a user's demand is the
  backends leased for it plus its waiting requests, capped by its limit; the cap
  is water-filled over those demands. A free backend, or room for a new one, goes
  to the most under-served waiting user (lowest held/share), FIFO within a user.
  A user below its share that cannot be served makes users above theirs give
  backends back: idle ones here are closed to make room, leased ones are asked
  back from the gateway workers holding them, naming the (database, user) pool.
* within a user, between **(worker, database)** holders: the user's share is
  water-filled again over what each worker holds and waits for there, so one
  worker's sessions cannot starve another's.

pgfleet's own catalog lookups (``urgent`` requests) are served first and stand
outside the users' shares.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ipc.statement_catalog import StatementCatalog
from pgwire import frontend as fe

from .connect import BackendConn, BackendError, open_backend

log = logging.getLogger("pgfleet.pooler")

Key = tuple[str, str]  # (database, user)
K = TypeVar("K")

RETRY_DELAY = 0.25
PRESSURE_INTERVAL = 0.05
STARVE_AFTER = 0.2
# How long a new backend may wait for the idle one closed to make room for it to exit
# (Postgres counts a backend until its process is gone).
EXIT_WAIT = 1.0


@dataclass(eq=False)
class PooledBackend:
    id: int
    key: Key
    conn: BackendConn
    state: str = "idle"  # idle | leased | resetting
    owner: object | None = None
    # Leased to pgfleet itself (an urgent request): outside the users' shares.
    internal: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    # What the last holder left on the backend, handed to the next one so it can
    # replay only the difference: the settings it SET. (What is prepared on it is kept
    # in the shared statement catalog under ``slot``.)
    applied: dict[str, str] = field(default_factory=dict)
    slot: int = -1
    # Opened before its role/database defaults changed: closed when it comes back.
    retired: bool = False


@dataclass(eq=False)
class LeaseRequest:
    """One wish for a backend of ``key``; exactly one of grant/fail is called, unless cancelled."""

    key: Key
    grant: Callable[[PooledBackend], None]
    fail: Callable[[dict[str, str]], None]
    owner: object | None = None
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)
    urgent: bool = False


@dataclass
class Demand:
    """What one user (or one holder of a user's backends) has and wants."""

    held: int = 0
    waiting: int = 0
    oldest: float | None = None  # when its oldest waiting request arrived

    def add(self, other: Demand) -> None:
        self.held += other.held
        self.waiting += other.waiting
        if other.oldest is not None and (self.oldest is None or other.oldest < self.oldest):
            self.oldest = other.oldest


# What the pooler asks of holders: owner -> {pool: backends to give back as they come
# free}, the owner's whole debt as of now (empty: none); every holder asked also gives
# back its spare idle backends of pools it is not asking more of. Once nobody waits,
# on_relief tells the holders that owed something that they owe nothing.
Reclaims = dict[object, dict["Key", int]]


class PoolManager:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socket_path: str,
        cap: int,
        on_pressure: Callable[[Reclaims], None] = lambda asks: None,
        on_relief: Callable[[list[object]], None] = lambda owners: None,
        user_limits: Mapping[str, int] | None = None,
        catalog: StatementCatalog | None = None,
    ) -> None:
        self.loop = loop
        self.socket_path = socket_path
        self.cap = cap
        self.on_pressure = on_pressure
        self.on_relief = on_relief
        self.user_limits: dict[str, int] = dict(user_limits or {})
        self.backends: dict[int, PooledBackend] = {}
        # Requests whose backend is being opened right now.
        self.opening_reqs: set[LeaseRequest] = set()
        self.exiting = 0  # backends closed by us whose process has not gone yet
        self.urgent: deque[LeaseRequest] = deque()
        self.queues: dict[str, deque[LeaseRequest]] = {}  # user -> its waiting requests
        self._ids = itertools.count(1)
        # When each holder was last asked to give backends back.
        self._asked: dict[object, float] = {}
        # Holders last told they owe backends: told again, with nothing, once nobody waits.
        self._indebted: set[object] = set()
        self._pressure_timer: asyncio.TimerHandle | None = None
        self.opened_total = 0
        self.closed_total = 0
        self.catalog = catalog
        self._free_slots = list(range(catalog.slots - 1, -1, -1)) if catalog else []

    # -- accounting ---------------------------------------------------------------------------
    @property
    def opening(self) -> int:
        return len(self.opening_reqs)

    def total(self) -> int:
        """Backends that count against the cap: open, being opened, or closed by us and
        not yet gone from Postgres (so a replacement never overlaps the one it replaces)."""
        return len(self.backends) + self.opening + self.exiting

    def waiting(self) -> int:
        return len(self.urgent) + sum(len(q) for q in self.queues.values())

    def limit(self, user: str) -> int:
        return self.user_limits.get(user, self.cap)

    def stats(self) -> dict:
        states = {"idle": 0, "leased": 0, "resetting": 0}
        for b in self.backends.values():
            states[b.state] += 1
        held, _, internal = self._usage()
        shares = self._user_shares(held, internal)
        users = {}
        for u in sorted(set(held) | set(self.queues) | set(self.user_limits)):
            users[u] = {
                "held": held.get(u, 0),
                "waiting": len(self.queues.get(u) or ()),
                "share": shares.get(u, 0),
                "limit": self.user_limits.get(u),
            }
        return {
            **states,
            "opening": self.opening,
            "exiting": self.exiting,
            "waiting": self.waiting(),
            "opened_total": self.opened_total,
            "closed_total": self.closed_total,
            "users": users,
        }

    def _usage(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Per user: backends held (leased or being opened for it) and connections
        (every backend logged in as it, in any state); and backends pgfleet uses itself."""
        held: dict[str, int] = {}
        conns: dict[str, int] = {}
        internal = 0
        for r in self.opening_reqs:
            u = r.key[1]
            if r.urgent:
                internal += 1
                continue
            if not r.cancelled:
                held[u] = held.get(u, 0) + 1
            conns[u] = conns.get(u, 0) + 1
        for b in self.backends.values():
            u = b.key[1]
            if b.state == "leased":
                if b.internal:
                    internal += 1
                    continue
                held[u] = held.get(u, 0) + 1
            conns[u] = conns.get(u, 0) + 1
        return held, conns, internal

    def _user_capacity(self, internal: int) -> int:
        """The part of the cap the users share: minus what pgfleet's lookups use or want."""
        return max(0, self.cap - internal - len(self.urgent))

    def _user_shares(self, held: dict[str, int], internal: int) -> dict[str, int]:
        demand: dict[str, Demand] = {u: Demand(held=h) for u, h in held.items()}
        for u, q in self.queues.items():
            if q:
                d = demand.setdefault(u, Demand())
                d.waiting = len(q)
                d.oldest = q[0].since
        return fair_shares(
            self._user_capacity(internal), demand, time.monotonic(), self.user_limits
        )

    # -- requests -----------------------------------------------------------------------------
    def request(self, req: LeaseRequest, urgent: bool = False) -> None:
        """Queue ``req``; ``urgent`` ones (pgfleet's own short catalog lookups, which
        logins wait on) go first and count in no user's share or limit."""
        req.urgent = req.urgent or urgent
        self._queue_of(req).append(req)
        self._pump()

    def _queue_of(self, req: LeaseRequest) -> deque[LeaseRequest]:
        if req.urgent:
            return self.urgent
        return self.queues.setdefault(req.key[1], deque())

    def cancel(self, req: LeaseRequest) -> None:
        req.cancelled = True
        self._drop_waiter(req)

    def _drop_waiter(self, req: LeaseRequest) -> None:
        q = self.urgent if req.urgent else self.queues.get(req.key[1])
        if q is None:
            return
        try:
            q.remove(req)
        except ValueError:
            pass
        if not q and not req.urgent:
            del self.queues[req.key[1]]

    def release(self, backend_id: int, state: str, carry: dict | None = None) -> None:
        """A lease comes back: 'clean' (reusable as is), 'dirty' (needs a reset) or 'dead'.

        ``carry`` holds what the holder knows of the backend's state now: its reported
        parameters and the settings it applied.
        """
        b = self.backends.get(backend_id)
        if b is None or b.state != "leased":
            return
        self._asked.pop(b.owner, None)  # it answered: it may be asked again at once
        b.owner = None
        b.internal = False
        if carry:
            b.conn.params = dict(carry.get("params") or b.conn.params)
            b.applied = dict(carry.get("applied") or {})
        if b.retired:
            self._close(b)
        elif state == "clean":
            self._make_idle(b)
        elif state == "dirty":
            b.state = "resetting"
            self.loop.create_task(self._reset(b))
        else:
            self._close(b)
        self._pump()

    def retire(self, database: str | None, user: str | None) -> None:
        """ALTER ROLE/DATABASE ... SET changed the defaults new backends start with:
        close the idle backends of those pools now, the leased ones when they return."""
        for b in list(self.backends.values()):
            if (database is None or b.key[0] == database) and (user is None or b.key[1] == user):
                if b.state == "idle":
                    self._close(b)
                else:
                    b.retired = True
        self._pump()

    def owner_gone(self, owner: object) -> None:
        """A worker died or disconnected: its leases are in an unknown state, so close them."""
        self._asked.pop(owner, None)
        self._indebted.discard(owner)
        for b in [b for b in self.backends.values() if b.owner is owner]:
            self._close(b)
        waiting = [r for q in (self.urgent, *self.queues.values()) for r in q]
        for req in waiting:
            if req.owner is owner:
                self.cancel(req)
        self._pump()

    def close_all(self) -> None:
        for b in list(self.backends.values()):
            self._close(b)

    # -- the scheduler ------------------------------------------------------------------------
    def _pump(self) -> None:
        """Serve waiters while there is a backend or room for one: urgent ones first,
        then always the oldest request of the most under-served user."""
        starved = False
        while self.urgent:
            req = self.urgent[0]
            if req.cancelled:
                self._drop_waiter(req)
            elif not self._serve(req, at_limit=False):
                starved = True
                break
        if not starved:
            starved = self._serve_users()
        if starved:
            self._pressure()
        elif self._indebted:
            # Nobody waits any more: what holders still owe would only take backends
            # from their own sessions.
            self.on_relief(list(self._indebted))
            self._indebted.clear()

    def _serve_users(self) -> bool:
        """Serve users' requests in fairness order; True if some are left waiting."""
        blocked: set[str] = set()  # at their limit until one of their backends frees up
        while self.queues:
            held, conns, internal = self._usage()
            arrival = {
                u: q[0].since
                for u, q in self.queues.items()
                if u not in blocked and held.get(u, 0) < self.limit(u)
            }
            if not arrival:
                return True
            if len(arrival) == 1:
                user = next(iter(arrival))
            else:
                user = pick_user(held, self._user_shares(held, internal), arrival)
            req = self._next_request(self.queues[user])
            at_limit = conns.get(user, 0) >= self.limit(user)
            if req.cancelled:
                self._drop_waiter(req)
                continue
            if self._serve(req, at_limit):
                continue
            if at_limit:
                # Its own backends are resetting or being opened: not the others' concern.
                blocked.add(user)
                continue
            return True  # no backend and no room for the most under-served: nobody else fits
        return False

    def _next_request(self, q: deque[LeaseRequest]) -> LeaseRequest:
        """Which of a user's waiting requests comes next: the one whose holder has the
        fewest backends of its pool, oldest first among equals (a cancelled one at the
        head first, to be dropped). Between the user's workers this is max-min fairness
        at every grant: a backend given back by a worker above its share goes to the
        one below it, not back to the giver's own older request."""
        head = q[0]
        if len(q) == 1 or head.cancelled:
            return head
        held = self._holdings()
        best, fewest = head, held.get((head.owner, head.key), 0)
        for r in q:
            if fewest == 0:
                break
            n = held.get((r.owner, r.key), 0)
            if n < fewest and not r.cancelled:
                best, fewest = r, n
        return best

    def _serve(self, req: LeaseRequest, at_limit: bool) -> bool:
        """Take waiting ``req`` out of its queue and grant it an idle backend of its pool
        or open one (closing an idle backend of another pool to make room, or of the same
        user when it is ``at_limit``); False, leaving it queued, if none can be had."""
        b = self._idle_for(req.key)
        if b is not None:
            self._drop_waiter(req)
            self._grant(b, req)
            return True
        if self.total() < self.cap and not at_limit:
            self._drop_waiter(req)
            self._open_for(req)
            return True
        gone = self._evict_idle(keep=req.key, user=req.key[1] if at_limit else None)
        if gone is not None:
            self._drop_waiter(req)
            self._open_for(req, after=gone)
            return True
        return False

    def _pressure(self) -> None:
        """Someone waits and cannot be served: ask holders to give back.

        Every holder gives back the backends it keeps idle; holders above their fair
        share (see ``fair_excess``) give back that many more of the named pool as they
        come free. A holder already asked is asked again only once it has released
        something or PRESSURE_INTERVAL has passed, and we look again after that
        interval while anyone waits (a holder busy with its own clients sends nothing
        that would wake us).
        """
        now = time.monotonic()
        holders = {b.owner for b in self.backends.values() if b.state == "leased" and not b.internal}
        askable = [o for o in holders if now - self._asked.get(o, 0.0) >= PRESSURE_INTERVAL]
        if askable:
            asks: Reclaims = {o: {} for o in askable}
            for (o, key), n in self.excess().items():
                if o in asks:
                    asks[o][key] = n
            for o, debts in asks.items():
                self._asked[o] = now
                if debts:
                    self._indebted.add(o)
                else:
                    self._indebted.discard(o)
            self.on_pressure(asks)
        if self._pressure_timer is None:
            self._pressure_timer = self.loop.call_later(PRESSURE_INTERVAL, self._pressure_again)

    def _pressure_again(self) -> None:
        self._pressure_timer = None
        self._pump()

    def _holdings(self) -> dict[tuple[object, Key], int]:
        """Backends per (holder, pool): leased to users (not pgfleet's own, urgent ones)
        or being opened for them. What fair shares and grant order both count."""
        held: dict[tuple[object, Key], int] = {}
        for b in self.backends.values():
            if b.state == "leased" and not b.internal:
                row = (b.owner, b.key)
                held[row] = held.get(row, 0) + 1
        for r in self.opening_reqs:
            if not r.urgent and not r.cancelled:
                row = (r.owner, r.key)
                held[row] = held.get(row, 0) + 1
        return held

    def excess(self) -> dict[tuple[object, Key], int]:
        """For each (holder, pool), how many backends it holds beyond its fair share."""
        rows = {row: Demand(held=n) for row, n in self._holdings().items()}
        for q in self.queues.values():
            for r in q:
                d = rows.setdefault((r.owner, r.key), Demand())
                d.waiting += 1
                if d.oldest is None:
                    d.oldest = r.since
        _, _, internal = self._usage()
        return fair_excess(
            self._user_capacity(internal), rows, time.monotonic(), self.user_limits
        )

    def _idle_for(self, key: Key) -> PooledBackend | None:
        best = None
        for b in self.backends.values():
            if b.state == "idle" and b.key == key and (best is None or b.idle_since > best.idle_since):
                best = b
        return best

    def _evict_idle(self, keep: Key, user: str | None = None) -> asyncio.Future | None:
        """Close the longest-idle backend of another pool (of ``user``'s pools only, if
        given) to make room; returns a future done once it has exited, None if none."""
        victim = None
        for b in self.backends.values():
            if (
                b.state == "idle"
                and b.key != keep
                and (user is None or b.key[1] == user)
                and (victim is None or b.idle_since < victim.idle_since)
            ):
                victim = b
        if victim is None:
            return None
        return self._close(victim)

    def _grant(self, b: PooledBackend, req: LeaseRequest) -> None:
        self.loop.remove_reader(b.conn.sock.fileno())
        b.state = "leased"
        b.owner = req.owner
        b.internal = req.urgent
        try:
            req.grant(b)
        except Exception:
            log.exception("lease grant failed; closing backend %s", b.id)
            self._close(b)

    def _open_for(self, req: LeaseRequest, after: asyncio.Future | None = None) -> None:
        self.opening_reqs.add(req)
        self.loop.create_task(self._open(req, after))

    async def _open(self, req: LeaseRequest, after: asyncio.Future | None = None) -> None:
        database, user = req.key
        try:
            if after is not None:
                await after  # the backend closed to make room has exited

            conn = await open_backend(self.loop, self.socket_path, database, user)
        except BackendError as exc:
            self.opening_reqs.discard(req)
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
            self.opening_reqs.discard(req)
            log.exception("opening a backend failed")
            self.loop.call_later(RETRY_DELAY, self._retry, req)
            return
        self.opening_reqs.discard(req)
        self.opened_total += 1
        b = PooledBackend(next(self._ids), req.key, conn, state="resetting")
        if self._free_slots:
            b.slot = self._free_slots.pop()
            self.catalog.clear(b.slot)
        self.backends[b.id] = b
        if req.cancelled:
            self._make_idle(b)
            self._pump()
        else:
            self._grant(b, req)

    def _retry(self, req: LeaseRequest) -> None:
        if not req.cancelled:
            self._queue_of(req).appendleft(req)
            self._pump()

    async def _reset(self, b: PooledBackend) -> None:
        b.applied = {}
        if b.slot >= 0:
            self.catalog.clear(b.slot)
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

    def _close(self, b: PooledBackend) -> asyncio.Future:
        """Close ``b``; the future is done once its process has exited, as far as we can
        tell (an idle backend closes its end of the socket then), or at once."""
        done = self.loop.create_future()
        if self.backends.pop(b.id, None) is None:
            done.set_result(None)
            return done
        if b.slot >= 0:
            self._free_slots.append(b.slot)
            b.slot = -1
        self.closed_total += 1
        try:
            self.loop.remove_reader(b.conn.sock.fileno())
        except (ValueError, OSError):
            pass
        try:
            if b.state != "leased":
                b.conn.sock.sendall(fe.TERMINATE)
            else:
                # Mid-stream for all we know (a holder gave it up, or died): no Terminate,
                # an end of input is what the backend sees whatever it was reading.
                b.conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._await_exit(b.conn, done)
        return done

    def _await_exit(self, conn: BackendConn, done: asyncio.Future) -> None:
        """Close ``conn`` once the backend has closed its end (its process is exiting and
        has left pg_stat_activity), or after EXIT_WAIT; then set ``done``."""
        sock = conn.sock
        fd = sock.fileno()
        self.exiting += 1

        def finish() -> None:
            if done.done():
                return
            timer.cancel()
            try:
                self.loop.remove_reader(fd)
            except (ValueError, OSError):
                pass
            conn.close()
            done.set_result(None)
            self.exiting -= 1
            self.loop.call_soon(self._pump)  # its place in the cap is free now

        def readable() -> None:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                finish()

        timer = self.loop.call_later(EXIT_WAIT, finish)
        try:
            self.loop.add_reader(fd, readable)
        except (ValueError, OSError):
            finish()


# -- fairness, as pure functions ---------------------------------------------------------------
def water_fill(
    capacity: int, demand: Mapping[K, int], limits: Mapping[K, int] | None = None
) -> dict[K, int]:
    """Max-min fair integer shares of ``capacity``: nobody gets more than it asks for
    (nor more than its limit, if ``limits`` names it), and what the small askers leave
    is split evenly among the rest. Whole backends left over when the rest cannot be
    split evenly go to the smaller askers, then in ``demand``'s order."""
    share = {k: 0 for k in demand}
    if limits:
        demand = {k: min(d, limits[k]) if k in limits else d for k, d in demand.items()}
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


def tie_order(demand: Mapping[K, Demand], now: float) -> list[K]:
    """The order in which whole backends left over by water-filling are given out.

    First to whoever has waited longer than STARVE_AFTER (oldest first), so that
    nobody's share stays at zero for long; then to current holders, so that a tie
    does not move a backend at every turn; then to recent waiters, oldest first.
    """

    def rank(item: tuple[K, Demand]) -> tuple[int, float]:
        d = item[1]
        if d.oldest is not None and now - d.oldest > STARVE_AFTER:
            return (0, d.oldest)
        if d.held > 0:
            return (1, 0.0)
        return (2, d.oldest if d.oldest is not None else math.inf)

    return [k for k, _ in sorted(demand.items(), key=rank)]


def fair_shares(
    capacity: int,
    demand: Mapping[K, Demand],
    now: float,
    limits: Mapping[K, int] | None = None,
) -> dict[K, int]:
    """Water-fill ``capacity`` over held + waiting, leftovers in ``tie_order``."""
    ordered = {k: demand[k].held + demand[k].waiting for k in tie_order(demand, now)}
    return water_fill(capacity, ordered, limits)


def fair_excess(
    capacity: int,
    rows: Mapping[tuple[object, Key], Demand],
    now: float,
    limits: Mapping[str, int] | None = None,
) -> dict[tuple[object, Key], int]:
    """How many backends each (holder, pool) holds beyond its fair share.

    ``capacity`` is first water-filled over users (the user of a pool is its key's
    second part; a user's rows add up, and its demand is capped by its limit), then
    each user's share over that user's rows. Only rows above their share appear.
    """
    by_user: dict[str, dict[tuple[object, Key], Demand]] = {}
    users: dict[str, Demand] = {}
    for row, d in rows.items():
        user = row[1][1]
        by_user.setdefault(user, {})[row] = d
        users.setdefault(user, Demand()).add(d)
    excess: dict[tuple[object, Key], int] = {}
    for user, share in fair_shares(capacity, users, now, limits).items():
        mine = by_user[user]
        for row, s in fair_shares(share, mine, now).items():
            if mine[row].held > s:
                excess[row] = mine[row].held - s
    return excess


def pick_user(
    held: Mapping[str, int], share: Mapping[str, int], arrival: Mapping[str, float]
) -> str | None:
    """Who is served next among the users in ``arrival`` (those with a request that
    may be served, mapped to when their oldest one arrived): the most under-served,
    i.e. the lowest held/share ratio (no share counts as infinitely served), ties
    by arrival."""

    def rank(user: str) -> tuple[float, float]:
        s = share.get(user, 0)
        ratio = held.get(user, 0) / s if s > 0 else math.inf
        return (ratio, arrival[user])

    return min(arrival, key=rank, default=None)
