"""bench.run_all's own pieces: the process tree, PSS sums and the report it writes."""

from __future__ import annotations

import os
import subprocess
import sys

from bench import run_all


def test_tree_pids_follows_children_and_leaves_out_excluded_subtrees() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert child.pid in run_all.tree_pids(me, set())
        assert child.pid not in run_all.tree_pids(me, {child.pid})
        assert me in run_all.tree_pids(me, set())
    finally:
        child.kill()
        child.wait()


def test_pss_of_a_live_process_is_counted_and_a_gone_one_is_not() -> None:
    mine = run_all.pss_bytes([os.getpid()])
    assert mine > 1_000_000  # a Python interpreter
    assert run_all.pss_bytes([2**22 + 12345]) == 0  # above pid_max: never a process


def test_report_has_the_scale_and_memory_tables() -> None:
    summary = {
        "totals": {"held_max": 20000, "qps_avg": 4999.5, "connect_failures": 0,
                   "query_failures": 0, "skipped": 3},
        "connect_latency_ms": {"p99": 12.5},
        "query_latency_ms": {"p99": 4.25},
        "backends_max": 20,
        "gen_cpu_max_pct": 71.0,
        "problems": [],
    }
    failed = dict(summary, problems=["12 connects failed"])
    rows = [run_all.scale_row("pgfleet", (20000, 2000, 5000, 75), summary),
            run_all.scale_row("pgbouncer", (20000, 2000, 5000, 75), failed)]
    memory = {"pgfleet": {"baseline_bytes": 100, "loaded_bytes": 70_100, "held": 10,
                          "bytes_per_client": 7000.0}}
    text = run_all.report(None, rows, memory, ["a note"])
    assert "| 20000 conn, 2000/s churn, 5000 qps, 75 s | pgfleet | 20000 | 5000 | 12.5 | 4.2 |" in text
    assert "| 12 connects failed |" in text
    short = dict(summary, totals=dict(summary["totals"], held_max=11000))
    row = run_all.scale_row("pgfleet", (20000, 2000, 5000, 75), short)
    assert row["problems"] == ["held at most 11000 of the 20000 connections asked"]
    assert "| pgfleet | 10 | 100 | 70,100 | 7,000 |" in text
    assert text.rstrip().endswith("- a note")


def test_firehose_cmd_spells_options_as_flags(tmp_path) -> None:
    cmd = run_all.firehose_cmd(24000, tmp_path / "home", tmp_path / "out", connections=5,
                               write_ratio=0.2, max_backends=20)
    assert cmd[1] == "firehose"
    flags = cmd[2:]
    assert flags[flags.index("--port") + 1] == "24000"
    assert flags[flags.index("--write-ratio") + 1] == "0.2"
    assert flags[flags.index("--max-backends") + 1] == "20"
    assert flags[flags.index("--connections") + 1] == "5"
