"""bench.pipe_floor, the runtime's floor in the throughput benchmark: a real client talks
to the real Postgres through it, each client on a Postgres connection of its own, and
SIGTERM stops it and its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg

from .conftest import ROOT, free_port


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def test_pipe_floor_passes_a_session_through_and_stops(server) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.pipe_floor", "--port", str(port), "--workers", "2",
         "--backend", server.direct_socket],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "pipe floor on" in proc.stdout.readline()
        workers = _children(proc.pid)
        assert len(workers) == 2
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10"
        with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
            # Session state survives: the pipe is a plain connection, not a pool.
            a.execute("set application_name = 'through-the-pipe'")
            a.execute("prepare s as select $1::int + 1")
            assert a.execute("execute s(41)").fetchone() == (42,)
            assert a.execute("show application_name").fetchone() == ("through-the-pipe",)
            pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
            pid_b = b.execute("select pg_backend_pid()").fetchone()[0]
            assert pid_a != pid_b
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)


def test_pipe_floor_is_loopback_only() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.pipe_floor", "--host", "0.0.0.0",
                          "--port", str(free_port()), "--backend", "/nonexistent"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "loopback only" in out.stderr
