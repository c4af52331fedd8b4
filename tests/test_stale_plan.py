"""A statement shared on a backend whose table changed under DDL is re-prepared, not failed.

Session B prepares a query after an ALTER TABLE; on Postgres alone it would just
work. Through pgfleet the backend may still hold session A's older statement of
the same text, whose cached plan now fails with "cached plan must not change
result type" (0A000): pgfleet re-prepares it and sends B's messages again.
"""

from __future__ import annotations

import psycopg


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
