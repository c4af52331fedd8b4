"""What pins a session: Postgres's parser decides, so names and strings do not fool it."""

from __future__ import annotations

import pytest

from gateway.classify import PLAIN, effects, might_unpin, pin_reason, returns_no_rows

PINS = {
    "create temp table t(x int)": "temp_table",
    "CREATE GLOBAL TEMPORARY TABLE t(x int)": "temp_table",
    "create temporary view v as select 1": "temp_table",
    "create temp sequence s": "temp_table",
    "select * into temp x from y": "temp_table",
    "create temp table a as select 1": "temp_table",
    "select * from pg_temp.t": "temp_table",
    "create function pg_temp.f() returns int language sql as 'select 1'": "temp_table",
    "select pg_advisory_lock(1)": "advisory_lock",
    "select pg_catalog.pg_try_advisory_lock(1, 2)": "advisory_lock",
    "select x from t where pg_advisory_lock_shared(t.id) is not null": "advisory_lock",
    "do $$begin perform pg_advisory_lock(1); end$$": "advisory_lock",
    "declare c cursor with hold for select 1": "with_hold_cursor",
    "set role alice": "set_role",
    "SET SESSION AUTHORIZATION alice": "set_role",
    "select set_config('role', 'alice', false)": "set_role",
    "select set_config($1, $2, false)": "set_role",  # cannot know which setting: pin
    "do $$begin listen x; end$$": "listen",  # the hub cannot see it: the backend keeps it
    "do $$begin if true then set role alice; end if; end$$": "set_role",
    "load 'auto_explain'": "load",
    "prepare p as select 1": "sql_prepare",
    # A PREPAREd statement that takes a lock pins for the lock, not only for PREPARE.
    "prepare p as select pg_advisory_lock(1)": "advisory_lock",
    "select 1; create temp table t2(x int)": "temp_table",
    # Not valid SQL for the parser: the keyword scan decides, towards pinning.
    "create temp tabel oops(x int)": "temp_table",
}

SHARES = [
    'listen "Quoted Channel"',  # served by the LISTEN hub
    "unlisten *",
    "select temp from weather",
    "update weather set temp = temp + 1",
    "select 'listen to this', 'create temp table'",
    "select $$ pg_advisory_lock( $$",
    "-- create temp table\nselect 1",
    "select pg_advisory_xact_lock(1)",
    "declare c cursor for select 1",
    "set local role alice",
    "set role none",
    "set session authorization default",
    "select set_config('role', 'alice', true)",
    "select set_config('search_path', 'a', false)",
    "create unlogged table u(x int)",
    "create table settings(holding int)",
    "select * from temperatures",
]


@pytest.mark.parametrize("sql,reason", PINS.items())
def test_pins(sql: str, reason: str) -> None:
    assert pin_reason(sql.encode()) == reason


@pytest.mark.parametrize("sql", SHARES)
def test_does_not_pin(sql: str) -> None:
    assert pin_reason(sql.encode()) is None


def test_invalid_utf8_falls_back_to_the_scan() -> None:
    assert pin_reason(b"create temp table \xff(x int)") == "temp_table"
    assert pin_reason(b"select '\xff'") is None


@pytest.mark.parametrize("sql", ["reset role", "set role none", "set session authorization default",
                                 "select pg_advisory_unlock_all()", "discard temp", "unlisten *",
                                 "close c", "drop table t"])
def test_statements_that_may_unpin_are_rechecked(sql: str) -> None:
    assert might_unpin(sql.encode())


def test_texts_differing_in_numbers_share_a_plain_shape() -> None:
    from gateway import classify

    classify._PLAIN_SHAPES.clear()
    assert classify.effects(b"SELECT abalance FROM t WHERE aid = 17") is classify.PLAIN
    assert len(classify._PLAIN_SHAPES) == 1
    assert classify.effects(b"select ABALANCE from T where AID = 92") is classify.PLAIN
    assert len(classify._PLAIN_SHAPES) == 1  # the same shape: no new entry
    # Found plain by the parser (SET is a keyword of UPDATE too): remembered by shape.
    update = b"UPDATE t SET v = v + %d WHERE id = %d"
    assert classify.effects(update % (17, 4)) is classify.PLAIN
    assert len(classify._PLAIN_SHAPES) == 2
    assert classify.effects(update % (99, 8)) is classify.PLAIN
    assert len(classify._PLAIN_SHAPES) == 2


