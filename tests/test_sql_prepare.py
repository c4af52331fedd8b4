"""SQL PREPARE / EXECUTE / DEALLOCATE from many sessions over one backend, without pinning."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from pgwire import backend as be
from pgwire import frontend as fe

from .conftest import PASSWORD
from .wire import RawClient, data_rows, errors_in, libpq_pipeline


@pytest.fixture(scope="module")
def one_backend(make_module_server):
    return make_module_server("--pool-size", "1", "--workers", "2", "--query-wait-timeout", "5")


def test_same_names_in_many_sessions_over_one_backend(one_backend):
    sessions = [psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
                for _ in range(6)]
    try:
        for i, conn in enumerate(sessions):
            conn.execute(f"prepare q (int) as select $1 * {i + 1}, {i}")
            conn.execute(f'prepare "Mixed Case" as select \'s{i}\'')
        # psycopg switches to protocol-level prepares of "execute q(...)" after 5 runs,
        # so both the simple and the extended path are exercised.
        for round_ in range(12):
            for i, conn in enumerate(sessions):
                assert conn.execute(f"execute q({round_})").fetchone() == (round_ * (i + 1), i)
                assert conn.execute('execute "Mixed Case"').fetchone() == (f"s{i}",)
        for i, conn in enumerate(sessions):
            conn.execute("deallocate q")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                conn.execute("execute q(1)")
            assert conn.execute('execute "Mixed Case"').fetchone() == (f"s{i}",)
            conn.execute("deallocate all")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                conn.execute('execute "Mixed Case"')
    finally:
        for c in sessions:
            c.close()


def test_errors_match_postgres(one_backend):
    via = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    direct = psycopg.connect(one_backend.direct_dsn(), autocommit=True, connect_timeout=10)
    try:
        for conn in (via, direct):
            conn.execute("prepare dup as select 1")
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement) as e:
                conn.execute("prepare dup as select 2")
            assert 'prepared statement "dup" already exists' in str(e.value)
            with pytest.raises(psycopg.errors.InvalidSqlStatementName) as e:
                conn.execute("execute nope")
            assert 'prepared statement "nope" does not exist' in str(e.value)
            with pytest.raises(psycopg.errors.UndefinedColumn):
                conn.execute("prepare bad as select no_such_column")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                conn.execute("execute bad")
            # A duplicate inside a transaction aborts it, as in Postgres.
            conn.execute("begin")
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                conn.execute("prepare dup as select 3")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("select 1")
            conn.execute("rollback")
            assert conn.execute("execute dup").fetchone() == (1,)
            conn.execute("deallocate dup")
    finally:
        via.close()
        direct.close()


def test_sql_prepare_does_not_pin(one_backend):
    a = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        a.execute("prepare held as select 'a'")
        # With one backend, a pinned session would make b wait until the timeout.
        assert b.execute("select 'b'").fetchone() == ("b",)
        assert a.execute("execute held").fetchone() == ("a",)
    finally:
        a.close()
        b.close()


def test_prepare_through_the_extended_protocol_does_not_pin(one_backend):
    """JDBC's Statement.execute sends SQL PREPARE as Parse/Bind/Execute (psycopg does with
    prepare=True): renamed and booked as in a simple Query, it shares the backend."""
    a = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        a.execute("prepare ext_held(int) as select $1 * 2", prepare=True)
        b.execute("prepare ext_held(int) as select $1 * 3", prepare=True)  # same name, own book
        assert b.execute("select 'b runs'").fetchone() == ("b runs",)  # a is not pinned
        assert a.execute("execute ext_held(21)").fetchone() == (42,)
        assert b.execute("execute ext_held(21)").fetchone() == (63,)
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            a.execute("prepare ext_held(int) as select $1", prepare=True)
        a.execute("deallocate ext_held")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("execute ext_held(1)")
        assert b.execute("execute ext_held(1)").fetchone() == (3,)
    finally:
        a.close()
        b.close()


def test_prepare_in_the_unnamed_statement_as_jdbc_sends_it(one_backend):
    c = RawClient(one_backend.port)
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        c.login_scram()
        c.send(fe.encode_parse("", "PREPARE jdbc_p AS SELECT 7") + fe.encode_bind("", "", [])
               + fe.encode_execute("", 0) + fe.SYNC)
        msgs = c.read_until_ready()
        assert not errors_in(msgs), msgs
        assert other.execute("select 'not pinned'").fetchone() == ("not pinned",)
        assert data_rows(c.query("EXECUTE jdbc_p")) == [[b"7"]]
    finally:
        c.close()
        other.close()


@pytest.mark.parametrize("target", ["pgfleet", "postgres"])
def test_execute_pipelined_right_behind_its_prepare(one_backend, target):
    """PREPARE and the EXECUTE of it sent before the PREPARE's answer: two Queries in one
    write, and psycopg's pipeline mode (one group of unnamed Parse/Bind/Execute each).
    The EXECUTE must find the statement, on the same backend, without preparing it
    again; a second PREPARE of the name in the same pipeline fails as in Postgres."""
    dsn = one_backend.dsn() if target == "pgfleet" else one_backend.direct_dsn()
    address = one_backend.port if target == "pgfleet" else one_backend.direct_socket
    with _logged_in(address) as c:
        c.send(fe.encode_query("prepare piped as select 41 + 1") + fe.encode_query("execute piped")
               + fe.encode_query("prepare piped as select 0"))
        first, second, third = c.read_until_ready(), c.read_until_ready(), c.read_until_ready()
        assert not errors_in(first) and not errors_in(second), (first, second)
        assert data_rows(second) == [[b"42"]]
        assert [e.fields["C"] for e in errors_in(third)] == ["42P05"]
        assert 'prepared statement "piped" already exists' == errors_in(third)[0].fields["M"]
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    try:
        with conn.pipeline():
            conn.execute("prepare in_pipeline (int) as select $1 * 2")
            cur = conn.execute("execute in_pipeline(21)")
        assert cur.fetchone() == (42,)
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            with conn.pipeline():
                conn.execute("prepare twice as select 1")
                conn.execute("prepare twice as select 2")
        assert conn.execute("execute twice").fetchone() == (1,)
    finally:
        conn.close()


PIPELINED_CASES = [
    ["prepare x as select 1", "deallocate x", "prepare x as select 2", "execute x"],
    ["prepare y as select 1", "deallocate all", "prepare y as select 3", "execute y"],
    ["prepare z as select 1", "discard all", "execute z", "prepare z as select 4", "execute z"],
    ["prepare a as select 1", "begin", "select 1/0", "deallocate a", "prepare a as select 2",
     "rollback", "execute a", "deallocate a", "prepare a as select 5", "execute a"],
    ["prepare b as select 1", "begin", "select 1/0", "deallocate all", "rollback", "execute b"],
    ["prepare c as select 1", "begin", "discard all", "rollback", "execute c"],
    ["prepare d as select 1", "deallocate d", "deallocate d", "execute d"],
]


def _logged_in(address: int | str) -> RawClient:
    """A raw client logged in to pgfleet (a port: SCRAM) or to Postgres (its socket: trust)."""
    c = RawClient(address)
    try:
        if isinstance(address, int):
            c.login_scram()
        else:
            c.login_trust()
    except BaseException:
        c.close()
        raise
    return c


def _pipelined(address: int | str, statements: list[str]) -> list[tuple]:
    """Send every statement in one write; per statement: tags, SQLSTATEs, rows, status."""
    with _logged_in(address) as c:
        c.send(b"".join(fe.encode_query(s) for s in statements))
        out = []
        for _ in statements:
            msgs = c.read_until_ready()
            out.append(([m.tag for m in msgs if isinstance(m, be.CommandComplete)],
                        [e.fields["C"] for e in errors_in(msgs)], data_rows(msgs),
                        msgs[-1].status))
        return out


@pytest.mark.parametrize("statements", PIPELINED_CASES, ids=lambda s: s[0].split()[1])
def test_statement_books_changed_by_pipelined_queries_match_postgres(one_backend, statements):
    """Queries that change which SQL prepared statements exist (PREPARE, DEALLOCATE,
    DISCARD ALL; failing ones in an aborted transaction too), pipelined with what uses
    them, while the only backend is busy so that they queue first: every answer is
    Postgres's own. What follows such a statement waits for its answer."""
    blocker = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        blocker.execute("begin")
        blocker.execute("select 1")  # holds the only backend: the pipeline queues
        release = threading.Timer(0.3, lambda: blocker.execute("commit"))
        release.start()
        through = _pipelined(one_backend.port, statements)
        release.join()
    finally:
        blocker.close()
    direct = _pipelined(one_backend.direct_socket, statements)
    assert through == direct


