"""psycopg 3 through pgfleet: queries, transactions, COPY, prepared statements, cancel,
errors, startup parameters, authentication, and session pinning.

Where the right answer is "what Postgres itself does", the test asks the embedded
Postgres directly (``server.direct_dsn()``) and compares.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest
from psycopg import errors, sql

from .conftest import PASSWORD
from .waiting import poll
from .wire import raw_login

CONNECT_TIMEOUT = 10
TEST_DEADLINE = 120.0  # seconds; the watchdog cuts every connection of a test stuck longer

# Every ParameterStatus a PostgreSQL 15 backend reports.
REPORTED = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
            "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser",
            "server_encoding", "server_version", "session_authorization",
            "standard_conforming_strings", "TimeZone")


# -- helpers ----------------------------------------------------------------------------------

_open_conns: list[psycopg.Connection] = []
_open_lock = threading.Lock()


def _cut(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down, so that a read blocked on it returns."""
    try:
        fd = os.dup(conn.fileno())
    except (OSError, psycopg.Error):
        return
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


@pytest.fixture(autouse=True)
def watchdog():
    """Bound every test: after TEST_DEADLINE its connections are cut, so nothing hangs."""
    timer = threading.Timer(TEST_DEADLINE, lambda: [_cut(c) for c in list(_open_conns)])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with _open_lock:
            conns = list(_open_conns)
            _open_conns.clear()
        for c in conns:
            try:
                c.close()
            except Exception:
                pass


def connect(dsn: str, **kw) -> psycopg.Connection:
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    conn = psycopg.connect(dsn, **kw)
    with _open_lock:
        _open_conns.append(conn)
    return conn


def direct(server) -> psycopg.Connection:
    """A connection straight to Postgres, for looking from the side and cleaning up."""
    conn = connect(server.direct_dsn(), autocommit=True, options="-c lock_timeout=20s")
    conn.is_direct = True
    return conn


def close_clients() -> None:
    """Close the test's pgfleet connections (so that they hold no locks during cleanup)."""
    with _open_lock:
        conns = [c for c in _open_conns if not getattr(c, "is_direct", False)]
    for c in conns:
        try:
            c.close()
        except Exception:
            pass


def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def scratch(server):
    """``name, d = scratch(prefix, *setup, kind="table")``: a unique table (or schema) name
    and a direct connection ``d``, on which the ``setup`` statements ({name} stands for
    the name) run at once.

    After the test its pgfleet clients are closed (so that they hold no locks) and the
    object is dropped: plainly when ``setup`` created it, "if exists" when the test
    creates it itself.
    """
    made: list[tuple[psycopg.Connection, str, str, bool]] = []

    def make(prefix: str, *setup: str, kind: str = "table") -> tuple[str, psycopg.Connection]:
        name = uniq(prefix)
        d = direct(server)
        for stmt in setup:
            d.execute(stmt.format(name=name))
        made.append((d, kind, name, bool(setup)))
        return name, d

    yield make
    close_clients()
    for d, kind, name, created in made:
        if_exists = "" if created else "if exists "
        cascade = " cascade" if kind == "schema" else ""
        d.execute(f"drop {kind} {if_exists}{name}{cascade}")


def run_threads(targets: list[Callable[[], None]], timeout: float = 90.0) -> None:
    """Run the callables in threads; re-raise the first failure; bounded by ``timeout``."""
    failures: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        for c in list(_open_conns):
            _cut(c)
        for t in stuck:
            t.join(10)
    assert not stuck, f"{len(stuck)} threads did not finish within {timeout} s"
    if failures:
        raise failures[0]


def run_beside(server, main: Callable[[], None], check: Callable[[psycopg.Connection], None],
               others: int) -> None:
    """Run ``main`` while ``others`` sessions of their own each run ``check`` and roll back,
    over and over until ``main`` is done (and at least 5 times each); via run_threads."""
    stop = threading.Event()

    def first() -> None:
        try:
            main()
        finally:
            stop.set()

    def other() -> None:
        c = connect(server.dsn())
        n = 0
        while not stop.is_set() or n < 5:
            check(c)
            c.rollback()
            n += 1
        c.close()

    run_threads([first] + [other] * others)


def fatal_text(exc: psycopg.OperationalError) -> str:
    """The server's message from a libpq connection failure: what follows 'FATAL:  '."""
    msg = str(exc)
    assert "FATAL:" in msg, msg
    # The last attempt's: with sslmode=prefer libpq retries without TLS after a FATAL.
    return msg.rsplit("FATAL:", 1)[1].strip()


# raw_login (tests.wire) shows the SQLSTATE of a failed login (libpq does not expose it
# for connection failures) and compares pgfleet with Postgres itself, over this socket.

