"""Which client writes the gateway treats as one whole plain unit (its quickest path).

Session._plain_kinds only looks at bytes, so it is checked here without sockets: the
groups drivers really send are taken, and anything that merely ends in a Sync's five
bytes, or has a length Postgres's framer would refuse, is left to the general path.
"""

from __future__ import annotations

import pytest

from gateway.backend import K_BIND, K_DESC_P, K_DESC_S, K_EXEC, K_PARSE, K_QUERY, K_SYNC
from gateway.session import Session
from pgwire import frontend as fe

LOOKALIKE = b"S\x00\x00\x00\x04"


def unit(*msgs: bytes) -> bytes:
    return b"".join(msgs)


def kinds(data: bytes) -> list[int] | None:
    expects = Session._plain_kinds(data)
    return None if expects is None else [e.kind for e in expects]


def test_driver_groups_are_whole_units() -> None:
    assert kinds(fe.encode_query("select 1")) == [K_QUERY]
    pgbench = unit(fe.encode_parse("", "select $1::int", [23]), fe.encode_bind("", "", [b"1"]),
                   fe.encode_describe("P", ""), fe.encode_execute(), fe.SYNC)
    assert kinds(pgbench) == [K_PARSE, K_BIND, K_DESC_P, K_EXEC, K_SYNC]
    psycopg = unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "", []),
                   fe.encode_describe("S", ""), fe.encode_execute(), fe.SYNC)
    assert kinds(psycopg) == [K_PARSE, K_BIND, K_DESC_S, K_EXEC, K_SYNC]
    firehose = unit(fe.encode_parse("", "select $1::int"), fe.encode_bind("", "", [b"7"]),
                    fe.encode_execute(), fe.SYNC)
    assert kinds(firehose) == [K_PARSE, K_BIND, K_EXEC, K_SYNC]
    limited = unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "", []),
                   fe.encode_execute("", 10), fe.SYNC)
    assert kinds(limited) == [K_PARSE, K_BIND, K_EXEC, K_SYNC]


def test_bare_replies_are_shared_and_read_only() -> None:
    """Every plain unit books the same Expect objects, so none may ever be changed."""
    pgbench = unit(fe.encode_parse("", "select $1::int", [23]), fe.encode_bind("", "", [b"1"]),
                   fe.encode_describe("P", ""), fe.encode_execute(), fe.SYNC)
    first, second = Session._plain_kinds(pgbench), Session._plain_kinds(pgbench + b"")
    assert all(a is b for a, b in zip(first, second, strict=True))
    with pytest.raises(AttributeError):
        first[0].on_done = print


@pytest.mark.parametrize("data", [
    # An Execute one byte too long, its max_rows and extra byte reading as a Sync.
    unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "", []),
         b"E\x00\x00\x00\x0a\x00" + LOOKALIKE),
    # A Describe with trailing bytes.
    unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "", []), fe.encode_execute(),
         b"D\x00\x00\x00\x0bP\x00" + LOOKALIKE),
    # A lone Parse whose parameter type OIDs (83, 4) end in a Sync's bytes.
    fe.encode_parse("", "select $1::text", [83, 4]),
    # An Execute longer than Postgres's 10,000-byte limit for it.
    unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "", []),
         b"E" + (20005).to_bytes(4, "big") + bytes(20001), fe.SYNC),
    # Two Syncs: two units.
    unit(fe.encode_parse("", "select 1"), fe.SYNC, fe.encode_bind("", "", []), fe.SYNC),
    # A statement that changes the session.
    unit(fe.encode_parse("", "set search_path = x"), fe.encode_bind("", "", []),
         fe.encode_execute(), fe.SYNC),
    # The usual tail after a Bind to a named statement or portal.
    unit(fe.encode_parse("", "select 1"), fe.encode_bind("", "s1", []),
         fe.encode_describe("P", ""), fe.encode_execute(), fe.SYNC),
    unit(fe.encode_parse("", "select 1"), fe.encode_bind("p1", "", []), fe.encode_execute(),
         fe.SYNC),
    # A Bind whose length ends it before its statement name, the usual tail after it.
    unit(fe.encode_parse("", "select 1"), b"B\x00\x00\x00\x05\x00", fe.encode_execute(),
         fe.SYNC),
    # A Parse whose length runs into the Bind: the tail no longer lines up.
    unit(b"P\x00\x00\x00\x12\x00select 1\x00\x00\x00", fe.encode_bind("", "", []),
         fe.encode_execute(), fe.SYNC),
], ids=["long-execute", "long-describe", "parse-oids", "huge-execute", "two-syncs", "set",
        "named-statement", "named-portal", "short-bind", "short-parse"])
def test_lookalikes_take_the_general_path(data: bytes) -> None:
    assert Session._plain_kinds(data) is None
