"""Bad and hostile client input: each case ends only the offending client.

Protocol-level cases use raw sockets (``tests.wire.RawClient``: bytes built with
pgwire's encoders, replies parsed with its framer and decoders); normal clients are
psycopg 3. After every bad-input case the server must be unharmed: a normal client
still works and no pgfleet process died (``server.child_pids()`` unchanged).

Raw-socket logins run a full SCRAM-SHA-256 exchange (``scramp.ScramClient``)
against the shared server; the client-vanishes cases use ``--auth trust``
instances (``make_server``), where the raw login is a bare startup packet.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors as pg_errors

from pgwire import backend as be
from pgwire import frontend as fe
from tests.conftest import PASSWORD
from tests.procs import connect_on_worker, worker_of
from tests.waiting import bounded, wait_for
from tests.wire import RawClient, assert_fatal_then_eof, data_rows, errors_in

# ----------------------------------------------------------------------------- helpers


def assert_healthy(server, pids_before: list[int]) -> None:
    """A normal client still works and no pgfleet process died or was replaced."""

    def check() -> None:
        with psycopg.connect(server.dsn(), connect_timeout=10, autocommit=True) as conn:
            assert conn.execute("select 41 + 1").fetchone() == (42,)

    bounded(check, 30, "a normal psycopg query")
    assert sorted(server.child_pids()) == sorted(pids_before), server.log()[-3000:]


@contextmanager
def unharmed(server) -> Iterator[RawClient]:
    """A raw client for one bad-input case; once it is closed the server must be healthy."""
    pids = server.child_pids()
    with RawClient(server.port) as c:
        yield c
    assert_healthy(server, pids)


def direct(server) -> psycopg.Connection:
    return psycopg.connect(server.direct_dsn(), autocommit=True, connect_timeout=10)


# ------------------------------------------------------------------- first packet


def _random_garbage(seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(64))
    data[0] |= 0x80  # the "length word" is then far beyond any limit
    return bytes(data)


def _garbage_valid_length(seed: int) -> bytes:
    """A plausible length and protocol 3.0, then random junk as parameters."""
    rnd = random.Random(seed)
    body = bytearray(rnd.randbytes(56))
    body[-1] = 0xFF  # never a proper terminator, so the layout is always invalid
    return struct.pack("!II", 8 + len(body), fe.PROTOCOL_3_0) + bytes(body)


BAD_LENGTH = "invalid length of startup packet"


@pytest.mark.parametrize(
    "data,code,message",
    [
        # garbage
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "08P01", None, id="http"),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello
            "08P01",
            None,
            id="tls-hello",
        ),
        pytest.param(_random_garbage(1), "08P01", None, id="random1"),
        pytest.param(_random_garbage(2), "08P01", None, id="random2"),
        pytest.param(_garbage_valid_length(3), "08P01", None, id="junk-params1"),
        pytest.param(_garbage_valid_length(4), "08P01", None, id="junk-params2"),
        # startup length too small
        *(
            pytest.param(struct.pack("!I", n) + b"\x00\x03\x00", "08P01", BAD_LENGTH, id=f"len-{n}")
            for n in (0, 4, 7)
        ),
        # startup length too large: only the header, so the limit must be enforced
        # before the body is awaited
        pytest.param(
            struct.pack("!II", 20000, fe.PROTOCOL_3_0), "08P01", BAD_LENGTH, id="len-20000"
        ),
        # unsupported protocol versions
        *(
            pytest.param(
                fe.encode_startup({"user": "postgres"}, protocol=(major << 16) | minor),
                "0A000",
                "unsupported frontend protocol",
                id=f"protocol-{major}.{minor}",
            )
            for major, minor in [(2, 0), (1, 0), (4, 0)]
        ),
        # a CancelRequest of the wrong length
        pytest.param(
            struct.pack("!II", 12, fe.CANCEL_REQUEST_CODE) + b"\x00\x00\x00\x01",
            "08P01",
            None,
            id="cancel-bad-length",
        ),
    ],
)
def test_bad_first_packet(server, data, code, message):
    with unharmed(server) as c:
        c.send(data)
        assert_fatal_then_eof(c, code, message)


# ------------------------------------------------------------------- after login


def test_raw_scram_login_and_query(server):
    """The raw client itself works (so failures below are about the bad input)."""
    with RawClient(server.port) as c:
        c.login_scram()
        msgs = c.query("select 'raw' || 'ok'")
        assert data_rows(msgs) == [[b"rawok"]]
        assert msgs[-1].status == "I"
        c.send(fe.TERMINATE)
        assert c.read_to_eof() == []


@pytest.mark.parametrize(
    "data",
    [
        # oversize or bad length
        pytest.param(b"S" + struct.pack("!I", 100000), id="sync-100000"),  # Sync: <= 10000 bytes
        pytest.param(b"Q" + struct.pack("!I", 0x7FFFFFFF), id="query-7fffffff"),  # > 1 GiB
        pytest.param(b"Q" + struct.pack("!I", 0xFFFFFFFF), id="query-ffffffff"),
        pytest.param(b"Q" + struct.pack("!I", 3), id="query-3"),  # smaller than the length word
        pytest.param(b"P" + struct.pack("!I", 0x40000000), id="parse-1GiB"),
        pytest.param(b"X" + struct.pack("!I", 50000), id="terminate-50000"),
        # unknown or out of order
        pytest.param(b"z\x00\x00\x00\x04", id="z"),
        pytest.param(b"\x00\x00\x00\x00\x04", id="nul"),
        pytest.param(b"\xff\x00\x00\x00\x08abcd", id="0xff"),
        pytest.param(fe.encode_password("s3cret-pw"), id="password"),  # out of order
        pytest.param(fe.encode_sasl_response(b"c=biws,r=abc,p=xyz"), id="sasl-response"),
    ],
)
def test_bad_message_after_login(server, data):
    with unharmed(server) as c:
        c.login_scram()
        c.send(data)
        assert_fatal_then_eof(c, "08P01")


def test_bad_message_in_open_transaction_rolls_back(server):
    """A protocol violation mid-transaction ends the client and its transaction."""
    pids = server.child_pids()
    table = f"bad_input_tx_{uuid.uuid4().hex[:8]}"
    with direct(server) as d:
        d.execute(f"create table {table} (x int)")
    try:
        with RawClient(server.port) as c:
            c.login_scram()
            assert c.query("begin")[-1].status == "T"
            msgs = c.query(f"insert into {table} values (1)")
            assert not errors_in(msgs) and msgs[-1].status == "T"
            c.send(b"z\x00\x00\x00\x04")
            assert_fatal_then_eof(c, "08P01")
        with direct(server) as d:
            wait_for(
                lambda: (
                    d.execute(
                        "select count(*) from pg_stat_activity where state like 'idle in transaction%'"
                        " and backend_type = 'client backend'"
                    ).fetchone()[0]
                    == 0
                ),
                10,
                "the abandoned transaction to be rolled back",
            )
            assert d.execute(f"select count(*) from {table}").fetchone()[0] == 0
    finally:
        with direct(server) as d:
            d.execute(f"drop table {table}")
    assert_healthy(server, pids)


def test_invalid_message_body_after_login(server):
    """A well-framed Describe with an invalid subtype: 08P01, as Postgres reports it.

    Postgres raises a plain ERROR here and the session goes on; ending the client
    with FATAL is also acceptable. Either way nothing else is harmed.
    """
    with unharmed(server) as c:
        c.login_scram()
        c.send(b"D" + struct.pack("!I", 7) + b"Q\x00")
        c.send(fe.SYNC)
        msgs, ready = c.read_until_ready_or_eof()
        errs = errors_in(msgs)
        assert errs and errs[0].sqlstate == "08P01", msgs
        if errs[0].severity == "FATAL":
            assert ready is None, "a FATAL error must end the connection"
        else:
            assert errs[0].severity == "ERROR" and ready is not None, msgs
            assert data_rows(c.query("select 5")) == [[b"5"]]


# ------------------------------------------------------------------- during auth


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(fe.encode_query("select 1"), id="query"),
        pytest.param(fe.SYNC, id="sync"),
        pytest.param(b"z\x00\x00\x00\x04", id="z"),
        pytest.param(b"p" + struct.pack("!I", 0x7FFFFFFF), id="password-huge"),
        pytest.param(
            fe.encode_sasl_initial("SCRAM-SHA-256", b"\xff\xfegarbage"), id="garbled-sasl-initial"
        ),
    ],
)
def test_bad_message_during_auth(server, data):
    with unharmed(server) as c:
        c.startup()
        c.expect_auth(be.AUTH_SASL)
        c.send(data)
        assert_fatal_then_eof(c, "08P01")


AUTH_TIMEOUT = "canceling authentication due to timeout"


def test_silent_client_dropped_after_auth_timeout(server):
    """The shared server has --auth-timeout 3."""
    with unharmed(server) as c:
        assert_fatal_then_eof(c, "08P01", AUTH_TIMEOUT)


def test_half_startup_packet_dropped_after_auth_timeout(server):
    with unharmed(server) as c:
        packet = fe.encode_startup({"user": "postgres", "database": "postgres"})
        c.send(packet[: len(packet) // 2])
        assert_fatal_then_eof(c, "08P01", AUTH_TIMEOUT)


def test_stalled_scram_exchange_dropped_after_auth_timeout(server):
    with unharmed(server) as c:
        c.startup()
        c.answer_auth(c.expect_auth(be.AUTH_SASL), "postgres", PASSWORD)
        c.expect_auth(be.AUTH_SASL_CONTINUE)
        # ... and never send the client-final-message.
        assert_fatal_then_eof(c, "08P01", AUTH_TIMEOUT)


def test_a_login_slower_than_half_the_auth_timeout_is_not_cut_short(server):
    """Logins end by a periodic sweep, not a timer each: one that takes two thirds
    of --auth-timeout (3 s) between its SCRAM messages still completes."""
    with RawClient(server.port) as c:
        c.startup()
        c.answer_auth(c.expect_auth(be.AUTH_SASL), "postgres", PASSWORD)
        msg = c.expect_auth(be.AUTH_SASL_CONTINUE)
        time.sleep(2.0)
        c.answer_auth(msg, "postgres", PASSWORD)
        c.answer_auth(c.expect_auth(be.AUTH_SASL_FINAL), "postgres", PASSWORD)
        c.expect_auth(be.AUTH_OK)
        c._after_auth_ok()
        assert data_rows(c.query("select 1")) == [[b"1"]]


def test_clients_that_vanish_at_each_step_of_scram_leave_the_worker_serving(server):
    """A login waits for the client at each SCRAM step; a client that closes or
    resets there ends only its own login (the login is stopped where it waits)."""
    pids = server.child_pids()
    for _round in range(3):
        for step in range(3):
            for vanish in (RawClient.close, RawClient.abort):
                c = RawClient(server.port)
                try:
                    c.startup()
                    if step >= 1:
                        c.answer_auth(c.expect_auth(be.AUTH_SASL), "postgres", PASSWORD)
                    if step >= 2:
                        c.answer_auth(c.expect_auth(be.AUTH_SASL_CONTINUE), "postgres", PASSWORD)
                finally:
                    vanish(c)
    assert_healthy(server, pids)


def test_many_silent_clients_do_not_block_others(server):
    """Twenty idle half-open connections: a real client logs in meanwhile, all are dropped."""
    pids = server.child_pids()
    idle = [RawClient(server.port) for _ in range(20)]
    try:

        def check() -> None:
            with psycopg.connect(server.dsn(), connect_timeout=10, autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)

        bounded(check, 20, "a login while silent clients wait")
        for c in idle:
            assert_fatal_then_eof(c, "08P01", AUTH_TIMEOUT)
    finally:
        for c in idle:
            c.close()
    assert_healthy(server, pids)


# ------------------------------------------------------------------- SSL / GSS requests
# (SSLRequest answers, with TLS on and off, are in test_tls.py.)


def test_gssenc_request_refused_then_login(server):
    with unharmed(server) as c:
        c.send(fe.encode_gssenc_request())
        assert c.recv_raw(1) == b"N"
        c.login_scram()
        assert data_rows(c.query("select 7")) == [[b"7"]]


# ------------------------------------------------------------------- cancel requests


def test_cancel_request_with_wrong_key_is_harmless(server):
    pids = server.child_pids()
    marker = f"cancel_wrong_key_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn(), connect_timeout=10, autocommit=True) as conn:
        pid = conn.info.backend_pid
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["row"] = conn.execute(f"select pg_sleep(3), '{marker}'").fetchone()
            except Exception as exc:
                result["error"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        with direct(server) as d:
            wait_for(
                lambda: d.execute(
                    "select count(*) from pg_stat_activity where state = 'active' and query like %s",
                    (f"%{marker}'%",),
                ).fetchone()[0],
                10,
                "the query to start",
            )
        rnd = random.Random(7)
        for key_pid, secret in [
            (pid, rnd.getrandbits(32)),
            (pid, 0),
            (pid + 1, rnd.getrandbits(32)),
            (0, 0),
            (-1, 0xFFFFFFFF),
            (rnd.getrandbits(31), rnd.getrandbits(32)),
        ]:
            with RawClient(server.port) as c:
                c.send(fe.encode_cancel_request(key_pid, secret))
                assert c.read_to_eof() == []  # Postgres closes a cancel connection silently
        t.join(20)
        assert not t.is_alive(), "query did not finish"
        assert "error" not in result, result
        assert result["row"] == ("", marker)
        assert conn.execute("select 2").fetchone() == (2,)
    assert_healthy(server, pids)


# ------------------------------------------------------------------- clients that vanish


def _client_backends(d: psycopg.Connection) -> list[tuple]:
    return d.execute(
        "select pid, state, query from pg_stat_activity"
        " where backend_type = 'client backend' and pid <> pg_backend_pid()"
    ).fetchall()


def test_client_vanishes_mid_transaction(make_server):
    """Raw-socket clients on a trust server open a transaction and disappear."""
    pool_size = 3
    srv = make_server(
        "--auth",
        "trust",
        "--pool-size",
        str(pool_size),
        "--workers",
        "2",
        "--query-wait-timeout",
        "10",
    )
    pids = srv.child_pids()
    with direct(srv) as d:
        d.execute("create table vanish_tx (x int)")
        for i in range(20):
            c = RawClient(srv.port)
            try:
                c.login_trust()
                assert c.query("begin")[-1].status == "T"
                msgs = c.query(f"insert into vanish_tx values ({i})")
                assert not errors_in(msgs) and msgs[-1].status == "T", msgs
                msgs = c.query("select pg_advisory_xact_lock(12345)")
                assert not errors_in(msgs) and msgs[-1].status == "T", msgs
                # While the client is there, its transaction really holds the lock.
                assert d.execute("select pg_try_advisory_lock(12345)").fetchone()[0] is False
            finally:
                if i % 2:
                    c.abort()  # RST
                else:
                    c.close()  # FIN

            def settled() -> bool:
                rows = _client_backends(d)
                return not any((s or "").startswith("idle in transaction") for _, s, _ in rows)

            wait_for(settled, 10, "no backend idle in transaction")
            assert d.execute("select count(*) from vanish_tx").fetchone()[0] == 0
            got = wait_for(
                lambda: d.execute("select pg_try_advisory_lock(12345)").fetchone()[0],
                10,
                "the advisory lock to be free",
            )
            assert got is True
            d.execute("select pg_advisory_unlock(12345)")
            assert len(_client_backends(d)) <= pool_size, _client_backends(d)
        assert len(_client_backends(d)) <= pool_size

    # The backends were reused, not leaked: a new client still gets one.
    with psycopg.connect(srv.dsn(), connect_timeout=10, autocommit=True) as conn:
        assert bounded(lambda: conn.execute("select count(*) from vanish_tx").fetchone(), 20) == (
            0,
        )
    assert sorted(srv.child_pids()) == sorted(pids)


def test_client_vanishes_during_long_query(make_server):
    srv = make_server("--auth", "trust", "--pool-size", "1", "--query-wait-timeout", "10")
    pids = srv.child_pids()
    marker = f"vanish_sleep_{uuid.uuid4().hex[:8]}"
    with direct(srv) as d:

        def running() -> int:
            return d.execute(
                "select count(*) from pg_stat_activity where state = 'active' and query like %s",
                (f"%{marker}%",),
            ).fetchone()[0]

        for abrupt in (True, False):
            c = RawClient(srv.port)
            try:
                c.login_trust()
                c.send(fe.encode_query(f"select pg_sleep(30) /* {marker} */"))
                wait_for(running, 10, "the long query to start")
            finally:
                if abrupt:
                    c.abort()
                else:
                    c.close()
            wait_for(lambda: running() == 0, 10, "the abandoned query to end")

            def new_client() -> tuple:
                with psycopg.connect(srv.dsn(), connect_timeout=10, autocommit=True) as conn:
                    return conn.execute("select 'after'").fetchone()

            assert bounded(new_client, 20, "a query after the vanished client") == ("after",)
            assert len(_client_backends(d)) <= 1
    assert sorted(srv.child_pids()) == sorted(pids)


# ------------------------------------------------------------------- queueing


@pytest.mark.parametrize("placement", ["same-worker", "other-worker"])
def test_query_wait_timeout(make_server, placement):
    """--pool-size 1: a second client queues behind an open transaction, gets 57014
    after --query-wait-timeout 1, and works again once the first one commits."""
    srv = make_server("--pool-size", "1", "--query-wait-timeout", "1", "--workers", "2")
    pids = srv.child_pids()
    holder = psycopg.connect(srv.dsn(), connect_timeout=10)
    waiter = None
    try:
        holder_worker = worker_of(srv, holder)
        holder.execute("select 1")  # opens a transaction: holds the only backend
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        holder.commit()  # idle again: the backend is only cached by holder's worker now
        if placement == "same-worker":
            waiter = connect_on_worker(
                srv, holder_worker, None, strict_login=False, autocommit=True
            )
            # Logins that landed on the other worker leased the backend there; let that
            # worker's cache give it back (lease_idle_seconds 2) so only the queueing
            # on one worker is tested here (the other placement tests the hand-over).
            time.sleep(3)
        else:
            # holder is idle, so its worker's cached backend must serve this login
            # (which needs a backend for its first status report) well within 1 s.
            waiter = connect_on_worker(srv, None, holder_worker, autocommit=True)

        holder.execute("select 1")  # holds the only backend again
        with pytest.raises(pg_errors.QueryCanceled) as info:
            bounded(lambda: waiter.execute("select 'never'"), 15, "the queued query")
        assert info.value.sqlstate == "57014"
        assert not waiter.closed

        holder.commit()
        assert bounded(lambda: waiter.execute("select 'now'").fetchone(), 15) == ("now",)
        assert bounded(lambda: holder.execute("select 'holder'").fetchone(), 15) == ("holder",)
        holder.commit()
        for _ in range(5):  # the backend keeps moving between the two as they take turns
            assert bounded(lambda: waiter.execute("select 1").fetchone(), 15) == (1,)
            assert bounded(lambda: holder.execute("select 2").fetchone(), 15) == (2,)
            holder.commit()
    finally:
        holder.close()
        if waiter is not None:
            waiter.close()
    assert sorted(srv.child_pids()) == sorted(pids)
