"""The settings every pgfleet process shares, and where things live under the home dir."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

AUTH_METHODS = ("scram", "md5", "password", "trust")


@dataclass
class Config:
    home: Path = field(default_factory=lambda: Path(".pgfleet"))
    host: str = "127.0.0.1"
    port: int = 15432
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    pool_size: int = 20
    auth: str = "scram"
    query_wait_timeout: float = 30.0
    auth_timeout: float = 60.0
    log_level: str = "info"
    pg_port: int = 5432
    # "batch": run Postgres as SCHED_BATCH (pgctld._scheduling); "normal": leave it.
    postgres_sched: str = "batch"
    # How long a worker keeps an idle leased backend before giving it back to the pooler.
    lease_idle_seconds: float = 2.0
    # Client cancel-table capacity across all workers.
    max_clients: int = 65536
    # Most backends each named user (role) may hold at once, across its databases.
    user_limits: dict[str, int] = field(default_factory=dict)
    # Prometheus endpoint on host:metrics_port, served by the supervisor (0: off).
    metrics_port: int = 0
    # Distinct statement texts the shared catalog names pgf_<id> (more get hash names).
    statement_catalog_size: int = 65536

    # TLS on the client port; without tls_cert/tls_key a self-signed pair is made in tls_dir.
    tls: bool = True
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        self.home = Path(self.home).absolute()
        if self.tls_cert:
            self.tls_cert = str(Path(self.tls_cert).absolute())
        if self.tls_key:
            self.tls_key = str(Path(self.tls_key).absolute())

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def pg_socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def pg_socket_path(self) -> Path:
        return self.pg_socket_dir / f".s.PGSQL.{self.pg_port}"

    @property
    def ipc_dir(self) -> Path:
        return self.home / "ipc"

    @property
    def pooler_socket(self) -> Path:
        return self.ipc_dir / "pooler.sock"

    def worker_ready_file(self, index: int) -> Path:
        return self.ipc_dir / f"worker-{index}.ready"

    @property
    def metrics_dir(self) -> Path:
        return self.home / "metrics"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    @property
    def lock_file(self) -> Path:
        return self.home / "pgfleet.lock"

    @property
    def cancel_table_name(self) -> str:
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return f"/pgfleet-cancel-{digest}"

    @property
    def statement_catalog_name(self) -> str:
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return f"/pgfleet-stmts-{digest}"

    @property
    def role_epoch_name(self) -> str:
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return f"/pgfleet-roles-{digest}"

    @property
    def backend_slots(self) -> int:
        """Slots for per-backend prepared sets: the pooler never holds more than its cap
        (plus the few it may be opening while an evicted one exits)."""
        return self.pool_size + 16

    def to_dict(self) -> dict:
        d = asdict(self)
        d["home"] = str(self.home)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**d)


def parse_user_limits(specs: list[str]) -> dict[str, int]:
    """``USER=N`` strings (as given to ``--user-limit``) as a dict; ValueError if malformed."""
    limits: dict[str, int] = {}
    for spec in specs:
        user, sep, n = spec.rpartition("=")
        if not sep or not user:
            raise ValueError(f"{spec!r} is not USER=N")
        try:
            limit = int(n)
        except ValueError:
            raise ValueError(f"{spec!r}: {n!r} is not a whole number") from None
        if limit < 1:
            raise ValueError(f"{spec!r}: the limit must be at least 1")
        limits[user] = limit
    return limits
