"""The supervisor's Prometheus endpoint sums what every worker and the pooler report."""

from __future__ import annotations

import psycopg

from .conftest import free_port
from .waiting import wait_metric


def test_sessions_pins_and_pool_are_exported(make_server):
    mport = free_port()
    srv = make_server("--pool-size", "3", "--workers", "2", "--metrics-port", str(mport))
    conns = [psycopg.connect(srv.dsn(), autocommit=True, connect_timeout=10) for _ in range(4)]
    try:
        conns[0].execute("create temp table metric_pin(x int)")
        conns[1].execute("select pg_advisory_lock(99)")
        m = wait_metric(mport, {'pgfleet_pinned_sessions{reason="temp_table"}': 1,
                                'pgfleet_pinned_sessions{reason="advisory_lock"}': 1,
                                "pgfleet_client_sessions": 4})
        assert m['pgfleet_pinned_sessions{reason="temp_table"}'] == 1
        assert m['pgfleet_pinned_sessions{reason="advisory_lock"}'] == 1
        assert m["pgfleet_client_sessions"] == 4
        assert sum(v for k, v in m.items() if k.startswith("pgfleet_pool_backends{")) <= 3
        conns[0].execute("drop table metric_pin")
        m = wait_metric(mport, {'pgfleet_pinned_sessions{reason="temp_table"}': 0})
        assert m['pgfleet_pinned_sessions{reason="temp_table"}'] == 0
    finally:
        for c in conns:
            c.close()
    m = wait_metric(mport, {"pgfleet_client_sessions": 0})
    assert m["pgfleet_client_sessions"] == 0