def pg_socket(server) -> str:
    return server.direct_socket


# -- plain queries and transactions -----------------------------------------------------------

def test_autocommit_queries(server, scratch):
    t, d = scratch("pf_auto")
    conn = connect(server.dsn(), autocommit=True)
    assert conn.execute("select 1, 'two', null::int, 2.5::numeric").fetchone() == (
        1, "two", None, Decimal("2.5"))
    assert conn.execute("select %s::int + %s::int", (40, 2)).fetchone() == (42,)
    rows = conn.execute("select g, g * g from generate_series(1, 1000) g").fetchall()
    assert rows == [(i, i * i) for i in range(1, 1001)]
    conn.execute(f"create table {t} (id int primary key, v text)")
    conn.execute(f"insert into {t} values (1, 'a'), (2, 'b')")
    # Autocommit: visible to everyone at once.
    assert d.execute(f"select count(*) from {t}").fetchone() == (2,)
    # Several statements in one simple query: one result set each.
    cur = conn.cursor()
    cur.execute(f"select v from {t} where id = 1; select v from {t} where id = 2")
    assert cur.fetchall() == [("a",)]
    assert cur.nextset()
    assert cur.fetchall() == [("b",)]
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # Many small autocommit statements in a row.
    for i in range(3, 103):
        conn.execute(f"insert into {t} values (%s, %s)", (i, str(i)))
    assert d.execute(f"select count(*), sum(id) from {t}").fetchone() == (102, sum(range(1, 103)))


def test_transactions_commit_and_rollback(server, scratch):
    t, d = scratch("pf_tx", "create table {name} (id int primary key, v text)")
    a = connect(server.dsn())
    b = connect(server.dsn(), autocommit=True)
    # Rolled back: no trace anywhere.
    a.execute(f"insert into {t} values (1, 'gone')")
    assert a.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert a.execute(f"select count(*) from {t}").fetchone() == (1,)
    assert b.execute(f"select count(*) from {t}").fetchone() == (0,)
    a.rollback()
    assert a.execute(f"select count(*) from {t}").fetchone() == (0,)
    a.commit()
    assert b.execute(f"select count(*) from {t}").fetchone() == (0,)
    assert d.execute(f"select count(*) from {t}").fetchone() == (0,)
    # Committed: visible to others only after the commit.
    a.execute(f"insert into {t} values (2, 'kept')")
    assert d.execute(f"select count(*) from {t}").fetchone() == (0,)
    a.commit()
    assert b.execute(f"select v from {t}").fetchall() == [("kept",)]
    assert d.execute(f"select v from {t}").fetchall() == [("kept",)]
    # Explicit BEGIN/ROLLBACK in autocommit mode, and a savepoint.
    b.execute("begin")
    b.execute(f"insert into {t} values (3, 'x')")
    b.execute("rollback")
    with a.transaction():
        a.execute(f"insert into {t} values (4, 'outer')")
        with pytest.raises(errors.UniqueViolation):
            with a.transaction():
                a.execute(f"insert into {t} values (5, 'inner')")
                a.execute(f"insert into {t} values (2, 'dup')")
    a.commit()
    assert d.execute(f"select id from {t} order by id").fetchall() == [(2,), (4,)]
    # Context-managed transaction that raises: rolled back.
    with pytest.raises(RuntimeError):
        with a.transaction():
            a.execute(f"insert into {t} values (6, 'no')")
            raise RuntimeError("boom")
    assert d.execute(f"select id from {t} order by id").fetchall() == [(2,), (4,)]
    assert a.execute("select 1").fetchone() == (1,)
    a.rollback()
    # A rolled-back transaction's backend serves the next one cleanly.
    a.execute(f"insert into {t} values (7, 'y')")
    a.rollback()
    assert b.execute(f"select count(*) from {t} where id = 7").fetchone() == (0,)


