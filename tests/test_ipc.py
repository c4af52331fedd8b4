from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import tempfile
import time
import traceback

import orjson
import posix_ipc
import pytest
import uvloop

from ipc.cancel_table import CLIENT_PID_BASE, CancelTable, new_secret
from ipc.channel import Channel, connect, serve
from ipc.codec import MAX_MESSAGE, Decoder, IpcError, encode

# ---------------------------------------------------------------------------
# helpers


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request):
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro):
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 30))

    return runner


class Inbox:
    """Collects (msg, fds) from a Channel and lets a test await a count."""

    def __init__(self) -> None:
        self.items: list[tuple[dict, list[int]]] = []
        self.closed = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._close_waiters: list[asyncio.Future] = []

    def on_message(self, msg: dict, fds: list[int]) -> None:
        self.items.append((msg, fds))
        for n, fut in list(self._waiters):
            if len(self.items) >= n and not fut.done():
                fut.set_result(None)

    def on_close(self) -> None:
        self.closed += 1
        for fut in self._close_waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, n: int, timeout: float = 10) -> None:
        if len(self.items) >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await asyncio.wait_for(fut, timeout)

    async def wait_closed(self, timeout: float = 10) -> None:
        if self.closed:
            return
        fut = asyncio.get_running_loop().create_future()
        self._close_waiters.append(fut)
        await asyncio.wait_for(fut, timeout)

    @property
    def msgs(self) -> list[dict]:
        return [m for m, _ in self.items]