@pytest.mark.parametrize("statements", [["select 1", "discard all"],
                                        ["select 1/0", "deallocate all"]],
                         ids=["refused", "skipped"])
def test_drop_all_that_fails_in_a_pipeline_drops_nothing(one_backend, statements):
    """A DISCARD ALL in a pipeline's implicit transaction fails (25001), and a DEALLOCATE
    ALL after an error in its group is skipped: the backend keeps every statement. The
    books must too, or the next session preparing a shared statement there is sent a
    Parse of a name the backend has (42P05)."""
    results = {}
    for target in ("pgfleet", "postgres"):
        dsn = one_backend.dsn() if target == "pgfleet" else one_backend.direct_dsn()
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as first:
            first.execute("select 'kept' as drop_all_test", prepare=True)
            results[target] = [r[:2] for r in libpq_pipeline(first, statements)]
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as second:
                row = second.execute("select 'kept' as drop_all_test", prepare=True).fetchone()
                assert row == ("kept",)
            assert first.execute("select 'kept' as drop_all_test", prepare=True).fetchone() == (
                "kept",)
    assert results["pgfleet"] == results["postgres"]
    assert results["postgres"][1][0] in ("FATAL_ERROR", "PIPELINE_ABORTED")


# (statement, sent as a named protocol statement psycopg reuses: Bind and Execute only)
REEXECUTED_CASES = {
    "execute_after_prepare_again": [
        ("PREPARE pa AS SELECT 1", False), ("EXECUTE pa", True), ("DEALLOCATE pa", False),
        ("PREPARE pa AS SELECT 2", False), ("EXECUTE pa", True), ("EXECUTE pa", True)],
    "deallocate_twice": [
        ("PREPARE pa AS SELECT 1", False), ("DEALLOCATE pa", True),
        ("PREPARE pa AS SELECT 2", False), ("DEALLOCATE pa", True), ("EXECUTE pa", False),
        ("PREPARE pa AS SELECT 3", False), ("EXECUTE pa", False)],
    "execute_prepared_before_its_statement": [
        ("EXECUTE pa", True), ("PREPARE pa AS SELECT 4", False), ("EXECUTE pa", True),
        ("DEALLOCATE pa", True), ("EXECUTE pa", True)],
    "deallocate_in_a_failed_transaction": [
        ("PREPARE pa AS SELECT 1", False), ("BEGIN", False), ("select 1/0", False),
        ("DEALLOCATE pa", True), ("ROLLBACK", False), ("EXECUTE pa", True),
        ("DEALLOCATE pa", True), ("EXECUTE pa", True)],
}