def test_many_connections_interleaving_transactions(server, scratch):
    t, d = scratch("pf_many", "create table {name} (conn int, n int, primary key (conn, n))")
    # One thread, three sessions with open transactions at once: isolation holds.
    c = [connect(server.dsn()) for _ in range(3)]
    committed = [0, 0, 0]
    pending = [0, 0, 0]
    for n in range(5):
        for i, conn in enumerate(c):
            conn.execute(f"insert into {t} values (%s, %s)", (i, n))
            pending[i] += 1
        for i, conn in enumerate(c):
            # Its own rows, committed or not; of the others' only the committed.
            assert conn.execute(f"select count(*) from {t} where conn = %s",
                                (i,)).fetchone() == (committed[i] + pending[i],)
            others = sum(committed[j] for j in range(3) if j != i)
            assert conn.execute(f"select count(*) from {t} where conn <> %s",
                                (i,)).fetchone() == (others,)
        for i, conn in enumerate(c):
            if i == 0 or (i == 2 and n % 2):
                conn.commit()
                committed[i] += pending[i]
                pending[i] = 0
            elif i == 1:
                conn.rollback()
                pending[i] = 0
            # conn 2 keeps its transaction open over even rounds
    c[2].rollback()
    got = d.execute(f"select conn, count(*) from {t} group by conn order by conn").fetchall()
    # conn 0 committed every round, conn 1 none, conn 2 rounds 0-3 (lost round 4)
    assert got == [(0, 5), (2, 4)]
    d.execute(f"truncate {t}")

    # Many sessions, many threads, transactions committed and rolled back at random.
    nthreads, ntx = 16, 15
    committed: dict[int, set[int]] = {i: set() for i in range(nthreads)}

    def worker(i: int) -> None:
        rnd = random.Random(i)
        conn = connect(server.dsn())
        for n in range(ntx):
            conn.execute(f"insert into {t} values (%s, %s)", (i, n))
            assert conn.execute(f"select count(*) from {t} where conn = %s",
                                (i,)).fetchone() == (len(committed[i]) + 1,)
            if rnd.random() < 0.6:
                conn.commit()
                committed[i].add(n)
            else:
                conn.rollback()
        conn.close()

    run_threads([lambda i=i: worker(i) for i in range(nthreads)])
    rows = d.execute(f"select conn, n from {t}").fetchall()
    want = {(i, n) for i, ns in committed.items() for n in ns}
    assert set(rows) == want and len(rows) == len(want)


# -- COPY -------------------------------------------------------------------------------------

