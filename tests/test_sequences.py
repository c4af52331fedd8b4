"""currval() and lastval() through pgfleet: the session's own values, or Postgres's 55000.

Sequence state lives in a backend: currval() and lastval() answer with the last
nextval() that backend ran, and a session's transactions may run on different
backends. With one backend shared by several sessions, these tests interleave their
INSERTs into a serial column. pgfleet must never answer one session with another's
value (a PHP lastInsertId() would link rows to someone else's); where the session's
own value is not on the backend it gets what Postgres gives a session that has called
no nextval() there.
"""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from .conftest import PASSWORD
from .wire import libpq_pipeline


def _server_with_serial_table(make_server, backends: int):
    """One worker (the sessions share its backends) and a table with a serial column."""
    srv = make_server("--pool-size", str(backends), "--workers", "1", "--query-wait-timeout", "10")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists seq_rows")
        admin.execute("create table seq_rows(id serial primary key, who text)")
    return srv


@pytest.fixture(scope="module")
def one_backend(make_module_server):
    return _server_with_serial_table(make_module_server, 1)


@pytest.fixture(scope="module")
def two_backends(make_module_server):
    return _server_with_serial_table(make_module_server, 2)


def connect(srv) -> psycopg.Connection:
    return psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)


def insert(conn: psycopg.Connection, who: str) -> int:
    return conn.execute("insert into seq_rows(who) values (%s) returning id", (who,)).fetchone()[0]


def not_defined(conn: psycopg.Connection, sql: str, *params: object) -> bool:
    """True if ``sql`` fails as in a session that called no nextval()."""
    try:
        conn.execute(sql, params or None)
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return True
    return False


def test_another_sessions_sequence_values_are_never_returned(one_backend):
    a, b, fresh = connect(one_backend), connect(one_backend), connect(one_backend)
    try:
        insert(a, "a")
        insert(b, "b")
        # A session that never called nextval(): Postgres's own error, not b's id.
        assert not_defined(fresh, "select lastval()")
        assert not_defined(fresh, "select currval('seq_rows_id_seq')")
        assert not_defined(fresh, "select currval(%s::regclass)", "seq_rows_id_seq")
        # a's value is not on the backend any more (b's INSERT ran there since).
        assert not_defined(a, "select lastval()")
    finally:
        for c in (a, b, fresh):
            c.close()


@pytest.mark.parametrize("reader", ["simple", "prepared"])
def test_what_another_session_left_is_cleared_before_a_read(one_backend, reader):
    """The backend a session reads on last served another session that called nextval():
    the reader gets Postgres's 55000 however it came to hold that backend. Three ways
    used to read the other session's values: a session pinned there (an advisory lock,
    whose check query was still outstanding when the read came), a session whose
    earlier statement there wrote no sequence state, and a setval() (which defines
    currval() but not lastval()). ``prepared``: the reads go as named statements whose
    text another session prepared first, answered by pgfleet without a backend."""
    a, b = connect(one_backend), connect(one_backend)
    prepare = reader == "prepared"
    try:
        a.execute("create sequence if not exists seq_other")
        for sql in ("select lastval()", "select currval('seq_rows_id_seq')"):
            insert(a, "a")
            assert a.execute(sql, prepare=prepare).fetchone()  # a's own: text known
            b.execute("select 1")  # ran where a's sequence state is
            assert not_defined(b, sql) if not prepare else _not_defined_prepared(b, sql)
        insert(a, "a")
        b.execute("select pg_try_advisory_lock(77)")  # pinned where a's state is
        assert _not_defined_prepared(b, "select lastval()") if prepare else not_defined(
            b, "select lastval()")
        b.execute("select pg_advisory_unlock(77)")
        insert(a, "a")
        assert b.execute("select setval('seq_other', 5)").fetchone() == (5,)
        assert b.execute("select currval('seq_other')", prepare=prepare).fetchone() == (5,)
        # setval() defines no lastval(): Postgres's 55000, not a's last INSERT's id.
        assert _not_defined_prepared(b, "select lastval()") if prepare else not_defined(
            b, "select lastval()")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("reader", ["simple", "prepared"])
