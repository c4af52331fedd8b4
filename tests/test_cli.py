"""The CLI as a user runs it: help, first start, second start on the same home, clean stop."""

from __future__ import annotations

import os
import subprocess

import psycopg

from .conftest import PASSWORD, PGFLEET, PgfleetServer


def test_help_lists_every_option():
    out = subprocess.run([PGFLEET, "up", "--help"], capture_output=True, text=True).stdout
    for opt in ("--home", "--host", "--port", "--workers", "--pool-size", "--password",
                "--auth", "--query-wait-timeout", "--log-level", "--postgres-sched"):
        assert opt in out


def test_postgres_runs_batch_unless_asked_not_to(server, make_server):
    """SCHED_BATCH by default, for the Postgres pgfleet starts; --postgres-sched normal
    leaves it as Postgres started by hand would run."""
    assert os.sched_getscheduler(server.postmaster_pid()) == os.SCHED_BATCH
    normal = make_server("--postgres-sched", "normal", "--workers", "1", "--pool-size", "2")
    assert os.sched_getscheduler(normal.postmaster_pid()) == os.SCHED_OTHER
    with psycopg.connect(normal.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_psql_select_one(server):
    out = subprocess.run(["psql", server.url(), "-Atc", "select 1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_second_up_on_same_home_refuses(server):
    other = PgfleetServer(home=server.home)
    cmd = [PGFLEET, "up", "--home", str(server.home), "--port", str(other.port)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "already running" in out.stderr


def test_restart_keeps_data_and_password():
    s = PgfleetServer("--workers", "1", "--pool-size", "2")
    try:
        s.start()
        with psycopg.connect(s.dsn(), autocommit=True) as conn:
            conn.execute("create table kept(x int)")
            conn.execute("insert into kept values (42)")
        assert s.stop() == 0
        assert s.log().count("initialising Postgres") == 1
        # Stop leaves no child processes and no Postgres behind.
        s.start()
        with psycopg.connect(s.dsn(password=PASSWORD)) as conn:
            assert conn.execute("select x from kept").fetchone() == (42,)
        assert s.log().count("initialising Postgres") == 1
    finally:
        s.cleanup()
