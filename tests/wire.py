"""A raw-protocol Postgres test client: bytes over a socket, with timeouts everywhere.

Messages are built with pgwire's encoders; the server's replies are framed and decoded
with pgwire's framer and decoders. Logins answer cleartext, md5 (hashed here) and
SCRAM-SHA-256 (``scramp.ScramClient``, which also verifies the server's signature)
requests. The client talks to pgfleet (a TCP port on 127.0.0.1) or straight to
Postgres (a Unix socket path), so the two can be compared.
"""

from __future__ import annotations

import hashlib
import select
import socket
import struct
import time

import psycopg
from psycopg import pq
from scramp import ScramClient

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire.framing import MessageFramer
from tests.conftest import PASSWORD

RECV_TIMEOUT = 15.0
LOGIN_TIMEOUT = 10.0


class RawClient:
    """A Postgres client speaking bytes over a plain socket; usable as a context manager."""

    def __init__(
        self, address: int | str, timeout: float = RECV_TIMEOUT, connect_timeout: float = 10
    ) -> None:
        """``address``: a port on 127.0.0.1 (pgfleet) or a Unix socket path (Postgres)."""
        if isinstance(address, int):
            self.sock = socket.create_connection(("127.0.0.1", address), timeout=connect_timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(connect_timeout)
            try:
                self.sock.connect(address)
            except BaseException:
                self.sock.close()
                raise
        self.sock.settimeout(timeout)
        self.framer = MessageFramer(frontend=False)
        self.eof = False
        self._scram: ScramClient | None = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bytes

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int) -> bytes:
        """Exactly n bytes straight off the socket (used for the one-byte SSL answer)."""
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def _fill(self) -> bool:
        """Read more bytes into the framer; False at EOF (a reset counts as EOF)."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.framer.feed(chunk)
        return True

    # ------------------------------------------------------------------ messages

    def read_message(self) -> be.BackendMessage | None:
        """The next decoded backend message, or None at EOF."""
        while True:
            m = self.framer.next_message()
            if m is not None:
                return be.decode_backend(m[0], m[1])
            if not self._fill():
                return None

    def read_until_ready(self) -> list[be.BackendMessage]:
        """Messages up to and including ReadyForQuery; fails on EOF before it."""
        out: list[be.BackendMessage] = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"connection closed before ReadyForQuery; got {out!r}"
            out.append(msg)
            if isinstance(msg, be.ReadyForQuery):
                return out

    def read_until_ready_or_eof(self) -> tuple[list[be.BackendMessage], be.ReadyForQuery | None]:
        """The messages before the next ReadyForQuery, and that ReadyForQuery (None at EOF)."""
        out: list[be.BackendMessage] = []
        while True:
            msg = self.read_message()
            if msg is None or isinstance(msg, be.ReadyForQuery):
                return out, msg
            out.append(msg)

    def read_to_eof(self, limit: float = RECV_TIMEOUT) -> list[be.BackendMessage]:
        """Everything the server sends until it closes; socket.timeout if it never does."""
        deadline = time.monotonic() + limit
        out: list[be.BackendMessage] = []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not close the connection; got {out!r}")
            msg = self.read_message()
            if msg is None:
                assert self.framer.buffered() == 0, "connection closed mid-message"
                return out
            out.append(msg)

    def query(self, sql: str) -> list[be.BackendMessage]:
        self.send(fe.encode_query(sql))
        return self.read_until_ready()

    # ------------------------------------------------------------------ login

    def startup(self, user: str = "postgres", database: str = "postgres", **params: str) -> None:
        self.send(fe.encode_startup({"user": user, "database": database, **params}))

    def expect_auth(self, code: int) -> be.Authentication:
        """The next message, which must be an authentication request with ``code``."""
        msg = self.read_message()
        assert isinstance(msg, be.Authentication) and msg.code == code, msg
        return msg

    def answer_auth(self, msg: be.Authentication, user: str, password: str | None) -> None:
        """Reply to one authentication request (nothing to say to AuthenticationOk)."""
        if msg.code == be.AUTH_OK:
            return
        if msg.code == be.AUTH_CLEARTEXT:
            self.send(fe.encode_password(password))
        elif msg.code == be.AUTH_MD5:
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + msg.data).hexdigest()
            self.send(fe.encode_password("md5" + outer))
        elif msg.code == be.AUTH_SASL:
            assert "SCRAM-SHA-256" in msg.mechanisms, msg
            self._scram = ScramClient(["SCRAM-SHA-256"], user, password)
            first = self._scram.get_client_first().encode()
            self.send(fe.encode_sasl_initial("SCRAM-SHA-256", first))
        elif msg.code == be.AUTH_SASL_CONTINUE:
            self._scram.set_server_first(msg.data.decode())
            self.send(fe.encode_sasl_response(self._scram.get_client_final().encode()))
        elif msg.code == be.AUTH_SASL_FINAL:
            self._scram.set_server_final(msg.data.decode())  # verifies the server's signature
        else:
            raise AssertionError(f"unexpected authentication request {msg.code}")

    def login_scram(self, user: str = "postgres", password: str = PASSWORD) -> list:
        """Startup plus a full SCRAM-SHA-256 exchange; returns the messages after AuthOk."""
        self.startup(user)
        for code in (be.AUTH_SASL, be.AUTH_SASL_CONTINUE, be.AUTH_SASL_FINAL):
            self.answer_auth(self.expect_auth(code), user, password)
        self.expect_auth(be.AUTH_OK)
        return self._after_auth_ok()

    def login_trust(self, user: str = "postgres") -> list:
        self.startup(user)
        self.expect_auth(be.AUTH_OK)
        return self._after_auth_ok()

    def _after_auth_ok(self) -> list:
        msgs = self.read_until_ready()
        assert not any(isinstance(m, be.ErrorResponse) for m in msgs), msgs
        assert any(isinstance(m, be.BackendKeyData) for m in msgs), msgs
        assert msgs[-1].status == "I"
        return msgs

    # ------------------------------------------------------------------ closing

    def abort(self) -> None:
        """Vanish abruptly: RST instead of a FIN, nothing sent before."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def raw_login(
    address: int | str, user: str, password: str | None = None, dbname: str = "postgres",
    **params: str,
) -> dict[str, str]:
    """Log in; return the ErrorResponse fields if the server refused, else {}.

    Shows the SQLSTATE of a failed login, which libpq does not expose. ``address`` is a
    port on 127.0.0.1 (pgfleet) or a Unix socket path (Postgres).
    """
    with RawClient(address, timeout=LOGIN_TIMEOUT, connect_timeout=LOGIN_TIMEOUT) as c:
        c.startup(user, dbname, **params)
        while True:
            msg = c.read_message()
            if msg is None:
                raise ConnectionError("server closed the connection")
            if isinstance(msg, be.ErrorResponse):
                return msg.fields
            if isinstance(msg, be.ReadyForQuery):
                c.send(fe.TERMINATE)
                return {}
            if isinstance(msg, be.Authentication):
                c.answer_auth(msg, user, password)
            # ParameterStatus, BackendKeyData, notices: read on