def pipe_with(data: bytes) -> int:
    """Read end of a pipe that holds ``data`` and whose write end is closed."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ---------------------------------------------------------------------------
# codec


def test_codec_roundtrip():
    msgs = [{}, {"op": "lease", "db": "app", "n": 3}, {"u": "héllo ✓", "nested": {"a": [1, 2.5]}}]
    dec = Decoder()
    for m in msgs:
        wire = encode(m)
        assert struct.unpack(">I", wire[:4])[0] == len(wire) - 4
        dec.feed(wire)
        assert dec.next() == (m, [])
        assert dec.next() is None
    assert dec.buffered == 0


def test_codec_byte_by_byte():
    msgs = [{"i": i, "pad": "x" * i} for i in range(20)]
    wire = b"".join(encode(m) for m in msgs)
    dec = Decoder()
    got = []
    for i in range(len(wire)):
        dec.feed(wire[i : i + 1])
        item = dec.next()
        if item is not None:
            got.append(item[0])
            assert dec.next() is None
    assert got == msgs


def test_codec_coalesced():
    msgs = [{"i": i} for i in range(1000)]
    wire = b"".join(encode(m) for m in msgs)
    dec = Decoder()
    # Odd-sized chunks so message boundaries fall inside chunks.
    got = []
    for i in range(0, len(wire), 997):
        dec.feed(wire[i : i + 997])
        while (item := dec.next()) is not None:
            got.append(item[0])
    assert got == msgs
    assert dec.buffered == 0


def test_codec_oversize():
    with pytest.raises(IpcError):
        encode({"blob": "x" * MAX_MESSAGE})
    dec = Decoder()
    dec.feed(struct.pack(">I", MAX_MESSAGE + 1))  # header alone is enough to reject
    with pytest.raises(IpcError):
        dec.next()
    # exactly MAX_MESSAGE is fine
    body = b'{"b":"' + b"y" * (MAX_MESSAGE - 8) + b'"}'
    assert len(body) == MAX_MESSAGE
    dec = Decoder()
    dec.feed(struct.pack(">I", len(body)) + body)
    msg, fds = dec.next()
    assert len(msg["b"]) == MAX_MESSAGE - 8 and fds == []


@pytest.mark.parametrize(
    "body",
    [
        b"[1,2]",
        b"42",
        b'"s"',
        b"null",
        b"{not json",
        b"",
        b'{"nfds":-1}',
        b'{"nfds":true}',
        b'{"nfds":"1"}',
        b'{"nfds":1000}',
    ],
)
def test_codec_rejects_bad_messages(body):
    dec = Decoder()
    dec.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(IpcError):
        dec.next()


def test_codec_rejects_non_dict_and_unencodable():
    with pytest.raises(IpcError):
        encode([1, 2])  # type: ignore[arg-type]
    with pytest.raises(IpcError):
        encode({"x": object()})


def test_codec_fd_queue_ordering():
    a = encode({"m": "a", "nfds": 2})
    b = encode({"m": "b"})
    c = encode({"m": "c", "nfds": 1})
    d = encode({"m": "d", "nfds": 0})
    dec = Decoder()
    # fds arrive with the chunk holding their message's first byte
    dec.feed(a[:3], [101, 102])
    assert dec.next() is None
    dec.feed(a[3:] + b + c[:1], [103])
    assert dec.next() == ({"m": "a", "nfds": 2}, [101, 102])
    assert dec.next() == ({"m": "b"}, [])
    assert dec.next() is None
    assert dec.pending_fds == 1
    dec.feed(c[1:] + d)
    assert dec.next() == ({"m": "c", "nfds": 1}, [103])
    assert dec.next() == ({"m": "d", "nfds": 0}, [])
    assert dec.pending_fds == 0


def test_codec_missing_fds_is_error():
    dec = Decoder()
    dec.feed(encode({"nfds": 2}), [5])
    with pytest.raises(IpcError):
        dec.next()


def test_codec_close_pending_fds():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        dec = Decoder()
        dec.feed(encode({"x": 1})[:2], [r1, r2])
        dec.close_pending_fds()
        assert not fd_is_open(r1) and not fd_is_open(r2)
        assert dec.pending_fds == 0
    finally:
        os.close(w1)
        os.close(w2)


# ---------------------------------------------------------------------------
# channel


def test_channel_messages_both_ways(run):
    async def main():
        a, b = socket.socketpair()
        ia, ib = Inbox(), Inbox()
        ca = Channel(a, ia.on_message, ia.on_close)
        cb = Channel(b, ib.on_message, ib.on_close)
        ca.send({"hello": "from a"})
        cb.send({"hello": "from b", "n": [1, 2, 3]})
        ca.send({"second": True})
        await ib.wait(2)
        await ia.wait(1)
        assert ib.msgs == [{"hello": "from a"}, {"second": True}]
        assert ia.msgs == [{"hello": "from b", "n": [1, 2, 3]}]
        ca.close()
        cb.close()
        ca.close()  # idempotent
        assert ca.closed and cb.closed
        assert ia.closed == 0 and ib.closed == 0  # explicit close() does not call on_close
        with pytest.raises(IpcError):
            ca.send({"late": 1})

    run(main())


def test_channel_passes_fds(run):
    async def main():
        a, b = socket.socketpair()
        ia, ib = Inbox(), Inbox()
        ca = Channel(a, ia.on_message, ia.on_close)
        cb = Channel(b, ib.on_message, ib.on_close)

        # a pipe's read end: write on the original write end, read on the received fd
        r, w = os.pipe()
        ca.send({"kind": "pipe"}, [r])
        os.close(r)  # the caller may close its copy as soon as send() returns

        # one end of a socketpair
        s1, s2 = socket.socketpair()
        ca.send({"kind": "sock"}, [s1.fileno()])
        s1.close()

        await ib.wait(2)
        (m1, fds1), (m2, fds2) = ib.items
        assert m1 == {"kind": "pipe", "nfds": 1} and len(fds1) == 1
        assert m2 == {"kind": "sock", "nfds": 1} and len(fds2) == 1
        # received fds are close-on-exec
        assert not os.get_inheritable(fds1[0])

        os.write(w, b"through the pipe")
        os.close(w)
        assert read_all(fds1[0]) == b"through the pipe"
        os.close(fds1[0])

        received = socket.socket(fileno=fds2[0])
        s2.sendall(b"ping")
        assert received.recv(16) == b"ping"
        received.sendall(b"pong")
        assert s2.recv(16) == b"pong"
        received.close()
        s2.close()

        # several fds in one message, both directions
        pipes = [pipe_with(f"p{i}".encode()) for i in range(5)]
        cb.send({"kind": "many"}, pipes)
        for fd in pipes:
            os.close(fd)
        await ia.wait(1)
        msg, fds = ia.items[0]
        assert msg["nfds"] == 5
        assert [read_all(fd) for fd in fds] == [f"p{i}".encode() for i in range(5)]
        for fd in fds:
            os.close(fd)
        ca.close()
        cb.close()

    run(main())


def test_channel_send_validation(run):
    async def main():
        a, b = socket.socketpair()
        ca = Channel(a, lambda m, f: None, lambda: None)
        with pytest.raises(IpcError):
            ca.send({"nfds": 1})  # announces fds it does not pass
        with pytest.raises(IpcError):
            ca.send({"x": 1}, list(range(100)))  # too many fds
        msg = {"x": 1}
        r, w = os.pipe()
        ca.send(msg, [r])
        assert msg == {"x": 1}  # caller's dict not mutated
        os.close(r)
        os.close(w)
        ca.close()
        b.close()

    run(main())


def test_channel_server_many_messages_in_order(run):
    n = 10_000

    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "pool.sock")
            # a stale socket file left behind by a dead server
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(path)
            stale.close()
            assert os.path.exists(path)

            server_inbox = Inbox()
            server_channels: list[Channel] = []

            def on_channel(ch: Channel):
                server_channels.append(ch)
                ch.send({"welcome": True})

                def on_message(msg, fds):
                    server_inbox.on_message(msg, fds)
                    ch.send({"echo": msg["i"]})

                return on_message, server_inbox.on_close

            server = await serve(path, on_channel)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            client_inbox = Inbox()
            client = await connect(path, client_inbox.on_message, client_inbox.on_close)
            for i in range(n):
                client.send({"i": i})
            await server_inbox.wait(n)
            await client_inbox.wait(n + 1)
            assert [m["i"] for m in server_inbox.msgs] == list(range(n))
            assert client_inbox.msgs[0] == {"welcome": True}
            assert [m["echo"] for m in client_inbox.msgs[1:]] == list(range(n))

            # peer close -> on_close once on the other side
            client.close()
            await server_inbox.wait_closed()
            await asyncio.sleep(0.05)
            assert server_inbox.closed == 1
            assert server_channels[0].closed
            assert client_inbox.closed == 0

            server.close()
            assert not os.path.exists(path)
            server.close()  # idempotent

    run(main())


def test_channel_burst_with_backpressure_and_fds(run):
    count = 3000
    payload = "z" * 1000

    async def main():
        before = open_fds()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ib = Inbox()
        ca = Channel(a, lambda m, f: None, lambda: None)
        cb = Channel(b, ib.on_message, ib.on_close)

        expected_fd_data = {}
        max_pending = 0
        queued_fd_msgs = 0
        for i in range(count):
            if i % 50 == 0:
                queued_fd_msgs += ca.pending > 0
                fds = [pipe_with(f"msg{i}-fd{j}".encode()) for j in range(1 + i % 3)]
                expected_fd_data[i] = [f"msg{i}-fd{j}".encode() for j in range(1 + i % 3)]
                ca.send({"i": i, "p": payload}, fds)
                for fd in fds:
                    os.close(fd)  # safe even if the message was queued (dups)
            else:
                ca.send({"i": i, "p": payload})
            max_pending = max(max_pending, ca.pending)
        # the kernel buffer is tiny, so most of the burst must have been queued
        assert max_pending > 100_000
        assert queued_fd_msgs > 10  # fds had to be dup'ed and sent later

        await ib.wait(count)
        assert ca.pending == 0
        assert [m["i"] for m in ib.msgs] == list(range(count))
        assert all(m["p"] == payload for m in ib.msgs)
        for msg, fds in ib.items:
            i = msg["i"]
            if i in expected_fd_data:
                assert [read_all(fd) for fd in fds] == expected_fd_data[i]
                for fd in fds:
                    os.close(fd)
            else:
                assert fds == [] and "nfds" not in msg
        ca.close()
        cb.close()
        assert open_fds() == before

    run(main())


def test_channel_close_with_queued_fds_does_not_leak(run):
    async def main():
        before = open_fds()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ca = Channel(a, lambda m, f: None, lambda: None)
        for i in range(200):
            fd = pipe_with(b"x")
            ca.send({"i": i, "p": "q" * 2000}, [fd])
            os.close(fd)
        assert ca.pending > 0
        ca.close()
        b.close()
        assert open_fds() == before

    run(main())


def test_channel_peer_close_calls_on_close_once(run):
    async def main():
        a, b = socket.socketpair()
        ia = Inbox()
        ca = Channel(a, ia.on_message, ia.on_close)
        b.sendall(encode({"last": "words"}))
        b.close()
        await ia.wait_closed()
        await asyncio.sleep(0.05)
        assert ia.msgs == [{"last": "words"}]
        assert ia.closed == 1
        assert ca.closed
        with pytest.raises(IpcError):
            ca.send({"x": 1})
        ca.close()
        assert ia.closed == 1

    run(main())


def test_channel_send_to_dead_peer(run):
    async def main():
        a, b = socket.socketpair()
        ia = Inbox()
        ca = Channel(a, ia.on_message, ia.on_close)
        b.close()
        try:
            for _ in range(10):
                ca.send({"x": 1})
        except IpcError:
            pass
        await ia.wait_closed()
        await asyncio.sleep(0.05)
        assert ia.closed == 1 and ca.closed

    run(main())


def test_channel_callback_exception_does_not_kill_reader(run, caplog):
    async def main():
        a, b = socket.socketpair()
        inbox = Inbox()

        def on_message(msg, fds):
            if msg.get("boom"):
                raise RuntimeError("callback failure")
            inbox.on_message(msg, fds)

        ca = Channel(a, lambda m, f: None, lambda: None)
        cb = Channel(b, on_message, inbox.on_close)
        ca.send({"boom": True})
        ca.send({"ok": 1})
        ca.send({"boom": True})
        ca.send({"ok": 2})
        await inbox.wait(2)
        assert inbox.msgs == [{"ok": 1}, {"ok": 2}]
        assert not cb.closed
        ca.close()
        cb.close()

    with caplog.at_level(logging.ERROR, logger="pgfleet.ipc"):
        run(main())
    errors = [r for r in caplog.records if r.exc_info]
    assert len(errors) == 2
    assert all(r.name == "pgfleet.ipc" for r in errors)


def test_channel_framing_error_closes(run):
    async def main():
        before = open_fds()
        a, b = socket.socketpair()
        ia = Inbox()
        ca = Channel(a, ia.on_message, ia.on_close)
        # a good message, then an oversize header
        b.sendall(encode({"ok": 1}) + struct.pack(">I", MAX_MESSAGE + 10) + b"{}")
        await ia.wait_closed()
        assert ia.msgs == [{"ok": 1}]
        assert ca.closed and ia.closed == 1
        b.close()
        assert open_fds() == before

    run(main())


def test_channel_on_message_may_close(run):
    async def main():
        a, b = socket.socketpair()
        got = []
        holder: list[Channel] = []

        def on_message(msg, fds):
            got.append(msg)
            holder[0].close()

        ca = Channel(a, lambda m, f: None, lambda: None)
        holder.append(Channel(b, on_message, lambda: None))
        # three messages arrive in one read: only the first is dispatched
        ca.send({"n": 1})
        ca.send({"n": 2})
        ca.send({"n": 3})
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert got == [{"n": 1}]
        ca.close()

    run(main())


def test_connect_refused(run):
    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            with pytest.raises(OSError):
                await connect(os.path.join(tmp, "nobody.sock"), lambda m, f: None, lambda: None)

    run(main())


def test_server_refuses_to_replace_regular_file(run):
    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "not-a-socket")
            with open(path, "w") as f:
                f.write("keep me")
            with pytest.raises(FileExistsError):
                await serve(path, lambda ch: (lambda m, f: None, lambda: None))
            with open(path) as f:
                assert f.read() == "keep me"

    run(main())


# ---------------------------------------------------------------------------
# cancel table


def in_child(fn) -> object:
    """Run fn() in a forked child; return its (orjson-able) result or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                out = {"ok": fn()}
            except BaseException:
                out = {"error": traceback.format_exc()}
                code = 1
            os.write(w, orjson.dumps(out))
            os.close(w)
        finally:
            os._exit(code)
    os.close(w)
    data = read_all(r)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = orjson.loads(data)
    if "error" in result:
        raise AssertionError("child failed:\n" + result["error"])
    assert os.waitstatus_to_exitcode(status) == 0
    return result["ok"]


