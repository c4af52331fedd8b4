"""A worker remembers what each distinct startup packet asks for (user, database,
settings, protocol negotiation) and skips decoding it when the same bytes come
again. Every login must still behave as the first one with that packet did.

One worker (so repeated packets certainly meet the remembered facts), trust auth
(so a raw client may pipeline a query behind its startup packet).
"""

from __future__ import annotations

import psycopg
import pytest

from pgwire import backend as be
from pgwire import frontend as fe
from tests.wire import RawClient, assert_fatal_then_eof, data_rows, errors_in


@pytest.fixture(scope="module")
def one_worker(make_module_server):
    return make_module_server("--workers", "1", "--pool-size", "3", "--auth", "trust")


def _login(srv, packet: bytes, pieces: int = 1) -> RawClient:
    c = RawClient(srv.port)
    step = -(-len(packet) // pieces)
    for i in range(0, len(packet), step):
        c.send(packet[i : i + step])
    return c


def test_negotiation_is_sent_on_every_login_with_the_same_packet(one_worker):
    """Protocol 3.2 and an unknown _pq_ option: NegotiateProtocolVersion each time."""
    packet = fe.encode_startup({"user": "postgres", "database": "postgres", "_pq_.frob": "1"},
                               protocol=(3 << 16) | 2)
    for _ in range(3):
        with _login(one_worker, packet) as c:
            first = c.read_message()
            assert first == be.NegotiateProtocolVersion(0, ["_pq_.frob"]), first
            c.expect_auth(be.AUTH_OK)
            c._after_auth_ok()
            assert data_rows(c.query("select 1")) == [[b"1"]]


def test_a_known_packet_split_or_followed_by_a_query_still_logs_in(one_worker):
    packet = fe.encode_startup({"user": "postgres", "database": "postgres",
                                "application_name": "facts"})
    with _login(one_worker, packet) as c:  # whole: now remembered
        c.expect_auth(be.AUTH_OK)
        c._after_auth_ok()
    with _login(one_worker, packet, pieces=3) as c:
        c.expect_auth(be.AUTH_OK)
        c._after_auth_ok()
        assert data_rows(c.query("show application_name")) == [[b"facts"]]
    with RawClient(one_worker.port) as c:  # the packet and a query in one write
        c.send(packet + fe.encode_query("select current_setting('application_name')"))
        c.expect_auth(be.AUTH_OK)
        c._after_auth_ok()
        msgs = c.read_until_ready()
        assert not errors_in(msgs) and data_rows(msgs) == [[b"facts"]], msgs


def test_each_packet_gets_its_own_settings(one_worker):
    def search_path(schema: str) -> str:
        with psycopg.connect(one_worker.dsn(), options=f"-c search_path={schema}",
                             connect_timeout=10) as conn:
            return conn.execute("show search_path").fetchone()[0]

    for schema in ("alpha", "beta", "alpha", "beta"):
        assert search_path(schema) == schema


def test_a_refused_packet_is_refused_every_time(one_worker):
    bad_role = fe.encode_startup({"user": "no_such_role_facts", "database": "postgres"})
    bad_option = fe.encode_startup({"user": "postgres", "options": "-c"})
    for _ in range(2):
        with _login(one_worker, bad_role) as c:
            assert_fatal_then_eof(c, "28000", 'role "no_such_role_facts" does not exist')
        with _login(one_worker, bad_option) as c:
            assert_fatal_then_eof(c, "42601", "-c requires a value")
