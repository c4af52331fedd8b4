"""Message codecs: round trips, hand-written wire bytes, malformed payloads."""

from __future__ import annotations

import pytest

from pgwire import backend as be
from pgwire import errors, sqlstate
from pgwire import frontend as fe
from pgwire.errors import ProtocolViolation
from pgwire.framing import MessageFramer


def frame(raw: bytes, frontend: bool) -> tuple[int, bytes]:
    f = MessageFramer(frontend=frontend)
    f.feed(raw)
    msg = f.next_message()
    assert msg is not None and msg[2] == raw and f.next_message() is None
    return msg[0], msg[1]


def fe_roundtrip(raw: bytes):
    return fe.decode_frontend(*frame(raw, True))


def be_roundtrip(raw: bytes):
    return be.decode_backend(*frame(raw, False))


def violation(fn, *args, sqlstate_: str = sqlstate.PROTOCOL_VIOLATION) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as ei:
        fn(*args)
    assert ei.value.sqlstate == sqlstate_
    assert ei.value.message
    return ei.value


# ------------------------------------------------------------------ frontend

FRONTEND_MESSAGES = [
    fe.Query("SELECT 1"),
    fe.Query(""),
    fe.Query("SELECT 'žluťoučký kůň', '🐘'"),
    fe.Parse("", "SELECT 1", []),
    fe.Parse("stmt_1", "SELECT $1, $2", [23, 4294967295]),
    fe.Bind("", "", [], [], []),
    fe.Bind("portal", "stmt_1", [1], [b"\x00\x00\x00\x2a", None, b""], [0, 1]),
    fe.Bind("p", "s", [0, 1], [b"a", b"b"], [1]),
    fe.Describe("S", "stmt_1"),
    fe.Describe("P", ""),
    fe.Execute("", 0),
    fe.Execute("portal", 100),
    fe.Close("S", "stmt_1"),
    fe.Close("P", "portal"),
    fe.Sync(),
    fe.Flush(),
    fe.Terminate(),
    fe.CopyData(b"1\tfoo\n"),
    fe.CopyData(b""),
    fe.CopyDone(),
    fe.CopyFail("client gave up"),
    fe.FunctionCall(1598, [1], [b"\x00\x01", None], 1),
    fe.FunctionCall(42, [], [], 0),
    fe.PasswordMessage(b"secret\x00"),
]


@pytest.mark.parametrize("msg", FRONTEND_MESSAGES, ids=lambda m: type(m).__name__)
def test_frontend_roundtrip(msg):
    raw = msg.encode()
    assert fe_roundtrip(raw) == msg


def test_frontend_encoders_match_methods():
    assert fe.encode_query("SELECT 1") == fe.Query("SELECT 1").encode()
    assert fe.SYNC == fe.Sync().encode() == b"S\x00\x00\x00\x04"
    assert fe.FLUSH == b"H\x00\x00\x00\x04"
    assert fe.TERMINATE == b"X\x00\x00\x00\x04"
    assert fe.COPY_DONE == b"c\x00\x00\x00\x04"
    assert fe.encode_execute() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"


def test_query_wire_bytes():
    raw = b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert fe.encode_query("SELECT 1") == raw
    assert fe_roundtrip(raw) == fe.Query("SELECT 1")
    assert fe.query_text(raw[5:]) == "SELECT 1"


def test_parse_bind_wire_bytes():
    # Parse "s1", "SELECT $1", one param of type int4 (23)
    parse = b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"
    assert fe.encode_parse("s1", "SELECT $1", [23]) == parse
    assert fe_roundtrip(parse) == fe.Parse("s1", "SELECT $1", [23])
    assert fe.parse_name_and_query(parse[5:]) == ("s1", "SELECT $1")
    # Bind unnamed portal to "s1": no formats, one text param "42", no result formats
    bind = (
        b"B\x00\x00\x00\x14\x00s1\x00"
        b"\x00\x00"
        b"\x00\x01\x00\x00\x00\x0242"
        b"\x00\x00"
    )
    assert fe.encode_bind("", "s1", [b"42"]) == bind
    assert fe_roundtrip(bind) == fe.Bind("", "s1", [], [b"42"], [])
    assert fe.bind_statement_name(bind[5:]) == ("", "s1")


