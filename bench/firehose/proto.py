"""Just enough of the Postgres v3 protocol, client side, for a load generator.

A driver (psycopg, asyncpg) costs far more memory and CPU per connection than a
load generator holding tens of thousands of mostly idle connections can afford. One
connection here is one ``asyncio.Protocol`` with a byte buffer: it logs in (trust,
cleartext, md5 or SCRAM-SHA-256, as the server asks), then runs one request at a
time and reports the outcome through a callback at ReadyForQuery. Results are not
decoded unless asked for (setup and sampling queries want them; load queries do not).

SCRAM: ``scramp`` builds the client-first message and checks the server-first one
(nonce, salt, iteration count); the PBKDF2 result for a (password, salt, iterations)
is cached per process, so a process that logs in 10,000 times runs PBKDF2 once.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scramp import ScramClient
from scramp.core import Nonce
from scramp.utils import ScramException

from pgwire.auth import md5_client_response, scram_keys, xor_key

PROTOCOL_V3 = 196608
TERMINATE = b"X\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"
_EXECUTE_UNNAMED_ALL = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


class PgError(Exception):
    """An ErrorResponse from the server, or a protocol/connection problem (``code`` '')."""

    def __init__(self, message: str, code: str = "", severity: str = "ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.severity = severity

    @property
    def kind(self) -> str:
        """A short, stable key for counting failures by kind."""
        return f"{self.code} {self.message}" if self.code else self.message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message


class ConnectionLost(PgError):
    """The server closed the connection (or it was reset) before the reply was complete."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str | None
    database: str
    application_name: str = "pgfleet-firehose"


# ----------------------------------------------------------------------------- messages


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def _msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + _I32.pack(len(body) + 4) + body


def startup_message(creds: Credentials) -> bytes:
    params = {
        "user": creds.user,
        "database": creds.database,
        "application_name": creds.application_name,
        "client_encoding": "UTF8",
    }
    body = _I32.pack(PROTOCOL_V3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items())
    body += b"\x00"
    return _I32.pack(len(body) + 4) + body


def simple_query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def extended_query(sql: str, params: Sequence[str | None] = ()) -> bytes:
    """Parse + Bind + Execute + Sync on the unnamed statement, text parameters and results."""
    parse = _msg(b"P", b"\x00" + _cstr(sql) + _I16.pack(0))
    parts = [b"\x00\x00", _I16.pack(0), _I16.pack(len(params))]
    for value in params:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            raw = value.encode()
            parts.append(_I32.pack(len(raw)) + raw)
    parts.append(_I16.pack(0))
    bind = _msg(b"B", b"".join(parts))
    return parse + bind + _EXECUTE_UNNAMED_ALL + SYNC


def _password_message(data: bytes) -> bytes:
    return _msg(b"p", data)


