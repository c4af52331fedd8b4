"""Framers: split/coalesced reads, limits, bad headers."""

from __future__ import annotations

import struct
import time

import pytest

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.errors import ProtocolViolation
from pgwire.framing import (
    FRONTEND_LARGE_TYPES,
    LARGE_MESSAGE_LIMIT,
    MAX_STARTUP_PACKET,
    SMALL_MESSAGE_LIMIT,
    MessageFramer,
    StartupFramer,
)

# What psql 16 sends first (user/database "postgres"), written out by hand:
# int32 length 84, int32 196608 (3.0), name\0value\0 pairs, final \0.
PSQL_STARTUP = (
    b"\x00\x00\x00\x54"
    b"\x00\x03\x00\x00"
    b"user\x00postgres\x00"
    b"database\x00postgres\x00"
    b"application_name\x00psql\x00"
    b"client_encoding\x00UTF8\x00"
    b"\x00"
)
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def drain(framer: MessageFramer) -> list[tuple[int, bytes, bytes]]:
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


def header(mtype: bytes, length: int) -> bytes:
    return mtype + struct.pack("!I", length)


def frontend_stream() -> bytes:
    return b"".join(
        [
            fe.encode_query("SELECT 1"),
            fe.encode_parse("s1", "SELECT $1::int", [23]),
            fe.encode_bind("", "s1", [b"42", None], [0], [1]),
            fe.encode_describe("P", ""),
            fe.encode_execute("", 0),
            fe.encode_close("S", "s1"),
            fe.FLUSH,
            fe.SYNC,
            fe.encode_copy_data(b"1\t2\n"),
            fe.COPY_DONE,
            fe.encode_copy_fail("nope"),
            fe.encode_function_call(1598, [b"x"], [0], 0),
            fe.encode_password("secret"),
            fe.TERMINATE,
        ]
    )


def backend_stream() -> bytes:
    return b"".join(
        [
            be.encode_auth_ok(),
            be.encode_parameter_status("server_version", "16.2"),
            be.encode_backend_key_data(1234, 0xDEADBEEF),
            be.READY_IDLE,
            be.encode_row_description([be.Field("x", type_oid=23, type_size=4)]),
            be.encode_data_row([b"1"]),
            be.encode_command_complete("SELECT 1"),
            be.encode_error({"S": "ERROR", "C": "42601", "M": "syntax error"}),
            be.READY_FAILED,
        ]
    )


# ------------------------------------------------------------------ StartupFramer


def test_psql_startup_packet():
    assert len(PSQL_STARTUP) == 0x54
    f = StartupFramer()
    f.feed(PSQL_STARTUP)
    payload = f.next_packet()
    assert payload == PSQL_STARTUP[4:]
    assert f.next_packet() is None
    msg = fe.decode_startup(payload)
    assert isinstance(msg, fe.StartupMessage)
    assert (msg.major, msg.minor) == (3, 0)
    assert msg.params == {
        "user": "postgres",
        "database": "postgres",
        "application_name": "psql",
        "client_encoding": "UTF8",
    }


def test_startup_byte_by_byte_then_pipelined_query():
    stream = SSL_REQUEST + PSQL_STARTUP + fe.encode_query("SELECT 1") + fe.SYNC[:2]
    f = StartupFramer()
    packets = []
    for i in range(len(stream)):
        f.feed(stream[i : i + 1])
        if len(packets) < 2 and (p := f.next_packet()) is not None:
            packets.append(p)
    assert isinstance(fe.decode_startup(packets[0]), fe.SSLRequest)
    assert isinstance(fe.decode_startup(packets[1]), fe.StartupMessage)
    rest = f.remaining()
    assert rest == fe.encode_query("SELECT 1") + fe.SYNC[:2]
    assert f.remaining() == b""
    assert f.buffered() == 0
    mf = MessageFramer()
    mf.feed(rest)
    mf.feed(fe.SYNC[2:])
    assert [m[0] for m in drain(mf)] == [ord("Q"), ord("S")]


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET + 1, 0xFFFFFFFF])
def test_startup_bad_length(length):
    f = StartupFramer()
    f.feed(struct.pack("!I", length))  # rejected before any body arrives
    with pytest.raises(ProtocolViolation) as ei:
        f.next_packet()
    assert ei.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_startup_max_length_accepted():
    body = fe.encode_startup({"user": "u", "options": "x" * (MAX_STARTUP_PACKET - 25)})
    assert len(body) == MAX_STARTUP_PACKET
    f = StartupFramer()
    f.feed(body)
    assert fe.decode_startup(f.next_packet()).params["user"] == "u"


