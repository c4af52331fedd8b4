"""Where the firehose points: parsing DSNs and refusing anything that is not loopback."""

from __future__ import annotations

import ipaddress
import shlex
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


class UsageError(ValueError):
    """A bad option; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # an IPv4 address, or a Unix socket directory (starts with '/')
    port: int
    user: str
    password: str | None
    dbname: str

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def describe(self) -> str:
        where = f"{self.host}/.s.PGSQL.{self.port}" if self.is_unix else f"{self.host}:{self.port}"
        return f"{where} user={self.user} dbname={self.dbname}"


def parse_dsn(dsn: str) -> dict[str, str]:
    """A ``postgresql://`` URL or a libpq ``key=value`` string as a dict of libpq keywords."""
    dsn = dsn.strip()
    out: dict[str, str] = {}
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        if parts.username:
            out["user"] = unquote(parts.username)
        if parts.password is not None:
            out["password"] = unquote(parts.password)
        if parts.hostname:
            out["host"] = unquote(parts.hostname)
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"bad port in DSN: {exc}") from None
        if port:
            out["port"] = str(port)
        if parts.path and parts.path != "/":
            out["dbname"] = unquote(parts.path[1:])
        for key, values in parse_qs(parts.query).items():
            out[key] = values[-1]
        return out
    try:
        words = shlex.split(dsn)
    except ValueError as exc:
        raise UsageError(f"cannot parse DSN {dsn!r}: {exc}") from None
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"cannot parse DSN {dsn!r}: expected key=value, got {word!r}")
        out[key.strip()] = value
    return out


def loopback_ipv4(host: str, what: str) -> str:
    """``host`` resolved to an IPv4 loopback address; refuses everything else."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"{what}: cannot resolve host {host!r}: {exc}") from None
    addrs = sorted({info[4][0] for info in infos})
    for addr in addrs:
        if not ipaddress.ip_address(addr).is_loopback:
            raise UsageError(
                f"{what}: refusing non-loopback host {host!r} ({addr}); the firehose only "
                "targets servers on this machine (127.0.0.0/8)"
            )
    if not addrs:
        raise UsageError(f"{what}: host {host!r} has no IPv4 address")
    return addrs[0]


def endpoint(
    dsn: str | None,
    *,
    host: str | None = None,
    port: int | None = None,
    user: str | None = None,
    password: str | None = None,
    dbname: str | None = None,
    default_port: int,
    allow_unix: bool,
    what: str,
) -> Endpoint:
    """Options override the DSN, which overrides defaults (127.0.0.1, postgres/postgres)."""
    kw = parse_dsn(dsn) if dsn else {}
    host = host or kw.get("host") or "127.0.0.1"
    if "," in host:
        raise UsageError(f"{what}: one host only, got {host!r}")
    try:
        port = port or int(kw.get("port") or default_port)
    except ValueError:
        raise UsageError(f"{what}: bad port {kw.get('port')!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"{what}: port {port} out of range")
    user = user or kw.get("user") or "postgres"
    if password is None:
        password = kw.get("password")
    dbname = dbname or kw.get("dbname") or kw.get("database") or user
    if host.startswith("/"):
        if not allow_unix:
            raise UsageError(f"{what}: must be TCP on a loopback address, not a Unix socket")
    else:
        host = loopback_ipv4(host, what)
    return Endpoint(host=host, port=port, user=user, password=password, dbname=dbname)
