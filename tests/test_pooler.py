"""The pooler seen from a worker's side: a test plays a gateway worker on the real IPC socket.

Backends are real Postgres connections whose sockets arrive over SCM_RIGHTS; the
test talks to them with the project's own pgwire codec.
"""

from __future__ import annotations

import array
import socket
import time

import psycopg
import pytest

from ipc.codec import Decoder, encode
from ipc.statement_catalog import StatementCatalog
from pgwire import backend as be
from pgwire import frontend as fe
from pgwire.framing import MessageFramer
from supervisor.config import Config


class FakeWorker:
    """A blocking IPC client speaking the worker protocol to the pooler."""

    def __init__(self, path: str, index: int = 99) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.decoder = Decoder()
        self.req = 0
        self.send({"op": "hello", "worker": index})

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode(msg))

    def recv(self, op: str) -> tuple[dict, list[int]]:
        while True:
            got = self.decoder.next()
            if got is not None:
                msg, fds = got
                if msg.get("op") == op:
                    return msg, fds
                continue
            fds = array.array("i")
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            if not data:
                raise EOFError("pooler closed the channel")
            self.decoder.feed(data, list(fds))

    def lease(self, db: str = "postgres", user: str = "postgres") -> tuple[dict, socket.socket]:
        self.req += 1
        self.send({"op": "lease", "reqs": [self.req], "db": db, "user": user})
        msg, fds = self.recv("leased")
        assert len(fds) == 1
        return msg, socket.socket(fileno=fds[0])

    def close(self) -> None:
        self.sock.close()


def query(sock: socket.socket, sql: str) -> list[list[bytes | None]]:
    """Run a simple query on a leased backend socket; return its rows."""
    sock.settimeout(15)
    sock.sendall(fe.encode_query(sql))
    framer = MessageFramer(frontend=False)
    rows: list[list[bytes | None]] = []
    while True:
        m = framer.next_message()
        if m is None:
            data = sock.recv(65536)
            assert data, "backend closed"
            framer.feed(data)
            continue
        mtype, payload, _ = m
        if mtype == ord("D"):
            rows.append(be.decode_backend(mtype, payload).values)
        elif mtype == ord("E"):
            raise AssertionError(be.decode_backend(mtype, payload).message)
        elif mtype == ord("Z"):
            return rows


@pytest.fixture
def worker(server):
    w = FakeWorker(str(server.home / "ipc" / "pooler.sock"))
    yield w
    w.close()


def test_lease_passes_a_working_backend_socket(worker, server):
    msg, sock = worker.lease()
    try:
        assert msg["pid"] > 0 and "server_version" in msg["params"]
        assert query(sock, "select pg_backend_pid()") == [[str(msg["pid"]).encode()]]
    finally:
        worker.send({"op": "release", "id": msg["id"], "state": "clean"})
        sock.close()


def test_dirty_backend_is_reset_before_reuse(worker, server):
    catalog = StatementCatalog.attach(Config(home=server.home).statement_catalog_name)
    msg, sock = worker.lease()
    assert msg["slot"] >= 0
    query(sock, "set application_name = 'left-dirty'")
    query(sock, "prepare leftover as select 1")
    catalog.store(msg["slot"], [7])  # as a worker would before giving it back
    worker.send({"op": "release", "id": msg["id"], "state": "dirty"})
    sock.close()
    # Lease until we get that same backend again (pool size is 5).
    held = []
    try:
        for _ in range(10):
            m2, s2 = worker.lease()
            held.append((m2, s2))
            if m2["pid"] == msg["pid"]:
                assert query(s2, "show application_name") == [[b""]]
                assert query(s2, "select count(*) from pg_prepared_statements") == [[b"0"]]
                assert catalog.load(m2["slot"]) == [] and m2["applied"] == {}
                break
        else:
            pytest.fail("the reset backend never came back")
    finally:
        for m2, s2 in held:
            worker.send({"op": "release", "id": m2["id"], "state": "clean"})
            s2.close()


def test_dead_worker_leases_are_closed(server):
    w = FakeWorker(str(server.home / "ipc" / "pooler.sock"))
    msg, sock = w.lease()
    query(sock, "begin; create temp table t_dead_worker(x int)")  # state we cannot know
    pid = msg["pid"]
    sock.close()
    w.close()  # the worker "dies" holding the lease
    deadline = time.monotonic() + 10
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            alive = conn.execute("select count(*) from pg_stat_activity where pid = %s",
                                 (pid,)).fetchone()[0]
            if alive == 0:
                break
            time.sleep(0.1)
        assert alive == 0, "the pooler kept the dead worker's backend"