def test_a_shape_never_hides_what_a_statement_does() -> None:
    from gateway.classify import PLAIN, effects

    # Channels differ only in digits: each keeps its own channel.
    assert effects(b"LISTEN ch1").listen == (("listen", b"ch1"),)
    assert effects(b"LISTEN ch2").listen == (("listen", b"ch2"),)
    assert effects(b"select s1et from t") is PLAIN
    assert effects(b"select pg_advisory_lock(42)").pin == "advisory_lock"
    # A plain text never vouches for another whose digits are placed differently.
    assert effects(b"select * from pg_temp1.t") is PLAIN
    assert effects(b"select * from pg_temp.t").pin == "temp_table"
    assert effects(b"select * from pg_temp_3.t").pin == "temp_table"
    assert effects(b"SET work_mem = '64MB'").sets


@pytest.mark.parametrize("sql", [
    "alter role app set search_path = s", "ALTER USER app PASSWORD 'x'", "alter group g add user u",
    "alter role all in database d set work_mem = '8MB'", "begin; alter database d reset all",
    "/* why */ drop role if exists app", "drop user app", "drop database d",
    "alter database d allow_connections false", "ALTER SYSTEM SET timezone = 'UTC'",
    "select pg_reload_conf()", "SELECT pg_catalog.pg_reload_conf ()",
    "revoke connect on database app from public", "GRANT CONNECT, TEMP ON DATABASE app TO r",
])
def test_statements_that_change_logins(sql: str) -> None:
    from gateway.classify import effects

    assert effects(sql.encode()).logins


@pytest.mark.parametrize("sql", [
    "select * from users", "select current_user", "alter table role add column user_id int",
    "select 'alter role x set y = 1'", "create table database (id int)",
    "update accounts set role = 'admin'", 'select "alter role" from t',
    "select * from system_reload_log", "select 'pg_reload_conf()'",
    "grant select on table database_log to r", "revoke all on schema s from public",
])
def test_statements_that_leave_logins_alone(sql: str) -> None:
    from gateway.classify import effects

    assert not effects(sql.encode()).logins


@pytest.mark.parametrize("sql", [
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "insert into t values ($1)", "  delete from t where id = $1", "END;", "commit", "ROLLBACK ;",
    "insert into t values (1) on conflict (id) do update set v = excluded.v",
])
def test_statements_that_return_no_rows(sql: str) -> None:
    assert returns_no_rows(sql.encode())


@pytest.mark.parametrize("sql", [
    "select 1", "insert into t values ($1) returning id", "UPDATE t SET v = 1 RETURNING *",
    "delete from t returning 'x'", "with d as (delete from t returning *) select * from d",
    "/* tag */ update t set v = 1", "insert", "values (1)", "show work_mem", "explain update t set v = 1",
    "update t set note = 'returning' where id = $1",  # errs towards rows
])
def test_statements_that_may_return_rows(sql: str) -> None:
    assert not returns_no_rows(sql.encode())


def test_statements_that_read_sequence_state() -> None:
    for sql in (b"select lastval()", b"SELECT currval('s')", b"select currval($1::regclass)",
                b"insert into t values (1); select LASTVAL()"):
        assert effects(sql).sequences, sql
    for sql in (b"select nextval('s')", b"insert into t(v) values ($1)", b"select 1"):
        assert not effects(sql).sequences, sql
    assert effects(b"select id from t where id = 5") is PLAIN


def test_statements_that_write_sequence_state() -> None:
    for sql in (b"select nextval('s')", b"SELECT NEXTVAL($1)", b"select setval('s', 10)",
                b"insert into t(id) values (nextval('s'))"):
        fx = effects(sql)
        assert fx.advances and not fx.sequences, sql
    for sql in (b"select currval('s')", b"insert into t(v) values ($1)", b"select 1"):
        assert not effects(sql).advances, sql
