"""Messages a client sends: startup packets and typed messages, decode and encode.

Decoders take the payload a framer returned (no header) and raise only
ProtocolViolation. Encoders return complete messages (header included), ready to
write. Counts of int16 arrays are unsigned, as Postgres and libpq read them
(a Bind may carry up to 65535 parameters).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pgwire import sqlstate
from pgwire._reader import U32, Reader, cstr_bytes, decode_utf8
from pgwire.errors import ProtocolViolation

__all__ = [
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "CANCEL_REQUEST_CODE",
    "StartupMessage",
    "SSLRequest",
    "GSSENCRequest",
    "CancelRequest",
    "Query",
    "Parse",
    "Bind",
    "Describe",
    "Execute",
    "Close",
    "Sync",
    "Flush",
    "Terminate",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "FunctionCall",
    "PasswordMessage",
    "FrontendMessage",
    "decode_startup",
    "decode_frontend",
    "decode_password",
    "decode_sasl_initial",
    "decode_sasl_response",
    "parse_name_and_query",
    "bind_statement_name",
    "query_text",
    "encode_startup",
    "encode_ssl_request",
    "encode_gssenc_request",
    "encode_cancel_request",
    "encode_query",
    "encode_parse",
    "encode_bind",
    "encode_describe",
    "encode_execute",
    "encode_close",
    "encode_copy_data",
    "encode_copy_fail",
    "encode_function_call",
    "encode_password",
    "encode_sasl_initial",
    "encode_sasl_response",
    "SYNC",
    "FLUSH",
    "TERMINATE",
    "COPY_DONE",
]

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678

_HEADER = struct.Struct("!BI")
_STARTUP_CODE = struct.Struct("!II")  # length, code
_CANCEL = struct.Struct("!IIiI")  # length, code, pid, secret
_CANCEL_KEY = struct.Struct("!iI")  # pid, secret
_I32 = struct.Struct("!i")
_U16 = struct.Struct("!H")


# --------------------------------------------------------------------------- startup


@dataclass(slots=True)
class StartupMessage:
    """Protocol 3.x startup; ``protocol`` is the full 32-bit version code."""

    protocol: int = PROTOCOL_3_0
    params: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def encode(self) -> bytes:
        return encode_startup(self.params, self.protocol)


@dataclass(slots=True)
class SSLRequest:
    """Client asks for TLS; answer one byte, 'S' or 'N'."""

    def encode(self) -> bytes:
        return encode_ssl_request()


@dataclass(slots=True)
class GSSENCRequest:
    """Client asks for GSSAPI encryption; answer one byte, 'G' or 'N'."""

    def encode(self) -> bytes:
        return encode_gssenc_request()


@dataclass(slots=True)
class CancelRequest:
    """Sent on a fresh connection; pid read signed, secret unsigned (as encoded)."""

    pid: int
    secret: int

    def encode(self) -> bytes:
        return encode_cancel_request(self.pid, self.secret)


def decode_startup(payload: bytes) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    """Decode a startup-phase packet (payload after the length word)."""
    n = len(payload)
    if n < 4:
        raise ProtocolViolation("invalid length of startup packet")
    (code,) = U32.unpack_from(payload, 0)
    if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
        if n != 4:
            raise ProtocolViolation("invalid length of encryption request packet")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if n != 12:
            raise ProtocolViolation("invalid length of cancel request packet")
        pid, secret = _CANCEL_KEY.unpack_from(payload, 4)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )
    return StartupMessage(code, _startup_params(payload))


def _startup_params(payload: bytes) -> dict[str, str]:
    # name\0value\0 ... \0 -- the lone final NUL must be the packet's last byte.
    params: dict[str, str] = {}
    pos = 4
    n = len(payload)
    while True:
        end = payload.find(b"\0", pos)
        if end < 0:
            raise ProtocolViolation(
                "invalid startup packet layout: expected terminator as last byte"
            )
        if end == pos:
            if end + 1 != n:
                raise ProtocolViolation(
                    "invalid startup packet layout: expected terminator as last byte"
                )
            return params
        vend = payload.find(b"\0", end + 1)
        if vend < 0:
            raise ProtocolViolation("invalid startup packet layout: parameter without a value")
        name = decode_utf8(payload[pos:end], "startup packet")
        params[name] = decode_utf8(payload[end + 1 : vend], "startup packet")
        pos = vend + 1


def encode_startup(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage packet, length word included."""
    parts = []
    for name, value in params.items():
        if not name:
            raise ValueError("startup parameter names must not be empty")
        parts.append(cstr_bytes(name, "startup parameter name"))
        parts.append(cstr_bytes(value, "startup parameter value"))
    parts.append(b"\0")
    body = b"".join(parts)
    return _STARTUP_CODE.pack(len(body) + 8, protocol) + body


