"""The extended query protocol through pgfleet, byte by byte, against a real Postgres.

Raw-protocol clients (tests/wire.py) send Parse/Bind/Describe/Execute/Close/Sync/Flush
sequences while other sessions hold backends, so that a session's backend changes
between its Syncs. Where Postgres's own answer is the reference, the same messages
also go straight to Postgres and both replies must match.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgwire import backend as be
from pgwire import frontend as fe
from tests.wire import RawClient, data_rows

INT4, TEXT, FLOAT8 = 23, 25, 701


@pytest.fixture(scope="module")
def two_backends(make_module_server):
    return make_module_server("--pool-size", "2", "--workers", "1", "--query-wait-timeout", "10")


@pytest.fixture(scope="module")
def one_backend(make_module_server):
    return make_module_server("--pool-size", "1", "--workers", "1", "--query-wait-timeout", "10")


def via(srv) -> RawClient:
    c = RawClient(srv.port)
    try:
        c.login_scram()
    except BaseException:
        c.close()
        raise
    return c


def direct(srv) -> RawClient:
    c = RawClient(srv.direct_socket)
    try:
        c.login_trust()
    except BaseException:
        c.close()
        raise
    return c


def side_session(srv) -> psycopg.Connection:
    return psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)


def summary(msgs: list) -> list[tuple]:
    """The replies as comparable tuples (ParameterStatus and notices left out)."""
    out: list[tuple] = []
    for m in msgs:
        if isinstance(m, be.ParameterStatus | be.NoticeResponse):
            continue
        name = type(m).__name__
        if isinstance(m, be.DataRow):
            out.append((name, m.values))
        elif isinstance(m, be.CommandComplete):
            out.append((name, m.tag))
        elif isinstance(m, be.ErrorResponse):
            out.append((name, m.sqlstate, m.message))
        elif isinstance(m, be.ReadyForQuery):
            out.append((name, m.status))
        elif isinstance(m, be.ParameterDescription):
            out.append((name, m.oids))
        elif isinstance(m, be.RowDescription):
            out.append((name, [(f.name, f.type_oid) for f in m.fields]))
        else:
            out.append((name,))
    return out


def exchange(c: RawClient, *messages: bytes, syncs: int = 1) -> list[tuple]:
    """Send ``messages`` in one write; the summary of the replies up to ``syncs`` RFQs."""
    c.send(b"".join(messages))
    out: list[tuple] = []
    for _ in range(syncs):
        out += summary(c.read_until_ready())
    return out


def read_n(c: RawClient, n: int) -> list:
    """Exactly the next ``n`` messages other than ParameterStatus and notices."""
    out = []
    while len(out) < n:
        m = c.read_message()
        assert m is not None, f"connection closed; got {out!r}"
        if not isinstance(m, be.ParameterStatus | be.NoticeResponse):
            out.append(m)
    return out


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


# ------------------------------------------------------------------ lib/pq's pattern


def test_unnamed_statement_survives_a_backend_switch(two_backends):
    """lib/pq (and pgx) parse and describe the unnamed statement, Sync, then bind and
    execute it. With a transaction-mode pooler the Bind lands on another backend that
    has no (or another) unnamed statement: PgBouncer answers 'bind message supplies 1
    parameters, but prepared statement "" requires 0'. pgfleet must re-prepare it."""
    t1, t2 = side_session(two_backends), side_session(two_backends)
    s = via(two_backends)
    try:
        # t1 holds one backend in a transaction, so s parses on the other one.
        t1.execute("begin")
        pid_t1 = backend_pid(t1)
        got = exchange(
            s,
            fe.encode_parse("", "select $1::int + 1 as answer, pg_backend_pid() as pid", [INT4]),
            fe.encode_describe("S", ""),
            fe.SYNC,
        )
        assert got == [
            ("ParseComplete",),
            ("ParameterDescription", [INT4]),
            ("RowDescription", [("answer", INT4), ("pid", INT4)]),
            ("ReadyForQuery", "I"),
        ]
        # t2 takes the backend s parsed on; t1 lets its own go: s must run on that one.
        t2.execute("begin")
        pid_t2 = backend_pid(t2)
        assert pid_t2 != pid_t1
        t1.execute("commit")
        got = exchange(s, fe.encode_bind("", "", [b"41"]), fe.encode_execute(), fe.SYNC)
        assert got == [
            ("BindComplete",),
            ("DataRow", [b"42", str(pid_t1).encode()]),
            ("CommandComplete", "SELECT 1"),
            ("ReadyForQuery", "I"),
        ]
        # A second bind of the same unnamed statement, after yet another switch: t1 takes
        # the backend s just used, t2 lets the other go.
        t1.execute("begin")
        assert backend_pid(t1) == pid_t1
        t2.execute("commit")
        got = exchange(s, fe.encode_bind("", "", [b"99"]), fe.encode_describe("P", ""),
                       fe.encode_execute(), fe.SYNC)
        assert got == [
            ("BindComplete",),
            ("RowDescription", [("answer", INT4), ("pid", INT4)]),
            ("DataRow", [b"100", str(pid_t2).encode()]),
            ("CommandComplete", "SELECT 1"),
            ("ReadyForQuery", "I"),
        ]
        t1.execute("commit")
    finally:
        s.close()
        t1.close()
        t2.close()


