"""The PostgreSQL JDBC driver (Debian's ``libpostgresql-jdbc-java``) run unchanged through
pgfleet.

``tests/apps/jdbc/PgfleetJdbc.java`` is compiled with javac into a temporary directory
at test time. It reuses one PreparedStatement 20 times (from the 5th use the driver
switches to a named server-side statement, ``prepareThreshold``), reuses an INSERT
across commits and a failed transaction, and inserts 1,000 rows with
addBatch/executeBatch. The rows are counted straight on Postgres afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from .conftest import PASSWORD

SOURCE = Path(__file__).resolve().parent / "apps" / "jdbc" / "PgfleetJdbc.java"
DRIVER = Path("/usr/share/java/postgresql.jar")
JAVA_TIMEOUT = 120


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """The app's classes, compiled against the driver jar."""
    javac = shutil.which("javac")
    assert javac, "javac is missing: run scripts/setup.sh"
    assert DRIVER.exists(), f"{DRIVER} is missing: run scripts/setup.sh"
    out_dir = tmp_path_factory.mktemp("jdbc")
    res = subprocess.run([javac, "-cp", str(DRIVER), "-d", str(out_dir), str(SOURCE)],
                         capture_output=True, text=True, timeout=JAVA_TIMEOUT)
    assert res.returncode == 0, res.stderr
    return out_dir


@pytest.fixture
def table(server):
    name = f"apps_jdbc_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        conn.execute(f"drop table if exists {name}")


def test_jdbc_prepared_reuse_and_batch(server, compiled, table):
    url = f"jdbc:postgresql://127.0.0.1:{server.port}/postgres"
    res = subprocess.run(
        ["java", "-cp", f"{DRIVER}:{compiled}", "PgfleetJdbc", url, "postgres", PASSWORD, table],
        capture_output=True, text=True, timeout=JAVA_TIMEOUT)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    lines = dict(line.split("=", 1) for line in res.stdout.split() if "=" in line)
    assert lines["done"] == "ok"
    assert int(lines["server_prepared_runs"]) >= 15
    assert lines["batch_rows"] == "1000" and lines["batch_sum"] == "5005.00"

    with psycopg.connect(server.direct_dsn()) as conn:
        n, total = conn.execute(f"select count(*), sum(amount) from {table} where id > 0").fetchone()
        assert (n, total) == (1000, Decimal("5005.00"))
        assert conn.execute(f"select count(distinct id) from {table} where id > 0").fetchone() == (1000,)
        reused = conn.execute(f"select id, name, tags from {table} where id < 0 order by id desc").fetchall()
        assert [r[0] for r in reused] == list(range(-1, -12, -1))
        assert reused[0] == (-1, "reuse 1", ["a1", "b"])
        assert reused[-1] == (-11, "after rollback", None)