def encode_ssl_request() -> bytes:
    return _STARTUP_CODE.pack(8, SSL_REQUEST_CODE)


def encode_gssenc_request() -> bytes:
    return _STARTUP_CODE.pack(8, GSSENC_REQUEST_CODE)


def encode_cancel_request(pid: int, secret: int) -> bytes:
    return _CANCEL.pack(16, CANCEL_REQUEST_CODE, pid, secret)


# --------------------------------------------------------------------------- typed


def _msg(mtype: int, body: bytes) -> bytes:
    return _HEADER.pack(mtype, len(body) + 4) + body


def _count(n: int, what: str) -> bytes:
    if n > 0xFFFF:
        raise ValueError(f"too many {what}: {n} (limit 65535)")
    return _U16.pack(n)


def _int16_array(values: Sequence[int], what: str) -> bytes:
    return _count(len(values), what) + struct.pack(f"!{len(values)}h", *values)


def _nullable(value: bytes | bytearray | memoryview | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"
    return _I32.pack(len(value)) + bytes(value)


@dataclass(slots=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return encode_query(self.sql)


@dataclass(slots=True)
class Parse:
    name: str
    query: str
    param_oids: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_parse(self.name, self.query, self.param_oids)


@dataclass(slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: list[int] = field(default_factory=list)
    params: list[bytes | None] = field(default_factory=list)
    result_formats: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_bind(
            self.portal, self.statement, self.params, self.param_formats, self.result_formats
        )


@dataclass(slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str

    def encode(self) -> bytes:
        return encode_describe(self.kind, self.name)


@dataclass(slots=True)
class Execute:
    portal: str = ""
    max_rows: int = 0  # 0 = all rows

    def encode(self) -> bytes:
        return encode_execute(self.portal, self.max_rows)


@dataclass(slots=True)
class Close:
    kind: str  # 'S' statement or 'P' portal
    name: str

    def encode(self) -> bytes:
        return encode_close(self.kind, self.name)


@dataclass(slots=True)
class Sync:
    def encode(self) -> bytes:
        return SYNC


@dataclass(slots=True)
class Flush:
    def encode(self) -> bytes:
        return FLUSH


@dataclass(slots=True)
class Terminate:
    def encode(self) -> bytes:
        return TERMINATE


@dataclass(slots=True)
class CopyData:
    """Either direction; the payload is opaque."""

    data: bytes

    def encode(self) -> bytes:
        return encode_copy_data(self.data)


@dataclass(slots=True)
class CopyDone:
    """Either direction."""

    def encode(self) -> bytes:
        return COPY_DONE


@dataclass(slots=True)
class CopyFail:
    message: str

    def encode(self) -> bytes:
        return encode_copy_fail(self.message)


@dataclass(slots=True)
class FunctionCall:
    oid: int
    arg_formats: list[int] = field(default_factory=list)
    args: list[bytes | None] = field(default_factory=list)
    result_format: int = 0

    def encode(self) -> bytes:
        return encode_function_call(self.oid, self.args, self.arg_formats, self.result_format)


@dataclass(slots=True)
class PasswordMessage:
    """Raw 'p' body: its meaning (password, SASL initial/response, GSS) depends on
    which authentication request the server sent, so decoding is left to the
    ``decode_password``/``decode_sasl_*`` helpers."""

    data: bytes

    def encode(self) -> bytes:
        return _msg(0x70, self.data)


FrontendMessage = (
    Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
    | Sync
    | Flush
    | Terminate
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
    | PasswordMessage
)


def _empty(payload: bytes, what: str) -> None:
    if payload:
        raise ProtocolViolation(f"invalid {what} message format: trailing data")


def _decode_query(payload: bytes) -> Query:
    return Query(query_text(payload))


def _decode_parse(payload: bytes) -> Parse:
    r = Reader(payload, "Parse")
    name = r.cstr()
    query = r.cstr()
    n = r.uint16()
    oids = r.uint32_array(n)
    r.finish()
    return Parse(name, query, oids)


def _decode_bind(payload: bytes) -> Bind:
    r = Reader(payload, "Bind")
    portal = r.cstr()
    statement = r.cstr()
    formats = r.int16_array(r.uint16())
    nparams = r.uint16()
    if len(formats) > 1 and len(formats) != nparams:
        raise ProtocolViolation(
            f"bind message has {len(formats)} parameter formats but {nparams} parameters"
        )
    params = [r.nullable() for _ in range(nparams)]
    result_formats = r.int16_array(r.uint16())
    r.finish()
    return Bind(portal, statement, formats, params, result_formats)


def _kind_and_name(payload: bytes, what: str) -> tuple[str, str]:
    r = Reader(payload, what)
    kind = r.byte()
    if kind != 0x53 and kind != 0x50:
        raise ProtocolViolation(f"invalid {what.upper()} message subtype {kind}")
    name = r.cstr()
    r.finish()
    return chr(kind), name


def _decode_describe(payload: bytes) -> Describe:
    return Describe(*_kind_and_name(payload, "Describe"))


def _decode_close(payload: bytes) -> Close:
    return Close(*_kind_and_name(payload, "Close"))


def _decode_execute(payload: bytes) -> Execute:
    r = Reader(payload, "Execute")
    portal = r.cstr()
    max_rows = r.int32()
    r.finish()
    return Execute(portal, max_rows)


def _decode_sync(payload: bytes) -> Sync:
    _empty(payload, "Sync")
    return Sync()


def _decode_flush(payload: bytes) -> Flush:
    _empty(payload, "Flush")
    return Flush()


def _decode_terminate(payload: bytes) -> Terminate:
    _empty(payload, "Terminate")
    return Terminate()


def _decode_copy_data(payload: bytes) -> CopyData:
    return CopyData(bytes(payload))


def _decode_copy_done(payload: bytes) -> CopyDone:
    _empty(payload, "CopyDone")
    return CopyDone()


def _decode_copy_fail(payload: bytes) -> CopyFail:
    r = Reader(payload, "CopyFail")
    message = r.cstr()
    r.finish()
    return CopyFail(message)


def _decode_function_call(payload: bytes) -> FunctionCall:
    r = Reader(payload, "FunctionCall")
    oid = r.uint32()
    formats = r.int16_array(r.uint16())
    nargs = r.uint16()
    if len(formats) > 1 and len(formats) != nargs:
        raise ProtocolViolation(
            f"function call message contains {len(formats)} argument formats "
            f"but {nargs} arguments"
        )
    args = [r.nullable() for _ in range(nargs)]
    result_format = r.int16()
    r.finish()
    return FunctionCall(oid, formats, args, result_format)


def _decode_password_message(payload: bytes) -> PasswordMessage:
    return PasswordMessage(bytes(payload))


_DECODERS = {
    0x51: _decode_query,  # Q
    0x50: _decode_parse,  # P
    0x42: _decode_bind,  # B
    0x44: _decode_describe,  # D
    0x45: _decode_execute,  # E
    0x43: _decode_close,  # C
    0x53: _decode_sync,  # S
    0x48: _decode_flush,  # H
    0x58: _decode_terminate,  # X
    0x64: _decode_copy_data,  # d
    0x63: _decode_copy_done,  # c
    0x66: _decode_copy_fail,  # f
    0x46: _decode_function_call,  # F
    0x70: _decode_password_message,  # p
}


def decode_frontend(mtype: int, payload: bytes) -> FrontendMessage:
    """Decode one typed client message (payload without the 5-byte header)."""
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        shown = repr(chr(mtype)) if 0x20 < mtype < 0x7F else f"0x{mtype:02x}"
        raise ProtocolViolation(f"invalid frontend message type {shown}")
    return decoder(payload)


# ------------------------------------------------------------- 'p' body helpers


def decode_password(payload: bytes) -> str:
    """Cleartext or md5 password response: one C string filling the message."""
    end = payload.find(b"\0")
    if end < 0 or end + 1 != len(payload):
        raise ProtocolViolation("invalid password packet size")
    return decode_utf8(payload[:end], "password packet")


def decode_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: (mechanism, initial client response; -1 length = empty)."""
    r = Reader(payload, "SASLInitialResponse")
    mechanism = r.cstr()
    data = r.nullable()
    r.finish()
    return mechanism, b"" if data is None else data


def decode_sasl_response(payload: bytes) -> bytes:
    """SASLResponse: the whole body is mechanism data."""
    return bytes(payload)


# ------------------------------------------------------------- hot-path helpers


def query_text(payload: bytes) -> str:
    """SQL of a Query payload: exactly one C string."""
    end = payload.find(b"\0")
    if end < 0:
        raise ProtocolViolation("invalid string in Query message: missing terminator")
    if end + 1 != len(payload):
        raise ProtocolViolation("invalid Query message format: trailing data")
    return decode_utf8(payload[:end], "Query message")


def _two_cstrs(payload: bytes, what: str) -> tuple[str, str]:
    first = payload.find(b"\0")
    second = payload.find(b"\0", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolViolation(f"invalid string in {what} message: missing terminator")
    return (
        decode_utf8(payload[:first], f"{what} message"),
        decode_utf8(payload[first + 1 : second], f"{what} message"),
    )


def parse_name_and_query(payload: bytes) -> tuple[str, str]:
    """(statement name, SQL) of a Parse payload without decoding the OID list."""
    return _two_cstrs(payload, "Parse")


def bind_statement_name(payload: bytes) -> tuple[str, str]:
    """(portal, statement) of a Bind payload without decoding the parameters."""
    return _two_cstrs(payload, "Bind")


# --------------------------------------------------------------------- encoders


def encode_query(sql: str) -> bytes:
    return _msg(0x51, cstr_bytes(sql, "query"))


def encode_parse(name: str, query: str, param_oids: Sequence[int] = ()) -> bytes:
    n = len(param_oids)
    body = (
        cstr_bytes(name, "statement name")
        + cstr_bytes(query, "query")
        + _count(n, "parameter types")
        + struct.pack(f"!{n}I", *param_oids)
    )
    return _msg(0x50, body)


def encode_bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | bytearray | memoryview | None],
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    parts = [
        cstr_bytes(portal, "portal name"),
        cstr_bytes(statement, "statement name"),
        _int16_array(param_formats, "parameter formats"),
        _count(len(params), "parameters"),
    ]
    parts.extend(_nullable(p) for p in params)
    parts.append(_int16_array(result_formats, "result formats"))
    return _msg(0x42, b"".join(parts))


def _kind_byte(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"kind must be 'S' or 'P', got {kind!r}")
    return kind.encode("ascii")


def encode_describe(kind: str, name: str) -> bytes:
    return _msg(0x44, _kind_byte(kind) + cstr_bytes(name, "name"))


def encode_execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(0x45, cstr_bytes(portal, "portal name") + _I32.pack(max_rows))


def encode_close(kind: str, name: str) -> bytes:
    return _msg(0x43, _kind_byte(kind) + cstr_bytes(name, "name"))


def encode_copy_data(data: bytes | bytearray | memoryview) -> bytes:
    return _HEADER.pack(0x64, len(data) + 4) + bytes(data)


def encode_copy_fail(msg: str) -> bytes:
    return _msg(0x66, cstr_bytes(msg, "message"))


def encode_function_call(
    oid: int,
    args: Sequence[bytes | bytearray | memoryview | None],
    arg_formats: Sequence[int] = (),
    result_format: int = 0,
) -> bytes:
    parts = [
        U32.pack(oid),
        _int16_array(arg_formats, "argument formats"),
        _count(len(args), "arguments"),
    ]
    parts.extend(_nullable(a) for a in args)
    parts.append(struct.pack("!h", result_format))
    return _msg(0x46, b"".join(parts))


def encode_password(password: str) -> bytes:
    return _msg(0x70, cstr_bytes(password, "password"))


def encode_sasl_initial(mechanism: str, data: bytes | bytearray | memoryview) -> bytes:
    return _msg(0x70, cstr_bytes(mechanism, "mechanism") + _nullable(data))


def encode_sasl_response(data: bytes | bytearray | memoryview) -> bytes:
    return _msg(0x70, bytes(data))


SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"

