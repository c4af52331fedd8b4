"""One firehose load process: its share of the connections, churn and queries.

Open loop: every 10 ms the process works out how many connections it should hold
(ramping up linearly), how many it should have churned and how many queries it should
have sent since the start, and catches up. A query goes to a random idle held
connection; when none is idle the query is counted as skipped, not queued, so a slow
server shows up as latency and skips instead of as a slower offered load.

Each second the process sends a :class:`~bench.firehose.stats.Second` (as a dict) to
the parent over a pipe, and a final ``{"done": ...}`` message after closing everything.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import random
import resource
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from gateway import gc_policy

from .proto import ConnectionLost, Credentials, PgConnection, PgError, extended_query
from .stats import Second, bucket

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TICK = 0.01
READ_SQL = "SELECT id, conn, at, payload FROM firehose_events WHERE id = $1"
WRITE_SQL = "INSERT INTO firehose_events (conn, at, payload) VALUES ($1, now(), $2)"
PAYLOAD = "firehose-" + "x" * 55


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything one process needs; picklable."""

    index: int
    host: str
    port: int
    creds: Credentials
    connections: int
    churn: float  # closes (and so reopens) per second, after the ramp
    qps: float
    write_ratio: float
    ramp: float
    duration: int
    t0: float  # time.monotonic() at which second 0 starts (same clock in every process)
    hard_deadline: float  # monotonic: exit by then, whatever is left
    source_ips: tuple[str, ...]
    connect_timeout: float
    query_timeout: float
    max_pending: int  # connection attempts in flight at once
    read_max_id: int
    seed: int


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _sock_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple) -> None:
    """Non-blocking connect to an IP address. ``loop.sock_connect`` would first run
    getaddrinfo on uvloop's thread pool (it skips its numeric fast path for a socket
    type of 0): a thread handoff per connection, a fifth of the generator's CPU."""
    try:
        sock.connect(addr)
        return
    except BlockingIOError:
        pass
    fd = sock.fileno()
    writable = loop.create_future()
    loop.add_writer(fd, _wake, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _wake(fut: asyncio.Future) -> None:
    """The socket is writable. The connect may have been cancelled (a churn closing it,
    a timeout) by a callback that ran earlier in the same loop turn, before its
    ``finally`` could remove this writer: then there is no one left to wake."""
    if not fut.done():
        fut.set_result(None)


def _os_kind(exc: OSError) -> str:
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no free source port (EADDRNOTAVAIL)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc}"


