"""A statement shared on a backend whose table changed under DDL is re-prepared, not failed.

Session B prepares a query after an ALTER TABLE; on Postgres alone it would just
work. Through pgfleet the backend may still hold session A's older statement of
the same text, whose cached plan now fails with "cached plan must not change
result type" (0A000): pgfleet re-prepares it and sends B's messages again.
"""

from __future__ import annotations

from decimal import Decimal

import psycopg

from pgwire import backend as be
from pgwire import frontend as fe

from .wire import RawClient, data_rows, errors_in


def test_ddl_between_sessions_is_healed(make_server):
    srv = make_server("--pool-size", "1", "--workers", "1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists heal_t")
        admin.execute("create table heal_t(a int)")
        admin.execute("insert into heal_t values (1)")
    a = psycopg.connect(srv.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10)
    b = psycopg.connect(srv.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10)
    try:
        assert a.execute("select * from heal_t").fetchall() == [(1,)]
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute("alter table heal_t add column b text default 'x'")
        # B prepares after the DDL: it must see the new shape, with no error.
        for _ in range(3):
            assert b.execute("select * from heal_t").fetchall() == [(1, "x")]
        assert a.execute("select * from heal_t").fetchall() == [(1, "x")]
    finally:
        a.close()
        b.close()


def test_heal_of_a_whole_bind_unit(make_server):
    """B's Bind, Describe, Execute and Sync arrive in one write (the quick path that
    books shared reply entries): the heal still re-prepares and sends all of it again."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists heal_w")
        admin.execute("create table heal_w(a int)")
        admin.execute("insert into heal_w values (1)")
    sql = "select * from heal_w"
    whole_bind = lambda name: (fe.encode_bind("", name, []) + fe.encode_describe("P", "")  # noqa: E731
                               + fe.encode_execute() + fe.SYNC)
    with RawClient(srv.port) as a, RawClient(srv.port) as b:
        a.login_scram()
        b.login_scram()
        a.send(fe.encode_parse("sa", sql) + fe.SYNC)
        assert not errors_in(a.read_until_ready())
        a.send(whole_bind("sa"))
        assert data_rows(a.read_until_ready()) == [[b"1"]]
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute("alter table heal_w add column b text default 'x'")
        # B prepares the same text after the DDL: on the one backend, it is A's statement.
        b.send(fe.encode_parse("sb", sql) + fe.SYNC)
        assert not errors_in(b.read_until_ready())
        for _ in range(2):
            b.send(whole_bind("sb"))
            msgs = b.read_until_ready()
            assert not errors_in(msgs), msgs
            assert data_rows(msgs) == [[b"1", b"x"]]
            assert sum(isinstance(m, be.BindComplete) for m in msgs) == 1
            assert sum(isinstance(m, be.RowDescription) for m in msgs) == 1


def test_sessions_on_other_search_paths_share_no_statement(make_server):
    """Two tenants' schemas hold tables of one name and different columns; each session
    sets its search_path and prepares the same text. On one backend, a statement shared
    between them would be analysed again under the other path at every switch, and fail
    with 0A000 inside a transaction, where nothing can be sent again. Each session's own
    statement works in Postgres, so it must through pgfleet."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop schema if exists tenant_a cascade")
        admin.execute("drop schema if exists tenant_b cascade")
        admin.execute("create schema tenant_a; create schema tenant_b")
        admin.execute("create table tenant_a.items(id int, name text)")
        admin.execute("create table tenant_b.items(id int, price numeric, note text)")
        admin.execute("insert into tenant_a.items values (1, 'a')")
        admin.execute("insert into tenant_b.items values (1, 2.5, 'b')")
    a = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    try:
        a.execute("set search_path = tenant_a")
        b.execute("set search_path = tenant_b")
        sql = "select * from items where id = %s"
        for _ in range(3):
            assert a.execute(sql, (1,), prepare=True).fetchall() == [(1, "a")]
            with b.transaction():
                assert b.execute(sql, (1,), prepare=True).fetchall() == [(1, Decimal("2.5"), "b")]
            with a.transaction():
                assert a.execute(sql, (1,), prepare=True).fetchall() == [(1, "a")]
    finally:
        a.close()
        b.close()


def test_shared_statements_are_not_another_sessions_to_use_or_drop(make_server):
    """pg_prepared_statements shows a session the shared statements on its backend. In
    Postgres a session has none of another's: EXECUTE or DEALLOCATE of one fails with
    26000, so through pgfleet too (a DEALLOCATE that went through broke every other
    session using it). A statement dropped behind pgfleet's back all the same (inside
    a DO block) is prepared again, not lost."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    sql = "select %s::int + 1"
    a = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    try:
        assert a.execute(sql, (1,), prepare=True).fetchone() == (2,)
        with RawClient(srv.port) as b, RawClient(srv.direct_socket) as d:
            b.login_scram()
            d.login_trust()
            names = data_rows(b.query("select name from pg_prepared_statements"))
            assert names and all(n[0].startswith(b"pgf_") for n in names)
            shared = names[0][0].decode()
            for stmt in (f"execute {shared}(5)", f"deallocate {shared}",
                         f"DEALLOCATE PREPARE {shared.upper()}"):
                for proto in ("simple", "extended"):
                    if proto == "simple":
                        msgs = [fe.encode_query(stmt)]
                    else:
                        msgs = [fe.encode_parse("", stmt), fe.encode_bind("", "", []),
                                fe.encode_execute(), fe.SYNC]
                    replies = []
                    for c in (b, d):  # d: straight to Postgres, a session without it
                        c.send(b"".join(msgs))
                        replies.append([(e.sqlstate, e.message)
                                        for e in errors_in(c.read_until_ready())])
                    assert replies[0] == replies[1] == [
                        ("26000", f'prepared statement "{shared}" does not exist')], (stmt, proto)
            assert a.execute(sql, (2,), prepare=True).fetchone() == (3,)
            b.send(fe.encode_query(f"do $$ begin execute 'deallocate {shared}'; end $$"))
            assert not errors_in(b.read_until_ready())
        for i in range(3):
            assert a.execute(sql, (i,), prepare=True).fetchone() == (i + 1,)
    finally:
        a.close()
