"""Node.js drivers run unchanged through pgfleet.

``tests/apps/node/app.js`` uses node-postgres (npm ``pg`` and ``pg-copy-streams``):
parameterised queries, a named prepared statement reused across transactions (and the
same name on another connection for other text), LISTEN/NOTIFY between two clients,
COPY FROM STDIN and COPY TO STDOUT. ``tests/apps/node/postgresjs.mjs`` uses postgres.js
(npm ``postgres``) with its defaults, which PgBouncer's transaction mode cannot serve:
every query a named prepared statement, pipelined a hundred deep on each connection;
and a transaction with a savepoint, a DDL change under a prepared text, a cursor,
LISTEN, COPY. The npm packages are installed by ``scripts/setup.sh``. The rows each
app wrote are checked straight on Postgres afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

APP = Path(__file__).resolve().parent / "apps" / "node"
NODE_TIMEOUT = 120


def run_app(server, script: str, package: str, table: str) -> dict:
    """Run ``script`` against pgfleet (PG* variables, no TLS); its last line of JSON."""
    node = shutil.which("node")
    assert node, "node is missing: run scripts/setup.sh"
    assert (APP / "node_modules" / package).is_dir(), "npm packages missing: run scripts/setup.sh"
    env = server.env()
    env["PGSSLMODE"] = "disable"
    out = subprocess.run([node, script, table], cwd=APP, env=env, capture_output=True,
                         text=True, timeout=NODE_TIMEOUT)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_postgres_app(server):
    table = f"apps_node_{uuid.uuid4().hex[:10]}"
    try:
        result = run_app(server, "app.js", "pg", table)
        assert result == {"ok": True, "notifications": 3, "copied_in": 5000,
                          "copied_out": 5000, "sum": "15628125.00"}
        with psycopg.connect(server.direct_dsn()) as conn:
            assert conn.execute(f"select count(*), sum(id) from {table}").fetchone() == (50, 1275)
            n, s = conn.execute(f"select count(*), sum(v) from {table}_copy").fetchone()
            assert (n, s) == (5000, Decimal("15628125.00"))
    finally:
        with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
            conn.execute(f"drop table if exists {table}, {table}_copy")


def test_postgres_js_app(server):
    table = f"apps_pjs_{uuid.uuid4().hex[:10]}"
    try:
        result = run_app(server, "postgresjs.mjs", "postgres", table)
        assert result == {"ok": True, "rows": 541, "notifications": 2}
        with psycopg.connect(server.direct_dsn()) as conn:
            names = conn.execute(
                f"select count(*) filter (where name like 'n%%'), "
                f"count(*) filter (where name = 'tx-kept'), count(*) filter (where name like 'copied%%'), "
                f"min(extra), max(extra) from {table}").fetchone()
            assert names == (40, 1, 500, 7, 7)
    finally:
        with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
            conn.execute(f"drop table if exists {table}")


@pytest.fixture(autouse=True)
def _no_inherited_pg_env(monkeypatch):
    """Only the server's PG* variables reach node (not a developer's own PGSERVICE etc.)."""
    for key in list(os.environ):
        if key.startswith("PG"):
            monkeypatch.delenv(key)
