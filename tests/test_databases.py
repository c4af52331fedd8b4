"""DROP / RENAME / CREATE ... TEMPLATE of a database that clients used through pgfleet.

Postgres refuses these while other sessions are connected to the database. The
clients have left, but pgfleet's pooled backends stay connected to serve the next
ones: pgfleet must close them first, as Django's test runner (DROP DATABASE test_x
after its run) and CREATE DATABASE ... TEMPLATE need.
"""

from __future__ import annotations

import psycopg


def use(srv, dbname: str, clients: int = 3) -> None:
    """Leave pooled backends behind in ``dbname`` (several, with overlapping clients)."""
    conns = [psycopg.connect(srv.dsn(dbname=dbname), autocommit=True, connect_timeout=10)
             for _ in range(clients)]
    for conn in conns:
        conn.execute("select 1")
    for conn in conns:
        conn.close()


def test_drop_rename_and_template_after_use(server):
    with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=10) as admin:
        admin.execute("drop database if exists vac_a")
        admin.execute("drop database if exists vac_b")
        admin.execute("drop database if exists vac_c")
        admin.execute("create database vac_a")
        use(server, "vac_a")
        admin.execute("create database vac_c template vac_a")
        use(server, "vac_a")
        admin.execute("alter database vac_a rename to vac_b")
        use(server, "vac_b")
        admin.execute("drop database vac_b")
        # The extended protocol too (psycopg's parameterless queries are simple: force it).
        use(server, "vac_c")
        admin.execute("drop database vac_c", prepare=True)
        names = {r[0] for r in admin.execute("select datname from pg_database")}
        assert not names & {"vac_a", "vac_b", "vac_c"}


def test_drop_still_refused_while_a_client_is_inside(server):
    """Postgres's rule stands for a session that is really in the middle of something."""
    with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=10) as admin:
        admin.execute("drop database if exists vac_busy")
        admin.execute("create database vac_busy")
        inside = psycopg.connect(server.dsn(dbname="vac_busy"), connect_timeout=10)
        try:
            inside.execute("select 1")  # an open transaction holds its backend
            try:
                admin.execute("drop database vac_busy")
            except psycopg.errors.ObjectInUse:
                pass
            else:
                raise AssertionError("DROP DATABASE succeeded under an open transaction")
        finally:
            inside.close()
        admin.execute("drop database vac_busy")
