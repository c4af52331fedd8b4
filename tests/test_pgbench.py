"""pgbench through pgfleet: initialisation, then select-only and TPC-B runs in each
query mode (simple, extended, prepared) with more clients than backends.

After each run the database is checked straight through Postgres's Unix socket: a
TPC-B transaction adds the same delta to one account, one teller and one branch and
inserts one history row, so any lost, duplicated or half-applied transaction shows
up as a mismatch between those sums and the history.
"""

from __future__ import annotations

import re
import subprocess

import psycopg
import pytest

from .conftest import PASSWORD, PgfleetServer

CLIENTS = 20
DURATION = 5


@pytest.fixture(scope="module")
def bench_server():
    """An instance of our own (pgbench drops and creates its tables): 10 backends, 2 workers."""
    s = PgfleetServer("--pool-size", "10", "--workers", "2")
    try:
        s.start()
        out = subprocess.run(["pgbench", "-i", "-s", "1"], env=s.env(), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, f"pgbench -i failed:\n{out.stdout}\n{out.stderr}\n{s.log()}"
        yield s
    finally:
        s.cleanup()


def totals(server: PgfleetServer) -> dict[str, int]:
    with psycopg.connect(server.direct_dsn(), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            "select (select coalesce(sum(abalance), 0) from pgbench_accounts),"
            " (select coalesce(sum(tbalance), 0) from pgbench_tellers),"
            " (select coalesce(sum(bbalance), 0) from pgbench_branches),"
            " (select coalesce(sum(delta), 0) from pgbench_history),"
            " (select count(*) from pgbench_history),"
            " (select count(*) from pgbench_accounts)").fetchone()
    return dict(zip(("accounts", "tellers", "branches", "history_delta", "history_rows",
                     "account_rows"), (int(v) for v in row), strict=True))


def test_pgbench_init_loaded_the_tables(bench_server):
    t = totals(bench_server)
    assert t["account_rows"] == 100_000
    assert t["history_rows"] == 0


@pytest.mark.parametrize("script", ["select-only", "tpcb"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_run(bench_server, mode, script):
    before = totals(bench_server)
    cmd = ["pgbench", "-M", mode, "-c", str(CLIENTS), "-j", "2", "-T", str(DURATION)]
    if script == "select-only":
        cmd.append("-S")
    out = subprocess.run(cmd, env=bench_server.env(), capture_output=True, text=True,
                         timeout=60)
    text = out.stdout + out.stderr
    context = f"{' '.join(cmd)} exited {out.returncode}:\n{text}\npgfleet log tail:\n" \
              f"{bench_server.log()[-4000:]}"
    assert out.returncode == 0, context
    assert f"query mode: {mode}" in text, context
    m = re.search(r"number of transactions actually processed: (\d+)", text)
    assert m, context
    processed = int(m.group(1))
    assert processed > 0, context
    assert re.search(r"number of failed transactions: 0 \(", text), context
    assert "error" not in text.lower(), context
    assert "aborted" not in text.lower(), context

    after = totals(bench_server)
    assert after["account_rows"] == 100_000
    if script == "select-only":
        # Reads only: no balance changed (pgbench still truncated the history first).
        for table in ("accounts", "tellers", "branches"):
            assert after[table] == before[table], (table, before, after)
    else:
        # pgbench truncates pgbench_history before a TPC-B run (it does not without -n), so
        # the history holds exactly this run's transactions: one row per processed one.
        assert after["history_rows"] == processed, (after, processed)
        for table in ("accounts", "tellers", "branches"):
            assert after[table] - before[table] == after["history_delta"], (table, before, after)


def test_balances_match_history_in_total(bench_server):
    """Without the truncation: run TPC-B with -n so history accumulates from the start.

    Fixed transaction counts (-t), so every client's every transaction must commit. Ten
    clients, as many as backends: this checks the writes themselves in each mode; queueing
    with more clients than backends is what test_pgbench_run covers.
    """
    with psycopg.connect(bench_server.direct_dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("update pgbench_accounts set abalance = 0 where abalance <> 0")
        conn.execute("update pgbench_tellers set tbalance = 0")
        conn.execute("update pgbench_branches set bbalance = 0")
        conn.execute("truncate pgbench_history")
    clients, per_client = 10, 50
    processed = 0
    for mode in ("simple", "extended", "prepared"):
        cmd = ["pgbench", "-n", "-M", mode, "-c", str(clients), "-j", "2", "-t", str(per_client)]
        out = subprocess.run(cmd, env=bench_server.env(), capture_output=True, text=True,
                             timeout=60)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text
        assert re.search(r"number of failed transactions: 0 \(", text), text
        m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", text)
        assert m and m.group(1) == m.group(2) == str(clients * per_client), text
        processed += int(m.group(1))
    t = totals(bench_server)
    assert t["history_rows"] == processed == 3 * clients * per_client
    assert t["accounts"] == t["history_delta"]
    assert t["tellers"] == t["history_delta"]
    assert t["branches"] == t["history_delta"]


def test_the_benchmark_reads_a_p99_from_a_real_pgbench_run(bench_server):
    """bench.pgbench_compare's run, short, through pgfleet, with and without -C: the p99
    comes from pgbench's own per-transaction log (sampled without -C)."""
    import argparse

    from bench import pgbench_compare

    roots = {"pgfleet": {"pid": bench_server.proc.pid, "exclude": set()},
             "postgres": {"pid": bench_server.proc.pid}}
    conn = {"host": "127.0.0.1", "port": bench_server.port, "password": PASSWORD}
    args = argparse.Namespace(threads=2, duration=2)
    for churn in (False, True):
        r = pgbench_compare.run_pgbench("pgfleet", "simple", conn, args, 4, churn, roots)
        assert r["status"] == "ok", r["output"]
        assert r["latency_p99_ms"] is not None and 0 < r["latency_p99_ms"] < 10_000, r