def test_copy_from_stdin_and_to_stdout(server, scratch):
    t, d = scratch("pf_copy")
    n = 10_000

    def row(i: int):
        name = None if i % 13 == 0 else f'name {i}, "quoted"\ttab\\slash é'
        return (i, name, None if i % 7 == 0 else i * 1.5)

    conn = connect(server.dsn())
    conn.execute(f"create table {t} (id int primary key, name text, val float8)")
    with conn.cursor() as cur:
        with cur.copy(f"copy {t} (id, name, val) from stdin") as copy:
            for i in range(n):
                copy.write_row(row(i))
        assert cur.rowcount == n
    conn.commit()
    got = d.execute(f"select count(*), sum(id), count(name), count(val) from {t}").fetchone()
    assert got == (n, n * (n - 1) // 2, n - len(range(0, n, 13)), n - len(range(0, n, 7)))
    assert d.execute(f"select name from {t} where id = 1").fetchone() == (row(1)[1],)

    # COPY TO STDOUT, text rows, then typed rows.
    with conn.cursor() as cur:
        with cur.copy(f"copy (select id, name, val from {t} order by id) to stdout") as copy:
            copy.set_types(["int4", "text", "float8"])
            out = list(copy.rows())
    assert out == [row(i) for i in range(n)]
    with conn.cursor() as cur:
        with cur.copy(f"copy (select id from {t} where id < 5 order by id) to stdout") as copy:
            raw = b"".join(bytes(b) for b in copy)
    assert raw == b"0\n1\n2\n3\n4\n"
    conn.commit()

    # Binary COPY in, in a transaction that is rolled back: nothing stays.
    with conn.cursor() as cur:
        with cur.copy(f"copy {t} (id, name, val) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "float8"])
            for i in range(n, n + 500):
                copy.write_row((i, "bin", 0.5))
    assert conn.execute(f"select count(*) from {t}").fetchone() == (n + 500,)
    conn.rollback()
    assert d.execute(f"select count(*) from {t}").fetchone() == (n,)

    # A COPY that fails half way (duplicate key) leaves the session usable.
    with pytest.raises(errors.UniqueViolation) as ei:
        with conn.cursor() as cur:
            with cur.copy(f"copy {t} (id) from stdin") as copy:
                for i in range(n - 10, n + 10):
                    copy.write_row((i,))
    assert ei.value.sqlstate == "23505"
    conn.rollback()
    assert conn.execute(f"select count(*) from {t}").fetchone() == (n,)
    conn.commit()


# -- prepared statements ----------------------------------------------------------------------

def test_server_side_prepared_statements(server, scratch):
    t, d = scratch("pf_prep", "create table {name} (id int primary key, v text)",
                   "insert into {name} select g, 'v' || g from generate_series(1, 500) g")
    marker = uniq("prepmark")
    q_sum = f"select %s::int + %s::int as s, '{marker}' as m"
    q_row = f"select id, v from {t} where id = %s"
    conn = connect(server.dsn(), autocommit=True, prepare_threshold=0)
    for i in range(200):
        assert conn.execute(q_sum, (i, 1000)).fetchone() == (i + 1000, marker)
        assert conn.execute(q_row, (i % 500 + 1,)).fetchone() == (i % 500 + 1, f"v{i % 500 + 1}")
    # Inside one transaction (one backend): the statement is prepared there under a
    # pgfleet name, not the client's.
    with conn.transaction():
        assert conn.execute(q_sum, (1, 2)).fetchone() == (3, marker)
        names = conn.execute(
            "select name, statement from pg_prepared_statements", prepare=False
        ).fetchall()
    ours = [n for n, s in names if marker in s]
    assert ours, names
    assert all(n.startswith("pgf_") for n in ours), ours
    assert not any(n.startswith("_pg3_") for n, _ in names), names

    # Several sessions preparing the same and different texts concurrently, so that
    # statements meet backends that lack them.
    def worker(k: int) -> None:
        c = connect(server.dsn(), prepare_threshold=0)
        for i in range(60):
            assert c.execute(q_sum, (i, k)).fetchone() == (i + k, marker)
            assert c.execute(f"select %s::text || '-{k}'", (str(i),)).fetchone() == (f"{i}-{k}",)
            if i % 10 == 0:
                c.commit()
                assert c.execute(q_row, (k + 1,)).fetchone() == (k + 1, f"v{k + 1}")
                c.rollback()
        c.close()

    run_threads([lambda k=k: worker(k) for k in range(8)])

    # Errors at Parse, Bind and Execute of prepared statements.
    with pytest.raises(errors.SyntaxError):
        conn.execute("selec %s", (1,))
    with pytest.raises(errors.SyntaxError):
        conn.execute("selec %s", (1,))
    with pytest.raises(errors.InvalidTextRepresentation):
        conn.execute("select %s::int", ("nope",))
    with pytest.raises(errors.DivisionByZero):
        conn.execute("select 1 / %s::int", (0,))
    assert conn.execute("select 1 / %s::int", (1,)).fetchone() == (1,)
    assert conn.execute(q_sum, (5, 5)).fetchone() == (10, marker)
    # A pipeline of prepared executions.
    with conn.pipeline():
        curs = [conn.execute(q_sum, (i, i)) for i in range(20)]
    assert [c.fetchone() for c in curs] == [(2 * i, marker) for i in range(20)]


# -- cancel -----------------------------------------------------------------------------------

def _sleep_and_cancel(server, conn: psycopg.Connection, marker: str) -> BaseException | None:
    d = direct(server)
    result: list[BaseException | None] = []

    def run():
        try:
            conn.execute(f"select pg_sleep(30) /* {marker} */")
            result.append(None)
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    seen = poll(lambda: d.execute(
        "select count(*) from pg_stat_activity where state = 'active' and query like %s "
        "and pid <> pg_backend_pid()", (f"%{marker}%",)).fetchone()[0])
    assert seen, "the sleeping query never showed up in pg_stat_activity"
    conn.cancel_safe(timeout=10)
    th.join(20)
    if th.is_alive():
        _cut(conn)
        th.join(10)
        raise AssertionError("the cancelled query was still running 20 s after the cancel")
    assert poll(lambda: d.execute(
        "select count(*) = 0 from pg_stat_activity where state = 'active' and query like %s "
        "and pid <> pg_backend_pid()", (f"%{marker}%",)).fetchone()[0], timeout=10)
    return result[0]


def test_cancel_running_query(server):
    conn = connect(server.dsn(), autocommit=True)
    exc = _sleep_and_cancel(server, conn, uniq("cancelme"))
    assert isinstance(exc, errors.QueryCanceled), repr(exc)
    assert exc.sqlstate == "57014"
    assert "canceling statement due to user request" in str(exc)
    assert conn.execute("select 42").fetchone() == (42,)

    # Inside a transaction: the transaction is aborted, the session lives on.
    conn2 = connect(server.dsn())
    conn2.execute("select 1")
    exc = _sleep_and_cancel(server, conn2, uniq("cancelme_tx"))
    assert isinstance(exc, errors.QueryCanceled), repr(exc)
    with pytest.raises(errors.InFailedSqlTransaction):
        conn2.execute("select 1")
    conn2.rollback()
    assert conn2.execute("select 7").fetchone() == (7,)
    conn2.commit()
    # A cancel with nothing running is harmless.
    conn.cancel_safe(timeout=10)
    assert conn.execute("select 8").fetchone() == (8,)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("autocommit", [True, False])
def test_errors_keep_session_usable(server, scratch, autocommit):
    t, d = scratch("pf_err", "create table {name} (id int primary key)",
                   "insert into {name} values (1)")
    conn = connect(server.dsn(), autocommit=autocommit)
    cases = [
        ("select 1 / 0", None, errors.DivisionByZero, "22012", "division by zero"),
        (f"insert into {t} values (1)", None, errors.UniqueViolation, "23505",
         "duplicate key value violates unique constraint"),
        ("selec 1", None, errors.SyntaxError, "42601", 'syntax error at or near "selec"'),
        ("select 1 / %s::int", (0,), errors.DivisionByZero, "22012", "division by zero"),
        (f"insert into {t} values (%s)", (1,), errors.UniqueViolation, "23505", "duplicate key"),
        ("select * from no_such_table_xyz", None, errors.UndefinedTable, "42P01",
         'relation "no_such_table_xyz" does not exist'),
    ]
    for query, params, cls, code, text in cases:
        with pytest.raises(cls) as ei:
            conn.execute(query, params)
        assert ei.value.sqlstate == code
        assert ei.value.diag.sqlstate == code
        assert text in ei.value.diag.message_primary
        if not autocommit:
            with pytest.raises(errors.InFailedSqlTransaction) as ei2:
                conn.execute("select 1")
            assert ei2.value.sqlstate == "25P02"
            conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)
        if not autocommit:
            conn.commit()
    # The unique-violation detail names the key, as Postgres does.
    with pytest.raises(errors.UniqueViolation) as ei:
        conn.execute(f"insert into {t} values (1)")
    assert ei.value.diag.message_detail == "Key (id)=(1) already exists."
    if not autocommit:
        conn.rollback()
    # Error in the middle of a multi-statement simple query: earlier ones stand.
    if autocommit:
        with pytest.raises(errors.DivisionByZero):
            conn.execute(f"insert into {t} values (50); select 1/0; insert into {t} values (51)")
        assert d.execute(f"select id from {t} order by id").fetchall() == [(1,)]
    assert conn.execute(f"select count(*) from {t}").fetchone() == (1,)


# -- startup parameters -----------------------------------------------------------------------

def _compare_with_postgres(server, conn_kw: dict, queries: list[str]) -> tuple:
    """Connect through pgfleet and straight to Postgres with the same parameters; compare."""
    mine = connect(server.dsn(), autocommit=True, **conn_kw)
    ref = connect(server.direct_dsn(), autocommit=True, **conn_kw)
    for name in REPORTED:
        assert mine.info.parameter_status(name) == ref.info.parameter_status(name), name
    for q in queries:
        assert mine.execute(q).fetchall() == ref.execute(q).fetchall(), q
    return mine, ref


def test_startup_options_are_applied(server, scratch):
    schema, d = scratch("myschema", "create schema {name}",
                        "create table {name}.only_here (x int)",
                        "insert into {name}.only_here values (7)", kind="schema")
    app = uniq("myapp")
    kw = dict(
        options=f"-c search_path={schema},public -c statement_timeout=5000 "
                r"-c DateStyle=SQL,\ DMY -c TimeZone=Asia/Tokyo -c extra_float_digits=0",
        application_name=app,
        client_encoding="LATIN1",
    )
    queries = [
        "show search_path", "show statement_timeout", "show datestyle", "show timezone",
        "show extra_float_digits", "show application_name", "show client_encoding",
        "select current_setting('search_path'), current_setting('TimeZone')",
        "select (0.1::float8 + 0.2::float8)::text",
        "select '2020-01-02 03:04:05+00'::timestamptz::text, '2020-03-04'::date::text",
        "select 'é'::text, length('é')",
    ]
    conn, _ = _compare_with_postgres(server, kw, queries)
    assert conn.execute("show search_path").fetchone() == (f"{schema},public",)
    assert conn.execute("show statement_timeout").fetchone() == ("5s",)
    assert conn.execute("show client_encoding").fetchone() == ("LATIN1",)
    assert conn.info.encoding == "iso8859-1"
    assert conn.execute("select (0.1::float8 + 0.2::float8)::text").fetchone() == ("0.3",)
    assert conn.info.parameter_status("application_name") == app
    assert conn.info.parameter_status("DateStyle") == "SQL, DMY"
    assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
    assert conn.info.parameter_status("client_encoding") == "LATIN1"
    # The settings hold in every transaction, on whichever backend serves them,
    # while sessions without them (interleaved) see the defaults.
    plain = connect(server.dsn())
    for _ in range(10):
        with conn.transaction():
            assert conn.execute("select x from only_here").fetchone() == (7,)
            assert conn.execute("select current_setting('TimeZone')").fetchone() == ("Asia/Tokyo",)
        assert plain.execute("show search_path").fetchone() == ('"$user", public',)
        assert plain.execute("show timezone").fetchone() != ("Asia/Tokyo",)
        with pytest.raises(errors.UndefinedTable):
            plain.execute("select x from only_here")
        plain.rollback()
    # statement_timeout is really in force.
    short = connect(server.dsn(), options="-c statement_timeout=200")
    with pytest.raises(errors.QueryCanceled) as ei:
        short.execute("select pg_sleep(5)")
    assert "statement timeout" in str(ei.value)
    short.rollback()
    assert short.execute("show statement_timeout").fetchone() == ("200ms",)


def test_startup_parameters_sent_as_such(server, monkeypatch):
    # libpq sends PGDATESTYLE and PGTZ as the startup parameters "datestyle" and "timezone".
    monkeypatch.setenv("PGDATESTYLE", "Postgres, YMD")
    monkeypatch.setenv("PGTZ", "America/New_York")
    conn, _ = _compare_with_postgres(
        server, {}, ["show datestyle", "show timezone",
                     "select '2020-01-02 03:04:05+00'::timestamptz::text"])
    assert conn.info.parameter_status("DateStyle") == "Postgres, YMD"
    assert conn.info.parameter_status("TimeZone") == "America/New_York"
    assert conn.execute("select current_setting('TimeZone')").fetchone() == ("America/New_York",)


def test_parameter_status_matches_real_server(server):
    conn = connect(server.dsn(), autocommit=True)
    d = direct(server)
    version = d.execute("show server_version").fetchone()[0]
    assert conn.info.parameter_status("server_version") == version
    assert conn.execute("show server_version").fetchone() == (version,)
    assert conn.info.server_version == d.info.server_version
    for name in REPORTED:
        assert conn.info.parameter_status(name) == d.info.parameter_status(name), name
    assert conn.info.parameter_status("session_authorization") == "postgres"
    # A plain session reports and shows no application_name, as with Postgres.
    assert conn.info.parameter_status("application_name") == ""
    assert conn.execute("show application_name").fetchone() == ("",)
    # SET of a reported setting: the client is told, as Postgres tells it.
    c2 = connect(server.dsn(), autocommit=True)
    c2.execute("set application_name = 'changed_here'")
    assert c2.info.parameter_status("application_name") == "changed_here"
    c2.execute("set datestyle = 'German'")
    assert c2.info.parameter_status("DateStyle") == "German, DMY"


def test_application_name_in_pg_stat_activity(server):
    app = uniq("statapp")
    marker = uniq("appmark")
    conn = connect(server.dsn(), autocommit=True, application_name=app)
    other = connect(server.dsn(), autocommit=True)
    d = direct(server)

    def seen_app(mark: str):
        rows = d.execute(
            "select application_name from pg_stat_activity where state = 'active' "
            "and query like %s and pid <> pg_backend_pid()", (f"%{mark}%",)).fetchall()
        return rows[0] if rows else None  # a row, so that an empty name counts as seen

    for c, mark in ((conn, marker), (other, marker + "_other")):
        th = threading.Thread(
            target=lambda c=c, mark=mark: c.execute(f"select pg_sleep(2) /* {mark} */"),
            daemon=True)
        th.start()
        got = poll(lambda mark=mark: seen_app(mark), timeout=10, interval=0.02)
        th.join(30)
        assert not th.is_alive()
        assert got is not None, "the query never showed up in pg_stat_activity"
        if c is conn:
            assert got == (app,)
        else:  # the other session has no application_name, as it asked for none
            assert got == ("",)


@pytest.mark.parametrize("options,code", [
    ("-c DateStyle=bogus", "22023"),
    ("-c no_such_param=1", "42704"),
    ("-c statement_timeout=banana", "22023"),
    ("-c search_path", None),  # a malformed option: Postgres refuses it too
])
def test_invalid_startup_value_fails_like_postgres(server, options, code):
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(server.dsn(), options=options)
    with pytest.raises(psycopg.OperationalError) as ref:
        connect(server.direct_dsn(), options=options)
    assert fatal_text(ei.value) == fatal_text(ref.value)
    mine = raw_login(server.port, "postgres", PASSWORD, options=options)
    theirs = raw_login(pg_socket(server), "postgres", options=options)
    assert mine and theirs
    assert mine["C"] == theirs["C"]
    assert mine["M"] == theirs["M"]
    assert mine.get("D") == theirs.get("D")
    assert mine["S"] == "FATAL"
    if code is not None:
        assert mine["C"] == code
    # And the server goes on serving others.
    assert connect(server.dsn()).execute("select 1").fetchone() == (1,)


def test_invalid_startup_parameter_not_in_options(server):
    # An invalid value as a startup parameter of its own (not inside "options").
    mine = raw_login(server.port, "postgres", PASSWORD, DateStyle="bogus")
    theirs = raw_login(pg_socket(server), "postgres", DateStyle="bogus")
    assert mine and mine["C"] == theirs["C"] == "22023"
    assert mine["M"] == theirs["M"]
    ok = raw_login(server.port, "postgres", PASSWORD, DateStyle="ISO, DMY",
                   extra_float_digits="2", TimeZone="UTC")
    assert ok == {}


# -- authentication ---------------------------------------------------------------------------

def test_wrong_password_and_unknown_database(server):
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(server.dsn(password="not-the-password"))
    assert 'password authentication failed for user "postgres"' in str(ei.value)
    f = raw_login(server.port, "postgres", "not-the-password")
    assert f["C"] == "28P01" and f["S"] == "FATAL"
    assert f["M"] == 'password authentication failed for user "postgres"'

    # An unknown role fails exactly like a wrong password (no role probing).
    ghost = uniq("ghost")
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(server.dsn(user=ghost, password="x"))
    assert f'password authentication failed for user "{ghost}"' in str(ei.value)

    db = uniq("nodb")
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(server.dsn(dbname=db))
    assert f'database "{db}" does not exist' in str(ei.value)
    f = raw_login(server.port, "postgres", PASSWORD, dbname=db)
    assert f["C"] == "3D000" and f["M"] == f'database "{db}" does not exist'
    # SCRAM is what the server asks for.
    conn = connect(server.dsn(), require_auth="scram-sha-256")
    assert conn.execute("select current_user").fetchone() == ("postgres",)


def _login_within(server, attempts: int, **kw) -> psycopg.Connection:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return connect(server.dsn(**kw))
        except psycopg.OperationalError as exc:
            last = exc
    raise AssertionError(f"no login within {attempts} attempts: {last}")


def test_roles_created_and_changed_behind_pgfleet(server):
    role = uniq("pf_role")
    nolog = uniq("pf_nologin")
    d = direct(server)
    d.execute(sql.SQL("create role {} login password 'x'").format(sql.Identifier(role)))
    d.execute(sql.SQL("create role {} nologin password 'x'").format(sql.Identifier(nolog)))
    try:
        conn = connect(server.dsn(user=role, password="x"))
        assert conn.execute("select current_user, session_user").fetchone() == (role, role)
        conn.close()

        d.execute(sql.SQL("alter role {} password 'y'").format(sql.Identifier(role)))
        conn = _login_within(server, 2, user=role, password="y")
        assert conn.execute("select current_user").fetchone() == (role,)
        conn.close()
        with pytest.raises(psycopg.OperationalError) as ei:
            connect(server.dsn(user=role, password="x"))
        assert f'password authentication failed for user "{role}"' in str(ei.value)

        with pytest.raises(psycopg.OperationalError) as ei:
            connect(server.dsn(user=nolog, password="x"))
        assert f'role "{nolog}" is not permitted to log in' in str(ei.value)
        f = raw_login(server.port, nolog, "x")
        assert f["C"] == "28000" and f["M"] == f'role "{nolog}" is not permitted to log in'
    finally:
        for r in (role, nolog):
            d.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(r)))


