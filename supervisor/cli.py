"""The ``pgfleet`` command line."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import typer

from .config import Config, parse_user_limits
from .logs import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pgfleet: a drop-in Postgres gateway and connection pooler.",
)


class AuthMethod(StrEnum):
    scram = "scram"
    md5 = "md5"
    password = "password"
    trust = "trust"


class TlsMode(StrEnum):
    on = "on"
    off = "off"


class PostgresSched(StrEnum):
    batch = "batch"
    normal = "normal"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command()
def up(
    home: Path = typer.Option(
        Path(".pgfleet"), help="Home dir: Postgres data, sockets, logs and the password file."
    ),
    host: str = typer.Option("127.0.0.1", help="Address the gateway listens on."),
    port: int = typer.Option(15432, help="TCP port clients connect to."),
    workers: int = typer.Option(
        os.cpu_count() or 1, help="Gateway worker processes (default: one per CPU)."
    ),
    pool_size: int = typer.Option(
        20, help="Real Postgres connections per instance, shared by all clients."
    ),
    password: str | None = typer.Option(
        None,
        help="Password of the 'postgres' superuser, set on first run "
        "(default: generated and kept in HOME/password).",
    ),
    auth: AuthMethod = typer.Option(
        AuthMethod.scram,
        help="Client authentication: scram (SCRAM-SHA-256), md5, password (cleartext, "
        "accepted over TLS only) or trust.",
    ),
    tls: TlsMode = typer.Option(
        TlsMode.on,
        help="TLS on the client port. on: answer SSLRequest with the certificate of "
        "--tls-cert/--tls-key, or one generated in HOME/tls on first run (self-signed, "
        "for localhost and 127.0.0.1: use it as sslrootcert). off: refuse, as Postgres "
        "with ssl=off.",
    ),
    tls_cert: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="PEM certificate (chain) to serve; needs --tls-key."
    ),
    tls_key: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="PEM private key of --tls-cert."
    ),
    query_wait_timeout: float = typer.Option(
        30.0, help="Seconds a query may wait for a free backend before it fails (0: forever)."
    ),
    auth_timeout: float = typer.Option(
        60.0, help="Seconds a client has to finish logging in (like authentication_timeout)."
    ),
    user_limit: list[str] = typer.Option(
        [],
        metavar="USER=N",
        help="At most N backends for USER (role) at once, across its databases; its "
        "clients queue beyond that even when the pool has room. Repeatable.",
    ),
    log_level: LogLevel = typer.Option(LogLevel.info, help="How much to log on stderr."),
    metrics_port: int = typer.Option(
        0, help="Serve Prometheus metrics on HOST:METRICS_PORT/metrics (0: off)."
    ),
    postgres_sched: PostgresSched = typer.Option(
        PostgresSched.batch,
        help="Linux scheduling policy of the Postgres it starts. batch (SCHED_BATCH): the "
        "same CPU share, but a backend woken by a query does not preempt the gateway "
        "worker that sent it. normal: the default policy, as Postgres started by hand.",
    ),
) -> None:
    """Start Postgres (initialising it on first run), the pooler and the gateway workers,
    and run in the foreground until Ctrl-C or SIGTERM."""
    from .tree import run_up

    if workers < 1 or pool_size < 1:
        raise typer.BadParameter("--workers and --pool-size must be at least 1")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither")
    if tls is TlsMode.off and tls_cert is not None:
        raise typer.BadParameter("--tls-cert/--tls-key need --tls on", param_hint="--tls")
    if tls is TlsMode.off and auth is AuthMethod.password:
        raise typer.BadParameter(
            "--auth password sends passwords in clear: it is only offered over TLS",
            param_hint="--tls",
        )
    try:
        user_limits = parse_user_limits(user_limit)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--user-limit") from None
    setup_logging(log_level.value, "supervisor")
    cfg = Config(
        home=home,
        host=host,
        port=port,
        workers=workers,
        pool_size=pool_size,
        auth=auth.value,
        query_wait_timeout=query_wait_timeout,
        auth_timeout=auth_timeout,
        log_level=log_level.value,
        metrics_port=metrics_port,
        postgres_sched=postgres_sched.value,
        user_limits=user_limits,
        tls=tls is TlsMode.on,
        tls_cert=str(tls_cert or ""),
        tls_key=str(tls_key or ""),
    )
    raise typer.Exit(run_up(cfg, password))


@app.command()
def version() -> None:
    """Print pgfleet's version."""
    from importlib.metadata import version as v

    typer.echo(v("pgfleet"))


# ``pgfleet firehose``: the load generator; its options and code live in bench/firehose.
from bench.firehose.cli import firehose as _firehose  # noqa: E402

app.command("firehose")(_firehose)


def main() -> None:
    app()