def test_unnamed_statement_survives_another_sessions_settings(one_backend):
    """One backend, two sessions with different settings. u uses only a named statement,
    so nothing of u's own touches the unnamed statement; but pgfleet replays settings
    with simple queries on the shared backend, and a simple Query destroys the unnamed
    statement in Postgres. s's Bind must still find its statement."""
    s, u = via(one_backend), via(one_backend)
    try:
        assert summary(s.query("set search_path = pg_catalog, public"))[0] == (
            "CommandComplete", "SET")
        assert exchange(s, fe.encode_parse("", "select $1::int + 1", [INT4]),
                        fe.encode_describe("S", ""), fe.SYNC)[0] == ("ParseComplete",)
        assert exchange(u, fe.encode_parse("un", "select 5"), fe.encode_bind("", "un", []),
                        fe.encode_execute(), fe.SYNC)[2] == ("DataRow", [b"5"])
        assert exchange(s, fe.encode_bind("", "", [b"41"]), fe.encode_execute(), fe.SYNC) == [
            ("BindComplete",), ("DataRow", [b"42"]), ("CommandComplete", "SELECT 1"),
            ("ReadyForQuery", "I")]
    finally:
        s.close()
        u.close()


# ------------------------------------------------------------------ pipelining


# random() is volatile: the division is not folded at Bind, it fails at Execute.
DIVIDE_10 = "select 10 / ($1::int + (random() * 0)::int)"
PIPELINE = [
    # group 1: runs
    fe.encode_parse("", "select 1"),
    fe.encode_bind("", "", []),
    fe.encode_execute(),
    fe.SYNC,
    # group 2: the first Execute fails; the rest of the group is skipped up to its Sync
    fe.encode_parse("pq", DIVIDE_10, [INT4]),
    fe.encode_bind("", "pq", [b"0"]),
    fe.encode_execute(),
    fe.encode_bind("", "pq", [b"5"]),
    fe.encode_describe("P", ""),
    fe.encode_execute(),
    fe.encode_parse("never", "select 'skipped'"),
    fe.SYNC,
    # group 3: runs normally, with the statement group 2 prepared before its error
    fe.encode_bind("", "pq", [b"2"]),
    fe.encode_execute(),
    fe.encode_bind("", "never", []),
    fe.encode_execute(),
    fe.SYNC,
]
PIPELINE_REPLIES = [
    ("ParseComplete",),
    ("BindComplete",),
    ("DataRow", [b"1"]),
    ("CommandComplete", "SELECT 1"),
    ("ReadyForQuery", "I"),
    ("ParseComplete",),
    ("BindComplete",),
    ("ErrorResponse", "22012", "division by zero"),
    ("ReadyForQuery", "I"),
    ("BindComplete",),
    ("DataRow", [b"5"]),
    ("CommandComplete", "SELECT 1"),
    ("ErrorResponse", "26000", 'prepared statement "never" does not exist'),
    ("ReadyForQuery", "I"),
]


