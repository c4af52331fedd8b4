"""``pgfleet firehose`` (the load generator) run as a user runs it, against a real pgfleet.

One short run: 500 connections held through 100/s churn and ~50 qps for 10 s on a pgfleet
with 5 backends, which must never show Postgres more than 5 client backends. Plus the two
ways a run must refuse or fail: a non-loopback target, a wrong password.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import subprocess

import pytest

from bench.firehose import proto
from bench.firehose.main import CSV_COLUMNS
from tests.conftest import PASSWORD, PGFLEET, ROOT, free_port

RUN_TIMEOUT = 120  # the 10 s run plus startup and drain, on a busy 2-core machine


def firehose(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PGFLEET, "firehose", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
    )


def explain(proc: subprocess.CompletedProcess, server=None) -> str:
    text = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    if server is not None:
        problems = [ln for ln in server.log().splitlines() if " INFO " not in ln]
        text += "\n--- pgfleet log (not INFO)\n" + "\n".join(problems[-40:])
    return text


@pytest.fixture(scope="module")
def fleet(make_module_server):
    return make_module_server("--workers", "2", "--pool-size", "5")


def test_firehose_500_connections_with_churn(fleet, tmp_path):
    out = tmp_path / "out"
    proc = firehose(
        "--dsn", fleet.url(),
        "--direct-dsn", fleet.direct_dsn(),
        "--connections", "500",
        "--churn", "100",
        "--qps", "50",
        "--duration", "10",
        "--ramp", "2",
        "--procs", "2",
        "--max-backends", "5",
        "--out", str(out),
    )
    assert proc.returncode == 0, explain(proc, fleet)
    assert "result       OK" in proc.stdout, explain(proc, fleet)

    summary = json.loads((out / "firehose.json").read_text())
    totals = summary["totals"]
    assert totals["connect_failures"] == 0, summary["failures"]
    assert totals["query_failures"] == 0, summary["failures"]
    assert totals["dropped"] == 0, summary["failures"]
    assert totals["held_max"] == 500, explain(proc, fleet)
    assert totals["closed_by_churn"] > 0 and totals["queries"] > 0, totals
    # Postgres was sampled and pgfleet kept to its 5 backends.
    assert summary["backends_max"] is not None and 1 <= summary["backends_max"] <= 5, summary

    with (out / "firehose.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_COLUMNS
    assert len(rows) == 10, rows  # one row per second of --duration
    assert [int(r["second"]) for r in rows] == list(range(10))
    assert max(int(r["held"]) for r in rows) == 500
    assert sum(int(r["opened"]) for r in rows) == totals["opened"] >= 500

    png = (out / "firehose.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_non_loopback_target_is_refused(tmp_path):
    # A documentation-range address (RFC 5737): nothing is sent, the run is refused up front.
    proc = firehose("--host", "192.0.2.10", "--port", "5432", "--password", "x",
                    "--connections", "10", "--duration", "2", "--out", str(tmp_path), timeout=30)
    assert proc.returncode == 2, explain(proc)
    assert "refusing non-loopback host" in proc.stderr, explain(proc)
    assert not (tmp_path / "firehose.csv").exists()


def test_wrong_password_fails_clearly(fleet, tmp_path):
    proc = firehose("--dsn", fleet.url(password="not-the-password"),
                    "--connections", "10", "--duration", "2", "--out", str(tmp_path), timeout=30)
    assert proc.returncode != 0, explain(proc)
    assert "password authentication failed" in proc.stderr, explain(proc)
    assert "28P01" in proc.stderr, explain(proc)


def test_scram_pbkdf2_runs_once_per_password(fleet):
    """Three SCRAM logins in one process: PBKDF2 runs for the first only; scramp checks
    the first exchange, the later ones take the generator's own quick path."""
    proto._scram_keys.cache_clear()
    proto._SCRAMP_CHECKED.clear()
    creds = proto.Credentials("postgres", PASSWORD, "postgres")

    async def logins() -> list:
        out = []
        for _ in range(3):
            s = await proto.Session.connect("127.0.0.1", fleet.port, creds, timeout=15)
            out.append(await s.query("SELECT 1", timeout=15))
            s.close()
        return out

    assert asyncio.run(asyncio.wait_for(logins(), 60)) == [[["1"]]] * 3
    info = proto._scram_keys.cache_info()
    assert (info.misses, info.hits) == (1, 2), info
    assert ("postgres", PASSWORD) in proto._SCRAMP_CHECKED


