"""Role and database facts the gateways need to log clients in, fetched from the catalogs.

Cached per (user, database) for a few seconds, so that a burst of logins costs
one catalog query; a refused login invalidates the entry at once, so that a new
or changed role works without a restart. A change made through pgfleet (ALTER
ROLE, ALTER DATABASE, ... in a session) drops the whole cache before the next
login: the workers count such transactions in shared memory. A change made
straight on Postgres can take up to ``ttl`` seconds to be seen (a password change
or NOLOGIN to refuse a login that the old verifier still accepts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pgwire.quoting import quote_literal

from .pool import LeaseRequest, PooledBackend, PoolManager

ADMIN_KEY = ("postgres", "postgres")

_LOOKUP_SQL = (
    "SELECT r.rolpassword, r.rolcanlogin, "
    "(r.rolvaliduntil IS NOT NULL AND r.rolvaliduntil < now()), "
    "d.datallowconn, r.rolname IS NOT NULL, d.datname IS NOT NULL, "
    # ALTER ROLE/DATABASE ... SET defaults that apply to this (user, database)
    "(SELECT string_agg(array_to_string(s.setconfig, E'\\x01'), E'\\x02' "
    "ORDER BY s.setdatabase, s.setrole) FROM pg_catalog.pg_db_role_setting s "
    "WHERE s.setrole IN (r.oid, 0) AND s.setdatabase IN (d.oid, 0)), "
    # When this backend last read the configuration files: a reload changes the values
    # new sessions report (TimeZone, ...).
    "pg_catalog.pg_conf_load_time(), "
    # Which role and database the names stand for: a role dropped and created again
    # under its name is another role, which the old one's backends cannot serve.
    "r.oid, d.oid, "
    # CONNECT on the database, which Postgres checks when a backend starts: a pooled
    # backend started before a REVOKE must not let the role in.
    "COALESCE(pg_catalog.has_database_privilege(r.oid, d.oid, 'CONNECT'), false) "
    "FROM (SELECT 1) AS one "
    "LEFT JOIN pg_catalog.pg_authid r ON r.rolname = {user} "
    "LEFT JOIN pg_catalog.pg_database d ON d.datname = {db}"
)


def _bool(v: bytes | None) -> bool:
    return v == b"t"


class AuthCache:
    def __init__(
        self,
        pool: PoolManager,
        ttl: float = 5.0,
        on_defaults_changed: Callable[[str, str], None] = lambda db, user: None,
        on_facts_changed: Callable[[], None] = lambda: None,
        changed_by_sessions: Callable[[], int] = lambda: 0,
        on_starts_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        # What backends of a key start as, last seen: the role and database OIDs and the
        # ALTER ROLE/DATABASE ... SET defaults. Backends opened before a change still
        # carry the old ones, so the pooler retires them.
        self._starts_as: dict[tuple[str, str], tuple] = {}
        self.on_defaults_changed = on_defaults_changed
        # Workers keep facts too, until this says they may have changed (a shared epoch).
        self.on_facts_changed = on_facts_changed
        self._entries: dict[tuple[str, str], tuple[float, dict]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task] = {}
        # The workers' count of sessions that changed roles, databases or the server's
        # configuration, as last seen.
        self.changed_by_sessions = changed_by_sessions
        self._sessions_seen = changed_by_sessions()
        # Called when what every new session starts from may have changed (that count
        # moved, or Postgres reloaded its configuration): status reports are stale.
        self.on_starts_changed = on_starts_changed
        self._conf_loaded: bytes | None = None

    def invalidate(self, user: str) -> None:
        for k in [k for k in self._entries if k[0] == user]:
            del self._entries[k]
        self.on_facts_changed()

    async def lookup(self, user: str, database: str, refresh: bool = False) -> dict:
        """Facts for a login. An expired entry is still served while a refresh runs in
        the background: the refresh needs a backend, and when every backend is busy a
        login should not wait for one. Entries removed by a refused login are not."""
        seen = self.changed_by_sessions()
        if seen != self._sessions_seen:
            # A session changed roles, databases or the configuration: nothing cached
            # is known to hold.
            # (The workers dropped what they kept when the count moved.)
            self._sessions_seen = seen
            self._entries.clear()
            self._inflight.clear()  # (what they fetch may predate the change)
            self.on_starts_changed()
        key = (user, database)
        hit = self._entries.get(key)
        if hit is not None and not refresh:
            if time.monotonic() - hit[0] >= self.ttl:
                self._start_fetch(key)
            return hit[1]
        return await asyncio.shield(self._start_fetch(key))

    def _start_fetch(self, key: tuple[str, str]) -> asyncio.Task:
        """One catalog query per key at a time, however many logins ask."""
        task = self._inflight.get(key)
        if task is None:
            task = self.pool.loop.create_task(self._fetch_and_store(key))
            # A background refresh may fail with nobody awaiting it; that is fine.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._inflight[key] = task
        return task

    async def _fetch_and_store(self, key: tuple[str, str]) -> dict:
        me = asyncio.current_task()
        sessions_before = self.changed_by_sessions()
        try:
            info = await self._fetch(*key)
        finally:
            if self._inflight.get(key) is me:
                del self._inflight[key]
        conf_loaded = info.pop("conf_loaded")
        oids = info.pop("oids")
        if self.changed_by_sessions() != sessions_before:
            return info  # a session changed roles meanwhile: answer, but keep nothing
        if self._conf_loaded != conf_loaded:
            if self._conf_loaded is not None:
                self.on_starts_changed()  # reloaded straight on Postgres (pg_ctl reload, ...)
            self._conf_loaded = conf_loaded
        if info["role_exists"] and info["db_exists"]:
            old = self._entries.get(key)
            self._entries[key] = (time.monotonic(), info)
            if old is not None and old[1] != info:
                self.on_facts_changed()
            starts_as = (oids, info["role_settings"])
            seen = self._starts_as.get(key)
            self._starts_as[key] = starts_as
            if seen is not None and seen != starts_as:
                self.on_defaults_changed(key[1], key[0])
        return info

    async def _fetch(self, user: str, database: str) -> dict:
        loop = self.pool.loop
        fut: asyncio.Future[PooledBackend] = loop.create_future()

        def grant(b: PooledBackend) -> None:
            if fut.done():
                self.pool.release(b.id, "clean")
            else:
                fut.set_result(b)

        def fail(fields: dict[str, str]) -> None:
            if not fut.done():
                fut.set_exception(RuntimeError(fields.get("M", "lookup failed")))

        req = LeaseRequest(ADMIN_KEY, grant, fail, owner=self)
        self.pool.request(req, urgent=True)
        try:
            b = await asyncio.wait_for(fut, 30.0)
        except BaseException:
            self.pool.cancel(req)
            raise
        state = "dead"
        try:
            sql = _LOOKUP_SQL.format(user=quote_literal(user), db=quote_literal(database))
            rows = await b.conn.query(loop, sql)
            state = "clean"
        finally:
            self.pool.release(b.id, state)
        row = rows[0]
        return {
            "password": row[0].decode() if row[0] is not None else None,
            "can_login": _bool(row[1]),
            "expired": _bool(row[2]),
            "db_allow_conn": _bool(row[3]),
            "db_connect": _bool(row[10]),
            "role_exists": _bool(row[4]),
            "db_exists": _bool(row[5]),
            "role_settings": row[6].decode() if row[6] is not None else "",
            "conf_loaded": row[7],
            "oids": (row[8], row[9]),
        }
