"""Property-based fuzzing: whatever bytes arrive, only ProtocolViolation escapes.

Also checks that decode(encode(x)) == x for generated messages and that how a
stream is chunked never changes what the framer returns.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire.auth import AuthFailed, ScramServer, parse_scram_verifier, scram_client_verifier
from pgwire.errors import ProtocolViolation
from pgwire.framing import MessageFramer, StartupFramer

FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# ------------------------------------------------------------------ corpora

FRONTEND_SAMPLES = [
    fe.encode_query("SELECT 1"),
    fe.encode_parse("s", "SELECT $1", [23]),
    fe.encode_bind("p", "s", [b"1", None], [0], [1]),
    fe.encode_describe("S", "s"),
    fe.encode_execute("p", 5),
    fe.encode_close("P", "p"),
    fe.SYNC,
    fe.FLUSH,
    fe.encode_copy_data(b"a\tb\n"),
    fe.COPY_DONE,
    fe.encode_copy_fail("x"),
    fe.encode_function_call(1, [b"\x00", None], [1], 1),
    fe.encode_password("pw"),
    fe.encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"),
    fe.TERMINATE,
]

BACKEND_SAMPLES = [
    be.encode_auth_ok(),
    be.encode_auth_md5(b"abcd"),
    be.encode_auth_sasl(["SCRAM-SHA-256"]),
    be.encode_auth_sasl_continue(b"r=x,s=y,i=1"),
    be.encode_parameter_status("TimeZone", "UTC"),
    be.encode_backend_key_data(1, 2),
    be.READY_IDLE,
    be.encode_row_description([be.Field("a"), be.Field("b", 1, 2, 23, 4, -1, 1)]),
    be.encode_data_row([b"x", None, b""]),
    be.encode_command_complete("SELECT 1"),
    be.EMPTY_QUERY_RESPONSE,
    be.encode_error({"S": "ERROR", "C": "42601", "M": "bad"}),
    be.encode_notice({"S": "NOTICE", "M": "hi"}),
    be.encode_notification(5, "ch", "pl"),
    be.PARSE_COMPLETE,
    be.BIND_COMPLETE,
    be.CLOSE_COMPLETE,
    be.NO_DATA,
    be.PORTAL_SUSPENDED,
    be.encode_parameter_description([23, 25]),
    be.encode_copy_in_response(0, [0, 0]),
    be.encode_copy_out_response(1, [1]),
    be.encode_copy_both_response(0, []),
    be.encode_copy_data(b"row"),
    be.COPY_DONE,
    be.encode_negotiate_protocol_version(0, ["_pq_.x"]),
    be.encode_function_call_response(b"v"),
    be.encode_function_call_response(None),
]

STARTUP_SAMPLES = [
    fe.encode_startup({"user": "u", "database": "d", "application_name": "psql"}),
    fe.encode_ssl_request(),
    fe.encode_gssenc_request(),
    fe.encode_cancel_request(123, 456),
]


@st.composite
def mutated(draw, samples: list[bytes]) -> bytes:
    """A valid stream of sample messages, then a few random edits."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(samples), min_size=1, max_size=8))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def chunks(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run_message_stream(data_chunks: list[bytes], frontend: bool) -> list[tuple[int, bytes]]:
    """Frame + decode everything; stop at the first ProtocolViolation like a server."""
    decode = fe.decode_frontend if frontend else be.decode_backend
    framer = MessageFramer(frontend=frontend)
    out = []
    try:
        for chunk in data_chunks:
            framer.feed(chunk)
            while (msg := framer.next_message()) is not None:
                mtype, payload, raw = msg
                assert raw[0] == mtype and raw[5:] == payload
                out.append((mtype, payload))
                decode(mtype, payload)
    except ProtocolViolation as exc:
        assert exc.sqlstate and exc.message
    return out


def run_startup_stream(data_chunks: list[bytes]) -> None:
    framer = StartupFramer()
    try:
        for chunk in data_chunks:
            framer.feed(chunk)
            while (packet := framer.next_packet()) is not None:
                fe.decode_startup(packet)
        framer.remaining()
    except ProtocolViolation as exc:
        assert exc.sqlstate and exc.message


# ------------------------------------------------------------ no escapes


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_message_framer(data, frontend):
    run_message_stream([data], frontend)


