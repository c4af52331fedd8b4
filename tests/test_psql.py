"""psql through pgfleet: commands, meta-commands, scripts, \\copy, COPY, errors.

Each check runs the same psql command straight against the embedded Postgres too and
expects the same output: pgfleet must be invisible to psql.
"""

from __future__ import annotations

import csv
import io
import random
import subprocess
import uuid
from pathlib import Path

import pytest

PSQL_TIMEOUT = 120


def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def direct_env(server) -> dict[str, str]:
    env = server.env()
    env.update(PGHOST=server.socket_dir, PGPORT="5432")
    env.pop("PGPASSWORD", None)
    return env


def psql(server, *args: str, direct: bool = False, cwd: Path | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    env = direct_env(server) if direct else server.env()
    return subprocess.run(["psql", "-X", *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=PSQL_TIMEOUT)


def psql_ok(server, *args: str, **kw) -> str:
    out = psql(server, *args, **kw)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def table(server):
    """A unique table name, dropped afterwards."""
    name = uniq("psql_t")
    yield name
    psql(server, "-c", f"drop table if exists {name}", direct=True)


def test_several_commands(server, table):
    args = [
        "-c", "select 1 as one, 'two' as two",
        "-c", f"create table {table} (id int primary key, label text not null, "
              "price numeric(10,2) default 0, created timestamptz)",
        "-c", f"insert into {table} (id, label, price) values (1, 'a', 1.5), (2, 'b', 2)",
        "-c", f"select id, label, price from {table} order by id; select count(*) from {table}",
        "-c", "begin; select 'in tx'; commit",
        "-c", "show server_version_num",
    ]
    out = psql_ok(server, *args)
    assert "one | two" in out
    assert "CREATE TABLE" in out and "INSERT 0 2" in out
    assert " 1 | a     |  1.50" in out
    assert "in tx" in out
    # Unaligned, tuples only, with a field separator.
    out = psql_ok(server, "-A", "-t", "-F", ",", "-c",
                  f"select id, label, price from {table} order by id")
    assert out == "1,a,1.50\n2,b,2.00\n"
    # Same output as psql straight to Postgres (the table is there now: no DDL).
    read_only = args[:2] + args[6:]
    assert psql_ok(server, *read_only) == psql_ok(server, *read_only, direct=True)
    # A variable, \gset and \echo across commands of one psql session.
    out = psql_ok(server, "-A", "-t", stdin=(
        f"select max(id) as top from {table} \\gset\n"
        "\\echo top is :top\n"
        "select :top + 40;\n"))
    assert out.split() == ["top", "is", "2", "42"]


def test_describe_table(server, table):
    psql_ok(server, "-c", f"create table {table} (id bigint primary key, "
                          "name varchar(40) not null, payload jsonb, "
                          "tags text[] default '{}', amount numeric(12,3))")
    psql_ok(server, "-c", f"create index {table}_name_idx on {table} (name)")
    out = psql_ok(server, "-c", f"\\d {table}")
    assert f'Table "public.{table}"' in out
    for col, typ in (("id", "bigint"), ("name", "character varying(40)"), ("payload", "jsonb"),
                     ("tags", "text[]"), ("amount", "numeric(12,3)")):
        assert any(line.split("|")[0].strip() == col and typ in line
                   for line in out.splitlines()), (col, out)
    assert f"{table}_pkey" in out and f"{table}_name_idx" in out
    assert out == psql_ok(server, "-c", f"\\d {table}", direct=True)
    # Other meta-commands that run catalog queries.
    for meta in ("\\dt public.*", "\\l", "\\dn", "\\df pg_catalog.lower", "\\du postgres"):
        assert psql_ok(server, "-c", meta) == psql_ok(server, "-c", meta, direct=True), meta


def _csv_field(v: str | None) -> str:
    """How Postgres writes one CSV field (quoted only when it must be)."""
    if v is None:
        return ""
    if v == "" or any(ch in v for ch in ',"\n\r') or v == "\\.":
        return '"' + v.replace('"', '""') + '"'
    return v


def _make_csv(path: Path, n: int) -> list[tuple]:
    rnd = random.Random(1234)
    words = ["plain", "with, comma", 'say "hi"', "multi\nline", "café ünïcode", "back\\slash",
             "tab\there", "  spaced  ", "'single'", "semi;colon", "", None]
    rows = []
    lines = []
    for i in range(1, n + 1):
        name = rnd.choice(words)
        note = None if i % 5 == 0 else f"note {i}, " + rnd.choice(words[:-1]) + f' "{i}"'
        amount = None if i % 7 == 0 else f"{rnd.randint(-10**6, 10**6)}.{rnd.randint(0, 99):02d}"
        rows.append((i, name, note, amount))
        lines.append(",".join(_csv_field(v) for v in (str(i), name, note, amount)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def test_script_copy_in_and_out(server, table, tmp_path):
    n = 3000
    src = tmp_path / "in.csv"
    rows = _make_csv(src, n)
    # Sanity check of the test's own CSV: Python's reader sees what we meant.
    parsed = list(csv.reader(io.StringIO(src.read_text(encoding="utf-8"), newline="")))
    assert len(parsed) == n and parsed[1][0] == "2"
    script = tmp_path / "copy.sql"
    script.write_text(
        "\\set ON_ERROR_STOP 1\n"
        f"create table {table} (id int primary key, name text, note text, amount numeric);\n"
        f"\\copy {table} from 'in.csv' with (format csv)\n"
        f"\\copy (select * from {table} order by id) to 'out.csv' with (format csv)\n"
        f"select count(*), count(name), count(note), count(amount) from {table};\n"
        f"select count(*) from {table} where name = '';\n",
        encoding="utf-8")
    out = psql(server, "-A", "-t", "-f", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    counts = [line for line in out.stdout.splitlines() if "|" in line]
    want = (n, sum(r[1] is not None for r in rows), sum(r[2] is not None for r in rows),
            sum(r[3] is not None for r in rows))
    assert counts[0] == "|".join(map(str, want))
    assert out.stdout.split()[-1] == str(sum(r[1] == "" for r in rows))
    assert "COPY 3000" in out.stdout
    dst = tmp_path / "out.csv"
    assert dst.read_bytes() == src.read_bytes()

    # Postgres agrees on the content.
    got = psql_ok(server, "-A", "-t", "-c",
                  f"select name, note from {table} where id in (1, 2, 3) order by id",
                  direct=True)
    assert got == psql_ok(server, "-A", "-t", "-c",
                          f"select name, note from {table} where id in (1, 2, 3) order by id")

    # COPY ... TO STDOUT through psql gives the same bytes.
    out = psql_ok(server, "-c", f"copy (select * from {table} order by id) to stdout with (format csv)")
    assert out == src.read_text(encoding="utf-8")
    # And a text-format COPY TO STDOUT matches the direct one.
    q = f"copy (select * from {table} where id % 10 = 0 order by id) to stdout"
    assert psql_ok(server, "-c", q) == psql_ok(server, "-c", q, direct=True)
    # COPY FROM STDIN fed on psql's standard input.
    out = psql_ok(server, "-c", f"copy {table} (id, name) from stdin with (format csv)",
                  stdin="".join(f"{i},from stdin {i}\n" for i in range(n + 1, n + 101)))
    assert "COPY 100" in out
    assert psql_ok(server, "-A", "-t", "-c", f"select count(*) from {table}",
                   direct=True).strip() == str(n + 100)


def test_on_error_stop(server, tmp_path):
    script = tmp_path / "fail.sql"
    t = uniq("psql_err")
    script.write_text(
        "\\set ON_ERROR_STOP 1\n"
        "select 'before' as marker;\n"
        f"create temp table {t} (id int primary key);\n"
        f"insert into {t} values (1);\n"
        f"insert into {t} values (1);\n"
        "select 'after' as marker;\n")
    out = psql(server, "-f", str(script))
    ref = psql(server, "-f", str(script), direct=True)
    assert out.returncode == 3 == ref.returncode
    assert "before" in out.stdout and "after" not in out.stdout
    assert ('ERROR:  duplicate key value violates unique constraint' in out.stderr)
    assert out.stderr == ref.stderr  # same file, same line, same text

    script.write_text(
        "\\set ON_ERROR_STOP 1\n"
        "\\set VERBOSITY verbose\n"
        "select 'before';\n"
        "select 1/0;\n"
        "select 'after';\n")
    out = psql(server, "-f", str(script))
    ref = psql(server, "-f", str(script), direct=True)
    assert out.returncode == 3
    assert f"psql:{script}:4: ERROR:  22012: division by zero" in out.stderr
    assert out.stderr == ref.stderr and out.stdout == ref.stdout
    assert "after" not in out.stdout

    # Without ON_ERROR_STOP psql goes on, on the same session.
    script.write_text("select 1/0;\nselect 'after' as marker;\n")
    out = psql(server, "-f", str(script))
    assert out.returncode == 0
    assert "division by zero" in out.stderr and "after" in out.stdout
    # A syntax error, with the position Postgres reports.
    out = psql(server, "-v", "ON_ERROR_STOP=1", "-c", "selec 1")
    ref = psql(server, "-v", "ON_ERROR_STOP=1", "-c", "selec 1", direct=True)
    assert out.returncode == 1 and out.stderr == ref.stderr
    assert 'ERROR:  syntax error at or near "selec"' in out.stderr