def test_pipelined_groups_with_an_error_in_the_middle(two_backends):
    d, c = direct(two_backends), via(two_backends)
    try:
        assert exchange(d, *PIPELINE, syncs=3) == PIPELINE_REPLIES
        assert exchange(c, *PIPELINE, syncs=3) == PIPELINE_REPLIES
        # The session goes on: the statement from group 2 is still there.
        for conn in (d, c):
            got = exchange(conn, fe.encode_bind("", "pq", [b"10"]), fe.encode_execute(), fe.SYNC)
            assert got == [("BindComplete",), ("DataRow", [b"1"]),
                           ("CommandComplete", "SELECT 1"), ("ReadyForQuery", "I")]
    finally:
        d.close()
        c.close()


def test_pipelined_error_inside_a_transaction_block(two_backends):
    """After an error inside BEGIN the whole transaction is failed (RFQ 'E') until ROLLBACK."""
    steps = [
        fe.encode_query("begin"),
        fe.encode_parse("dv", DIVIDE_10, [INT4]),
        fe.encode_bind("", "dv", [b"0"]),
        fe.encode_execute(),
        fe.SYNC,
        fe.encode_bind("", "dv", [b"1"]),
        fe.encode_execute(),
        fe.SYNC,
        fe.encode_query("rollback"),
        # Parse is not transactional: the statement outlives the rollback.
        fe.encode_bind("", "dv", [b"1"]),
        fe.encode_execute(),
        fe.SYNC,
    ]
    expected = [
        ("CommandComplete", "BEGIN"),
        ("ReadyForQuery", "T"),
        ("ParseComplete",),
        ("BindComplete",),
        ("ErrorResponse", "22012", "division by zero"),
        ("ReadyForQuery", "E"),
        ("ErrorResponse", "25P02",
         "current transaction is aborted, commands ignored until end of transaction block"),
        ("ReadyForQuery", "E"),
        ("CommandComplete", "ROLLBACK"),
        ("ReadyForQuery", "I"),
        ("BindComplete",),
        ("DataRow", [b"10"]),
        ("CommandComplete", "SELECT 1"),
        ("ReadyForQuery", "I"),
    ]
    d, c = direct(two_backends), via(two_backends)
    try:
        assert exchange(d, *steps, syncs=5) == expected
        assert exchange(c, *steps, syncs=5) == expected
    finally:
        d.close()
        c.close()


# ------------------------------------------------------------------ named statements


def test_close_of_a_shared_statement_text_affects_only_its_session(one_backend):
    """Both sessions' 's1' are one backend statement on the only backend; A's Close
    must not close it under B."""
    a, b = via(one_backend), via(one_backend)
    try:
        for conn in (a, b):
            assert exchange(conn, fe.encode_parse("s1", "select 1"), fe.SYNC) == [
                ("ParseComplete",), ("ReadyForQuery", "I")]
        assert exchange(a, fe.encode_close("S", "s1"), fe.SYNC) == [
            ("CloseComplete",), ("ReadyForQuery", "I")]
        run_s1 = [fe.encode_bind("", "s1", []), fe.encode_execute(), fe.SYNC]
        ok = [("BindComplete",), ("DataRow", [b"1"]), ("CommandComplete", "SELECT 1"),
              ("ReadyForQuery", "I")]
        assert exchange(b, *run_s1) == ok
        assert exchange(a, *run_s1) == [
            ("ErrorResponse", "26000", 'prepared statement "s1" does not exist'),
            ("ReadyForQuery", "I")]
        # Closing a name that does not exist is not an error, as in Postgres.
        assert exchange(a, fe.encode_close("S", "s1"), fe.encode_close("S", "never"),
                        fe.SYNC) == [("CloseComplete",), ("CloseComplete",),
                                     ("ReadyForQuery", "I")]
        # A can take the name again, for other text; B keeps its own.
        assert exchange(a, fe.encode_parse("s1", "select 2"), *run_s1) == [
            ("ParseComplete",), ("BindComplete",), ("DataRow", [b"2"]),
            ("CommandComplete", "SELECT 1"), ("ReadyForQuery", "I")]
        assert exchange(b, *run_s1) == ok
        # And B's Close leaves A's alone.
        assert exchange(b, fe.encode_close("S", "s1"), *run_s1) == [
            ("CloseComplete",),
            ("ErrorResponse", "26000", 'prepared statement "s1" does not exist'),
            ("ReadyForQuery", "I")]
        assert exchange(a, *run_s1)[1] == ("DataRow", [b"2"])
    finally:
        a.close()
        b.close()