def test_describe_execute_close_wire_bytes():
    assert fe.encode_describe("P", "") == b"D\x00\x00\x00\x06P\x00"
    assert fe.encode_close("S", "s1") == b"C\x00\x00\x00\x08Ss1\x00"
    assert fe.encode_execute("", 10) == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x0a"
    assert fe_roundtrip(b"E\x00\x00\x00\x09\x00\xff\xff\xff\xff") == fe.Execute("", -1)


def test_bind_65535_params():
    params = [b"x"] * 65535
    msg = fe_roundtrip(fe.encode_bind("", "", params))
    assert len(msg.params) == 65535
    with pytest.raises(ValueError):
        fe.encode_bind("", "", [b"x"] * 65536)


# -------------------------------------------------------------- startup packets


def test_startup_codes():
    assert fe.encode_ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert fe.encode_gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert isinstance(fe.decode_startup(b"\x04\xd2\x16\x2f"), fe.SSLRequest)
    assert isinstance(fe.decode_startup(b"\x04\xd2\x16\x30"), fe.GSSENCRequest)
    cancel = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xfe\xdc\xba\x98"
    assert fe.encode_cancel_request(12345, 0xFEDCBA98) == cancel
    assert fe.decode_startup(cancel[4:]) == fe.CancelRequest(12345, 0xFEDCBA98)
    assert fe.decode_startup(fe.encode_cancel_request(-5, 0)[4:]) == fe.CancelRequest(-5, 0)


def test_startup_roundtrip():
    params = {"user": "ž", "database": "db", "options": "-c search_path=x"}
    msg = fe.decode_startup(fe.encode_startup(params)[4:])
    assert msg == fe.StartupMessage(196608, params)
    msg = fe.decode_startup(fe.encode_startup({"user": "u"}, protocol=(3 << 16) | 2)[4:])
    assert (msg.major, msg.minor) == (3, 2)
    assert fe.decode_startup(fe.encode_startup({})[4:]).params == {}
    for obj in (fe.SSLRequest(), fe.GSSENCRequest(), fe.CancelRequest(1, 2), msg):
        assert fe.decode_startup(obj.encode()[4:]) == obj


def test_startup_unsupported_version():
    err = violation(
        fe.decode_startup, b"\x00\x02\x00\x00user\x00u\x00\x00",
        sqlstate_=sqlstate.FEATURE_NOT_SUPPORTED,
    )
    assert err.message == "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"
    err = violation(
        fe.decode_startup, b"\x04\xd2\x16\x31", sqlstate_=sqlstate.FEATURE_NOT_SUPPORTED
    )
    assert "1234.5681" in err.message


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x03",
        b"\x00\x03\x00\x00",  # no terminator at all
        b"\x00\x03\x00\x00user\x00u\x00",  # missing final NUL
        b"\x00\x03\x00\x00user\x00",  # name without a value (odd count)
        b"\x00\x03\x00\x00user",  # name without its NUL
        b"\x00\x03\x00\x00user\x00u\x00\x00x",  # data after the terminator
        b"\x00\x03\x00\x00us\xffer\x00u\x00\x00",  # bad UTF-8 in a name
        b"\x00\x03\x00\x00user\x00\xc3\x28\x00\x00",  # bad UTF-8 in a value
        b"\x04\xd2\x16\x2f\x00",  # SSLRequest with extra bytes
        b"\x04\xd2\x16\x30\x00\x00\x00\x00",
        b"\x04\xd2\x16\x2e\x00\x00\x00\x01",  # short cancel request
        b"\x04\xd2\x16\x2e" + b"\x00" * 9,
    ],
)
def test_startup_malformed(payload):
    violation(fe.decode_startup, payload)


# --------------------------------------------------------------- 'p' helpers


