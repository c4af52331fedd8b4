"""asyncpg through pgfleet: typed parameters, its statement cache, COPY, transactions,
timeout-driven cancels, many concurrent clients over a small pool, explicit prepares.

asyncpg speaks only the extended protocol and gives every statement a protocol-level
name (``__asyncpg_stmt_N__``), numbered per connection: two connections use the same
name for different statements, and a statement prepared in one transaction is
executed in a later one that may be served by another backend.

No pytest-asyncio here: each test is a sync function that runs its coroutine with
``asyncio.run`` under an overall ``asyncio.wait_for`` bound.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import random
import uuid
from decimal import Decimal

import asyncpg
import pytest

from .conftest import PASSWORD

CONNECT_TIMEOUT = 120.0  # generous: logins queue while every backend is busy


def run(coro, timeout: float = 120.0):
    """Run ``coro`` to completion, failing (never hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(server, **kw) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres",
                                 password=PASSWORD, database="postgres",
                                 timeout=CONNECT_TIMEOUT, **kw)


async def connect_direct(server) -> asyncpg.Connection:
    """Straight to the embedded Postgres over its Unix socket (trust), for side checks."""
    return await asyncpg.connect(host=server.socket_dir, port=5432, user="postgres",
                                 database="postgres", timeout=30)


def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def drop_table(server, name: str) -> None:
    d = await connect_direct(server)
    try:
        await d.execute(f"drop table if exists {name}")
    finally:
        await d.close()


# ----------------------------------------------------------------- typed parameters

TS = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.UTC)

# (method, sql, args, expected): run on many connections, in shuffled orders, so the
# same asyncpg statement name means different statements on different connections.
CASES = [
    ("fetchval", "select $1::int * 2", (21,), 42),
    ("fetchval", "select $1::bigint + 1", (2**40,), 2**40 + 1),
    ("fetchval", "select upper($1::text)", ("héllo wörld",), "HÉLLO WÖRLD"),
    ("fetchval", "select $1::numeric * 2", (Decimal("12345678901234567890.125"),),
     Decimal("24691357802469135780.250")),
    ("fetchval", "select $1::timestamptz + interval '1 day'", (TS,),
     TS + datetime.timedelta(days=1)),
    ("fetchval", "select $1::jsonb ->> 'k'", (json.dumps({"k": "v", "n": [1, 2]}),), "v"),
    ("fetchval", "select ($1::jsonb -> 'n') :: text", (json.dumps({"n": [1, 2]}),), "[1, 2]"),
    ("fetchval", "select $1::int[] || 5", ([1, 2, None, 4],), [1, 2, None, 4, 5]),
    ("fetchval", "select array_length($1::text[], 1)", (["a", "b", "c"],), 3),
    ("fetchval", "select $1::int is null", (None,), True),
    ("fetchval", "select $1::text", (None,), None),
    ("fetchval", "select coalesce($1::text, 'dflt')", (None,), "dflt"),
    ("fetchval", "select $1::uuid::text",
     (uuid.UUID("12345678-1234-5678-1234-567812345678"),),
     "12345678-1234-5678-1234-567812345678"),
    ("fetchval", "select $1::date - 1", (datetime.date(2024, 3, 1),), datetime.date(2024, 2, 29)),
    ("fetchrow", "select $1::bool, $2::float8 / 2, $3::bytea, $4::text",
     (True, 3.0, b"\x00\x01\xff", None), (True, 1.5, b"\x00\x01\xff", None)),
    ("fetch", "select g, g * $2::int from generate_series(1, $1::int) g", (5, 10),
     [(i, i * 10) for i in range(1, 6)]),
    ("fetch", "select * from (values (1), (2)) v(x) where x > $1::int", (5,), []),
]


def _normalise(method: str, value):
    if method == "fetchrow":
        return tuple(value)
    if method == "fetch":
        return [tuple(r) for r in value]
    return value


async def _run_cases(conn: asyncpg.Connection, order: list[int]) -> None:
    for i in order:
        method, sql, args, expected = CASES[i]
        got = _normalise(method, await getattr(conn, method)(sql, *args, timeout=30))
        assert got == expected, (sql, args, got)


def test_typed_parameters_across_connections_and_transactions(server):
    async def client(seed: int) -> None:
        rnd = random.Random(seed)
        conn = await connect(server)
        try:
            for round_ in range(4):
                order = list(range(len(CASES)))
                rnd.shuffle(order)
                if round_ % 2:
                    async with conn.transaction():
                        await _run_cases(conn, order)
                else:
                    await _run_cases(conn, order)
        finally:
            await conn.close()

    async def main() -> None:
        # Two waves of 8 clients: 16 connections, statements re-prepared on new backends.
        for wave in range(2):
            await asyncio.gather(*(client(wave * 100 + i) for i in range(8)))

    run(main())


