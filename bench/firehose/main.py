"""Run the firehose: check the options, prepare the table, fork the load processes,
print one progress line per second, then write the summary, CSV, JSON and chart.

Exit status: 0 when every connection attempt and every query succeeded (and Postgres
never had more client backends than ``--max-backends``), 1 when something failed,
2 for bad options, 3 when the run could not start (cannot log in, cannot sample).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import worker
from .proto import Credentials, PgError, Session
from .stats import merge, percentile
from .target import Endpoint, UsageError, endpoint

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3

# Hard bounds: a typo must not turn into a fork bomb or a run that never ends.
MAX_CONNECTIONS = 200_000
MAX_CHURN = 50_000
MAX_QPS = 500_000
MAX_DURATION = 3600
MAX_PROCS = 64
SEED_ROWS = 1000
BACKENDS_SQL = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
CSV_COLUMNS = [
    "second", "held", "pending", "opened", "closed", "connect_failures", "queries",
    "query_failures", "dropped", "skipped", "query_p50_ms", "query_p99_ms", "query_max_ms",
    "connect_p50_ms", "connect_p99_ms", "backends", "gen_cpu_max_pct", "gen_cpu_total_pct",
    "loop_lag_max_ms",
]


@dataclass
class Options:
    """The command-line options, validated by :meth:`check`."""

    dsn: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = None
    dbname: str | None = None
    connections: int = 1000
    churn: float = 0.0
    qps: float = 100.0
    write_ratio: float = 0.1
    duration: int = 30
    ramp: float | None = None  # None: min(5, duration / 2)
    procs: int = 0  # 0: CPU count
    max_backends: int | None = None
    direct_dsn: str | None = None
    home: Path | None = None
    out: Path | None = None
    connect_timeout: float = 10.0
    query_timeout: float = 10.0
    source_ips: int = 0  # 0: enough for the churn
    quiet: bool = False

    def check(self) -> tuple[Endpoint, Endpoint | None]:
        def bound(name: str, value: float, lo: float, hi: float) -> None:
            if not (lo <= value <= hi):
                raise UsageError(f"--{name} must be between {lo:,g} and {hi:,g}, got {value:,}")

        if self.password is None and not (self.dsn and "password" in self.dsn):
            self.password = os.environ.get("PGPASSWORD")
        target = endpoint(
            self.dsn, host=self.host, port=self.port, user=self.user, password=self.password,
            dbname=self.dbname, default_port=15432, allow_unix=False, what="target",
        )
        if self.ramp is None:
            self.ramp = min(5.0, self.duration / 2)
        bound("connections", self.connections, 1, MAX_CONNECTIONS)
        bound("churn", self.churn, 0, MAX_CHURN)
        bound("qps", self.qps, 0, MAX_QPS)
        bound("write-ratio", self.write_ratio, 0, 1)
        bound("duration", self.duration, 1, MAX_DURATION)
        bound("ramp", self.ramp, 0, self.duration)
        bound("procs", self.procs, 0, MAX_PROCS)
        bound("connect-timeout", self.connect_timeout, 0.1, 300)
        bound("query-timeout", self.query_timeout, 0.1, 300)
        bound("source-ips", self.source_ips, 0, 253)
        if self.max_backends is not None:
            bound("max-backends", self.max_backends, 0, 1_000_000)
        direct_dsn = self.direct_dsn
        if direct_dsn is None and self.home is not None:
            run_dir = (self.home / "run").resolve()
            direct_dsn = f"host={run_dir} port=5432 user=postgres dbname=postgres"
        direct = None
        if direct_dsn:
            direct = endpoint(direct_dsn, default_port=5432, allow_unix=True, what="--direct-dsn")
        if self.max_backends is not None and direct is None:
            raise UsageError(
                "--max-backends needs a way to count Postgres backends: --direct-dsn "
                "(e.g. 'host=HOME/run port=5432 user=postgres') or --home"
            )
        return target, direct


class SetupError(RuntimeError):
    pass


@dataclass
class Row:
    """One second of the run, all processes together."""

    second: int
    reported: int = 0
    held: int = 0
    pending: int = 0
    opened: int = 0
    closed: int = 0
    queries: int = 0
    skipped: int = 0
    connect_failures: dict[str, int] = field(default_factory=dict)
    query_failures: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    qlat: dict[int, int] = field(default_factory=dict)
    clat: dict[int, int] = field(default_factory=dict)
    cpu_max: float = 0.0
    cpu_total: float = 0.0
    lag_max: float = 0.0
    backends: int | None = None

    def add(self, msg: dict) -> None:
        self.reported += 1
        for key in ("held", "pending", "opened", "closed", "queries", "skipped"):
            setattr(self, key, getattr(self, key) + msg["inflight" if key == "pending" else key])
        for key in ("connect_failures", "query_failures", "drops"):
            merge(getattr(self, key), msg[key])
        merge(self.qlat, msg["qlat"])
        merge(self.clat, msg["clat"])
        self.cpu_max = max(self.cpu_max, msg["cpu_pct"])
        self.cpu_total += msg["cpu_pct"]
        self.lag_max = max(self.lag_max, msg["lag_ms"])

    def csv(self) -> dict[str, object]:
        def ms(v: float | None) -> str:
            return "" if v is None else f"{v:.3f}"

        return {
            "second": self.second,
            "held": self.held,
            "pending": self.pending,
            "opened": self.opened,
            "closed": self.closed,
            "connect_failures": sum(self.connect_failures.values()),
            "queries": self.queries,
            "query_failures": sum(self.query_failures.values()),
            "dropped": sum(self.drops.values()),
            "skipped": self.skipped,
            "query_p50_ms": ms(percentile(self.qlat, 50)),
            "query_p99_ms": ms(percentile(self.qlat, 99)),
            "query_max_ms": ms(percentile(self.qlat, 100)),
            "connect_p50_ms": ms(percentile(self.clat, 50)),
            "connect_p99_ms": ms(percentile(self.clat, 99)),
            "backends": "" if self.backends is None else self.backends,
            "gen_cpu_max_pct": f"{self.cpu_max:.1f}",
            "gen_cpu_total_pct": f"{self.cpu_total:.1f}",
            "loop_lag_max_ms": f"{self.lag_max:.1f}",
        }


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


HEADER = (
    f"{'t':>4} {'held':>7} {'pend':>5} {'open/s':>7} {'cfail':>5} {'qps':>7} {'qfail':>5} "
    f"{'skip':>5} {'p50ms':>6} {'p99ms':>6} {'conn99':>6} {'backends':>8} {'cpu%':>5} {'lagms':>6}"
)


def progress_line(row: Row, max_backends: int | None = None) -> str:
    backends = "-" if row.backends is None else str(row.backends)
    if row.backends is not None and max_backends is not None and row.backends > max_backends:
        backends += "!"
    return (
        f"{row.second + 1:>4} {row.held:>7} {row.pending:>5} {row.opened:>7} "
        f"{sum(row.connect_failures.values()):>5} {row.queries:>7} "
        f"{sum(row.query_failures.values()) + sum(row.drops.values()):>5} {row.skipped:>5} "
        f"{_fmt_ms(percentile(row.qlat, 50)):>6} {_fmt_ms(percentile(row.qlat, 99)):>6} "
        f"{_fmt_ms(percentile(row.clat, 99)):>6} {backends:>8} {row.cpu_max:>5.0f} "
        f"{row.lag_max:>6.1f}"
    )


# --------------------------------------------------------------------------- setup


async def _prepare(target: Endpoint, direct: Endpoint | None, timeout: float) -> int:
    """Create and seed the table through the target (this also checks the login works),
    check backend sampling works; returns the highest id to read."""
    creds = Credentials(target.user, target.password, target.dbname)
    try:
        s = await Session.connect(target.host, target.port, creds, timeout)
    except (PgError, OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise SetupError(f"cannot log in to {target.describe()}: {why}") from None
    try:
        await s.query(
            "CREATE TABLE IF NOT EXISTS firehose_events ("
            "id bigserial PRIMARY KEY, conn int NOT NULL, "
            "at timestamptz NOT NULL DEFAULT now(), payload text)"
        )
        rows = await s.query("SELECT coalesce(max(id), 0) FROM firehose_events")
        max_id = int(rows[0][0] or 0)
        if max_id < SEED_ROWS:
            await s.query(
                "INSERT INTO firehose_events (conn, payload) "
                f"SELECT 0, md5(g::text) FROM generate_series(1, {SEED_ROWS}) g"
            )
            rows = await s.query("SELECT max(id) FROM firehose_events")
            max_id = int(rows[0][0])
    except (PgError, OSError, TimeoutError) as exc:
        raise SetupError(f"cannot prepare table firehose_events on {target.describe()}: {exc}") from None
    finally:
        s.close()
    if direct is not None:
        try:
            d = await Session.connect(
                direct.host, direct.port,
                Credentials(direct.user, direct.password, direct.dbname, "pgfleet-firehose-sampler"),
                timeout,
            )
            await d.query(BACKENDS_SQL)
            d.close()
        except (PgError, OSError, TimeoutError) as exc:
            raise SetupError(f"cannot count backends through {direct.describe()}: {exc}") from None
    return max_id


def _source_ips(opts: Options, procs: int) -> tuple[str, ...]:
    """127.0.0.2 ... 127.0.0.(1+K): each address has its own ~28,000 ports per destination,
    so connections plus a minute of TIME_WAIT under churn fit."""
    k = opts.source_ips or max(procs, math.ceil((opts.connections + opts.churn * 65) / 16000))
    k = max(1, min(253, k))
    ips = tuple(f"127.0.0.{2 + i}" for i in range(k))
    with socket.socket() as s:
        try:
            s.bind((ips[0], 0))
        except OSError as exc:
            raise SetupError(f"cannot bind a client socket to {ips[0]}: {exc}") from None
    return ips


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, opts: Options, target: Endpoint, direct: Endpoint | None) -> None:
        self.opts = opts
        self.target = target
        self.direct = direct
        self.rows = [Row(k) for k in range(opts.duration)]
        self.samples: dict[str, str] = {}
        self.problems: list[str] = []
        self.done: set[int] = set()
        self.crashed: dict[int, str] = {}
        self.killed: list[int] = []
        self.sampler_errors: dict[str, int] = {}
        self.printed = 0
        self.interrupted = False
        self.procs: list = []
        self.pipes: list = []

    def out(self, text: str) -> None:
        print(text, flush=True)

    # ---------------------------------------------------------------- processes

    def start(self, procs: int, ips: tuple[str, ...], max_id: int) -> None:
        opts = self.opts
        ctx = multiprocessing.get_context("fork")
        self.t0 = time.monotonic() + 0.3 + 0.02 * procs
        self.hard_deadline = self.t0 + opts.duration + opts.query_timeout + 10.0
        creds = Credentials(self.target.user, self.target.password, self.target.dbname)
        base, extra = divmod(opts.connections, procs)
        for i in range(procs):
            plan = worker.WorkerPlan(
                index=i, host=self.target.host, port=self.target.port, creds=creds,
                connections=base + (1 if i < extra else 0),
                churn=opts.churn / procs, qps=opts.qps / procs, write_ratio=opts.write_ratio,
                ramp=opts.ramp, duration=opts.duration, t0=self.t0,
                hard_deadline=self.hard_deadline - 3.0,
                source_ips=ips[i::procs] if len(ips) >= procs else ips,
                connect_timeout=opts.connect_timeout, query_timeout=opts.query_timeout,
                max_pending=500, read_max_id=max_id, seed=os.getpid() * 1000 + i,
            )
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker.main, args=(plan, send), name=f"firehose-{i}", daemon=True)
            p.start()
            send.close()
            self.procs.append(p)
            self.pipes.append(recv)

    def _on_message(self, i: int) -> None:
        pipe = self.pipes[i]
        try:
            msg = pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            if i not in self.done and i not in self.crashed:
                self.crashed[i] = "exited without reporting"
            self.done.add(i)
            return
        if "sec" in msg:
            k = msg["sec"]
            if 0 <= k < len(self.rows):
                self.rows[k].add(msg)
            for kind, text in msg["samples"].items():
                self.samples.setdefault(kind, text)
        elif "done" in msg:
            self.done.add(i)
        elif "crash" in msg:
            self.crashed[i] = msg["error"]
            self.done.add(i)

    async def _sample(self) -> None:
        """Count Postgres client backends 4 times a second; keep each second's maximum."""
        assert self.direct is not None
        d = self.direct
        creds = Credentials(d.user, d.password, d.dbname, "pgfleet-firehose-sampler")
        session: Session | None = None
        end = self.t0 + self.opts.duration
        while time.monotonic() < end:
            try:
                if session is None or session.conn.closed:
                    session = await Session.connect(d.host, d.port, creds, 5.0)
                rows = await session.query(BACKENDS_SQL, timeout=5.0)
                n = int(rows[0][0])
                k = int(time.monotonic() - self.t0)
                if 0 <= k < len(self.rows):
                    row = self.rows[k]
                    row.backends = n if row.backends is None else max(row.backends, n)
            except (PgError, OSError, TimeoutError) as exc:
                key = str(exc)
                self.sampler_errors[key] = self.sampler_errors.get(key, 0) + 1
                if session is not None:
                    session.close()
                session = None
            await asyncio.sleep(0.25)
        if session is not None:
            session.close()

    def _print_ready(self, final: bool = False) -> None:
        live = len(self.procs) - len(self.crashed)
        now = time.monotonic()
        while self.printed < len(self.rows):
            row = self.rows[self.printed]
            due = self.t0 + row.second + 1
            # The last second is reported after the drain (queries in flight finish first).
            grace = 1.5 if row.second < len(self.rows) - 1 else self.hard_deadline - due
            if not final and row.reported < live and now < due + grace:
                return
            if not final and now < due + 0.3 and self.direct is not None:
                return  # give the sampler its last look at this second
            if not self.opts.quiet:
                if self.printed % 30 == 0:
                    self.out(HEADER)
                self.out(progress_line(row, self.opts.max_backends))
            self.printed += 1

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        for i, pipe in enumerate(self.pipes):
            loop.add_reader(pipe.fileno(), self._on_message, i)
        stop = asyncio.Event()

        def interrupt() -> None:
            self.interrupted = True
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        sampler = loop.create_task(self._sample()) if self.direct is not None else None
        try:
            while len(self.done) < len(self.procs) and time.monotonic() < self.hard_deadline:
                if stop.is_set():
                    break
                self._print_ready()
                if all(not p.is_alive() for p in self.procs):
                    await asyncio.sleep(0.2)  # read what is left in the pipes
                    break
                try:
                    await asyncio.wait_for(stop.wait(), 0.1)
                except TimeoutError:
                    pass
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            for i, pipe in enumerate(self.pipes):
                if i not in self.done:
                    try:
                        loop.remove_reader(pipe.fileno())
                    except (ValueError, OSError):
                        pass
        self._reap()
        if self.interrupted:  # keep the seconds that happened
            last = max((r.second for r in self.rows if r.reported), default=-1)
            self.rows = self.rows[: last + 1]
            self.printed = min(self.printed, len(self.rows))
        self._print_ready(final=True)

    def _reap(self) -> None:
        """Join the load processes; kill (by pid) any still running: the global deadline."""
        for i, p in enumerate(self.procs):
            if self.interrupted and p.is_alive():
                p.terminate()
            p.join(timeout=max(0.0, min(5.0, self.hard_deadline - time.monotonic())) + 0.5)
            if p.is_alive():
                p.kill()
                p.join(5)
                self.killed.append(i)

    # ---------------------------------------------------------------- results

    def summary(self, procs: int, ips: tuple[str, ...], started: str) -> dict:
        opts = self.opts
        totals = Row(-1)
        qlat: dict[int, int] = {}
        clat: dict[int, int] = {}
        for row in self.rows:
            for key in ("opened", "closed", "queries", "skipped"):
                setattr(totals, key, getattr(totals, key) + getattr(row, key))
            for key in ("connect_failures", "query_failures", "drops"):
                merge(getattr(totals, key), getattr(row, key))
            merge(qlat, row.qlat)
            merge(clat, row.clat)
        backends = [r.backends for r in self.rows if r.backends is not None]
        backends_max = max(backends) if backends else None
        n_cfail = sum(totals.connect_failures.values())
        n_qfail = sum(totals.query_failures.values())
        n_drop = sum(totals.drops.values())
        problems = list(self.problems)
        if n_cfail:
            problems.append(f"{n_cfail} connection attempts failed")
        if n_qfail:
            problems.append(f"{n_qfail} queries failed")
        if n_drop:
            problems.append(f"{n_drop} idle connections were closed by the server")
        for i, err in sorted(self.crashed.items()):
            problems.append(f"load process {i} crashed: {err.strip().splitlines()[-1]}")
        for i in self.killed:
            problems.append(f"load process {i} was killed at the global deadline")
        exceeded = (
            opts.max_backends is not None
            and backends_max is not None
            and backends_max > opts.max_backends
        )
        if exceeded:
            problems.append(
                f"Postgres had {backends_max} client backends, more than --max-backends "
                f"{opts.max_backends}"
            )
        if self.interrupted:
            problems.append("interrupted")

        def lat(hist: dict[int, int]) -> dict[str, float | None]:
            return {
                f"p{q:g}": percentile(hist, q) for q in (50, 90, 99, 99.9)
            } | {"max": percentile(hist, 100)}

        opts_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
        if opts_dict.get("password"):
            opts_dict["password"] = "***"
        if opts_dict.get("dsn") and self.target.password:
            opts_dict["dsn"] = opts_dict["dsn"].replace(self.target.password, "***")
        return {
            "started_at": started,
            "target": f"{self.target.host}:{self.target.port}",
            "user": self.target.user,
            "dbname": self.target.dbname,
            "backend_sampling": self.direct.describe() if self.direct else None,
            "options": opts_dict,
            "procs": procs,
            "seconds": len(self.rows),
            "source_ips": [ips[0], ips[-1]],
            "totals": {
                "opened": totals.opened,
                "closed_by_churn": totals.closed,
                "connect_failures": n_cfail,
                "queries": totals.queries,
                "query_failures": n_qfail,
                "dropped": n_drop,
                "skipped": totals.skipped,
                "held_max": max((r.held for r in self.rows), default=0),
                "qps_avg": totals.queries / max(1, len(self.rows)),
            },
            "failures": {
                "connect": totals.connect_failures,
                "query": totals.query_failures,
                "dropped": totals.drops,
                "sampler": self.sampler_errors,
            },
            "failure_samples": self.samples,
            "query_latency_ms": lat(qlat),
            "connect_latency_ms": lat(clat),
            "backends_max": backends_max,
            "max_backends": opts.max_backends,
            "backends_exceeded": exceeded,
            "gen_cpu_max_pct": max((r.cpu_max for r in self.rows), default=0.0),
            "loop_lag_max_ms": max((r.lag_max for r in self.rows), default=0.0),
            "problems": problems,
            "exit_status": EXIT_FAILED if problems else EXIT_OK,
        }