def errors_in(msgs: list) -> list[be.ErrorResponse]:
    return [m for m in msgs if isinstance(m, be.ErrorResponse)]


def data_rows(msgs: list) -> list[list[bytes | None]]:
    """The values of the DataRows among ``msgs``."""
    return [m.values for m in msgs if isinstance(m, be.DataRow)]


def assert_fatal_then_eof(
    client: RawClient, code: str = "08P01", message: str | None = None
) -> be.ErrorResponse:
    """The server sends exactly one FATAL ErrorResponse with ``code`` and then closes."""
    msgs = client.read_to_eof()
    errs = errors_in(msgs)
    assert len(errs) == 1, f"expected one ErrorResponse before EOF, got {msgs!r}"
    err = errs[0]
    assert err.severity == "FATAL", err.fields
    assert err.sqlstate == code, err.fields
    if message is not None:
        assert message in err.message, err.fields
    assert msgs[-1] is err, f"ErrorResponse must be the last message, got {msgs!r}"
    return err


def libpq_pipeline(conn: psycopg.Connection, statements: list[str],
                   timeout: float = 10.0) -> list[tuple]:
    """Send the statements in one libpq pipeline (a Parse, Bind and Execute each, one
    Sync at the end), then read every result in order, which a driver's pipeline mode
    does not promise: per statement its status name, SQLSTATE, command tag and rows."""
    pg = conn.pgconn
    out: list[tuple] = []
    pg.enter_pipeline_mode()
    try:
        for sql in statements:
            pg.send_query_params(sql.encode(), None)
        pg.pipeline_sync()
        while pg.flush():
            select.select([], [pg.socket], [], timeout)
        while True:
            while pg.is_busy():
                if not select.select([pg.socket], [], [], timeout)[0]:
                    raise TimeoutError(f"no answer to the pipeline in {timeout:g} s: {out!r}")
                pg.consume_input()
            res = pg.get_result()
            if res is None:
                continue  # the end of one statement's results
            if res.status == pq.ExecStatus.PIPELINE_SYNC:
                return out
            rows = None
            if res.status == pq.ExecStatus.TUPLES_OK:
                rows = [[res.get_value(r, c) for c in range(res.nfields)]
                        for r in range(res.ntuples)]
            sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
            out.append((pq.ExecStatus(res.status).name,
                        sqlstate.decode() if sqlstate else None, res.command_status, rows))
    finally:
        pg.exit_pipeline_mode()