def test_executemany_inserts_1000_rows(server):
    name = table_name("apg_many")

    async def main() -> None:
        conn = await connect(server)
        try:
            await conn.execute(f"create table {name} (id int primary key, label text, amount numeric)")
            rows = [(i, f"row-{i}", Decimal(i) / 4) for i in range(1000)]
            await conn.executemany(f"insert into {name} values ($1, $2, $3)", rows)
            assert await conn.fetchval(f"select count(*) from {name}") == 1000
            assert await conn.fetchval(f"select sum(id) from {name}") == sum(range(1000))
            assert await conn.fetchval(f"select sum(amount) from {name}") == sum(r[2] for r in rows)
            assert tuple(await conn.fetchrow(f"select * from {name} where id = $1", 777)) == rows[777]
            # executemany is atomic: one failing row (a duplicate key) inserts nothing.
            bad = [(2000 + i, "x", Decimal(0)) for i in range(50)] + [(5, "dup", Decimal(0))]
            try:
                await conn.executemany(f"insert into {name} values ($1, $2, $3)", bad)
            except asyncpg.UniqueViolationError:
                pass
            else:
                raise AssertionError("duplicate key was accepted")
            assert await conn.fetchval(f"select count(*) from {name}") == 1000
            # Seen the same from another connection (and so another backend, possibly).
            other = await connect(server)
            try:
                assert await other.fetchval(f"select count(*) from {name} where id >= 2000") == 0
                assert await other.fetchval(f"select count(*) from {name}") == 1000
            finally:
                await other.close()
        finally:
            await conn.close()
            await drop_table(server, name)

    run(main())


def test_copy_records_and_copy_round_trip(server):
    src = table_name("apg_copy_src")
    dst = table_name("apg_copy_dst")
    n = 10_000

    async def main() -> None:
        conn = await connect(server)
        try:
            for t in (src, dst):
                await conn.execute(
                    f"create table {t} (id int, name text, amount numeric, ts timestamptz, tags text[])")
            records = [(i, f"name {i}\twith tab" if i % 7 == 0 else f"name {i}",
                        Decimal(i) / 100, TS + datetime.timedelta(seconds=i),
                        ["a", str(i)] if i % 3 else None)
                       for i in range(n)]
            res = await conn.copy_records_to_table(src, records=records, timeout=60)
            assert res == f"COPY {n}"
            row = await conn.fetchrow(
                f"select count(*), sum(id), sum(amount), count(tags), max(ts) from {src}")
            assert tuple(row) == (n, n * (n - 1) // 2, sum(r[2] for r in records),
                                  sum(1 for r in records if r[4] is not None),
                                  TS + datetime.timedelta(seconds=n - 1))
            # The connection is fine for ordinary queries right after COPY.
            assert await conn.fetchval("select $1::int + 1", 1) == 2

            # COPY out of a parameterised query, then COPY in from those bytes.
            buf = io.BytesIO()
            res = await conn.copy_from_query(f"select * from {src} where id >= $1", 5000,
                                             output=buf, format="csv", timeout=60)
            assert res == "COPY 5000"
            buf.seek(0)
            res = await conn.copy_to_table(dst, source=buf, format="csv", timeout=60)
            assert res == "COPY 5000"
            diff = await conn.fetchval(
                f"select count(*) from ((select * from {src} where id >= 5000 except all "
                f"select * from {dst}) union all (select * from {dst} except all "
                f"select * from {src} where id >= 5000)) d")
            assert diff == 0
            assert await conn.fetchval(f"select count(*) from {dst}") == 5000
        finally:
            await conn.close()
            await drop_table(server, src)
            await drop_table(server, dst)

    run(main())


class Boom(Exception):
    pass