@pytest.fixture
def table_name():
    name = f"/pgfleet-test-cancel-{os.getpid()}-{time.monotonic_ns()}"
    try:
        yield name
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def test_new_secret():
    values = {new_secret() for _ in range(1000)}
    assert 0 not in values
    assert all(0 < v <= 0xFFFFFFFF for v in values)
    assert len(values) > 990


def test_forked_workers_never_share_secrets():
    """Secrets come from a per-process batch: a worker forked after its parent drew
    one must not hand out the rest of the parent's batch."""
    new_secret()  # the parent now holds a partly used batch
    children = [in_child(lambda: [new_secret() for _ in range(20)]) for _ in range(2)]
    parent = [new_secret() for _ in range(20)]
    assert not set(children[0]) & set(children[1])
    assert not set(parent) & (set(children[0]) | set(children[1]))


def test_cancel_table_cross_process(table_name):
    table = CancelTable.create(table_name, 64)
    try:
        assert table.slots == 64
        secret_parent = new_secret()
        parent_pid = table.claim(0, secret_parent)
        table.set_backend(0, 4242, 0xDEADBEEF)

        def child():
            t = CancelTable.attach(table_name)
            try:
                seen = t.lookup(parent_pid, secret_parent)
                part = t.partition(1, 2)
                slot = part.start + 3
                cpid = t.claim(slot, 0x12345678)
                t.set_backend(slot, 777, 0xCAFEBABE)
                idle_pid = t.claim(slot + 1, 99)
                return {"seen": list(seen), "cpid": cpid, "idle_pid": idle_pid}
            finally:
                t.close()

        res = in_child(child)
        assert res["seen"] == [4242, 0xDEADBEEF]
        assert res["cpid"] == CLIENT_PID_BASE + 32 + 3
        assert table.lookup(res["cpid"], 0x12345678) == (777, 0xCAFEBABE)
        assert table.lookup(res["cpid"], 0x12345679) is None  # wrong secret
        assert table.lookup(res["idle_pid"], 99) is None  # claimed but idle
        assert table.find_client_by_backend(777) == res["cpid"]
        assert table.find_client_by_backend(4242) == parent_pid
        assert table.find_client_by_backend(31337) is None
    finally:
        table.close()
        table.unlink()


