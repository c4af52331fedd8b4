"""State that lives in one backend pins its session there, and unpins once it is gone.

The server has a single backend: while one session is pinned, another session's
query can only wait (and fails after --query-wait-timeout 2); once it is unpinned,
the other session runs at once.
"""

from __future__ import annotations

import psycopg
import pytest

from pgwire import backend as be
from pgwire import frontend as fe
from tests.wire import RawClient, errors_in


@pytest.fixture(scope="module")
def one_backend(make_module_server):
    return make_module_server("--pool-size", "1", "--workers", "1", "--query-wait-timeout", "2")


CASES = [
    # (what pins, what unpins)
    ("temp_table", ["create temp table pin_t(x int)", "insert into pin_t values (1)"],
     ["drop table pin_t"]),
    ("temp_table_discard", ["create temp table pin_t2(x int)"], ["discard temp"]),
    ("advisory_lock", ["select pg_advisory_lock(4242)"], ["select pg_advisory_unlock(4242)"]),
    ("advisory_lock_all", ["select pg_advisory_lock(1)", "select pg_try_advisory_lock(2)"],
     ["select pg_advisory_unlock_all()"]),
    ("with_hold_cursor", ["declare c cursor with hold for select 1"], ["close c"]),
    # A LISTEN the hub cannot see (inside a DO block) stays on the backend: it pins.
    ("listen", ["do $$begin listen some_channel; end$$"], ["unlisten *"]),
    ("set_role", ["set role pg_monitor"],
     ["reset role"]),
    ("discard_all", ["create temp table pin_t3(x int)", "select pg_advisory_lock(7)"],
     ["discard all"]),
]


@pytest.mark.parametrize("name,pin,unpin", CASES, ids=[c[0] for c in CASES])
def test_pins_and_unpins(one_backend, name, pin, unpin):
    holder = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        backend = holder.execute("select pg_backend_pid()").fetchone()[0]
        for sql in pin:
            holder.execute(sql)
        # Pinned: the only backend stays with holder, across its transactions.
        with pytest.raises(psycopg.errors.QueryCanceled):
            other.execute("select 1")
        assert holder.execute("select pg_backend_pid()").fetchone()[0] == backend
        for sql in unpin:
            holder.execute(sql)
        # Unpinned: the other session gets the backend.
        assert other.execute("select 2").fetchone() == (2,)
    finally:
        holder.close()
        other.close()


def test_pin_rolled_back_with_its_transaction(one_backend):
    holder = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with holder.transaction():
                holder.execute("create temp table gone_with_rollback(x int)")
                holder.execute("select 1/0")
        assert other.execute("select 3").fetchone() == (3,)
    finally:
        holder.close()
        other.close()


def test_temp_table_never_visible_to_others(one_backend):
    a = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        a.execute("create temp table mine(x int)")
        a.execute("drop table mine")
        b.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            b.execute("select * from mine")
    finally:
        a.close()
        b.close()


def test_refused_duplicate_parse_leaves_the_statement_as_it_was(one_backend):
    """A second Parse of a name fails in Postgres without touching the first statement;
    pgfleet must not book the refused text's effects either (here: forgetting that the
    statement creates a temp table, so that running it would not pin)."""
    holder = RawClient(one_backend.port)
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        holder.login_scram()
        holder.send(fe.encode_parse("mk", "create temp table dup_pin(x int)") + fe.SYNC)
        assert not errors_in(holder.read_until_ready())
        holder.send(fe.encode_parse("mk", "select 1") + fe.SYNC)
        errs = errors_in(holder.read_until_ready())
        assert [e.sqlstate for e in errs] == ["42P05"]
        holder.send(fe.encode_bind("", "mk", []) + fe.encode_execute() + fe.SYNC)
        done = [m for m in holder.read_until_ready() if isinstance(m, be.CommandComplete)]
        assert [m.tag for m in done] == ["CREATE TABLE"]
        # The statement made a temp table: the session is pinned to the only backend.
        with pytest.raises(psycopg.errors.QueryCanceled):
            other.execute("select 1")
        assert not errors_in(holder.query("drop table dup_pin"))
        assert other.execute("select 2").fetchone() == (2,)
    finally:
        holder.close()
        other.close()
