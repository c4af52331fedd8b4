"""pgbench select-only throughput: direct Postgres vs PgBouncer vs pgfleet, in one run.

One ``pgfleet up`` (which also brings up the embedded Postgres), one PgBouncer in
transaction mode in front of that same Postgres, and the same pgbench workload against
each of the three, so the numbers are comparable. See bench/README.md.

    .venv/bin/python -m bench.pgbench_compare --clients 50 --duration 15
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import pwd
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PGFLEET = str(Path(sys.executable).parent / "pgfleet")
PGBOUNCER = "/usr/sbin/pgbouncer"
PG_PORT = 5432
# "pipe" (bench.pipe_floor, with --floor) sits between them in the table: the
# runtime's floor, a byte pipe with no logic, one backend per client.
TARGETS = ("direct", "pgbouncer", "pipe", "pgfleet")
MODES = ("simple", "extended", "prepared")
CLK_TCK = os.sysconf("SC_CLK_TCK")

_used_ports: set[int] = set()


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A free TCP port below the ephemeral range, not handed out before in this run."""
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _used_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise BenchError("no free port below 32768")


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


# ---------------------------------------------------------------- CPU accounting


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own utime+stime, reaped children's cutime+cstime), in clock ticks."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state) of proc(5): ppid is field 4, utime..cstime are 14..17.
        ppid = int(fields[1])
        own = int(fields[11]) + int(fields[12])
        reaped = int(fields[13]) + int(fields[14])
        table[int(entry)] = (ppid, own, reaped)
    return table


def tree_cpu_seconds(root: int | None, exclude: set[int] = frozenset()) -> float:
    """CPU seconds used so far by a process tree, reaped descendants included.

    Summing (own + reaped children) over the live nodes counts every process that ever
    ran in the tree exactly once, as long as the dead ones were waited for, so the
    difference between two samples is the tree's CPU use in between, even with
    processes (e.g. Postgres backends under -C) coming and going."""
    if root is None:
        return 0.0
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in exclude or pid not in table:
            continue
        _, own, reaped = table[pid]
        total += own + reaped
        stack.extend(children.get(pid, ()))
    return total / CLK_TCK


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds over all CPUs since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    vals = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(vals)
    idle = vals[3] + vals[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- components


def psql(args: list[str], sql: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> str:
    cmd = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", *args, "-c", sql]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise BenchError(f"psql {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def stop_process(proc: subprocess.Popen | None, *steps: tuple[int, float]) -> None:
    """Send each (signal, seconds to wait for the exit) in turn; SIGKILL if none worked."""
    if proc is None or proc.poll() is not None:
        return
    for sig, seconds in steps:
        proc.send_signal(sig)
        try:
            proc.wait(seconds)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait(5)


def wait_until_ready(name: str, proc: subprocess.Popen, port: int, password: str,
                     read_log: Callable[[], str], timeout: float,
                     ready: Callable[[], bool] = lambda: True) -> None:
    """Wait until ``name`` (started as ``proc``) answers ``select 1`` through psql on ``port``.

    ``ready`` must hold before a connection is tried. Raises BenchError if the process
    exits or ``timeout`` passes first; the message ends with ``read_log()``.
    """
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="5")
    deadline = time.monotonic() + timeout
    last_err = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited early with {proc.returncode}:\n{read_log()}")
        if ready() and can_connect(port):
            try:
                psql(["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"],
                     "select 1", env=env, timeout=15)
                return
            except (BenchError, subprocess.TimeoutExpired) as exc:
                last_err = str(exc)
        time.sleep(0.2)
    raise BenchError(f"{name} did not come up ({last_err}):\n{read_log()}")


class Pgfleet:
    """``pgfleet up`` as a subprocess; also owns the embedded Postgres."""

    def __init__(self, base: Path, password: str, pool_size: int, workers: int | None) -> None:
        self.home = base / "home"
        self.port = free_port()
        self.password = password
        self.pool_size = pool_size
        self.auth = "scram"
        self.args = ["--pool-size", str(pool_size)]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        self.log_path = base / "pgfleet.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def socket_dir(self) -> str:
        return str(self.home / "run")

    def direct_args(self) -> list[str]:
        return ["-h", self.socket_dir, "-p", str(PG_PORT), "-U", "postgres", "-d", "postgres"]

    def cmd(self) -> list[str]:
        return [PGFLEET, "up", "--home", str(self.home), "--port", str(self.port),
                "--password", self.password, "--auth", self.auth, *self.args]

    def start(self, timeout: float = 120.0) -> None:
        ups = self.log().count("pgfleet is up")  # a restart appends to the same log
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        wait_until_ready("pgfleet", self.proc, self.port, self.password, self.log, timeout,
                         ready=lambda: self.log().count("pgfleet is up") > ups)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.home / "pgdata" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 60.0) -> None:
        pm = self.postmaster_pid()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"pgfleet (pid {self.proc.pid}) did not stop in {timeout:.0f}s; killing it")
                self.proc.kill()
                self.proc.wait(10)
        if pm is not None and pid_alive(pm):
            # The supervisor stops Postgres last; if it could not, stop the postmaster ourselves.
            log(f"Postgres (pid {pm}) still running after pgfleet stopped; fast shutdown")
            os.kill(pm, signal.SIGINT)
            if not wait_pid_gone(pm, 30):
                os.kill(pm, signal.SIGQUIT)
                wait_pid_gone(pm, 10)
        if self._log is not None:
            self._log.close()
            self._log = None