def test_cancel_table_lifecycle(table_name):
    table = CancelTable.create(table_name, 10)
    try:
        # out-of-range / junk pids
        assert table.lookup(1234, 1) is None
        assert table.lookup(CLIENT_PID_BASE + 10, 1) is None
        assert table.lookup(CLIENT_PID_BASE - 1, 1) is None
        # unused slot: secret 0 never matches
        assert table.lookup(CLIENT_PID_BASE + 2, 0) is None

        pid = table.claim(2, 555)
        assert pid == CLIENT_PID_BASE + 2
        assert table.lookup(pid, 555) is None  # idle
        table.set_backend(2, 100, 200)
        assert table.lookup(pid, 555) == (100, 200)
        assert table.lookup(pid, 556) is None
        table.set_backend(2, 0, 0)  # back to idle, still claimed
        assert table.lookup(pid, 555) is None
        assert table.find_client_by_backend(100) is None
        table.set_backend(2, 101, 201)
        assert table.lookup(pid, 555) == (101, 201)
        table.release(2)
        assert table.lookup(pid, 555) is None
        assert table.find_client_by_backend(101) is None

        # signed int32 spellings of secrets are the same 32-bit value
        pid = table.claim(3, -2)
        table.set_backend(3, 300, -1)
        assert table.lookup(pid, 0xFFFFFFFE) == (300, 0xFFFFFFFF)
        assert table.lookup(pid, -2) == (300, 0xFFFFFFFF)

        # the worker's hot path: serve changes the backend and keeps the client's secret
        pid = table.claim(5, 0xFFFFFFF0)
        table.serve(5, 500, 600)
        assert table.lookup(pid, 0xFFFFFFF0) == (500, 600)
        assert table.holds(pid, 0xFFFFFFF0) and table.holds(pid, -16)  # (the int32 spelling)
        table.serve(5, 0, 0)
        assert table.lookup(pid, 0xFFFFFFF0) is None
        assert table.holds(pid, 0xFFFFFFF0)  # idle, still that client's
        assert not table.holds(pid, 0xFFFFFFF1)
        assert not table.holds(pid, 0)
        assert not table.holds(CLIENT_PID_BASE + 10, 0xFFFFFFF0)  # out of range
        table.release(5)
        assert not table.holds(pid, 0xFFFFFFF0)

        with pytest.raises(ValueError):
            table.claim(4, 0)
        with pytest.raises(IndexError):
            table.claim(10, 1)
        with pytest.raises(ValueError):
            table.set_backend(4, 1 << 32, 1)
    finally:
        table.close()
        table.unlink()


