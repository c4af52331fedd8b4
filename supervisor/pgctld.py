"""Postgres process control for pgfleet.

This module owns the lifecycle of the single PostgreSQL cluster that pgfleet
fronts: creating it (``initdb``), writing pgfleet's configuration overrides,
running the postmaster directly (so the supervisor is its parent and sees it
die), waiting until it accepts connections, stopping it, and keeping it alive
with :class:`PgWatcher`.

The readiness probe speaks just enough of the v3 frontend/backend protocol to
log in over the Unix socket; it is deliberately self-contained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PG_BIN_CANDIDATES",
    "AlreadyRunning",
    "PgInstance",
    "PgWatcher",
    "WaitCancelled",
    "find_pg_bin",
]

log = logging.getLogger("pgfleet.pgctld")

PG_BIN_CANDIDATES = [
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/14/bin",
    "/usr/pgsql-15/bin",
    "/usr/pgsql-16/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@15/bin",
    "/usr/local/bin",
    "/usr/bin",
]

_REQUIRED_BINARIES = ("initdb", "postgres")

# Longest Unix socket path the kernel accepts (sun_path is 108 bytes incl. NUL).
_MAX_SOCKET_PATH = 107

_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

_CONF_NAME = "pgfleet.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"

# SQLSTATEs meaning "the server is there but not accepting logins yet".
_NOT_READY_SQLSTATES = {
    "57P03",  # cannot_connect_now: starting up, recovering, shutting down
    "53300",  # too_many_connections (transient)
}

_PROTOCOL_V3 = 196608


class AlreadyRunning(RuntimeError):
    """A postmaster is already running on this data directory."""

    def __init__(self, pid: int, data_dir: Path) -> None:
        super().__init__(f"postgres is already running on {data_dir} (postmaster pid {pid})")
        self.pid = pid
        self.data_dir = data_dir


class WaitCancelled(RuntimeError):
    """wait_ready() was interrupted through its ``cancel`` event."""


def find_pg_bin() -> Path:
    """Return the directory holding ``initdb`` and ``postgres``.

    ``$PGFLEET_PG_BIN`` wins if set (and must be valid); otherwise the first
    entry of :data:`PG_BIN_CANDIDATES` containing both binaries.
    """
    override = os.environ.get("PGFLEET_PG_BIN")
    if override:
        path = Path(override)
        if _has_pg_binaries(path):
            return path
        raise RuntimeError(
            f"PGFLEET_PG_BIN={override!r} does not contain executable "
            f"{' and '.join(_REQUIRED_BINARIES)}"
        )
    for candidate in PG_BIN_CANDIDATES:
        path = Path(candidate)
        if _has_pg_binaries(path):
            return path
    raise RuntimeError(
        "cannot find PostgreSQL server binaries (initdb, postgres); looked in "
        + ", ".join(PG_BIN_CANDIDATES)
        + ". Install PostgreSQL or set PGFLEET_PG_BIN to its bin directory."
    )


def _has_pg_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


# --------------------------------------------------------------------------
# process helpers (Linux /proc based, with portable fallbacks)
# --------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """Single-letter state from /proc/<pid>/stat, or None if unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    tail = data[data.rfind(b")") + 2 :]
    return tail[:1].decode("ascii", "replace") or None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return _proc_state(pid) not in ("Z", "X")


def _processes_in_dir(directory: Path) -> list[int]:
    """Live PIDs whose working directory is ``directory``.

    Every postgres process (postmaster and all its children) chdirs into the
    data directory, so this finds the whole cluster, including backends
    orphaned by a postmaster that was SIGKILLed. Empty without /proc.
    """
    target = os.path.realpath(directory)
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == target and _pid_alive(int(entry)):
            found.append(int(entry))
    return found


def _signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@contextlib.contextmanager
def _scheduling(batch: bool):
    """Around the postmaster's fork, make this thread SCHED_BATCH, which the
    postmaster inherits at the fork and every process it forks after it: no race
    with its early children, and the supervisor's thread is back as it was after.

    SCHED_BATCH keeps the same CPU share; the one difference is that a backend woken
    by a gateway worker's write no longer preempts that worker on a busy CPU. Behind
    a pooler every backend wakeup is such a write, and the preempted worker was in
    the middle of other clients' traffic: each preemption cost two context switches
    and left its batch waiting."""
    if not batch or not hasattr(os, "SCHED_BATCH"):
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.warning("could not start postgres as SCHED_BATCH: %s", exc)
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