@pytest.mark.parametrize("case", REEXECUTED_CASES, ids=str)
def test_reused_protocol_statements_find_the_sql_statement_of_the_moment(one_backend, case):
    """EXECUTE and DEALLOCATE prepared once as protocol-level statements (psycopg does so
    from a statement's 5th run; with prepare_threshold=0 at once) and run again later:
    Postgres looks the SQL statement up by name as each run executes, so a statement
    PREPAREd again since, or only after the first Parse, is the one found. pgfleet named
    the backend statement of the first Parse for good, and booked a DEALLOCATE as its
    Parse was sent rather than as it ran."""
    outcomes = []
    for dsn in (one_backend.dsn(), one_backend.direct_dsn()):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            seen = []
            for sql, prepare in REEXECUTED_CASES[case]:
                try:
                    cur = conn.execute(sql, prepare=prepare)
                    seen.append(cur.fetchall() if cur.description else cur.statusmessage)
                except psycopg.Error as exc:
                    seen.append(exc.sqlstate)
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1]


def test_asyncpg_runs_an_execute_it_prepared_before_the_statement(one_backend):
    """asyncpg keeps "EXECUTE pa" in its statement cache although its first run failed
    (26000: its Parse and Describe worked), and runs it again once PREPARE pa exists:
    Postgres then executes the new statement (whose row asyncpg, holding the first
    description, refuses with a ProtocolError); pgfleet answered 26000 again."""
    async def outcomes(**connect: object) -> list:
        conn = await asyncpg.connect(timeout=30, **connect)
        seen: list = []
        try:
            for sql in ("EXECUTE pa", "PREPARE pa AS SELECT 1", "EXECUTE pa"):
                try:
                    seen.append([tuple(r) for r in await conn.fetch(sql)])
                except Exception as exc:  # noqa: BLE001 (asyncpg's ProtocolError included)
                    seen.append(type(exc).__name__)
        finally:
            await conn.close()
        return seen

    via = asyncio.run(outcomes(host="127.0.0.1", port=one_backend.port, user="postgres",
                               password=PASSWORD, database="postgres"))
    direct = asyncio.run(outcomes(host=one_backend.socket_dir, port=5432, user="postgres",
                                  database="postgres"))
    assert via == direct
    assert via[-1] == "ProtocolError"  # (it ran: the row came)
