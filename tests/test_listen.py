"""LISTEN/NOTIFY through the pooler's LISTEN hub: listeners share backends, and every
notification Postgres would deliver arrives, at a point Postgres could deliver it.

The server has one pool backend (the hub's listening connection is outside the
pool), so a listening session that pinned would make every other session wait.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from pgwire import backend as be
from pgwire import frontend as fe

from . import wire
from .conftest import PASSWORD


@pytest.fixture(scope="module")
def srv(make_module_server):
    return make_module_server("--pool-size", "1", "--workers", "2", "--query-wait-timeout", "5")


def connect(srv) -> psycopg.Connection:
    return psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10)


def received(conn: psycopg.Connection, timeout: float = 3.0, expect: int | None = None):
    """(channel, payload) of the notifications that arrive within ``timeout``."""
    return [(n.channel, n.payload)
            for n in conn.notifies(timeout=timeout, stop_after=expect)]


def test_many_listeners_share_one_backend(srv):
    listeners = [connect(srv) for _ in range(30)]
    sender = connect(srv)
    direct = psycopg.connect(srv.direct_dsn(), autocommit=True)
    try:
        for i, conn in enumerate(listeners):
            conn.execute("LISTEN fanout")
            # Not pinned: the single backend is free for the next session at once.
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        sender.execute("NOTIFY fanout, 'to everyone'")
        for conn in listeners:
            assert received(conn, expect=1) == [("fanout", "to everyone")]
        backends = direct.execute(
            "select count(*) from pg_stat_activity where backend_type = 'client backend'"
            " and pid <> pg_backend_pid()").fetchone()[0]
        assert backends <= 2  # the pool's one backend and the hub
    finally:
        for conn in [*listeners, sender]:
            conn.close()
        direct.close()


def test_delivery_after_commit_and_none_after_rollback(srv):
    listener, sender = connect(srv), connect(srv)
    try:
        listener.execute("LISTEN txn_chan")
        with sender.transaction():
            sender.execute("NOTIFY txn_chan, 'committed'")
            assert received(listener, timeout=0.5) == []  # not before the commit
        assert received(listener, expect=1) == [("txn_chan", "committed")]
        with sender.transaction(force_rollback=True):
            sender.execute("select pg_notify('txn_chan', 'rolled back')")
        sender.execute("NOTIFY txn_chan, 'after'")
        assert received(listener, expect=1) == [("txn_chan", "after")]
    finally:
        listener.close()
        sender.close()


def test_own_notifications_quoted_names_and_big_payloads(srv):
    conn = connect(srv)
    try:
        conn.execute('LISTEN "Mixed Case Chan"')
        conn.execute("LISTEN ünïcode")
        long_name = "c" * 70  # Postgres truncates identifiers to 63 bytes
        conn.execute(f"LISTEN {long_name}")
        payload = "p" * 7999  # the largest payload Postgres accepts
        conn.execute("select pg_notify('Mixed Case Chan', %s)", (payload,))
        conn.execute("NOTIFY ünïcode, 'ok'")
        conn.execute(f"NOTIFY {long_name}, 'truncated'")
        got = received(conn, expect=3)
        assert got == [("Mixed Case Chan", payload), ("ünïcode", "ok"), ("c" * 63, "truncated")]
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("select pg_notify('Mixed Case Chan', repeat('x', 8000))")
    finally:
        conn.close()


def test_unlisten_and_discard_all_stop_delivery(srv):
    listener, sender = connect(srv), connect(srv)
    try:
        listener.execute("LISTEN u1")
        listener.execute("LISTEN u2")
        listener.execute("UNLISTEN u1")
        sender.execute("NOTIFY u1, 'no'; NOTIFY u2, 'yes'")
        assert received(listener, expect=1) == [("u2", "yes")]
        listener.execute("UNLISTEN *")
        sender.execute("NOTIFY u2, 'no'")
        assert received(listener, timeout=0.5) == []
        listener.execute("LISTEN u3")
        listener.execute("DISCARD ALL")
        sender.execute("NOTIFY u3, 'no'")
        assert received(listener, timeout=0.5) == []
    finally:
        listener.close()
        sender.close()


def test_listen_and_unlisten_take_effect_at_commit(srv):
    listener, sender = connect(srv), connect(srv)
    try:
        with listener.transaction(force_rollback=True):
            listener.execute("LISTEN never_committed")
        sender.execute("NOTIFY never_committed, 'no'")
        assert received(listener, timeout=0.5) == []

        listener.execute("LISTEN kept")
        with listener.transaction(force_rollback=True):
            listener.execute("UNLISTEN kept")
        sender.execute("NOTIFY kept, 'still listening'")
        assert received(listener, expect=1) == [("kept", "still listening")]

        # A listener inside a transaction gets notifications when it ends, as from Postgres.
        # (It holds the only pool backend meanwhile: the notification comes from outside.)
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as direct:
            with listener.transaction():
                listener.execute("select 1")
                direct.execute("NOTIFY kept, 'held'")
                assert received(listener, timeout=0.5) == []
            assert received(listener, expect=1) == [("kept", "held")]
    finally:
        listener.close()
        sender.close()


def test_errors_are_postgres_errors(srv):
    conn = connect(srv)
    try:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("LISTEN")
        with conn.transaction(force_rollback=True):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1/0")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("LISTEN after_error")
        conn.execute("NOTIFY after_error, 'no'")
        assert received(conn, timeout=0.5) == []
        assert conn.execute("select 'still fine'").fetchone() == ("still fine",)
    finally:
        conn.close()


def test_extended_protocol_listen(srv):
    listener, sender = connect(srv), connect(srv)
    try:
        listener.execute("LISTEN ext_chan", prepare=True)  # Parse/Bind/Execute, named
        sender.execute("select pg_notify(%s, %s)", ("ext_chan", "via extended"))
        assert received(listener, expect=1) == [("ext_chan", "via extended")]
    finally:
        listener.close()
        sender.close()


@pytest.mark.parametrize("statement", ["pipelined_named", ""])
def test_listen_pipelined_behind_a_wait_for_a_backend(srv, statement):
    """Parse, Bind, Execute and Sync of a LISTEN in one write (postgres.js sends every
    query so) while the only backend is busy: the Parse waits in the queue, and the
    Bind behind it must still see that it LISTENs, so that the hub listens before the
    client is told it does."""
    channel = f"queued_{statement or 'unnamed'}"
    with wire.RawClient(srv.port) as listener:
        listener.login_scram()
        send_while_the_backend_is_busy(srv, listener, fe.encode_parse(statement, f"LISTEN {channel}")
                                       + fe.encode_bind("", statement, []) + fe.encode_execute()
                                       + fe.SYNC)
        assert not wire.errors_in(listener.read_until_ready())
        assert_hears(srv, listener, channel)


def test_listen_between_statements_that_hold_what_follows(srv):
    """A PREPARE (whose answer what follows waits for), a LISTEN (which waits for the
    hub) and an EXECUTE of the statement, pipelined while the only backend is busy:
    each is answered in order as Postgres would, and the LISTEN hears."""
    with wire.RawClient(srv.port) as listener:
        listener.login_scram()
        send_while_the_backend_is_busy(srv, listener, fe.encode_query("prepare combo as select 5")
                                       + fe.encode_query("listen combo_chan")
                                       + fe.encode_query("execute combo")
                                       + fe.encode_query("deallocate combo"))
        replies = [listener.read_until_ready() for _ in range(4)]
        assert [wire.errors_in(r) for r in replies] == [[], [], [], []]
        assert wire.data_rows(replies[2]) == [[b"5"]]
        assert_hears(srv, listener, "combo_chan")


@pytest.mark.parametrize("failing", ["select 1/0", "SAVEPOINT s"])
def test_listen_pipelined_behind_a_failing_statement(srv, failing):
    """A libpq pipeline of a failing statement then a LISTEN on a channel the hub does
    not listen on yet: the LISTEN waits for the hub while the error comes back, and
    Postgres skips it. The pipeline is answered as Postgres answers it (it used to get
    no answer at all), the session listens on nothing, and a LISTEN after it works."""
    channel = f"behind_{failing.split()[0].lower()}"
    with connect(srv) as conn:
        got = wire.libpq_pipeline(conn, [failing, f"LISTEN {channel}"])
        assert [r[0] for r in got] == ["FATAL_ERROR", "PIPELINE_ABORTED"]
        with connect(srv) as sender:
            sender.execute("select pg_notify(%s, 'not for the aborted listen')", (channel,))
        assert received(conn, timeout=0.5) == []
        conn.execute(f"LISTEN {channel}")
        with connect(srv) as sender:
            sender.execute("select pg_notify(%s, 'heard')", (channel,))
        assert received(conn, expect=1) == [(channel, "heard")]


TRANSACTIONS_IN_ONE_UNIT = [
    ["ROLLBACK", "LISTEN unit_a"],
    ["LISTEN unit_a", "ROLLBACK", "LISTEN unit_b"],
    ["BEGIN", "LISTEN unit_a", "COMMIT", "BEGIN", "LISTEN unit_b", "ROLLBACK"],
    ["LISTEN unit_a", "COMMIT", "select 1/0"],
    ["LISTEN unit_a", "LISTEN unit_b", "COMMIT", "UNLISTEN unit_a", "select 1/0"],
]


@pytest.mark.parametrize("statements", TRANSACTIONS_IN_ONE_UNIT, ids=lambda s: "+".join(
    w.split()[0].lower() for w in s))
def test_commit_and_rollback_inside_one_pipeline(srv, statements):
    """A COMMIT or ROLLBACK in the middle of a libpq pipeline ends a transaction there:
    the LISTENs before it settle with it, those after it belong to the next one. The
    channels heard are those Postgres listens on after the same statements. (Inside
    one multi-statement simple Query the LISTENs settle together, with a ROLLBACK if
    the Query ran one, else with its last transaction: the README's known difference.)"""
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as direct:
        wire.libpq_pipeline(direct, statements)
        expected = sorted(r[0] for r in direct.execute("select pg_listening_channels()"))
    with connect(srv) as conn:
        conn.execute("LISTEN unit_done")
        wire.libpq_pipeline(conn, statements)
        with connect(srv) as sender:
            sender.execute("NOTIFY unit_a; NOTIFY unit_b; NOTIFY unit_done")
        heard = []
        for n in conn.notifies(timeout=5):
            if n.channel == "unit_done":
                break
            heard.append(n.channel)
    assert sorted(heard) == expected


def send_while_the_backend_is_busy(srv, client: wire.RawClient, data: bytes) -> None:
    """Send ``data`` while another session's transaction holds the only backend, and
    end that transaction a moment later: what ``data`` asks for waits in the queue."""
    blocker = connect(srv)
    try:
        blocker.execute("begin")
        blocker.execute("select 1")
        client.send(data)
        time.sleep(0.3)
        blocker.execute("commit")
    finally:
        blocker.close()


def assert_hears(srv, listener: wire.RawClient, channel: str) -> None:
    """A notification on ``channel`` from another session reaches ``listener``."""
    with connect(srv) as sender:
        sender.execute("select pg_notify(%s, 'heard')", (channel,))
    note = listener.read_message()
    assert isinstance(note, be.NotificationResponse), note
    assert (note.channel, note.payload) == (channel, "heard")


def test_asyncpg_listeners(srv):
    async def main() -> list[str]:
        got: asyncio.Queue = asyncio.Queue()
        conns = [await asyncpg.connect(host="127.0.0.1", port=srv.port, user="postgres",
                                       password=PASSWORD, database="postgres", timeout=30)
                 for _ in range(5)]
        try:
            for conn in conns:
                await conn.add_listener("apg", lambda c, pid, ch, payload: got.put_nowait(payload))
            await conns[0].execute("NOTIFY apg, 'hi'")
            return [await asyncio.wait_for(got.get(), 5) for _ in conns]
        finally:
            for conn in conns:
                await conn.close()

    assert asyncio.run(main()) == ["hi"] * 5


def test_hub_backend_replaced_when_it_dies(srv):
    listener, sender = connect(srv), connect(srv)
    direct = psycopg.connect(srv.direct_dsn(), autocommit=True)
    try:
        listener.execute("LISTEN survives")
        killed = direct.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where application_name = 'pgfleet listen hub'").fetchall()
        assert killed and all(k == (True,) for k in killed)
        deadline = time.monotonic() + 15
        while True:
            sender.execute("NOTIFY survives, 'again'")
            got = received(listener, timeout=0.5)
            if got:
                assert set(got) == {("survives", "again")}
                break
            assert time.monotonic() < deadline, "the hub never listened again"
    finally:
        listener.close()
        sender.close()
        direct.close()