# --------------------------------------------------------------------------
# PgInstance
# --------------------------------------------------------------------------


@dataclass
class PgInstance:
    """One PostgreSQL cluster living under a pgfleet home directory."""

    home: Path
    port: int = 5432
    max_connections: int = 100
    os_user: str | None = None
    # Run the postmaster (and so every backend it forks) as SCHED_BATCH: see _scheduling.
    batch_sched: bool = True
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().absolute()

    # ---- derived paths ---------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "postgres.log"

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def postmaster_pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    # ---- state -----------------------------------------------------------

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def is_running(self) -> bool:
        if self.proc is not None and self.proc.poll() is None:
            return True
        return self._live_postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster (ours or found via postmaster.pid)."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return self._live_postmaster_pid()

    # ---- init / config ---------------------------------------------------

    def init(self, superuser_password: str) -> None:
        """Create the cluster with ``initdb`` and write pgfleet.conf."""
        if not superuser_password:
            raise ValueError("superuser password must not be empty")
        if any(c in superuser_password for c in "\r\n\0"):
            raise ValueError("superuser password must not contain newlines or NUL")
        if self.is_initialized():
            raise RuntimeError(f"{self.data_dir} already holds a PostgreSQL cluster")
        self._validate_settings()
        pg_bin = find_pg_bin()
        acct = self._account()
        self._check_traversable(acct)
        self._make_dirs(acct)
        self._check_traversable(acct)  # intermediate dirs created under a strict umask

        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise RuntimeError(
                f"{self.data_dir} is not empty but holds no cluster; refusing to initdb over it"
            )

        fd, pwfile = tempfile.mkstemp(prefix=".initdb-pw-", dir=self.home)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), acct.uid, acct.gid)
                f.write(superuser_password + "\n")
            base = [
                str(pg_bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
            ]
            result = self._run_as(acct, base + ["--locale=C.UTF-8"], pg_bin)
            if result.returncode != 0 and "locale" in result.stdout.lower():
                log.warning("locale C.UTF-8 unusable, falling back to --no-locale")
                self._empty_data_dir()
                result = self._run_as(acct, base + ["--no-locale"], pg_bin)
            if result.returncode != 0:
                raise RuntimeError(
                    f"initdb failed (exit {result.returncode}):\n{result.stdout.strip()}"
                )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pwfile)
        log.info("initialized PostgreSQL cluster in %s", self.data_dir)
        self.update_config()

    def update_config(self) -> None:
        """(Re)write pgfleet.conf from the current fields; takes effect on next start."""
        if not self.is_initialized():
            raise RuntimeError(f"no PostgreSQL cluster in {self.data_dir}; run init() first")
        self._validate_settings()
        acct = self._account()
        self._ensure_runtime_dirs(acct)

        socket_dir = str(self.socket_dir).replace("'", "''")
        lines = [
            "# Managed by pgfleet; rewritten on every configuration change.",
            "listen_addresses = ''",
            f"unix_socket_directories = '{socket_dir}'",
            "unix_socket_permissions = 0700",
            f"port = {int(self.port)}",
            f"max_connections = {int(self.max_connections)}",
            "password_encryption = 'scram-sha-256'",
            "logging_collector = off",
            "log_destination = 'stderr'",
            "shared_buffers = '128MB'",
            "fsync = on",
            "",
        ]
        self._write_owned(self.data_dir / _CONF_NAME, "\n".join(lines), acct)

        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text(encoding="utf-8")
        if _INCLUDE_LINE not in text.splitlines():
            if not text.endswith("\n"):
                text += "\n"
            text += f"\n# pgfleet overrides (must stay last)\n{_INCLUDE_LINE}\n"
            self._write_owned(main_conf, text, acct)

    # ---- start / readiness / stop ---------------------------------------

    def start(self) -> subprocess.Popen:
        """Launch ``postgres -D data_dir`` as the unprivileged user."""
        if self.proc is not None and self.proc.poll() is None:
            raise AlreadyRunning(self.proc.pid, self.data_dir)
        if not self.is_initialized():
            raise RuntimeError(f"no PostgreSQL cluster in {self.data_dir}; run init() first")
        live = self._live_postmaster_pid()
        if live is not None:
            raise AlreadyRunning(live, self.data_dir)
        self._validate_settings()
        pg_bin = find_pg_bin()
        acct = self._account()
        self._ensure_runtime_dirs(acct)

        fresh_log = not self.log_file.exists()
        with open(self.log_file, "ab") as logf:
            if fresh_log and os.geteuid() == 0:
                os.fchown(logf.fileno(), acct.uid, acct.gid)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            logf.write(f"--- pgfleet: starting postgres at {stamp} ---\n".encode())
            logf.flush()
            # Forked as SCHED_BATCH (see _scheduling): every process it forks inherits it.
            with _scheduling(self.batch_sched):
                self.proc = subprocess.Popen(
                    [str(pg_bin / "postgres"), "-D", str(self.data_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self._child_env(pg_bin),
                    cwd=str(self.home),
                    close_fds=True,
                    # Keep terminal signals (^C to the supervisor) away from the
                    # postmaster: the supervisor decides when postgres stops.
                    process_group=0,
                    **self._user_kwargs(acct),
                )
        log.info("started postgres (pid %d) on %s", self.proc.pid, self.data_dir)
        return self.proc

    def wait_ready(self, timeout: float = 30.0, *, cancel: threading.Event | None = None) -> None:
        """Block until a real login over the Unix socket reaches ReadyForQuery.

        Raises TimeoutError (with the log tail) if not ready within ``timeout``,
        RuntimeError (with the log tail) if the postmaster exits meanwhile, and
        WaitCancelled if ``cancel`` gets set.
        """
        deadline = time.monotonic() + timeout
        last_issue = "socket not there yet"
        while True:
            if cancel is not None and cancel.is_set():
                raise WaitCancelled("wait for postgres readiness cancelled")
            proc = self.proc
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with code {proc.returncode} before becoming ready; "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"postgres not ready after {timeout:.1f}s ({last_issue}); "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            try:
                ready, detail = self._probe(min(5.0, max(remaining, 0.1)))
            except _ServerRefused as exc:
                raise RuntimeError(
                    f"postgres is up but refused the readiness login: {exc}; "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                ) from None
            if ready:
                return
            last_issue = detail
            if cancel is not None:
                cancel.wait(0.1)
            else:
                time.sleep(0.1)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut the postmaster down; escalate to SIGQUIT, then SIGKILL. Idempotent."""
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(
                f"unknown stop mode {mode!r}; expected one of {sorted(_STOP_SIGNALS)}"
            ) from None
        proc = self.proc
        if proc is not None and proc.poll() is None:
            pid = proc.pid
        else:
            pid = self._live_postmaster_pid()
            proc = None
        if pid is not None:
            self._stop_postmaster(pid, proc, sig, mode, timeout)
        # A postmaster that was SIGKILLed leaves orphaned children behind;
        # a normal shutdown leaves none, making this a no-op.
        self.kill_leftovers()

    def kill_leftovers(self, grace: float = 2.0) -> list[int]:
        """Kill processes of this data dir that outlived their postmaster.

        Only acts when no postmaster is alive. Sends SIGQUIT (postgres' quick
        exit), then SIGKILL after ``grace`` seconds. Returns the PIDs found.
        """
        if self.postmaster_pid() is not None:
            return []
        pids = _processes_in_dir(self.data_dir)
        if not pids:
            return []
        log.warning("killing %d orphaned postgres process(es): %s", len(pids), pids)
        for pid in pids:
            _signal_quietly(pid, signal.SIGQUIT)
        deadline = time.monotonic() + grace
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _pid_alive(pid):
                _signal_quietly(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def _stop_postmaster(
        self, pid: int, proc: subprocess.Popen | None, sig: int, mode: str, timeout: float
    ) -> None:
        log.info("stopping postgres (pid %d, %s shutdown)", pid, mode)
        _signal_quietly(pid, sig)
        if self._wait_exit(pid, proc, timeout):
            return
        if sig != signal.SIGQUIT:
            log.warning("postgres (pid %d) did not stop in %.1fs; sending SIGQUIT", pid, timeout)
            _signal_quietly(pid, signal.SIGQUIT)
            if self._wait_exit(pid, proc, min(timeout, 5.0)):
                return
        log.error("postgres (pid %d) ignored SIGQUIT; sending SIGKILL", pid)
        _signal_quietly(pid, signal.SIGKILL)
        if not self._wait_exit(pid, proc, 5.0):
            raise RuntimeError(f"postgres (pid {pid}) survived SIGKILL")

    # ---- internals -------------------------------------------------------

    def _validate_settings(self) -> None:
        if not 1 <= int(self.port) <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if int(self.max_connections) < 1:
            raise ValueError(f"max_connections must be positive: {self.max_connections}")
        sock = str(self.socket_path)
        if len(sock.encode()) > _MAX_SOCKET_PATH:
            raise RuntimeError(
                f"Unix socket path {sock} is {len(sock.encode())} bytes, over the "
                f"{_MAX_SOCKET_PATH}-byte limit; use a shorter pgfleet home"
            )
        if any(c in str(self.socket_dir) for c in ',"'):
            raise RuntimeError(f"socket directory must not contain ',' or '\"': {self.socket_dir}")

    def _account(self) -> _Account:
        euid = os.geteuid()
        name = self.os_user
        if name is None:
            name = "postgres" if euid == 0 else pwd.getpwuid(euid).pw_name
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"OS user {name!r} for running postgres does not exist") from None
        if entry.pw_uid == 0:
            raise RuntimeError(
                "postgres refuses to run as root; set os_user to an unprivileged account"
            )
        if euid != 0 and entry.pw_uid != euid:
            raise RuntimeError(
                f"cannot run postgres as {name!r}: switching users requires root "
                f"(current uid {euid})"
            )
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return _Account(name, entry.pw_uid, entry.pw_gid, groups)

    def _user_kwargs(self, acct: _Account) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": acct.uid, "group": acct.gid, "extra_groups": list(acct.groups)}

    @staticmethod
    def _child_env(pg_bin: Path) -> dict[str, str]:
        return {"PATH": f"{pg_bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def _run_as(self, acct: _Account, argv: list[str], pg_bin: Path):
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._child_env(pg_bin),
            cwd=str(self.home),
            check=False,
            **self._user_kwargs(acct),
        )

    def _check_traversable(self, acct: _Account) -> None:
        """Every existing directory from / down to home must be searchable by acct."""
        for directory in [*reversed(self.home.parents), self.home]:
            try:
                st = directory.stat()
            except FileNotFoundError:
                break  # the rest will be created by us
            if not stat.S_ISDIR(st.st_mode):
                raise RuntimeError(f"{directory} is not a directory")
            if st.st_uid == acct.uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in acct.groups:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise RuntimeError(
                    f"directory {directory} (mode {stat.filemode(st.st_mode)}) is not "
                    f"traversable by OS user {acct.name!r}, which postgres runs as; "
                    f"choose a pgfleet home outside it or grant it search (x) permission"
                )

    def _make_dirs(self, acct: _Account) -> None:
        if not self.home.exists():
            self.home.mkdir(parents=True)
            os.chmod(self.home, 0o755)
        self._make_owned_dir(self.data_dir, 0o700, acct)
        self._ensure_runtime_dirs(acct)

    def _ensure_runtime_dirs(self, acct: _Account) -> None:
        self._make_owned_dir(self.socket_dir, 0o755, acct)
        self._make_owned_dir(self.log_dir, 0o750, acct)

    @staticmethod
    def _make_owned_dir(path: Path, mode: int, acct: _Account) -> None:
        if not path.exists():
            path.mkdir(mode=mode)
            os.chmod(path, mode)
        if os.geteuid() == 0:
            st = path.stat()
            if (st.st_uid, st.st_gid) != (acct.uid, acct.gid):
                os.chown(path, acct.uid, acct.gid)

    @staticmethod
    def _write_owned(path: Path, text: str, acct: _Account) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), acct.uid, acct.gid)
                os.fchmod(f.fileno(), 0o600)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _empty_data_dir(self) -> None:
        if not self.data_dir.exists():
            return
        for entry in self.data_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _live_postmaster_pid(self) -> int | None:
        """PID from postmaster.pid if it names a live postgres of this data dir."""
        try:
            first = self.postmaster_pid_file.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            first = ""
        try:
            pid = int(first.splitlines()[0].strip())
        except (IndexError, ValueError):
            return None
        if pid <= 0 or not _pid_alive(pid):
            return None
        # Guard against PID reuse: the postmaster chdirs into its data dir.
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            return None if os.path.isdir("/proc/self") else pid
        except PermissionError:
            cwd = None
        if cwd is not None:
            return pid if os.path.realpath(cwd) == os.path.realpath(self.data_dir) else None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return pid
        return pid if comm.startswith("postgres") else None

    @staticmethod
    def _wait_exit(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                data = f.read()
        except OSError as exc:
            return f"(log unavailable: {exc})"
        text = data.decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def _probe(self, timeout: float) -> tuple[bool, str]:
        """One login attempt. (True, '') when ready; (False, why) when not yet."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            try:
                sock.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                return False, f"connect: {exc.strerror or exc}"
            sock.sendall(_startup_message("postgres", "postgres"))
            while True:
                kind, body = _read_message(sock)
                if kind == b"R":
                    (code,) = struct.unpack("!i", body[:4])
                    if code != 0:
                        # The server is accepting logins; it just wants a password.
                        return True, ""
                elif kind == b"E":
                    fields = _parse_error(body)
                    sqlstate = fields.get("C", "")
                    message = f"{sqlstate} {fields.get('M', '')}".strip()
                    if sqlstate in _NOT_READY_SQLSTATES:
                        return False, message
                    raise _ServerRefused(message)
                elif kind == b"Z":
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X" + struct.pack("!i", 4))
                    return True, ""
                # 'S' ParameterStatus, 'K' BackendKeyData, 'N' Notice: ignore
        except (ConnectionError, TimeoutError, EOFError, OSError) as exc:
            return False, f"handshake: {exc}"
        finally:
            sock.close()


class _ServerRefused(Exception):
    pass


def _startup_message(user: str, database: str) -> bytes:
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (
            ("user", user),
            ("database", database),
            ("application_name", "pgfleet-pgctld"),
        )
    )
    body = struct.pack("!i", _PROTOCOL_V3) + params + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    kind = header[:1]
    (length,) = struct.unpack("!i", header[1:])
    if length < 4 or length > 1 << 24:
        raise EOFError(f"bad message length {length} for type {kind!r}")
    return kind, _recv_exact(sock, length - 4)


def _parse_error(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


# --------------------------------------------------------------------------
# PgWatcher
# --------------------------------------------------------------------------


class PgWatcher:
    """Keeps one PgInstance alive: restarts it with backoff when the postmaster dies."""

    POLL_INTERVAL = 0.2
    MIN_BACKOFF = 0.2
    # A postmaster that stayed up this long resets the backoff.
    STABLE_AFTER = 30.0

    def __init__(
        self,
        instance: PgInstance,
        on_restart: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.instance = instance
        self.on_restart = on_restart
        self.max_backoff = max(max_backoff, self.MIN_BACKOFF)
        self.restarts = 0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = self.MIN_BACKOFF
        self._up_since = 0.0

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("PgWatcher already started")
        self._stop_event.clear()
        self.instance.start()
        try:
            self.instance.wait_ready()
        except BaseException:
            self.instance.stop("immediate", timeout=10.0)
            raise
        self._up_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pgfleet-pgwatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop_event.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=60.0)
            if thread.is_alive():
                log.error("postgres watcher thread did not exit in time")
            self._thread = None
        self.instance.stop("fast")

    def _run(self) -> None:
        while not self._stop_event.wait(self.POLL_INTERVAL):
            proc = self.instance.proc
            if proc is None or proc.poll() is None:
                continue
            uptime = time.monotonic() - self._up_since
            log.warning(
                "postgres (pid %d) died with exit code %s after %.1fs; restarting",
                proc.pid,
                proc.returncode,
                uptime,
            )
            if uptime >= self.STABLE_AFTER:
                self._backoff = self.MIN_BACKOFF
            try:
                self._restart()
            except Exception:  # never let the watcher thread die silently
                log.exception("postgres watcher: unexpected error while restarting")

    def _restart(self) -> None:
        attempt = 0
        while True:
            if self._stop_event.wait(self._backoff):
                return
            self._backoff = min(self._backoff * 2, self.max_backoff)
            attempt += 1
            try:
                # Backends busy in a long query only notice postmaster death
                # when they next wait or talk to their client; until they exit
                # they pin the old shared memory and postgres refuses to start.
                self.instance.kill_leftovers()
                self.instance.start()
                self.instance.wait_ready(cancel=self._stop_event)
            except WaitCancelled:
                return  # stop() will shut the instance down
            except Exception as exc:
                log.warning("postgres restart attempt %d failed: %s", attempt, exc)
                proc = self.instance.proc
                if proc is not None and proc.poll() is None:
                    with contextlib.suppress(Exception):
                        self.instance.stop("immediate", timeout=5.0)
                continue
            self.restarts += 1
            self._up_since = time.monotonic()
            log.info(
                "postgres restarted (pid %d) after %d attempt(s); restarts=%d",
                self.instance.proc.pid,
                attempt,
                self.restarts,
            )
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception:
                    log.exception("postgres watcher: on_restart callback failed")
            return
