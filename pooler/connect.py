"""Opening Postgres backend connections and talking to them while the pooler owns them.

The pooler speaks to a backend only when it opens, resets or queries it; while a
worker holds the lease the pooler never reads the socket.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.errors import error_fields
from pgwire.framing import MessageFramer

# Errors on which retrying later makes sense (Postgres starting, restarting, full).
TRANSIENT_SQLSTATES = {
    sqlstate.CANNOT_CONNECT_NOW,
    sqlstate.TOO_MANY_CONNECTIONS,
    sqlstate.ADMIN_SHUTDOWN,
    sqlstate.CRASH_SHUTDOWN,
    sqlstate.CONNECTION_FAILURE,
}


class BackendError(Exception):
    """A backend refused or failed; ``fields`` is a Postgres error field dict."""

    def __init__(self, fields: dict[str, str], transient: bool) -> None:
        super().__init__(fields.get("M", "backend error"))
        self.fields = fields
        self.transient = transient


def _failure(message: str) -> dict[str, str]:
    return error_fields("FATAL", sqlstate.CONNECTION_FAILURE, message)


@dataclass
class BackendConn:
    """A backend socket plus what its startup told us."""

    sock: socket.socket
    pid: int = 0
    secret: int = 0
    params: dict[str, str] = field(default_factory=dict)
    framer: MessageFramer = field(default_factory=lambda: MessageFramer(frontend=False))

    async def read_message(self, loop: asyncio.AbstractEventLoop) -> tuple[int, bytes]:
        while True:
            msg = self.framer.next_message()
            if msg is not None:
                return msg[0], msg[1]
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise BackendError(_failure("server closed the connection unexpectedly"), True)
            self.framer.feed(data)

    async def query(self, loop: asyncio.AbstractEventLoop, sql: str) -> list[list[bytes | None]]:
        """Run a simple query; return the rows of its last result; raise on error."""
        await loop.sock_sendall(self.sock, fe.encode_query(sql))
        rows: list[list[bytes | None]] = []
        error: dict[str, str] | None = None
        while True:
            mtype, payload = await self.read_message(loop)
            if mtype == 0x54:  # RowDescription: a new result set starts
                rows = []
            elif mtype == 0x44:
                rows.append(be.decode_backend(mtype, payload).values)
            elif mtype == 0x45:
                error = be.decode_backend(mtype, payload).fields
            elif mtype == 0x53:
                ps = be.decode_backend(mtype, payload)
                self.params[ps.name] = ps.value
            elif mtype == 0x5A:
                if error is not None:
                    raise BackendError(error, False)
                return rows
            elif mtype in (0x47, 0x48):  # COPY in/out: not something we ever start
                raise BackendError(_failure("unexpected COPY from backend"), False)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


async def open_backend(
    loop: asyncio.AbstractEventLoop,
    socket_path: str,
    database: str,
    user: str,
    application_name: str = "",
    timeout: float = 10.0,
) -> BackendConn:
    """Connect over Postgres's Unix socket and run the startup handshake (trust auth)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    conn = BackendConn(sock)
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise BackendError(_failure(f"could not connect to Postgres: {exc}"), True) from exc
            params = {"user": user, "database": database}
            if application_name:
                params["application_name"] = application_name
            await loop.sock_sendall(sock, fe.encode_startup(params))
            while True:
                mtype, payload = await conn.read_message(loop)
                if mtype == 0x52:
                    auth = be.decode_backend(mtype, payload)
                    if auth.code != 0:
                        raise BackendError(
                            _failure("Postgres asked pgfleet's pooler for a password on its "
                                     "private Unix socket; it must trust local connections"),
                            False,
                        )
                elif mtype == 0x53:
                    ps = be.decode_backend(mtype, payload)
                    conn.params[ps.name] = ps.value
                elif mtype == 0x4B:
                    key = be.decode_backend(mtype, payload)
                    conn.pid, conn.secret = key.pid, key.secret
                elif mtype == 0x45:
                    fields = be.decode_backend(mtype, payload).fields
                    raise BackendError(fields, fields.get("C") in TRANSIENT_SQLSTATES)
                elif mtype == 0x5A:
                    return conn
    except TimeoutError as exc:
        conn.close()
        raise BackendError(_failure("timed out connecting to Postgres"), True) from exc
    except BackendError:
        conn.close()
        raise
    except OSError as exc:
        conn.close()
        raise BackendError(_failure(f"could not connect to Postgres: {exc}"), True) from exc
