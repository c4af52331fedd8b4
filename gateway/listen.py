"""LISTEN without pinning: the worker's side of the pooler's LISTEN hub.

A session's LISTEN still runs on its backend (so errors, command tags and
transaction rules are Postgres's own), but before it runs the worker makes sure
the hub listens on the channel, and before the backend goes back to the pool it is
told UNLISTEN *. Notifications come from the hub; copies the backend itself
receives are dropped.

The session's book follows Postgres's rule that LISTEN and UNLISTEN take effect at
commit: changes made in a transaction are applied when it commits and dropped when
it rolls back (a rollback to a savepoint does not undo them: the book sees only
whole transactions). Notifications are delivered when the session is idle, between
transactions, as Postgres delivers them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgwire.backend import encode_notification_bytes
from pgwire.errors import ProtocolViolation

from .classify import effects
from .protocol import READY, WHOLE, B, P, Q, X, cstr_end

if TYPE_CHECKING:
    from .backend import BackendLink
    from .session import Session
    from .worker import Worker

class ListenState:
    """One session's channels, the changes of its open transaction, and the
    notifications waiting for it to be idle."""

    __slots__ = ("channels", "txn_ops", "wanted", "inflight", "queue", "rolled_back",
                 "rollback_at", "failed", "explicit", "counted")

    def __init__(self) -> None:
        self.channels: set[bytes] = set()  # committed
        self.txn_ops: list[tuple[str, bytes | None]] = []  # ("listen"|"unlisten", channel or *)
        self.wanted: set[bytes] = set()  # channels the worker counts this session in for
        # Channels of LISTENs sent to the backend and not answered yet.
        self.inflight: dict[bytes, int] = {}
        # The message held at the gate whose channels ``inflight`` counts already (its
        # gate is passed again once the hub listens).
        self.counted: bytes | None = None
        self.queue: list[tuple[bytes, bytes]] = []  # (channel, NotificationResponse)
        # How the open transaction is going, from the replies the session sees.
        self.rolled_back = False  # the last COMMIT/ROLLBACK tag was ROLLBACK
        self.rollback_at = 0  # txn_ops before it were rolled back (if it was no savepoint's)
        self.failed = False  # an error since the last ReadyForQuery
        self.explicit = False  # a transaction block was open at some ReadyForQuery

    def sent(self, channels: list[bytes]) -> None:
        for ch in channels:
            self.inflight[ch] = self.inflight.get(ch, 0) + 1

    def statement_done(self, ops: tuple[tuple[str, bytes | None], ...], ok: bool,
                       query: bool = False) -> None:
        """``query``: the ops of a whole simple Query, booked at its end, after the tags
        of its statements: if one was ROLLBACK, they settle with it (which of them ran
        before it is not known), else with the Query's last transaction."""
        for op, ch in ops:
            if op == "listen":
                n = self.inflight.get(ch, 0) - 1
                if n > 0:
                    self.inflight[ch] = n
                else:
                    self.inflight.pop(ch, None)
        if ok:
            self.txn_ops.extend(ops)
            if query and self.rolled_back:
                self.rollback_at = len(self.txn_ops)

    def command_tag(self, payload: bytes) -> None:
        """COMMIT and ROLLBACK end a transaction in the middle of a multi-statement
        Query or a pipeline too: what came before settles there, what follows is the
        next transaction's. (ROLLBACK TO SAVEPOINT has the tag ROLLBACK as well: the
        ops before it stay and a later COMMIT applies them, the whole-transaction view.)"""
        if payload.startswith(b"ROLLBACK"):
            self.rolled_back = True
            self.rollback_at = len(self.txn_ops)
        elif payload.startswith(b"COMMIT"):
            self._apply(self.txn_ops)
            self.txn_ops.clear()
            self.rolled_back = False

    def ready(self, status: str) -> bool:
        """At ReadyForQuery: True once a transaction has ended (committed or not)."""
        if status != "I":
            self.explicit = True
            return False
        ops = self.txn_ops[self.rollback_at:] if self.rolled_back else self.txn_ops
        if not (self.failed and not self.explicit):
            self._apply(ops)
        self.txn_ops.clear()
        self.rolled_back = self.failed = self.explicit = False
        return True

    def _apply(self, ops: list[tuple[str, bytes | None]]) -> None:
        """A transaction with these LISTEN/UNLISTEN ops committed."""
        for op, channel in ops:
            if op == "listen":
                self.channels.add(channel)
            elif channel is None:
                self.channels.clear()
            else:
                self.channels.discard(channel)

    def take_deliverable(self) -> list[bytes]:
        """Queued notifications for channels the session (now) listens on."""
        out = [raw for channel, raw in self.queue if channel in self.channels]
        self.queue.clear()
        return out


