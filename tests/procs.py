"""Which pgfleet process is which, and which worker serves a connection.

``server.child_pids()`` lists the supervisor's direct children: the postmaster
(``server.postmaster_pid()``), the pooler (the process that listens on
``<home>/ipc/pooler.sock``, found with ``ss -xlp``) and the gateway workers (everything
else). Which worker serves a client connection is read from ``ss -tnp``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import pytest


def pid_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = stat[stat.rindex(")") + 2 :].split()[0]
    return state in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid``."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, timeout=10
    ).stdout
    return [int(p) for p in out.split()]


def pooler_pid(server) -> int:
    path = str(server.home / "ipc" / "pooler.sock")
    out = subprocess.run(["ss", "-xlpH"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        if path in line.split():
            found = re.findall(r"pid=(\d+)", line)
            if found:
                return int(found[0])
    raise AssertionError(f"no process listens on {path}:\n{out}")


def worker_pids(server) -> list[int]:
    others = {pooler_pid(server), server.postmaster_pid()}
    return sorted(p for p in server.child_pids() if p not in others)


def client_port(conn: psycopg.Connection) -> int:
    """The local TCP port of a psycopg connection."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def worker_of(server, conn: psycopg.Connection) -> int:
    """PID of the pgfleet process holding the server side of ``conn`` (ss -tnp)."""
    port = client_port(conn)
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{server.port} and dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    assert len(pids) == 1, f"cannot tell which worker serves port {port}: {out!r}"
    return pids.pop()


def connect_on_worker(
    server, same_as: int | None, differ_from: int | None, strict_login: bool = True, **kw
) -> psycopg.Connection:
    """Open psycopg connections until one lands on the wanted worker (others are closed).

    With ``strict_login=False`` a login refused for want of a free backend is retried
    after the worker caches have given their idle backends back (lease_idle_seconds).
    """
    for _ in range(40):
        try:
            conn = psycopg.connect(server.dsn(), connect_timeout=10, **kw)
        except psycopg.OperationalError as exc:
            if strict_login or "no backend became free" not in str(exc):
                raise
            time.sleep(3)
            continue
        pid = worker_of(server, conn)
        if (same_as is None or pid == same_as) and (differ_from is None or pid != differ_from):
            return conn
        conn.close()
    pytest.fail("the kernel never handed a connection to the wanted worker")


def spread_connections(server, per_worker: int, **kw) -> dict[int, list[psycopg.Connection]]:
    """Open connections until every worker serves at least ``per_worker`` of them."""
    workers = worker_pids(server)
    by_worker: dict[int, list[psycopg.Connection]] = {w: [] for w in workers}
    extra: list[psycopg.Connection] = []
    for _ in range(60):
        if all(len(c) >= per_worker for c in by_worker.values()):
            break
        conn = psycopg.connect(server.dsn(), connect_timeout=10, **kw)
        w = worker_of(server, conn)
        assert w in by_worker, f"connection served by {w}, not a worker {workers}"
        (by_worker[w] if len(by_worker[w]) < per_worker else extra).append(conn)
    for conn in extra:
        conn.close()
    counts = {w: len(c) for w, c in by_worker.items()}
    if not all(n >= per_worker for n in counts.values()):
        for conns in by_worker.values():
            for conn in conns:
                conn.close()
        pytest.fail(f"connections never reached every worker: {counts}")
    return by_worker
