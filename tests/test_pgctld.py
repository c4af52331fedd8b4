"""Tests for supervisor.pgctld against a real PostgreSQL (no mocks)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from supervisor.pgctld import (
    AlreadyRunning,
    PgInstance,
    PgWatcher,
    find_pg_bin,
)

try:
    PG_BIN = find_pg_bin()
except RuntimeError as exc:  # pragma: no cover - environment without postgres
    pytest.skip(f"PostgreSQL binaries not available: {exc}", allow_module_level=True)

PASSWORD = "s3cret-'quote\"-pw"


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] not in (b"Z", b"X")


def psql(inst: PgInstance, sql: str) -> str:
    result = subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-X",
            "-h",
            str(inst.socket_dir),
            "-p",
            str(inst.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-tA",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def cluster_home():
    """One initdb'd cluster shared by the module (initdb is the slow part)."""
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="pgfleet-test-"))
    os.chmod(home, 0o755)
    port = random.randint(20000, 30000)
    inst = PgInstance(home=home, port=port, max_connections=20)
    try:
        inst.init(PASSWORD)
        yield home, port
    finally:
        # Last-resort cleanup of anything a test left behind.
        PgInstance(home=home, port=port).stop("immediate", timeout=10)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def make_instance(cluster_home):
    home, port = cluster_home
    created: list[PgInstance] = []

    def factory(**kwargs) -> PgInstance:
        kwargs.setdefault("port", port)
        inst = PgInstance(home=home, **kwargs)
        created.append(inst)
        return inst

    try:
        yield factory
    finally:
        for inst in created:
            inst.stop("fast", timeout=15)


def test_layout_and_config(cluster_home):
    home, port = cluster_home
    inst = PgInstance(home=home, port=port)
    assert inst.is_initialized()
    assert inst.data_dir == home / "pgdata"
    assert inst.socket_path == home / "run" / f".s.PGSQL.{port}"
    assert inst.log_file == home / "log" / "postgres.log"
    assert (inst.data_dir.stat().st_mode & 0o777) == 0o700
    assert not list(home.glob(".initdb-pw-*")), "pwfile must be deleted"
    conf = (inst.data_dir / "pgfleet.conf").read_text()
    assert "listen_addresses = ''" in conf
    assert f"unix_socket_directories = '{inst.socket_dir}'" in conf
    assert "include_if_exists = 'pgfleet.conf'" in (inst.data_dir / "postgresql.conf").read_text()
    if os.geteuid() == 0:
        assert inst.data_dir.stat().st_uid == 101 or inst.data_dir.owner() == "postgres"
    with pytest.raises(RuntimeError, match="already holds"):
        inst.init(PASSWORD)


def test_start_connect_stop_leaves_no_processes(make_instance):
    inst = make_instance()
    proc = inst.start()
    assert inst.proc is proc
    inst.wait_ready(timeout=30)
    assert inst.is_running()
    assert psql(inst, "select 1") == "1"
    assert psql(inst, "show listen_addresses") == ""
    assert (
        psql(
            inst,
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'postgres'",
        )
        == "t"
    )
    pids = [proc.pid, *_children_of(proc.pid)]
    assert len(pids) > 1  # checkpointer, walwriter, ...

    inst.stop()
    assert proc.returncode is not None
    assert not inst.is_running()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if _alive(p)] == []
    assert not inst.postmaster_pid_file.exists()
    inst.stop()  # idempotent


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "normal"])
def test_backends_inherit_the_scheduling_policy(make_instance, batch):
    """SCHED_BATCH by default (a backend woken by a query does not preempt the worker
    that sent it); batch_sched=False leaves Postgres as it would start by hand."""
    inst = make_instance(batch_sched=batch)
    proc = inst.start()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the starting thread is back
    inst.wait_ready(timeout=30)
    with psycopg.connect(host=str(inst.socket_dir), port=inst.port, user="postgres",
                         dbname="postgres", connect_timeout=10) as conn:
        backend = conn.info.backend_pid
        assert backend in _children_of(proc.pid)
        policies = {os.sched_getscheduler(proc.pid)}
        policies |= {os.sched_getscheduler(p) for p in _children_of(proc.pid) if _alive(p)}
    assert policies == {os.SCHED_BATCH if batch else os.SCHED_OTHER}
    inst.stop()


