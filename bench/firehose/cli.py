"""The ``pgfleet firehose`` command's options (typer); the work is in :mod:`.main`."""

from __future__ import annotations

from pathlib import Path

import typer


def firehose(
    dsn: str | None = typer.Option(
        None, help="Target: postgresql://user:pw@127.0.0.1:15432/db or 'host=... port=...'."
    ),
    host: str | None = typer.Option(None, help="Target host (loopback only; default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Target port (default 15432)."),
    user: str | None = typer.Option(None, help="User (default postgres)."),
    password: str | None = typer.Option(None, help="Password (default: from the DSN or PGPASSWORD)."),
    dbname: str | None = typer.Option(None, help="Database (default: the user name)."),
    connections: int = typer.Option(1000, help="Connections held at once (after the ramp)."),
    churn: float = typer.Option(0.0, help="Connections closed and reopened per second, after the ramp."),
    qps: float = typer.Option(100.0, help="Queries per second, over random idle held connections."),
    write_ratio: float = typer.Option(0.1, help="Share of queries that INSERT (0-1); the rest read by id."),
    duration: int = typer.Option(30, help="Seconds the run lasts, ramp included."),
    ramp: float | None = typer.Option(
        None, help="Seconds to reach --connections (default: 5, at most half of --duration)."
    ),
    procs: int = typer.Option(0, help="Load processes (default: CPU count)."),
    max_backends: int | None = typer.Option(
        None, help="Fail when Postgres has more client backends than this (needs --direct-dsn/--home)."
    ),
    direct_dsn: str | None = typer.Option(
        None, help="Straight to Postgres, to count backends: e.g. 'host=HOME/run port=5432 user=postgres'."
    ),
    home: Path | None = typer.Option(
        None, help="A pgfleet home: count backends through HOME/run (instead of --direct-dsn)."
    ),
    out: Path | None = typer.Option(
        None, help="Directory for firehose.csv/.png/.json (default firehose-results/<time>)."
    ),
    connect_timeout: float = typer.Option(10.0, help="Seconds a connect + login may take."),
    query_timeout: float = typer.Option(10.0, help="Seconds a query may take."),
    source_ips: int = typer.Option(0, help="Spread client sockets over 127.0.0.2..(1+N) (0: auto)."),
    quiet: bool = typer.Option(False, help="No per-second progress lines."),
) -> None:
    """Load-test a Postgres endpoint on this machine (SuperFireHose-style): hold many
    connections, churn them, run queries; print a line per second and write a CSV, a
    chart and a JSON summary. Exit status 1 when any connect or query failed."""
    from .main import Options, run

    opts = Options(
        dsn=dsn, host=host, port=port, user=user, password=password, dbname=dbname,
        connections=connections, churn=churn, qps=qps, write_ratio=write_ratio,
        duration=duration, ramp=ramp, procs=procs, max_backends=max_backends,
        direct_dsn=direct_dsn, home=home, out=out, connect_timeout=connect_timeout,
        query_timeout=query_timeout, source_ips=source_ips, quiet=quiet,
    )
    try:
        status = run(opts)
    except KeyboardInterrupt:
        status = 130
    raise typer.Exit(status)