class PgBouncer:
    """PgBouncer in transaction mode in front of the embedded Postgres's Unix socket."""

    def __init__(self, base: Path, pg_socket_dir: str, pool_size: int,
                 max_client_conn: int = 10000) -> None:
        self.dir = base / "pgbouncer"
        self.max_client_conn = max_client_conn
        self.port = free_port()
        self.pg_socket_dir = pg_socket_dir
        self.pool_size = pool_size
        self.auth_type = "scram-sha-256"
        self.ini = self.dir / "pgbouncer.ini"
        self.auth_file = self.dir / "userlist.txt"
        self.logfile = self.dir / "pgbouncer.log"
        self.out_path = self.dir / "pgbouncer.out"
        self.proc: subprocess.Popen | None = None
        self._out = None

    def ini_text(self) -> str:
        return "\n".join([
            "[databases]",
            f"postgres = host={self.pg_socket_dir} port={PG_PORT} dbname=postgres",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_type = {self.auth_type}",
            f"auth_file = {self.auth_file}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            f"max_client_conn = {self.max_client_conn}",
            "ignore_startup_parameters = extra_float_digits",
            # Logging every connection would tax PgBouncer in the -C runs; pgfleet logs none.
            "log_connections = 0",
            "log_disconnections = 0",
            f"logfile = {self.logfile}",
            f"pidfile = {self.dir / 'pgbouncer.pid'}",
            "",
        ])

    def start(self, scram_verifier: str, password: str, timeout: float = 30.0) -> None:
        pg = pwd.getpwnam("postgres")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.ini.write_text(self.ini_text())
        self.auth_file.write_text(f'"postgres" "{scram_verifier}"\n')
        for path in (self.dir, self.ini, self.auth_file):
            os.chown(path, pg.pw_uid, pg.pw_gid)
        os.chmod(self.auth_file, 0o600)
        self._out = open(self.out_path, "ab")
        # PgBouncer refuses to run as root.
        self.proc = subprocess.Popen([PGBOUNCER, str(self.ini)], stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir, user=pg.pw_uid, group=pg.pw_gid,
                                     extra_groups=[], start_new_session=True)
        wait_until_ready("pgbouncer", self.proc, self.port, password, self.log, timeout)

    def log(self) -> str:
        parts = []
        for p in (self.out_path, self.logfile):
            try:
                parts.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def stop(self, timeout: float = 15.0) -> None:
        # Safe shutdown (there are no clients left), then immediate shutdown.
        stop_process(self.proc, (signal.SIGINT, timeout), (signal.SIGTERM, 5))
        if self._out is not None:
            self._out.close()
            self._out = None


