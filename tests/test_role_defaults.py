"""ALTER ROLE / ALTER DATABASE ... SET defaults reach sessions that did not override them,
even though backends are reused: backends opened before the change are retired."""

from __future__ import annotations

import time

import psycopg


def test_alter_role_set_reaches_new_sessions(make_server):
    srv = make_server("--pool-size", "2", "--workers", "1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role if exists rd_user")
        admin.execute("create role rd_user login password 'pw'")
    dsn = srv.dsn(user="rd_user", password="pw")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
        assert c.execute("show search_path").fetchone() == ('"$user", public',)
        assert c.info.parameter_status("TimeZone") == "Etc/UTC"
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("alter role rd_user set search_path = from_role")
        admin.execute("alter role rd_user set timezone = 'Asia/Tokyo'")
    deadline = time.monotonic() + 20
    seen = None
    while time.monotonic() < deadline:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            seen = (c.execute("show search_path").fetchone()[0],
                    c.info.parameter_status("TimeZone"), c.execute("show timezone").fetchone()[0])
            if seen == ("from_role", "Asia/Tokyo", "Asia/Tokyo"):
                break
        time.sleep(0.5)
    assert seen == ("from_role", "Asia/Tokyo", "Asia/Tokyo")
    # A session that overrides the default keeps its own value.
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                         options="-c search_path=mine") as c:
        assert c.execute("show search_path").fetchone() == ("mine",)
