"""The LISTEN hub: one listening backend per database, shared by every client session.

A session that LISTENs would otherwise pin a backend for as long as it listens.
Instead the pooler keeps one connection per database that LISTENs on the union of
the channels any session listens on, and hands each notification to the workers
that asked for its channel; they deliver it to their sessions.

A worker's ``listen`` is answered only once the hub's own LISTEN has completed,
so a notification committed after the client saw its LISTEN succeed is never
missed. If the hub connection dies it is reopened and every channel LISTENed
again; notifications committed in that window are lost (Postgres queues them
only for listeners that exist).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Hashable

from pgwire import frontend as fe
from pgwire.backend import decode_backend
from pgwire.quoting import quote_ident

from .connect import BackendConn, BackendError, open_backend

log = logging.getLogger("pgfleet.pooler")

HUB_USER = "postgres"
RETRY_DELAY = 0.5
_PID = struct.Struct("!i")


class HubConnection:
    """The listening connection of one database: commands in order, notifications out."""

    def __init__(self, hub: ListenHub, database: str) -> None:
        self.hub = hub
        self.database = database
        self.conn: BackendConn | None = None
        self.waiters: deque[asyncio.Future] = deque()  # one per command sent, in order
        self.error: dict[str, str] | None = None
        self.ready: asyncio.Future = hub.loop.create_future()
        self.listening: set[bytes] = set()
        self.closed = False
        self.task = hub.loop.create_task(self._run())

    async def command(self, sql: str) -> None:
        """Run one LISTEN/UNLISTEN once connected; raises BackendError if Postgres refuses."""
        while True:
            await asyncio.shield(self.ready)
            conn = self.conn
            if conn is None:
                continue
            fut = self.hub.loop.create_future()
            self.waiters.append(fut)
            try:
                await self.hub.loop.sock_sendall(conn.sock, fe.encode_query(sql))
            except OSError:
                pass  # the reader sees the loss and fails the waiters
            ok = await fut
            if ok is None:
                continue  # the connection was lost before the answer: again on the next one
            if ok is not True:
                raise BackendError(ok, False)
            return

    async def _run(self) -> None:
        loop = self.hub.loop
        while not self.closed:
            try:
                self.conn = await open_backend(
                    loop, self.hub.socket_path, self.database, HUB_USER,
                    application_name="pgfleet listen hub",
                )
            except BackendError as exc:
                if not exc.transient:
                    # (The database was dropped, say.) Those waiting get the error.
                    log.error("listen hub for %s: %s", self.database, exc)
                    if not self.ready.done():
                        self.ready.set_exception(exc)
                        self.ready.exception()  # retrieved: nobody may be waiting
                    self.ready = loop.create_future()
                await asyncio.sleep(RETRY_DELAY)
                continue
            # Channels wanted before the connection (re)opened are LISTENed first.
            wanted = [ch for ch in self.hub.channels_of(self.database)]
            if wanted:
                sql = ";".join(f"LISTEN {quote_ident(ch.decode('utf-8', 'replace'))}"
                               for ch in wanted)
                await loop.sock_sendall(self.conn.sock, fe.encode_query(sql))
                self.waiters.append(loop.create_future())
            if not self.ready.done():
                self.ready.set_result(None)
            try:
                await self._read(self.conn)
            except (BackendError, OSError) as exc:
                if not self.closed:
                    log.warning("listen hub for %s lost its backend (%s); reconnecting",
                                self.database, exc)
            self.conn.close()
            self.conn = None
            if self.ready.done():
                self.ready = loop.create_future()
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
            if not self.closed:
                await asyncio.sleep(RETRY_DELAY)

    async def _read(self, conn: BackendConn) -> None:
        loop = self.hub.loop
        while True:
            mtype, payload = await conn.read_message(loop)
            if mtype == 0x41:  # NotificationResponse
                (pid,) = _PID.unpack_from(payload)
                end = payload.index(b"\x00", 4)
                channel = payload[4:end]
                self.hub.deliver(self.database, channel, payload[end + 1 : -1], pid)
            elif mtype == 0x45:
                self.error = decode_backend(mtype, payload).fields
            elif mtype == 0x5A:
                result, self.error = (self.error or True), None
                if self.waiters:
                    fut = self.waiters.popleft()
                    if not fut.done():
                        fut.set_result(result)

    def close(self) -> None:
        self.closed = True
        self.task.cancel()
        if self.conn is not None:
            self.conn.close()


class ListenHub:
    """Which holder (a worker link) wants which (database, channel), and the connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, socket_path: str,
                 deliver: Callable[[Hashable, str, bytes, bytes, int], None]) -> None:
        self.loop = loop
        self.socket_path = socket_path
        self._deliver = deliver
        self.interest: dict[tuple[str, bytes], set[Hashable]] = {}
        self.conns: dict[str, HubConnection] = {}

    def channels_of(self, database: str) -> list[bytes]:
        return [ch for (db, ch), who in self.interest.items() if db == database and who]

    async def listen(self, database: str, channel: bytes, holder: Hashable) -> None:
        """Make sure the hub listens on ``channel`` before returning; raises BackendError."""
        key = (database, channel)
        holders = self.interest.setdefault(key, set())
        first = not holders
        holders.add(holder)
        conn = self.conns.get(database)
        if conn is None:
            conn = self.conns[database] = HubConnection(self, database)
        try:
            # Every caller runs the (idempotent) LISTEN: its completion is the proof.
            await conn.command(f"LISTEN {quote_ident(channel.decode('utf-8', 'replace'))}")
        except BackendError:
            if first:
                self.unlisten(database, channel, holder)
            raise

    def unlisten(self, database: str, channel: bytes, holder: Hashable) -> None:
        key = (database, channel)
        holders = self.interest.get(key)
        if holders is None:
            return
        holders.discard(holder)
        if holders:
            return
        del self.interest[key]
        conn = self.conns.get(database)
        if conn is None:
            return
        if not any(db == database for db, _ in self.interest):
            del self.conns[database]  # nobody listens here any more: close it
            conn.close()
            return
        task = self.loop.create_task(
            conn.command(f"UNLISTEN {quote_ident(channel.decode('utf-8', 'replace'))}")
        )
        task.add_done_callback(_ignore_result)

    def holder_gone(self, holder: Hashable) -> None:
        for database, channel in [k for k, who in self.interest.items() if holder in who]:
            self.unlisten(database, channel, holder)

    def deliver(self, database: str, channel: bytes, payload: bytes, pid: int) -> None:
        for holder in self.interest.get((database, channel), ()):
            self._deliver(holder, database, channel, payload, pid)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


def _ignore_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
