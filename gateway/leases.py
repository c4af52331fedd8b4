"""The worker's backends: a small cache of leased links, and sessions waiting for one.

A backend returned by a session stays leased to this worker for a little while,
so the next transaction costs no IPC. Idle links go back to the pooler after
``lease_idle_seconds``, or when the pooler asks (it has waiters it cannot serve)
and this worker does not want more of that pool itself. Waiting sessions are backed by lease
requests at the pooler (one each, at most the pool's size per pool), so the pooler's
queue decides who is next across workers. Requests nobody needs any more are
withdrawn by the sweep, twice a second, not at every hand-over.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from pgwire import frontend as fe

from .backend import K_EXEC, K_QUERY, K_SYNC, BackendLink

if TYPE_CHECKING:
    from .session import Session
    from .worker import Worker

Key = tuple[str, str]

DRAIN_TIMEOUT = 10.0
# An idle link is spare, to be given back when the pooler has waiters, once it has not
# been used for this long (the pooler asks again at most every 50 ms).
SPARE_AFTER = 0.05


class LeaseManager:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.idle: dict[Key, list[BackendLink]] = {}
        self.waiters: dict[Key, deque[Session]] = {}
        self.requests: dict[int, Key] = {}  # lease requests outstanding at the pooler
        # The same, per key, oldest first. At most the pool's size per key: the pooler's
        # fair shares never give one user more, so more would only be bookkeeping.
        self.requests_of: dict[Key, dict[int, None]] = {}
        self.max_requests = max(1, worker.cfg.pool_size)
        # Leases granted whose socket is being set up: they will serve a waiter too.
        self.adopting: dict[Key, int] = {}
        self.held: set[BackendLink] = set()  # every live link this worker holds
        self._req_ids = itertools.count(1)
        # Backends the pooler asked us to give back as they come free, per pool (another
        # user or worker is short of its fair share).
        self.debt: dict[Key, int] = {}
        # Lease requests and withdrawals are batched per key and sent once per loop turn.
        self._to_request: dict[Key, list[int]] = {}
        self._to_cancel: list[int] = []
        self._flush_scheduled = False
        self._sweeper = self.loop.call_later(0.5, self._sweep)

    # -- sessions asking ---------------------------------------------------------------------
    def acquire(self, key: Key, session: Session) -> BackendLink | None:
        """A link for ``key`` now, or None and ``session.on_link`` is called later."""
        links = self.idle.get(key)
        if links:
            link = _take(links, session)
            if link is not None:
                return link
        self.waiters.setdefault(key, deque()).append(session)
        self._request(key)
        return None

    def take_idle(self, key: Key, session: Session) -> BackendLink | None:
        """An idle link for ``key`` if there is one (never queues the caller)."""
        links = self.idle.get(key)
        return _take(links, session) if links else None

    def cancel_wait(self, key: Key, session: Session) -> None:
        q = self.waiters.get(key)
        if q is None:
            return
        try:
            q.remove(session)
        except ValueError:
            return
        if not q:
            self._trim_requests(key)

    def put_back(self, link: BackendLink, fresh: bool = False) -> None:
        """A session is done with ``link`` (ReadyForQuery idle, nothing outstanding).

        ``fresh`` links just arrived from the pooler for a lease request of ours, so
        they go to a waiting session even when the pooler is asking for links back.
        """
        if link.dead:
            self.discard(link)
            return
        if link.needs_reset:
            self._pay_debt(link.key)
            self.release(link, "dirty")
            return
        q = self.waiters.get(link.key)
        if not fresh and self._pay_debt(link.key):
            self.release(link, "clean")
            return
        if q:
            # Lease requests no session needs any more are left to the sweep: under
            # steady load the queue empties and fills again with every few transactions,
            # and withdrawing and renewing them each time would be messages to the pooler.
            q.popleft().on_link(link)
            return
        link.idle_since = time.monotonic()
        self.idle.setdefault(link.key, []).append(link)

    def discard(self, link: BackendLink) -> None:
        self.release(link, "dead")

    # -- leaving sessions --------------------------------------------------------------------
    def abandon(self, link: BackendLink, dirty: bool) -> None:
        """The client left while holding ``link``: finish or roll back its work, then reuse."""
        link.session = None
        if link.dead:
            self.discard(link)
            return
        if dirty:
            link.needs_reset = True
        if not link.queue and link.status == "I" and not link.copy_in:
            self.put_back(link)
            return
        link.draining = True
        link.drain_rollbacks = 0
        if link.copy_in:
            link.write(fe.encode_copy_fail("client disconnected"))
        if _unsynced(link):
            link.write(fe.SYNC)
            link.expect(K_SYNC)
        if any(e.swallow == 0 and e.kind in (K_QUERY, K_EXEC) for e in link.queue):
            # Stop the client's statement rather than wait for it. The backend is not
            # reused before Postgres has taken the cancel (drain_progress waits), so a
            # late signal cannot hit the next session's query.
            link.needs_reset = True
            link.cancel_task = self.worker.send_cancel(link.pid, link.secret)
        link.flush()
        link.drain_timer = self.loop.call_later(DRAIN_TIMEOUT, self._drain_timeout, link)
        self.drain_progress(link)

    def drain_progress(self, link: BackendLink) -> None:
        if link.dead:
            self._end_drain(link)
            self.discard(link)
            return
        if link.queue:
            return
        if link.status != "I":
            if link.drain_rollbacks >= 3:
                self._end_drain(link)
                link.close()
                self.discard(link)
                return
            link.drain_rollbacks += 1
            link.expect(K_QUERY, swallow=True)
            link.write(fe.encode_query("ROLLBACK"))
            link.flush()
            return
        task = link.cancel_task
        if task is not None and not task.done():
            task.add_done_callback(lambda _t: link.draining and self.drain_progress(link))
            return
        link.cancel_task = None
        self._end_drain(link)
        self.put_back(link)

    def _end_drain(self, link: BackendLink) -> None:
        link.draining = False
        t = link.drain_timer
        if t is not None:
            t.cancel()
            link.drain_timer = None

    def _drain_timeout(self, link: BackendLink) -> None:
        link.drain_timer = None
        if link.draining:
            link.draining = False
            link.close()
            self.discard(link)

    # -- the pooler side ---------------------------------------------------------------------
    def _request(self, key: Key) -> None:
        """One more session of ``key`` waits: ask the pooler for one more backend,
        unless as many requests as the pool has backends are out already."""
        mine = self.requests_of.setdefault(key, {})
        if len(mine) >= self.max_requests:
            return
        rid = next(self._req_ids)
        self.requests[rid] = key
        mine[rid] = None
        self._to_request.setdefault(key, []).append(rid)
        self._schedule_flush()

    def _answered(self, rid: int) -> Key | None:
        key = self.requests.pop(rid, None)
        if key is not None:
            mine = self.requests_of.get(key)
            if mine is not None:
                mine.pop(rid, None)
        return key

    def _wanted(self, key: Key) -> int:
        """Requests ``key`` should have out: one per waiting session (up to the pool's
        size), less the granted leases still being set up."""
        return min(len(self.waiters.get(key) or ()), self.max_requests) - self.adopting.get(key, 0)

    def _top_up(self, key: Key) -> None:
        for _ in range(self._wanted(key) - len(self.requests_of.get(key) or ())):
            self._request(key)

    def _trim_requests(self, key: Key) -> None:
        """Withdraw lease requests that no waiting session needs any more."""
        want = max(0, self._wanted(key))
        mine = self.requests_of.get(key)
        if not mine or len(mine) <= want:
            return
        unsent = self._to_request.get(key) or []
        for rid in list(mine)[want:]:
            del mine[rid]
            del self.requests[rid]
            if rid in unsent:
                unsent.remove(rid)
            else:
                self._to_cancel.append(rid)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_requests)

    def _flush_requests(self) -> None:
        self._flush_scheduled = False
        send = self.worker.pooler.send
        if self._to_cancel:
            send({"op": "cancel_lease", "reqs": self._to_cancel})
            self._to_cancel = []
        for key, rids in self._to_request.items():
            if rids:
                send({"op": "lease", "reqs": rids, "db": key[0], "user": key[1]})
        self._to_request = {}

    def on_leased(self, msg: dict, fds: list[int]) -> None:
        key = self._answered(int(msg["req"]))
        if key is None:
            key = (str(msg.get("db", "")), str(msg.get("user", "")))
        if not fds:
            return
        self.adopting[key] = self.adopting.get(key, 0) + 1
        self.worker.spawn(self._adopt(msg, fds[0], key))
        for extra in fds[1:]:
            os.close(extra)

    async def _adopt(self, msg: dict, fd: int, key: Key) -> None:
        sock = socket.socket(fileno=fd)
        link = BackendLink(msg, key, self)
        try:
            await self.loop.create_unix_connection(lambda: link, sock=sock)
        except Exception:
            self._adopted(key)
            sock.close()
            self.worker.pooler.send({"op": "release", "id": link.id, "state": "dead"})
            if self.waiters.get(key):
                self._request(key)
            return
        self._adopted(key)
        self.held.add(link)
        self.put_back(link, fresh=True)
        self._top_up(key)

    def _adopted(self, key: Key) -> None:
        n = self.adopting.get(key, 0) - 1
        if n > 0:
            self.adopting[key] = n
        else:
            self.adopting.pop(key, None)

    def on_lease_failed(self, msg: dict) -> None:
        key = self._answered(int(msg["req"]))
        if key is None:
            return
        q = self.waiters.get(key)
        if q:
            q.popleft().on_lease_failed(msg.get("error") or {})
            self._top_up(key)

    def reclaim(self, debts: dict[Key, int], spare: bool = True) -> None:
        """The pooler has waiters it cannot serve, or had and has no more.

        ``debts``: for each pool in which we hold more links than our fair share
        (another user, or this user on another worker, is short), how many. We give
        back its idle links now and the rest as sessions finish with them, instead of
        handing them to our own sessions waiting for that pool. This replaces what we
        owed before: the pooler says what is owed as of now, and an empty ``debts``
        once nobody waits, so a debt paid elsewhere is not paid twice. Unless told
        nobody waits (``spare`` False), we also give back the spare idle links of pools
        we have no lease request out for (another worker may wait for one).
        """
        owed: dict[Key, int] = {}
        for key, count in debts.items():
            links = self.idle.get(key) or []
            while links and count > 0:
                self.release(links.pop(), "clean")
                count -= 1
            if count > 0:
                owed[key] = count
        self.debt = owed
        if not spare:
            return
        # Not the links of a pool we still ask more of, nor links idle only for a moment:
        # under steady load a link sits idle between two of our transactions, and
        # handing it over then would only pass backends back and forth between workers.
        # The idle list is used last-in first-out, so links we do not need age at its
        # bottom.
        spare_before = time.monotonic() - SPARE_AFTER
        for k, links in self.idle.items():
            if not self.requests_of.get(k):
                while links and links[0].idle_since < spare_before:
                    self.release(links.pop(0), "clean")

    def _pay_debt(self, key: Key) -> bool:
        """True if a link of ``key`` coming free is owed to the pooler (and count it)."""
        if not self.debt:  # the usual case, on every transaction's release
            return False
        n = self.debt.get(key, 0)
        if n <= 0:
            return False
        if n > 1:
            self.debt[key] = n - 1
        else:
            del self.debt[key]
        return True

    def retire(self, key: Key) -> None:
        """The pool's role/database defaults changed: stop reusing its backends here;
        idle ones go back now, busy ones when their session is done (the pooler closes them)."""
        for link in list(self.idle.get(key) or ()):
            self.release(link, "clean")
        for link in self.held:
            if link.key == key:
                link.needs_reset = True

    def release(self, link: BackendLink, state: str) -> None:
        """Give ``link`` back to the pooler and close our copy of its socket."""
        if link in self.held:
            self.held.discard(link)
        else:
            return
        links = self.idle.get(link.key)
        if links and link in links:
            links.remove(link)
        if link.dead and state != "dead":
            state = "dead"
        link.released = True
        if state != "dead":
            if link.slot >= 0:
                # Before the release message: the next holder reads it after the grant.
                self.worker.catalog.store(link.slot, link.prepared.keys())
            elif len(link.prepared) and state == "clean":
                state = "dirty"  # nowhere to say what is prepared on it: reset it
        self.worker.pooler.send(
            {
                "op": "release",
                "id": link.id,
                "state": state,
                "params": link.reported,
                "applied": link.applied,
            }
        )
        link.close()

    def link_lost(self, link: BackendLink) -> None:
        """A link we hold died on its own (backend exited, Postgres restarted)."""
        if not link.released:
            self.release(link, "dead")

    def _sweep(self) -> None:
        # First, so that nothing below can stop the sweeps (and with them wait timeouts).
        self._sweeper = self.loop.call_later(0.5, self._sweep)
        timeout = self.worker.cfg.query_wait_timeout
        if timeout > 0:
            # Waits end here, at most a sweep late (PgBouncer checks once a second): a
            # timer per wait cost more than the rest of a short wait's bookkeeping.
            # Each queue is in order of wait_since, so only its oldest are looked at.
            started_before = self.loop.time() - timeout
            for q in list(self.waiters.values()):
                while q and q[0].wait_since <= started_before:
                    q.popleft().wait_expired()
        now = time.monotonic()
        limit = self.worker.cfg.lease_idle_seconds
        for links in self.idle.values():
            for link in [lk for lk in links if now - lk.idle_since > limit or lk.dead]:
                self.release(link, "dead" if link.dead else "clean")
        for key in list(self.requests_of):
            self._trim_requests(key)

    def close_all(self) -> None:
        self._sweeper.cancel()
        for link in list(self.held):
            self.release(link, "dirty")


def _unsynced(link: BackendLink) -> bool:
    """True if extended-protocol messages were sent after the last Sync."""
    for e in reversed(link.queue):
        if e.kind == K_SYNC:
            return False
        if e.kind != K_QUERY:
            return True
    return False


def _take(links: list[BackendLink], session: Session) -> BackendLink | None:
    """The idle link ``session`` should have: the one its INSERT left its sequence state
    on, if it is idle here; else the newest (last in, first out: the fewest backends
    stay busy) that holds no other connected session's; else the newest. A session's
    autocommit INSERT and the lastval() after it so run on one backend whenever another
    idle one can serve everybody else; under contention the value may be gone, and
    the session then gets 55000 (Session._own_sequences), never another's value."""
    own = session.last_link
    if (own is not None and own.seq_fresh and own.seq_owner is session and own.session is None
            and not own.dead):
        if links[-1] is own:
            return links.pop()
        if own in links:
            links.remove(own)
            return own
    while links:
        link = links[-1]
        if link.dead:
            links.pop()
            continue
        if not link.seq_fresh:
            return links.pop()
        for i in range(len(links) - 2, -1, -1):
            other = links[i]
            if not other.seq_fresh and not other.dead:
                del links[i]
                return other
        return links.pop()
    return None