NAME_ERRORS = [
    fe.encode_parse("dup", "select 1"),
    fe.SYNC,
    # Parse of an existing name fails; the rest of the group is skipped.
    fe.encode_parse("dup", "select 2"),
    fe.encode_bind("", "dup", []),
    fe.encode_execute(),
    fe.SYNC,
    # Bind of an unknown name fails with the client's name; the group is skipped.
    fe.encode_bind("", "nope", []),
    fe.encode_execute(),
    fe.encode_parse("later", "select 3"),
    fe.SYNC,
    # After the Sync the session goes on, with the first 'dup'.
    fe.encode_bind("", "dup", []),
    fe.encode_execute(),
    fe.SYNC,
    fe.encode_query("select 4"),
]
NAME_ERROR_REPLIES = [
    ("ParseComplete",),
    ("ReadyForQuery", "I"),
    ("ErrorResponse", "42P05", 'prepared statement "dup" already exists'),
    ("ReadyForQuery", "I"),
    ("ErrorResponse", "26000", 'prepared statement "nope" does not exist'),
    ("ReadyForQuery", "I"),
    ("BindComplete",),
    ("DataRow", [b"1"]),
    ("CommandComplete", "SELECT 1"),
    ("ReadyForQuery", "I"),
    ("RowDescription", [("?column?", INT4)]),
    ("DataRow", [b"4"]),
    ("CommandComplete", "SELECT 1"),
    ("ReadyForQuery", "I"),
]


def test_duplicate_and_unknown_statement_names(two_backends):
    d, c = direct(two_backends), via(two_backends)
    try:
        assert exchange(d, *NAME_ERRORS, syncs=5) == NAME_ERROR_REPLIES
        assert exchange(c, *NAME_ERRORS, syncs=5) == NAME_ERROR_REPLIES
    finally:
        d.close()
        c.close()


def test_statement_name_errors_abort_the_transaction_block(two_backends):
    """Inside BEGIN, a duplicate Parse or an unknown Bind fails the transaction, exactly
    like any other error: RFQ 'E', later statements 25P02, until ROLLBACK."""
    steps = [
        fe.encode_parse("dup", "select 1"),
        fe.SYNC,
        fe.encode_query("begin"),
        fe.encode_parse("dup", "select 2"),
        fe.SYNC,
        fe.encode_query("select 'after duplicate'"),
        fe.encode_query("rollback"),
        fe.encode_query("begin"),
        fe.encode_bind("", "nope", []),
        fe.encode_execute(),
        fe.SYNC,
        fe.encode_query("select 'after unknown'"),
        fe.encode_query("rollback"),
    ]
    aborted = ("ErrorResponse", "25P02",
               "current transaction is aborted, commands ignored until end of transaction block")
    expected = [
        ("ParseComplete",), ("ReadyForQuery", "I"),
        ("CommandComplete", "BEGIN"), ("ReadyForQuery", "T"),
        ("ErrorResponse", "42P05", 'prepared statement "dup" already exists'),
        ("ReadyForQuery", "E"),
        aborted, ("ReadyForQuery", "E"),
        ("CommandComplete", "ROLLBACK"), ("ReadyForQuery", "I"),
        ("CommandComplete", "BEGIN"), ("ReadyForQuery", "T"),
        ("ErrorResponse", "26000", 'prepared statement "nope" does not exist'),
        ("ReadyForQuery", "E"),
        aborted, ("ReadyForQuery", "E"),
        ("CommandComplete", "ROLLBACK"), ("ReadyForQuery", "I"),
    ]
    d, c = direct(two_backends), via(two_backends)
    try:
        assert exchange(d, *steps, syncs=9) == expected
        assert exchange(c, *steps, syncs=9) == expected
    finally:
        d.close()
        c.close()