def test_startup_incomplete():
    f = StartupFramer()
    assert f.next_packet() is None
    f.feed(PSQL_STARTUP[:3])
    assert f.next_packet() is None
    f.feed(PSQL_STARTUP[3:-1])
    assert f.next_packet() is None
    f.feed(PSQL_STARTUP[-1:])
    assert f.next_packet() == PSQL_STARTUP[4:]


# ------------------------------------------------------------------ MessageFramer


@pytest.mark.parametrize("frontend", [True, False])
def test_coalesced_and_every_split_point(frontend):
    stream = frontend_stream() if frontend else backend_stream()
    whole = MessageFramer(frontend=frontend)
    whole.feed(stream)
    expected = drain(whole)
    assert b"".join(raw for _, _, raw in expected) == stream
    assert whole.buffered() == 0
    for cut in range(len(stream) + 1):
        f = MessageFramer(frontend=frontend)
        f.feed(stream[:cut])
        got = drain(f)
        f.feed(stream[cut:])
        got += drain(f)
        assert got == expected, cut


@pytest.mark.parametrize("frontend", [True, False])
def test_byte_by_byte(frontend):
    stream = frontend_stream() if frontend else backend_stream()
    f = MessageFramer(frontend=frontend)
    got = []
    for i in range(len(stream)):
        f.feed(stream[i : i + 1])
        got += drain(f)
    ref = MessageFramer(frontend=frontend)
    ref.feed(stream)
    assert got == drain(ref)
    for mtype, payload, raw in got:
        assert type(payload) is bytes and type(raw) is bytes
        assert raw[0] == mtype and raw[5:] == payload
        assert struct.unpack("!I", raw[1:5])[0] == len(payload) + 4


def test_three_way_splits():
    stream = frontend_stream()[:120]
    ref = MessageFramer()
    ref.feed(stream)
    expected = drain(ref)
    for a in range(0, len(stream), 3):
        for b in range(a, len(stream), 7):
            f = MessageFramer()
            got = []
            for chunk in (stream[:a], stream[a:b], stream[b:]):
                f.feed(chunk)
                got += drain(f)
            assert got == expected


def test_mutable_inputs_are_copied():
    data = bytearray(fe.encode_query("SELECT 1"))
    f = MessageFramer()
    f.feed(data)
    data[6:12] = b"XXXXXX"
    f.feed(memoryview(fe.SYNC))
    msgs = drain(f)
    assert msgs[0][1] == b"SELECT 1\x00"
    assert msgs[1][0] == ord("S")


def test_partial_header_and_buffered():
    f = MessageFramer()
    q = fe.encode_query("SELECT 1")
    f.feed(q + q[:3])
    assert f.buffered() == len(q) + 3
    assert drain(f) == [(ord("Q"), q[5:], q)]
    assert f.buffered() == 3
    f.feed(q[3:])
    assert drain(f) == [(ord("Q"), q[5:], q)]
    assert f.buffered() == 0


def test_iteration():
    f = MessageFramer()
    f.feed(fe.SYNC * 3)
    assert [m[0] for m in f] == [ord("S")] * 3


def test_large_message_in_chunks():
    body = bytes(range(256)) * 4000
    msg = fe.encode_copy_data(body)
    f = MessageFramer()
    got = []
    for i in range(0, len(msg), 4093):
        f.feed(msg[i : i + 4093] + (fe.SYNC if i + 4093 >= len(msg) else b""))
        got += drain(f)
    assert got[0] == (ord("d"), body, msg)
    assert got[1][0] == ord("S")