def test_password_helpers():
    raw = fe.encode_password("hunter2")
    assert raw == b"p\x00\x00\x00\x0chunter2\x00"
    mtype, payload = frame(raw, True)
    assert fe.decode_frontend(mtype, payload) == fe.PasswordMessage(b"hunter2\x00")
    assert fe.decode_password(payload) == "hunter2"
    violation(fe.decode_password, b"hunter2")
    violation(fe.decode_password, b"hun\x00ter2\x00")
    violation(fe.decode_password, b"\xff\x00")
    assert fe.decode_password(b"\x00") == ""


def test_sasl_helpers():
    initial = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    raw = fe.encode_sasl_initial("SCRAM-SHA-256", initial)
    assert raw == (
        b"p\x00\x00\x00\x32SCRAM-SHA-256\x00\x00\x00\x00\x1c" + initial
    )
    assert fe.decode_sasl_initial(frame(raw, True)[1]) == ("SCRAM-SHA-256", initial)
    assert fe.decode_sasl_initial(b"SCRAM-SHA-256\x00\xff\xff\xff\xff") == ("SCRAM-SHA-256", b"")
    violation(fe.decode_sasl_initial, b"SCRAM-SHA-256\x00\xff\xff\xff\xfe")
    violation(fe.decode_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc")
    violation(fe.decode_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00\x00\x01abc")
    violation(fe.decode_sasl_initial, b"SCRAM-SHA-256")
    raw = fe.encode_sasl_response(b"c=biws,r=abc,p=xyz")
    assert fe.decode_sasl_response(frame(raw, True)[1]) == b"c=biws,r=abc,p=xyz"


# --------------------------------------------------------- malformed frontend


@pytest.mark.parametrize(
    "mtype,payload",
    [
        (b"Q", b"SELECT 1"),  # missing NUL
        (b"Q", b"SELECT 1\x00x"),  # trailing garbage
        (b"Q", b"SELECT \xff\x00"),  # bad UTF-8
        (b"P", b"s\x00SELECT 1\x00"),  # missing param count
        (b"P", b"s\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17"),  # truncated OIDs
        (b"P", b"s\x00SELECT 1\x00\x00\x00\x00"),  # trailing data
        (b"P", b"s\x00SELECT 1"),
        (b"B", b"\x00s\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
        (b"B", b"\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),  # short value
        (b"B", b"\x00s\x00\x00\x02\x00\x00\x00\x01\x00\x01\xff\xff\xff\xff\x00\x00"),
        (b"B", b"\x00s\x00\x00\x00\x00\x00"),  # missing result format count
        (b"B", b"\x00s"),
        (b"D", b"X\x00"),  # bad kind
        (b"D", b"S"),
        (b"D", b""),
        (b"D", b"Sname"),
        (b"C", b"Q\x00"),
        (b"C", b"Sname\x00\x00"),
        (b"E", b"\x00\x00\x00"),
        (b"E", b"\x00\x00\x00\x00\x00\x00"),
        (b"S", b"\x00"),
        (b"H", b"x"),
        (b"X", b"\x00"),
        (b"c", b"\x00"),
        (b"f", b"oops"),
        (b"F", b"\x00\x00\x00\x01\x00\x00\x00\x01\xff\xff\xff\xf0\x00\x00"),
        (b"F", b"\x00\x00\x00\x01\x00\x00\x00\x00"),  # missing result format
        (b"F", b"\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00"),
    ],
)
def test_frontend_malformed(mtype, payload):
    violation(fe.decode_frontend, mtype[0], payload)


@pytest.mark.parametrize("mtype", [0, ord("Z"), ord("R"), ord("q"), 255])
def test_frontend_unknown_type(mtype):
    violation(fe.decode_frontend, mtype, b"")


@pytest.mark.parametrize("msg", FRONTEND_MESSAGES, ids=lambda m: type(m).__name__)
def test_frontend_every_truncation(msg):
    mtype, payload = frame(msg.encode(), True)
    for cut in range(len(payload)):
        try:
            fe.decode_frontend(mtype, payload[:cut])
        except ProtocolViolation as exc:
            assert exc.sqlstate == sqlstate.PROTOCOL_VIOLATION
        else:
            # Opaque bodies are valid at any length.
            assert mtype in (ord("d"), ord("p"))


def test_hot_path_helpers():
    for name, sql in [("", "SELECT 1"), ("s_1", "SELECT 'ü'")]:
        payload = fe.encode_parse(name, sql, [25])[5:]
        assert fe.parse_name_and_query(payload) == (name, sql)
    payload = fe.encode_bind("portal", "stmt", [b"x"], [1], [1])[5:]
    assert fe.bind_statement_name(payload) == ("portal", "stmt")
    violation(fe.parse_name_and_query, b"name\x00SELECT 1")
    violation(fe.parse_name_and_query, b"name")
    violation(fe.parse_name_and_query, b"")
    violation(fe.bind_statement_name, b"\x00st")
    violation(fe.bind_statement_name, b"\xff\x00s\x00")
    violation(fe.query_text, b"")
    violation(fe.query_text, b"SELECT 1\x00\x00")


def test_encoders_reject_nul():
    with pytest.raises(ValueError):
        fe.encode_query("SELECT '\x00'")
    with pytest.raises(ValueError):
        fe.encode_startup({"user": "a\x00b"})
    with pytest.raises(ValueError):
        fe.encode_startup({"": "x"})
    with pytest.raises(ValueError):
        fe.encode_describe("X", "")


# ------------------------------------------------------------------- backend

BACKEND_MESSAGES = [
    be.Authentication(0, b""),
    be.Authentication(3, b""),
    be.Authentication(5, b"\x01\x02\x03\x04"),
    be.Authentication(10, b"SCRAM-SHA-256\x00\x00"),
    be.Authentication(11, b"r=abc,s=c2FsdA==,i=4096"),
    be.Authentication(12, b"v=xyz"),
    be.ParameterStatus("server_version", "16.2"),
    be.ParameterStatus("application_name", ""),
    be.BackendKeyData(4321, 0xFFFFFFFF),
    be.BackendKeyData(-1, 0),
    be.ReadyForQuery("I"),
    be.ReadyForQuery("T"),
    be.ReadyForQuery("E"),
    be.RowDescription([]),
    be.RowDescription(
        [be.Field("id", 16384, 1, 23, 4, -1, 0), be.Field("blob", 16384, 2, 17, -1, -1, 1)]
    ),
    be.DataRow([]),
    be.DataRow([b"1", None, b"", b"\x00\xff"]),
    be.CommandComplete("INSERT 0 1"),
    be.EmptyQueryResponse(),
    be.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "relation missing"}),
    be.ErrorResponse({}),
    be.NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hello", "W": "PL/pgSQL"}),
    be.NotificationResponse(77, "chan", "payload"),
    be.NotificationResponse(77, "chan", ""),
    be.ParseComplete(),
    be.BindComplete(),
    be.CloseComplete(),
    be.NoData(),
    be.PortalSuspended(),
    be.ParameterDescription([]),
    be.ParameterDescription([23, 25, 4294967295]),
    be.CopyInResponse(0, [0, 0]),
    be.CopyOutResponse(1, [1]),
    be.CopyBothResponse(0, []),
    be.CopyData(b"row\n"),
    be.CopyDone(),
    be.NegotiateProtocolVersion(0, ["_pq_.foo", "_pq_.bar"]),
    be.NegotiateProtocolVersion(2, []),
    be.FunctionCallResponse(None),
    be.FunctionCallResponse(b"\x00\x01"),
]


@pytest.mark.parametrize("msg", BACKEND_MESSAGES, ids=lambda m: type(m).__name__)
def test_backend_roundtrip(msg):
    assert be_roundtrip(msg.encode()) == msg


@pytest.mark.parametrize("msg", BACKEND_MESSAGES, ids=lambda m: type(m).__name__)
def test_backend_every_truncation(msg):
    mtype, payload = frame(msg.encode(), False)
    for cut in range(len(payload)):
        try:
            be.decode_backend(mtype, payload[:cut])
        except ProtocolViolation as exc:
            assert exc.sqlstate == sqlstate.PROTOCOL_VIOLATION
        else:
            assert mtype in (ord("d"), ord("R"))


def test_backend_startup_sequence_wire_bytes():
    stream = (
        b"R\x00\x00\x00\x08\x00\x00\x00\x00"
        b"S\x00\x00\x00\x18server_version\x0016.2\x00"
        b"K\x00\x00\x00\x0c\x00\x00\x30\x39\xde\xad\xbe\xef"
        b"Z\x00\x00\x00\x05I"
    )
    f = MessageFramer(frontend=False)
    f.feed(stream)
    msgs = [be.decode_backend(t, p) for t, p, _ in f]
    assert msgs == [
        be.Authentication(0, b""),
        be.ParameterStatus("server_version", "16.2"),
        be.BackendKeyData(12345, 0xDEADBEEF),
        be.ReadyForQuery("I"),
    ]
    assert be.encode_auth_ok() == stream[:9]
    assert be.encode_parameter_status("server_version", "16.2") == stream[9:34]
    assert be.encode_backend_key_data(12345, 0xDEADBEEF) == stream[34:47]
    assert be.encode_ready_for_query("I") == be.READY_IDLE == stream[47:]


def test_simple_query_response_wire_bytes():
    # SELECT 1 AS x: RowDescription, DataRow, CommandComplete, ReadyForQuery
    stream = (
        b"T\x00\x00\x00\x1a\x00\x01x\x00"
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
        b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
        b"C\x00\x00\x00\x0dSELECT 1\x00"
        b"Z\x00\x00\x00\x05I"
    )
    f = MessageFramer(frontend=False)
    f.feed(stream)
    msgs = [be.decode_backend(t, p) for t, p, _ in f]
    fields = [be.Field("x", 0, 0, 23, 4, -1, 0)]
    assert msgs == [
        be.RowDescription(fields),
        be.DataRow([b"1"]),
        be.CommandComplete("SELECT 1"),
        be.ReadyForQuery("I"),
    ]
    assert (
        be.encode_row_description(fields)
        + be.encode_data_row([b"1"])
        + be.encode_command_complete("SELECT 1")
        + be.READY_IDLE
        == stream
    )


def test_real_error_response():
    # What Postgres 16 sends for SELECT 1/0.
    raw = (
        b"E\x00\x00\x00\x41"
        b"SERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00"
        b"Fint.c\x00L841\x00Rint4div\x00\x00"
    )
    err = be_roundtrip(raw)
    assert isinstance(err, be.ErrorResponse)
    assert err.severity == "ERROR"
    assert err.sqlstate == sqlstate.DIVISION_BY_ZERO
    assert err.message == "division by zero"
    assert err.fields["R"] == "int4div"
    assert err.detail is None and err.hint is None
    assert be.encode_error(err.fields) == raw


def test_auth_wire_bytes():
    md5 = b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04"
    assert be.encode_auth_md5(b"\x01\x02\x03\x04") == md5
    assert be_roundtrip(md5) == be.Authentication(be.AUTH_MD5, b"\x01\x02\x03\x04")
    assert be.encode_auth_cleartext() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    sasl = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    assert be.encode_auth_sasl(["SCRAM-SHA-256"]) == sasl
    auth = be_roundtrip(sasl)
    assert auth.code == be.AUTH_SASL and auth.mechanisms == ["SCRAM-SHA-256"]
    assert be_roundtrip(be.encode_auth_sasl_continue(b"r=1,s=2,i=3")).data == b"r=1,s=2,i=3"
    assert be_roundtrip(be.encode_auth_sasl_final(b"v=xx")) == be.Authentication(12, b"v=xx")
    assert be.Authentication(0).mechanisms == []


def test_misc_backend_encoders():
    assert be.PARSE_COMPLETE == b"1\x00\x00\x00\x04"
    assert be.BIND_COMPLETE == b"2\x00\x00\x00\x04"
    assert be.CLOSE_COMPLETE == b"3\x00\x00\x00\x04"
    assert be.NO_DATA == b"n\x00\x00\x00\x04"
    assert be.EMPTY_QUERY_RESPONSE == b"I\x00\x00\x00\x04"
    assert be.PORTAL_SUSPENDED == b"s\x00\x00\x00\x04"
    assert be.COPY_DONE == b"c\x00\x00\x00\x04"
    assert be.encode_copy_in_response(0, [0]) == b"G\x00\x00\x00\x09\x00\x00\x01\x00\x00"
    assert be.encode_copy_out_response(0, []) == b"H\x00\x00\x00\x07\x00\x00\x00"
    assert be.encode_copy_both_response(1, [])[0:1] == b"W"
    assert be.encode_parameter_description([23]) == b"t\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x17"
    assert be.encode_notification(1, "c", "p") == b"A\x00\x00\x00\x0c\x00\x00\x00\x01c\x00p\x00"
    assert be.encode_negotiate_protocol_version(0, ["_pq_.x"]) == (
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00"
    )
    assert be.encode_data_row(["ü", None]) == be.encode_data_row([b"\xc3\xbc", None])
    assert be.CopyData is fe.CopyData and be.CopyDone is fe.CopyDone


def test_ready_status():
    assert be.ready_status(be.READY_IDLE) == "I"
    assert be.ready_status(be.READY_IN_TRANSACTION) == "T"
    assert be.ready_status(be.READY_FAILED) == "E"
    for bad in (b"", b"Z\x00\x00\x00\x05X", b"Z\x00\x00\x00\x06II", b"S\x00\x00\x00\x05I"):
        violation(be.ready_status, bad)


@pytest.mark.parametrize(
    "mtype,payload",
    [
        (b"R", b"\x00\x00"),
        (b"R", b"\x00\x00\x00\x00x"),  # AuthenticationOk with data
        (b"R", b"\x00\x00\x00\x05\x01\x02\x03"),  # short md5 salt
        (b"R", b"\x00\x00\x00\x0aSCRAM-SHA-256\x00"),  # SASL list without terminator
        (b"R", b"\x00\x00\x00\x0aSCRAM-SHA-256"),
        (b"S", b"name\x00value"),
        (b"S", b"name\x00"),
        (b"K", b"\x00\x00\x00\x01"),
        (b"K", b"\x00" * 9),
        (b"Z", b""),
        (b"Z", b"X"),
        (b"Z", b"II"),
        (b"T", b"\x00\x01x\x00\x00\x00"),
        (b"T", b"\x00\x01x"),
        (b"T", b"\x00\x00\x00"),
        (b"D", b"\x00\x01\xff\xff\xff\xfe"),  # length -2
        (b"D", b"\x00\x01\x00\x00\x00\x05abc"),
        (b"D", b"\x00\x02\xff\xff\xff\xff"),
        (b"D", b"\x00\x00\x00"),
        (b"D", b"\x00"),
        (b"C", b"SELECT 1"),
        (b"C", b"SELECT \xff\x00"),
        (b"I", b"\x00"),
        (b"E", b"SERROR\x00"),  # missing final NUL
        (b"E", b"SERROR"),
        (b"E", b"SERROR\x00\x00x"),
        (b"E", b"M\xc3\x00\x00"),
        (b"N", b""),
        (b"A", b"\x00\x00\x00\x01chan\x00"),
        (b"1", b"x"),
        (b"t", b"\x00\x02\x00\x00\x00\x17"),
        (b"G", b"\x00\x00\x01"),
        (b"H", b""),
        (b"W", b"\x00\x00\x00\x00"),
        (b"v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # negative count
        (b"v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),
        (b"v", b"\x00\x00\x00\x00\x00\x00\x00\x01abc"),
        (b"V", b"\xff\xff\xff\xfe"),
        (b"V", b"\x00\x00\x00\x02a"),
        (b"c", b"x"),
    ],
)
def test_backend_malformed(mtype, payload):
    violation(be.decode_backend, mtype[0], payload)


@pytest.mark.parametrize("mtype", [0, ord("Q"), ord("P"), ord("p"), ord("X"), 255])
def test_backend_unknown_type(mtype):
    violation(be.decode_backend, mtype, b"")


# -------------------------------------------------------------- errors module


def test_error_helpers():
    fields = errors.error_fields("FATAL", sqlstate.INVALID_PASSWORD, "bad", detail="d", hint="h")
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "bad", "D": "d", "H": "h"}
    assert errors.error_fields("ERROR", "XX000", "m") == {
        "S": "ERROR", "V": "ERROR", "C": "XX000", "M": "m",
    }
    raw = errors.error_response("FATAL", sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients")
    assert raw == (
        b"E\x00\x00\x00\x33SFATAL\x00VFATAL\x00C53300\x00Msorry, too many clients\x00\x00"
    )
    err = be_roundtrip(raw)
    assert (err.severity, err.sqlstate) == ("FATAL", "53300")
    assert err.message == "sorry, too many clients"
    notice = be_roundtrip(errors.notice_response(message="hi"))
    assert isinstance(notice, be.NoticeResponse)
    assert (notice.severity, notice.sqlstate, notice.message) == ("NOTICE", "00000", "hi")
    warn = be_roundtrip(errors.notice_response("WARNING", sqlstate.WARNING, "w", hint="x"))
    assert warn.fields["V"] == "WARNING" and warn.hint == "x"


def test_error_encoding_sanitises_values():
    err = be_roundtrip(errors.error_response("ERROR", "08P01", "bad \x00 byte \udcff"))
    assert "\x00" not in err.message and err.message.startswith("bad ")
    with pytest.raises(ValueError):
        be.encode_error({"MM": "x"})


def test_protocol_violation():
    exc = ProtocolViolation("boom")
    assert exc.message == "boom" and exc.sqlstate == "08P01" and str(exc) == "boom"
    exc = ProtocolViolation("nope", sqlstate.FEATURE_NOT_SUPPORTED)
    assert exc.sqlstate == "0A000"


# ------------------------------------------------------------------ sqlstate


def test_sqlstate_table():
    expected = {
        "SUCCESSFUL_COMPLETION": "00000",
        "WARNING": "01000",
        "CONNECTION_EXCEPTION": "08000",
        "CONNECTION_FAILURE": "08006",
        "PROTOCOL_VIOLATION": "08P01",
        "FEATURE_NOT_SUPPORTED": "0A000",
        "INVALID_PARAMETER_VALUE": "22023",
        "INVALID_AUTHORIZATION_SPECIFICATION": "28000",
        "INVALID_PASSWORD": "28P01",
        "INVALID_CATALOG_NAME": "3D000",
        "UNDEFINED_OBJECT": "42704",
        "SYNTAX_ERROR": "42601",
        "DUPLICATE_PREPARED_STATEMENT": "42P05",
        "UNDEFINED_PSTATEMENT": "26000",
        "INVALID_CURSOR_NAME": "34000",
        "IN_FAILED_SQL_TRANSACTION": "25P02",
        "ACTIVE_SQL_TRANSACTION": "25001",
        "TOO_MANY_CONNECTIONS": "53300",
        "CONFIGURATION_LIMIT_EXCEEDED": "53400",
        "PROGRAM_LIMIT_EXCEEDED": "54000",
        "QUERY_CANCELED": "57014",
        "ADMIN_SHUTDOWN": "57P01",
        "CRASH_SHUTDOWN": "57P02",
        "CANNOT_CONNECT_NOW": "57P03",
        "IDLE_SESSION_TIMEOUT": "57P05",
        "INTERNAL_ERROR": "XX000",
        "CANT_CHANGE_RUNTIME_PARAM": "55P02",
        "OBJECT_NOT_IN_PREREQUISITE_STATE": "55000",
    }
    for name, code in expected.items():
        assert getattr(sqlstate, name) == code, name
    assert sqlstate.NAMES["08P01"] == "protocol_violation"
    assert sqlstate.NAMES["26000"] == "invalid_sql_statement_name"
    assert sqlstate.NAMES["57014"] == "query_canceled"
    constants = {
        k: v for k, v in vars(sqlstate).items() if k.isupper() and isinstance(v, str)
    }
    assert len(constants) > 200
    for name, code in constants.items():
        assert len(code) == 5 and code.isalnum() and code.upper() == code, name
        assert code in sqlstate.NAMES, name
    for cls in ("08", "0A", "22", "23", "25", "28", "3D", "40", "42", "53", "54", "55", "57",
                "58", "XX"):
        assert any(c.startswith(cls) for c in sqlstate.NAMES), cls
