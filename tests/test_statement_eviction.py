"""Each backend keeps a bounded set of prepared statements; evicted ones come back on use."""

from __future__ import annotations

import psycopg

from gateway.backend import MAX_PREPARED_PER_BACKEND


def test_backend_statement_set_is_bounded_and_evicted_statements_still_work(make_server):
    srv = make_server("--pool-size", "1", "--workers", "1")
    n = MAX_PREPARED_PER_BACKEND + 100
    with psycopg.connect(srv.dsn(), autocommit=True, prepare_threshold=0,
                         connect_timeout=10) as conn:
        conn.prepared_max = n + 10  # keep every statement in psycopg's own cache
        for i in range(n):
            assert conn.execute(f"select {i} as v, %s::int", (i,)).fetchone() == (i, i)
        held = conn.execute("select count(*) from pg_prepared_statements").fetchone()[0]
        assert 0 < held <= MAX_PREPARED_PER_BACKEND
        # The oldest were closed on the backend; using them again prepares them again.
        for i in range(0, n, 7):
            assert conn.execute(f"select {i} as v, %s::int", (i,)).fetchone() == (i, i)
        held = conn.execute("select count(*) from pg_prepared_statements").fetchone()[0]
        assert held <= MAX_PREPARED_PER_BACKEND