def test_role_given_login_can_log_in(server):
    # Like a changed password: a login refused on stale facts is retried on fresh ones.
    role = uniq("pf_later")
    d = direct(server)
    d.execute(sql.SQL("create role {} nologin password 'x'").format(sql.Identifier(role)))
    try:
        with pytest.raises(psycopg.OperationalError) as ei:
            connect(server.dsn(user=role, password="x"))
        assert f'role "{role}" is not permitted to log in' in str(ei.value)
        d.execute(sql.SQL("alter role {} login").format(sql.Identifier(role)))
        conn = _login_within(server, 2, user=role, password="x")
        assert conn.execute("select current_user").fetchone() == (role,)
        conn.close()
    finally:
        d.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def test_changed_password_refused_by_every_worker(server):
    # Workers keep role facts between logins. Each refuses the new password once on
    # what it kept, then forgets; after that no worker may still take the old one.
    role = uniq("pf_pw")
    d = direct(server)
    d.execute(sql.SQL("create role {} login password 'x'").format(sql.Identifier(role)))
    try:
        for _ in range(12):  # both workers log the role in and keep its facts
            connect(server.dsn(user=role, password="x")).close()
        d.execute(sql.SQL("alter role {} password 'y'").format(sql.Identifier(role)))
        _login_within(server, 3, user=role, password="y").close()
        for _ in range(12):
            with pytest.raises(psycopg.OperationalError) as ei:
                connect(server.dsn(user=role, password="x"))
            assert f'password authentication failed for user "{role}"' in str(ei.value)
    finally:
        d.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def test_md5_auth(make_server):
    s = make_server("--auth", "md5", "--workers", "1", "--pool-size", "3")
    d = connect(s.direct_dsn(), autocommit=True)
    d.execute("set password_encryption = 'md5'")
    d.execute("create role md5user login password 'md5pw'")
    assert d.execute("select rolpassword like 'md5%' from pg_authid where rolname = 'md5user'"
                     ).fetchone() == (True,)
    conn = connect(s.dsn(user="md5user", password="md5pw"), require_auth="md5")
    assert conn.execute("select current_user").fetchone() == ("md5user",)
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(s.dsn(user="md5user", password="wrong"))
    assert 'password authentication failed for user "md5user"' in str(ei.value)
    f = raw_login(s.port, "md5user", "wrong")
    assert f["C"] == "28P01"
    assert raw_login(s.port, "md5user", "md5pw") == {}
    # A role with a SCRAM verifier still logs in with SCRAM, as under Postgres's md5.
    conn = connect(s.dsn(), require_auth="scram-sha-256")
    assert conn.execute("select 1").fetchone() == (1,)


