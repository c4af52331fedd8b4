"""Unnamed statements seen before run as shared named ones: one parse per backend.

Drivers send most queries as an unnamed Parse, Bind, Execute and Sync (psycopg,
pgbench -M extended, JDBC before it prepares), and Postgres parses each one again.
From its second sight in a worker, pgfleet runs such a text as the shared statement
``pgf_<id>``: parsed once per backend, then only bound. The client must not be able
to tell, except by the time it saves: the same replies, the same errors (naming the
statement ""), its unnamed statement there to bind again, and no stale-plan error
after DDL. Postgres's own log is the witness of what was parsed where.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pgwire import frontend as fe

from .test_extended_protocol import direct, exchange, group, via

TEXTS = [
    "select aid, abalance from promo_accounts where aid = %s",
    "select count(*) from promo_accounts where aid <= %s",
    "update promo_accounts set abalance = abalance + 1 where aid = %s",
]


def _parses(log_text: str) -> Counter:
    """(backend pid, statement name, query) of each Parse Postgres logged."""
    return Counter(re.findall(r"\[(\d+)\] LOG:  duration: [\d.]+ ms  parse (\S+): (.*)", log_text))


@contextmanager
def logged_parses(srv, *setup: str) -> Iterator[Counter]:
    """Run ``setup`` straight on Postgres, then have it log every statement; the Counter
    yielded holds, once the block is over, the Parses logged meanwhile (see _parses)."""
    log = srv.home / "log" / "postgres.log"
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        for sql in setup:
            admin.execute(sql)
        admin.execute("alter system set log_min_duration_statement = 0")
        admin.execute("alter system set log_line_prefix = '[%p] '")
        admin.execute("select pg_reload_conf()")
    time.sleep(1)
    start = log.stat().st_size
    parses: Counter = Counter()
    try:
        yield parses
    finally:
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute("alter system reset log_min_duration_statement")
            admin.execute("select pg_reload_conf()")
    with open(log, "rb") as f:
        f.seek(start)
        parses.update(_parses(f.read().decode(errors="replace")))


def test_repeated_unnamed_statements_are_parsed_once_per_backend(make_server):
    srv = make_server("--pool-size", "2", "--workers", "2")
    with logged_parses(srv, "drop table if exists promo_accounts",
                       "create table promo_accounts(aid int primary key, abalance int)",
                       "insert into promo_accounts select g, 0 from generate_series(1, 100) g",
                       ) as parses:
        # prepare_threshold=None: psycopg never prepares, every query is an unnamed unit.
        conns = [psycopg.connect(srv.dsn(), autocommit=True, prepare_threshold=None,
                                 connect_timeout=10) for _ in range(6)]
        try:
            for round_ in range(20):
                for i, c in enumerate(conns):
                    aid = 1 + (round_ * 6 + i) % 100
                    assert c.execute(TEXTS[0], (aid,)).fetchone()[0] == aid
                    assert c.execute(TEXTS[1], (aid,)).fetchone() == (aid,)
                    c.execute(TEXTS[2], (aid,))
                    assert c.execute(TEXTS[2], (aid,)).rowcount == 1
        finally:
            for c in conns:
                c.close()
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        # Every update ran: 2 per client per round, each on its own row's count.
        assert admin.execute("select sum(abalance) from promo_accounts").fetchone() == (2 * 20 * 6,)
    for text in TEXTS:
        sql = text.replace("%s", "$1")
        of_text = {(pid, name): n for (pid, name, q), n in parses.items() if q.strip() == sql}
        unnamed = sum(n for (_, name), n in of_text.items() if name == "<unnamed>")
        named = {k: n for k, n in of_text.items() if k[1].startswith("pgf_")}
        # The first sight in each worker runs unnamed; then each backend parses it once.
        assert unnamed <= 2, (text, of_text)
        assert named and all(n == 1 for n in named.values()), (text, of_text)
        assert len({name for _, name in named}) == 1  # one shared name in both workers
        assert sum(of_text.values()) <= 4, (text, of_text)


def test_ddl_between_runs_of_a_promoted_statement(make_server):
    """The table's shape changes between runs of a promoted text: the backend's named
    statement now fails "cached plan must not change result type", which an unnamed
    statement never does. Outside a transaction block pgfleet prepares it again and
    sends the unit again; inside one it does not promote at all. Either way the
    client gets what Postgres gives a client of its own."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists promo_ddl")
        admin.execute("create table promo_ddl(a int)")
        admin.execute("insert into promo_ddl values (1)")
    unit = group("select * from promo_ddl")
    s, d = via(srv), direct(srv)
    try:
        for _ in range(3):
            assert exchange(s, *unit) == exchange(d, *unit)
        shapes = ["b text default 'x'", "c int default 3", "d int default 4"]
        for shape in shapes[:2]:
            with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
                admin.execute(f"alter table promo_ddl add column {shape}")
            got = exchange(s, *unit)
            assert got == exchange(d, *unit), got
            assert not [m for m in got if m[0] == "ErrorResponse"]
        # Inside a transaction block, after DDL, nothing can be sent again: no error either.
        assert exchange(s, fe.encode_query("begin"))[-1] == ("ReadyForQuery", "T")
        with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
            admin.execute(f"alter table promo_ddl add column {shapes[2]}")
        got = exchange(s, *unit)
        assert ("DataRow", [b"1", b"x", b"3", b"4"]) in got, got
        assert got[-1] == ("ReadyForQuery", "T")
        assert exchange(s, fe.encode_query("commit"))[-1] == ("ReadyForQuery", "I")
        for _ in range(2):
            assert exchange(s, *unit) == exchange(d, *unit)
    finally:
        s.close()
        d.close()


