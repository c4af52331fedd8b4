"""Session settings are replayed on whichever backend serves a session, not pinned.

Every check runs the same steps through pgfleet (one backend shared by several
sessions) and straight against Postgres, and expects the same answers.
"""

from __future__ import annotations

import psycopg
import pytest

STARTUP = "-c search_path=startup_path -c statement_timeout=4000"


@pytest.fixture(scope="module")
def one_backend(make_module_server):
    return make_module_server("--pool-size", "1", "--workers", "2", "--query-wait-timeout", "10")


def connect_both(srv, **kw):
    via = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10, **kw)
    direct = psycopg.connect(srv.direct_dsn(), autocommit=True, connect_timeout=10, **kw)
    return via, direct


def show(conn, name):
    return conn.execute(f"show {name}").fetchone()[0]


STEPS = [
    # (statement, settings to compare afterwards)
    ("set search_path = s1, public", ["search_path"]),
    ("set timezone = 'Asia/Tokyo'", ["timezone"]),
    ("set myapp.note = 'it''s; drop table x'", ["myapp.note"]),
    ("begin", []),
    ("set search_path = inside_rolled_back", ["search_path"]),
    ("rollback", ["search_path"]),
    ("begin", []),
    ("set local timezone = 'Europe/Paris'", ["timezone"]),
    ("commit", ["timezone"]),
    ("begin", []),
    ("savepoint sp", []),
    ("set work_mem = '7MB'", ["work_mem"]),
    ("rollback to savepoint sp", ["work_mem"]),
    ("set work_mem = '9MB'", ["work_mem"]),
    ("commit", ["work_mem"]),
    ("select set_config('application_name', 'via_set_config', false)", ["application_name"]),
    ("reset search_path", ["search_path"]),
    ("reset statement_timeout", ["statement_timeout"]),
    ("set statement_timeout = 1234", ["statement_timeout"]),
    ("set session characteristics as transaction isolation level serializable",
     ["default_transaction_isolation"]),
    ("reset all", ["search_path", "statement_timeout", "timezone", "work_mem",
                   "application_name", "default_transaction_isolation"]),
    ("discard all", ["search_path", "statement_timeout"]),
]


def test_settings_follow_the_session_like_postgres(one_backend):
    via, direct = connect_both(one_backend, options=STARTUP, application_name="appname")
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10,
                            options="-c search_path=other_path", application_name="other")
    try:
        for sql, names in STEPS:
            for conn in (via, direct):
                conn.execute(sql)
            if via.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                # Another session uses the only backend in between: nothing may leak.
                assert show(other, "search_path") == "other_path"
                assert show(other, "application_name") == "other"
            for name in names:
                assert show(via, name) == show(direct, name), (sql, name)
            for name in ("application_name", "TimeZone", "DateStyle", "client_encoding"):
                assert via.info.parameter_status(name) == direct.info.parameter_status(name), (
                    sql, name)
    finally:
        for c in (via, direct, other):
            c.close()


def test_invalid_set_fails_at_once_and_is_not_replayed(one_backend):
    via, direct = connect_both(one_backend)
    other = psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
    try:
        for conn in (via, direct):
            conn.execute("set timezone = 'UTC'")
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute("set timezone = 'No/Such_Zone'")
            with pytest.raises(psycopg.errors.UndefinedObject):
                conn.execute("set no_such_setting = 1")
        other.execute("select 1")  # the backend serves someone else in between
        assert show(via, "timezone") == show(direct, "timezone") == "UTC"
    finally:
        for c in (via, direct, other):
            c.close()


def test_set_does_not_pin(one_backend):
    """With one backend, a pinned session would starve every other one."""
    sessions = [psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10)
                for _ in range(4)]
    try:
        for i, conn in enumerate(sessions):
            conn.execute(f"set search_path = path_{i}")
            conn.execute(f"set application_name = 'app_{i}'")
        for _ in range(50):
            for i, conn in enumerate(sessions):
                assert conn.execute(
                    "select current_setting('search_path'), current_setting('application_name')"
                ).fetchone() == (f"path_{i}", f"app_{i}")
        # A transaction per session, interleaved: each sees its own settings inside it too.
        for i, conn in enumerate(sessions):
            with conn.transaction():
                assert show(conn, "search_path") == f"path_{i}"
    finally:
        for c in sessions:
            c.close()


def test_interleaved_sessions_never_see_each_others_settings(one_backend):
    a = psycopg.connect(one_backend.dsn(), connect_timeout=10,
                        options="-c search_path=aa -c TimeZone=Asia/Tokyo", application_name="A")
    b = psycopg.connect(one_backend.dsn(), connect_timeout=10,
                        options="-c search_path=bb -c TimeZone=America/Lima", application_name="B")
    try:
        for i in range(500):
            for conn, tag, tz in ((a, "aa", "Asia/Tokyo"), (b, "bb", "America/Lima")):
                row = conn.execute(
                    "select current_setting('search_path'), current_setting('TimeZone'), "
                    "current_setting('application_name'), %s::int", (i,)
                ).fetchone()
                assert row == (tag, tz, tag[0].upper(), i)
                conn.commit()
    finally:
        a.close()
        b.close()


def test_sessions_with_the_same_startup_settings_stay_apart(one_backend):
    """Sessions that start with equal settings share one book in the worker; a SET in
    one of them must still be its own (one backend serves both)."""
    conns = [psycopg.connect(one_backend.dsn(), autocommit=True, connect_timeout=10,
                             options="-c work_mem=5MB", application_name="same")
             for _ in range(4)]
    try:
        conns[0].execute("set work_mem = '11MB'")
        for _ in range(3):
            for i, conn in enumerate(conns):
                assert show(conn, "work_mem") == ("11MB" if i == 0 else "5MB")
        conns[0].execute("reset work_mem")
        assert [show(c, "work_mem") for c in conns] == ["5MB"] * 4
    finally:
        for c in conns:
            c.close()
