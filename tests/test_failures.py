"""Destructive failure tests, each on its own pgfleet instance (``make_server``).

Killing a gateway worker, killing Postgres, stopping pgfleet, and cancelling
queries whose CancelRequest lands on another worker than the client's.

Which process is which: ``child_pids()`` lists the supervisor's direct children,
which are the postmaster (``postmaster_pid()``), the pooler (the process that
listens on ``<home>/ipc/pooler.sock``, found with ``ss -xlp``) and the workers
(everything else). Which worker serves a client is read from ``ss -tnp``. The helpers
for all that are in ``tests.procs``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from supervisor.config import Config
from tests.conftest import PgfleetServer
from tests.procs import (
    children_of,
    pid_gone,
    pooler_pid,
    spread_connections,
    worker_of,
    worker_pids,
)
from tests.waiting import bounded, wait_for

# ----------------------------------------------------------------------------- helpers


def connect(server, **kw) -> psycopg.Connection:
    return psycopg.connect(server.dsn(), connect_timeout=10, **kw)


def direct(server) -> psycopg.Connection:
    return psycopg.connect(server.direct_dsn(), autocommit=True, connect_timeout=10)


def one_query(server, value: int) -> int:
    with connect(server, autocommit=True) as conn:
        return conn.execute("select %s::int", (value,)).fetchone()[0]


# ----------------------------------------------------------------------------- tests


def test_worker_killed(make_server):
    srv = make_server("--workers", "2", "--pool-size", "4")
    before = srv.child_pids()
    workers = worker_pids(srv)
    assert len(workers) == 2, (before, workers)

    by_worker = spread_connections(srv, 2, autocommit=True)
    victim, survivor = workers
    victims, survivors = by_worker[victim], by_worker[survivor]

    # A victim client holds a backend in an open transaction when its worker dies.
    tx = victims[0]
    tx.execute("begin")
    tx_backend = tx.execute("select pg_backend_pid()").fetchone()[0]

    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def keep_querying() -> None:
        while not stop.is_set():
            for i, conn in enumerate(survivors):
                try:
                    assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
                except BaseException as exc:
                    errors.append(exc)
                    return
            rounds[0] += 1
            time.sleep(0.01)

    loop = threading.Thread(target=keep_querying, daemon=True)
    loop.start()
    try:
        wait_for(lambda: rounds[0] >= 3, 15, "the surviving clients' queries")
        os.kill(victim, signal.SIGKILL)

        # The killed worker's clients see their connection end (no hang).
        for conn in victims:
            with pytest.raises(psycopg.OperationalError):
                bounded(lambda c=conn: c.execute("select 1"), 15, "a query on a dead worker")

        # The supervisor replaces the worker.
        def replaced() -> list[int] | None:
            now = srv.child_pids()
            if victim in now or len(now) != len(before):
                return None
            return [p for p in now if p not in before] or None

        new = wait_for(replaced, 10, "a replacement worker")
        assert len(new) == 1, (before, srv.child_pids())
        assert sorted(worker_pids(srv)) == sorted([survivor, new[0]])

        # The backend the dead worker held is closed (its transaction rolled back).
        with direct(srv) as d:
            wait_for(
                lambda: (
                    not d.execute(
                        "select 1 from pg_stat_activity where pid = %s", (tx_backend,)
                    ).fetchone()
                ),
                10,
                "the dead worker's backend to be closed",
            )

        start = rounds[0]
        wait_for(lambda: rounds[0] >= start + 3 or errors, 15, "more surviving queries")
    finally:
        stop.set()
        loop.join(15)
    assert not loop.is_alive(), "surviving clients' queries hung"
    assert not errors, f"a client of the surviving worker failed: {errors[0]!r}"

    # 50 fresh connections all work, and the new worker takes its share of them.
    served_by: set[int] = set()
    for i in range(50):

        def fresh(i: int = i) -> tuple[int, int]:
            with connect(srv, autocommit=True) as conn:
                return conn.execute("select %s::int", (i,)).fetchone()[0], worker_of(srv, conn)

        value, worker = bounded(fresh, 30, f"fresh connection {i}")
        assert value == i
        served_by.add(worker)
    assert new[0] in served_by, f"the restarted worker served none of 50 clients: {served_by}"
    for conn in survivors:
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
    for conns in by_worker.values():
        for conn in conns:
            conn.close()
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


def test_postgres_killed(make_server):
    srv = make_server("--workers", "2", "--pool-size", "4")
    pids_before = srv.child_pids()
    idle = connect(srv, autocommit=True)
    assert idle.execute("select 1").fetchone() == (1,)
    with direct(srv) as d:
        started_before = d.execute("select pg_postmaster_start_time()").fetchone()[0]
    old = srv.postmaster_pid()

    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30

    def new_postmaster() -> int | None:
        try:
            pid = srv.postmaster_pid()
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if pid != old and not pid_gone(pid) else None

    new = wait_for(new_postmaster, 30, "Postgres to be restarted")
    assert new != old

    # New connections through pgfleet work again (retrying until the deadline).
    last: BaseException | None = None
    while True:
        try:
            with connect(srv, autocommit=True) as conn:
                started = bounded(
                    lambda c=conn: c.execute("select pg_postmaster_start_time()").fetchone()[0],
                    10,
                )
            break
        except psycopg.Error as exc:
            last = exc
        if time.monotonic() > deadline:
            pytest.fail(f"no working connection 30 s after killing Postgres: {last!r}")
        time.sleep(0.5)
    assert started > started_before

    # The client that sat idle through the crash goes on without reconnecting.
    idle_deadline = time.monotonic() + 15
    while True:
        try:
            row = bounded(lambda: idle.execute("select pg_postmaster_start_time()").fetchone(), 10)
            break
        except psycopg.Error as exc:
            assert not idle.closed, f"the idle client's session was ended: {exc!r}"
            if time.monotonic() > idle_deadline:
                pytest.fail(f"the idle client never got a query through: {exc!r}")
            time.sleep(0.5)
    assert row[0] > started_before
    assert not idle.closed
    assert idle.execute("select 2").fetchone() == (2,)
    idle.close()

    # The postmaster is the only child replaced: pooler and workers lived on.
    now = srv.child_pids()
    assert new in now and old not in now
    assert sorted(set(now) - {new}) == sorted(set(pids_before) - {old})
    assert bounded(lambda: [one_query(srv, i) for i in range(10)], 60) == list(range(10))


def test_stop_leaves_nothing_behind(make_server):
    srv = make_server("--workers", "2")
    idle = connect(srv, autocommit=True)
    assert idle.execute("select 1").fetchone() == (1,)
    busy = connect(srv)
    busy.execute("select 1")  # a session inside a transaction, holding a backend
    with direct(srv) as d:
        assert d.execute("select 1").fetchone() == (1,)
    postmaster = srv.postmaster_pid()
    pids = set(srv.child_pids()) | {postmaster} | set(children_of(postmaster))
    assert len(pids) >= 4 + 3, pids  # postmaster, pooler, 2 workers, auxiliary processes
    # The pooler and each worker lead a session of their own (autogroup scheduling shares
    # CPU per session), so nothing of them hangs on the supervisor's process group: the
    # stop below must still end them all.
    servers = [pooler_pid(srv), *worker_pids(srv)]
    assert len(servers) == 3, servers
    assert [os.getsid(p) for p in servers] == servers
    assert os.getsid(srv.proc.pid) not in servers
    shm = Path("/dev/shm") / Config(home=srv.home).cancel_table_name.lstrip("/")
    assert shm.exists()

    rc = srv.stop(timeout=30)
    assert rc == 0, srv.log()[-5000:]
    wait_for(
        lambda: all(pid_gone(p) for p in pids), 5, "every pgfleet and Postgres process to exit"
    )
    assert not shm.exists(), "the cancel table's shared memory was left behind"

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
    for conn in (idle, busy):
        with pytest.raises(psycopg.OperationalError):
            bounded(lambda c=conn: c.execute("select 1"), 15, "a query after the stop")
        conn.close()


def test_a_killed_supervisor_takes_its_children_and_the_next_up_serves(make_server):
    """SIGKILL to the supervisor: the pooler and workers stop with it (they would else
    keep serving unsupervised, and share the port with the next pgfleet), and a new
    ``pgfleet up`` on the same home stops the Postgres left behind and serves."""
    srv = make_server("--workers", "2")
    client = connect(srv, autocommit=True)
    assert client.execute("select 1").fetchone() == (1,)
    servers = [pooler_pid(srv), *worker_pids(srv)]
    assert len(servers) == 3, servers
    postmaster = srv.postmaster_pid()

    srv.proc.kill()
    srv.proc.wait(10)
    again = PgfleetServer("--workers", "2", home=srv.home)
    try:
        wait_for(lambda: all(pid_gone(p) for p in servers), 15, "the pooler and workers to exit")
        with pytest.raises(psycopg.OperationalError):
            bounded(lambda: client.execute("select 1"), 15, "a query after the supervisor died")
        client.close()

        again.start()
        assert pid_gone(postmaster), "the old postmaster should have been stopped"
        assert bounded(lambda: one_query(again, 7), 30) == 7
    finally:
        again.cleanup()
        # Whatever outlived the supervisor (if this test fails), stopped by pid: its
        # supervisor's cleanup cannot, and a server left running would outlast the run.
        for pid in servers:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGTERM)
        if not pid_gone(postmaster):
            os.kill(postmaster, signal.SIGINT)
            wait_for(lambda: pid_gone(postmaster), 30, "the old postmaster to stop")


def _active_with(d: psycopg.Connection, marker: str) -> int:
    return d.execute(
        "select count(*) from pg_stat_activity where state = 'active' and query like %s",
        (f"%{marker}%",),
    ).fetchone()[0]


def _sleep_then_cancel_all(d: psycopg.Connection, conns: list[psycopg.Connection]) -> None:
    """Start a long sleep on every connection, cancel each, expect QueryCanceled on all."""
    marker = f"xworker_cancel_{uuid.uuid4().hex[:8]}"
    results: dict[int, BaseException | None] = {}

    def sleeper(i: int, conn: psycopg.Connection) -> None:
        try:
            conn.execute(f"select pg_sleep(30) /* {marker} {i} */")
            results[i] = None
        except BaseException as exc:
            results[i] = exc

    threads = [
        threading.Thread(target=sleeper, args=(i, c), daemon=True) for i, c in enumerate(conns)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: _active_with(d, marker) == len(conns), 15, "all sleeps to be running")
    for conn in conns:
        conn.cancel_safe(timeout=10)
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "some queries were not cancelled within 15 s"
    for i in range(len(conns)):
        exc = results[i]
        assert isinstance(exc, pg_errors.QueryCanceled), (i, repr(exc))
        assert "canceling statement due to user request" in str(exc)
    assert _active_with(d, marker) == 0


def test_cancel_across_workers(make_server):
    srv = make_server("--workers", "2")
    by_worker = spread_connections(srv, 3, autocommit=True)
    conns = [c for cs in by_worker.values() for c in cs]
    assert len(conns) == 6
    try:
        with direct(srv) as d:
            # Each CancelRequest lands on a worker the kernel picks, so over two rounds
            # (12 cancels) some surely arrive at another worker than their client's.
            for _ in range(2):
                _sleep_then_cancel_all(d, conns)
        for i, conn in enumerate(conns):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    finally:
        for conn in conns:
            conn.close()