def test_unknown_database_lease_fails_with_3d000(worker):
    worker.req += 1
    worker.send({"op": "lease", "reqs": [worker.req], "db": "no_such_db", "user": "postgres"})
    msg, _ = worker.recv("lease_failed")
    assert msg["error"]["C"] == "3D000"


def test_auth_lookup_sees_new_and_changed_roles(worker, server):
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        conn.execute("drop role if exists pooler_r1")
        worker.send({"op": "auth", "req": 1, "user": "pooler_r1", "db": "postgres"})
        msg, _ = worker.recv("auth_info")
        assert msg["role_exists"] is False
        conn.execute("create role pooler_r1 login password 'one'")
        worker.send({"op": "auth", "req": 2, "user": "pooler_r1", "db": "postgres"})
        first, _ = worker.recv("auth_info")
        assert first["role_exists"] and first["password"].startswith("SCRAM-SHA-256$")
        conn.execute("alter role pooler_r1 password 'two'")
        worker.send({"op": "auth", "req": 3, "user": "pooler_r1", "db": "postgres"})
        cached, _ = worker.recv("auth_info")
        assert cached["password"] == first["password"]  # served from the cache
        worker.send({"op": "invalidate", "user": "pooler_r1"})
        worker.send({"op": "auth", "req": 4, "user": "pooler_r1", "db": "postgres"})
        fresh, _ = worker.recv("auth_info")
        assert fresh["password"] != first["password"]
        conn.execute("drop role pooler_r1")


def test_a_replacement_backend_never_overlaps_the_one_it_replaces(make_server):
    """A lease given back 'dead' while its backend still runs a query: the pooler ends
    its input and counts it against the pool until the process is gone, so Postgres
    never has more backends than the pool size (what --max-backends checks)."""
    srv = make_server("--workers", "1", "--pool-size", "2")
    w = FakeWorker(str(srv.home / "ipc" / "pooler.sock"))
    held = []
    try:
        held = [w.lease(), w.lease()]
        (old, old_sock) = held.pop(0)
        old_sock.sendall(fe.encode_query("select pg_sleep(0.5)"))
        w.send({"op": "release", "id": old["id"], "state": "dead"})
        old_sock.close()
        held.append(w.lease())
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as conn:
            alive = conn.execute("select count(*) from pg_stat_activity where pid = %s",
                                 (old["pid"],)).fetchone()[0]
        assert alive == 0, "a new backend was opened while the old one still ran"
        new, new_sock = held[-1]
        assert query(new_sock, "select 1") == [[b"1"]]
    finally:
        for m, s in held:
            w.send({"op": "release", "id": m["id"], "state": "clean"})
            s.close()
        w.close()


def test_a_backend_given_back_goes_to_the_worker_short_of_its_share(make_server):
    """Two workers of one user on a pool of 2: A holds both and waits for a third, B
    waits for one. A is asked for its one backend above its fair share; the backend it
    gives back goes to B, not to A's own older request; then A's debt is replaced by
    what it owes now, nothing, rather than left to take more from A's sessions."""
    srv = make_server("--workers", "1", "--pool-size", "2")
    path = str(srv.home / "ipc" / "pooler.sock")
    a, b = FakeWorker(path, 90), FakeWorker(path, 91)
    held: list[tuple[dict, socket.socket]] = []
    try:
        held = [a.lease(), a.lease()]
        a.req += 1
        a.send({"op": "lease", "reqs": [a.req], "db": "postgres", "user": "postgres"})
        time.sleep(0.1)  # A's request is the older one
        b.req += 1
        b.send({"op": "lease", "reqs": [b.req], "db": "postgres", "user": "postgres"})
        ask, _ = a.recv("reclaim")
        while ask["debts"] == []:  # (asked before B's request arrived)
            ask, _ = a.recv("reclaim")
        assert ask["debts"] == [["postgres", "postgres", 1]]
        given, given_sock = held.pop()
        given_sock.close()
        a.send({"op": "release", "id": given["id"], "state": "clean"})
        got, fds = b.recv("leased")
        assert got["req"] == b.req and got["id"] == given["id"]
        b_sock = socket.socket(fileno=fds[0])
        held.append((got, b_sock))
        assert query(b_sock, "select 2") == [[b"2"]]
        after, _ = a.recv("reclaim")
        assert after["debts"] == []
    finally:
        for _, s in held:
            s.close()
        a.close()
        b.close()
