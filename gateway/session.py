"""One client connection on a gateway worker: startup, login, then the session proper.

The session holds no backend while idle. Its first message needing one takes a
backend (from the worker's cache or the pooler); at ReadyForQuery 'I' with nothing
outstanding the backend goes back, unless the session made backend-local state,
which pins it. Named prepared statements get backend names derived from their
text, so they are re-prepared on whichever backend serves the session.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import TYPE_CHECKING

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.errors import ProtocolViolation, error_response
from pgwire.framing import MessageFramer, StartupFramer
from pgwire.quoting import quote_literal

from . import sql_prepare, tls
from .backend import K_BIND, K_CLOSE, K_DESC_P, K_DESC_S, K_EXEC, K_PARSE, K_QUERY, K_SYNC
from .classify import (
    changes_settings,
    custom_setting_names,
    drops_statements,
    listen_ops,
    might_unpin,
    pin_reason,
    reset_targets,
)
from .listen import ListenState, channel_key
from .login import Login

if TYPE_CHECKING:
    from .backend import BackendLink
    from .worker import Worker

STARTUP, AUTH, READY, CLOSED = range(4)

Q, P, B, D, E, C, S, H, X, F = (ord(c) for c in "QPBDECSHXF")
COPY_MSGS = frozenset(b"dcf")
EXTENDED = frozenset(b"PBDECH")
RFQ_IDLE = b"Z\x00\x00\x00\x05I"
UNLISTEN_ALL = fe.encode_query("UNLISTEN *")
# Session-level settings as Postgres sees them; SET ROLE / SESSION AUTHORIZATION pin instead.
# What still ties a session to its backend, in the order of PIN_REASONS.
PIN_REASONS = ("temp_table", "advisory_lock", "with_hold_cursor", "sql_prepare", "listen",
               "set_role")
PIN_QUERY = (
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
    " EXISTS (SELECT FROM pg_catalog.pg_locks"
    " WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),"
    " EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable),"
    " EXISTS (SELECT FROM pg_catalog.pg_prepared_statements"
    " WHERE from_sql AND name NOT LIKE 'pgfs\\_%'),"
    " EXISTS (SELECT FROM pg_catalog.pg_listening_channels()),"
    " current_user <> {user} OR session_user <> {user}"
)
SETTINGS_SQL = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
    "AND name NOT IN ('role', 'session_authorization')"
)
_HDR = struct.Struct("!BI")


def _msg(mtype: int, payload: bytes) -> bytes:
    return _HDR.pack(mtype, len(payload) + 4) + payload


def _cstr_end(payload: bytes, start: int) -> int:
    end = payload.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation("invalid string in message")
    return end


def _raise_sql(code: str, message: str) -> str:
    """A statement that fails with exactly this SQLSTATE and message on the backend."""
    msg = quote_literal(message).replace("$", "\\x24")  # cannot end the dollar quote
    return (f"DO $pgfleet$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', "
            f"MESSAGE = {msg}; END$pgfleet$")


class Session(asyncio.Protocol):
    """The asyncio protocol of one client connection."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.phase = STARTUP
        self.startup_framer: StartupFramer | None = StartupFramer()
        self.framer = MessageFramer(frontend=True)
        self.login: Login | None = None
        self.user = ""
        self.database = ""
        self.key: tuple[str, str] = ("", "")
        # lower-cased setting name -> (name as given, value): the session's book of
        # session-level settings, replayed on every backend that serves it.
        self.settings: dict[str, tuple[str, str]] = {}
        # The part of it that came with the startup packet (what RESET goes back to).
        self.startup_settings: dict[str, tuple[str, str]] = {}
        # A statement that may have changed settings ran: re-read the book before
        # the backend goes back.
        self.settings_dirty = False
        # Extension-style settings (app.tenant) the session touched: pg_settings omits
        # them, so the book re-reads them by name.
        self.custom_names: set[str] = set()
        self.link: BackendLink | None = None
        self.waiting = False
        self.wait_timer: asyncio.TimerHandle | None = None
        self.pending: deque[tuple[int, bytes, bytes]] = deque()
        self.pins: set[str] = set()
        # Something ran that may have removed the pinning state: ask the backend what
        # is left before deciding the session is still pinned.
        self.pin_check = False
        self.pin_epoch = 0  # bumped whenever a pin reason is added
        # client statement name -> (backend name, Parse message under that name)
        self.stmts: dict[bytes, tuple[bytes, bytes]] = {}
        self.unnamed_parse: bytes | None = None
        # SQL-level prepared statements: client name -> (backend name, its PREPARE query).
        self.sql_stmts: dict[bytes, tuple[bytes, bytes]] = {}
        # Protocol statements (client name; the unnamed one) whose text EXECUTEs one of them.
        self.sql_deps: dict[bytes, bytes] = {}
        self.unnamed_dep: bytes | None = None
        # Why executing a statement pins (client name; the unnamed one).
        self.stmt_pins: dict[bytes, str] = {}
        # Per statement: (settings RESET, drops all statements) when executed.
        self.stmt_effects: dict[bytes, tuple[tuple[str, ...], bool] | None] = {}
        self.unnamed_effects: tuple[tuple[str, ...], bool] | None = None
        self.pending_resets: tuple[str, ...] = ()
        self.pending_drop = False
        self.unnamed_pin: str | None = None
        # Statements whose execution may change settings (client names; the unnamed one).
        self.setting_stmts: set[bytes] = set()
        self.unnamed_sets = False
        self.unnamed_token: object | None = None
        self.skip_until_sync = False
        # Extended-protocol messages were sent since the last Sync: they form one
        # implicit transaction and may leave an unnamed portal, so the backend stays.
        self.unsynced = False
        self.slot = -1
        self.client_pid = 0
        self.client_secret = 0
        self.paused_backend = False
        # LISTEN: the session's channels (None until it first LISTENs), the LISTEN ops
        # of its statements, and client messages held until the hub listens.
        self.listen: ListenState | None = None
        self.stmt_listen: dict[bytes, tuple[tuple[str, bytes | None], ...]] = {}
        self.unnamed_listen: tuple[tuple[str, bytes | None], ...] = ()
        self.portal_listen: tuple[tuple[str, bytes | None], ...] = ()
        self.held: deque[tuple[int, bytes, bytes]] | None = None

    # -- asyncio protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker.sessions.add(self)
        self.login = Login(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.worker.sessions.discard(self)
        if self.login is not None:
            self.login.abort()
            self.login = None
        self._stop_waiting()
        if self.listen is not None and self.listen.wanted:
            self.worker.listeners.drop(self, set(self.listen.wanted))
        link = self.link
        if link is not None:
            self.link = None
            # Settings changed but not yet re-read, or pinned state: reset before reuse.
            self.worker.leases.abandon(
                link, dirty=bool(self.pins) or self.settings_dirty or link.listened
            )
        if self.slot >= 0:
            self.worker.release_slot(self.slot)
            self.slot = -1

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading the backend.
        link = self.link
        if link is not None and link.transport is not None:
            link.transport.pause_reading()
            self.paused_backend = True

    def resume_writing(self) -> None:
        if self.paused_backend:
            self.paused_backend = False
            link = self.link
            if link is not None and link.transport is not None and not link.dead:
                link.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            if self.phase == READY:
                framer = self.framer
                framer.feed(data)
                while self.phase == READY:
                    m = framer.next_message()
                    if m is None:
                        break
                    self._on_message(m[0], m[1], m[2])
                link = self.link
                if link is not None:
                    link.flush()
                    self._maybe_release(link)
            elif self.phase == STARTUP:
                self._startup_data(data)
            elif self.phase == AUTH:
                self.framer.feed(data)
                self.login.wake()
        except ProtocolViolation as exc:
            self.fatal(exc.sqlstate, exc.message)

    # -- output -----------------------------------------------------------------------------
    def write_client(self, data: bytes) -> None:
        if self.transport is not None and self.phase != CLOSED:
            self.transport.write(data)

    def fatal(self, code: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse and end this client (only this one)."""
        if self.phase == CLOSED:
            return
        self.write_client(error_response("FATAL", code, message, detail))
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.phase != CLOSED:
            self.connection_lost(None)

    # -- startup ----------------------------------------------------------------------------
    # Encryption negotiation, as Postgres: one SSLRequest, one GSSENCRequest (refused),
    # in either order, none after TLS started.
    ssl_done = False
    gss_done = False
    tls_in_use = False
    handshaking = False
    tls_task: asyncio.Task | None = None

    def _startup_data(self, data: bytes) -> None:
        sf = self.startup_framer
        sf.feed(data)
        if self.handshaking:
            return  # bytes behind the handshake: read once it is done
        while self.phase == STARTUP:
            pkt = sf.next_packet()
            if pkt is None:
                return
            msg = fe.decode_startup(pkt)
            if isinstance(msg, fe.SSLRequest | fe.GSSENCRequest):
                if sf.buffered():
                    # Bytes sent before our answer would bypass the negotiation (CVE-2021-23214).
                    raise ProtocolViolation("received unencrypted data after SSL request")
                self._encryption_request(isinstance(msg, fe.SSLRequest))
                continue
            if isinstance(msg, fe.CancelRequest):
                self.worker.cancel_client(msg.pid, msg.secret)
                self.close()
                return
            rest = sf.remaining()
            self.startup_framer = None
            self.phase = AUTH
            self.framer.feed(rest)
            self.login.start(msg)

    def _encryption_request(self, ssl_request: bool) -> None:
        """Answer SSLRequest 'S' (TLS configured) or 'N', GSSENCRequest always 'N'."""
        if self.ssl_done if ssl_request else self.gss_done:
            code = fe.SSL_REQUEST_CODE if ssl_request else fe.GSSENC_REQUEST_CODE
            raise ProtocolViolation(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "server supports 3.0 to 3.0",
                sqlstate.FEATURE_NOT_SUPPORTED,
            )
        ctx = tls.server_context(self.worker.cfg) if ssl_request else None
        if ctx is None:
            if ssl_request:
                self.ssl_done = True
            else:
                self.gss_done = True
            self.write_client(b"N")
            return
        self.ssl_done = self.gss_done = True
        raw = self.transport
        self.write_client(b"S")
        raw.pause_reading()
        self.handshaking = True
        self.transport = tls.Handshaking(raw)
        self.tls_task = self.worker.loop.create_task(tls.upgrade(self, raw, ctx))

    def tls_started(self, transport: asyncio.Transport) -> None:
        """The handshake is done: the session goes on over ``transport``."""
        self.tls_task = None
        if self.phase == CLOSED:
            transport.close()  # ended (auth timeout, shutdown) while we shook hands
            return
        self.transport = transport
        self.handshaking = False
        self.tls_in_use = True
        self.data_received(b"")

    def ready(self, status: dict[str, str]) -> None:
        """Login succeeded: report parameters, our cancel key, and ReadyForQuery."""
        self.login = None
        slot, pid, secret = self.worker.claim_slot()
        self.slot, self.client_pid, self.client_secret = slot, pid, secret
        out = [be.encode_parameter_status(k, v) for k, v in status.items()]
        out.append(be.encode_backend_key_data(pid, secret))
        out.append(RFQ_IDLE)
        self.write_client(b"".join(out))
        self.phase = READY
        # A client may have pipelined messages behind its last login message.
        self.data_received(b"")

    # -- the session proper ------------------------------------------------------------------
    def _on_message(self, mtype: int, payload: bytes, raw: bytes) -> None:
        if mtype == X:
            self.close()
            return
        if self.held is not None:
            self.held.append((mtype, payload, raw))
            return
        if (mtype == Q or mtype == B) and self._listen_gate(mtype, payload, raw):
            return
        self._on_message_ungated(mtype, payload, raw)

    def _on_message_ungated(self, mtype: int, payload: bytes, raw: bytes) -> None:
        if self.link is None:
            if self.skip_until_sync and mtype != S and not self.pending:
                return
            if not self.pending:
                if mtype == S:  # nothing outstanding, no transaction: answer it here
                    self.skip_until_sync = False
                    self.write_client(RFQ_IDLE)
                    return
                if mtype == H or mtype in COPY_MSGS:
                    return  # Postgres ignores stray COPY messages outside COPY
                if mtype == P and self._parse_known(payload):
                    return
            self.pending.append((mtype, payload, raw))
            if not self.waiting:
                self._request_backend()
            return
        self._forward(self.link, mtype, payload, raw)

    # -- LISTEN ------------------------------------------------------------------------------
    def _listen_gate(self, mtype: int, payload: bytes, raw: bytes) -> bool:
        """A statement about to LISTEN: count the session in at the hub first, and hold
        it (and what follows) until the hub listens, so nothing is missed."""
        if mtype == Q:
            ops = self._listen_ops(payload[:-1])
        else:
            pe = _cstr_end(payload, 0)
            name = payload[pe + 1 : _cstr_end(payload, pe + 1)]
            ops = self.stmt_listen.get(name, ()) if name else self.unnamed_listen
        channels = [ch for op, ch in ops if op == "listen"]
        if not channels:
            return False
        if self.listen is None:
            self.listen = ListenState()
        self.listen.sent(channels)
        if self.worker.listeners.want(self, channels, self._hub_answered):
            return False
        self.held = deque([(mtype, payload, raw)])
        return True

    def _hub_answered(self, error: dict | None) -> None:
        if error is not None:
            # The hub could not listen: the backend's own LISTEN stays, the session pins.
            self.pins.add("listen")
            self.pin_epoch += 1
        held, self.held = self.held, None
        if self.phase != READY or held is None:
            return
        try:
            # The first one passed its gate already; the rest may have gates of their own.
            self._on_message_ungated(*held.popleft())
            while held and self.held is None and self.phase == READY:
                self._dispatch(*held.popleft())
            if held:  # another LISTEN is waiting for the hub: the rest waits behind it
                self.held.extend(held)
        except ProtocolViolation as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        link = self.link
        if link is not None:
            link.flush()
            self._maybe_release(link)

    def _dispatch(self, mtype: int, payload: bytes, raw: bytes) -> None:
        """A held message, past its gate."""
        if mtype == X:
            self.close()
        elif mtype == Q or mtype == B:
            if not self._listen_gate(mtype, payload, raw):
                self._on_message_ungated(mtype, payload, raw)
        else:
            self._on_message_ungated(mtype, payload, raw)

    @staticmethod
    def _listen_ops(sql: bytes) -> tuple[tuple[str, bytes | None], ...]:
        return tuple((op, None if ch is None else channel_key(ch)) for op, ch in listen_ops(sql))

    def _listen_sent(self, link: BackendLink, ops: tuple[tuple[str, bytes | None], ...]):
        """The backend runs a statement with LISTEN ops: returns the on_done that books
        them once it worked (they take effect when its transaction commits)."""
        if self.listen is None:
            self.listen = ListenState()
        if any(op == "listen" for op, _ in ops):
            link.listened = True  # UNLISTEN * before the backend goes back
        state = self.listen

        def done(ok: bool) -> None:
            state.statement_done(ops, ok)

        return done

    def notified(self, channel: bytes, raw: bytes) -> None:
        """A notification on a channel this session listens on (or is about to)."""
        state = self.listen
        if state is None or self.phase != READY:
            return
        link = self.link
        idle = not self.pending and self.held is None and (
            link is None or (not link.queue and link.status == "I")
        )
        if idle and channel in state.channels:
            self.write_client(raw)
        else:
            state.queue.append((channel, raw))

    def _parse_known(self, payload: bytes) -> bool:
        """Answer a named Parse without a backend when this worker has already parsed the
        same text and parameter types successfully; it is prepared on a backend when
        first used. A client that prepares while its other connections hold every
        backend (pgbench -M prepared does, blocking its thread) must not wait here."""
        ne = _cstr_end(payload, 0)
        name = payload[:ne]
        if not name or name in self.stmts:
            return False
        body = payload[ne + 1 :]
        bname = self.worker.statement_name(body)
        if not self.worker.statement_known(bname):
            return False
        query = body[: _cstr_end(body, 0)]
        if pin_reason(query) is not None:
            return False
        if self.sql_stmts and sql_prepare.mentions_prepared(query):
            return False  # may need rewriting: take the full path
        self.stmts[name] = (bname, _msg(P, bname + b"\x00" + body))
        self.stmt_pins.pop(name, None)
        self.sql_deps.pop(name, None)
        ops = self._listen_ops(query)
        if ops:
            self.stmt_listen[name] = ops
        else:
            self.stmt_listen.pop(name, None)
        if changes_settings(query):
            self.setting_stmts.add(name)
            self.custom_names |= custom_setting_names(query)
            self.stmt_effects[name] = (reset_targets(query), drops_statements(query))
        else:
            self.setting_stmts.discard(name)
            self.stmt_effects[name] = None
        self.write_client(be.PARSE_COMPLETE)
        return True

    def _request_backend(self) -> None:
        self.waiting = True
        link = self.worker.leases.acquire(self.key, self)
        if link is not None:
            self.on_link(link)
            return
        timeout = self.worker.cfg.query_wait_timeout
        if timeout > 0:
            self.wait_timer = self.worker.loop.call_later(timeout, self._wait_timed_out)

    def _stop_waiting(self) -> None:
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        if self.waiting:
            self.waiting = False
            self.worker.leases.cancel_wait(self.key, self)

    def on_link(self, link: BackendLink) -> None:
        """The lease manager hands us a backend (we were waiting for one)."""
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        self.waiting = False
        if self.login is not None:
            self.login.on_link(link)
            return
        self.attach(link)
        pending = self.pending
        while pending and self.link is link:
            mtype, payload, raw = pending.popleft()
            try:
                self._forward(link, mtype, payload, raw)
            except ProtocolViolation as exc:
                self.fatal(exc.sqlstate, exc.message)
                return
            if self.phase == CLOSED:
                return
        link.flush()
        self._maybe_release(link)

    def attach(self, link: BackendLink) -> None:
        self.link = link
        link.session = self
        if self.slot >= 0:
            self.worker.cancel_table.set_backend(self.slot, link.pid, link.secret)
        self.worker.apply_settings(link, self.settings)

    def on_lease_failed(self, fields: dict[str, str]) -> None:
        """The pooler could not open a backend for us (e.g. the database is gone)."""
        self.waiting = False
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        if self.login is not None:
            self.login.on_lease_failed(fields)
            return
        self._fail_pending(fields.get("C", sqlstate.CONNECTION_FAILURE), fields.get("M", ""))

    def _wait_timed_out(self) -> None:
        self.wait_timer = None
        self._stop_waiting()
        if self.login is not None:
            self.login.on_wait_timeout()
            return
        t = self.worker.cfg.query_wait_timeout
        self._fail_pending(
            sqlstate.QUERY_CANCELED,
            f"canceling statement due to query_wait_timeout: no backend became free in {t:g} s",
        )

    def cancel_waiting(self) -> None:
        """A CancelRequest for a session still waiting for a backend: its first statement
        fails with 57014 as if cancelled as it started (Postgres runs the rest)."""
        if not self.waiting or not self.pending or self.login is not None:
            return
        err = error_response("ERROR", sqlstate.QUERY_CANCELED,
                             "canceling statement due to user request")
        pending = self.pending
        if pending[0][0] in (Q, F):
            pending.popleft()
            out = [err, RFQ_IDLE]
        else:  # extended protocol: the rest up to Sync is skipped, as after any error
            out = [err]
            while pending:
                mtype = pending.popleft()[0]
                if mtype == S:
                    out.append(RFQ_IDLE)
                    break
            else:
                self.skip_until_sync = True
        if not pending:
            self._stop_waiting()
        self.write_client(b"".join(out))

    def _fail_pending(self, code: str, message: str) -> None:
        """Answer messages that never reached a backend as Postgres answers failed ones."""
        err = error_response("ERROR", code, message)
        out: list[bytes] = []
        failed = False
        while self.pending:
            mtype = self.pending.popleft()[0]
            if mtype == Q or mtype == F:
                out += (err, RFQ_IDLE)
            elif mtype == S:
                out.append(RFQ_IDLE)
                failed = False
            elif mtype in COPY_MSGS or mtype == H:
                continue
            elif not failed:
                out.append(err)
                failed = True
        self.skip_until_sync = failed
        self.write_client(b"".join(out))

    def _sql_prepared(self, link: BackendLink, cmd: sql_prepare.SqlPrepareCommand,
                      sql: bytes) -> None:
        """Forward a single SQL PREPARE/EXECUTE/DEALLOCATE under the session's backend name."""
        entry = self.sql_stmts.get(cmd.name)
        if cmd.kind == "prepare":
            reason = pin_reason(sql)
            if reason is not None and reason != "sql_prepare":
                self.pins.add(reason)
                self.pin_epoch += 1
                self.pin_check = True
            if entry is not None:
                shown = cmd.name.decode("utf-8", "replace")
                self._raise_in_query(link, sqlstate.DUPLICATE_PREPARED_STATEMENT,
                                     f'prepared statement "{shown}" already exists')
                return
            bname = self.worker.sql_statement_name()
            text = sql[: cmd.start] + bname + sql[cmd.end :]
            new = (bname, _msg(Q, text + b"\x00"))
            self.sql_stmts[cmd.name] = new

            def prepared(ok: bool, link: BackendLink = link) -> None:
                if ok:
                    link.prepared.add(bname)
                elif self.sql_stmts.get(cmd.name) is new:
                    del self.sql_stmts[cmd.name]

            link.expect(K_QUERY, on_done=prepared)
            link.write(new[1])
            return
        if entry is None:
            # Not ours: Postgres answers (e.g. "does not exist") with the client's name.
            link.expect(K_QUERY)
            link.write(_msg(Q, sql + b"\x00"))
            return
        bname, prepare_raw = entry
        if bname not in link.prepared:
            link.expect(K_QUERY, swallow=1, on_done=link.assume_prepared(bname))
            link.write(prepare_raw)
        text = sql[: cmd.start] + bname + sql[cmd.end :]
        on_done = None
        if cmd.kind == "deallocate":
            def on_done(ok: bool, link: BackendLink = link) -> None:
                if ok:
                    link.prepared.discard(bname)
                    if self.sql_stmts.get(cmd.name) is entry:
                        del self.sql_stmts[cmd.name]
        link.expect(K_QUERY, on_done=on_done)
        link.write(_msg(Q, text + b"\x00"))

    def _ensure_sql_prepared_extended(self, link: BackendLink, name: bytes) -> bytes:
        """Make sure our SQL statement ``name`` exists on ``link`` from inside an extended
        sequence: its PREPARE runs through the unnamed statement, replies swallowed."""
        bname, prepare_raw = self.sql_stmts[name]
        if bname not in link.prepared:
            reprepared = link.assume_prepared(bname)
            link.unnamed_of = None  # we are about to replace the backend's unnamed statement
            link.expect(K_PARSE, swallow=1)
            link.write(fe.encode_parse("", prepare_raw[5:-1].decode("utf-8", "surrogateescape")))
            link.expect(K_BIND, swallow=1)
            link.write(fe.encode_bind("", "", []))
            link.expect(K_EXEC, swallow=1, on_done=reprepared)
            link.write(fe.encode_execute("", 0))
        return bname

    def _raise_in_query(self, link: BackendLink, code: str, message: str) -> None:
        """Fail a simple Query with an error pgfleet decides, through the backend, so the
        transaction is aborted there exactly as the client now believes."""
        link.expect(K_QUERY)
        link.write(fe.encode_query(_raise_sql(code, message)))

    def _note_pins(self, sql: bytes) -> None:
        reason = pin_reason(sql)
        if reason is not None:
            self.pins.add(reason)
            self.pin_epoch += 1
            self.pin_check = True  # its transaction may still roll it back
        elif self.pins and might_unpin(sql):
            self.pin_check = True

    def _maybe_release(self, link: BackendLink) -> None:
        if (
            self.link is link
            and not link.queue
            and link.status == "I"
            and not link.copy_in
            and not self.pending
            and not self.unsynced
            and not link.dead
            and self.held is None
        ):
            if link.listened and "listen" not in self.pins:
                # The backend listens for this session; the hub does that for everyone.
                link.listened = False
                link.expect(K_QUERY, swallow=1)
                link.write(UNLISTEN_ALL)
                link.flush()
                return
            if self.pins:
                if self.pin_check and "load" not in self.pins:
                    self._recheck_pins(link)
                    link.flush()
                return
            if self.settings_dirty:
                self._reread_settings(link)
                link.flush()
                return
            self.detach()
            self.worker.leases.put_back(link)

    def _dropped_all(self, link: BackendLink) -> None:
        """DEALLOCATE ALL / DISCARD ALL: the backend loses every statement, ours and other
        sessions'; our names go, and every statement is prepared again where needed."""
        self.stmts.clear()
        self.sql_stmts.clear()
        self.unnamed_parse = self.unnamed_token = None
        link.prepared.clear()
        link.unnamed_of = None

    def _after_resets(self, link: BackendLink, targets: tuple[str, ...]) -> None:
        """RESET puts a setting back to its startup value in Postgres, not to the server
        default: replay the startup values it touched, right behind the statement."""
        if not targets or not self.startup_settings:
            return
        if "all" in targets:
            again = dict(self.startup_settings)
        else:
            again = {k: v for k, v in self.startup_settings.items() if k in targets}
        if again:
            query = link.queue[-1]
            if self.worker.apply_settings(link, again, quiet=True, force=True):
                query.hold_z = True

    def _recheck_pins(self, link: BackendLink) -> None:
        """Ask the backend which backend-local state the session still has; with none
        left, the session shares backends again."""
        self.pin_check = False
        rows: list[list[bytes | None]] = []

        epoch = self.pin_epoch

        def done(ok: bool) -> None:
            if self.pin_epoch != epoch:
                return  # pinning statements were sent after the check: it says too little
            if ok and rows:
                self.pins = {r for r, v in zip(PIN_REASONS, rows[0], strict=True) if v == b"t"}

        user = quote_literal(self.user)
        link.expect(K_QUERY, swallow=1, on_done=done, rows=rows)
        link.write(fe.encode_query(PIN_QUERY.format(user=user)))

    def _reread_settings(self, link: BackendLink) -> None:
        """Take the session's settings from the backend itself, which already applied
        Postgres's rules (transactions, savepoints, SET LOCAL, RESET, failed SETs)."""
        self.settings_dirty = False
        rows: list[list[bytes | None]] = []

        def done(ok: bool) -> None:
            if not ok:
                link.needs_reset = True  # we no longer know what it holds
                return
            book = {}
            for name, value in rows:
                if value is None:
                    continue  # a custom setting never defined here
                n = name.decode()
                book[n.lower()] = (n, value.decode())
            self.settings = book
            link.applied = {k: v for k, (_, v) in book.items()}

        query = SETTINGS_SQL
        if self.custom_names:
            names = ", ".join(quote_literal(n) for n in sorted(self.custom_names))
            query += (" UNION ALL SELECT n, pg_catalog.current_setting(n, true)"
                      f" FROM pg_catalog.unnest(ARRAY[{names}]::text[]) AS n")
        link.expect(K_QUERY, swallow=1, on_done=done, rows=rows)
        link.write(fe.encode_query(query))

    def detach(self) -> None:
        link = self.link
        self.link = None
        if link is not None:
            link.session = None
            if self.paused_backend and link.transport is not None:
                link.transport.resume_reading()
                self.paused_backend = False
        if self.slot >= 0:
            self.worker.cancel_table.set_backend(self.slot, 0, 0)

    def backend_progress(self, link: BackendLink) -> None:
        """Called after the backend's replies were routed to us."""
        if link.dead:
            self.backend_lost(link)
            return
        self._maybe_release(link)

    def backend_lost(self, link: BackendLink) -> None:
        """Our backend died under us: its transaction and session state are gone."""
        if self.link is not link:
            return
        self.detach()
        self.worker.leases.discard(link)
        if link.fatal is not None:
            self.write_client(link.fatal)
            self.close()
        else:
            self.fatal(
                sqlstate.CONNECTION_FAILURE,
                "server closed the connection unexpectedly",
                "The Postgres backend serving this session terminated abnormally.",
            )

    # -- forwarding --------------------------------------------------------------------------
    def _forward(self, link: BackendLink, mtype: int, payload: bytes, raw: bytes) -> None:
        if self.skip_until_sync and mtype != S:
            return  # after an error Postgres ignores everything until Sync
        if mtype in EXTENDED:
            self.unsynced = True
        if mtype == Q:
            sql = payload[:-1]
            # A simple Query drops the unnamed statement, for the client too.
            self.unnamed_parse = self.unnamed_token = None
            cmd = sql_prepare.parse(sql) if sql_prepare.mentions_prepared(sql) else None
            query_entry = None
            if cmd is None:
                self._note_pins(sql)
                ops = self._listen_ops(sql)
                link.expect(K_QUERY, on_done=self._listen_sent(link, ops) if ops else None)
                query_entry = link.queue[-1]
                link.write(raw)
            else:
                self._sql_prepared(link, cmd, sql)
            if changes_settings(sql):
                self.settings_dirty = True
                self.custom_names |= custom_setting_names(sql)
                self._after_resets(link, reset_targets(sql))
            if drops_statements(sql) and query_entry is not None:
                # Only once it worked: a DEALLOCATE ALL in an aborted transaction fails.
                listen_done = query_entry.on_done

                def dropped(ok: bool, link: BackendLink = link) -> None:
                    if listen_done is not None:
                        listen_done(ok)
                    if ok:
                        self._dropped_all(link)

                query_entry.on_done = dropped
        elif mtype == P:
            self._parse(link, payload, raw)
        elif mtype == B:
            pe = _cstr_end(payload, 0)
            se = _cstr_end(payload, pe + 1)
            name = payload[pe + 1 : se]
            if (name in self.setting_stmts) if name else self.unnamed_sets:
                self.settings_dirty = True
                effects = self.stmt_effects.get(name) if name else self.unnamed_effects
                if effects is not None:
                    self.pending_resets += effects[0]
                    self.pending_drop = self.pending_drop or effects[1]
            # Executing it may create pinning state (the Parse may be a Sync earlier).
            pin = self.stmt_pins.get(name) if name else self.unnamed_pin
            if pin is not None:
                self.pins.add(pin)
                self.pin_epoch += 1
                self.pin_check = True
            self.portal_listen = self.stmt_listen.get(name, ()) if name else self.unnamed_listen
            dep = self.sql_deps.get(name) if name else self.unnamed_dep
            if dep is not None and dep in self.sql_stmts:
                self._ensure_sql_prepared_extended(link, dep)
            heal = names = None
            if name:
                bname = self._backend_stmt(link, name)
                if bname is None:
                    return
                raw = _msg(B, payload[: pe + 1] + bname + payload[se:])
                heal = self.stmts[name][1]
                names = (bname, name)
            else:
                self._ensure_unnamed(link)
            link.send(K_BIND, raw, heal=heal, names=names)
        elif mtype == D:
            kind = payload[:1]
            if kind == b"S":
                end = _cstr_end(payload, 1)
                name = payload[1:end]
                if name:
                    bname = self._backend_stmt(link, name)
                    if bname is None:
                        return
                    raw = _msg(D, b"S" + bname + b"\x00")
                    link.send(K_DESC_S, raw, names=(bname, name))
                else:
                    self._ensure_unnamed(link)
                    link.send(K_DESC_S, raw)
            elif kind == b"P":
                link.send(K_DESC_P, raw)
            else:
                raise ProtocolViolation(f"invalid DESCRIBE message subtype {payload[:1]!r}")
        elif mtype == E:
            ops = self.portal_listen
            link.send(K_EXEC, raw, on_done=self._listen_sent(link, ops) if ops else None)
        elif mtype == S:
            self.skip_until_sync = self.unsynced = False
            link.send(K_SYNC, raw)
            if self.pending_drop:
                self.pending_drop = False
                self._dropped_all(link)
            if self.pending_resets:
                targets, self.pending_resets = self.pending_resets, ()
                self._after_resets(link, targets)
        elif mtype == C:
            kind = payload[:1]
            end = _cstr_end(payload, 1)
            name = payload[1:end]
            if kind == b"S" and name:
                # Other sessions may share the backend statement: only our name goes.
                self.stmts.pop(name, None)
                self.stmt_listen.pop(name, None)
                link.push_synth(be.CLOSE_COMPLETE)
                return
            if kind == b"S":
                self.unnamed_parse = self.unnamed_token = None
            elif kind != b"P":
                raise ProtocolViolation(f"invalid CLOSE message subtype {payload[:1]!r}")
            link.send(K_CLOSE, raw)
        elif mtype == H or mtype in COPY_MSGS:
            link.write(raw)
        elif mtype == F:
            link.expect(K_QUERY)
            link.write(raw)
        else:
            raise ProtocolViolation(f"invalid frontend message type {mtype}")

    def _parse(self, link: BackendLink, payload: bytes, raw: bytes) -> None:
        ne = _cstr_end(payload, 0)
        name = payload[:ne]
        body = payload[ne + 1 :]
        qe = _cstr_end(body, 0)
        query = body[:qe]
        self._note_pins(query)
        ops = self._listen_ops(query)
        if name:
            if ops:
                self.stmt_listen[name] = ops
            else:
                self.stmt_listen.pop(name, None)
        else:
            self.unnamed_listen = ops
        pin = pin_reason(query)
        if name:
            if pin is None:
                self.stmt_pins.pop(name, None)
            else:
                self.stmt_pins[name] = pin
        else:
            self.unnamed_pin = pin
        dep: bytes | None = None
        if self.sql_stmts and sql_prepare.mentions_prepared(query):
            cmd = sql_prepare.parse(query)
            if cmd is not None and cmd.kind != "prepare" and cmd.name in self.sql_stmts:
                # EXECUTE/DEALLOCATE of our SQL statement, sent through Parse (psycopg does).
                bname = self._ensure_sql_prepared_extended(link, cmd.name)
                query = query[: cmd.start] + bname + query[cmd.end :]
                body = query + body[qe:]
                payload = name + b"\x00" + body
                raw = _msg(P, payload)
                if cmd.kind == "deallocate":
                    self.sql_stmts.pop(cmd.name, None)
                    link.prepared.discard(bname)
                else:
                    dep = cmd.name  # binding this statement later needs our SQL statement
        sets = changes_settings(query)
        effects = None
        if sets:
            self.custom_names |= custom_setting_names(query)
            # What executing it does beyond its result, applied at the group's Sync.
            effects = (reset_targets(query), drops_statements(query))
        if name:
            self.stmt_effects[name] = effects
        else:
            self.unnamed_effects = effects
        if name:
            if dep is None:
                self.sql_deps.pop(name, None)
            else:
                self.sql_deps[name] = dep
        else:
            self.unnamed_dep = dep
        if not name:
            self.unnamed_sets = sets
            token = object()
            self.unnamed_parse, self.unnamed_token = raw, token
            link.unnamed_of = token

            def parsed(ok: bool, link: BackendLink = link, token: object = token) -> None:
                if not ok and link.unnamed_of is token:
                    link.unnamed_of = None

            link.expect(K_PARSE, on_done=parsed)
            link.write(raw)
            return
        if name in self.stmts:
            self._synth_error(
                link,
                sqlstate.DUPLICATE_PREPARED_STATEMENT,
                f'prepared statement "{name.decode("utf-8", "replace")}" already exists',
            )
            return
        bname = self.worker.statement_name(body)
        entry = (bname, _msg(P, bname + b"\x00" + body))
        self.stmts[name] = entry
        if sets:
            self.setting_stmts.add(name)
        else:
            self.setting_stmts.discard(name)

        def parsed_named(ok: bool, link: BackendLink = link) -> None:
            if ok:
                self.worker.note_statement(bname)
            else:
                link.prepared.discard(bname)
                if self.stmts.get(name) is entry:
                    del self.stmts[name]

        if bname in link.prepared:
            link.prepared.touch(bname)
            link.push_synth(be.PARSE_COMPLETE, on_done=parsed_named)
        else:
            link.make_room()
            link.prepared.add(bname)
            link.expect(K_PARSE, on_done=parsed_named)
            link.write(entry[1])

    def _backend_stmt(self, link: BackendLink, name: bytes) -> bytes | None:
        """Backend name for our statement ``name``, prepared there first if need be."""
        entry = self.stmts.get(name)
        if entry is None:
            self._synth_error(
                link,
                sqlstate.UNDEFINED_PSTATEMENT,
                f'prepared statement "{name.decode("utf-8", "replace")}" does not exist',
            )
            return None
        bname, parse_raw = entry
        if bname in link.prepared:
            link.prepared.touch(bname)
        else:
            link.make_room()
            link.expect(K_PARSE, swallow=1, on_done=link.assume_prepared(bname))
            link.write(parse_raw)
        return bname

    def _ensure_unnamed(self, link: BackendLink) -> None:
        """The unnamed statement outlives a Sync; re-parse it on a backend that lacks ours."""
        token = self.unnamed_token
        if token is None or link.unnamed_of is token:
            return
        link.unnamed_of = token

        def reparsed(ok: bool, link: BackendLink = link) -> None:
            if not ok and link.unnamed_of is token:
                link.unnamed_of = None

        link.expect(K_PARSE, swallow=True, on_done=reparsed)
        link.write(self.unnamed_parse)

    def _synth_error(self, link: BackendLink, code: str, message: str) -> None:
        """Fail an extended-protocol message with an error pgfleet decides, through the
        backend, so it aborts the transaction (and skips to Sync) exactly as Postgres."""
        link.unnamed_of = None  # the unnamed statement carries the DO block
        link.expect(K_PARSE, swallow=1)
        link.write(fe.encode_parse("", _raise_sql(code, message)))
        link.expect(K_BIND, swallow=1)
        link.write(fe.encode_bind("", "", []))
        link.expect(K_EXEC, swallow=1)
        link.write(fe.encode_execute("", 0))