def test_statement_name_error_rolls_back_its_sync_group(two_backends):
    """Outside BEGIN, the messages up to Sync form one implicit transaction: an unknown
    statement name after an INSERT must undo the INSERT, as any error would."""
    table = "ext_proto_group_rollback"
    steps = [
        fe.encode_parse("", f"insert into {table} values (1)"),
        fe.encode_bind("", "", []),
        fe.encode_execute(),
        fe.encode_bind("", "nope", []),
        fe.encode_execute(),
        fe.SYNC,
        fe.encode_query(f"select count(*) from {table}"),
    ]
    expected = [
        ("ParseComplete",), ("BindComplete",), ("CommandComplete", "INSERT 0 1"),
        ("ErrorResponse", "26000", 'prepared statement "nope" does not exist'),
        ("ReadyForQuery", "I"),
        ("RowDescription", [("count", 20)]), ("DataRow", [b"0"]),
        ("CommandComplete", "SELECT 1"), ("ReadyForQuery", "I"),
    ]
    with psycopg.connect(two_backends.direct_dsn(), autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"create table {table} (x int)")
        d, c = direct(two_backends), via(two_backends)
        try:
            assert exchange(d, *steps, syncs=2) == expected
            assert exchange(c, *steps, syncs=2) == expected
        finally:
            d.close()
            c.close()
            admin.execute(f"drop table {table}")


# ------------------------------------------------------------------ Flush


def test_flush_keeps_the_backend_until_sync(two_backends):
    """Parse + Bind + Describe portal + Flush, read the replies, then Execute + Sync.
    The unnamed portal lives only on the backend that bound it: while another session
    waits for a backend, pgfleet must not hand this one over at the Flush."""
    s = via(two_backends)
    t = side_session(two_backends)
    u = via(two_backends)
    try:
        s.send(b"".join([
            fe.encode_parse("", "select $1::text as word, pg_backend_pid() as pid", [TEXT]),
            fe.encode_bind("", "", [b"flushed"]),
            fe.encode_describe("P", ""),
            fe.FLUSH,
        ]))
        got = summary(read_n(s, 3))
        assert got == [("ParseComplete",), ("BindComplete",),
                       ("RowDescription", [("word", TEXT), ("pid", INT4)])]
        # t takes the other backend; u then needs one and must wait for s's Sync.
        t.execute("begin")
        pid_t = backend_pid(t)
        u.send(fe.encode_query("select pg_backend_pid()"))
        s.send(fe.encode_execute() + fe.SYNC)
        msgs = s.read_until_ready()
        assert [m[0] for m in summary(msgs)] == ["DataRow", "CommandComplete", "ReadyForQuery"]
        (word, pid), = data_rows(msgs)
        assert word == b"flushed"
        pid_s = int(pid)
        assert pid_s != pid_t
        # u got s's backend once s was done.
        assert data_rows(u.read_until_ready()) == [[str(pid_s).encode()]]
        t.execute("commit")
        # The portal is gone after Sync, as in Postgres.
        assert exchange(s, fe.encode_execute(), fe.SYNC) == [
            ("ErrorResponse", "34000", 'portal "" does not exist'), ("ReadyForQuery", "I")]
    finally:
        s.close()
        t.close()
        u.close()


FAILED_BEFORE_SYNC = {
    "parse": ([fe.encode_parse("", "selec 1")],
              [fe.encode_bind("", "", []), fe.encode_execute()]),
    "bind": ([fe.encode_parse("", "select $1::int", [INT4]), fe.encode_bind("", "", [])],
             [fe.encode_describe("P", ""), fe.encode_execute()]),
    "execute": ([fe.encode_parse("", "select 1/(2 - $1::int)", [INT4]),
                 fe.encode_bind("", "", [b"2"]),
                 fe.encode_execute()],
                [fe.encode_parse("", "select 2"), fe.encode_bind("", "", []),
                 fe.encode_execute()]),
    "named": ([fe.encode_parse("flushed_bad", "select nope")],
              [fe.encode_bind("", "flushed_bad", []), fe.encode_execute(),
               fe.encode_close("S", "flushed_bad")]),
}


@pytest.mark.parametrize("case", FAILED_BEFORE_SYNC)
def test_messages_after_an_error_answered_before_sync_get_no_reply(one_backend, case):
    """A client sends part of a group and Flush, reads the error, then sends more of the
    group and its Sync (drivers that Describe before they Bind do). Postgres skips
    everything up to the Sync and answers only it: so must pgfleet, which used to wait
    for replies to the skipped messages and never answered the Sync."""
    first, then = FAILED_BEFORE_SYNC[case]
    results = []
    for c in (via(one_backend), direct(one_backend)):
        with c:
            c.send(b"".join(first) + fe.FLUSH)
            got = summary(read_n(c, 1))
            while got[-1][0] != "ErrorResponse":
                got += summary(read_n(c, 1))
            got += exchange(c, *then, fe.SYNC)
            got += exchange(c, *group("select 3"))  # and the session goes on
            results.append(got)
    assert results[0] == results[1]
    assert results[1][-3:] == [("DataRow", [b"3"]), ("CommandComplete", "SELECT 1"),
                               ("ReadyForQuery", "I")]