@FUZZ
@given(st.data(), st.booleans())
def test_mutated_streams(data, frontend):
    stream = data.draw(mutated(FRONTEND_SAMPLES if frontend else BACKEND_SAMPLES))
    run_message_stream(chunks(data.draw, stream), frontend)


@FUZZ
@given(st.data())
def test_mutated_startup(data):
    stream = data.draw(mutated(STARTUP_SAMPLES))
    run_startup_stream(chunks(data.draw, stream))


@FUZZ
@given(st.binary(max_size=200))
def test_random_startup_payloads(payload):
    for candidate in (payload, b"\x00\x03\x00\x00" + payload):
        try:
            fe.decode_startup(candidate)
        except ProtocolViolation:
            pass
    run_startup_stream([struct.pack("!I", len(payload) + 4) + payload])


@FUZZ
@given(st.sampled_from(sorted(set(b"QPBDECSHXdcfFp"))), st.binary(max_size=120))
def test_random_frontend_payloads(mtype, payload):
    for fn in (
        lambda p: fe.decode_frontend(mtype, p),
        fe.decode_password,
        fe.decode_sasl_initial,
        fe.parse_name_and_query,
        fe.bind_statement_name,
        fe.query_text,
    ):
        try:
            fn(payload)
        except ProtocolViolation:
            pass


@FUZZ
@given(st.sampled_from(sorted(set(b"RSKZTDCIENA123nstGHWdcvV"))), st.binary(max_size=120))
def test_random_backend_payloads(mtype, payload):
    try:
        msg = be.decode_backend(mtype, payload)
    except ProtocolViolation:
        return
    if isinstance(msg, be.Authentication):
        try:
            msg.mechanisms  # noqa: B018 - must not raise for a decoded message
        except ProtocolViolation:
            raise AssertionError("decoded SASL request with unparsable mechanisms") from None


@FUZZ
@given(st.data())
def test_mutated_payloads_per_type(data):
    # Mutate bodies directly, bypassing the framer, so every decoder sees garbage
    # that still starts out looking like its own message.
    frontend = data.draw(st.booleans())
    raw = data.draw(st.sampled_from(FRONTEND_SAMPLES if frontend else BACKEND_SAMPLES))
    payload = data.draw(mutated([raw[5:]]))
    try:
        (fe.decode_frontend if frontend else be.decode_backend)(raw[0], payload)
    except ProtocolViolation:
        pass


# -------------------------------------------------------- chunk invariance


@FUZZ
@given(st.data(), st.booleans())
def test_chunking_never_changes_messages(data, frontend):
    samples = FRONTEND_SAMPLES if frontend else BACKEND_SAMPLES
    stream = b"".join(data.draw(st.lists(st.sampled_from(samples), max_size=12)))
    whole = run_message_stream([stream], frontend)
    assert b"".join(bytes([t]) + struct.pack("!I", len(p) + 4) + p for t, p in whole) == stream
    assert run_message_stream(chunks(data.draw, stream), frontend) == whole


# ---------------------------------------------------------------- round trips

names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
                max_size=20)
values = st.one_of(st.none(), st.binary(max_size=20))
int16s = st.integers(-(2**15), 2**15 - 1)
uint32s = st.integers(0, 2**32 - 1)
int32s = st.integers(-(2**31), 2**31 - 1)

frontend_messages = st.one_of(
    st.builds(fe.Query, names),
    st.builds(fe.Parse, names, names, st.lists(uint32s, max_size=5)),
    st.lists(values, max_size=5).flatmap(
        lambda ps: st.builds(
            fe.Bind,
            names,
            names,
            st.sampled_from([[], [0], [1], [1] * len(ps)]),
            st.just(ps),
            st.lists(int16s, max_size=4),
        )
    ),
    st.builds(fe.Describe, st.sampled_from("SP"), names),
    st.builds(fe.Execute, names, int32s),
    st.builds(fe.Close, st.sampled_from("SP"), names),
    st.builds(fe.Sync),
    st.builds(fe.Flush),
    st.builds(fe.Terminate),
    st.builds(fe.CopyData, st.binary(max_size=40)),
    st.builds(fe.CopyDone),
    st.builds(fe.CopyFail, names),
    st.lists(values, max_size=4).flatmap(
        lambda args: st.builds(
            fe.FunctionCall, uint32s, st.sampled_from([[], [1]]), st.just(args), int16s
        )
    ),
    st.builds(fe.PasswordMessage, st.binary(max_size=30)),
)

