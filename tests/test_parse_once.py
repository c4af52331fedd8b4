"""One parse per query per backend, counted by Postgres itself.

50 asyncpg clients each prepare the same 20 statements and 5 of their own, over
2 workers and 2 backends. With log_min_duration_statement = 0 Postgres logs every
Parse it runs ("parse <name>: ..."), with its PID: no backend may parse the same
statement twice, however many clients and workers use it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import asyncpg
import psycopg

from .conftest import PASSWORD, free_port
from .waiting import wait_metric

SHARED = [f"select {i} as shared, $1::int + {i} as v" for i in range(20)]


def test_each_backend_parses_each_statement_once(make_server):
    mport = free_port()
    srv = make_server("--pool-size", "2", "--workers", "2", "--metrics-port", str(mport))
    log = srv.home / "log" / "postgres.log"
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("alter system set log_min_duration_statement = 0")
        admin.execute("alter system set log_line_prefix = '[%p] '")
        admin.execute("select pg_reload_conf()")
    time.sleep(1)
    start = log.stat().st_size

    pinned_share: list[float] = []

    async def client(i: int, all_done: asyncio.Barrier) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=srv.port, user="postgres",
                                     password=PASSWORD, database="postgres", timeout=60)
        try:
            for round_ in range(2):
                for j, sql in enumerate(SHARED):
                    assert await conn.fetchval(sql.replace(" as shared,", ","), i) is not None
                    row = await conn.fetchrow(sql, i + round_)
                    assert tuple(row) == (j, i + round_ + j)
                for k in range(5):
                    own = f"select {k} as own, $1::int * {i + 1000}"
                    assert tuple(await conn.fetchrow(own, 2)) == (k, 2 * (i + 1000))
            if await all_done.wait() == 0:  # one client looks while all 50 are connected
                m = await asyncio.to_thread(
                    wait_metric, mport, {"pgfleet_client_sessions": 50.0})
                assert m["pgfleet_client_sessions"] == 50
                pinned = sum(v for k, v in m.items() if k.startswith("pgfleet_pinned_sessions"))
                pinned_share.append(pinned / 50)
            await all_done.wait()
        finally:
            await conn.close()

    async def main() -> None:
        all_done = asyncio.Barrier(50)
        await asyncio.gather(*(client(i, all_done) for i in range(50)))

    asyncio.run(main())
    # Prepared statements are shared, not pinned: no asyncpg session holds a backend.
    print(f"pinned share of asyncpg sessions: {pinned_share[0]:.0%}")
    assert pinned_share == [0.0]
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("alter system reset log_min_duration_statement")
        admin.execute("select pg_reload_conf()")
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    parses = Counter(
        (pid, name) for pid, name in re.findall(r"\[(\d+)\] LOG:  duration: [\d.]+ ms  parse (\S+):",
                                                text)
    )
    assert parses, "Postgres logged no Parse at all"
    backends = {pid for pid, _ in parses}
    assert 1 <= len(backends) <= 2
    twice = {k: n for k, n in parses.items() if n > 1}
    assert not twice, f"statements parsed more than once on one backend: {twice}"
    # Every shared statement was parsed at most once per backend, not once per client.
    shared_parses = sum(n for (pid, name), n in parses.items() if name.startswith("pgf_"))
    # Names come from the shared catalog (pgf_<id>), the same in both workers.
    assert all(re.fullmatch(r"pgf_\d+", name) for _, name in parses if name.startswith("pgf_"))
    print(f"backend Parses: {shared_parses} named on {len(backends)} backends")
    distinct = 20 * 2 + 50 * 5  # shared texts (two forms) + each client's own
    assert shared_parses <= len(backends) * (distinct + 20)  # + asyncpg's introspection