class PipeFloor:
    """bench.pipe_floor in front of the embedded Postgres's Unix socket, with as many
    workers as pgfleet runs: the cost of a Python gateway that does nothing."""

    def __init__(self, base: Path, pg_socket_dir: str, workers: int | None) -> None:
        self.port = free_port()
        self.backend = f"{pg_socket_dir}/.s.PGSQL.{PG_PORT}"
        self.workers = workers or os.cpu_count() or 1
        self.out_path = base / "pipe-floor.out"
        self.proc: subprocess.Popen | None = None
        self._out = None

    def start(self, timeout: float = 30.0) -> None:
        self._out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.pipe_floor", "--port", str(self.port),
             "--backend", self.backend, "--workers", str(self.workers)],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True)
        # The pipe passes Postgres's own trust login on the Unix socket through.
        wait_until_ready("pipe floor", self.proc, self.port, "", self.log, timeout)

    def log(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, (signal.SIGTERM, timeout))
        if self._out is not None:
            self._out.close()
            self._out = None


# ---------------------------------------------------------------- pgbench


_RE = {
    "tps": re.compile(r"^tps = ([\d.]+) \((.*)\)", re.M),
    "latency_avg_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "latency_stddev_ms": re.compile(r"^latency stddev = ([\d.]+) ms", re.M),
    "processed": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "initial_connection_ms": re.compile(r"^initial connection time = ([\d.]+) ms", re.M),
    "avg_connection_ms": re.compile(r"^average connection time = ([\d.]+) ms", re.M),
}
_PROGRESS = re.compile(r"^progress: ([\d.]+) s, ([\d.]+) tps", re.M)


def parse_pgbench(out: str) -> dict:
    res: dict = {}
    for key, rx in _RE.items():
        m = rx.search(out)
        if m is None:
            res[key] = None
            continue
        res[key] = int(m.group(1)) if key in ("processed", "failed") else float(m.group(1))
        if key == "tps":
            res["tps_kind"] = m.group(2)
    res["progress_tps"] = [float(m.group(2)) for m in _PROGRESS.finditer(out)]
    # Errors: pgbench's own ("pgbench: error: ...") and aborted clients' server messages.
    errors = [ln for ln in out.splitlines()
              if ("error" in ln.lower() or "fatal" in ln.lower() or "aborted" in ln.lower())
              and not ln.startswith("number of")]
    res["errors_sample"] = errors[:10]
    res["error_lines"] = len(errors)
    res["aborted"] = "Run was aborted" in out
    return res


#: Share of transactions pgbench logs for the latency percentiles of a select-only run
#: without -C (tens of thousands a second: a tenth is plenty and keeps pgbench's own
#: logging cost down); every transaction of the slower runs is logged.
FAST_RUN_LOG_SAMPLING = 0.1


def txn_latency_percentile(paths: list[Path], q: float) -> float | None:
    """The ``q`` quantile (nearest rank), in ms, of the transaction latencies in
    pgbench ``--log`` files (third field, in µs); failed and skipped transactions,
    logged with a word there, are left out. None without any transaction."""
    latencies: list[int] = []
    for path in paths:
        with open(path) as f:
            for line in f:
                fields = line.split(None, 3)
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]))
    if not latencies:
        return None
    latencies.sort()
    return latencies[max(0, math.ceil(q * len(latencies)) - 1)] / 1000