class Listeners:
    """The worker's sessions by (database, channel), and its registrations at the hub."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.sessions: dict[tuple[str, bytes], set[Session]] = {}
        self.registered: set[tuple[str, bytes]] = set()
        self._waiting: dict[tuple[str, bytes], list[Callable[[dict | None], None]]] = {}

    def want(self, session: Session, channels: list[bytes],
             then: Callable[[dict | None], None]) -> bool:
        """Count ``session`` in for ``channels``. True if the hub already listens on all
        of them; otherwise ``then(error or None)`` is called once it does (or failed)."""
        state = session.listen
        db = session.database
        missing: set[tuple[str, bytes]] = set()
        for ch in channels:
            key = (db, ch)
            self.sessions.setdefault(key, set()).add(session)
            state.wanted.add(ch)
            if key not in self.registered:
                missing.add(key)
        if not missing:
            return True
        errors: list[dict] = []

        def one(key: tuple[str, bytes], error: dict | None) -> None:
            missing.discard(key)
            if error is not None:
                errors.append(error)
            if not missing:
                then(errors[0] if errors else None)

        for key in list(missing):
            callbacks = self._waiting.get(key)
            if callbacks is None:
                self._waiting[key] = [lambda e, key=key: one(key, e)]
                self.worker.pooler.send(
                    {"op": "listen", "db": key[0], "channel": key[1].decode("latin-1")}
                )
            else:
                callbacks.append(lambda e, key=key: one(key, e))
        return False

    def on_listening(self, msg: dict) -> None:
        key = (str(msg["db"]), str(msg["channel"]).encode("latin-1"))
        error = msg.get("error")
        if error is None:
            self.registered.add(key)
            if not self.sessions.get(key):
                self._unregister(key)  # everyone left while it was on its way
        for callback in self._waiting.pop(key, ()):
            callback(error)

    def drop(self, session: Session, channels: set[bytes]) -> None:
        """``session`` no longer listens on ``channels``."""
        db = session.database
        for ch in channels:
            key = (db, ch)
            members = self.sessions.get(key)
            if members is None:
                continue
            members.discard(session)
            if not members:
                del self.sessions[key]
                if key in self.registered:
                    self._unregister(key)
        session.listen.wanted -= channels

    def _unregister(self, key: tuple[str, bytes]) -> None:
        self.registered.discard(key)
        self.worker.pooler.send({"op": "unlisten", "db": key[0], "channel": key[1].decode("latin-1")})

    def on_notify(self, msg: dict) -> None:
        key = (str(msg["db"]), str(msg["channel"]).encode("latin-1"))
        members = self.sessions.get(key)
        if not members:
            return
        pid = self.worker.client_pid_of_backend(int(msg["pid"]))
        raw = encode_notification_bytes(pid, key[1], str(msg["payload"]).encode("latin-1"))
        for session in list(members):
            session.notified(key[1], raw)


def after_transaction(session: Session, link: BackendLink | None, status: str,
                      out: list[bytes] | None) -> None:
    """ReadyForQuery reached ``session`` (through ``link``): settle its book when a
    transaction ended, and hand over the notifications it may now see (to ``out``,
    the replies being forwarded, so that they follow the ReadyForQuery)."""
    state = session.listen
    if not state.ready(status):
        return
    stale = state.wanted - state.channels - state.inflight.keys()
    if stale:
        session.worker.listeners.drop(session, stale)
    if state.queue:
        ready = state.take_deliverable()
        if ready:
            if out is not None:
                out.extend(ready)
            else:
                session.write_client(b"".join(ready))


class ListenSession:
    """Session mixin: LISTEN statements wait for the hub; notifications wait for idle."""

    __slots__ = ()

    def _listen_gate(self, mtype: int, payload: bytes, raw: bytes) -> bool:
        """A statement about to LISTEN: count the session in at the hub first, and hold
        it (and what follows) until the hub listens, so nothing is missed."""
        if mtype == Q:
            ops = effects(payload[:-1]).listen
        else:
            pe = cstr_end(payload, 0)
            name = payload[pe + 1 : cstr_end(payload, pe + 1)]
            ops = self.stmt_listen.get(name, ()) if name else self.unnamed_listen
            if self.pending:
                ops = self._queued_parse_ops(name, ops)
        channels = [ch for op, ch in ops if op == "listen"]
        if not channels or "listen" in self.pins:
            return False  # (pinned: the backend's own LISTEN serves the session)
        state = self.listen
        if self.skip_until_sync:
            # An error earlier in its group: Postgres skips it, so it listens on nothing
            # (held here before the error came, its channels are counted: uncount them).
            if state is not None and state.counted is raw:
                state.counted = None
                state.statement_done(ops, False)
            return False
        if state is None:
            state = self.listen = ListenState()
        if state.counted is not raw:
            state.sent(channels)
        state.counted = None
        if self.worker.listeners.want(self, channels, self._hub_answered):
            return False
        state.counted = raw
        self.held = deque([(mtype, payload, raw)])
        self.holds += 1
        return True

    def _queued_parse_ops(self, name: bytes, ops: tuple) -> tuple:
        """The LISTEN ops of the statement a Bind names, when its Parse still waits for
        a backend in the session's queue (a client that pipelines Parse and Bind while
        every backend is busy): the books learn a statement only as its Parse is sent,
        which is after this Bind's gate."""
        for mtype, payload, _ in reversed(self.pending):
            if mtype == WHOLE:
                if not name:  # a plain unit's own unnamed statement, replaced
                    return ()
            elif mtype == P:
                ne = cstr_end(payload, 0)
                if payload[:ne] == name:
                    body = payload[ne + 1 :]
                    return effects(body[: cstr_end(body, 0)]).listen
        return ops

    def _hub_answered(self, error: dict | None) -> None:
        if error is not None:
            # The hub could not listen: the backend's own LISTEN stays, the session pins
            # (and its gate lets the statement through).
            self._add_pin("listen", check=False)
        self._resume_held()

    def _resume_held(self) -> None:
        """A reason to hold the session's messages is gone (the hub listens, or a barrier
        statement was answered: Session._barrier). Once none is left: the queue first,
        then the held messages, each through its gate again (the hub listens now), until
        something holds them again."""
        self.holds -= 1
        if self.holds > 0:
            return
        held, self.held = self.held, None
        if self.phase != READY or held is None:
            return
        link = self.link
        if self.pending and link is not None and not self._send_pending(link):
            return
        try:
            while held and self.held is None and self.phase == READY:
                self._dispatch(*held.popleft())
        except ProtocolViolation as exc:
            self.fatal(exc.sqlstate, exc.message)
            return
        if held:  # held again (another LISTEN, another barrier): the rest waits behind
            self.held.extend(held)
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

    def _listen_sent(self, link: BackendLink, ops: tuple[tuple[str, bytes | None], ...],
                     query: bool = False):
        """The backend runs a statement (``query``: a simple Query) with LISTEN ops:
        returns the on_done that books them once it worked (they take effect when its
        transaction commits)."""
        if self.listen is None:
            self.listen = ListenState()
        if any(op == "listen" for op, _ in ops):
            link.listened = True  # UNLISTEN * before the backend goes back
        state = self.listen

        def done(ok: bool) -> None:
            state.statement_done(ops, ok, query)

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