def test_transaction_rollback_on_exception(server):
    name = table_name("apg_tx")

    async def main() -> None:
        conn = await connect(server)
        other = await connect(server)
        try:
            await conn.execute(f"create table {name} (id int primary key, note text)")
            # A Python exception inside the block rolls everything back.
            try:
                async with conn.transaction():
                    for i in range(10):
                        await conn.execute(f"insert into {name} values ($1, 'a')", i)
                    assert await conn.fetchval(f"select count(*) from {name}") == 10
                    # Not visible elsewhere before commit.
                    assert await other.fetchval(f"select count(*) from {name}") == 0
                    raise Boom
            except Boom:
                pass
            assert not conn.is_in_transaction()
            assert await conn.fetchval(f"select count(*) from {name}") == 0
            assert await other.fetchval(f"select count(*) from {name}") == 0

            # A server error inside the block also rolls back, and the session goes on.
            try:
                async with conn.transaction():
                    await conn.execute(f"insert into {name} values (1, 'b')")
                    await conn.execute(f"insert into {name} values (1, 'dup')")
            except asyncpg.UniqueViolationError:
                pass
            else:
                raise AssertionError("duplicate key was accepted")
            assert await other.fetchval(f"select count(*) from {name}") == 0

            # Savepoints: the inner block fails, the outer one commits.
            async with conn.transaction():
                await conn.execute(f"insert into {name} values (100, 'outer')")
                try:
                    async with conn.transaction():
                        await conn.execute(f"insert into {name} values (101, 'inner')")
                        await conn.fetchval("select 1 / 0")
                except asyncpg.DivisionByZeroError:
                    pass
                await conn.execute(f"insert into {name} values (102, 'outer')")
            rows = await other.fetch(f"select id, note from {name} order by id")
            assert [tuple(r) for r in rows] == [(100, "outer"), (102, "outer")]
        finally:
            await conn.close()
            await other.close()
            await drop_table(server, name)

    run(main())


# ----------------------------------------------------------------- cancel by timeout

async def _sleepers(direct: asyncpg.Connection, marker: str) -> list[int]:
    rows = await direct.fetch(
        "select pid from pg_stat_activity where state = 'active' "
        "and pid <> pg_backend_pid() and position($1 in query) > 0", marker)
    return [r["pid"] for r in rows]


async def _wait_no_sleepers(direct: asyncpg.Connection, marker: str, within: float = 5.0) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        pids = await _sleepers(direct, marker)
        if not pids or loop.time() > deadline:
            return pids
        await asyncio.sleep(0.1)


def test_timeout_cancels_the_running_statement(server):
    async def main() -> None:
        conn = await connect(server)
        direct = await connect_direct(server)
        try:
            try:
                await conn.fetch("select pg_sleep(30) /* apg-cancel-1 */", timeout=0.5)
            except TimeoutError:
                pass
            else:
                raise AssertionError("pg_sleep(30) returned within 0.5 s")
            # If the CancelRequest did not reach the backend, the connection would still be
            # busy with pg_sleep(30) and this would time out.
            assert await conn.fetchval("select 1", timeout=10) == 1
            assert await conn.fetchval("select $1::int + 1", 41, timeout=10) == 42
            assert await _wait_no_sleepers(direct, "apg-cancel-1") == []

            # Again inside a transaction: the transaction is rolled back, the session goes on.
            try:
                async with conn.transaction():
                    await conn.fetchval("select 1")
                    await conn.fetch("select pg_sleep(30) /* apg-cancel-2 */", timeout=0.5)
            except TimeoutError:
                pass
            else:
                raise AssertionError("pg_sleep(30) returned within 0.5 s")
            assert not conn.is_in_transaction()
            assert await conn.fetchval("select 2", timeout=10) == 2
            assert await _wait_no_sleepers(direct, "apg-cancel-2") == []
        finally:
            await conn.close(timeout=10)
            await direct.close()

    run(main(), timeout=90)


# ----------------------------------------------------------------- many clients, small pool

