"""One client connection on a gateway worker: startup, login, then the session proper.

The session holds no backend while idle. Its first message needing one takes a
backend (from the worker's cache or the pooler); at ReadyForQuery 'I' with nothing
outstanding the backend goes back, unless the session made backend-local state,
which pins it. The books a session keeps live in mixins of their own: prepared
statements (statements.py), settings (settings_book.py), pins (pins.py) and LISTEN
(listen.py); this module is the protocol, the backend's comings and goings, and
forwarding.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ipc.cancel_table import CLIENT_PID_BASE
from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.errors import ProtocolViolation, error_response
from pgwire.framing import MessageFramer, StartupFramer

from . import sql_prepare, tls
from .backend import (
    BARE,
    K_BIND,
    K_CLOSE,
    K_DESC_P,
    K_DESC_S,
    K_EXEC,
    K_PARSE,
    K_QUERY,
    K_SYNC,
    PORTAL_TAILS,
    whole_messages,
)
from .classify import PLAIN, Effects, effects, might_end_transaction, returns_no_rows
from .listen import ListenSession, ListenState
from .login import Login
from .pins import PinBook
from .protocol import (
    AUTH,
    CLOSED,
    COPY_MSGS,
    EXTENDED,
    READY,
    RFQ_IDLE,
    STARTUP,
    WHOLE,
    B,
    C,
    D,
    E,
    F,
    H,
    P,
    Q,
    S,
    X,
    cstr_end,
    msg,
)
from .settings_book import SettingsBook
from .statements import NO_ENTRIES, SqlRef, StatementBook

if TYPE_CHECKING:
    from .backend import BackendLink, Expect
    from .worker import Worker

UNLISTEN_ALL = fe.encode_query("UNLISTEN *")
DISCARD_SEQUENCES = fe.encode_query("DISCARD SEQUENCES")
_GROUP_KINDS = frozenset(b"PBDES")
_BOUND_KINDS = frozenset(b"BDES")
# The only lengths an Execute or Describe of the unnamed portal or statement can have
# (checked exactly, so that the quick paths never pass on what the framer would refuse).
_EXECUTE_HEAD = b"E\x00\x00\x00\x09"
_DESCRIBE_HEAD = b"D\x00\x00\x00\x06"
# The starting value of a session's small name sets (pins, custom setting names,
# setting statements): shared and immutable, since most sessions never add to them
# (an empty set is 216 bytes and one more object for the collector to track). They
# grow by rebinding (PinBook._add_pin).
NO_NAMES: frozenset = frozenset()
# A session's queue of messages waiting for a backend, until it first queues one: most
# idle sessions never do, and an empty list is 56 bytes each (Session._queue makes one).
NO_PENDING: tuple = ()
QUERY_ONLY = (BARE[K_QUERY],)
# Seconds a backend stays with a session that reads sequence state after its INSERT:
# time for the lastval() that usually follows.
SEQ_HOLD = 0.1
SSL_REQUEST = fe.encode_ssl_request()


class _UnnamedUnit(tuple):
    """The replies an unnamed Parse and Bind followed by one of the usual tails ask
    for: the unit a statement seen before is promoted in (Session._promote)."""

    __slots__ = ()


# An unnamed Parse and Bind followed by one of the usual tails: the replies the whole
# unit asks for. Other shapes take the message-by-message check.
_UNNAMED_TAILS = {tail: _UnnamedUnit((BARE[K_PARSE], BARE[K_BIND], *expects))
                  for tail, expects in PORTAL_TAILS.items()}


class Session(StatementBook, SettingsBook, PinBook, ListenSession, asyncio.Protocol):
    """The asyncio protocol of one client connection."""

    # A session per client connection: slots keep tens of thousands of them small.
    __slots__ = (
        "worker", "transport", "phase", "startup_framer", "framer", "login", "user", "database",
        "key", "settings", "startup_settings", "settings_dirty", "custom_names", "link",
        "waiting", "wait_since", "pending", "pins", "pin_check", "pin_epoch", "stmts",
        "unnamed_parse", "sql_stmts", "sql_deps", "unnamed_dep", "stmt_pins", "stmt_effects",
        "unnamed_effects", "pending_resets", "pending_drop", "portal_drops", "portal_deallocate", "unnamed_pin", "setting_stmts",
        "unnamed_sets", "unnamed_token", "skip_until_sync", "unsynced", "slot", "paused_backend",
        "listen", "stmt_listen", "unnamed_listen", "portal_listen", "held", "holds", "ssl_done", "gss_done", "tls_in_use", "handshaking",
        "tls_task", "corked", "stmt_prepares", "unnamed_prepare", "portal_prepare", "seq_user",
        "seq_writer", "last_link",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.phase = STARTUP
        self.startup_framer: StartupFramer | None = None  # made if a packet is split
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
        self.custom_names: frozenset[str] = NO_NAMES
        self.link: BackendLink | None = None
        self.waiting = False
        # When it started waiting (loop time): the lease manager's sweep ends waits
        # older than query_wait_timeout, instead of a timer per wait.
        self.wait_since = 0.0
        # Messages waiting for a backend (a list once one waits: most sessions never
        # queue more than a few, and most idle ones none).
        self.pending: list[tuple[int, bytes, bytes]] = NO_PENDING  # type: ignore[assignment]
        self.pins: frozenset[str] = NO_NAMES
        # Something ran that may have removed the pinning state: ask the backend what
        # is left before deciding the session is still pinned.
        self.pin_check = False
        self.pin_epoch = 0  # bumped whenever a pin reason is added
        # client statement name -> (backend name, Parse message under that name)
        self.stmts: dict[bytes, tuple[bytes, bytes]] = NO_ENTRIES  # type: ignore[assignment]
        self.unnamed_parse: bytes | None = None
        # SQL-level prepared statements: client name -> (backend name, its PREPARE query).
        self.sql_stmts: dict[bytes, tuple[bytes, bytes]] = NO_ENTRIES  # type: ignore[assignment]
        # Protocol statements (client name; the unnamed one) whose text EXECUTEs one of them.
        self.sql_deps: dict[bytes, SqlRef] = NO_ENTRIES  # type: ignore[assignment]
        self.unnamed_dep: SqlRef | None = None
        # Why executing a statement pins (client name; the unnamed one).
        self.stmt_pins: dict[bytes, str] = NO_ENTRIES  # type: ignore[assignment]
        # Per statement: (settings RESET, drops all statements, changes logins) when executed.
        self.stmt_effects: dict[bytes, tuple[tuple[str, ...], bool, bool] | None] = NO_ENTRIES  # type: ignore[assignment]
        self.unnamed_effects: tuple[tuple[str, ...], bool, bool] | None = None
        self.pending_resets: tuple[str, ...] = ()
        self.pending_drop = False  # a DEALLOCATE ALL / DISCARD ALL was executed since Sync
        self.portal_drops = False  # the unnamed portal's statement is one
        # The SQL statement the portal's statement DEALLOCATEs (booked at its Execute).
        self.portal_deallocate: bytes | None = None
        self.unnamed_pin: str | None = None
        # Statements whose execution may change settings, or roles and databases (client
        # names; the unnamed one): their Bind looks up stmt_effects.
        self.setting_stmts: frozenset[bytes] = NO_NAMES
        self.unnamed_sets = False
        self.unnamed_token: object | None = None
        self.skip_until_sync = False
        # Extended-protocol messages were sent since the last Sync: they form one
        # implicit transaction and may leave an unnamed portal, so the backend stays.
        self.unsynced = False
        # The session's cancel-table slot (-1: none yet, or the table is full). Its
        # secret lives in the table only; the client pid follows from the slot.
        self.slot = -1
        self.paused_backend = False
        # LISTEN: the session's channels (None until it first LISTENs), the LISTEN ops
        # of its statements, and client messages held until the hub listens.
        self.listen: ListenState | None = None
        self.stmt_listen: dict[bytes, tuple[tuple[str, bytes | None], ...]] = NO_ENTRIES  # type: ignore[assignment]
        self.unnamed_listen: tuple[tuple[str, bytes | None], ...] = ()
        self.portal_listen: tuple[tuple[str, bytes | None], ...] = ()
        # SQL PREPAREs sent through Parse: (client name, backend name, PREPARE query),
        # per protocol statement (and the unnamed one), and for the bound portal.
        self.stmt_prepares: dict[bytes, tuple[bytes, bytes, bytes]] = NO_ENTRIES  # type: ignore[assignment]
        self.unnamed_prepare: tuple[bytes, bytes, bytes] | None = None
        self.portal_prepare: tuple[bytes, bytes, bytes] | None = None
        self.held: deque[tuple[int, bytes, bytes]] | None = None
        # Why ``held`` waits: LISTENs waiting for the hub and barrier statements waiting
        # for their answer (ListenSession._resume_held goes on once none is left).
        self.holds = 0
        # Encryption negotiation, as Postgres: one SSLRequest, one GSSENCRequest (refused),
        # in either order, none after TLS started.
        self.ssl_done = False
        self.gss_done = False
        self.tls_in_use = False
        self.handshaking = False
        self.tls_task: asyncio.Task | None = None
        self.corked: list[bytes] | None = None
        # The session read currval() or lastval(): the backends it takes hold no other
        # session's sequence state (see _own_sequences).
        self.seq_user = False
        # A statement of the session calls nextval() or setval(): the backends it runs on
        # may hold its sequence state, as after its INSERTs (see _maybe_release).
        self.seq_writer = False
        # The backend the session last released (LeaseManager._take gives it back to it
        # when the session's INSERT left its sequence state there).
        self.last_link: BackendLink | None = None

    # -- asyncio protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker.sessions[self] = None
        self.login = Login(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == CLOSED:
            return  # close() ended the session already; this is the transport's echo
        self.phase = CLOSED
        self.worker.sessions.pop(self, None)
        if self.login is not None:
            self.login.abort()
            self.login = None
        self._stop_waiting()
        if self.listen is not None and self.listen.wanted:
            self.worker.listeners.drop(self, set(self.listen.wanted))
        link = self.link
        if link is not None:
            self.link = None
            if link.seq_hold is not None:
                link.seq_hold.cancel()
                link.seq_hold = None
            # Settings changed but not yet re-read, or pinned state: reset before reuse.
            self.worker.leases.abandon(
                link, dirty=bool(self.pins) or self.settings_dirty or link.listened
            )
        if self.slot >= 0:
            self.worker.release_slot(self.slot)
            self.slot = -1
        last = self.last_link
        if last is not None:
            self.last_link = None
            if last.seq_owner is self:
                last.seq_fresh = False  # nobody is left to read that state

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
        if (
            self.phase == READY
            and not self.pending
            and self.held is None
            and self.listen is None
            and not self.skip_until_sync
            and not self.framer.buffered()
        ):
            link = self.link
            if data == fe.TERMINATE and link is None:
                self.close()  # (-C: the last of a short session)
                return
            # Held (a transaction, a pinned session): the backend is ours already, unless
            # extended messages wait for their Sync or COPY is under way.
            if link is None or (not self.unsynced and not link.copy_in and not link.dead):
                unit = self._plain_kinds(data) if data[:1] != b"B" else self._bound_unit(data)
                if unit is not None:
                    if link is None:
                        self._send_whole(data, unit)
                    else:
                        self._write_whole(link, data, unit)
                        link.flush()
                    return
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

    # -- the steady state ----------------------------------------------------------------------
    @staticmethod
    def _plain_kinds(data: bytes) -> Sequence[Expect] | None:
        """The replies ``data`` asks for (BARE entries) when it is one whole unit that changes nothing
        about the session, so that it needs none of the general machinery: a simple
        Query, or a group of an unnamed Parse, then Bind, Describe and Execute of the
        unnamed statement and portal, then Sync (pgbench -M extended, psycopg, JDBC
        before it prepares). None: the general path."""
        n = len(data)
        if n < 6:
            return None
        first = data[0]
        if first == Q:
            if n != int.from_bytes(data[1:5], "big") + 1 or effects(data[5:-1]) is not PLAIN:
                return None
            return QUERY_ONLY
        if first != P or n < 11 or data[5] or data[-5:] != fe.SYNC:
            return None
        parse_end = 1 + int.from_bytes(data[1:5], "big")
        if parse_end + 7 < n and data[parse_end] == B and parse_end > 5:
            # The usual shape: one Bind of the unnamed portal and statement, then a
            # known tail, each length checked by the slicing itself.
            bind_end = parse_end + 1 + int.from_bytes(data[parse_end + 1 : parse_end + 5], "big")
            tail = _UNNAMED_TAILS.get(data[bind_end:])
            if tail is not None and bind_end > parse_end + 6:
                if data[parse_end + 5] or data[parse_end + 6]:
                    return None  # a named portal or statement
                query_end = data.find(b"\x00", 6, parse_end)
                if query_end < 0 or effects(data[6:query_end]) is not PLAIN:
                    return None
                return tail
        if whole_messages(data, _GROUP_KINDS) != n:
            return None
        query_end = data.find(b"\x00", 6, parse_end)
        if query_end < 0 or effects(data[6:query_end]) is not PLAIN:
            return None
        kinds = [BARE[K_PARSE]]
        pos = parse_end
        last = n - 5
        while pos < last:
            mtype = data[pos]
            body = pos + 5
            if mtype == B:
                if data[body] or data[body + 1]:  # a named portal or statement
                    return None
                kinds.append(BARE[K_BIND])
                pos += 1 + int.from_bytes(data[pos + 1 : body], "big")
            elif mtype == E:
                if data[pos:body] != _EXECUTE_HEAD or data[body]:
                    return None
                kinds.append(BARE[K_EXEC])
                pos += 10
            elif mtype == D:
                if data[pos:body] != _DESCRIBE_HEAD:
                    return None
                which = data[body : body + 2]
                if which == b"P\x00":
                    kinds.append(BARE[K_DESC_P])
                elif which == b"S\x00":
                    kinds.append(BARE[K_DESC_S])
                else:
                    return None
                pos += 7
            else:  # another Parse, or a Sync before the end
                return None
        if pos != last:
            return None  # the bytes that look like a Sync end another message
        kinds.append(BARE[K_SYNC])
        return kinds

    def _bound_unit(self, data: bytes) -> bytes | None:
        """The name of the statement when ``data`` is one whole Bind of a prepared
        statement of ours that does nothing to the session, to the unnamed portal,
        then an optional Describe of that portal, Execute and Sync (pgbench -M
        prepared, asyncpg, JDBC once it prepares). None: the general path."""
        n = len(data)
        if n < 16 or data[5] or data[-5:] != fe.SYNC:
            return None
        pos = 1 + int.from_bytes(data[1:5], "big")
        name_end = data.find(b"\x00", 6, pos)
        if name_end < 0:
            return None
        name = data[6:name_end]
        if not name or name not in self.stmts or name in self.setting_stmts:
            return None
        if (
            name in self.stmt_pins
            or name in self.stmt_listen
            or name in self.stmt_prepares
            or name in self.sql_deps
        ):
            return None
        if data[pos:] in PORTAL_TAILS:
            return name  # (the name ends inside the Bind, and the tail is exact)
        if whole_messages(data, _BOUND_KINDS) != n:
            return None
        last = n - 5
        while pos < last:
            head = data[pos : pos + 5]
            if head == _EXECUTE_HEAD:
                if data[pos + 5]:
                    return None
                pos += 10
            elif head == _DESCRIBE_HEAD and data[pos + 5 : pos + 7] == b"P\x00":
                pos += 7
            else:  # a second Bind, a Describe of a statement, an early Sync, a bad length
                return None
        return name if pos == last else None

    def _send_whole(self, data: bytes, kinds: Sequence[Expect] | bytes) -> None:
        """Send a plain unit on an idle backend at hand, or queue it whole until one
        comes: either way it is booked and written once, never cut into messages."""
        link = self.worker.leases.take_idle(self.key, self)
        if link is not None:
            self.attach(link)
            self._write_whole(link, data, kinds)
            link.flush()
            return
        self._queue((WHOLE, kinds, data))  # type: ignore[arg-type]
        if not self.waiting:
            self._request_backend()
        link = self.link
        if link is not None:  # the lease manager had one after all
            link.flush()
            self._maybe_release(link)

    def _write_whole(self, link: BackendLink, data: bytes, kinds: Sequence[Expect] | bytes) -> None:
        """Book a plain unit as the general path books its messages, and write it."""
        if type(kinds) is bytes:
            self._write_bound(link, data, kinds)
            return
        if kinds is QUERY_ONLY:
            # A simple Query drops the unnamed statement, for the client too.
            self.unnamed_parse = self.unnamed_token = None
        else:
            # What the unnamed Parse, Bind and Sync of a plain statement book.
            self.unnamed_prepare = self.portal_prepare = self.unnamed_dep = None
            self.portal_drops = False
            self.portal_deallocate = None
            self.unnamed_pin = self.unnamed_effects = None
            self.unnamed_listen = self.portal_listen = ()
            self.unnamed_sets = False
            token = object()
            parse_end = 1 + int.from_bytes(data[1:5], "big")
            self.unnamed_parse = data[:parse_end]
            self.unnamed_token = token
            if (
                type(kinds) is _UnnamedUnit
                and not link.queue
                and link.status != "E"
                and self._promote(link, data, parse_end, token)
            ):
                return  # the backend's unnamed statement is not ours: unnamed_of stays
            link.unnamed_of = token
        link.expect_all(kinds)
        link.write(data)

    def _promote(self, link: BackendLink, data: bytes, parse_end: int, token: object) -> bool:
        """Run an unnamed statement seen before as the shared named statement of its text:
        skip its Parse on a backend that has it (answering ParseComplete here), or parse
        it there under that name once. With nothing else in flight on the backend, and
        outside a transaction block unless the statement returns no rows: if DDL since
        made the cached plan's result type stale, the heal prepares it again and sends
        the unit again, which it cannot do once a transaction block is aborted, so the
        client never sees an error a statement of its own would not raise."""
        body = data[6:parse_end]
        if link.status != "I" and not returns_no_rows(body[: body.find(b"\x00")]):
            return False
        promoted = self.worker.promoted_statement(body, self._own_search_path())
        if promoted is None:
            return False
        bname, parse = promoted
        bind_end = parse_end + 1 + int.from_bytes(data[parse_end + 1 : parse_end + 5], "big")
        if bname in link.prepared:
            link.prepared.touch(bname)
            link.lead(be.PARSE_COMPLETE)
        else:
            link.make_room()
            forget = link.assume_prepared(bname)

            def parsed(ok: bool) -> None:
                forget(ok)
                if not ok and self.unnamed_token is token:
                    # A failed Parse leaves no unnamed statement in Postgres either.
                    self.unnamed_parse = self.unnamed_token = None

            link.expect(K_PARSE, on_done=parsed)
            link.write(parse)
        # The client's Bind of "" names the backend's statement; errors about it say "".
        link.send(K_BIND, msg(B, b"\x00" + bname + data[parse_end + 6 : bind_end]),
                  heal=parse, names=(bname, b""))
        tail = data[bind_end:]
        link.expect_all(PORTAL_TAILS[tail])
        link.write(tail)
        return True

    def _write_bound(self, link: BackendLink, data: bytes, name: bytes) -> None:
        """A unit from _bound_unit: the Bind names the backend's statement (parsed there
        first if this backend lacks it), and each message is kept for a heal."""
        self.portal_listen = ()
        self.portal_prepare = self.portal_deallocate = None
        self.portal_drops = False
        bname = self._backend_stmt(link, name)  # never None: the name was checked
        bind_end = 1 + int.from_bytes(data[1:5], "big")
        bind = msg(B, b"\x00" + bname + data[6 + len(name) : bind_end])
        link.send(K_BIND, bind, heal=self.stmts[name][1], names=(bname, name))
        tail = data[bind_end:]
        expects = PORTAL_TAILS.get(tail)
        if expects is not None:  # the usual tail: booked and written whole
            link.expect_all(expects)
            link.write(tail)
            return
        n = len(data)
        pos = bind_end
        while pos < n:
            end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            mtype = data[pos]
            link.send(K_EXEC if mtype == E else K_DESC_P if mtype == D else K_SYNC,
                      data[pos:end])
            pos = end

    # -- output -----------------------------------------------------------------------------
    def write_client(self, data: bytes) -> None:
        if self.transport is not None and self.phase != CLOSED:
            if self.corked is not None:
                self.corked.append(data)
            else:
                self.transport.write(data)

    def cork(self) -> None:
        """Hold output until uncork(): the end of a login goes out in one write (each
        write to a loopback socket costs the receiver's work too)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        out, self.corked = self.corked, None
        if out and self.transport is not None and self.phase != CLOSED:
            self.transport.write(b"".join(out))

    def fatal(self, code: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse and end this client (only this one)."""
        if self.phase == CLOSED:
            return
        self.write_client(error_response("FATAL", code, message, detail))
        self.close()

    def close(self) -> None:
        if self.corked is not None:
            self.uncork()
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(None)

    # -- startup ----------------------------------------------------------------------------

    def _startup_data(self, data: bytes) -> None:
        sf = self.startup_framer
        if sf is None and data == SSL_REQUEST and not self.handshaking:
            self._encryption_request(True)  # libpq's first packet unless sslmode=disable
            return
        if sf is None or not sf.buffered():
            # The usual read: one whole startup packet, byte for byte one seen before.
            facts = self.worker.startups.get(data)
            if facts is not None and not self.handshaking:
                self.startup_framer = None
                self.phase = AUTH
                self.login.start(facts)
                return
            if sf is None:
                sf = self.startup_framer = StartupFramer()
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
                # As Postgres: the connection closes once the backend has been signalled,
                # so a client that cancels and then sends its next query is not hit late.
                task = self.worker.cancel_client(msg.pid, msg.secret)
                if task is None:
                    self.close()
                else:
                    transport = self.transport
                    task.add_done_callback(lambda _t, tr=transport: tr.close())
                    self.connection_lost(None)  # nothing more is read from this connection
                return
            rest = sf.remaining()
            self.startup_framer = None
            self.phase = AUTH
            self.framer.feed(rest)
            # Its bytes (length word and all), to remember what it asks for.
            self.login.start(msg, (len(pkt) + 4).to_bytes(4, "big") + pkt)

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
        self.tls_task = self.worker.spawn(tls.upgrade(self, raw, ctx))

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
        self.slot, pid, secret = self.worker.claim_slot()
        self.write_client(b"".join((self.worker.status_messages(status),
                                    be.encode_backend_key_data(pid, secret), RFQ_IDLE)))
        self.uncork()
        self.phase = READY
        # A client may have pipelined messages behind its last login message.
        if self.framer.buffered():
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
            self._queue((mtype, payload, raw))
            if not self.waiting:
                self._request_backend()
            return
        self._forward(self.link, mtype, payload, raw)

    def _request_backend(self) -> None:
        self.waiting = True
        self.wait_since = self.worker.loop.time()
        link = self.worker.leases.acquire(self.key, self)
        if link is not None:
            # From inside data_received, which writes and releases once it has read
            # every message: the rest of the batch goes out in the same write.
            self.on_link(link, now=False)

    def _stop_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            self.worker.leases.cancel_wait(self.key, self)

    def on_link(self, link: BackendLink, now: bool = True) -> None:
        """The lease manager hands us a backend (we were waiting for one). ``now``:
        write what was queued for it at once (False: the caller will)."""
        self.waiting = False
        if self.login is not None:
            self.login.on_link(link)
            return
        self.attach(link)
        if not self._send_pending(link):
            return
        if now:
            link.flush()
            self._maybe_release(link)

    def _send_pending(self, link: BackendLink) -> bool:
        """Write the queued messages to ``link``, up to a statement barrier (_barrier;
        a LISTEN held at its gate came after them). False if that ended the session."""
        pending = self.pending
        holds = self.holds
        while pending and self.link is link and self.holds == holds:
            mtype, payload, raw = pending.pop(0)
            if mtype == WHOLE:
                self._write_whole(link, raw, payload)  # type: ignore[arg-type]
                continue
            try:
                self._forward(link, mtype, payload, raw)
            except ProtocolViolation as exc:
                self.fatal(exc.sqlstate, exc.message)
                return False
            if self.phase == CLOSED:
                return False
        if not pending and pending is self.pending:
            self.pending = NO_PENDING
        return True

    def _barrier(self, entry: Expect) -> None:
        """What the client sent behind this statement waits for its answer: it changes
        which prepared statements the session has (SQL PREPARE, DEALLOCATE, DISCARD
        ALL), and only the answer tells whether it did (it fails in an aborted
        transaction), so a pipelined EXECUTE sees the books Postgres has."""
        then = entry.on_done
        if self.held is None:
            self.held = deque()
        self.holds += 1

        def answered(ok: bool) -> None:
            if then is not None:
                then(ok)
            # After the reply being routed has gone out to the client.
            self.worker.loop.call_soon(self._resume_held)

        entry.on_done = answered

    def _queue(self, item: tuple[int, bytes, bytes]) -> None:
        """Queue a message until a backend comes (the list is made by the first one)."""
        pending = self.pending
        if pending is NO_PENDING:
            self.pending = [item]
        else:
            pending.append(item)

    @property
    def client_pid(self) -> int:
        """The pid this client was given in BackendKeyData (0: none, the table was full)."""
        return CLIENT_PID_BASE + self.slot if self.slot >= 0 else 0

    def attach(self, link: BackendLink) -> None:
        self.link = link
        link.session = self
        if link.seq_owner is not self:
            link.seq_owner = self
            link.seq_foreign = True
            link.seq_fresh = link.inserted = False
            if self.seq_user or self.seq_writer:
                self._own_sequences(link)
        elif link.seq_foreign and (self.seq_user or self.seq_writer):
            # Back on a backend whose sequence state is still another session's: the
            # session's statements here since wrote none of its own.
            self._own_sequences(link)
        if self.slot >= 0:
            self.worker.cancel_table.serve(self.slot, link.pid, link.secret)
        settings = self.settings
        if link.synced_with is not settings:  # (the same book as last time: in sync)
            if settings or link.applied:
                self.worker.apply_settings(link, settings)
            else:
                link.synced_with = settings  # both empty: nothing to send

    def _own_sequences(self, link: BackendLink) -> None:
        """Clear the sequence state another session left on the backend before this one
        reads its own: currval() and lastval() answer from the backend, and would give
        another session's values where Postgres gives the session's, or 55000 when it
        called no nextval(). Its own state survives while it keeps using one backend
        no one else used in between (LeaseManager._take and SEQ_HOLD see to that after
        its INSERTs)."""
        link.seq_foreign = False
        link.expect(K_QUERY, swallow=1)
        link.write(DISCARD_SEQUENCES)

    def _uses_sequences(self, fx: Effects, sql: bytes, link: BackendLink | None) -> None:
        """A statement reads currval() or lastval(), or calls nextval() or setval() by name:
        from now on every backend this session takes from another session is cleared of
        its sequence state first; ``link`` too, if the statement is the first the session
        runs on it since (after that, the session's own nextval() calls there would go
        with it). Cleared for a write as well: a setval() then lastval() would otherwise
        read the last sequence another session used there."""
        if (link is not None and link.status == "E" and link.nothing_of_the_client_outstanding()
                and not might_end_transaction(sql)):
            # It fails in the aborted transaction (25P02) and leaves no sequence state:
            # were the session a writer from now on, its backend's state, still another
            # session's, would count as its own when the transaction ends.
            return
        if fx.sequences:
            self.seq_user = True
        if fx.advances:
            self.seq_writer = True
        if link is not None:
            self._clear_foreign_sequences(link)

    def _clear_foreign_sequences(self, link: BackendLink) -> None:
        """DISCARD SEQUENCES ahead of the statement being sent, if the backend's state may
        be another session's and nothing of this session's is outstanding there (queries
        of pgfleet's own, as a pin check, change no sequence state). Inside a transaction
        too (sequence state is not transactional, and DISCARD SEQUENCES runs there),
        unless an INSERT of the session's ran there: its nextval() is the session's."""
        if (link.seq_foreign and link.nothing_of_the_client_outstanding()
                and (link.status == "I" or (link.status == "T" and not link.inserted))):
            self._own_sequences(link)

    def on_lease_failed(self, fields: dict[str, str]) -> None:
        """The pooler could not open a backend for us (e.g. the database is gone)."""
        self.waiting = False
        if self.login is not None:
            self.login.on_lease_failed(fields)
            return
        self._fail_pending(fields.get("C", sqlstate.CONNECTION_FAILURE), fields.get("M", ""))

    def wait_expired(self) -> None:
        """The lease manager took us off its queue: no backend came in query_wait_timeout."""
        self.waiting = False
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
        if pending[0][0] in (Q, F, WHOLE):  # (a whole unit fails as one Query does)
            pending.pop(0)
            out = [err, RFQ_IDLE]
        else:  # extended protocol: the rest up to Sync is skipped, as after any error
            out = [err]
            while pending:
                mtype = pending.pop(0)[0]
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
            mtype = self.pending.pop(0)[0]
            if mtype == Q or mtype == F or mtype == WHOLE:
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
            if link.inserted:
                # The session's INSERT here may have called nextval(): its own sequence
                # state is in the backend now, which a DISCARD would lose. (A nextval()
                # or setval() by name cleared the backend before it ran, unless it came
                # behind other statements of one pipeline, which may have failed and
                # skipped it: then what another session left stays foreign, and a read
                # clears it first, answering 55000 rather than another's value.)
                link.seq_foreign = False
            if link.logins_changed:
                # Its transaction is over (committed or not): the next login anywhere
                # reads the catalogs again, so it sees the new password, defaults or
                # reloaded configuration.
                link.logins_changed = False
                self.worker.role_facts.epoch.bump_sessions()
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
            inserted, link.inserted = link.inserted, False
            if self.seq_writer:
                # What its nextval() calls left is in this backend's sequence state (it
                # may have called none this time: then the backend is only kept for it).
                link.seq_fresh = inserted = True
            held, link.seq_hold = link.seq_hold, None
            if held is not None:
                held.cancel()
            elif inserted and self.seq_user:
                # The session reads sequence state, and its lastval() most likely comes
                # next: the backend stays with it a moment, not to be handed to a waiting
                # session or taken from the idle list meanwhile (once in a row: a loop
                # of INSERTs does not keep it from the others).
                link.seq_hold = self.worker.loop.call_later(SEQ_HOLD, self._end_seq_hold, link)
                return
            self.detach()
            self.worker.leases.put_back(link)

    def _end_seq_hold(self, link: BackendLink) -> None:
        """No statement came in SEQ_HOLD: the backend goes to a waiting session or back
        to the idle list."""
        if self.link is link and not link.queue:
            link.seq_hold = None
            self._maybe_release(link)
        # (A statement of the session's is running: the spent handle stays, so that
        # the backend goes back when it ends, not held again.)

    def detach(self) -> None:
        link = self.link
        self.link = None
        if link is not None:
            self.last_link = link
            link.session = None
            if self.paused_backend and link.transport is not None:
                link.transport.resume_reading()
                self.paused_backend = False
        if self.slot >= 0:
            self.worker.cancel_table.serve(self.slot, 0, 0)

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
        starts_group = False
        if mtype in EXTENDED:
            starts_group = not self.unsynced
            self.unsynced = True
        if mtype == Q:
            sql = payload[:-1]
            # A simple Query drops the unnamed statement, for the client too.
            self.unnamed_parse = self.unnamed_token = None
            fx = effects(sql)
            if fx is PLAIN:  # the common case: nothing to book
                link.expect(K_QUERY)
                link.write(raw)
                return
            if fx.sequences or fx.advances:
                self._uses_sequences(fx, sql, link)
            cmd = sql_prepare.parse(sql) if fx.prepared else None
            if fx.vacates:
                self.worker.vacate(fx.vacates)
            if fx.logins:
                link.logins_changed = True
            query_entry = None
            if cmd is None:
                self._note_pins(fx)
                ops = fx.listen
                link.expect(K_QUERY, on_done=self._listen_sent(link, ops, True) if ops else None)
                query_entry = link.queue[-1]
                link.write(raw)
            else:
                self._sql_prepared(link, cmd, sql)
                if cmd.kind != "execute":
                    self._barrier(link.queue[-1])
            if fx.sets:
                self.settings_dirty = True
                self.custom_names |= fx.custom
                self._after_resets(link, fx.resets)
            if fx.drops and query_entry is not None:
                # Undone if it fails: a DEALLOCATE ALL in an aborted transaction does.
                query_entry.on_done = self._drop_all_sent(link, query_entry.on_done)
                self._barrier(query_entry)
        elif mtype == P:
            self._parse(link, payload, raw, starts_group)
        elif mtype == B:
            pe = cstr_end(payload, 0)
            se = cstr_end(payload, pe + 1)
            name = payload[pe + 1 : se]
            drops = False
            if (name in self.setting_stmts) if name else self.unnamed_sets:
                self.settings_dirty = True
                after = self.stmt_effects.get(name) if name else self.unnamed_effects
                if after is not None:
                    self.pending_resets += after[0]
                    drops = after[1]
                    if after[2]:
                        link.logins_changed = True
            self.portal_drops = drops
            # Executing it may create pinning state (the Parse may be a Sync earlier).
            pin = self.stmt_pins.get(name) if name else self.unnamed_pin
            if pin is not None:
                self._add_pin(pin)
            self.portal_listen = self.stmt_listen.get(name, ()) if name else self.unnamed_listen
            prep = self.stmt_prepares.get(name) if name else self.unnamed_prepare
            self.portal_prepare = prep
            if prep is not None and prep[0] in self.sql_stmts:
                self.portal_prepare = None  # no portal: its Execute books nothing
                shown = prep[0].decode("utf-8", "replace")
                self._synth_error(link, sqlstate.DUPLICATE_PREPARED_STATEMENT,
                                  f'prepared statement "{shown}" already exists')
                return
            self.portal_deallocate = None
            if (self.sql_deps.get(name) if name else self.unnamed_dep) is not None:
                self._resolve_sql_ref(link, name)
            heal = names = None
            if name:
                bname = self._backend_stmt(link, name)
                if bname is None:
                    return
                raw = msg(B, payload[: pe + 1] + bname + payload[se:])
                heal = self.stmts[name][1]
                names = (bname, name)
            else:
                self._ensure_unnamed(link)
            link.send(K_BIND, raw, heal=heal, names=names)
        elif mtype == D:
            kind = payload[:1]
            if kind == b"S":
                end = cstr_end(payload, 1)
                name = payload[1:end]
                if name:
                    bname = self._backend_stmt(link, name)
                    if bname is None:
                        return
                    raw = msg(D, b"S" + bname + b"\x00")
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
            on_done = self._listen_sent(link, ops) if ops else None
            if self.portal_prepare is not None:
                on_done = self._prepared_by_execute(link, self.portal_prepare, on_done)
            if self.portal_deallocate is not None:
                on_done = self._deallocate_sent(link, self.portal_deallocate, on_done)
                self.portal_deallocate = None
            if self.portal_drops:
                on_done = self._drop_all_sent(link, on_done)
                self.pending_drop = True  # what follows the group's Sync waits for it
            link.send(K_EXEC, raw, on_done=on_done)
        elif mtype == S:
            self.skip_until_sync = self.unsynced = False
            link.send(K_SYNC, raw)
            if self.pending_drop:
                # A DEALLOCATE ALL or DISCARD ALL ran in the group: what follows waits
                # for its answer, which tells whether the backend dropped anything.
                self.pending_drop = False
                self._barrier(link.queue[-1])
            if self.pending_resets:
                targets, self.pending_resets = self.pending_resets, ()
                self._after_resets(link, targets)
        elif mtype == C:
            kind = payload[:1]
            end = cstr_end(payload, 1)
            name = payload[1:end]
            if kind == b"S" and name:
                # Other sessions may share the backend statement: only our name goes.
                self._own_books()
                self.stmts.pop(name, None)
                self.stmt_listen.pop(name, None)
                self.stmt_prepares.pop(name, None)
                self.sql_deps.pop(name, None)
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