def test_a_pinned_sessions_transaction_leaves_another_sessions_state_foreign(
        one_backend, reader):
    """A session pinned where another called nextval() (a temp table), then in a
    transaction: a nextval() that fails there (the transaction is aborted) defines
    nothing, and a nextval() of another sequence that runs there leaves the first
    undefined. Both used to count the backend's sequence state as the session's own
    when the transaction ended, and currval() answered with the other session's value."""
    a, b = connect(one_backend), connect(one_backend)
    prepare = reader == "prepared"
    try:
        a.execute("create sequence if not exists seq_other")
        for statement in ("select 1/0", None):
            insert(a, "a")  # (on the only backend)
            assert a.execute("select currval('seq_rows_id_seq')", prepare=True).fetchone()
            b.execute("create temp table pinned_here (x int)")
            with b.transaction():
                if statement is not None:
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        b.execute(statement)
                    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                        b.execute("select nextval('seq_other')", prepare=prepare)
                    raise psycopg.Rollback
                assert b.execute("select nextval('seq_other')", prepare=prepare).fetchone()
            sql = "select currval('seq_rows_id_seq')"
            assert _not_defined_prepared(b, sql) if prepare else not_defined(b, sql)
            b.execute("drop table pinned_here")  # (a's turn again)
    finally:
        a.close()
        b.close()


def test_a_write_skipped_in_a_pipeline_leaves_another_sessions_state_foreign(one_backend):
    """A setval() or nextval() pipelined behind a statement that fails is skipped, as
    Postgres skips everything up to the Sync after an error: the backend's sequence state,
    another session's, used to count as the session's own when the pipeline ended."""
    a, b = connect(one_backend), connect(one_backend)
    try:
        a.execute("create sequence if not exists seq_other")
        for write in ("select setval('seq_other', 5)", "select nextval('seq_other')"):
            insert(a, "a")  # (on the only backend)
            results = libpq_pipeline(b, ["CLOSE no_such_cursor", write])
            assert [r[:2] for r in results] == [("FATAL_ERROR", "34000"),
                                                ("PIPELINE_ABORTED", None)]
            assert not_defined(b, "select currval('seq_rows_id_seq')")
            assert not_defined(b, "select currval('seq_other')")
    finally:
        a.close()
        b.close()


def _not_defined_prepared(conn: psycopg.Connection, sql: str) -> bool:
    try:
        conn.execute(sql, prepare=True)
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return True
    return False


def test_a_sessions_own_values_are_returned(one_backend):
    a, b = connect(one_backend), connect(one_backend)
    try:
        # In the transaction of the INSERT, as in Postgres.
        with a.transaction():
            mine = insert(a, "a")
            assert a.execute("select lastval()").fetchone() == (mine,)
            assert a.execute("select currval('seq_rows_id_seq')").fetchone() == (mine,)
        # In the next transaction, nobody else having used the backend in between.
        assert a.execute("select lastval()").fetchone() == (mine,)
        for _ in range(3):
            insert(b, "b")
            mine = insert(a, "a")
            # Its INSERT ran the backend's last nextval(): its value, as in Postgres.
            assert a.execute("select lastval()").fetchone() == (mine,)
            assert a.execute("select currval(%s::regclass)", ("seq_rows_id_seq",)).fetchone() == (
                mine,)
            insert(b, "b")
            # b's INSERT ran there since: not b's value.
            assert not_defined(a, "select lastval()")
    finally:
        a.close()
        b.close()