def run_pgbench(target: str, mode: str, conn: dict, args: argparse.Namespace, clients: int,
                churn: bool, cpu_roots: dict, workload: str = "select-only") -> dict:
    script = ["-S"] if workload == "select-only" else ["-b", "tpcb-like"]
    cmd = ["pgbench", *script, "-n", "-c", str(clients), "-j", str(min(args.threads, clients)),
           "-T", str(args.duration), "-M", mode, "-P", "1"]
    if churn:
        cmd.append("-C")
    # Per-transaction latencies, for the p99 (pgbench itself reports only the average).
    txn_log = Path(tempfile.mkdtemp(prefix="pgbench-txn-"))
    rate = FAST_RUN_LOG_SAMPLING if workload == "select-only" and not churn else 1.0
    cmd += ["--log", f"--log-prefix={txn_log}/txn", f"--sampling-rate={rate}"]
    cmd += ["-h", conn["host"], "-p", str(conn["port"]), "-U", "postgres", "postgres"]
    # Plain TCP for all three (PgBouncer here has no TLS; pgfleet offers it by default).
    env = dict(os.environ, PGPASSWORD=conn["password"], PGCONNECT_TIMEOUT="10",
               PGAPPNAME="pgbench-compare", PGSSLMODE="disable")
    label = f"{target:<9} {workload:<11} {clients:>3} {mode:<8}{' -C' if churn else ''}"
    log(f"run {label}: {' '.join(cmd)}")

    def sample() -> dict:
        busy, total = system_cpu_seconds()
        return {
            "pgbench": children_cpu_seconds(),
            "pooler": tree_cpu_seconds(cpu_roots[target]["pid"], cpu_roots[target]["exclude"]),
            "postgres": tree_cpu_seconds(cpu_roots["postgres"]["pid"]),
            "busy": busy,
            "total": total,
            "wall": time.monotonic(),
        }

    before = sample()
    timed_out = False
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             timeout=args.duration + 90)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        out = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
               else (exc.stdout or ""))
        out += ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes)
                else (exc.stderr or ""))
        rc = None
    after = sample()

    parsed = parse_pgbench(out)
    parsed["latency_p99_ms"] = txn_latency_percentile(sorted(txn_log.glob("txn*")), 0.99)
    shutil.rmtree(txn_log, ignore_errors=True)
    wall = after["wall"] - before["wall"]
    cpu = {k: round(after[k] - before[k], 3) for k in ("pgbench", "pooler", "postgres")}
    if target == "direct":
        cpu["pooler"] = 0.0
    machine_busy = after["busy"] - before["busy"]
    machine_total = after["total"] - before["total"]
    ours = cpu["pgbench"] + cpu["pooler"] + cpu["postgres"]
    cpu["machine_busy"] = round(machine_busy, 3)
    cpu["machine_capacity"] = round(machine_total, 3)
    # Whatever else ran on the box meanwhile (other processes, idle poolers, the kernel's
    # share not charged to a process).
    cpu["other"] = round(max(0.0, machine_busy - ours), 3)
    processed = parsed.get("processed") or 0
    per_txn = {}
    for k in ("pgbench", "pooler", "postgres"):
        per_txn[k] = round(cpu[k] / processed * 1e6, 1) if processed else None

    ok = rc == 0 and not timed_out and parsed["tps"] is not None and not (parsed["failed"] or 0)
    status = "ok" if ok else ("timeout" if timed_out else "failed")
    result = {
        "target": target,
        "mode": mode,
        "churn": churn,
        "clients": clients,
        "threads": min(args.threads, clients),
        "duration_s": args.duration,
        "cmd": cmd,
        "returncode": rc,
        "status": status,
        "wall_s": round(wall, 3),
        **parsed,
        "cpu_s": cpu,
        "cpu_us_per_txn": per_txn,
        "output": out if not ok else "\n".join(out.splitlines()[-15:]),
    }
    # The first interval includes logging the clients in, the last one may be partial.
    prog = parsed["progress_tps"]
    steady = prog[1:-1] if len(prog) > 2 else prog
    result["min_1s_tps"] = min(steady) if steady else None
    tps = parsed["tps"]
    log(f"  -> {status}: tps={tps} lat={parsed['latency_avg_ms']} ms "
        f"p99={parsed['latency_p99_ms']} ms failed={parsed['failed']}"
        f" errors={parsed['error_lines']} cpu={cpu}")
    if not ok:
        for ln in parsed["errors_sample"][:5]:
            log(f"     {ln}")
    return result


