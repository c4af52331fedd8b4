"""Cancel requests and asynchronous messages, routed to the right client.

The client-facing BackendKeyData is pgfleet's (a slot in the shared cancel table), and
the backend behind a client changes from one transaction to the next, so a
CancelRequest must be translated on whichever worker receives it into "the backend
serving that client right now", and do nothing when there is none. NoticeResponse and
ParameterStatus come from a backend that several clients share and must reach only the
client whose statement caused them.

Already covered elsewhere: a cancel landing on another worker than its client
(test_failures), wrong keys during a running query (test_bad_input), asyncpg's
timeout cancel (test_asyncpg), cancel over TLS (test_tls).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from pgwire import backend as be
from pgwire import frontend as fe

from .conftest import PASSWORD
from .procs import connect_on_worker, worker_pids
from .waiting import bounded, poll, wait_for
from .wire import RawClient, data_rows, errors_in

QUERY_CANCELED = "57014"


@pytest.fixture(scope="module")
def busy_server(make_module_server):
    """Two workers, three backends: clients move between backends and workers."""
    return make_module_server("--workers", "2", "--pool-size", "3")


@pytest.fixture(scope="module")
def shared_server(make_module_server):
    """Two workers, one backend: every client takes turns on the same backend."""
    return make_module_server("--workers", "2", "--pool-size", "1")


def direct(server) -> psycopg.Connection:
    return psycopg.connect(server.direct_dsn(), autocommit=True, connect_timeout=10)


def raw_session(server) -> tuple[RawClient, be.BackendKeyData]:
    """A logged-in raw client and the cancel key pgfleet gave it."""
    c = RawClient(server.port)
    msgs = c.login_scram()
    return c, next(m for m in msgs if isinstance(m, be.BackendKeyData))


def _worker_of_port(server, port: int) -> int | None:
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{server.port} and dport = :{port} )"],
        capture_output=True, text=True, timeout=10,
    ).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    return pids.pop() if len(pids) == 1 else None


def connection_on(server, worker: int) -> RawClient:
    """A fresh connection (nothing sent yet) that the kernel handed to ``worker``."""
    for _ in range(60):
        c = RawClient(server.port)
        port = c.sock.getsockname()[1]
        got = poll(lambda port=port: _worker_of_port(server, port), timeout=5)
        if got == worker:
            return c
        c.close()
    pytest.fail(f"no connection landed on worker {worker}")


def send_cancel(server, worker: int, pid: int, secret: int) -> None:
    """CancelRequest through a connection served by ``worker``; it is closed silently."""
    with connection_on(server, worker) as c:
        c.send(fe.encode_cancel_request(pid, secret))
        assert c.read_to_eof() == []


def active_pids(d: psycopg.Connection, marker: str) -> list[int]:
    return [r[0] for r in d.execute(
        "select pid from pg_stat_activity where state = 'active' and pid <> pg_backend_pid() "
        "and position(%s in query) > 0", (marker,)).fetchall()]


def backend_pid(c: RawClient) -> int:
    return int(data_rows(c.query("select pg_backend_pid()"))[0][0])


class Busy:
    """Queries running on other clients meanwhile, which must end normally."""

    def __init__(self, conns: list[psycopg.Connection], sql: str) -> None:
        self.results: dict[int, object] = {}
        self.threads = [threading.Thread(target=self._run, args=(i, c, sql), daemon=True)
                        for i, c in enumerate(conns)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, conn: psycopg.Connection, sql: str) -> None:
        try:
            self.results[i] = conn.execute(sql).fetchone()
        except BaseException as exc:
            self.results[i] = exc

    def join(self, timeout: float = 30) -> dict[int, object]:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a busy query never finished"
        return self.results


# --------------------------------------------------------------------------- cancel routing


def test_cancel_follows_the_client_across_backends_and_workers(busy_server):
    srv = busy_server
    workers = worker_pids(srv)
    assert len(workers) == 2
    x, key = raw_session(srv)
    port = x.sock.getsockname()[1]
    x_worker = wait_for(lambda: _worker_of_port(srv, port), 10, "the client's worker")
    # Helpers on the client's worker hold backends in open transactions, so that the
    # client is served by another backend from one transaction to the next.
    helpers = [connect_on_worker(srv, x_worker, None) for _ in range(2)]
    others = [psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) for _ in range(2)]
    try:
        seen: list[int] = []
        for rnd in range(12):
            holding = helpers[: rnd % 3]
            for h in holding:
                h.execute("select pg_backend_pid()")  # opens a transaction: holds a backend
            x.query("begin")
            seen.append(backend_pid(x))
            x.query("commit")
            for h in holding:
                h.rollback()
            if len(set(seen)) >= 2 and rnd >= 3:
                break
        assert len(set(seen)) >= 2, f"the client never changed backend: {seen}"

        with direct(srv) as d:
            # One cancel through each worker, the client's own and the other one.
            for n, via in enumerate(sorted(workers, key=lambda w: w != x_worker)):
                marker = f"cancel_moving_{uuid.uuid4().hex[:8]}"
                busy = Busy(others, f"select pg_sleep(1.5), '{marker}_other'")
                x.send(fe.encode_query(f"select pg_sleep(30), '{marker}'"))
                running = wait_for(lambda m=marker: active_pids(d, f"'{m}'"), 15,
                                   "the client's sleep to start")
                # Wrong secrets, and another client's pid with this one's secret: nothing.
                send_cancel(srv, via, key.pid, key.secret ^ 0x5A5A5A5A)
                send_cancel(srv, via, key.pid + 1, key.secret)
                assert active_pids(d, f"'{marker}'") == running
                send_cancel(srv, via, key.pid, key.secret)
                msgs, rfq = x.read_until_ready_or_eof()
                assert rfq is not None and rfq.status == "I", msgs
                errs = errors_in(msgs)
                assert [e.sqlstate for e in errs] == [QUERY_CANCELED], (n, msgs)
                assert "canceling statement due to user request" in errs[0].message
                for i, result in busy.join().items():
                    assert result == ("", f"{marker}_other"), (i, result)
                assert poll(lambda m=marker: not active_pids(d, f"'{m}'"), 10)
                # Move the client on: a helper takes the backend it just used.
                helpers[0].execute("select pg_backend_pid()")
                assert data_rows(x.query("select 'still here'")) == [[b"still here"]]
                helpers[0].rollback()
    finally:
        x.close()
        for c in helpers + others:
            c.close()


def test_cancel_for_an_idle_client_is_harmless(shared_server):
    # One backend for everyone: the idle client's last backend now runs another
    # client's query, which the cancel must not touch.
    srv = shared_server
    workers = worker_pids(srv)
    x, key = raw_session(srv)
    try:
        assert data_rows(x.query("select 1")) == [[b"1"]]
        with direct(srv) as d, psycopg.connect(srv.dsn(), autocommit=True,
                                               connect_timeout=10) as y:
            marker = f"idle_cancel_{uuid.uuid4().hex[:8]}"
            busy = Busy([y], f"select pg_sleep(1.5), '{marker}'")
            wait_for(lambda: active_pids(d, f"'{marker}'"), 15, "the other client's sleep")
            for w in workers:
                send_cancel(srv, w, key.pid, key.secret)
            assert busy.join() == {0: ("", marker)}
            assert y.execute("select 2").fetchone() == (2,)
        assert data_rows(x.query("select 3")) == [[b"3"]]
        # Idle in a transaction (the backend is held): Postgres ignores the cancel too.
        x.query("begin")
        x.query("create temp table if not exists idle_cancel_t(a int)")
        for w in workers:
            send_cancel(srv, w, key.pid, key.secret)
        msgs = x.query("select 4")
        assert data_rows(msgs) == [[b"4"]] and not errors_in(msgs), msgs
        assert not errors_in(x.query("commit"))
    finally:
        x.close()


def test_cancel_keys_are_random(busy_server):
    secrets, pids = [], set()
    for _ in range(200):
        with RawClient(busy_server.port) as c:
            key = next(m for m in c.login_scram() if isinstance(m, be.BackendKeyData))
            secrets.append(key.secret & 0xFFFFFFFF)
            pids.add(key.pid)
            c.send(fe.TERMINATE)
    assert len(set(secrets)) == len(secrets), "a cancel secret repeated"
    # Every bit both set and clear somewhere (chance of failing by luck: ~2**-194),
    # and the top bit set about half the time (binomial(200, 1/2): 60..140 is > 5 sigma).
    for bit in range(32):
        ones = sum(s >> bit & 1 for s in secrets)
        assert 0 < ones < len(secrets), f"bit {bit} never varies"
    assert 60 <= sum(s >> 31 for s in secrets) <= 140
    assert 0 not in secrets
    assert len(pids) >= 2  # both workers handed out keys


# --------------------------------------------------------------------------- async messages


def _notices(conn: psycopg.Connection) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda diag: seen.append(diag.message_primary))
    return seen


NOTE_FN = (
    "create or replace function pgf_note(t text) returns int language plpgsql as "
    "$$begin raise notice 'note %', t; return 1; end$$"
)


def test_notices_reach_only_their_client(shared_server):
    srv = shared_server
    with direct(srv) as d:
        d.execute(NOTE_FN)
    a = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    try:
        seen_a, seen_b = _notices(a), _notices(b)
        a.execute("do $$begin raise notice 'do A1'; end$$")
        b.execute("do $$begin raise notice 'do B1'; end$$")
        a.execute("do $$begin raise notice 'do A2'; raise notice 'do A3'; end$$")
        assert b.execute("select pgf_note('B2')").fetchone() == (1,)
        # A holds the only backend in a transaction; B's statement waits for it and
        # runs once A commits. Each gets only its own notices.
        with a.transaction():
            a.execute("select pgf_note('A4')")
            waiting = Busy([b], "select pgf_note('B3')")
            a.execute("select pgf_note('A5')")
            a.execute("do $$begin raise notice 'do A6'; end$$")
        assert waiting.join() == {0: (1,)}
        assert seen_a == ["do A1", "do A2", "do A3", "note A4", "note A5", "do A6"]
        assert seen_b == ["do B1", "note B2", "note B3"]
    finally:
        a.close()
        b.close()


def test_parameter_status_reaches_only_its_client(shared_server):
    srv = shared_server
    a = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)

    def reported(conn: psycopg.Connection) -> tuple[str | None, str | None]:
        return (conn.info.parameter_status("application_name"),
                conn.info.parameter_status("TimeZone"))

    try:
        a.execute("set application_name = 'client_a'")
        a.execute("set timezone = 'America/Lima'")
        b.execute("set application_name = 'client_b'")
        b.execute("set timezone = 'Asia/Tokyo'")
        for _ in range(2):  # each turn replays the other client's settings on the backend
            assert a.execute("select current_setting('application_name'), "
                             "current_setting('TimeZone')").fetchone() == ("client_a",
                                                                           "America/Lima")
            assert b.execute("show timezone").fetchone() == ("Asia/Tokyo",)
            assert reported(a) == ("client_a", "America/Lima")
            assert reported(b) == ("client_b", "Asia/Tokyo")
        # SET LOCAL reports the value, then the old one again at commit, to its client only.
        with a.transaction():
            a.execute("set local application_name = 'a_local'")
            assert reported(a)[0] == "a_local"
        assert reported(a) == ("client_a", "America/Lima")
        b.execute("reset timezone")
        assert reported(b)[1] == b.execute("show timezone").fetchone()[0] != "Asia/Tokyo"
        assert reported(a) == ("client_a", "America/Lima")
        assert reported(b)[0] == "client_b"
    finally:
        a.close()
        b.close()


def test_asyncpg_log_listener_with_interleaved_clients(shared_server):
    srv = shared_server

    async def main() -> None:
        conns = [await asyncpg.connect(host="127.0.0.1", port=srv.port, user="postgres",
                                       password=PASSWORD, database="postgres", timeout=60)
                 for _ in range(2)]
        seen: list[list[str]] = [[], []]
        for i, conn in enumerate(conns):
            conn.add_log_listener(lambda _c, msg, i=i: seen[i].append(msg.message))
        try:
            for turn in range(3):
                for i, conn in enumerate(conns):
                    await conn.execute(f"do $$begin raise notice 'apg {i}.{turn}'; end$$")
                    await conn.execute(f"set application_name = 'apg_{i}_{turn}'")
            await asyncio.gather(*(
                conn.execute(f"do $$begin perform pg_sleep(0.2); raise notice 'apg {i}.late';"
                             " end$$")
                for i, conn in enumerate(conns)))
            await asyncio.sleep(0.1)  # log listeners are called soon, not at once
            for i, conn in enumerate(conns):
                assert seen[i] == [f"apg {i}.{t}" for t in range(3)] + [f"apg {i}.late"]
                assert conn.get_settings().application_name == f"apg_{i}_2"
        finally:
            for conn in conns:
                await conn.close(timeout=10)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_psycopg_cancel_while_sharing_one_backend(shared_server):
    """Two clients on the one backend: each cancel hits only its own statement."""
    srv = shared_server
    a = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    b = psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)
    try:
        for victim, bystander in ((a, b), (b, a)):
            marker = f"shared_cancel_{uuid.uuid4().hex[:8]}"
            with direct(srv) as d:
                run = Busy([victim], f"select pg_sleep(30), '{marker}'")
                wait_for(lambda m=marker: active_pids(d, f"'{m}'"), 15, "the sleep")
                bounded(lambda v=victim: v.cancel_safe(timeout=10), 20, "cancel_safe")
                (result,) = run.join(20).values()
                assert isinstance(result, pg_errors.QueryCanceled), result
            assert bystander.execute("select 1").fetchone() == (1,)
            assert victim.execute("select 2").fetchone() == (2,)
    finally:
        a.close()
        b.close()


def test_cancel_of_a_statement_waiting_for_a_backend(shared_server):
    """A statement queued behind a busy pool is cancelled as Postgres would cancel it
    as it starts: 57014 at once, and it never runs; the client's next statement runs.
    The cancel goes through each worker in turn, so it also crosses to the other one."""
    srv = shared_server
    with direct(srv) as d, psycopg.connect(srv.dsn(), autocommit=True,
                                           connect_timeout=10) as y:
        d.execute("create table if not exists cancel_waiting_t(n int)")
        for w in worker_pids(srv):
            x, key = raw_session(srv)
            try:
                marker = f"hold_{uuid.uuid4().hex[:8]}"
                busy = Busy([y], f"select pg_sleep(3), '{marker}'")
                wait_for(lambda marker=marker: active_pids(d, f"'{marker}'"), 15,
                         "the pool's only backend to be busy")
                x.send(fe.encode_query("insert into cancel_waiting_t values (1)"))
                time.sleep(0.2)  # let the worker queue it (a cancel before that finds nothing)
                send_cancel(srv, w, key.pid, key.secret)
                msgs = x.read_until_ready()
                assert [e.fields["C"] for e in errors_in(msgs)] == [QUERY_CANCELED], msgs
                busy.join()
                assert data_rows(x.query("select 5")) == [[b"5"]]
            finally:
                x.close()
        assert d.execute("select count(*) from cancel_waiting_t").fetchone() == (0,)
        d.execute("drop table cancel_waiting_t")


def test_cancel_with_a_wrong_key_leaves_a_waiting_statement_alone(shared_server):
    """The key of a CancelRequest for a queued statement is checked against the shared
    table: one bit off and the statement runs once a backend comes, as in Postgres."""
    srv = shared_server
    with direct(srv) as d, psycopg.connect(srv.dsn(), autocommit=True,
                                           connect_timeout=10) as y:
        d.execute("create table if not exists cancel_wrong_key_t(n int)")
        w = worker_pids(srv)[0]
        x, key = raw_session(srv)
        try:
            marker = f"hold_{uuid.uuid4().hex[:8]}"
            busy = Busy([y], f"select pg_sleep(1.5), '{marker}'")
            wait_for(lambda: active_pids(d, f"'{marker}'"), 15,
                     "the pool's only backend to be busy")
            x.send(fe.encode_query("insert into cancel_wrong_key_t values (1)"))
            time.sleep(0.2)
            send_cancel(srv, w, key.pid, key.secret ^ 1)
            send_cancel(srv, w, key.pid + 1, key.secret)
            msgs = x.read_until_ready()
            assert errors_in(msgs) == [], msgs
            busy.join()
        finally:
            x.close()
        assert d.execute("select count(*) from cancel_wrong_key_t").fetchone() == (1,)
        d.execute("drop table cancel_wrong_key_t")
