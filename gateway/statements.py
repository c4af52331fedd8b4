"""A session's prepared statements: protocol-level ones under shared backend names,
SQL-level PREPARE/EXECUTE/DEALLOCATE under per-session names.

Protocol statements get their backend name from the shared catalog (``pgf_<id>``,
see ipc.statement_catalog), so sessions that prepare the same text share one backend
statement, parsed once per backend; a session's book maps its names to them and
prepares them again on a backend that lacks them. SQL-level statements are renamed
``pgfs_<pid>_<n>`` and re-prepared from their PREPARE text where needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from ipc.statement_catalog import key_of_name
from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.errors import error_response

from . import sql_prepare
from .backend import K_BIND, K_CLOSE, K_EXEC, K_PARSE, K_QUERY
from .classify import effects
from .protocol import C, P, Q, cstr_end, msg, raise_sql

if TYPE_CHECKING:
    from .backend import BackendLink


# A session's statement books until it books a statement (StatementBook._own_books):
# one shared empty mapping, read-only, so a write that skipped that step fails loudly.
NO_ENTRIES: Mapping = MappingProxyType({})
CLOSE_UNNAMED = fe.encode_close("S", "")

# A protocol statement that EXECUTEs or DEALLOCATEs a SQL prepared statement: (kind,
# the SQL name, the Parse body the client sent, the backend name its text names now;
# None: the SQL name as written). Postgres looks the name up when it executes it.
SqlRef = tuple[str, bytes, bytes, "bytes | None"]


class StatementBook:
    """Session mixin: the statement books and what Parse, Bind and Close do with them."""

    __slots__ = ()

    def _own_books(self) -> None:
        """Give the session dicts of its own before it books a statement: until then
        all seven share one empty read-only mapping, since most sessions never prepare
        anything (seven empty dicts are 448 bytes per client, and seven more objects for
        the collector). Either all seven are shared or none is."""
        if self.stmts is NO_ENTRIES:
            self.stmts = {}
            self.sql_stmts = {}
            self.sql_deps = {}
            self.stmt_pins = {}
            self.stmt_effects = {}
            self.stmt_listen = {}
            self.stmt_prepares = {}

    def _own_search_path(self) -> str | None:
        """The search_path the session set (None: the backend's default), which names its
        shared statements together with their text (Worker.statement_name)."""
        own = self.settings.get("search_path")
        return None if own is None else own[1]

    def _statement_name(self, body: bytes) -> bytes:
        """The shared backend name of a Parse body, under the session's search_path."""
        return self.worker.statement_name(body, self._own_search_path())

    def _parse_known(self, payload: bytes) -> bool:
        """Answer a named Parse without a backend when this worker has already parsed the
        same text and parameter types successfully; it is prepared on a backend when
        first used. A client that prepares while its other connections hold every
        backend (pgbench -M prepared does, blocking its thread) must not wait here."""
        ne = cstr_end(payload, 0)
        name = payload[:ne]
        if not name or name in self.stmts:
            return False
        link = self.link
        if link is not None and link.status == "E":
            return False  # Postgres refuses it (25P02): the backend answers
        body = payload[ne + 1 :]
        if _SHAPED_BY_CURSOR.match(body):
            return False  # its Describe needs the session's cursor: see _parse
        bname = self._statement_name(body)
        if not self.worker.statement_known(bname):
            return False
        query = body[: cstr_end(body, 0)]
        fx = effects(query)
        if fx.pin is not None:
            return False
        if fx.sequences or fx.advances:
            # Its Bind takes a backend cleared of others' sequence state; a backend the
            # session holds already (pinned, in a transaction) is cleared now if it can be.
            self._uses_sequences(fx, query, link)
        if fx.prepared:
            return False  # may need rewriting or refusing: take the full path
        self._own_books()
        self.stmts[name] = (bname, msg(P, bname + b"\x00" + body))
        self.stmt_pins.pop(name, None)
        self.sql_deps.pop(name, None)
        self.stmt_prepares.pop(name, None)
        if fx.listen:
            self.stmt_listen[name] = fx.listen
        else:
            self.stmt_listen.pop(name, None)
        if fx.sets or fx.drops or fx.logins:
            self.setting_stmts = self.setting_stmts | {name}
            self.custom_names |= fx.custom
            self.stmt_effects[name] = (fx.resets, fx.drops, fx.logins)
        else:
            if name in self.setting_stmts:
                self.setting_stmts = self.setting_stmts - {name}
            self.stmt_effects[name] = None
        self.write_client(be.PARSE_COMPLETE)
        return True

    def _sql_prepared(self, link: BackendLink, cmd: sql_prepare.SqlPrepareCommand,
                      sql: bytes) -> None:
        """Forward a single SQL PREPARE/EXECUTE/DEALLOCATE under the session's backend name."""
        self._own_books()
        entry = self.sql_stmts.get(cmd.name)
        if cmd.kind == "prepare":
            reason = effects(sql).pin
            if reason is not None and reason != "sql_prepare":
                self._add_pin(reason)
            if entry is not None:
                shown = cmd.name.decode("utf-8", "replace")
                self._raise_in_query(link, sqlstate.DUPLICATE_PREPARED_STATEMENT,
                                     f'prepared statement "{shown}" already exists')
                return
            bname = self.worker.sql_statement_name()
            text = sql[: cmd.start] + bname + sql[cmd.end :]
            new = (bname, msg(Q, text + b"\x00"))
            # Booked now, not once it worked: an EXECUTE pipelined right behind it must
            # find it, on this backend, without preparing it again.
            self.sql_stmts[cmd.name] = new
            assumed = link.assume_prepared(bname)

            def prepared(ok: bool) -> None:
                assumed(ok)
                if not ok and self.sql_stmts.get(cmd.name) is new:
                    del self.sql_stmts[cmd.name]

            link.expect(K_QUERY, on_done=prepared)
            link.write(new[1])
            return
        if entry is None:
            if key_of_name(cmd.name) is not None:
                # A statement pgfleet made, shared by other sessions (pg_prepared_statements
                # shows them): this session has no such statement, as in Postgres.
                self._raise_in_query(link, sqlstate.UNDEFINED_PSTATEMENT,
                                     _does_not_exist(cmd.name))
                return
            # Not ours: Postgres answers (e.g. "does not exist") with the client's name.
            link.expect(K_QUERY)
            link.write(msg(Q, sql + b"\x00"))
            return
        bname, prepare_raw = entry
        if bname not in link.prepared:
            link.expect(K_QUERY, swallow=1, on_done=link.assume_prepared(bname))
            link.write(prepare_raw)
        text = sql[: cmd.start] + bname + sql[cmd.end :]
        on_done = None
        if cmd.kind == "deallocate":
            # Unbooked now, so that a PREPARE of the name pipelined behind it succeeds as
            # in Postgres; booked again if it fails (in an aborted transaction, say).
            del self.sql_stmts[cmd.name]
            link.prepared.discard(bname)

            def on_done(ok: bool, link: BackendLink = link) -> None:
                if not ok:
                    self.sql_stmts[cmd.name] = entry
                    link.prepared.add(bname)
        link.expect(K_QUERY, on_done=on_done)
        link.write(msg(Q, text + b"\x00"))

    def _resolve_sql_ref(self, link: BackendLink, name: bytes) -> None:
        """Bind of a statement that EXECUTEs or DEALLOCATEs a SQL prepared statement:
        Postgres finds that statement by name as it executes, so the text must name the
        one the session has now (PREPAREd again since, or only after this Parse)."""
        if name:
            ref = self.sql_deps[name]
            if name not in self.stmts:
                return  # (closed: the Bind fails with 26000)
        else:
            ref = self.unnamed_dep
        kind, sql_name, body, named = ref
        current = self.sql_stmts.get(sql_name)
        sql_bname = None if current is None else current[0]
        if sql_bname != named:
            if sql_bname is not None:
                new_body = _renamed(body, sql_prepare.parse(body[: cstr_end(body, 0)]),
                                    sql_bname)
            else:
                new_body = body  # the name as written: Postgres's 26000
            ref = (kind, sql_name, body, sql_bname)
            if name:
                self.sql_deps[name] = ref
                bname = self._statement_name(new_body)
                self.stmts[name] = (bname, msg(P, bname + b"\x00" + new_body))
            else:
                self.unnamed_dep = ref
                self.unnamed_parse = msg(P, b"\x00" + new_body)
                self.unnamed_token = object()  # parsed again before the Bind
        if sql_bname is not None:
            self._ensure_sql_prepared_extended(link, sql_name)
            if kind == "deallocate":
                self.portal_deallocate = sql_name

    def _deallocate_sent(self, link: BackendLink, sql_name: bytes,
                         on_done: Callable[[bool], None] | None) -> Callable[[bool], None]:
        """The Execute of a DEALLOCATE of our SQL statement is sent: the name is free
        for what follows (a PREPARE pipelined behind it), and back if it fails."""
        entry = self.sql_stmts.pop(sql_name)

        def done(ok: bool) -> None:
            if ok:
                link.prepared.discard(entry[0])
            elif sql_name not in self.sql_stmts:
                self.sql_stmts[sql_name] = entry
            if on_done is not None:
                on_done(ok)

        return done

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
        link.write(fe.encode_query(raise_sql(code, message)))

    def _drop_all_now(self, link: BackendLink) -> Callable[[], None]:
        """_dropped_all as a DEALLOCATE ALL or DISCARD ALL is sent, so that statements
        pipelined behind it see the books Postgres will have; returns what puts them
        back if it fails (in an aborted transaction, DISCARD ALL in a block)."""
        stmts, sql_stmts, prepared = dict(self.stmts), dict(self.sql_stmts), list(link.prepared)
        self._dropped_all(link)

        def undo() -> None:
            self.stmts.update(stmts)
            self.sql_stmts.update(sql_stmts)
            for name in prepared:
                link.prepared.add(name)

        return undo

    def _dropped_all(self, link: BackendLink) -> None:
        """DEALLOCATE ALL / DISCARD ALL: the backend loses every statement, ours and other
        sessions'; our names go, and every statement is prepared again where needed."""
        self._own_books()
        self.stmts.clear()
        self.sql_stmts.clear()
        self.unnamed_parse = self.unnamed_token = None
        link.prepared.clear()
        link.unnamed_of = None

    def _parse(self, link: BackendLink, payload: bytes, raw: bytes, starts_group: bool) -> None:
        """A client's Parse (``starts_group``: the first message since its last Sync)."""
        self._own_books()
        ne = cstr_end(payload, 0)
        name = payload[:ne]
        if name in self.stmts:
            # Refused before anything is booked: the existing statement keeps its pins,
            # effects and dependencies, as in Postgres, where the failed Parse does nothing.
            self._synth_error(
                link,
                sqlstate.DUPLICATE_PREPARED_STATEMENT,
                f'prepared statement "{name.decode("utf-8", "replace")}" already exists',
            )
            return
        body = payload[ne + 1 :]
        qe = cstr_end(body, 0)
        query = body[:qe]
        fx = effects(query)
        if fx.sequences or fx.advances:
            # (Cleared only before anything of the group is written.)
            self._uses_sequences(fx, query, link if starts_group else None)
        # PREPARE/EXECUTE/DEALLOCATE sent through Parse (read once; ``query`` is only
        # rewritten below for a PREPARE, which the EXECUTE/DEALLOCATE branches skip).
        cmd = sql_prepare.parse(query) if fx.prepared else None
        if cmd is not None and cmd.kind != "prepare":
            if cmd.name not in self.sql_stmts and key_of_name(cmd.name) is not None:
                # EXECUTE or DEALLOCATE of another session's statement, as in _sql_prepared
                # (Postgres would fail its Execute; the group fails here, the same way).
                if not name:
                    self.unnamed_parse = self.unnamed_token = None
                self._synth_error(link, sqlstate.UNDEFINED_PSTATEMENT, _does_not_exist(cmd.name))
                return
        prep = None
        if fx.pin == "sql_prepare":
            if cmd is not None and cmd.kind == "prepare":
                # SQL PREPARE through the extended protocol (JDBC's Statement.execute):
                # renamed for this session and booked once its Execute works, as the
                # same statement in a simple Query is, so it does not pin.
                sql_bname = self.worker.sql_statement_name()
                query = query[: cmd.start] + sql_bname + query[cmd.end :]
                body = query + body[qe:]
                payload = name + b"\x00" + body
                raw = msg(P, payload)
                prep = (cmd.name, sql_bname, msg(Q, query + b"\x00"))
                fx = replace(fx, pin=None)
        if name:
            _book(self.stmt_prepares, name, prep)
        else:
            self.unnamed_prepare = prep
        self._note_pins(fx)
        if fx.vacates:
            self.worker.vacate(fx.vacates)
        if name:
            _book(self.stmt_listen, name, fx.listen or None)
            _book(self.stmt_pins, name, fx.pin)
        else:
            self.unnamed_listen = fx.listen
            self.unnamed_pin = fx.pin
        dep: SqlRef | None = None
        if cmd is not None and cmd.kind != "prepare":
            # EXECUTE/DEALLOCATE sent through Parse (psycopg does): the text names our SQL
            # statement's backend name, and each Bind checks it still is the statement
            # of that name (booked as dropped when a DEALLOCATE is executed).
            sql_bname = None
            if cmd.name in self.sql_stmts:
                sql_bname = self._ensure_sql_prepared_extended(link, cmd.name)
            dep = (cmd.kind, cmd.name, body, sql_bname)
            if sql_bname is not None:
                body = _renamed(body, cmd, sql_bname)
                payload = name + b"\x00" + body
                raw = msg(P, payload)
        sets = fx.sets or fx.drops or fx.logins
        done_after = None
        if sets:
            self.custom_names |= fx.custom
            # What executing it does beyond its result, applied at the group's Sync
            # (settings reset, statements dropped) or at its transaction's end (logins).
            done_after = (fx.resets, fx.drops, fx.logins)
        if name:
            self.stmt_effects[name] = done_after
        else:
            self.unnamed_effects = done_after
        if name:
            _book(self.sql_deps, name, dep)
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
        bname = self._statement_name(body)
        entry = (bname, msg(P, bname + b"\x00" + body))
        self.stmts[name] = entry
        if sets:
            self.setting_stmts = self.setting_stmts | {name}
        elif name in self.setting_stmts:
            self.setting_stmts = self.setting_stmts - {name}

        def parsed_named(ok: bool, link: BackendLink = link) -> None:
            if ok:
                self.worker.note_statement(bname)
            else:
                link.prepared.discard(bname)
                if self.stmts.get(name) is entry:
                    del self.stmts[name]

        if bname in link.prepared and _SHAPED_BY_CURSOR.match(query):
            # Postgres fixed this FETCH's result description when the backend parsed it,
            # from the cursor as it was then (perhaps another session's, or none): parse
            # it again, so that a Describe of it sees this session's cursor.
            link.expect(K_CLOSE, swallow=1)
            link.write(msg(C, b"S" + bname + b"\x00"))
            link.expect(K_PARSE, on_done=parsed_named)
            link.write(entry[1])
        elif bname in link.prepared:
            link.prepared.touch(bname)
            link.push_synth(be.PARSE_COMPLETE, on_done=parsed_named)
        else:
            link.make_room()
            link.prepared.add(bname)
            link.expect(K_PARSE, on_done=parsed_named)
            link.write(entry[1])

    def _prepared_by_execute(self, link: BackendLink, prep: tuple[bytes, bytes, bytes],
                             then: Callable[[bool], None] | None) -> Callable[[bool], None]:
        """Book a renamed SQL PREPARE as its Execute is sent, so that an EXECUTE
        pipelined behind it (psycopg's pipeline mode) finds it, and unbook it in the
        returned on_done if it failed (a rollback does not undo it, in Postgres either)."""
        self._own_books()
        name, bname, prepare_raw = prep
        entry = (bname, prepare_raw)
        self.sql_stmts[name] = entry
        assumed = link.assume_prepared(bname)

        def done(ok: bool) -> None:
            if then is not None:
                then(ok)
            assumed(ok)
            if not ok and self.sql_stmts.get(name) is entry:
                del self.sql_stmts[name]

        return done

    def _drop_all_sent(self, link: BackendLink,
                            then: Callable[[bool], None] | None) -> Callable[[bool], None]:
        """A DEALLOCATE ALL or DISCARD ALL (its Execute, or the simple Query of it) is
        sent: the books drop every statement now and get them back in the returned
        on_done if it failed (in an aborted transaction or a block, DISCARD ALL in a
        pipeline's implicit transaction, skipped after an earlier error), when the
        backend still has them."""
        undo = self._drop_all_now(link)

        def done(ok: bool) -> None:
            if then is not None:
                then(ok)
            if not ok:
                undo()

        return done

    def _backend_stmt(self, link: BackendLink, name: bytes) -> bytes | None:
        """Backend name for our statement ``name``, prepared there first if need be."""
        entry = self.stmts.get(name)
        if entry is None:
            self._synth_error(link, sqlstate.UNDEFINED_PSTATEMENT, _does_not_exist(name),
                              before_abort_check=True)
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
        if token is None:
            # We have none, and the backend's may be another session's, which Postgres
            # would never let us use: close it, so that the Bind or Describe fails with
            # 26000 as it would on a backend of our own.
            link.unnamed_of = None
            link.expect(K_CLOSE, swallow=1)
            link.write(CLOSE_UNNAMED)
            return
        if link.unnamed_of is token:
            return
        link.unnamed_of = token

        def reparsed(ok: bool, link: BackendLink = link) -> None:
            if not ok and link.unnamed_of is token:
                link.unnamed_of = None

        link.expect(K_PARSE, swallow=True, on_done=reparsed)
        link.write(self.unnamed_parse)

    def _synth_error(self, link: BackendLink, code: str, message: str,
                     before_abort_check: bool = False) -> None:
        """Fail an extended-protocol message with an error pgfleet decides, through the
        backend, so it aborts the transaction (and skips to Sync) exactly as Postgres.

        ``before_abort_check``: Postgres raises this error before it checks for an
        aborted transaction (a Bind or Describe looks its statement up first), so in one
        the client gets it, not the backend's 25P02: it is answered here, and what the
        session sends up to its Sync is skipped, as the backend would skip it."""
        if before_abort_check and link.status == "E" and link.nothing_of_the_client_outstanding():
            self.skip_until_sync = True
            link.push_synth(error_response("ERROR", code, message))
            return
        link.unnamed_of = None  # the unnamed statement carries the DO block
        link.expect(K_PARSE, swallow=1)
        link.write(fe.encode_parse("", raise_sql(code, message)))
        link.expect(K_BIND, swallow=1)
        link.write(fe.encode_bind("", "", []))
        link.expect(K_EXEC, swallow=1)
        link.write(fe.encode_execute("", 0))


# A statement whose result shape is the shape of a cursor the session has.
_SHAPED_BY_CURSOR = re.compile(rb"\s*fetch\b", re.IGNORECASE)


def _does_not_exist(name: bytes) -> str:
    return f'prepared statement "{name.decode("utf-8", "replace")}" does not exist'


def _renamed(body: bytes, cmd: sql_prepare.SqlPrepareCommand, sql_bname: bytes) -> bytes:
    """A Parse body whose EXECUTE/DEALLOCATE names ``sql_bname`` in place of the
    session's name for it (at ``cmd``'s place in the query)."""
    return body[: cmd.start] + sql_bname + body[cmd.end :]


def _book(table: dict, name: bytes, value: object) -> None:
    """What statement ``name`` does, kept in ``table``; None: it does nothing of the kind."""
    if value is None:
        table.pop(name, None)
    else:
        table[name] = value
