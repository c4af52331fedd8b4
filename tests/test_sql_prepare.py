"""SQL PREPARE / EXECUTE / DEALLOCATE from many sessions over one backend, without pinning."""

from __future__ import annotations

import psycopg
import pytest


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