# ---------------------------------------------------------------- reporting


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (target, mode, churn): medians across rounds, ratios to direct/pgbouncer."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r.get("workload", "select-only"), r["clients"], r["mode"], r["churn"],
                           r["target"]), []).append(r)

    def med(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    rows = []
    for (workload, clients, mode, churn, target), rs in groups.items():
        oks = [r for r in rs if r["status"] == "ok"]
        use = oks or rs
        rows.append({
            "target": target,
            "workload": workload,
            "mode": mode + (" -C" if churn else ""),
            "churn": churn,
            "clients": clients,
            "rounds": len(rs),
            "status": "ok" if len(oks) == len(rs) else
                      ",".join(sorted({r["status"] for r in rs if r["status"] != "ok"})),
            "tps": med([r["tps"] for r in use]) if oks else None,
            "latency_avg_ms": med([r["latency_avg_ms"] for r in use]) if oks else None,
            "latency_p99_ms": med([r.get("latency_p99_ms") for r in use]) if oks else None,
            "failed": sum(r["failed"] or 0 for r in rs),
            "error_lines": sum(r["error_lines"] for r in rs),
            "min_1s_tps": min((r["min_1s_tps"] for r in rs if r["min_1s_tps"] is not None),
                              default=None),
            "pooler_cpu_us_per_txn": med([r["cpu_us_per_txn"]["pooler"] for r in use]),
            "postgres_cpu_us_per_txn": med([r["cpu_us_per_txn"]["postgres"] for r in use]),
            "pgbench_cpu_us_per_txn": med([r["cpu_us_per_txn"]["pgbench"] for r in use]),
            "machine_busy_pct": med([100 * r["cpu_s"]["machine_busy"] / r["cpu_s"]["machine_capacity"]
                                     for r in use if r["cpu_s"]["machine_capacity"]]),
            "other_cpu_pct": med([100 * r["cpu_s"]["other"] / r["cpu_s"]["machine_capacity"]
                                  for r in use if r["cpu_s"]["machine_capacity"]]),
        })
    by_key = {(r["workload"], r["clients"], r["mode"], r["target"]): r for r in rows}
    for r in rows:
        for ref in ("direct", "pgbouncer"):
            base = by_key.get((r["workload"], r["clients"], r["mode"], ref))
            ok = r["tps"] is not None and base is not None and base["tps"]
            r[f"vs_{ref}"] = round(r["tps"] / base["tps"], 3) if ok else None
        pgb = by_key.get((r["workload"], r["clients"], r["mode"], "pgbouncer"))
        ok = r["latency_p99_ms"] is not None and pgb is not None and pgb["latency_p99_ms"]
        r["p99_vs_pgbouncer"] = round(r["latency_p99_ms"] / pgb["latency_p99_ms"], 3) if ok else None
    order = {t: i for i, t in enumerate(TARGETS)}
    rows.sort(key=lambda r: (r["churn"], r["workload"] != "select-only", r["workload"],
                             r["clients"], MODES.index(r["mode"].split(",")[0].split()[0]),
                             "trust" in r["mode"], order[r["target"]]))
    return rows


def format_table(rows: list[dict]) -> str:
    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = ["target", "workload", "mode", "clients", "tps", "lat avg ms", "lat p99 ms",
            "vs direct", "vs pgbouncer", "p99 vs pgbouncer", "min 1s tps", "pooler CPU us/txn",
            "pg CPU us/txn", "other CPU %", "status"]
    lines = []
    for r in rows:
        lines.append([
            r["target"], r["workload"], r["mode"], str(r["clients"]), f(r["tps"], ".0f"),
            f(r["latency_avg_ms"], ".3f"), f(r["latency_p99_ms"], ".3f"),
            f(r["vs_direct"], ".2f"), f(r["vs_pgbouncer"], ".2f"), f(r["p99_vs_pgbouncer"], ".2f"),
            f(r["min_1s_tps"], ".0f"), f(r["pooler_cpu_us_per_txn"], ".1f"),
            f(r["postgres_cpu_us_per_txn"], ".1f"), f(r["other_cpu_pct"], ".0f"),
            r["status"] if r["status"] == "ok" else f"{r['status']} ({r['failed']} failed txns, "
                                                    f"{r['error_lines']} error lines)",
        ])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    numeric = set(range(3, len(head) - 1))

    def fmt_row(cells: list[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt_row(head), sep, *(fmt_row(row) for row in lines)])


def machine_info(pg_version: str) -> dict:
    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    model = "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pgbouncer_version": first_line([PGBOUNCER, "--version"]),
        "postgres_version": pg_version,
        "pgbench_version": first_line(["pgbench", "--version"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.pgbench_compare",
        description="pgbench throughput: direct Postgres vs PgBouncer vs pgfleet, one run.")
    p.add_argument("--clients", default="50",
                   help="comma-separated pgbench client counts (-c), e.g. 10,50,200")
    p.add_argument("--workloads", default="select-only",
                   help="comma-separated: select-only (pgbench -S), tpcb (-b tpcb-like)")
    p.add_argument("--threads", type=int, default=2, help="pgbench threads (-j)")
    p.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (-T)")
    p.add_argument("--modes", default="simple,extended",
                   help="comma-separated pgbench -M modes: simple, extended, prepared")
    p.add_argument("--pool-size", type=int, default=20,
                   help="backends for pgfleet (--pool-size) and PgBouncer (default_pool_size)")
    p.add_argument("--workers", type=int, default=None,
                   help="pgfleet gateway workers (default: pgfleet's, one per CPU)")
    p.add_argument("--scale", type=int, default=1, help="pgbench -i scale factor")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole set of runs; the table shows medians")
    p.add_argument("--churn", action="store_true",
                   help="also run -C (a new connection per transaction), 10 clients, simple mode")
    p.add_argument("--churn-clients", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true",
                   help="also run bench.pipe_floor (a byte pipe with no logic, one backend "
                        "per client) in the runs without -C: the Python runtime's floor")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default bench/results/pgbench-<timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        a.clients = [int(c) for c in str(a.clients).split(",") if c.strip()]
    except ValueError:
        p.error("--clients: whole numbers, comma-separated")
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if not a.workloads or any(w not in ("select-only", "tpcb") for w in a.workloads):
        p.error("--workloads: choose from select-only, tpcb")
    if not a.clients or min(a.clients) < 1:
        p.error("--clients must be at least 1")
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    for name in ("threads", "duration", "pool_size", "scale", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return a


def _raise_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark must run as root (it runs PgBouncer as the postgres OS user)",
              file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path: Path = args.out or ROOT / "bench" / "results" / f"pgbench-{stamp}.json"
    signal.signal(signal.SIGTERM, _raise_interrupt)

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="pgfleet-bench-"))
    os.chmod(base, 0o755)
    password = "bench-" + secrets.token_hex(12)
    fleet = Pgfleet(base, password, args.pool_size, args.workers)
    bouncer = PgBouncer(base, fleet.socket_dir, args.pool_size)
    pipe = PipeFloor(base, fleet.socket_dir, args.workers) if args.floor else None
    churn_targets = tuple(t for t in TARGETS if t != "pipe")
    targets = TARGETS if args.floor else churn_targets
    notes: list[str] = []
    runs: list[dict] = []
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info: dict = {}
    rc = 0
    try:
        log(f"starting pgfleet: {' '.join(fleet.cmd()).replace(password, '***')}")
        fleet.start()
        log(f"pgfleet is up on 127.0.0.1:{fleet.port} (supervisor pid {fleet.proc.pid}, "
            f"postmaster pid {fleet.postmaster_pid()})")
        direct = fleet.direct_args()
        pg_version = psql(direct, "select version()")
        max_conn = int(psql(direct, "show max_connections"))
        info = machine_info(pg_version)

        log(f"pgbench -i -s {args.scale} via direct Postgres")
        init = subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", fleet.socket_dir,
                               "-p", str(PG_PORT), "-U", "postgres", "postgres"],
                              capture_output=True, text=True, timeout=600 + 60 * args.scale)
        if init.returncode != 0:
            raise BenchError(f"pgbench -i failed:\n{init.stdout}{init.stderr}")

        verifier = psql(direct, "select rolpassword from pg_authid where rolname = 'postgres'")
        if not verifier.startswith("SCRAM-SHA-256$"):
            raise BenchError(f"postgres has no SCRAM verifier: {verifier[:20]!r}")
        log("starting pgbouncer")
        bouncer.start(verifier, password)
        log(f"pgbouncer is up on 127.0.0.1:{bouncer.port} (pid {bouncer.proc.pid})")
        if pipe is not None:
            pipe.start()
            log(f"pipe floor is up on 127.0.0.1:{pipe.port} (pid {pipe.proc.pid})")
            notes.append(f"pipe = bench.pipe_floor: {pipe.workers} uvloop worker(s) copying "
                         "bytes between each client and its own Postgres connection, parsing "
                         "nothing (trust auth passed through); the floor for any gateway "
                         "written in Python.")

        needed = max(args.clients) + 2 * args.pool_size
        if needed > max_conn:
            notes.append(f"warning: direct runs use {max(args.clients)} backends while pgfleet and "
                         f"PgBouncer may each hold {args.pool_size}; Postgres max_connections "
                         f"is {max_conn}, so direct runs may fail to connect")
        notes.append("direct = Postgres's Unix socket with trust auth (the embedded Postgres has "
                     "no TCP listener); pgbouncer and pgfleet = TCP on 127.0.0.1 with SCRAM, "
                     "except the 'simple, trust -C' rows, run after restarting both with "
                     "trust authentication.")
        notes.append(f"all of pgbench, the pooler under test and Postgres share "
                     f"{os.cpu_count()} CPUs; PgBouncer is single-threaded, pgfleet runs "
                     f"{args.workers or os.cpu_count()} gateway worker(s) plus a pooler process.")
        if "prepared" in args.modes:
            notes.append("PgBouncer 1.18 in transaction mode does not track protocol-level "
                         "prepared statements: its -M prepared run is expected to fail "
                         "(clients aborted with 'prepared statement \"P_0\" already exists' "
                         "or '... does not exist').")

        pm_pid = fleet.postmaster_pid()
        if pm_pid is not None:
            policy = {os.SCHED_BATCH: "SCHED_BATCH"}.get(os.sched_getscheduler(pm_pid), "normal")
            notes.append(f"Postgres (started by pgfleet, shared by every target) runs with the "
                         f"{policy} scheduling policy (pgfleet up --postgres-sched).")
        cpu_roots = {
            "direct": {"pid": None, "exclude": set()},
            "pgbouncer": {"pid": bouncer.proc.pid, "exclude": set()},
            "pipe": {"pid": pipe.proc.pid if pipe else None, "exclude": set()},
            "pgfleet": {"pid": fleet.proc.pid, "exclude": {pm_pid} if pm_pid else set()},
            "postgres": {"pid": pm_pid, "exclude": set()},
        }
        conns = {
            "direct": {"host": fleet.socket_dir, "port": PG_PORT, "password": ""},
            "pgbouncer": {"host": "127.0.0.1", "port": bouncer.port, "password": password},
            "pipe": {"host": "127.0.0.1", "port": pipe.port if pipe else 0, "password": ""},
            "pgfleet": {"host": "127.0.0.1", "port": fleet.port, "password": password},
        }
        for rnd in range(args.rounds):
            for workload in args.workloads:
                for clients in args.clients:
                    for mode in args.modes:
                        for target in targets:
                            r = run_pgbench(target, mode, conns[target], args, clients, False,
                                            cpu_roots, workload)
                            r["round"] = rnd
                            r["workload"] = workload
                            runs.append(r)
            if args.churn:
                for target in churn_targets:
                    r = run_pgbench(target, "simple", conns[target], args, args.churn_clients,
                                    True, cpu_roots)
                    r["round"] = rnd
                    runs.append(r)
        if args.churn:
            # -C again with trust: the cost of a connection without the SCRAM exchange.
            log("restarting pgbouncer and pgfleet with trust authentication")
            bouncer.stop()
            fleet.stop()
            bouncer.auth_type, fleet.auth = "trust", "trust"
            fleet.start()
            bouncer.start(verifier, password)
            cpu_roots["pgfleet"]["pid"] = fleet.proc.pid
            cpu_roots["pgbouncer"]["pid"] = bouncer.proc.pid
            pm_pid = fleet.postmaster_pid()
            cpu_roots["pgfleet"]["exclude"] = {pm_pid} if pm_pid else set()
            cpu_roots["postgres"]["pid"] = pm_pid
            for rnd in range(args.rounds):
                for target in churn_targets:
                    r = run_pgbench(target, "simple", conns[target], args, args.churn_clients,
                                    True, cpu_roots)
                    r["round"] = rnd
                    r["mode"] = "simple, trust"
                    runs.append(r)
            if fleet.proc.poll() is not None:
                raise BenchError(f"pgfleet exited during the benchmark:\n{fleet.log()}")
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        rc = 130
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        log(f"error: {exc}")
        rc = 1
    finally:
        log("stopping pgbouncer and pgfleet")
        try:
            try:
                if pipe is not None:
                    pipe.stop()
            finally:
                bouncer.stop()
        finally:
            fleet.stop()
        fleet_log = fleet.log()
        bouncer_log = bouncer.log()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    problems = [ln for ln in fleet_log.splitlines()
                if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Error", ln)]
    if runs:
        rows = summarise(runs)
        table = format_table(rows)
        print()
        print(f"pgbench ({', '.join(args.workloads)}), clients {args.clients}, -j {args.threads}, "
              f"{args.duration}s per run, scale {args.scale}, pool size {args.pool_size}, "
              f"{info.get('nproc')} CPUs")
        print(table)
        for n in notes:
            print(f"note: {n}")
        if problems:
            print(f"note: pgfleet logged {len(problems)} warning/error line(s); first ones:")
            for ln in problems[:10]:
                print(f"  {ln}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started_at": started,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info,
            "config": {
                "pgfleet_cmd": [c if c != password else "***" for c in fleet.cmd()],
                "pgbouncer_ini": bouncer.ini_text(),
            },
            "notes": notes,
            "summary": rows,
            "runs": runs,
            "pgfleet_log_problems": problems[:200],
            "pgbouncer_log_tail": bouncer_log.splitlines()[-50:],
        }
        out_path.write_text(json.dumps(doc, indent=2) + "\n")
        log_copy = out_path.with_suffix(".pgfleet.log")
        log_copy.write_text(fleet_log.replace(password, "***"))
        print(f"results: {out_path}  (pgfleet log: {log_copy})")
        if any(r["status"] != "ok" and not (r["target"] == "pgbouncer" and r["mode"] == "prepared")
               for r in runs) and rc == 0:
            rc = 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