def test_200_concurrent_clients_never_exceed_pool_size(server):
    pool_size = 5  # the shared server runs with --pool-size 5
    name = table_name("apg_conc")
    n_clients = 200
    polls: list[int] = []

    async def client(i: int) -> int:
        conn = await connect(server)
        done = 0
        try:
            for j in range(4):
                v = i * 1000 + j
                assert await conn.fetchval("select $1::int * 2", v, timeout=60) == 2 * v
                done += 1
            got = await conn.fetchval("select $1::text || '/' || $2::text", f"c{i}", "x",
                                      timeout=60)
            assert got == f"c{i}/x"
            done += 1
            async with conn.transaction():
                await conn.executemany(f"insert into {name} values ($1, $2, $3)",
                                       [(i, k, f"{i}-{k}") for k in range(3)], timeout=60)
                rows = await conn.fetch(
                    f"select seq, payload from {name} where client = $1 order by seq", i,
                    timeout=60)
                assert [tuple(r) for r in rows] == [(k, f"{i}-{k}") for k in range(3)]
                done += 2
            rows = await conn.fetch(f"select payload from {name} where client = $1 order by seq",
                                    i, timeout=60)
            assert [r[0] for r in rows] == [f"{i}-{k}" for k in range(3)]
            done += 1
            row = await conn.fetchrow("select $1::int, $2::numeric, $3::int[]", i,
                                      Decimal(i) / 8, [i, -i], timeout=60)
            assert tuple(row) == (i, Decimal(i) / 8, [i, -i])
            done += 1
            async with conn.transaction():
                await conn.execute(f"update {name} set payload = payload || '!' where client = $1",
                                   i, timeout=60)
            assert await conn.fetchval(
                f"select string_agg(payload, ',' order by seq) from {name} where client = $1",
                i, timeout=60) == ",".join(f"{i}-{k}!" for k in range(3))
            done += 2
        finally:
            await conn.close(timeout=30)
        return done

    async def poller(stop: asyncio.Event) -> None:
        direct = await connect_direct(server)
        try:
            while not stop.is_set():
                polls.append(await direct.fetchval(
                    "select count(*) from pg_stat_activity "
                    "where backend_type = 'client backend' and pid <> pg_backend_pid()"))
                try:
                    await asyncio.wait_for(stop.wait(), 0.05)
                except TimeoutError:
                    pass
        finally:
            await direct.close()

    async def main() -> list[int]:
        setup = await connect(server)
        try:
            await setup.execute(f"create table {name} (client int, seq int, payload text)")
        finally:
            await setup.close()
        stop = asyncio.Event()
        side = asyncio.create_task(poller(stop))
        try:
            await asyncio.sleep(0.2)
            results = await asyncio.gather(*(client(i) for i in range(n_clients)),
                                           return_exceptions=True)
        finally:
            stop.set()
            await side
        return results

    try:
        results = run(main(), timeout=240)
    finally:
        run(drop_table(server, name), timeout=30)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    assert results == [11] * n_clients
    print(f"pg_stat_activity client backends: max {max(polls)} over {len(polls)} polls")
    assert len(polls) >= 5
    assert max(polls) >= 1  # the poller did see pgfleet's backends
    assert max(polls) <= pool_size, f"saw {max(polls)} backends with --pool-size {pool_size}"


# ----------------------------------------------------------------- explicit prepared statements

def test_prepared_statement_follows_the_session_across_backends(server):
    sql = "select $1::int + 1 /* apg-prep */"
    name = table_name("apg_prep")

    async def churn(stop: asyncio.Event, k: int) -> int:
        n = 0
        conn = await connect(server)
        try:
            while not stop.is_set():
                async with conn.transaction():
                    # Different statements under the same asyncpg names as the main client's.
                    assert await conn.fetchval("select $1::int * 3", k, timeout=60) == 3 * k
                    await asyncio.sleep(0.02)
                n += 1
                if n % 10 == 0:  # and some connection churn too
                    await conn.close(timeout=30)
                    conn = await connect(server)
        finally:
            await conn.close(timeout=30)
        return n

    async def main() -> tuple[set[int], list[int]]:
        direct = await connect_direct(server)
        conn = await connect(server)
        stop = asyncio.Event()
        churners = [asyncio.create_task(churn(stop, k)) for k in range(20)]
        pids: set[int] = set()
        try:
            stmt = await conn.prepare(sql)
            named = await conn.prepare("select $1::text || $2::text", name="apg_explicit_name")
            await direct.execute(f"create table {name} (v int)")
            await direct.execute(f"insert into {name} values (0)")
            done = 0
            # At least 30 transactions, and on until another session's took the backend
            # in between (bounded). An UPDATE, not an INSERT: a backend an INSERT ran on
            # goes back to its session while others are idle (sequence state).
            while done < 30 or (len(pids) < 2 and done < 300):
                i, done = done, done + 1
                async with conn.transaction():
                    assert await stmt.fetchval(i) == i + 1
                    assert await named.fetchval(f"t{i}", "!") == f"t{i}!"
                    await conn.execute(f"update {name} set v = v + $1", i)
                    # Which backend serves us now: the one idle in our transaction whose last
                    # statement is ours (does not rely on pg_backend_pid()).
                    rows = await direct.fetch(
                        "select pid from pg_stat_activity where state = 'idle in transaction' "
                        "and position('apg_prep' in query) > 0 and pid <> pg_backend_pid()")
                    pids.update(r["pid"] for r in rows)
                    assert await stmt.fetchval(-i) == -i + 1
                # Outside a transaction too.
                assert await stmt.fetchval(1000 + i) == 1001 + i
                assert await named.fetchval("a", "b") == "ab"
                await asyncio.sleep(0.03)
            assert await conn.fetchval(f"select sum(v) from {name}") == sum(range(done))
            # asyncpg's own plan metadata is still right.
            assert [t.name for t in stmt.get_parameters()] == ["int4"]
        finally:
            stop.set()
            counts = await asyncio.gather(*churners, return_exceptions=True)
            await conn.close(timeout=30)
            await direct.execute(f"drop table if exists {name}")
            await direct.close()
        return pids, counts

    pids, counts = run(main(), timeout=180)
    errors = [c for c in counts if isinstance(c, BaseException)]
    assert not errors, f"{len(errors)} churners failed, first: {errors[0]!r}"
    assert all(c > 0 for c in counts)
    # The statement was used on more than one backend, so it was re-prepared.
    print(f"prepared statement served by {len(pids)} backends")
    assert len(pids) >= 2, pids