def test_trust_auth(make_server):
    s = make_server("--auth", "trust", "--workers", "1", "--pool-size", "3")
    for pw in ("anything", PASSWORD, ""):
        conn = connect(s.dsn(password=pw), require_auth="none")
        assert conn.execute("select current_user").fetchone() == ("postgres",)
        conn.close()
    ghost = uniq("ghost")
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(s.dsn(user=ghost, password="x"))
    assert f'role "{ghost}" does not exist' in str(ei.value)
    f = raw_login(s.port, ghost)
    assert f["C"] == "28000" and f["M"] == f'role "{ghost}" does not exist'


# -- pinning ----------------------------------------------------------------------------------

def test_set_search_path_pins_session(server, scratch):
    schema, d = scratch("pinschema", "create schema {name}",
                        "create table {name}.pinned_only (x int)", kind="schema")
    a = connect(server.dsn())
    a.execute(f"set search_path = {schema}, public")
    a.commit()

    def other(c: psycopg.Connection) -> None:
        with c.transaction():
            assert c.execute("show search_path").fetchone() == ('"$user", public',)
        with pytest.raises(errors.UndefinedTable):
            c.execute("select * from pinned_only")

    def pinned() -> None:
        for i in range(30):
            assert a.execute("show search_path").fetchone() == (f"{schema}, public",)
            a.execute("insert into pinned_only values (%s)", (i,))
            if i % 3 == 2:
                a.rollback()
            else:
                a.commit()

    run_beside(server, pinned, other, 8)
    assert d.execute(f"select count(*) from {schema}.pinned_only").fetchone() == (20,)
    a.close()
    # Its backend is reset before anyone else gets it.
    for _ in range(8):
        c = connect(server.dsn(), autocommit=True)
        assert c.execute("show search_path").fetchone() == ('"$user", public',)
        c.close()


