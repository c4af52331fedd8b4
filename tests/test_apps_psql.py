"""psql scripts run unchanged through pgfleet: ``\\copy`` in and out, ``DO`` blocks whose
``RAISE NOTICE`` text must reach psql's stderr, and a script that mixes both with
transactions, run with ``-f`` and ``ON_ERROR_STOP``.

Results are checked straight against the embedded Postgres (``server.direct_dsn()``),
so a pgfleet that dropped or duplicated rows cannot hide behind itself.
"""

from __future__ import annotations

import csv
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

PSQL_TIMEOUT = 60


def psql_file(server, script: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with psql against pgfleet, stopping at the first error."""
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", str(script)],
        env=server.env(), cwd=cwd, capture_output=True, text=True, timeout=PSQL_TIMEOUT)


@pytest.fixture
def table(server):
    """A unique table name, dropped afterwards (straight on Postgres)."""
    name = f"apps_psql_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        conn.execute(f"drop table if exists {name}")


def test_copy_in_and_out_script(server, table, tmp_path):
    """``\\copy`` a CSV in, transform in a transaction, ``\\copy`` a query out."""
    rows = [(i, f"name {i}, with comma", "" if i % 7 == 0 else f"note \"{i}\"")
            for i in range(1, 2001)]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    script = tmp_path / "copy.sql"
    script.write_text(f"""
create table {table} (id int primary key, name text not null, note text);
\\copy {table} from 'in.csv' with (format csv)
begin;
update {table} set note = upper(note) where id % 2 = 0;
\\copy (select id, name, note from {table} where id <= 1000 order by id) to 'out.csv' with (format csv, header)
commit;
\\copy {table} (id, name) to 'all.txt'
select count(*) as n from {table};
""")
    out = psql_file(server, script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "COPY 2000" in out.stdout and "2000" in out.stdout

    with open(tmp_path / "out.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["id", "name", "note"]
    expected = [[str(i), n, (note.upper() if i % 2 == 0 else note)]
                for i, n, note in rows if i <= 1000]
    assert got[1:] == expected

    lines = (tmp_path / "all.txt").read_text().splitlines()
    assert len(lines) == 2000
    assert lines[0] == "1\tname 1, with comma"

    with psycopg.connect(server.direct_dsn()) as conn:
        n, evens_upper, empties = conn.execute(
            f"select count(*), count(*) filter (where id % 2 = 0 and note is not distinct from upper(note)),"
            f" count(*) filter (where note is null) from {table}").fetchone()
    assert (n, evens_upper) == (2000, 1000)
    assert empties == len([r for r in rows if r[2] == ""])  # empty unquoted CSV field = NULL


def test_do_blocks_raise_notice(server, table, tmp_path):
    """Notices from DO blocks (several per block, inside and outside transactions) reach
    psql's stderr in order; an exception raised in a DO block stops the script."""
    script = tmp_path / "do.sql"
    script.write_text(f"""
create table {table} (id int);
do $$
begin
  raise notice 'pgfleet notice one %', 41 + 1;
  insert into {table} select generate_series(1, 10);
  raise notice 'pgfleet notice two: % rows', (select count(*) from {table});
end $$;
begin;
do $$ begin raise notice 'pgfleet notice in transaction'; end $$;
do $$ begin raise warning 'pgfleet warning level'; end $$;
commit;
set client_min_messages = warning;
do $$ begin raise notice 'pgfleet suppressed notice'; end $$;
reset client_min_messages;
do $$ begin raise notice 'pgfleet notice after reset'; end $$;
do $$ begin raise exception 'pgfleet stop here' using errcode = '22012'; end $$;
select 'never reached';
""")
    out = psql_file(server, script, tmp_path)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    err = out.stderr
    wanted = ["NOTICE:  pgfleet notice one 42", "NOTICE:  pgfleet notice two: 10 rows",
              "NOTICE:  pgfleet notice in transaction", "WARNING:  pgfleet warning level",
              "NOTICE:  pgfleet notice after reset", "ERROR:  pgfleet stop here"]
    positions = [err.find(w) for w in wanted]
    assert all(p >= 0 for p in positions), err
    assert positions == sorted(positions), err
    assert "suppressed" not in err
    assert "never reached" not in out.stdout