def test_many_small_messages_linear():
    # 200k messages in one feed: quadratic buffer handling would take minutes.
    n = 200_000
    f = MessageFramer()
    f.feed(fe.SYNC * n)
    start = time.perf_counter()
    count = 0
    while f.next_message() is not None:
        count += 1
    assert count == n
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("frontend", [True, False])
@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four(frontend, length):
    f = MessageFramer(frontend=frontend)
    f.feed(header(b"Q", length))
    with pytest.raises(ProtocolViolation) as ei:
        f.next_message()
    assert ei.value.sqlstate == "08P01"


def test_empty_body_ok():
    f = MessageFramer()
    f.feed(header(b"S", 4))
    assert f.next_message() == (ord("S"), b"", b"S\x00\x00\x00\x04")


def test_small_type_over_limit():
    f = MessageFramer()
    f.feed(header(b"S", 20000))  # header alone is enough to reject
    with pytest.raises(ProtocolViolation) as ei:
        f.next_message()
    assert ei.value.sqlstate == sqlstate.PROTOCOL_VIOLATION
    assert "too long" in ei.value.message


@pytest.mark.parametrize("mtype", sorted(FRONTEND_LARGE_TYPES))
def test_large_types_allowed_past_small_limit(mtype):
    f = MessageFramer()
    f.feed(bytes([mtype]) + struct.pack("!I", 20000))
    assert f.next_message() is None  # waits for the body instead of failing


@pytest.mark.parametrize("mtype", sorted(set(b"DECSHXcf")))
def test_small_types_limit_boundary(mtype):
    f = MessageFramer()
    f.feed(bytes([mtype]) + struct.pack("!I", SMALL_MESSAGE_LIMIT))
    assert f.next_message() is None
    f = MessageFramer()
    f.feed(bytes([mtype]) + struct.pack("!I", SMALL_MESSAGE_LIMIT + 1))
    with pytest.raises(ProtocolViolation):
        f.next_message()


def test_large_limit():
    for frontend in (True, False):
        f = MessageFramer(frontend=frontend)
        f.feed(header(b"d", LARGE_MESSAGE_LIMIT))
        assert f.next_message() is None
        f = MessageFramer(frontend=frontend)
        f.feed(header(b"d", LARGE_MESSAGE_LIMIT + 1))
        with pytest.raises(ProtocolViolation):
            f.next_message()


def test_max_length_override():
    f = MessageFramer(frontend=True, max_length=100)
    f.feed(header(b"Q", 101))
    with pytest.raises(ProtocolViolation):
        f.next_message()
    f = MessageFramer(frontend=True, max_length=20000)
    f.feed(header(b"S", 20000))
    assert f.next_message() is None
    f = MessageFramer(frontend=False, max_length=10)
    f.feed(header(b"D", 11))
    with pytest.raises(ProtocolViolation):
        f.next_message()
    with pytest.raises(ValueError):
        MessageFramer(max_length=3)


@pytest.mark.parametrize("mtype", [b"Z", b"R", b"\x00", b"\xff", b"q", b"G"])
def test_unknown_frontend_type_rejected_on_first_byte(mtype):
    f = MessageFramer(frontend=True)
    f.feed(mtype)
    with pytest.raises(ProtocolViolation) as ei:
        f.next_message()
    assert ei.value.sqlstate == "08P01"
    assert "invalid frontend message type" in ei.value.message
    f = MessageFramer(frontend=True)
    f.feed(mtype + b"\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation):
        f.next_message()


def test_backend_framer_accepts_any_type_byte():
    f = MessageFramer(frontend=False)
    f.feed(b"\x00\x00\x00\x00\x05x")
    assert f.next_message() == (0, b"x", b"\x00\x00\x00\x00\x05x")


def test_valid_frontend_types():
    for t in b"QPBDECSHXdcfFp":
        f = MessageFramer()
        f.feed(bytes([t]) + b"\x00\x00\x00\x04")
        assert f.next_message()[0] == t
