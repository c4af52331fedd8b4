"""Logging in must not need a free backend once pgfleet has seen the role and settings."""

from __future__ import annotations

import threading
import time

import psycopg


def test_login_while_every_backend_is_busy_and_cache_expired(make_server):
    srv = make_server("--pool-size", "2", "--workers", "2", "--auth-timeout", "3")
    # Warm up: both workers learn this role and these settings.
    for _ in range(6):
        with psycopg.connect(srv.dsn(), connect_timeout=10) as c:
            c.execute("select 1")
    sleepers = [psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
                for _ in range(2)]
    threads = [threading.Thread(target=c.execute, args=("select pg_sleep(9)",))
               for c in sleepers]
    try:
        for t in threads:
            t.start()
        time.sleep(6.5)  # the role cache (5 s) has expired; both backends still sleep
        logins = []
        for _ in range(4):
            conn = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
            logins.append(conn)
        # Once the sleepers finish, the new sessions run their queries.
        for conn in logins:
            assert conn.execute("select 7").fetchone() == (7,)
            conn.close()
    finally:
        for t in threads:
            t.join(20)
        for c in sleepers:
            c.close()