def test_scram_quick_path_still_checks_the_server() -> None:
    """A server-first message whose nonce does not extend ours, or a server signature
    that does not match, fails the login on the quick path too."""
    proto._SCRAMP_CHECKED.add(("u", "pw"))
    s = proto._Scram("u", "pw")
    assert s.client is None and s.first().startswith(b"n,,n=,r=")
    with pytest.raises(proto.PgError, match="bad server-first"):
        s.final(b"r=someone-elses-nonce,s=c2FsdA==,i=4096")
    s = proto._Scram("u", "pw")
    s.first()
    s.final(f"r={s.nonce}more,s=c2FsdA==,i=4096".encode())
    with pytest.raises(proto.PgError, match="does not match"):
        s.check(b"v=" + base64.b64encode(bytes(32)))


def test_firehose_md5_login(make_module_server, tmp_path):
    """The md5 exchange, for a server that asks for it."""
    server = make_module_server("--workers", "1", "--pool-size", "2", "--auth", "md5")
    proc = firehose("--dsn", server.url(), "--connections", "20", "--churn", "10",
                    "--qps", "20", "--duration", "3", "--ramp", "1", "--procs", "1",
                    "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 0, explain(proc, server)
    summary = json.loads((tmp_path / "firehose.json").read_text())
    assert summary["totals"]["opened"] >= 20 and summary["totals"]["queries"] > 0, summary


def test_generator_connects_without_a_resolver():
    """The generator's own non-blocking connect: it reaches a listener, and a port
    nobody listens on fails as "connection refused" (the failure the summary counts)."""
    import socket

    import uvloop

    from bench.firehose.worker import _os_kind, _sock_connect

    async def attempt(port: int) -> str:
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            try:
                await asyncio.wait_for(_sock_connect(loop, sock, ("127.0.0.1", port)), 10)
            except OSError as exc:
                return _os_kind(exc)
            return "connected to " + str(sock.getpeername()[1])

    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        assert uvloop.run(attempt(port)) == f"connected to {port}"
    # The listener is closed now: nothing accepts on that port any more.
    assert uvloop.run(attempt(port)) == "connection refused"


def test_a_connect_cancelled_in_the_same_loop_turn_is_not_woken() -> None:
    """The socket turns writable in the loop turn in which something else cancelled
    the connect: its writer callback runs before the connect's ``finally`` removes it,
    and must not wake a cancelled future (that raised InvalidStateError in the
    generator under load)."""
    import socket

    from bench.firehose.worker import _sock_connect

    async def scenario(port: int) -> None:
        loop = asyncio.get_running_loop()
        writers = []
        add_writer = loop.add_writer

        def recording_add_writer(fd, callback, *args):
            writers.append((callback, args))
            add_writer(fd, callback, *args)

        loop.add_writer = recording_add_writer  # a plain asyncio loop: patchable
        with socket.socket() as sock:
            sock.setblocking(False)
            task = loop.create_task(_sock_connect(loop, sock, ("127.0.0.1", port)))
            await asyncio.sleep(0)
            assert writers, "the connect did not wait for writability"
            task.cancel()
            callback, args = writers[0]
            callback(*args)  # the writer's turn comes before the task's
            with pytest.raises(asyncio.CancelledError):
                await task

    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        asyncio.run(scenario(port))
