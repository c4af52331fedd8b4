"""ALTER ROLE / ALTER DATABASE ... SET defaults reach sessions that did not override them,
even though backends are reused: backends opened before the change are retired."""

from __future__ import annotations

import time

import psycopg
import pytest


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


def test_changes_made_through_pgfleet_reach_the_very_next_login(make_server):
    """ALTER ROLE / ALTER DATABASE run through pgfleet are seen by the next login on
    either worker, with no wait: a new password at once, new defaults once the
    transaction that set them commits (and not before, as in Postgres). Each protocol
    path is used: a simple Query, an unnamed Parse, a named prepared statement."""
    srv = make_server("--pool-size", "4", "--workers", "2")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role if exists rd_now")
        admin.execute("create role rd_now login password 'pw-one'")

    def logins(n: int, password: str = "pw-one") -> set[tuple[str, str]]:
        seen = set()
        for _ in range(n):
            with psycopg.connect(srv.dsn(user="rd_now", password=password),
                                 autocommit=True, connect_timeout=10) as c:
                seen.add((c.execute("show search_path").fetchone()[0],
                          c.execute("show work_mem").fetchone()[0]))
        return seen

    try:
        assert logins(6) == {('"$user", public', "4MB")}  # both workers' caches warm
        with psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) as su:
            psycopg.ClientCursor(su).execute("alter role rd_now set search_path = via_pgfleet")
            assert logins(6) == {("via_pgfleet", "4MB")}
            su.autocommit = False
            su.execute("alter database postgres set work_mem = '7MB'")  # unnamed Parse
            assert logins(3) == {("via_pgfleet", "4MB")}  # not committed yet
            su.commit()
            assert logins(6) == {("via_pgfleet", "7MB")}
            su.autocommit = True
            su.execute("alter role rd_now password 'pw-two'", prepare=True)  # named
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            logins(1)
        assert logins(3, password="pw-two") == {("via_pgfleet", "7MB")}
    finally:
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute("alter database postgres reset work_mem")
            admin.execute("alter role rd_now reset all")


def test_a_configuration_reload_reaches_the_status_report_of_new_sessions(make_server):
    """ParameterStatus at login follows ALTER SYSTEM + pg_reload_conf(): at once when
    they run through pgfleet, within the role-facts lifetime when run straight on
    Postgres. (The report is cached per role and settings, so that logins need no
    backend; a stale TimeZone there would make drivers show times in the wrong zone.)"""
    srv = make_server("--pool-size", "3", "--workers", "2")

    def reported() -> set[tuple[str, str]]:
        seen = set()
        for _ in range(6):
            with psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) as c:
                seen.add((c.info.parameter_status("TimeZone"),
                          c.execute("show timezone").fetchone()[0]))
        return seen

    assert reported() == {("Etc/UTC", "Etc/UTC")}
    with psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) as su:
        su.execute("alter system set timezone = 'Asia/Tokyo'")
        su.execute("select pg_reload_conf()")
    assert reported() == {("Asia/Tokyo", "Asia/Tokyo")}
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("alter system reset timezone")
        admin.execute("select pg_reload_conf()")
    deadline = time.monotonic() + 20
    seen = reported()
    while seen != {("Etc/UTC", "Etc/UTC")} and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = reported()
    assert seen == {("Etc/UTC", "Etc/UTC")}


def test_a_role_dropped_and_created_again_gets_backends_of_its_own(make_server):
    """A role created again under a dropped role's name is another role (another OID):
    the dropped one's pooled backends must not serve it ("invalid role OID"). Through
    pgfleet the next login sees it at once; straight on Postgres within the role facts'
    lifetime."""
    srv = make_server("--pool-size", "3", "--workers", "1")

    def login_as_rd_again() -> tuple[str, int]:
        with psycopg.connect(srv.dsn(user="rd_again", password="pw"), autocommit=True,
                             connect_timeout=10) as c:
            return c.execute("select current_user::text, (select oid::int from pg_roles "
                             "where rolname = current_user)").fetchone()

    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role if exists rd_again")
        admin.execute("create role rd_again login password 'pw'")
        first = admin.execute("select oid::int from pg_roles where rolname = 'rd_again'").fetchone()[0]
    assert login_as_rd_again() == ("rd_again", first)  # leaves a pooled backend of it
    with psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) as su:
        su.execute("drop role rd_again")
        su.execute("create role rd_again login password 'pw'")
        second = su.execute("select oid::int from pg_roles where rolname = 'rd_again'").fetchone()[0]
    assert second != first
    for _ in range(3):
        assert login_as_rd_again() == ("rd_again", second)
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role rd_again")
        admin.execute("create role rd_again login password 'pw'")
        third = admin.execute("select oid::int from pg_roles where rolname = 'rd_again'").fetchone()[0]
    deadline = time.monotonic() + 20
    while True:
        try:
            if login_as_rd_again() == ("rd_again", third):
                break
        except psycopg.Error:
            pass  # the dropped role's backend, until the pooler refetches the role
        assert time.monotonic() < deadline, "a backend of the dropped role still served"
        time.sleep(0.5)
    for _ in range(3):
        assert login_as_rd_again() == ("rd_again", third)
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role rd_again")


def test_a_role_without_connect_on_the_database_is_refused(make_server):
    """REVOKE CONNECT ON DATABASE: Postgres checks it when a backend starts, so pgfleet
    checks it at login, or a role would get in on a pooled backend started before the
    REVOKE. Through pgfleet the next login sees it at once."""
    srv = make_server("--pool-size", "3", "--workers", "2")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop role if exists rd_noconn")
        admin.execute("create role rd_noconn login password 'pw'")

    def login() -> str:
        with psycopg.connect(srv.dsn(user="rd_noconn", password="pw"), autocommit=True,
                             connect_timeout=10) as c:
            return c.execute("select current_user::text").fetchone()[0]

    try:
        assert login() == "rd_noconn"  # leaves pooled backends and cached facts
        with psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) as su:
            su.execute("revoke connect on database postgres from public")
            for _ in range(4):
                with pytest.raises(psycopg.OperationalError) as err:
                    login()
                assert 'permission denied for database "postgres"' in str(err.value)
                assert "User does not have CONNECT privilege." in str(err.value)
            assert su.execute("select 1").fetchone() == (1,)  # the superuser still may
            su.execute("grant connect on database postgres to rd_noconn")
            assert login() == "rd_noconn"
    finally:
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute("grant connect on database postgres to public")
            admin.execute("revoke connect on database postgres from rd_noconn")