@pytest.mark.parametrize("use", ["bind", "describe"])
def test_unknown_statement_in_an_aborted_transaction(one_backend, use):
    """Postgres looks a Bind's or Describe's statement up before it checks for an
    aborted transaction: 26000, not 25P02 (psycopg re-running a statement DISCARD ALL
    dropped, inside a failed transaction, sees it). Then the block goes on aborted."""
    message = (fe.encode_bind("", "no_such_statement", []) + fe.encode_execute()
               if use == "bind" else fe.encode_describe("S", "no_such_statement"))
    results = []
    for c in (via(one_backend), direct(one_backend)):
        with c:
            got = exchange(c, fe.encode_query("begin"), fe.encode_query("select 1/0"), syncs=2)
            got += exchange(c, message, fe.SYNC)
            got += exchange(c, *group("select 1"))
            got += exchange(c, fe.encode_query("rollback"))
            results.append(got)
    assert results[0] == results[1]
    assert ("ErrorResponse", "26000", 'prepared statement "no_such_statement" does not exist') \
        in results[1]


# ------------------------------------------------------------------ whole groups in one write


def group(sql: str, *params: bytes, describe: str | None = "P", oids=()) -> list[bytes]:
    """An unnamed Parse/Bind/[Describe]/Execute/Sync group, as pgbench -M extended and
    psycopg send it: pgfleet answers these on its quickest path."""
    msgs = [fe.encode_parse("", sql, list(oids)), fe.encode_bind("", "", list(params))]
    if describe:
        msgs.append(fe.encode_describe(describe, ""))
    return [*msgs, fe.encode_execute(), fe.SYNC]


def test_whole_groups_answer_as_postgres_does(one_backend):
    s, d = via(one_backend), direct(one_backend)
    try:
        cases = [
            group("select $1::int * 2 as twice", b"21"),
            group("select $1::text as t, null::int as n", b"x", describe="S", oids=[TEXT]),
            group("select g from generate_series(1, $1::int) g", b"3", describe=None),
            group("select 1/0"),  # an error inside the group
            group("select $1::int + 1"),  # a Bind that fails: the error names statement ""
            group("select * from no_such_table"),  # a Parse that fails
            [fe.encode_bind("", "", []), fe.encode_execute(), fe.SYNC],  # its statement is gone
            group("select 'after'"),
        ]
        for _ in range(3):  # and again, on a backend that already served the session
            for msgs in cases:
                assert exchange(s, *msgs) == exchange(d, *msgs), msgs
    finally:
        s.close()
        d.close()


def test_group_that_changes_the_session_takes_the_full_path(one_backend):
    s, other = via(one_backend), via(one_backend)
    try:
        got = exchange(s, *group("set application_name = 'quick-group'", describe=None))
        assert got == [
            ("ParseComplete",), ("BindComplete",), ("CommandComplete", "SET"),
            ("ReadyForQuery", "I"),
        ]
        show = group("select current_setting('application_name')", describe=None)
        # The only backend serves both: each session sees its own setting.
        assert exchange(other, *show)[2] == ("DataRow", [b""])
        assert exchange(s, *show)[2] == ("DataRow", [b"quick-group"])
        assert exchange(other, *show)[2] == ("DataRow", [b""])
    finally:
        s.close()
        other.close()


def test_named_statements_and_pipelined_groups_beside_whole_groups(two_backends):
    s, d = via(two_backends), direct(two_backends)
    try:
        named = [
            fe.encode_parse("qs1", "select $1::int + 100", [INT4]),
            fe.encode_bind("", "qs1", [b"1"]), fe.encode_execute(), fe.SYNC,
        ]
        again = [fe.encode_bind("", "qs1", [b"2"]), fe.encode_execute(), fe.SYNC]
        described = [fe.encode_bind("", "qs1", [b"3"]), fe.encode_describe("P", ""),
                     fe.encode_execute(), fe.SYNC]
        for msgs in (named, again, group("select 5") + group("select 6"), again, described,
                     again + described, described, again):
            syncs = sum(m == fe.SYNC for m in msgs)
            assert exchange(s, *msgs, syncs=syncs) == exchange(d, *msgs, syncs=syncs), msgs
    finally:
        s.close()
        d.close()