def test_named_statements_read_only_their_sessions_values(one_backend):
    """asyncpg prepares every query as a named statement (parsed once, bound later)."""

    async def main() -> None:
        kw = dict(host="127.0.0.1", port=one_backend.port, user="postgres", password=PASSWORD,
                  database="postgres", timeout=10)
        a, b = await asyncpg.connect(**kw), await asyncpg.connect(**kw)
        try:
            ins = "insert into seq_rows(who) values ($1) returning id"
            for _ in range(3):
                await b.fetchval(ins, "b")
                mine = await a.fetchval(ins, "a")
                assert await a.fetchval("select lastval()") == mine
                await b.fetchval(ins, "b")
                with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
                    await a.fetchval("select lastval()")
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_an_insert_and_the_lastval_after_it_share_a_backend(two_backends):
    """Two sessions take turns with autocommit INSERTs and lastval() (PHP's
    lastInsertId(), Doctrine's identity columns): with a second backend idle, each
    session's INSERT leaves its backend to it, so its lastval() and currval() find its
    own value, as in Postgres, instead of 55000."""
    a, b = connect(two_backends), connect(two_backends)
    simple = psycopg.ClientCursor(a)  # the simple query protocol
    try:
        with a.transaction(), b.transaction():  # both backends open, both idle after
            a.execute("select 1")
            b.execute("select 1")
        for _ in range(3):
            mine_a = insert(a, "a")
            mine_b = insert(b, "b")
            assert a.execute("select lastval()").fetchone() == (mine_a,)
            assert b.execute("select lastval()").fetchone() == (mine_b,)
            assert a.execute("select currval('seq_rows_id_seq')").fetchone() == (mine_a,)
            # Another statement in between keeps the backend the session's too.
            assert b.execute("select count(*) > 0 from seq_rows").fetchone() == (True,)
            assert b.execute("select currval('seq_rows_id_seq')").fetchone() == (mine_b,)
            simple.execute("insert into seq_rows(who) values ('a')")
            insert(b, "b")
            simple.execute("select who from seq_rows where id = lastval()")
            assert simple.fetchone() == ("a",)
    finally:
        a.close()
        b.close()


def test_a_nextval_and_the_currval_after_it_share_a_backend(two_backends):
    """The same with nextval() called by name (sequences drawn first and used after,
    as code ported from Oracle does): another session's statement in between does not
    take the backend that holds the session's value, so currval() finds it."""
    a, b = connect(two_backends), connect(two_backends)
    simple = psycopg.ClientCursor(a)  # the simple query protocol
    seq = "seq_rows_id_seq"
    try:
        with a.transaction(), b.transaction():  # both backends open, both idle after
            a.execute("select 1")
            b.execute("select 1")
        for _ in range(3):
            mine_a = a.execute("select nextval(%s)", (seq,)).fetchone()[0]
            assert b.execute("select 1").fetchone() == (1,)
            assert a.execute("select currval(%s)", (seq,)).fetchone() == (mine_a,)
            mine_b = b.execute("select nextval(%s)", (seq,)).fetchone()[0]
            assert a.execute("select 2").fetchone() == (2,)
            assert b.execute("select lastval()").fetchone() == (mine_b,)
            simple.execute(f"select nextval('{seq}')")
            drawn = simple.fetchone()[0]
            assert b.execute("select 3").fetchone() == (3,)
            simple.execute(f"insert into seq_rows(id, who) values (currval('{seq}'), 'a') "
                           "returning id")
            assert simple.fetchone() == (drawn,)
            # setval() writes the session's state too.
            a.execute("select setval(%s, %s)", (seq, drawn + 100))
            assert b.execute("select 4").fetchone() == (4,)
            assert a.execute("select currval(%s)", (seq,)).fetchone() == (drawn + 100,)
    finally:
        a.close()
        b.close()


def test_a_session_that_reads_lastval_keeps_its_backend_until_it_does(one_backend):
    """With every backend taken and others waiting, the backend freed by an INSERT would
    go to a waiting session at once: a session known to read sequence state keeps it for
    its next statement (briefly: if none comes, the others get it)."""
    a, b = connect(one_backend), connect(one_backend)
    try:
        insert(a, "a")
        assert a.execute("select lastval()").fetchone()[0] > 0  # a reads sequence state
        b_done = threading.Event()

        def b_query() -> None:
            assert b.execute("select 1").fetchone() == (1,)
            b_done.set()

        for _ in range(3):
            # b asks for the only backend while a's INSERT runs on it.
            waiter = threading.Timer(0.15, b_query)
            waiter.start()
            mine = a.execute(
                "insert into seq_rows(who) select 'a' from pg_sleep(0.4) returning id"
            ).fetchone()[0]
            assert a.execute("select lastval()").fetchone() == (mine,)
            waiter.join(10)
            assert b_done.wait(10)
            b_done.clear()
        # An INSERT with nothing after it: the backend goes to b all the same.
        insert(a, "a")
        b_query()
        assert b_done.is_set()
    finally:
        a.close()
        b.close()
