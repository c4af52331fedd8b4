"""A leased Postgres backend inside a gateway worker, and the router of its replies.

The worker writes client messages (sometimes rewritten, sometimes with messages of
its own injected) to the backend. Every message that will be answered pushes an
``Expect`` on the link's queue, so that each reply can be matched to what caused
it: replies to pgfleet's own messages are swallowed, replies pgfleet answers
itself (``synth``) are emitted in their place in the stream, and after an error
in the extended protocol everything up to Sync is dropped, as Postgres does.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ipc.statement_catalog import MAX_PREPARED_PER_BACKEND, backend_name, key_of_name
from pgwire import sqlstate
from pgwire.backend import decode_backend
from pgwire.errors import ProtocolViolation, error_response
from pgwire.framing import MessageFramer
from pgwire.frontend import SYNC, encode_close, encode_describe, encode_execute

from .listen import after_transaction

if TYPE_CHECKING:
    from .session import Session

# Reply kinds.
K_PARSE, K_BIND, K_DESC_S, K_DESC_P, K_EXEC, K_CLOSE, K_SYNC, K_QUERY, K_SYNTH = range(9)

_ASYNC = frozenset(b"NSA")  # NoticeResponse, ParameterStatus, NotificationResponse
_EXEC_END = frozenset(b"CIs")  # CommandComplete, EmptyQueryResponse, PortalSuspended
_END_BYTE = {K_PARSE: ord("1"), K_BIND: ord("2"), K_CLOSE: ord("3")}
E, Z, T, n_ = ord("E"), ord("Z"), ord("T"), ord("n")


_PASS = frozenset(b"TDCNI")  # RowDescription, DataRow, CommandComplete, Notice, EmptyQuery
_LEN = struct.Struct("!I")
_Z_HEAD = b"Z\x00\x00\x00\x05"  # ReadyForQuery, all but its status byte
_PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"  # the whole message: it has no body


def whole_messages(data: bytes, kinds: frozenset[int]) -> int:
    """How many leading bytes of ``data`` are whole messages of ``kinds``."""
    n = len(data)
    pos = 0
    unpack = _LEN.unpack_from
    while n - pos >= 5 and data[pos] in kinds:
        (length,) = unpack(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n:
            break
        pos = end
    return pos


# Replies that need nothing from pgfleet when what asked for them needs nothing either:
# ParseComplete, BindComplete, CloseComplete, ParameterDescription, NoData,
# PortalSuspended, and the _PASS kinds.
_PLAIN_REPLY = frozenset(b"123tns") | _PASS


def _rename_in_error(raw: bytes, backend_name: bytes, client_name: bytes) -> bytes:
    body = raw[5:].replace(b'"' + backend_name + b'"', b'"' + client_name + b'"')
    return raw[:1] + struct.pack("!I", len(body) + 4) + body


class Expect:
    __slots__ = ("kind", "swallow", "on_done", "synth", "rows", "hold_z", "raw", "heal", "names")
    # swallow: 0 = forward replies, 1 = drop them but forward errors, 2 = drop errors
    # too (but forward ParameterStatus)

    def __init__(
        self,
        kind: int,
        swallow: int = 0,
        on_done: Callable[[bool], None] | None = None,
        synth: bytes | None = None,
        rows: list | None = None,
    ) -> None:
        self.kind = kind
        self.swallow = swallow
        self.on_done = on_done
        self.synth = synth
        self.rows = rows  # a swallowed query's DataRows are collected here
        # This query's ReadyForQuery is held back: the quiet replay queued right behind
        # it answers instead, so the client gets the replay's ParameterStatus first.
        self.hold_z = False
        self.raw: bytes | None = None  # the message sent, kept to send it again (heal)
        # For a Bind of a shared statement: its Parse, to re-prepare it if its plan went stale.
        self.heal: bytes | None = None
        # (backend name, client name) of the statement a Bind/Describe refers to, to put
        # the client's name back into an error about it.
        self.names: tuple[bytes, bytes] | None = None


class _BareExpect(Expect):
    """The reply to a plain message, with nothing attached: shared by every link's
    queue (a plain unit books five of them per transaction). Read-only, so a write
    that meant a fresh Expect fails loudly instead of leaking to others. ``raw``: the
    message, for the constant ones (a Sync, an Execute of the unnamed portal) that a
    heal may send again."""

    __slots__ = ()

    def __init__(self, kind: int, raw: bytes | None = None) -> None:
        for slot in Expect.__slots__:
            object.__setattr__(self, slot, None)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "swallow", 0)
        object.__setattr__(self, "hold_z", False)
        object.__setattr__(self, "raw", raw)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"the shared plain Expect is read-only ({name})")


# BARE[kind]: the shared plain Expect of each reply kind.
BARE = tuple(_BareExpect(kind) for kind in range(K_SYNTH))

# What drivers send after a Bind to the unnamed portal, as one chunk, with the shared
# Expects for it: Describe portal, Execute all rows, Sync (pgbench, JDBC), or just
# Execute and Sync (psycopg, the firehose, asyncpg). Each Expect keeps its message.
DESCRIBE_PORTAL = encode_describe("P", "")
EXECUTE_ALL = encode_execute()
PORTAL_TAILS: dict[bytes, tuple[Expect, ...]] = {
    DESCRIBE_PORTAL + EXECUTE_ALL + SYNC: (
        _BareExpect(K_DESC_P, DESCRIBE_PORTAL), _BareExpect(K_EXEC, EXECUTE_ALL),
        _BareExpect(K_SYNC, SYNC)),
    EXECUTE_ALL + SYNC: (_BareExpect(K_EXEC, EXECUTE_ALL), _BareExpect(K_SYNC, SYNC)),
}



class PreparedSet:
    """Backend names of the statements prepared on one backend, least recently used first.

    Bounded: past MAX_PREPARED_PER_BACKEND the oldest are closed on the backend
    (every statement on it is in some session's book and is prepared again when
    needed), so a backend's memory does not grow with every distinct query ever seen.
    """

    __slots__ = ("_names",)

    def __init__(self, names=()) -> None:
        self._names: dict[bytes, None] = dict.fromkeys(names)

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self):
        return iter(self._names)

    def add(self, name: bytes) -> None:
        self._names.pop(name, None)
        self._names[name] = None

    touch = add

    def discard(self, name: bytes) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()

    def keys(self) -> list[int]:
        """The shared catalog's keys of these names, least recently used first."""
        return [k for k in map(key_of_name, self._names) if k is not None]

    def victims(self, limit: int = MAX_PREPARED_PER_BACKEND) -> list[bytes]:
        """Remove and return the oldest names beyond ``limit - 1`` (room for one more)."""
        out = []
        while len(self._names) >= limit:
            name = next(iter(self._names))
            del self._names[name]
            out.append(name)
        return out