def test_bound_statements_while_sessions_share_one_backend(one_backend):
    """Bind/Execute/Sync of a prepared statement, from sessions taking turns on the only
    backend: each runs its own statement, under its own name, whoever parsed first."""
    a, b, d = via(one_backend), via(one_backend), direct(one_backend)
    try:
        for c, text in ((a, "select $1::int * 10"), (b, "select $1::int * 100")):
            assert exchange(c, fe.encode_parse("mine", text, [INT4]), fe.SYNC) == [
                ("ParseComplete",), ("ReadyForQuery", "I")]
        for i in range(20):
            arg = str(i).encode()
            for c, factor in ((a, 10), (b, 100)):
                got = exchange(c, fe.encode_bind("", "mine", [arg]), fe.encode_execute(),
                               fe.SYNC)
                assert got == [("BindComplete",), ("DataRow", [str(i * factor).encode()]),
                               ("CommandComplete", "SELECT 1"), ("ReadyForQuery", "I")]
        # A statement the session never prepared: Postgres's error, its name.
        bad = [fe.encode_bind("", "other", []), fe.encode_execute(), fe.SYNC]
        assert exchange(a, *bad) == exchange(d, *bad)
    finally:
        for c in (a, b, d):
            c.close()


SYNC_LOOKALIKE = b"S\x00\x00\x00\x04"  # a Sync's five bytes, at the end of another message


def test_messages_ending_in_sync_bytes_are_not_taken_for_a_sync(one_backend):
    """A write whose last five bytes read as a Sync but belong to another message
    (trailing bytes of an Execute or Describe, parameter type OIDs 83 and 4) is no
    whole unit: Postgres has not been asked to answer yet, and the reply to the real
    Sync that follows is Postgres's own."""
    s, d = via(one_backend), direct(one_backend)
    try:
        assert exchange(s, fe.encode_parse("bq", "select 7"), fe.SYNC) == exchange(
            d, fe.encode_parse("bq", "select 7"), fe.SYNC)
        long_execute = b"E\x00\x00\x00\x0a\x00" + SYNC_LOOKALIKE  # one byte too many
        long_describe = b"D\x00\x00\x00\x0bP\x00" + SYNC_LOOKALIKE
        cases = [
            [fe.encode_parse("", "select 1"), fe.encode_bind("", "", []), long_execute],
            [fe.encode_parse("", "select 1"), fe.encode_bind("", "", []), fe.encode_execute(),
             long_describe],
            [fe.encode_parse("", "select $1::text", [83, 4])],
            [fe.encode_bind("", "bq", []), long_execute],
        ]
        for msgs in cases:
            data = b"".join(msgs)
            assert data.endswith(SYNC_LOOKALIKE)
            got, want = [], []
            for c, out in ((s, got), (d, want)):
                c.send(data)
                out += exchange(c, fe.SYNC)
                out += exchange(c, *group("select 'after'"))
            assert got == want, msgs
            # Each Sync was answered once: the only backend is free for another session.
            with side_session(one_backend) as other:
                assert other.execute("select 'other'").fetchone() == ("other",)
    finally:
        s.close()
        d.close()


def test_whole_units_inside_a_transaction_answer_as_postgres_does(one_backend):
    """While the session holds its backend (a transaction, a temp table), whole units
    go straight to it; errors, the failed transaction and its end match Postgres."""
    s, d = via(one_backend), direct(one_backend)
    try:
        steps = [
            [fe.encode_query("begin")],
            group("select $1::int * 3", b"7"),
            [fe.encode_query("create temp table tx_whole(x int)")],
            group("insert into tx_whole values ($1::int)", b"5", describe=None),
            [fe.encode_query("select x from tx_whole")],
            [fe.encode_parse("txs", "select count(*) from tx_whole"), fe.SYNC],
            [fe.encode_bind("", "txs", []), fe.encode_execute(), fe.SYNC],
            group("select 1/0"),  # the transaction fails
            [fe.encode_query("select 1")],  # refused in a failed transaction
            group("select 2"),
            [fe.encode_query("rollback")],
            [fe.encode_query("select to_regclass('tx_whole') is null")],
            [fe.encode_close("S", "txs"), fe.SYNC],
        ]
        for msgs in steps:
            assert exchange(s, *msgs) == exchange(d, *msgs), msgs
        # The session gave its backend back: another session can use the only one.
        with side_session(one_backend) as other:
            assert other.execute("select 'free'").fetchone() == ("free",)
    finally:
        s.close()
        d.close()


