"""Every benchmark issue 5 asks for, in one command, with one report.

    .venv/bin/python -m bench.run_all                  # the full set (about 35 minutes)
    .venv/bin/python -m bench.run_all --quick          # a smoke run of every part (about 6 minutes)

1. Throughput: ``bench.pgbench_compare`` over 10, 50 and 200 clients, select-only and
   TPC-B, ``-M simple/extended/prepared``, plus ``-C`` churn: direct, PgBouncer, pgfleet.
2. Scale: ``pgfleet firehose`` against pgfleet and against PgBouncer (transaction mode,
   same pool size) in front of the same Postgres: 20,000 connections with 2,000/s churn
   and 5,000 qps, then 18,000 with 2,000/s churn and 10,000 qps, then 2,000 held
   connections at 5,000 qps (latency below saturation).
3. Memory: 10,000 idle clients held on each, before the scale runs; summed PSS of
   the pooler's processes, minus the same sum just before they connected, per client.

Everything lands in ``--out`` (default ``bench/results/all-<time>/``): the pgbench JSON,
each firehose run's CSV, PNG and JSON, and ``report.md`` with the three tables.
Run as root from the checkout (PgBouncer runs as the ``postgres`` OS user).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import pgbench_compare as pc

PGFLEET = pc.PGFLEET


def pss_bytes(pids: list[int]) -> int:
    """Summed proportional set size of ``pids`` (shared pages split between sharers)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def tree_pids(root: int, exclude: set[int]) -> list[int]:
    """``root`` and its descendants, without the subtrees rooted at ``exclude``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def firehose_cmd(port: int, home: Path, out: Path, **options: object) -> list[str]:
    """``pgfleet firehose`` against 127.0.0.1:``port`` as postgres; ``options`` are its
    flags (``max_backends=20`` is ``--max-backends 20``)."""
    cmd = [PGFLEET, "firehose", "--host", "127.0.0.1", "--port", str(port), "--user", "postgres",
           "--dbname", "postgres", "--home", str(home), "--out", str(out), "--quiet"]
    for name, value in options.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def _start_group(cmd: list[str], logf, env: dict) -> subprocess.Popen:
    """The firehose in a process group of its own: its load processes go with it."""
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=pc.ROOT,
                            start_new_session=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a firehose run (interrupted, or past its timeout)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def firehose(port: int, password: str, home: Path, out: Path, connections: int, churn: int,
             qps: int, duration: int, ramp: float, max_backends: int | None,
             timeout: float) -> dict:
    """One ``pgfleet firehose`` run; returns its JSON summary (plus the exit status)."""
    limit = {} if max_backends is None else {"max_backends": max_backends}
    cmd = firehose_cmd(port, home, out, connections=connections, churn=churn, qps=qps,
                       write_ratio=0.2, duration=duration, ramp=ramp, **limit)
    pc.log(f"firehose: {' '.join(cmd[2:])}")
    env = dict(os.environ, PGPASSWORD=password)
    with open(out.with_suffix(".log"), "wb") as logf:
        proc = _start_group(cmd, logf, env)
        try:
            proc.wait(timeout)
        finally:
            _stop_group(proc)
    try:
        summary = json.loads((out / "firehose.json").read_text())
    except (OSError, ValueError):
        summary = {"problems": [f"no summary (exit {proc.returncode})"]}
    summary["exit_status"] = proc.returncode
    return summary


def idle_memory(port: int, password: str, home: Path, out: Path, pids_of, clients: int) -> dict:
    """Bytes of PSS per idle client: ``clients`` held with no queries, measured once
    they are all logged in, against the same processes just before."""
    base = pss_bytes(pids_of())
    duration, ramp = 40, 15
    cmd = firehose_cmd(port, home, out, connections=clients, qps=0, duration=duration, ramp=ramp)
    env = dict(os.environ, PGPASSWORD=password)
    logf = open(out.with_suffix(".log"), "wb")
    proc = _start_group(cmd, logf, env)
    try:
        # Well after the ramp, before the end: every client is held and idle.
        time.sleep(ramp + 12)
        loaded = pss_bytes(pids_of())
        proc.wait(duration + 60)
    finally:
        _stop_group(proc)
        logf.close()
    try:
        summary = json.loads((out / "firehose.json").read_text())
        held = summary["totals"]["held_max"]
    except (OSError, ValueError, KeyError):
        held = 0
    per = (loaded - base) / held if held else None
    return {"baseline_bytes": base, "loaded_bytes": loaded, "held": held, "bytes_per_client": per}


SCALE = [
    # (connections, churn per second, qps, seconds)
    (20000, 2000, 5000, 75),
    (18000, 2000, 10000, 75),
    # Latency where the machine is not saturated: what a client waits for when the
    # pooler is the only cause (the runs above measure capacity and congestion).
    (2000, 0, 5000, 30),
]
QUICK_SCALE = [(2000, 200, 500, 15)]


def scale_row(target: str, load: tuple, s: dict) -> dict:
    t = s.get("totals", {})
    problems = list(s.get("problems", []))
    held = t.get("held_max") or 0
    if held < 0.99 * load[0]:
        # Not a failure to the firehose (nothing was refused), but the load was not held.
        problems.append(f"held at most {held} of the {load[0]} connections asked")
    return {
        "target": target,
        "connections": load[0], "churn": load[1], "qps": load[2], "seconds": load[3],
        "held_max": t.get("held_max"),
        "qps_avg": t.get("qps_avg"),
        "connect_p99_ms": (s.get("connect_latency_ms") or {}).get("p99"),
        "query_p99_ms": (s.get("query_latency_ms") or {}).get("p99"),
        "connect_failures": t.get("connect_failures"),
        "query_failures": t.get("query_failures"),
        "skipped": t.get("skipped"),
        "backends_max": s.get("backends_max"),
        "gen_cpu_max_pct": s.get("gen_cpu_max_pct"),
        "problems": problems,
    }


def report(pgbench_json: Path | None, scale: list[dict], memory: dict, notes: list[str]) -> str:
    lines = [f"# pgfleet benchmarks, {dt.datetime.now():%Y-%m-%d %H:%M}", ""]
    if pgbench_json is not None and pgbench_json.exists():
        doc = json.loads(pgbench_json.read_text())
        lines += ["## Throughput (pgbench)", "", pc.format_table(pc.summarise(doc["runs"])), ""]
    if scale:
        lines += ["## Scale (firehose)", "",
                  "| load | target | held max | queries/s | login p99 ms | query p99 ms | "
                  "connect fails | query fails | skipped | Postgres backends max | "
                  "generator CPU max % | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in scale:
            def f(v, fmt="{:.1f}"):
                return "-" if v is None else fmt.format(v)
            lines.append(
                f"| {r['connections']} conn, {r['churn']}/s churn, {r['qps']} qps, {r['seconds']} s "
                f"| {r['target']} | {r['held_max']} | {f(r['qps_avg'], '{:.0f}')} "
                f"| {f(r['connect_p99_ms'])} | {f(r['query_p99_ms'])} | {r['connect_failures']} "
                f"| {r['query_failures']} | {r['skipped']} | {r['backends_max']} "
                f"| {f(r['gen_cpu_max_pct'], '{:.0f}')} "
                f"| {'; '.join(r['problems']) or 'ok'} |")
        lines.append("")
    if memory:
        lines += ["## Memory per idle client", "",
                  "| target | clients held | PSS before | PSS with clients | bytes per client |",
                  "|---|---:|---:|---:|---:|"]
        for target, m in memory.items():
            per = m["bytes_per_client"]
            lines.append(f"| {target} | {m['held']} | {m['baseline_bytes']:,} | "
                         f"{m['loaded_bytes']:,} | {'-' if per is None else f'{per:,.0f}'} |")
        lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a short run of every part, to check the harness")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to leave out: pgbench, scale, memory")
    p.add_argument("--duration", type=int, default=None,
                   help="seconds per pgbench run (default 10, quick 3)")
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (PgBouncer runs as the postgres OS user)", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or pc.ROOT / "bench" / "results" / f"all-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, pc._raise_interrupt)
    rc = 0
    notes: list[str] = []

    pgbench_json = None
    if "pgbench" not in skip:
        pgbench_json = out / "pgbench.json"
        duration = args.duration or (3 if args.quick else 10)
        pargs = ["--duration", str(duration), "--pool-size", str(args.pool_size),
                 "--modes", "simple,extended,prepared", "--churn", "--floor",
                 "--out", str(pgbench_json)]
        if args.quick:
            pargs += ["--clients", "50", "--workloads", "select-only,tpcb"]
        else:
            pargs += ["--clients", "10,50,200", "--workloads", "select-only,tpcb"]
        pc.log(f"pgbench_compare {' '.join(pargs)}")
        rc |= pc.main(pargs)
        if rc == 130:  # interrupted: stop here, not at the next part
            return rc

    scale: list[dict] = []
    memory: dict = {}
    if not {"scale", "memory"} <= skip:
        base = Path(tempfile.mkdtemp(dir="/tmp", prefix="pgfleet-benchall-"))
        os.chmod(base, 0o755)
        password = "bench-" + secrets.token_hex(12)
        fleet = pc.Pgfleet(base, password, args.pool_size, None)
        bouncer = pc.PgBouncer(base, fleet.socket_dir, args.pool_size, max_client_conn=25000)
        try:
            fleet.start()
            direct = fleet.direct_args()
            verifier = pc.psql(direct, "select rolpassword from pg_authid where rolname = 'postgres'")
            pm = fleet.postmaster_pid()
            # pgfleet's runs first, then PgBouncer's, each started fresh for its memory
            # run; PgBouncer starts only then, so none of its server connections (kept
            # for server_idle_timeout) is in the backend count of pgfleet's runs.
            for target in ("pgfleet", "pgbouncer"):
                if target == "pgfleet":
                    port = fleet.port
                    pids_of = lambda: tree_pids(fleet.proc.pid, {pm} if pm else set())  # noqa: E731
                else:
                    bouncer.start(verifier, password)
                    port = bouncer.port
                    pids_of = lambda: tree_pids(bouncer.proc.pid, set())  # noqa: E731
                if "memory" not in skip:
                    # While it is fresh: the baseline is a just-started process, not one
                    # whose allocator still holds the scale runs' memory.
                    m = idle_memory(port, password, fleet.home, out / f"memory-{target}", pids_of,
                                    2000 if args.quick else 10000)
                    memory[target] = m
                    pc.log(f"  -> {target}: {m}")
                    time.sleep(5)
                if "scale" in skip:
                    continue
                for load in (QUICK_SCALE if args.quick else SCALE):
                    name = f"firehose-{target}-{load[0]}c-{load[1]}churn-{load[2]}qps"
                    # While PgBouncer runs, pgfleet's idle pooled backends are still
                    # connected: only pgfleet's runs are held to the pool size.
                    limit = args.pool_size if target == "pgfleet" else None
                    s = firehose(port, password, fleet.home, out / name, *load,
                                 ramp=min(10.0, load[3] / 3), max_backends=limit,
                                 timeout=load[3] + 180)
                    scale.append(scale_row(target, load, s))
                    pc.log(f"  -> {target}: held {scale[-1]['held_max']}, "
                           f"{scale[-1]['qps_avg']} qps, problems {s.get('problems')}")
                    time.sleep(5)  # let TIME_WAIT and the pools settle
        except KeyboardInterrupt:
            rc = 130
        except (pc.BenchError, subprocess.TimeoutExpired, OSError) as exc:
            pc.log(f"error: {exc}")
            rc = 1
        finally:
            try:
                bouncer.stop()
            finally:
                fleet.stop()
            shutil.rmtree(base, ignore_errors=True)
        notes.append("Scale runs: pgfleet on its default worker count, SCRAM; PgBouncer "
                     "in transaction mode with the same pool size, SCRAM, max_client_conn "
                     "25000. During PgBouncer's runs pgfleet's idle pooled backends are still "
                     "connected to the same Postgres, so its backend count includes them.")
        notes.append(f"The machine has {os.cpu_count()} CPUs shared by the generator, the "
                     "pooler under test and Postgres; the generator's own CPU is in the table.")
    text = report(pgbench_json, scale, memory, notes)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"scale": scale, "memory": memory}, indent=2))
    print(text)
    pc.log(f"report: {out / 'report.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
