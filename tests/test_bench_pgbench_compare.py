"""bench.pgbench_compare's summary: rows grouped, ratios computed, every mode label
sortable; the p99 latency read from pgbench's per-transaction log."""

from __future__ import annotations

from bench import pgbench_compare


def _run(target: str, mode: str, churn: bool, tps: float) -> dict:
    cpu = {"pgbench": 1.0, "pooler": 1.0, "postgres": 1.0, "machine_busy": 3.0,
           "machine_capacity": 4.0, "other": 0.0}
    return {"target": target, "workload": "select-only", "mode": mode, "churn": churn,
            "clients": 50, "status": "ok", "tps": tps, "latency_avg_ms": 1.0,
            "latency_p99_ms": 3000.0 / tps,
            "failed": 0, "error_lines": 0, "min_1s_tps": tps, "cpu_s": cpu,
            "cpu_us_per_txn": {"pgbench": 1.0, "pooler": 2.0, "postgres": 3.0}}


def test_summary_orders_scram_and_trust_churn_rows_and_computes_ratios() -> None:
    runs = []
    for target, tps in (("direct", 200.0), ("pgbouncer", 3000.0), ("pgfleet", 3300.0)):
        runs.append(_run(target, "simple, trust", True, tps))
        runs.append(_run(target, "simple", True, tps / 2))
        runs.append(_run(target, "extended", False, tps * 10))
    rows = pgbench_compare.summarise(runs)
    modes = [r["mode"] for r in rows]
    assert modes.index("extended") < modes.index("simple -C") < modes.index("simple, trust -C")
    trust = {r["target"]: r for r in rows if r["mode"] == "simple, trust -C"}
    assert trust["pgfleet"]["vs_pgbouncer"] == 1.1
    assert trust["pgfleet"]["vs_direct"] == 16.5
    assert trust["pgfleet"]["p99_vs_pgbouncer"] == round(3000.0 / 3300.0, 3)
    assert trust["direct"]["p99_vs_pgbouncer"] == 15.0
    assert "simple, trust -C" in pgbench_compare.format_table(rows)


def test_stop_process_escalates_to_kill() -> None:
    """Each signal gets its wait; a process that ignores them all is killed."""
    import signal
    import subprocess
    import sys

    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    pgbench_compare.stop_process(stubborn, (signal.SIGINT, 0.2), (signal.SIGTERM, 0.2))
    assert stubborn.returncode == -signal.SIGKILL
    stubborn.stdout.close()
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pgbench_compare.stop_process(polite, (signal.SIGTERM, 10))
    assert polite.returncode == -signal.SIGTERM
    pgbench_compare.stop_process(polite, (signal.SIGTERM, 10))  # already gone: nothing


def test_p99_is_the_nearest_rank_over_every_thread_log_without_failed_ones(tmp_path) -> None:
    """pgbench --log lines: client, transaction, latency (µs), script, epoch s, epoch µs;
    a failed or skipped transaction has a word for its latency."""
    latencies = list(range(1000, 201000, 1000))  # 200 transactions: 1 ms .. 200 ms
    main, thread1 = tmp_path / "txn.123", tmp_path / "txn.123.1"
    main.write_text("".join(f"0 {i} {v} 0 1764400000 {i}\n"
                            for i, v in enumerate(latencies[:100])))
    thread1.write_text("".join(f"1 {i} {v} 0 1764400000 {i}\n"
                               for i, v in enumerate(latencies[100:]))
                       + "1 200 failed 0 1764400001 5\n1 201 skipped 0 1764400001 6 0\n")
    p99 = pgbench_compare.txn_latency_percentile([main, thread1], 0.99)
    assert p99 == 198.0  # the 198th of 200, in ms
    assert pgbench_compare.txn_latency_percentile([main], 0.5) == 50.0
    empty = tmp_path / "txn.9"
    empty.write_text("")
    assert pgbench_compare.txn_latency_percentile([empty], 0.99) is None