def test_temp_table_pins_session(server):
    tt = uniq("pf_temp")
    a = connect(server.dsn())
    a.execute(f"create temp table {tt} (x int)")
    a.commit()
    d = direct(server)

    def other(c: psycopg.Connection) -> None:
        with pytest.raises(errors.UndefinedTable):
            c.execute(f"select * from {tt}")

    def owner() -> None:
        for i in range(40):
            a.execute(f"insert into {tt} values (%s)", (i,))
            a.commit()
            assert a.execute(f"select count(*) from {tt}").fetchone() == (i + 1,)
            a.rollback()

    run_beside(server, owner, other, 6)
    assert a.execute(f"select sum(x) from {tt}").fetchone() == (sum(range(40)),)
    a.commit()
    assert d.execute("select count(*) from pg_class where relname = %s", (tt,)).fetchone() == (1,)
    a.close()
    # The table goes with the session (its backend is reset).
    assert poll(lambda: d.execute("select count(*) = 0 from pg_class where relname = %s",
                                  (tt,)).fetchone()[0])


def test_advisory_lock_pins_session(server):
    key = random.randint(1, 2**31 - 1)
    d = direct(server)

    def holders():
        return d.execute(
            "select pid from pg_locks where locktype = 'advisory' and classid = 0 "
            "and objid = %s and objsubid = 1 and granted", (key,)).fetchall()

    a = connect(server.dsn(), autocommit=True)
    a.execute("select pg_advisory_lock(%s)", (key,))
    first = holders()
    assert len(first) == 1
    a.autocommit = False
    for i in range(10):
        a.execute("select %s", (i,))
        if i % 2:
            a.commit()
        else:
            a.rollback()
        assert holders() == first
        b = connect(server.dsn(), autocommit=True)
        assert b.execute("select pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (False,)
        b.close()
    a.autocommit = True
    assert a.execute("select pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
    assert holders() == []
    b = connect(server.dsn(), autocommit=True)
    assert b.execute("select pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (True,)
    a.close()
