"""Fair per-user pools: max-min shares of the backend cap between users, per-user limits.

The end-to-end tests run a pgfleet of their own (``--pool-size 10 --workers 2
--user-limit capped=3``) with roles ``a``, ``b`` and ``capped``, real asyncpg clients,
and a side connection straight to Postgres that samples ``pg_stat_activity`` to see
which user holds how many backends. The greedy-user run lasts 30 s, far longer than
the starvation bound.

The scheduling choices themselves are pure functions of ``pooler.pool`` (water-filling
with limits, the tie order, the excess per holder, who is served next), tested here
on plain data.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import subprocess
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from pooler.pool import (
    STARVE_AFTER,
    Demand,
    LeaseRequest,
    PooledBackend,
    PoolManager,
    fair_excess,
    pick_user,
    tie_order,
    water_fill,
)

from .conftest import PGFLEET
from .test_pooler import FakeWorker
from .waiting import bounded

POOL_SIZE = 10
GREEDY_CLIENTS = 100
SMALL_CLIENTS = 5
RUN_SECONDS = 30.0
STARVATION_BOUND = 5.0  # longest a small user's client may go without a completed query
LIMIT = 3
PASSWORDS = {"a": "pw-a", "b": "pw-b", "capped": "pw-capped"}


def run(coro, timeout: float):
    """Run ``coro`` to completion, failing (never hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def fair_server(make_module_server):
    s = make_module_server("--pool-size", str(POOL_SIZE), "--workers", "2",
                           "--query-wait-timeout", "60", "--user-limit", f"capped={LIMIT}")

    async def setup() -> None:
        conn = await connect_direct(s)
        try:
            for user, pw in PASSWORDS.items():
                await conn.execute(f"create role {user} login password '{pw}'")
        finally:
            await conn.close()

    run(setup(), 30)
    return s


async def connect_direct(server) -> asyncpg.Connection:
    """Straight to the embedded Postgres over its Unix socket (trust), for side checks."""
    return await asyncpg.connect(host=server.socket_dir, port=5432, user="postgres",
                                 database="postgres", timeout=30)


async def connect_as(server, user: str) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=server.port, user=user,
                                 password=PASSWORDS[user], database="postgres", timeout=60)


class Sampler:
    """Counts client backends per user in pg_stat_activity every ``interval`` seconds."""

    def __init__(self, server, interval: float) -> None:
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int], int]] = []  # (time, per user, total)
        self.stop = asyncio.Event()

    async def run(self) -> None:
        direct = await connect_direct(self.server)
        try:
            while not self.stop.is_set():
                rows = await direct.fetch(
                    "select usename::text, count(*) from pg_stat_activity "
                    "where backend_type = 'client backend' and pid <> pg_backend_pid() "
                    "group by 1")
                per_user = {r[0]: r[1] for r in rows if r[0] is not None}
                total = sum(r[1] for r in rows)
                self.samples.append((time.monotonic(), per_user, total))
                try:
                    await asyncio.wait_for(self.stop.wait(), self.interval)
                except TimeoutError:
                    pass
        finally:
            await direct.close()

    def max_of(self, user: str) -> int:
        return max((s[1].get(user, 0) for s in self.samples), default=0)

    def max_total(self) -> int:
        return max((s[2] for s in self.samples), default=0)


async def sleeper(conn: asyncpg.Connection, until: float, done: list[float]) -> None:
    """Loop ``select pg_sleep(0.05)`` until ``until``, noting when each one completed."""
    while time.monotonic() < until:
        await conn.execute("select pg_sleep(0.05)", timeout=60)
        done.append(time.monotonic())


def pooler_stats(server) -> dict:
    w = FakeWorker(str(server.home / "ipc" / "pooler.sock"))
    try:
        w.send({"op": "stats", "req": 1})
        msg, _ = w.recv("stats")
        return msg
    finally:
        w.close()


# ------------------------------------------------------------------ end to end