def test_data_survives_restart_and_update_config(make_instance):
    inst = make_instance()
    inst.start()
    inst.wait_ready()
    psql(inst, "create table if not exists kept (v int); insert into kept values (42)")
    inst.stop()

    inst.max_connections = 37
    inst.update_config()
    inst.start()
    inst.wait_ready()
    assert psql(inst, "select v from kept") == "42"
    assert psql(inst, "show max_connections") == "37"
    inst.stop("smart")
    assert not inst.is_running()


def test_already_running(make_instance):
    first = make_instance()
    first.start()
    first.wait_ready()
    with pytest.raises(AlreadyRunning):
        first.start()
    other = make_instance()  # separate object: only postmaster.pid tells
    assert other.is_running()
    with pytest.raises(AlreadyRunning) as info:
        other.start()
    assert info.value.pid == first.proc.pid
    first.stop()
    assert not other.is_running()


def test_stale_pid_file_is_ignored(make_instance):
    inst = make_instance()
    dead = subprocess.Popen(["true"])
    dead.wait()
    inst.postmaster_pid_file.write_text(f"{dead.pid}\n{inst.data_dir}\n")
    assert not inst.is_running()
    inst.start()
    inst.wait_ready()
    assert psql(inst, "select 2") == "2"
    inst.stop()


def test_watcher_restarts_after_sigkill(make_instance):
    inst = make_instance()
    restarted = []
    watcher = PgWatcher(
        inst, on_restart=lambda: restarted.append(time.monotonic()), max_backoff=1.0
    )
    try:
        watcher.start()
        assert psql(inst, "select 1") == "1"
        old_pid = inst.proc.pid
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while watcher.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watcher.restarts == 1
        assert len(restarted) == 1
        assert inst.proc.pid != old_pid
        assert psql(inst, "select 3") == "3"
        new_proc = inst.proc
    finally:
        watcher.stop()
    assert new_proc.returncode is not None
    assert not inst.is_running()
    time.sleep(0.5)
    assert watcher.restarts == 1  # deliberate stop is not a crash


def test_watcher_kills_orphaned_busy_backend(make_instance):
    """A backend stuck in a CPU-bound query outlives a SIGKILLed postmaster and
    pins the old shared memory; the watcher must clear it and restart."""
    inst = make_instance()
    watcher = PgWatcher(inst, max_backoff=1.0)
    busy = None
    try:
        watcher.start()
        busy = subprocess.Popen(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-h",
                str(inst.socket_dir),
                "-p",
                str(inst.port),
                "-U",
                "postgres",
                "-c",
                "select count(*) from generate_series(1, 2000000000)",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        backend = ""
        deadline = time.monotonic() + 10
        while not backend and time.monotonic() < deadline:
            backend = psql(
                inst,
                "select pid from pg_stat_activity "
                "where query like 'select count(*) from generate_series%'",
            )
        assert backend, "busy backend never showed up"
        os.kill(inst.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while watcher.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watcher.restarts == 1
        assert not _alive(int(backend))
        assert psql(inst, "select 4") == "4"
    finally:
        watcher.stop()
        if busy is not None:
            busy.kill()
            busy.wait()


def test_wait_ready_reports_exit(make_instance, tmp_path):
    inst = make_instance(max_connections=10)
    # An unparsable setting makes the postmaster exit immediately.
    conf = inst.data_dir / "pgfleet.conf"
    original = conf.read_text()
    try:
        conf.write_text(original + "shared_buffers = 'banana'\n")
        inst.start()
        with pytest.raises(RuntimeError, match="exited"):
            inst.wait_ready(timeout=15)
    finally:
        conf.write_text(original)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run postgres as another user")
def test_untraversable_home_is_rejected(tmp_path):
    # pytest's basetemp (/tmp/pytest-of-root) is 0700: the postgres user cannot enter it.
    inst = PgInstance(home=tmp_path / "pgfleet")
    blocker = next(p for p in reversed(tmp_path.parents) if (p.stat().st_mode & 0o001) == 0)
    with pytest.raises(RuntimeError, match="not traversable") as info:
        inst.init(PASSWORD)
    assert str(blocker) in str(info.value)
    assert not (tmp_path / "pgfleet").exists()


def test_find_pg_bin_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PGFLEET_PG_BIN", str(PG_BIN))
    assert find_pg_bin() == PG_BIN
    monkeypatch.setenv("PGFLEET_PG_BIN", str(tmp_path))
    with pytest.raises(RuntimeError, match="PGFLEET_PG_BIN"):
        find_pg_bin()
