"""Django (with psycopg 3) run unchanged through pgfleet.

The app is ``tests/apps/django_app``: contrib apps (admin, auth, contenttypes,
sessions, messages, postgres) and a ``notes`` app whose migration creates the pg_trgm
extension and a model with a JSONField under a GIN index. Through pgfleet:

- ``manage.py migrate`` on a database created through pgfleet;
- ``manage.py makemigrations --check``: the models match the shipped migration;
- ``manage.py test``: Django's runner creates its test database through pgfleet
  (CREATE DATABASE from the ``postgres`` database), migrates it, runs the app's
  tests (JSONField lookups, SearchVector/SearchRank full-text search, trigram
  similarity, select_for_update in transaction.atomic, savepoints, NOWAIT and SKIP
  LOCKED between two sessions, auth and sessions) and drops the test database.

Each runs twice: with Django's default client-side parameter binding and with
psycopg's server-side binding (the extended protocol). Results are checked straight on
Postgres too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from .conftest import PASSWORD

APP_DIR = Path(__file__).resolve().parent / "apps" / "django_app"
MANAGE_TIMEOUT = 120
APPS = {"admin", "auth", "contenttypes", "sessions", "notes"}


@pytest.fixture(scope="module")
def fleet(make_module_server):
    return make_module_server("--workers", "2", "--pool-size", "5")


def manage(server, dbname: str, *args: str, binding: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DJANGO"))}
    env.update(PGFLEET_PORT=str(server.port), PGFLEET_PASSWORD=PASSWORD, DJANGO_DB_NAME=dbname,
               DJANGO_SERVER_SIDE_BINDING="1" if binding == "server" else "0",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "manage.py", *args], cwd=APP_DIR, env=env,
                          capture_output=True, text=True, timeout=MANAGE_TIMEOUT)


def must(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"stdout:\n{out.stdout[-6000:]}\nstderr:\n{out.stderr[-6000:]}"
    return out.stdout + out.stderr


@pytest.fixture(params=["client", "server"])
def binding(request) -> str:
    return request.param


@pytest.fixture
def dbname(fleet):
    """A database created through pgfleet; it and Django's test database are dropped after."""
    name = f"django_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fleet.dsn(sslmode="disable"), autocommit=True) as conn:
        conn.execute(f"create database {name}")
    yield name
    with psycopg.connect(fleet.direct_dsn(), autocommit=True) as conn:
        for db in (name, f"test_{name}"):
            conn.execute(f"drop database if exists {db} with (force)")


@pytest.mark.slow
def test_migrate_and_manage_test(fleet, dbname, binding):
    must(manage(fleet, dbname, "migrate", "--noinput", binding=binding))
    with psycopg.connect(fleet.direct_dsn(dbname)) as conn:
        applied = {app for (app,) in conn.execute("select distinct app from django_migrations")}
        assert APPS <= applied, applied
        assert conn.execute("select extname from pg_extension where extname = 'pg_trgm'"
                            ).fetchone() == ("pg_trgm",)
        assert conn.execute("select to_regclass('notes_note'), to_regclass('note_data_gin')"
                            ).fetchone() == ("notes_note", "note_data_gin")

    must(manage(fleet, dbname, "makemigrations", "--check", "--dry-run", binding=binding))

    res = manage(fleet, dbname, "test", "notes", "--noinput", "-v", "2", binding=binding)
    out = res.stdout + res.stderr
    assert f"Creating test database for alias 'default' ('test_{dbname}')" in out, out
    assert "Ran 9 tests" in out and "\nOK\n" in out, out
    assert "Destroying test database" in out, out
    # Last step: DROP DATABASE test_... from the postgres database, as soon as Django has
    # closed its own connections to the test database.
    assert res.returncode == 0, f"the runner's teardown failed:\n{res.stderr[-3000:]}"
    with psycopg.connect(fleet.direct_dsn()) as conn:
        left = conn.execute("select datname from pg_database where datname = %s",
                            (f"test_{dbname}",)).fetchall()
    assert left == [], "Django's test database was not dropped"