@pytest.mark.parametrize("shape", ["unnamed", "bound"])
def test_units_sent_before_the_last_one_answered(one_backend, shape):
    """A second whole unit arrives, in a write of its own, while the first still runs
    on the backend (pipelining without waiting, as asyncpg's executemany and JDBC
    batches do): both are answered, in order, and only then is the backend given back.
    The two units book the same shared reply entries; the first answer must not be
    taken for the whole queue's."""
    s = via(one_backend)
    try:
        if shape == "bound":
            parse = fe.encode_parse("slow", "select pg_sleep($1::float8), $2::int",
                                    [FLOAT8, INT4])
            assert exchange(s, parse, fe.SYNC)[-1] == ("ReadyForQuery", "I")

            def unit(delay: bytes, tag: bytes) -> bytes:
                return b"".join([fe.encode_bind("", "slow", [delay, tag]), fe.encode_execute(),
                                 fe.SYNC])
        else:
            def unit(delay: bytes, tag: bytes) -> bytes:
                return b"".join(group("select pg_sleep($1::float8), $2::int", delay, tag,
                                      describe=None))
        for _ in range(3):
            s.send(unit(b"0.3", b"1"))
            time.sleep(0.1)  # the first unit is running when the second arrives
            s.send(unit(b"0.2", b"2"))
            first, second = summary(s.read_until_ready()), summary(s.read_until_ready())
            assert first[-2:] == [("CommandComplete", "SELECT 1"), ("ReadyForQuery", "I")]
            assert ("DataRow", [b"", b"1"]) in first
            assert ("DataRow", [b"", b"2"]) in second
            # The only backend is free again for another session.
            with side_session(one_backend) as other:
                assert other.execute("select 'after'").fetchone() == ("after",)
    finally:
        s.close()


def test_another_sessions_unnamed_statement_is_never_bound(one_backend):
    """The unnamed statement outlives its Sync on the backend. A session that never
    parsed one (or whose last simple Query dropped it) and binds or describes it gets
    26000, as on a backend of its own, not the statement another session left there."""
    unbound = [("ErrorResponse", "26000", "unnamed prepared statement does not exist"),
               ("ReadyForQuery", "I")]
    with direct(one_backend) as d:
        assert exchange(d, fe.encode_bind("", "", []), fe.encode_execute(), fe.SYNC) == unbound
        assert exchange(d, fe.encode_describe("S", ""), fe.SYNC) == unbound
    x, y = via(one_backend), via(one_backend)
    try:
        assert exchange(x, fe.encode_parse("", "select 'of x'"), fe.encode_bind("", "", []),
                        fe.encode_execute(), fe.SYNC)[2] == ("DataRow", [b"of x"])
        assert exchange(y, fe.encode_bind("", "", []), fe.encode_execute(), fe.SYNC) == unbound
        assert exchange(y, fe.encode_describe("S", ""), fe.SYNC) == unbound
        # Its own unnamed statement, dropped by a simple Query, is not bound either.
        assert exchange(y, fe.encode_parse("", "select 'of y'"), fe.SYNC) == [
            ("ParseComplete",), ("ReadyForQuery", "I")]
        assert summary(y.query("select 1"))[-1] == ("ReadyForQuery", "I")
        assert exchange(x, fe.encode_parse("", "select 'of x'"), fe.SYNC)[0] == ("ParseComplete",)
        assert exchange(y, fe.encode_bind("", "", []), fe.encode_execute(), fe.SYNC) == unbound
        # x's statement is still its own to use.
        assert exchange(x, fe.encode_bind("", "", []), fe.encode_execute(), fe.SYNC)[1] == (
            "DataRow", [b"of x"])
    finally:
        x.close()
        y.close()