def _error_fields(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def md5_response(password: str, user: str, salt: bytes) -> bytes:
    return md5_client_response(password, user, salt).encode()


# ----------------------------------------------------------------------------- SCRAM


@functools.lru_cache(maxsize=64)
def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(client key, stored key, server key) for a password: the PBKDF2 that a load
    generator must not repeat per login."""
    return scram_keys(password, salt, iterations)


@functools.lru_cache(maxsize=64)
def _scram_template(user: str, password: str) -> ScramClient:
    """A ScramClient for (user, password) before its first message: building one runs
    SASLprep on both, a tenth of a millisecond a load generator need not spend per
    login. Each exchange works on a copy with its own nonce."""
    return ScramClient(["SCRAM-SHA-256"], user, password)


#: Credentials whose exchange scramp has checked end to end in this process.
_SCRAMP_CHECKED: set[tuple[str, str]] = set()


class _Scram:
    """One SCRAM-SHA-256 exchange, client side, without channel binding.

    The first exchange per credentials in a process runs through scramp, which checks
    every message's syntax. Later ones (thousands per second) build and read the few
    attributes themselves, as libpq does, still checking what matters: the server's
    nonce extends ours, and its final signature proves it knows the verifier."""

    def __init__(self, user: str, password: str) -> None:
        self.password = password
        self.key = (user or "user", password)
        self.server_signature = b""
        if self.key in _SCRAMP_CHECKED:
            self.client: ScramClient | None = None
            self.nonce = base64.b64encode(os.urandom(18)).decode()
            self.first_bare = f"n=,r={self.nonce}"
        else:
            self.client = copy.copy(_scram_template(*self.key))
            self.client.c_nonce = Nonce.create()

    def first(self) -> bytes:
        if self.client is None:
            return ("n,," + self.first_bare).encode()
        return self.client.get_client_first().encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        client = self.client
        if client is None:
            try:
                attrs = dict(part.split("=", 1) for part in text.split(","))
                nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
            except (KeyError, ValueError) as exc:
                raise PgError(f"SCRAM: malformed server-first message {text!r}") from exc
            if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce) or iterations < 1:
                raise PgError(f"SCRAM: bad server-first message {text!r}")
            first_bare = self.first_bare
        else:
            client.set_server_first(text)  # a ScramException is a failed login
            nonce, salt, iterations = client.nonce, bytes(client.salt), int(client.iterations)
            first_bare = client.client_first_bare
        client_key, stored_key, server_key = _scram_keys(self.password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = xor_key(client_key, signature)
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def check(self, server_final: bytes) -> None:
        text = server_final.decode()
        if text.startswith("e="):
            raise PgError(f"SCRAM: server reported error {text[2:]!r}")
        if not text.startswith("v="):
            raise PgError("SCRAM: malformed server-final message")
        if not hmac.compare_digest(base64.b64decode(text[2:]), self.server_signature):
            raise PgError("SCRAM: the server's signature does not match (wrong server?)")
        if self.client is not None:
            _SCRAMP_CHECKED.add(self.key)


# ----------------------------------------------------------------------------- protocol

#: Called when a login or request finishes: (connection, error or None).
Done = Callable[["PgConnection", PgError | None], None]


class PgConnection(asyncio.Protocol):
    """One client connection. ``on_login`` fires once (None: logged in); after that,
    :meth:`request` sends bytes and ``done`` fires at ReadyForQuery. ``on_lost`` fires
    when the server closes an idle connection (not when we close it)."""

    __slots__ = (
        "creds", "on_login", "on_lost", "transport", "_buf", "_done", "_error",
        "_logged_in", "_closing", "_scram", "rows", "_collect", "tag", "ident",
        "lost_error",
    )

    def __init__(
        self,
        creds: Credentials,
        on_login: Done,
        on_lost: Callable[[PgConnection, PgError], None] | None = None,
    ) -> None:
        self.creds = creds
        self.on_login: Done | None = on_login
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._done: Done | None = None
        self._error: PgError | None = None
        self._logged_in = False
        self._closing = False
        self._scram: _Scram | None = None
        self.rows: list[list[str | None]] = []
        self._collect = False
        self.tag: object = None  # free for the owner (e.g. an index into its idle list)
        self.ident = 0  # free for the owner: a number naming this connection
        self.lost_error: PgError | None = None

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(startup_message(self.creds))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        try:
            while n - pos >= 5:
                end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if end > n:
                    break
                self._message(buf[pos], buf[pos + 5 : end])
                pos = end
                if self._closing:
                    return
        except PgError as exc:
            self._fail(exc)
            return
        except (ScramException, ValueError, UnicodeDecodeError) as exc:
            self._fail(PgError(f"protocol error: {exc}"))
            return
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing and self.on_login is None and self._done is None:
            return
        if isinstance(exc, OSError):
            err = ConnectionLost(f"connection lost: {exc.strerror or exc}")
        elif self._error is not None:
            err = ConnectionLost(self._error.message, self._error.code, self._error.severity)
        else:
            err = ConnectionLost("server closed the connection")
        self._closing = True
        pending = self.on_login is not None or self._done is not None
        self._finish(err)
        if pending or self.on_lost is None:
            return  # the pending login/request callback got the error
        self.lost_error = err
        self.on_lost(self, err)

    # ---- public

    @property
    def busy(self) -> bool:
        return self._done is not None

    @property
    def closed(self) -> bool:
        return self._closing

    def request(self, data: bytes, done: Done, collect: bool = False) -> None:
        """Send one request (ending in Sync, or a simple Query); ``done`` fires once."""
        if self._closing or self.transport is None:
            done(self, ConnectionLost("connection is closed"))
            return
        self._done = done
        self._error = None
        self._collect = collect
        self.rows = []
        self.transport.write(data)

    def close(self) -> None:
        """Polite goodbye (Terminate), then close; no callbacks fire afterwards."""
        if self._closing:
            return
        self._closing = True
        self.on_login = None
        self._done = None
        if self.transport is not None:
            try:
                self.transport.write(TERMINATE)
            except Exception:  # noqa: BLE001 - the socket may already be gone
                pass
            self.transport.close()

    def abort(self, error: PgError) -> None:
        """Drop the connection now; the pending callback (if any) gets ``error``."""
        self._closing = True
        self._finish(error)
        self.on_lost = None
        if self.transport is not None:
            self.transport.abort()

    # ---- internals

    def _finish(self, err: PgError | None) -> None:
        if self.on_login is not None:
            cb, self.on_login = self.on_login, None
            cb(self, err)
        elif self._done is not None:
            cb, self._done = self._done, None
            cb(self, err)

    def _fail(self, err: PgError) -> None:
        """The server sent a FATAL or garbage: report it to whoever waits, and hang up."""
        if self._closing:
            return
        self._closing = True
        pending = self.on_login is not None or self._done is not None
        self._finish(err)
        on_lost, self.on_lost = self.on_lost, None
        if self.transport is not None:
            self.transport.abort()
        if not pending and self._logged_in and on_lost is not None:
            self.lost_error = err
            on_lost(self, err)

    def _message(self, mtype: int, payload: bytearray) -> None:
        if mtype == 0x44:  # 'D' DataRow
            if self._collect:
                self.rows.append(_data_row(payload))
        elif mtype == 0x5A:  # 'Z' ReadyForQuery
            if not self._logged_in:
                self._logged_in = True
                self._scram = None
            self._finish(self._error)
            self._error = None
        elif mtype == 0x45:  # 'E' ErrorResponse
            f = _error_fields(bytes(payload))
            self._error = PgError(f.get("M", "?"), f.get("C", ""), f.get("S", "ERROR"))
            if not self._logged_in or self._error.severity in ("FATAL", "PANIC"):
                # The server ends the connection after a FATAL; report it now.
                self._fail(self._error)
        elif mtype == 0x52:  # 'R' Authentication*
            self._auth(bytes(payload))
        # Everything else (ParameterStatus, BackendKeyData, CommandComplete, ParseComplete,
        # BindComplete, NoticeResponse, NotificationResponse, ...) needs no action here.

    def _auth(self, payload: bytes) -> None:
        code = _I32.unpack_from(payload)[0]
        if code == 0:
            return
        password = self.creds.password
        write = self.transport.write  # type: ignore[union-attr]
        if code in (3, 5, 10) and password is None:
            raise PgError("the server asked for a password but none was given")
        if code == 3:
            write(_password_message(_cstr(password)))  # type: ignore[arg-type]
        elif code == 5:
            write(_password_message(md5_response(password, self.creds.user, payload[4:8]) + b"\x00"))  # type: ignore[arg-type]
        elif code == 10:
            mechanisms = [m.decode() for m in payload[4:].split(b"\x00") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise PgError(f"no supported SASL mechanism among {mechanisms}")
            self._scram = _Scram(self.creds.user, password)  # type: ignore[arg-type]
            first = self._scram.first()
            write(_password_message(_cstr("SCRAM-SHA-256") + _I32.pack(len(first)) + first))
        elif code == 11 and self._scram is not None:
            write(_password_message(self._scram.final(payload[4:])))
        elif code == 12 and self._scram is not None:
            self._scram.check(payload[4:])
        else:
            raise PgError(f"unsupported authentication request {code}")


def _data_row(payload: bytearray) -> list[str | None]:
    count = _I16.unpack_from(payload)[0]
    pos = 2
    out: list[str | None] = []
    for _ in range(count):
        size = _I32.unpack_from(payload, pos)[0]
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + size].decode("utf-8", "replace"))
            pos += size
    return out


# ----------------------------------------------------------------------------- async helpers


class Session:
    """An awaitable wrapper for the few non-load connections (setup, backend sampling)."""

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(
        cls, host: str, port: int, creds: Credentials, timeout: float = 10.0
    ) -> Session:
        """Log in over TCP, or over a Unix socket when ``host`` is a directory path."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PgError | None] = loop.create_future()

        def on_login(_conn: PgConnection, err: PgError | None) -> None:
            if not fut.done():
                fut.set_result(err)

        conn = PgConnection(creds, on_login)
        async with asyncio.timeout(timeout):
            if host.startswith("/"):
                await loop.create_unix_connection(lambda: conn, f"{host}/.s.PGSQL.{port}")
            else:
                await loop.create_connection(lambda: conn, host, port)
            err = await fut
        if err is not None:
            conn.abort(err)
            raise err
        return cls(conn)

    async def query(
        self, sql: str, params: Sequence[str | None] | None = None, timeout: float = 30.0
    ) -> list[list[str | None]]:
        """Rows of one statement (simple protocol without params, extended with them)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PgError | None] = loop.create_future()

        def done(_conn: PgConnection, err: PgError | None) -> None:
            if not fut.done():
                fut.set_result(err)

        data = simple_query(sql) if params is None else extended_query(sql, params)
        self.conn.request(data, done, collect=True)
        try:
            async with asyncio.timeout(timeout):
                err = await fut
        except TimeoutError:
            self.conn.abort(PgError("query timed out"))
            raise PgError(f"query timed out after {timeout:g} s: {sql}") from None
        if err is not None:
            raise err
        return self.conn.rows

    def close(self) -> None:
        self.conn.close()
