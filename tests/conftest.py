"""Fixtures that run pgfleet the way a user does: the real CLI, a real Postgres, real clients."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PGFLEET = str(Path(sys.executable).parent / "pgfleet")
PASSWORD = "s3cret-pw"


def free_port() -> int:
    """A free TCP port below the ephemeral range (which connection churn fills)."""
    for _ in range(200):
        port = random.randint(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class PgfleetServer:
    """``pgfleet up`` as a subprocess on a temporary home and a free port."""

    def __init__(self, *args: str, home: Path | None = None) -> None:
        if home is None:
            home = Path(tempfile.mkdtemp(dir="/tmp", prefix="pgfleet-test-")) / "home"
            os.chmod(home.parent, 0o755)
            self._own_home = True
        else:
            self._own_home = False
        self.home = home
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.log_path = home.parent / f"pgfleet-{self.port}.log"

    def start(self, timeout: float = 60.0) -> PgfleetServer:
        cmd = [PGFLEET, "up", "--home", str(self.home), "--port", str(self.port),
               "--password", PASSWORD, *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgfleet exited early:\n{self.log()}")
            if "pgfleet is up" in self.log():
                if self._can_connect():
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"pgfleet did not come up:\n{self.log()}")

    def _can_connect(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str = PASSWORD,
            **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}",
                 f"password={password}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def url(self, user: str = "postgres", dbname: str = "postgres",
            password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def socket_dir(self) -> str:
        return str(self.home / "run")

    @property
    def direct_socket(self) -> str:
        """The embedded Postgres's own Unix socket (trust), for raw-protocol clients."""
        return f"{self.socket_dir}/.s.PGSQL.5432"

    def direct_dsn(self, dbname: str = "postgres") -> str:
        """A connection straight to the embedded Postgres (Unix socket, trust)."""
        return f"host={self.socket_dir} port=5432 user=postgres dbname={dbname}"

    def env(self) -> dict[str, str]:
        """Environment for libpq tools (psql, pgbench) pointed at pgfleet."""
        env = dict(os.environ)
        env.update(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER="postgres",
                   PGPASSWORD=PASSWORD, PGDATABASE="postgres")
        return env

    def child_pids(self) -> list[int]:
        """PIDs of the supervisor's direct children (pooler and workers)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    def postmaster_pid(self) -> int:
        return int((self.home / "pgdata" / "postmaster.pid").read_text().split()[0])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        if self._own_home:
            shutil.rmtree(self.home.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    """One shared pgfleet: 2 workers, 5 backends, SCRAM, short login timeout."""
    s = PgfleetServer("--workers", "2", "--pool-size", "5", "--auth-timeout", "3",
                      "--query-wait-timeout", "30")
    s.start()
    yield s
    s.cleanup()


def _server_factory():
    """Yields a function that starts pgfleet instances with given options; stops them after."""
    started: list[PgfleetServer] = []

    def make(*args: str) -> PgfleetServer:
        s = PgfleetServer(*args)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.cleanup()


@pytest.fixture
def make_server():
    """Start extra pgfleet instances for one test."""
    yield from _server_factory()


@pytest.fixture(scope="module")
def make_module_server():
    """Start extra pgfleet instances shared by one test module."""
    yield from _server_factory()