class Worker:
    """The state of one load process (single-threaded, one event loop)."""

    def __init__(self, plan: WorkerPlan, pipe: Connection) -> None:
        self.plan = plan
        self.pipe = pipe
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(plan.seed)
        self.conns: set[PgConnection] = set()  # logged in, held
        self.idle: list[PgConnection] = []  # held and not busy; conn.tag = index here
        self.busy: dict[PgConnection, float] = {}  # conn -> monotonic send time
        self.pending: set[asyncio.Task] = set()  # connection attempts
        self.issued = 0
        self.churned = 0
        self.serial = 0
        self.next_ip = plan.index
        self.stopping = False
        self.cur = Second(0)
        self._cpu = _cpu_seconds()
        self._cpu_at = time.monotonic()
        self._read = READ_SQL
        self._last_timeout_check = 0.0

    # ------------------------------------------------------------------ idle list

    def _idle_add(self, c: PgConnection) -> None:
        c.tag = len(self.idle)
        self.idle.append(c)

    def _idle_remove(self, c: PgConnection) -> None:
        i = c.tag
        if not isinstance(i, int) or i < 0:
            return
        last = self.idle.pop()
        if last is not c:
            self.idle[i] = last
            last.tag = i
        c.tag = -1

    def _idle_take(self) -> PgConnection:
        c = self.idle[self.rng.randrange(len(self.idle))]
        self._idle_remove(c)
        return c

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        plan = self.plan
        await asyncio.sleep(max(0.0, plan.t0 - time.monotonic()))
        self._cpu, self._cpu_at = _cpu_seconds(), time.monotonic()
        next_tick = plan.t0
        while True:
            next_tick += TICK
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            lag = now - next_tick
            if lag > 0.0:
                self.cur.lag_ms = max(self.cur.lag_ms, lag * 1000.0)
            if lag > 5 * TICK:
                next_tick = now  # do not replay a stall as a burst of ticks
            el = now - plan.t0
            while int(el) > self.cur.sec and self.cur.sec < plan.duration - 1:
                self._roll(now)
            if el >= plan.duration or now >= plan.hard_deadline:
                break
            self._drive(el, now)
        await self._drain()

    def _roll(self, now: float) -> None:
        """Close the current second: send it to the parent and start the next."""
        self._send_second(now)
        self.cur = Second(self.cur.sec + 1)

    def _send_second(self, now: float) -> None:
        cur = self.cur
        cur.held = len(self.conns)
        cur.inflight = len(self.pending)
        cpu = _cpu_seconds()
        wall = now - self._cpu_at
        if wall > 0:
            cur.cpu_pct = 100.0 * (cpu - self._cpu) / wall
        self._cpu, self._cpu_at = cpu, now
        self.pipe.send(cur.to_msg())

    def _drive(self, el: float, now: float) -> None:
        plan = self.plan
        if now - self._last_timeout_check >= 0.1:
            self._last_timeout_check = now
            self._check_timeouts(now)
        # Churn: close idle held connections; the ramp logic below reopens them.
        if plan.churn > 0 and el >= plan.ramp:
            due = int(plan.churn * (el - plan.ramp)) - self.churned
            if due > plan.churn + 1:  # more than a second behind: forget the excess
                self.churned += due - int(plan.churn + 1)
                due = int(plan.churn + 1)
            while due > 0 and self.idle:
                c = self._idle_take()
                self.conns.discard(c)
                c.close()
                self.churned += 1
                self.cur.closed += 1
                due -= 1
        # Connections: hold the ramp's target, with a bounded number of attempts in flight.
        if plan.ramp > 0:
            target = min(plan.connections, math.ceil(plan.connections * el / plan.ramp))
        else:
            target = plan.connections
        want = min(target - len(self.conns) - len(self.pending), plan.max_pending - len(self.pending))
        for _ in range(want):
            task = self.loop.create_task(self._connect())
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        # Queries: catch up with qps * elapsed; no idle connection means skipped.
        due = int(plan.qps * el) - self.issued
        if due > plan.qps + 1:
            self.cur.skipped += due - int(plan.qps + 1)
            self.issued += due - int(plan.qps + 1)
            due = int(plan.qps + 1)
        for _ in range(max(0, due)):
            self.issued += 1
            if not self.idle:
                self.cur.skipped += 1
                continue
            c = self._idle_take()
            if self.rng.random() < plan.write_ratio:
                data = extended_query(WRITE_SQL, (str(c.ident), PAYLOAD))
            else:
                data = extended_query(self._read, (str(self.rng.randint(1, plan.read_max_id)),))
            self.busy[c] = time.monotonic()
            c.request(data, self._query_done)

    def _check_timeouts(self, now: float) -> None:
        limit = self.plan.query_timeout
        late = [c for c, t in self.busy.items() if now - t > limit]
        for c in late:
            c.abort(PgError(f"query timeout (no reply within {limit:g} s)"))

    # ------------------------------------------------------------------ callbacks

    def _failure(self, counter: dict, kind: str, detail: str) -> None:
        counter[kind] = counter.get(kind, 0) + 1
        if kind not in self.cur.samples:
            self.cur.samples[kind] = detail

    def _query_done(self, c: PgConnection, err: PgError | None) -> None:
        start = self.busy.pop(c, None)
        if start is None:
            return
        if err is None:
            self.cur.queries += 1
            b = bucket(time.monotonic() - start)
            self.cur.qlat[b] = self.cur.qlat.get(b, 0) + 1
        else:
            self._failure(self.cur.query_failures, err.kind, str(err))
        if c.closed or isinstance(err, ConnectionLost):
            self.conns.discard(c)
        elif c in self.conns:
            self._idle_add(c)

    def _on_lost(self, c: PgConnection, err: PgError) -> None:
        """A held idle connection was closed by the server."""
        self._idle_remove(c)
        if c in self.conns:
            self.conns.discard(c)
            self._failure(self.cur.drops, err.kind, str(err))

    async def _connect(self) -> None:
        plan = self.plan
        self.serial += 1
        ip = plan.source_ips[self.next_ip % len(plan.source_ips)]
        self.next_ip += 1
        start = time.monotonic()
        fut: asyncio.Future[PgError | None] = self.loop.create_future()

        def on_login(_c: PgConnection, err: PgError | None) -> None:
            if not fut.done():
                fut.set_result(err)

        conn = PgConnection(plan.creds, on_login, self._on_lost)
        conn.ident = plan.index * 10_000_000 + self.serial % 10_000_000
        sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # Port chosen at connect() time, per destination: TIME_WAIT sockets of other
            # source addresses and destinations do not use up this address's ports.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((ip, 0))
            async with asyncio.timeout(plan.connect_timeout):
                await _sock_connect(self.loop, sock, (plan.host, plan.port))
                await self.loop.create_connection(lambda: conn, sock=sock)
                sock = None  # the transport owns it now
                err = await fut
        except TimeoutError:
            conn.abort(PgError("timeout"))
            err = PgError(f"connect timeout (no login within {plan.connect_timeout:g} s)")
        except OSError as exc:
            err = PgError(_os_kind(exc))
        except asyncio.CancelledError:
            conn.abort(PgError("cancelled"))
            raise
        finally:
            if sock is not None:
                sock.close()
        if err is not None:
            if isinstance(err, ConnectionLost) and not err.code:
                err = PgError(f"login failed: {err.message}")
            self._failure(self.cur.connect_failures, err.kind, str(err))
            return
        self.cur.opened += 1
        b = bucket(time.monotonic() - start)
        self.cur.clat[b] = self.cur.clat.get(b, 0) + 1
        if self.stopping or conn.closed:
            conn.close()
            return
        self.conns.add(conn)
        self._idle_add(conn)

    # ------------------------------------------------------------------ end

    async def _drain(self) -> None:
        """Stop new work, let queries in flight finish (bounded), close everything."""
        self.stopping = True
        for task in list(self.pending):
            task.cancel()
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=2.0)
        limit = min(time.monotonic() + self.plan.query_timeout, self.plan.hard_deadline)
        while self.busy and time.monotonic() < limit:
            await asyncio.sleep(0.02)
        self._check_timeouts(time.monotonic() + self.plan.query_timeout + 1)
        now = time.monotonic()
        held = len(self.conns)
        self._send_second(now)
        self.cur.held = held
        for c in list(self.conns):
            c.close()
        self.conns.clear()
        self.idle.clear()
        self.pipe.send({"done": self.plan.index})
        await asyncio.sleep(0.05)  # let the Terminate messages go out


def main(plan: WorkerPlan, pipe: Connection) -> None:
    """Process entry point: run the plan on a fresh uvloop, report a crash to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    raise_nofile_limit()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        loop.run_until_complete(_run(plan, pipe))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        code = 1
        try:
            pipe.send({"crash": plan.index, "error": traceback.format_exc()})
        except OSError:
            pass
    finally:
        pipe.close()
        # Skip closing thousands of transports one by one at interpreter exit.
        os._exit(code)


async def _run(plan: WorkerPlan, pipe: Connection) -> None:
    # The generator holds thousands of connections under churn, as a worker does: its
    # own full GC pauses would show up as pgfleet's latency (see gateway.gc_policy).
    gc_policy.apply(asyncio.get_running_loop())
    await Worker(plan, pipe).run()