def test_pool_release_resets_what_each_user_left(server):
    """asyncpg's Pool, as apps use it: each acquire sets a setting, takes an advisory
    lock, prepares, LISTENs and hears; each release runs asyncpg's reset (unlock all,
    CLOSE ALL, UNLISTEN *, RESET ALL), after which no user's lock or setting is left on
    whatever connection the next acquire gets, with 12 users over the shared backends."""

    async def main() -> list:
        pool = await asyncpg.create_pool(host="127.0.0.1", port=server.port, user="postgres",
                                         password=PASSWORD, database="postgres",
                                         min_size=2, max_size=6, timeout=CONNECT_TIMEOUT)
        problems: list = []

        async def user(i: int) -> None:
            for r in range(5):
                heard: asyncio.Queue = asyncio.Queue()

                def on_note(_conn, _pid, _channel, payload, heard=heard) -> None:
                    heard.put_nowait(payload)

                async with pool.acquire() as c:
                    await c.execute(f"set application_name = 'pool_user_{i}'")
                    await c.execute("select pg_advisory_lock($1)", 7000 + i)
                    stmt = await c.prepare("select $1::int * 2")
                    if await stmt.fetchval(i) != 2 * i:
                        problems.append(("prepared", i))
                    await c.add_listener(f"pool_chan_{i}", on_note)
                    await c.execute(f"notify pool_chan_{i}, 'r{r}'")
                    got = await asyncio.wait_for(heard.get(), 10)
                    if got != f"r{r}":
                        problems.append(("notification", i, got))
                    await c.remove_listener(f"pool_chan_{i}", on_note)
                async with pool.acquire() as c:
                    locks = await c.fetchval(
                        "select count(*) from pg_locks where locktype = 'advisory' and objid = $1",
                        7000 + i)
                    name = await c.fetchval("select current_setting('application_name')")
                    if locks:
                        problems.append(("lock left", i, locks))
                    if name.startswith("pool_user_"):
                        problems.append(("setting left", i, name))

        try:
            await asyncio.gather(*(user(i) for i in range(12)))
        finally:
            await pool.close()
        return problems

    assert run(main()) == []


def test_fetch_from_a_cursor_describes_the_sessions_cursor(make_server):
    """asyncpg prepares FETCH (Parse, Describe, Flush) and checks rows against the
    description. Postgres fixes a prepared FETCH's description when it parses it, from
    the cursor as it is then: the backend statement pgfleet shares between sessions
    must not be one another session parsed before this session's cursor existed
    (NoData, then a row: asyncpg's ProtocolError)."""
    srv = make_server("--pool-size", "1", "--workers", "1", "--query-wait-timeout", "10")

    async def main() -> None:
        other, owner = await connect(srv), await connect(srv)
        try:
            # The other session prepares the text first, on the only backend, with no
            # cursor there: Postgres describes it NoData and says 34000 when run.
            with pytest.raises(asyncpg.InvalidCursorNameError):
                await other.fetch("FETCH 2 FROM shaped")
            await owner.execute("DECLARE shaped CURSOR WITH HOLD FOR"
                                " SELECT g, g * 10 AS tens FROM generate_series(1, 5) g")
            rows = await owner.fetch("FETCH 2 FROM shaped")
            assert [tuple(r) for r in rows] == [(1, 10), (2, 20)]
            assert list(rows[0].keys()) == ["g", "tens"]
            await owner.execute("CLOSE shaped")
        finally:
            await other.close()
            await owner.close()

    run(main())
