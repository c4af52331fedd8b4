"""Procrastinate (a Postgres task queue) run unchanged through pgfleet.

Its schema (types, tables, functions, triggers that NOTIFY) is applied through pgfleet,
500 jobs are deferred (half in one batch, half one by one), and a real worker
(``python -m procrastinate ... worker``, a subprocess) runs them. The worker polls for
jobs only every 300 s: the second half, deferred while it waits, reaches it through
LISTEN/NOTIFY on its dedicated listening connection. A second test runs jobs that
share a Procrastinate lock (a unique index over the jobs in progress, taken with
``SELECT ... FOR UPDATE SKIP LOCKED``; Procrastinate 3 takes no advisory locks) with an
in-process one-shot worker: they must never overlap.

The app is ``tests/apps/procrastinate_app/tasks.py``; every execution is recorded in a
table, counted straight on Postgres: each job ran exactly once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from procrastinate import PsycopgConnector

APP_DIR = Path(__file__).resolve().parent / "apps" / "procrastinate_app"
JOBS_PER_PHASE = 250
LOCKED_JOBS = 40
WAIT_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 30.0


def load_app():
    spec = importlib.util.spec_from_file_location("pgfleet_procrastinate_tasks",
                                                  APP_DIR / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fleet(make_module_server):
    """A pgfleet with Procrastinate's schema applied through it, and the executions table."""
    server = make_module_server("--workers", "2", "--pool-size", "5")
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        conn.execute("create table proc_exec (job_id bigint, n int, lock text,"
                     " started timestamptz, finished timestamptz)")
    app = load_app().app
    with app.replace_connector(connector(server)):
        run(apply_schema(app))
    return server


def connector(server) -> PsycopgConnector:
    return PsycopgConnector(conninfo=server.dsn(sslmode="disable"), min_size=1, max_size=4)


async def apply_schema(app) -> None:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def run(coro, timeout: float = 60.0):
    """Run ``coro`` to completion, failing (never hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def executions(server, lock: str | None = None) -> int:
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        return conn.execute("select count(*) from proc_exec where lock is not distinct from %s",
                            (lock,)).fetchone()[0]


def wait_for_executions(server, worker: subprocess.Popen, target: int, log: Path) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    n = executions(server)
    while n < target and time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
        n = executions(server)
    if n < target:
        pytest.fail(f"{n} of {target} jobs ran within {WAIT_TIMEOUT} s\nworker log:\n"
                    f"{log.read_text()[-4000:]}\npgfleet log:\n{server.log()[-4000:]}")


@pytest.mark.slow
def test_procrastinate_worker_runs_each_job_once(fleet, tmp_path):
    tasks = load_app()
    app, record = tasks.app, tasks.record

    async def first_half_in_one_batch():
        async with app.open_async():
            await record.batch_defer_async(*({"n": n} for n in range(JOBS_PER_PHASE)))

    async def second_half_one_by_one():
        async with app.open_async():
            for n in range(JOBS_PER_PHASE, 2 * JOBS_PER_PHASE):
                await record.defer_async(n=n)

    with app.replace_connector(connector(fleet)):
        run(first_half_in_one_batch())

    env = fleet.env()
    env.update(PGSSLMODE="disable", PYTHONPATH=str(APP_DIR))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "procrastinate", "--app=tasks.app", "--verbose", "worker",
             "--queues=pgfleet", "--concurrency=4", "--fetch-job-polling-interval=300",
             "--wait", "--listen-notify"],
            cwd=APP_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_executions(fleet, worker, JOBS_PER_PHASE, log)
        with app.replace_connector(connector(fleet)):
            run(second_half_one_by_one())
        wait_for_executions(fleet, worker, 2 * JOBS_PER_PHASE, log)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(5)
    assert worker.returncode == 0, log.read_text()[-4000:]

    total = 2 * JOBS_PER_PHASE
    with psycopg.connect(fleet.direct_dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*), count(distinct n), count(distinct job_id),"
                            " min(n), max(n) from proc_exec where lock is null").fetchone() == (
            total, total, total, 0, total - 1)
        statuses = dict(conn.execute(
            "select status::text, count(*) from procrastinate_jobs where lock is null"
            " group by 1").fetchall())
        assert statuses == {"succeeded": total}
        assert conn.execute("select count(*) from procrastinate_jobs j join proc_exec e"
                            " on e.job_id = j.id and (j.args->>'n')::int = e.n"
                            " where j.lock is null").fetchone() == (total,)


def test_procrastinate_locked_jobs_never_overlap(fleet):
    """Jobs sharing a lock run one at a time, each once; a one-shot worker (wait=False)
    run again until all are done, since a job waiting on its lock is left for later."""
    tasks = load_app()
    app, record = tasks.app, tasks.record

    async def defer_locked():
        async with app.open_async():
            await record.configure(lock="serial").batch_defer_async(
                *({"n": n, "hold_ms": 20} for n in range(LOCKED_JOBS)))

    async def one_shot_worker():
        async with app.open_async():
            await app.run_worker_async(queues=["pgfleet"], concurrency=4, wait=False,
                                       listen_notify=False)

    with app.replace_connector(connector(fleet)):
        run(defer_locked())
        deadline = time.monotonic() + WAIT_TIMEOUT
        while executions(fleet, "serial") < LOCKED_JOBS and time.monotonic() < deadline:
            run(one_shot_worker())
    with psycopg.connect(fleet.direct_dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*), count(distinct n), count(distinct job_id)"
                            " from proc_exec where lock = 'serial'").fetchone() == (
            LOCKED_JOBS, LOCKED_JOBS, LOCKED_JOBS)
        overlapping = conn.execute(
            "select count(*) from proc_exec a join proc_exec b on a.job_id < b.job_id"
            " where a.lock = 'serial' and b.lock = 'serial'"
            " and a.started < b.finished and b.started < a.finished").fetchone()
        assert overlapping == (0,)
        assert conn.execute("select status::text, count(*) from procrastinate_jobs"
                            " where lock = 'serial' group by 1").fetchall() == [
            ("succeeded", LOCKED_JOBS)]
