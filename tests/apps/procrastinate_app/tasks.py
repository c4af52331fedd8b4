"""A Procrastinate app run unchanged through pgfleet (driven by tests/test_apps_procrastinate.py).

Its worker runs as ``python -m procrastinate --app=tasks.app worker``, with the PG*
environment variables pointing at pgfleet (libpq reads them: the conninfo is empty).
Every execution of the task is recorded in ``proc_exec``, so the test can count how
many times each job really ran.
"""

from __future__ import annotations

import asyncio

from procrastinate import App, JobContext, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo="", min_size=2, max_size=6))


@app.task(name="record", pass_context=True, queue="pgfleet")
async def record(context: JobContext, n: int, hold_ms: int = 0) -> int:
    """Record one execution; with ``hold_ms``, stay inside the job a moment so that jobs
    sharing a lock would overlap if the lock did not serialise them."""
    started = await context.app.connector.execute_query_one_async(
        "SELECT clock_timestamp() AS t")
    if hold_ms:
        await asyncio.sleep(hold_ms / 1000)
    await context.app.connector.execute_query_async(
        "INSERT INTO proc_exec (job_id, n, lock, started, finished)"
        " VALUES (%(job_id)s, %(n)s, %(lock)s, %(started)s, clock_timestamp())",
        job_id=context.job.id, n=n, lock=context.job.lock, started=started["t"])
    return n
