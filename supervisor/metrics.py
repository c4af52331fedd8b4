"""Prometheus metrics of every pgfleet process, served by the supervisor.

Workers and the pooler are forked processes, so they use prometheus_client's
multiprocess mode: each writes its samples to files under HOME/metrics, and the
supervisor's endpoint sums them. Nothing is updated per message: workers and the
pooler refresh their gauges from their own state once a second.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_dir(path: Path) -> None:
    """Start with an empty samples dir; must run before prometheus_client is imported."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)


def serve(host: str, port: int) -> None:
    """Expose /metrics on host:port from a daemon thread of the supervisor."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)


def process_exited(pid: int) -> None:
    """Drop a dead child's live gauges (its replacement reports afresh)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