def _write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow(row.csv())


def _print_summary(s: dict, files: list[Path], say) -> None:
    t = s["totals"]
    q = s["query_latency_ms"]
    c = s["connect_latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    say("")
    say(f"firehose summary: {s['seconds']} s against {s['target']}, {s['procs']} processes")
    say(
        f"  connections  held max {t['held_max']}, opened {t['opened']}, closed by churn "
        f"{t['closed_by_churn']}, failed {t['connect_failures']}, dropped by server {t['dropped']}"
    )
    say(f"  login        p50 {ms(c['p50'])}  p90 {ms(c['p90'])}  p99 {ms(c['p99'])}  max {ms(c['max'])}")
    say(
        f"  queries      {t['queries']} ok ({t['qps_avg']:.0f}/s), failed {t['query_failures']}, "
        f"skipped (no idle connection) {t['skipped']}"
    )
    say(
        f"  latency      p50 {ms(q['p50'])}  p90 {ms(q['p90'])}  p99 {ms(q['p99'])}  "
        f"p99.9 {ms(q['p99.9'])}  max {ms(q['max'])}"
    )
    if s["backend_sampling"]:
        limit = "" if s["max_backends"] is None else f" (limit {s['max_backends']})"
        say(f"  backends     max {s['backends_max']}{limit}")
    else:
        say("  backends     not sampled (give --direct-dsn or --home)")
    say(
        f"  generator    CPU max {s['gen_cpu_max_pct']:.0f}% of a core per process, "
        f"event-loop lag max {s['loop_lag_max_ms']:.1f} ms"
    )
    for label, kinds in (("connect", s["failures"]["connect"]), ("query", s["failures"]["query"]),
                         ("dropped", s["failures"]["dropped"]), ("sampler", s["failures"]["sampler"])):
        for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            say(f"  {label} failure x{n}: {s['failure_samples'].get(kind, kind)}")
    for f in files:
        say(f"  wrote        {f}")
    if s["problems"]:
        say("  result       FAILED: " + "; ".join(s["problems"]))
    else:
        say("  result       OK")


def run(opts: Options) -> int:
    """The whole firehose; returns the exit status."""
    def say(text: str) -> None:
        print(text, flush=True)

    def err(text: str) -> None:
        print(f"firehose: {text}", file=sys.stderr, flush=True)

    try:
        target, direct = opts.check()
    except UsageError as exc:
        err(str(exc))
        return EXIT_USAGE
    nofile = worker.raise_nofile_limit()
    procs = opts.procs or os.cpu_count() or 1
    per_proc_max = max(100, nofile - 200)
    if math.ceil(opts.connections / procs) > per_proc_max:
        procs = math.ceil(opts.connections / per_proc_max)
        if procs > MAX_PROCS:
            err(f"{opts.connections} connections need more than {MAX_PROCS} processes "
                f"at {per_proc_max} file descriptors each")
            return EXIT_USAGE
        say(f"firehose: using {procs} processes ({per_proc_max} connections each at most: "
            f"RLIMIT_NOFILE is {nofile})")
    procs = max(1, min(procs, opts.connections))
    started = dt.datetime.now().isoformat(timespec="seconds")
    out_dir = opts.out or Path("firehose-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        ips = _source_ips(opts, procs)
        max_id = asyncio.run(_prepare(target, direct, opts.connect_timeout))
        out_dir.mkdir(parents=True, exist_ok=True)
    except SetupError as exc:
        err(str(exc))
        return EXIT_SETUP
    except OSError as exc:
        err(f"cannot create {out_dir}: {exc}")
        return EXIT_SETUP
    say(
        f"firehose: {opts.connections} connections over {procs} processes (sources "
        f"{ips[0]}-{ips[-1]}), churn {opts.churn:g}/s, {opts.qps:g} qps "
        f"({opts.write_ratio:.0%} writes), {opts.duration} s with a {opts.ramp:g} s ramp "
        f"-> {target.describe()}"
    )
    say(f"firehose: backends counted through {direct.describe() if direct else '(not sampled)'}")
    r = Run(opts, target, direct)
    r.start(procs, ips, max_id)
    try:
        _run_loop(r.collect())
    except KeyboardInterrupt:
        r.interrupted = True
        r._reap()
    summary = r.summary(procs, ips, started)
    csv_path, json_path, png_path = (out_dir / f"firehose.{ext}" for ext in ("csv", "json", "png"))
    _write_csv(csv_path, r.rows)
    files = [csv_path]
    try:
        from .chart import draw

        draw(r.rows, png_path, summary)
        files.append(png_path)
    except ImportError as exc:
        summary["problems_chart"] = f"no chart: {exc} (pip install matplotlib)"
        err(summary["problems_chart"])
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files.append(json_path)
    _print_summary(summary, files, say)
    if r.interrupted:
        return 130
    return summary["exit_status"]


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover
        asyncio.run(coro)