class BackendLink(asyncio.Protocol):
    """One backend socket held by this worker, idle in the cache or serving a session."""

    def __init__(self, lease: dict, key: tuple[str, str], manager) -> None:
        self.id: int = lease["id"]
        self.key = key
        self.pid: int = lease["pid"]
        self.secret: int = lease["secret"]
        # GUC values the backend last reported (ParameterStatus), from its startup on.
        self.reported: dict[str, str] = dict(lease.get("params") or {})
        # Settings pgfleet replayed on it for sessions, relative to its defaults.
        self.applied: dict[str, str] = dict(lease.get("applied") or {})
        # The session settings book ``applied`` was last made equal to (identity).
        self.synced_with: dict | None = None
        # Backend-side names of the statements prepared on it, kept in the shared
        # catalog under the backend's slot while no worker holds it.
        self.slot: int = lease.get("slot", -1)
        catalog = manager.worker.catalog
        self.prepared = PreparedSet(
            map(backend_name, catalog.load(self.slot)) if self.slot >= 0 else ()
        )
        # Which session's unnamed statement the backend holds (identity of its Parse).
        self.unnamed_of: object | None = None
        # A session's LISTEN ran here: UNLISTEN * before the backend goes back.
        self.listened = False
        # ALTER ROLE / DATABASE / SYSTEM or pg_reload_conf() ran in the open transaction:
        # once it ends, logins must read the catalogs again.
        self.logins_changed = False
        # The session whose transactions ran here last, and whether the backend's
        # sequence state (what currval() and lastval() answer) may be another's.
        self.seq_owner: Session | None = None
        self.seq_foreign = True
        # An INSERT of seq_owner's ran here (and, most likely, nextval() for a serial
        # column): the idle backend is kept for that session while others have a choice
        # (LeaseManager._take), so its currval() and lastval() find the value.
        self.seq_fresh = False
        # The last transaction here ran an INSERT (cleared when the session is done with
        # it), and the timer of a short hold for a session that reads sequence state
        # (Session._maybe_release).
        self.inserted = False
        self.seq_hold: asyncio.TimerHandle | None = None
        self.manager = manager
        self.transport: asyncio.Transport | None = None
        self.framer = MessageFramer(frontend=False)
        self.queue: deque[Expect] = deque()
        self.session: Session | None = None
        self.status = "I"
        self.copy_in = False
        self.dead = False
        self.draining = False
        self.fatal: bytes | None = None
        self.idle_since = 0.0
        self.needs_reset = False
        # An Execute completed since the last Sync (its effects die with a later error).
        self.group_ran = False
        self.paused_client: Session | None = None
        self.released = False
        self.drain_rollbacks = 0
        self.drain_timer: asyncio.TimerHandle | None = None
        self.cancel_task: asyncio.Task | None = None
        # Error fields of the last failed message pgfleet itself sent (replayed settings).
        self.last_error: dict[str, str] | None = None
        # Someone waiting for the reply queue to empty while no session is attached.
        self.idle_waiter: asyncio.Future | None = None
        self._out: list[bytes] = []
        self._client_out: list[bytes] = []

    # -- transport --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self.transport = None
        w = self.idle_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.session is not None:
            self.session.backend_lost(self)
        else:
            self.manager.link_lost(self)

    def pause_writing(self) -> None:
        # Postgres reads slower than the client sends (a big COPY IN): stop reading the client.
        s = self.session
        if s is not None and s.transport is not None:
            s.transport.pause_reading()
            self.paused_client = s

    def resume_writing(self) -> None:
        s = self.paused_client
        self.paused_client = None
        if s is not None and s.transport is not None and not s.transport.is_closing():
            s.transport.resume_reading()

    def write(self, raw: bytes) -> None:
        self._out.append(raw)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.dead:
            out = self._out
            self._out = []
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def expect(self, kind: int, swallow: int = 0, on_done=None, rows: list | None = None) -> None:
        if kind == K_QUERY:
            self.unnamed_of = None  # Postgres drops the unnamed statement on a simple Query
        self.queue.append(Expect(kind, swallow, on_done, None, rows))

    def nothing_of_the_client_outstanding(self) -> bool:
        """Every reply still owed here answers pgfleet's own messages (a pin check, a
        DISCARD SEQUENCES): a message written now is the next thing of the client's."""
        return all(e.swallow for e in self.queue)

    def expect_all(self, plain: Sequence[Expect]) -> None:
        """Replies to a group of plain messages the caller writes itself (BARE entries)."""
        if plain[0].kind == K_QUERY:
            self.unnamed_of = None
        self.queue.extend(plain)

    def send(self, kind: int, raw: bytes, heal: bytes | None = None,
             names: tuple[bytes, bytes] | None = None, on_done=None) -> None:
        """Write a client's extended-protocol message, remembering it for a heal."""
        e = Expect(kind, 0, on_done)
        e.raw = raw
        e.heal = heal
        e.names = names
        self.queue.append(e)
        self._out.append(raw)

    def lead(self, data: bytes) -> None:
        """A reply pgfleet makes itself, ahead of the first reply to what is written next
        (the queue is empty): it goes out in the same write as the backend's replies."""
        self._client_out.append(data)

    def push_synth(self, data: bytes, on_done=None) -> None:
        """Queue a reply pgfleet makes itself, to go out after everything before it."""
        if not self.queue:
            if self.session is not None:
                self.session.write_client(data)
            if on_done is not None:
                on_done(True)
        else:
            self.queue.append(Expect(K_SYNTH, False, on_done, data))

    def close(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.close()

    # -- replies ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if b"INSERT 0 " in data or _PORTAL_SUSPENDED in data:
            # An INSERT's CommandComplete tag, or a portal suspended before its tag (an
            # INSERT ... RETURNING run for its first row, as asyncpg's fetchval() does):
            # it may have called nextval(). (A row that looks so does no harm.)
            self.seq_fresh = self.inserted = True
        if (
            self.queue
            and data[-6:-1] == _Z_HEAD
            and self.session is not None
            and self._quick_reply(data)
        ):
            return
        framer = self.framer
        out = self._client_out
        queue = self.queue
        if (
            queue
            and not framer.buffered()
            and queue[0].kind == K_QUERY
            and not queue[0].swallow
            and queue[0].rows is None
            and not self.copy_in
            and self.session is not None
            and self.session.listen is None
            and not self.draining
        ):
            # The rows of a client's simple Query: forward them as they came, without
            # cutting them into messages; ReadyForQuery and anything special take the
            # message-by-message path below.
            pos = whole_messages(data, _PASS)
            if pos:
                out.append(data if pos == len(data) else data[:pos])
                data = data[pos:]
        framer.feed(data)
        try:
            while True:
                m = framer.next_message()
                if m is None:
                    break
                self._route(m[0], m[1], m[2], out)
        except ProtocolViolation:
            self.dead = True
            self.fatal = error_response(
                "FATAL", sqlstate.PROTOCOL_VIOLATION, "invalid message from the server"
            )
            self.transport.close()
        if self._out:
            self.flush()  # a heal re-sends messages from inside the reply stream
        session = self.session
        if out:
            self._client_out = []
            if session is not None and not self.draining:
                session.write_client(b"".join(out))
        if session is not None:
            session.backend_progress(self)
        elif self.draining:
            self.manager.drain_progress(self)
        elif self.idle_waiter is not None:
            if (not self.queue or self.dead) and not self.idle_waiter.done():
                self.idle_waiter.set_result(None)
        elif self.fatal is not None or self.dead:
            self.manager.link_lost(self)

    def _quick_reply(self, data: bytes) -> bool:
        """The steady state: the whole answer to what the session sent, up to and
        including its ReadyForQuery, arrived in one read and holds nothing pgfleet acts
        on (no error, no parameter or notification, nothing to swallow or call back):
        it goes to the client as it came, in one write."""
        session = self.session
        queue = self.queue
        last = queue[-1]
        if (
            (last.kind != K_SYNC and (last.kind != K_QUERY or len(queue) > 1))
            or self.copy_in
            or self.draining
            or session.listen is not None
            or self.framer.buffered()
            or whole_messages(data, _PLAIN_REPLY) != len(data) - 6
        ):
            return False
        parsed = None
        # A Sync or Query before the last entry: this read answers only the first of
        # several pipelined units. By position, not identity: units share BARE entries.
        before_last = len(queue) - 1
        for i, e in enumerate(queue):
            if e.__class__ is _BareExpect:  # nothing attached: only its place matters
                if i < before_last and (e.kind == K_SYNC or e.kind == K_QUERY):
                    return False
                continue
            if e.on_done is not None:
                if e.kind != K_PARSE:
                    return False
                # A Parse's callback only books the statement (the client's own Parse).
                parsed = (parsed or []) + [e.on_done]
            if (
                e.swallow
                or e.rows is not None
                or e.hold_z
                or e.kind == K_SYNTH
                or (i < before_last and (e.kind == K_SYNC or e.kind == K_QUERY))
            ):
                return False
        queue.clear()
        self.status = chr(data[-1])
        self.group_ran = False
        if parsed is not None:
            for done in parsed:
                done(True)
        lead = self._client_out
        if lead:  # replies pgfleet made itself, ahead of these (lead())
            self._client_out = []
            lead.append(data)
            data = b"".join(lead)
        session.write_client(data)
        session.backend_progress(self)
        return True

    def _route(self, mtype: int, payload: bytes, raw: bytes, out: list[bytes]) -> None:
        queue = self.queue
        head = queue[0] if queue else None
        if mtype in _ASYNC:
            if mtype == 0x41:
                # The LISTEN hub delivers notifications; the backend's own copies go,
                # unless the session's LISTEN state lives on this backend (pinned).
                session = self.session
                if session is None or "listen" not in session.pins:
                    return
            elif mtype == 0x53:
                name, _, rest = payload.partition(b"\x00")
                self.reported[name.decode("utf-8", "replace")] = rest[:-1].decode(
                    "utf-8", "replace"
                )
            # Quiet replays (after a client's RESET) still report parameters: the
            # client must end up seeing the value its session really has.
            if head is None or not head.swallow or (mtype == 0x53 and head.swallow == 2):
                out.append(raw)
            return
        if head is None:
            # Nothing was asked: only a FATAL error (shutdown, termination) comes unasked.
            if mtype == E:
                self.fatal = raw
                self.dead = True
            return
        kind = head.kind
        if mtype == E:
            session = self.session
            if session is not None and session.listen is not None:
                session.listen.failed = True
            if head.names is not None and head.names[0] in raw:
                # "prepared statement pgf_... does not exist": say the client's name.
                raw = _rename_in_error(raw, *head.names)
            if head.swallow != 2:
                out.append(raw)
            self.copy_in = False
            if head.swallow:
                self.last_error = decode_backend(mtype, payload).fields
            if kind == K_QUERY:
                if head.on_done is not None:
                    head.on_done(False)
                    head.on_done = None
                return
            if kind == K_BIND and head.heal is not None and self._heal(head, payload):
                out.pop()
                return
            # Extended protocol: the failed message and the rest up to Sync get no reply.
            while queue and queue[0].kind != K_SYNC:
                e = queue.popleft()
                if e.on_done is not None:
                    e.on_done(False)
            if not queue and self.session is not None:
                # The group's Sync is still to come (the client sent Flush, or the rest
                # of its pipeline waits at a gate): Postgres ignores what the session
                # sends until then, and so must the session.
                self.session.skip_until_sync = True
            return
        if not head.swallow:
            if not (mtype == Z and head.hold_z):
                out.append(raw)
        elif mtype == Z and head.swallow == 2:
            out.append(raw)
        elif mtype == 0x44 and head.rows is not None:
            head.rows.append(decode_backend(mtype, payload).values)
        done = False
        if mtype == Z:
            self.status = chr(payload[0])
            self.copy_in = False
            done = kind in (K_SYNC, K_QUERY)
        elif mtype == 0x43 and self.session is not None and self.session.listen is not None:
            self.session.listen.command_tag(payload)
            if kind == K_EXEC or kind == K_QUERY:
                self.copy_in = False
                done = kind == K_EXEC
        elif kind == K_EXEC or kind == K_QUERY:
            if mtype in _EXEC_END:
                self.copy_in = False
                done = kind == K_EXEC
            elif mtype == 0x47:  # CopyInResponse
                self.copy_in = True
        elif kind == K_DESC_S or kind == K_DESC_P:
            done = mtype == T or mtype == n_
        else:
            done = _END_BYTE.get(kind) == mtype
        if done:
            if kind == K_EXEC:
                self.group_ran = True
            elif kind == K_SYNC:
                self.group_ran = False
            queue.popleft()
            if head.on_done is not None:
                head.on_done(True)
            while queue and queue[0].kind == K_SYNTH:
                e = queue.popleft()
                out.append(e.synth)
                if e.on_done is not None:
                    e.on_done(True)
        if mtype == Z:
            session = self.session
            if session is not None and session.listen is not None:
                # After the statement's own on_done booked its LISTENs.
                after_transaction(session, self, self.status, out)

    # -- cancel -----------------------------------------------------------------------------
    def _heal(self, head: Expect, payload: bytes) -> bool:
        """A shared statement's cached plan went stale under DDL ("cached plan must not
        change result type"), or the statement is gone from the backend behind our back
        (a DEALLOCATE inside a DO block): a session that prepared it would never see
        that error from Postgres. If nothing before the Bind in this sync group ran and
        nothing is pipelined after its Sync, re-prepare it and send the group again."""
        fields = decode_backend(E, payload).fields
        code, message = fields.get("C"), fields.get("M", "")
        if not (
            (code == "0A000" and "cached plan must not change" in message)
            or (code == "26000" and head.names is not None
                and f'"{head.names[0].decode()}"' in message)
        ):
            return False
        queue = self.queue
        if self.status != "I":
            return False  # inside a transaction the error has already aborted it
        group = list(queue)
        sync_at = next((i for i, e in enumerate(group) if e.kind == K_SYNC), -1)
        if sync_at != len(group) - 1 or any(e.raw is None for e in group):
            return False
        if self.group_ran:
            return False  # an earlier Execute of this group was rolled back with it
        bname = head.raw[5:].split(b"\x00", 2)[1]
        heal = head.heal
        for e in group:
            if e.heal is not None:
                e.heal = None  # once
        queue.clear()
        queue.append(Expect(K_SYNC, 1))  # the failed group's ReadyForQuery
        self.expect(K_CLOSE, swallow=1)
        self._out.append(encode_close("S", bname.decode()))
        self.expect(K_PARSE, swallow=1)
        self._out.append(heal)
        for e in group:
            queue.append(e)
            self._out.append(e.raw)
        return True

    def assume_prepared(self, name: bytes) -> Callable[[bool], None]:
        """Count ``name`` as prepared from now on (the backend handles messages in order);
        the returned callback forgets it again if the Parse turns out to fail."""
        self.prepared.add(name)

        def done(ok: bool) -> None:
            if not ok:
                self.prepared.discard(name)

        return done

    def make_room(self) -> None:
        """Close the least recently used statements if the set is full (inside an
        extended-protocol sequence: the client's Sync ends it)."""
        for name in self.prepared.victims():
            self.expect(K_CLOSE, swallow=1)
            self.write(encode_close("S", name.decode()))