def test_a_promoted_statement_stays_the_sessions_unnamed_statement(make_server):
    """After the unit, the client may bind its unnamed statement again (lib/pq, pgx):
    it is its own text, even though the backend ran it under a shared name."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    s, other, d = via(srv), via(srv), direct(srv)
    try:
        unit = group("select $1::int * 3", b"7")
        rebind = [fe.encode_bind("", "", [b"5"]), fe.encode_execute(), fe.SYNC]
        for _ in range(3):
            assert exchange(s, *unit) == exchange(d, *unit)
            assert exchange(other, *group("select 'other'"))[3] == ("DataRow", [b"other"])
            assert exchange(s, *rebind) == exchange(d, *rebind)
            assert exchange(s, *rebind)[1] == ("DataRow", [b"15"])
    finally:
        s.close()
        other.close()
        d.close()


def test_inside_transactions_only_statements_without_rows_are_promoted(make_server):
    """In a transaction block nothing can be sent again after an error, so only statements
    whose result type cannot go stale (an UPDATE, an END) run as shared statements
    there; a SELECT stays unnamed, and DDL between runs fails neither."""
    srv = make_server("--pool-size", "1", "--workers", "1")
    update = "update promo_tx set v = v + 1 where id = %s"
    select = "select * from promo_tx where id = %s"
    with logged_parses(srv, "drop table if exists promo_tx",
                       "create table promo_tx(id int primary key, v int)",
                       "insert into promo_tx values (1, 0), (2, 0)") as parses:
        with psycopg.connect(srv.dsn(), prepare_threshold=None, connect_timeout=10) as c:
            for i in range(6):
                if i == 3:
                    with psycopg.connect(srv.direct_dsn(), autocommit=True) as admin:
                        admin.execute("alter table promo_tx add column note text default 'n'")
                with c.transaction():
                    c.execute(update, (1,))
                    row = c.execute(select, (1,)).fetchone()
                    assert row == ((1, i + 1) if i < 3 else (1, i + 1, "n"))
    names = lambda sql: Counter({name: n for (_, name, q), n in parses.items()  # noqa: E731
                                 if q.strip() == sql.replace("%s", "$1")})
    assert names(select) == Counter({"<unnamed>": 6})
    by_name = names(update)
    # Seen once unnamed, then parsed once as its shared name (and again after the DDL
    # only if Postgres itself decides to: it re-plans, it does not re-parse).
    assert by_name["<unnamed>"] == 1 and len(by_name) == 2, by_name
    assert all(n == 1 for name, n in by_name.items() if name.startswith("pgf_")), by_name