fields = st.builds(be.Field, names, uint32s, int16s, uint32s, int16s, int32s, int16s)
field_dicts = st.dictionaries(
    st.characters(min_codepoint=1, max_codepoint=127), names, max_size=6
)
backend_messages = st.one_of(
    st.builds(be.Authentication, st.sampled_from([0, 3]), st.just(b"")),
    st.builds(be.Authentication, st.just(5), st.binary(min_size=4, max_size=4)),
    st.builds(be.Authentication, st.sampled_from([11, 12]), st.binary(max_size=30)),
    st.builds(be.ParameterStatus, names, names),
    st.builds(be.BackendKeyData, int32s, uint32s),
    st.builds(be.ReadyForQuery, st.sampled_from("ITE")),
    st.builds(be.RowDescription, st.lists(fields, max_size=4)),
    st.builds(be.DataRow, st.lists(values, max_size=6)),
    st.builds(be.CommandComplete, names),
    st.builds(be.ErrorResponse, field_dicts),
    st.builds(be.NoticeResponse, field_dicts),
    st.builds(be.NotificationResponse, int32s, names, names),
    st.builds(be.ParameterDescription, st.lists(uint32s, max_size=5)),
    st.builds(be.CopyInResponse, st.integers(0, 1), st.lists(st.integers(0, 1), max_size=4)),
    st.builds(be.CopyOutResponse, st.integers(0, 1), st.lists(st.integers(0, 1), max_size=4)),
    st.builds(be.CopyBothResponse, st.integers(0, 1), st.lists(st.integers(0, 1), max_size=4)),
    st.builds(be.NegotiateProtocolVersion, int32s, st.lists(names, max_size=3)),
    st.builds(be.FunctionCallResponse, values),
    st.sampled_from(
        [be.ParseComplete(), be.BindComplete(), be.CloseComplete(), be.NoData(),
         be.PortalSuspended(), be.EmptyQueryResponse(), be.CopyDone()]
    ),
)


@FUZZ
@given(st.lists(frontend_messages, min_size=1, max_size=6), st.data())
def test_frontend_roundtrip_property(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    framer = MessageFramer(frontend=True)
    decoded = []
    for chunk in chunks(data.draw, stream):
        framer.feed(chunk)
        decoded += [fe.decode_frontend(t, p) for t, p, _ in framer]
    assert decoded == msgs


@FUZZ
@given(st.lists(backend_messages, min_size=1, max_size=6), st.data())
def test_backend_roundtrip_property(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    framer = MessageFramer(frontend=False)
    decoded = []
    for chunk in chunks(data.draw, stream):
        framer.feed(chunk)
        decoded += [be.decode_backend(t, p) for t, p, _ in framer]
    assert decoded == msgs


@FUZZ
@given(st.dictionaries(names.filter(bool), names, max_size=5), st.integers(0, 0xFFFF))
def test_startup_roundtrip_property(params, minor):
    msg = fe.decode_startup(fe.encode_startup(params, (3 << 16) | minor)[4:])
    assert msg == fe.StartupMessage((3 << 16) | minor, params)


# ------------------------------------------------------------------- SCRAM

_VERIFIER = parse_scram_verifier(scram_client_verifier("pw", iterations=64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=120), st.booleans())
def test_scram_garbage(first, final, known):
    server = ScramServer(_VERIFIER if known else None, "u", mock_iterations=64)
    try:
        server.first(first)
    except ProtocolViolation:
        return
    try:
        server.final(final)
    except (ProtocolViolation, AuthFailed):
        return
    raise AssertionError("garbage authenticated")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_scram_mutated_final(data):
    server = ScramServer(_VERIFIER, "u")
    server_first = server.first(b"n,,n=,r=clientnonce").decode()
    nonce = server_first.split(",")[0][2:]
    final = bytearray(f"c=biws,r={nonce},p={'A' * 43}=".encode())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(final) - 1))
        final[pos] = data.draw(st.integers(0, 255))
    try:
        server.final(bytes(final))
    except (ProtocolViolation, AuthFailed):
        return
    raise AssertionError("mutated proof authenticated")