def test_small_user_runs_concurrently_beside_a_greedy_one(fair_server):
    """A with 100 busy clients, B with 5, cap 10: B's 5 run at once, A keeps the rest,
    and no B client goes without progress for long."""
    sampler = Sampler(fair_server, 0.1)

    async def main():
        conns_a = await asyncio.gather(*(connect_as(fair_server, "a")
                                         for _ in range(GREEDY_CLIENTS)))
        conns_b = await asyncio.gather(*(connect_as(fair_server, "b")
                                         for _ in range(SMALL_CLIENTS)))
        side = asyncio.create_task(sampler.run())
        done_a = [[] for _ in conns_a]
        done_b = [[] for _ in conns_b]
        try:
            start = time.monotonic()
            until = start + RUN_SECONDS
            # A gets going first, so that it holds every backend when B arrives.
            tasks_a = [asyncio.create_task(sleeper(c, until, d))
                       for c, d in zip(conns_a, done_a, strict=True)]
            await asyncio.sleep(1.0)
            b_start = time.monotonic()
            tasks_b = [asyncio.create_task(sleeper(c, until, d))
                       for c, d in zip(conns_b, done_b, strict=True)]
            results = await asyncio.gather(*tasks_a, *tasks_b, return_exceptions=True)
            end = time.monotonic()
        finally:
            sampler.stop.set()
            await side
            await asyncio.gather(*(c.close(timeout=30) for c in (*conns_a, *conns_b)),
                                 return_exceptions=True)
        return results, done_a, done_b, b_start, end

    results, done_a, done_b, b_start, end = run(main(), timeout=RUN_SECONDS + 120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"

    for i, done in enumerate(done_b):
        marks = [b_start, *done, end]
        gap = max(b - a for a, b in itertools.pairwise(marks))
        assert gap < STARVATION_BOUND, \
            f"B client {i} went {gap:.1f} s without a completed query ({len(done)} done)"
    assert sum(map(len, done_a)) > 0

    summary = (f"max backends: a {sampler.max_of('a')}, b {sampler.max_of('b')}, "
               f"total {sampler.max_total()} over {len(sampler.samples)} samples")
    print(summary)
    assert len(sampler.samples) >= 20, summary
    # B's five ran at the same time at some point, and A held at least the rest at
    # some point; nobody ever went over the cap.
    assert sampler.max_of("b") == SMALL_CLIENTS, summary
    assert sampler.max_of("a") >= POOL_SIZE - SMALL_CLIENTS, summary
    assert sampler.max_total() <= POOL_SIZE, summary


def test_user_limit_caps_a_users_backends(fair_server):
    """20 busy clients of a user limited to 3 never hold more than 3 backends, although
    the pool has room; another user still gets backends meanwhile."""
    sampler = Sampler(fair_server, 0.05)

    async def main():
        conns = await asyncio.gather(*(connect_as(fair_server, "capped") for _ in range(20)))
        other = await connect_as(fair_server, "b")
        side = asyncio.create_task(sampler.run())
        done = [[] for _ in conns]
        try:
            until = time.monotonic() + 4.0
            tasks = [asyncio.create_task(sleeper(c, until, d))
                     for c, d in zip(conns, done, strict=True)]
            await asyncio.sleep(1.0)
            # The pool has room for b even while capped waits at its limit.
            other_pids = {await other.fetchval("select pg_backend_pid()", timeout=60)
                          for _ in range(3)}
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            sampler.stop.set()
            await side
            await asyncio.gather(*(c.close(timeout=30) for c in (*conns, other)),
                                 return_exceptions=True)
        return results, done, other_pids

    results, done, other_pids = run(main(), timeout=120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    assert all(done), "every capped client got its turn"
    assert other_pids
    summary = f"max capped backends {sampler.max_of('capped')} over {len(sampler.samples)} samples"
    print(summary)
    assert len(sampler.samples) >= 10, summary
    assert sampler.max_of("capped") == LIMIT, summary


def test_user_at_its_limit_waits_although_the_pool_has_room(make_server):
    """--user-limit solo=1: while one session of solo holds a backend in a transaction,
    another session of solo queues and gets 57014 after --query-wait-timeout, though
    the pool has room (another user is served meanwhile); it works once the first
    commits."""
    srv = make_server("--pool-size", "5", "--workers", "2", "--query-wait-timeout", "1",
                      "--user-limit", "solo=1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True, connect_timeout=10) as d:
        d.execute("create role solo login password 'pw-solo'")
    holder = psycopg.connect(srv.dsn(user="solo", password="pw-solo"), connect_timeout=10)
    waiter = psycopg.connect(srv.dsn(user="solo", password="pw-solo"), connect_timeout=10,
                             autocommit=True)
    try:
        holder.execute("select 1")  # opens a transaction: holds solo's only backend
        with pytest.raises(pg_errors.QueryCanceled) as info:
            bounded(lambda: waiter.execute("select 'never'"), 15, "the queued query")
        assert info.value.sqlstate == "57014"
        with psycopg.connect(srv.dsn(), connect_timeout=10, autocommit=True) as other:
            got = bounded(lambda: other.execute("select current_user").fetchone(), 15)
            assert got == ("postgres",)
        holder.commit()
        assert bounded(lambda: waiter.execute("select 'now'").fetchone(), 15) == ("now",)
    finally:
        holder.close()
        waiter.close()


def test_pooler_stats_report_users(fair_server):
    """The pooler's stats op reports held, waiting, share and limit per user."""

    async def main():
        conns = await asyncio.gather(*(connect_as(fair_server, "capped") for _ in range(6)))
        try:
            tasks = [asyncio.create_task(c.execute("select pg_sleep(1.5)", timeout=60))
                     for c in conns]
            await asyncio.sleep(0.7)
            stats = await asyncio.to_thread(pooler_stats, fair_server)
            await asyncio.gather(*tasks)
        finally:
            await asyncio.gather(*(c.close(timeout=30) for c in conns), return_exceptions=True)
        return stats

    stats = run(main(), timeout=60)
    capped = stats["users"]["capped"]
    assert capped["limit"] == LIMIT
    assert capped["held"] == LIMIT, stats
    assert capped["waiting"] == 3, stats
    assert capped["share"] == LIMIT, stats


# ------------------------------------------------------------------ the pure scheduling functions

def test_water_fill_splits_the_cap_max_min():
    assert water_fill(10, {"a": 100, "b": 5}) == {"a": 5, "b": 5}
    assert water_fill(10, {"a": 100, "b": 2, "c": 100}) == {"a": 4, "b": 2, "c": 4}
    assert water_fill(10, {"a": 3, "b": 4}) == {"a": 3, "b": 4}
    assert water_fill(10, {"a": 0, "b": 20}) == {"a": 0, "b": 10}
    # Leftover whole backends go to the smaller askers, then in the given order.
    assert water_fill(1, {"x": 1, "y": 1}) == {"x": 1, "y": 0}
    assert water_fill(1, {"y": 1, "x": 1}) == {"y": 1, "x": 0}
    assert water_fill(1, {"x": 5, "y": 1}) == {"x": 0, "y": 1}


def test_water_fill_respects_limits():
    assert water_fill(10, {"a": 100, "b": 100}, {"a": 3}) == {"a": 3, "b": 7}
    assert water_fill(10, {"a": 100, "b": 2}, {"a": 3}) == {"a": 3, "b": 2}
    assert water_fill(10, {"a": 2}, {"a": 3}) == {"a": 2}


def test_water_fill_properties_on_random_demands():
    rng = random.Random(1234)
    for _ in range(2000):
        cap = rng.randint(0, 30)
        demand = {f"u{i}": rng.choice([0, 1, 2, 5, rng.randint(0, 60)])
                  for i in range(rng.randint(1, 8))}
        limits = {u: rng.randint(1, 10) for u in demand if rng.random() < 0.3}
        share = water_fill(cap, demand, limits)
        want = {u: min(d, limits.get(u, d)) for u, d in demand.items()}
        assert sum(share.values()) == min(cap, sum(want.values())), (cap, demand, limits, share)
        for u in demand:
            assert 0 <= share[u] <= want[u]
            if share[u] < want[u]:
                # Not fully served: nobody else has more than one backend above it.
                assert all(share[v] <= share[u] + 1 for v in demand), (cap, demand, share)


def test_tie_order_prefers_the_starved_then_holders():
    now = 100.0
    demand = {
        "fresh": Demand(held=0, waiting=1, oldest=now - 0.01),
        "holder": Demand(held=1, waiting=0),
        "starved": Demand(held=0, waiting=1, oldest=now - STARVE_AFTER - 1),
    }
    assert tie_order(demand, now) == ["starved", "holder", "fresh"]


def test_excess_names_the_over_share_users_pools():
    a, b = ("postgres", "a"), ("postgres", "b")
    # A holds the whole cap on worker 1 and wants more; B waits for 5 on worker 2.
    rows = {("w1", a): Demand(held=10, waiting=45, oldest=0.0),
            ("w2", b): Demand(held=0, waiting=5, oldest=0.0)}
    assert fair_excess(10, rows, now=0.1) == {("w1", a): 5}
    # A spread over two workers: its share of 5 is split max-min between them (2 for
    # the bigger asker, 3 for the smaller), each gives back what it holds beyond that.
    rows = {("w1", a): Demand(held=6, waiting=40, oldest=0.0),
            ("w2", a): Demand(held=4, waiting=40, oldest=0.0),
            ("w2", b): Demand(held=0, waiting=5, oldest=0.0)}
    assert fair_excess(10, rows, now=0.1) == {("w1", a): 4, ("w2", a): 1}
    # B already has its share: nothing to give back.
    rows = {("w1", a): Demand(held=5, waiting=45, oldest=0.0),
            ("w2", b): Demand(held=5, waiting=0)}
    assert fair_excess(10, rows, now=0.1) == {}


def test_excess_between_workers_of_one_user():
    a = ("postgres", "a")
    rows = {("w1", a): Demand(held=10), ("w2", a): Demand(held=0, waiting=5, oldest=0.0)}
    assert fair_excess(10, rows, now=0.1) == {("w1", a): 5}
    # One backend, two workers wanting it: the holder keeps it for a while, then the
    # starved waiter's turn comes.
    rows = {("w1", a): Demand(held=1), ("w2", a): Demand(held=0, waiting=1, oldest=0.0)}
    assert fair_excess(1, rows, now=STARVE_AFTER / 2) == {}
    assert fair_excess(1, rows, now=STARVE_AFTER * 2) == {("w1", a): 1}


def test_excess_respects_limits():
    a, b = ("postgres", "a"), ("postgres", "b")
    rows = {("w1", a): Demand(held=6, waiting=10, oldest=0.0), ("w1", b): Demand(held=4)}
    assert fair_excess(10, rows, now=0.1, limits={"a": 3}) == {("w1", a): 3}


def test_the_most_under_served_user_is_served_next():
    # B holds nothing of its share of 5; A is at its share.
    assert pick_user({"a": 5, "b": 0}, {"a": 5, "b": 5}, {"a": 1.0, "b": 2.0}) == "b"
    # Ratio, not difference: 1 of 2 beats 4 of 6.
    assert pick_user({"a": 4, "b": 1}, {"a": 6, "b": 2}, {"a": 1.0, "b": 2.0}) == "b"
    assert pick_user({"a": 2, "b": 1}, {"a": 6, "b": 2}, {"a": 1.0, "b": 2.0}) == "a"
    # Equal ratios: the earlier arrival.
    assert pick_user({"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3.0, "b": 2.0}) == "b"
    # No share counts as fully served, after anyone with a share.
    assert pick_user({"a": 9}, {"a": 5, "c": 0}, {"a": 5.0, "c": 1.0}) == "a"
    # Only users that may be served now (in arrival) are candidates.
    assert pick_user({"a": 5, "b": 0}, {"a": 5, "b": 5}, {"a": 1.0}) == "a"
    assert pick_user({}, {}, {}) is None


def test_cli_takes_user_limits_and_refuses_bad_ones():
    out = subprocess.run([PGFLEET, "up", "--help"], capture_output=True, text=True, timeout=30)
    assert "--user-limit" in out.stdout
    for bad in ("nobody", "x=0", "x=many", "=3"):
        out = subprocess.run([PGFLEET, "up", "--home", "/nonexistent/pgfleet-home",
                              "--user-limit", bad], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (bad, out.stdout, out.stderr)
        assert "--user-limit" in out.stderr, (bad, out.stderr)


def test_a_freed_backend_goes_to_the_worker_holding_fewest():
    """Within one user, the next request served is that of the worker holding the
    fewest backends of its pool, counting those being opened for it, oldest first
    among equals; a cancelled request at the head goes first, to be dropped."""
    loop = asyncio.new_event_loop()
    try:
        pool = PoolManager(loop, "/nonexistent", cap=6)
        key = ("db", "u")
        w1, w2, w3 = object(), object(), object()
        for i, owner in enumerate((w1, w1, w2)):
            pool.backends[i] = PooledBackend(i, key, conn=None, state="leased", owner=owner)

        def req(owner):
            return LeaseRequest(key, grant=lambda b: None, fail=lambda e: None, owner=owner)

        old_w1, new_w2 = req(w1), req(w2)
        q = collections.deque([old_w1, new_w2])
        assert pool._next_request(q) is new_w2  # w2 holds 1, w1 holds 2
        pool.opening_reqs.add(req(w2))  # one more on its way to w2: a tie, oldest first
        assert pool._next_request(q) is old_w1
        newest_w3 = req(w3)  # holds nothing at all
        q.append(newest_w3)
        assert pool._next_request(q) is newest_w3
        old_w1.cancelled = True
        assert pool._next_request(q) is old_w1
    finally:
        loop.close()
