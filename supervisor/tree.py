"""The process tree under ``pgfleet up``: Postgres, the pooler, and one gateway worker per CPU.

The listening socket is created once here and inherited by every worker, so a
worker that dies and is replaced never closes the port. Children that die are
restarted with backoff; on SIGINT/SIGTERM everything stops, Postgres last.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import multiprocess

import pgwire.auth  # noqa: F401  (its mock-SCRAM secret is created here, shared by forks)
from gateway import tls
from ipc.cancel_table import CancelTable
from ipc.epoch import SharedEpoch
from ipc.statement_catalog import MAX_PREPARED_PER_BACKEND, StatementCatalog

from . import metrics
from .config import Config
from .pgctld import PgInstance, PgWatcher

log = logging.getLogger("pgfleet.supervisor")

MAX_BACKOFF = 5.0
HEALTHY_AFTER = 10.0


class AlreadyRunningError(RuntimeError):
    pass


def _set_comm(name: str) -> None:
    """Name the process for ps/top (``ps -o comm``), so pooler and workers are told apart."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_supervisor() -> None:
    """Be sent SIGTERM (a clean stop) when the supervisor dies, as Postgres's backends
    end with their postmaster. A pooler and workers left behind by a killed supervisor
    would go on serving unsupervised, and, sharing the port through SO_REUSEPORT, take
    part of the connections of the next ``pgfleet up`` on it (which stops the Postgres
    they lease from)."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _own_session() -> None:
    """Put this server process in a session of its own, as Postgres puts each backend.

    With the kernel's autogroup scheduling (on by default in Debian's kernels), CPU time
    is shared out per session first: left in the supervisor's session, all the gateway
    workers together would get the share of one Postgres backend whenever Postgres is
    busy, and queue behind it on a loaded machine. The supervisor stops its children by
    pid with SIGTERM, so they need no signal from the terminal's process group.
    """
    try:
        os.setsid()
    except OSError:
        pass  # a session leader already


def _pooler_main(cfg_dict: dict) -> None:
    from pooler.server import main

    _set_comm("pgfleet-pooler")
    _die_with_supervisor()
    _own_session()
    main(cfg_dict)


def _worker_main(cfg_dict: dict, index: int, fd: int) -> None:
    from gateway.worker import main

    _set_comm(f"pgfleet-worker{index}")
    _die_with_supervisor()
    _own_session()
    main(cfg_dict, index, fd)


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    target: object
    args: tuple
    proc: multiprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self) -> None:
        ctx = multiprocess.get_context("fork")
        self.proc = ctx.Process(target=self.target, args=self.args, name=self.name, daemon=False)
        self.proc.start()
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()


def lock_home(cfg: Config):
    """Hold an exclusive lock on the home dir for as long as this process lives."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.home, 0o755)
    f = open(cfg.lock_file, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise AlreadyRunningError(
            f"pgfleet is already running on {cfg.home} (supervisor pid {other}); "
            "stop it first or use another --home"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def ensure_password(cfg: Config, given: str | None) -> str:
    """The superuser password: generated on first run and kept under the home dir."""
    pf = cfg.password_file
    if pf.exists():
        return pf.read_text().strip()
    password = given or secrets.token_urlsafe(18)
    pf.write_text(password + "\n")
    os.chmod(pf, 0o600)
    return password


def make_listen_socket(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    sock.listen(4096)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, cfg: Config, password: str | None = None) -> None:
        self.cfg = cfg
        self.given_password = password
        self.stopping = False
        self.children: list[Child] = []

    def run(self) -> int:
        cfg = self.cfg
        lock = lock_home(cfg)
        try:
            tls.prepare(cfg)  # before forking: the workers inherit the loaded context
        except tls.TlsError:
            lock.close()
            raise
        pg = PgInstance(
            home=cfg.home, port=cfg.pg_port, max_connections=max(100, cfg.pool_size + 20),
            batch_sched=cfg.postgres_sched == "batch",
        )
        first_run = not pg.is_initialized()
        password = ensure_password(cfg, self.given_password)
        if first_run:
            log.info("initialising Postgres under %s", pg.data_dir)
            pg.init(password)
        elif self.given_password and self.given_password != password:
            log.warning("--password is only used on first run; keeping the existing one")
        if pg.is_running():
            # We hold the home's lock, so this postmaster outlived a supervisor that was killed.
            log.warning("stopping a Postgres left running by an earlier pgfleet on this home")
            pg.stop()
        pg.update_config()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if cfg.metrics_port:
            # Before any child exists, so that every process writes its samples there.
            metrics.prepare_dir(cfg.metrics_dir)
            metrics.serve(cfg.host, cfg.metrics_port)
        watcher = PgWatcher(pg)
        table = catalog = epoch = None
        try:
            watcher.start()
            table = CancelTable.create(cfg.cancel_table_name, cfg.max_clients)
            catalog = StatementCatalog.create(
                cfg.statement_catalog_name, cfg.statement_catalog_size, cfg.backend_slots,
                MAX_PREPARED_PER_BACKEND,
            )
            epoch = SharedEpoch.create(cfg.role_epoch_name)
            listen = make_listen_socket(cfg.host, cfg.port)
            cfg_dict = cfg.to_dict()
            cfg.ipc_dir.mkdir(parents=True, exist_ok=True)
            for stale in cfg.ipc_dir.glob("worker-*.ready"):
                stale.unlink()
            pooler = Child("pgfleet-pooler", _pooler_main, (cfg_dict,))
            self.children.append(pooler)
            pooler.start()
            self._wait_for(lambda: cfg.pooler_socket.exists(), "the pooler")
            for i in range(cfg.workers):
                w = Child(f"pgfleet-worker-{i}", _worker_main, (cfg_dict, i, listen.fileno()))
                self.children.append(w)
                w.start()
            self._wait_for(
                lambda: all(cfg.worker_ready_file(i).exists() for i in range(cfg.workers)),
                "the gateway workers",
            )
            self._banner(password)
            while not self.stopping:
                self._check_children()
                time.sleep(0.2)
        finally:
            self._stop_children()
            if table is not None:
                table.unlink()
            if catalog is not None:
                catalog.unlink()
            if epoch is not None:
                epoch.unlink()
            watcher.stop()  # Postgres last
            lock.close()
        return 0

    def _wait_for(self, ready, what: str, timeout: float = 60.0) -> None:
        """Wait for a child to come up, so the banner means clients can be served."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.stopping:
                raise SystemExit(0)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
            self._check_children()
            time.sleep(0.05)

    def _banner(self, password: str) -> None:
        cfg = self.cfg
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(
            f"pgfleet is up: {cfg.workers} workers on {cfg.host}:{cfg.port}, "
            f"pool size {cfg.pool_size}, auth {cfg.auth}\n"
            f"  connect: psql \"postgres://postgres:{password}@{host}:{cfg.port}/postgres\"\n"
            f"  user: postgres  password: {password}  (kept in {cfg.password_file})\n"
            f"  tls: {self._tls_line()}\n"
            f"  home: {cfg.home}  logs: {cfg.log_dir}\n"
            "  Ctrl-C stops everything.",
            flush=True,
        )

    def _tls_line(self) -> str:
        cfg = self.cfg
        if not cfg.tls:
            return "off"
        if Path(cfg.tls_cert).parent == cfg.tls_dir:
            return f"on, self-signed certificate {cfg.tls_cert} (use it as sslrootcert)"
        return f"on, certificate {cfg.tls_cert}"

    def _on_signal(self, signum: int, frame) -> None:
        self.stopping = True

    def _check_children(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.alive():
                if c.failures and now - c.started > HEALTHY_AFTER:
                    c.failures = 0
                continue
            if c.restart_at == 0.0:
                code = c.proc.exitcode if c.proc is not None else None
                if c.pid is not None:
                    metrics.process_exited(c.pid)
                delay = min(MAX_BACKOFF, 0.1 * (2**c.failures))
                c.failures += 1
                c.restart_at = now + delay
                log.warning("%s (pid %s) exited with %s; restarting in %.1fs", c.name, c.pid, code, delay)
            elif now >= c.restart_at:
                c.restart_at = 0.0
                c.restarts += 1
                c.start()

    def _stop_children(self) -> None:
        # Workers first, so that clients are told before the pooler closes backends.
        workers = [c for c in self.children if c.name.startswith("pgfleet-worker")]
        others = [c for c in self.children if c not in workers]
        for group in (workers, others):
            for c in group:
                if c.alive():
                    os.kill(c.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for c in group:
                if c.proc is None:
                    continue
                c.proc.join(max(0.0, deadline - time.monotonic()))
                if c.alive():
                    os.kill(c.pid, signal.SIGKILL)
                    c.proc.join(2.0)


def run_up(cfg: Config, password: str | None) -> int:
    try:
        return Supervisor(cfg, password).run()
    except (AlreadyRunningError, tls.TlsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

