"""The floor under any Python gateway: a uvloop byte pipe with no logic at all.

Each client gets its own Postgres connection (over Postgres's Unix socket) and every
byte is copied across unchanged, by as many forked uvloop workers as pgfleet runs, all
accepting on one shared listening socket as pgfleet's do. It parses nothing, pools
nothing, keeps no state: what it costs per transaction is what uvloop, CPython's
callback and the kernel's extra hop cost. A gateway written in this runtime that reads
the messages it forwards can only be slower, so ``bench.pgbench_compare --floor``
runs it beside pgfleet and PgBouncer to show how much of the gap is the runtime's.

    python -m bench.pipe_floor --port 25440 --backend /path/to/.s.PGSQL.5432 --workers 2

Not a product: no TLS, no cancel routing, no limits. For benchmarks on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

import uvloop


class _BackendSide(asyncio.Protocol):
    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _ClientSide(asyncio.Protocol):
    """One client; bytes that arrive before the backend connection is up wait in a list."""

    def __init__(self, backend_path: str) -> None:
        self.backend_path = backend_path
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.early: list[bytes] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend, _ = await loop.create_unix_connection(
                lambda: _BackendSide(self), self.backend_path)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            backend.close()
            return
        self.backend = backend
        for data in self.early:
            backend.write(data)
        self.early = None

    def data_received(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.close()


def _serve(sock: socket.socket, backend_path: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(lambda: _ClientSide(backend_path), sock=sock,
                                          backlog=4096)
        await stop
        server.close()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipe_floor", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", required=True, help="Postgres's Unix socket file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    if not a.host.startswith("127."):
        p.error("--host: loopback only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(4096)
    sock.setblocking(False)
    children = []
    for _ in range(max(1, a.workers)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _serve(sock, a.backend)
            os._exit(0)
        children.append(pid)
    sock.close()

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"pipe floor on {a.host}:{a.port} -> {a.backend}, {len(children)} workers", flush=True)
    for pid in children:  # (waitpid resumes by itself after the signal handler)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