def test_cancel_table_partitions(table_name):
    table = CancelTable.create(table_name, 103)
    try:
        for workers in (1, 2, 3, 4, 7, 16, 103, 200):
            parts = [table.partition(i, workers) for i in range(workers)]
            flat = [s for p in parts for s in p]
            assert flat == list(range(103))  # contiguous, ordered, no overlap, full cover
            sizes = {len(p) for p in parts}
            assert max(sizes) - min(sizes) <= 1
        with pytest.raises(ValueError):
            table.partition(4, 4)
        with pytest.raises(ValueError):
            table.partition(0, 0)
    finally:
        table.close()
        table.unlink()


def test_cancel_table_reset_range(table_name):
    table = CancelTable.create(table_name, 20)
    try:
        pids = {}
        for slot in range(20):
            pids[slot] = table.claim(slot, slot + 1)
            table.set_backend(slot, 1000 + slot, 2000 + slot)
        part = table.partition(1, 2)
        assert part == range(10, 20)
        table.reset_range(part)
        for slot in range(20):
            got = table.lookup(pids[slot], slot + 1)
            if slot in part:
                assert got is None
                assert table.find_client_by_backend(1000 + slot) is None
            else:
                assert got == (1000 + slot, 2000 + slot)
                assert table.find_client_by_backend(1000 + slot) == pids[slot]
        with pytest.raises(IndexError):
            table.reset_range(range(15, 25))
    finally:
        table.close()
        table.unlink()


