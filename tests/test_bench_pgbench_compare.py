"""bench.pgbench_compare's summary: rows grouped, ratios computed, every mode label sortable."""

from __future__ import annotations

from bench import pgbench_compare


def _run(target: str, mode: str, churn: bool, tps: float) -> dict:
    cpu = {"pgbench": 1.0, "pooler": 1.0, "postgres": 1.0, "machine_busy": 3.0,
           "machine_capacity": 4.0, "other": 0.0}
    return {"target": target, "workload": "select-only", "mode": mode, "churn": churn,
            "clients": 50, "status": "ok", "tps": tps, "latency_avg_ms": 1.0,
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