def test_cancel_table_seqlock_never_torn(table_name):
    """A child rewrites one slot as fast as it can; the parent must only see consistent pairs."""
    table = CancelTable.create(table_name, 4)
    try:
        pid = table.claim(1, 77)
        table.set_backend(1, 1, 1 ^ 0x5A5A5A5A)
        deadline = time.monotonic() + 0.5

        def child():
            t = CancelTable.attach(table_name)
            i = 1
            while time.monotonic() < deadline:
                i = i % 1_000_000 + 1
                t.set_backend(1, i, i ^ 0x5A5A5A5A)
            t.close()
            return i

        r, w = os.pipe()
        child_pid = os.fork()
        if child_pid == 0:
            try:
                os.close(r)
                child()
            finally:
                os._exit(0)
        os.close(w)
        os.close(r)
        reads = 0
        while time.monotonic() < deadline:
            got = table.lookup(pid, 77)
            if got is not None:
                bpid, bsecret = got
                assert bsecret == bpid ^ 0x5A5A5A5A
                reads += 1
        _, status = os.waitpid(child_pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert reads > 100
    finally:
        table.close()
        table.unlink()


def test_cancel_table_create_replaces_stale_and_unlink(table_name):
    stale = CancelTable.create(table_name, 8)
    stale.claim(0, 5)
    stale.set_backend(0, 9, 9)
    stale.close()
    # a new supervisor recreates the table from scratch
    table = CancelTable.create(table_name, 16)
    try:
        assert table.slots == 16
        assert table.lookup(CLIENT_PID_BASE, 5) is None
        other = CancelTable.attach(table_name.lstrip("/"))  # leading slash optional
        assert other.slots == 16
        other.close()
        other.close()  # idempotent
    finally:
        table.close()
        table.unlink()
        table.unlink()  # idempotent
    with pytest.raises(posix_ipc.ExistentialError):
        CancelTable.attach(table_name)


def test_cancel_table_attach_validates_header(table_name):
    shm = posix_ipc.SharedMemory(table_name, posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    with pytest.raises(IpcError):
        CancelTable.attach(table_name)
