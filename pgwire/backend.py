"""Messages a server sends: decode (pooler reading Postgres) and encode (gateway
answering clients itself: auth, errors, admin-console result sets).

Decoders take the payload a framer returned and raise only ProtocolViolation.
CopyData/CopyDone are the same classes as in :mod:`pgwire.frontend` (they look
the same in both directions).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pgwire._reader import I32, U16, Reader, cstr_bytes
from pgwire.errors import ProtocolViolation, encode_fields

# CopyData/CopyDone look the same in both directions: the classes and encoders
# are shared with pgwire.frontend and re-exported so backend users need one module.
from pgwire.frontend import COPY_DONE, CopyData, CopyDone, encode_copy_data

__all__ = [
    "AUTH_OK",
    "AUTH_KERBEROS_V5",
    "AUTH_CLEARTEXT",
    "AUTH_MD5",
    "AUTH_GSS",
    "AUTH_GSS_CONTINUE",
    "AUTH_SSPI",
    "AUTH_SASL",
    "AUTH_SASL_CONTINUE",
    "AUTH_SASL_FINAL",
    "Authentication",
    "ParameterStatus",
    "BackendKeyData",
    "ReadyForQuery",
    "Field",
    "RowDescription",
    "DataRow",
    "CommandComplete",
    "EmptyQueryResponse",
    "ErrorResponse",
    "NoticeResponse",
    "NotificationResponse",
    "ParseComplete",
    "BindComplete",
    "CloseComplete",
    "NoData",
    "PortalSuspended",
    "ParameterDescription",
    "CopyInResponse",
    "CopyOutResponse",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "NegotiateProtocolVersion",
    "FunctionCallResponse",
    "BackendMessage",
    "decode_backend",
    "ready_status",
    "encode_authentication",
    "encode_auth_ok",
    "encode_auth_cleartext",
    "encode_auth_md5",
    "encode_auth_sasl",
    "encode_auth_sasl_continue",
    "encode_auth_sasl_final",
    "encode_parameter_status",
    "encode_backend_key_data",
    "encode_ready_for_query",
    "encode_row_description",
    "encode_data_row",
    "encode_command_complete",
    "encode_error",
    "encode_notice",
    "encode_notification",
    "encode_notification_bytes",
    "encode_negotiate_protocol_version",
    "encode_copy_in_response",
    "encode_copy_out_response",
    "encode_copy_both_response",
    "encode_copy_data",
    "encode_parameter_description",
    "encode_function_call_response",
    "PARSE_COMPLETE",
    "BIND_COMPLETE",
    "CLOSE_COMPLETE",
    "NO_DATA",
    "EMPTY_QUERY_RESPONSE",
    "PORTAL_SUSPENDED",
    "COPY_DONE",
    "READY_IDLE",
    "READY_IN_TRANSACTION",
    "READY_FAILED",
]

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_HEADER = struct.Struct("!BI")
_FIELD = struct.Struct("!IhIhih")  # table_oid, column, type_oid, type_size, type_mod, format
_KEY = struct.Struct("!iI")  # pid, secret (same signedness as CancelRequest)
_I32I32 = struct.Struct("!ii")
_unpack_i32 = I32.unpack_from


def _msg(mtype: int, body: bytes) -> bytes:
    return _HEADER.pack(mtype, len(body) + 4) + body


def _empty(payload: bytes, what: str) -> None:
    if payload:
        raise ProtocolViolation(f"invalid {what} message format: trailing data")


# ------------------------------------------------------------------ message types


@dataclass(slots=True)
class Authentication:
    """'R': ``code`` says which request; ``data`` is the rest (md5 salt, SASL payload)."""

    code: int
    data: bytes = b""

    @property
    def mechanisms(self) -> list[str]:
        """SASL mechanism names (code 10); empty for other codes."""
        if self.code != AUTH_SASL:
            return []
        return _sasl_mechanisms(self.data)

    def encode(self) -> bytes:
        return encode_authentication(self.code, self.data)


@dataclass(slots=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return encode_parameter_status(self.name, self.value)


@dataclass(slots=True)
class BackendKeyData:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return encode_backend_key_data(self.pid, self.secret)


@dataclass(slots=True)
class ReadyForQuery:
    status: str  # 'I' idle, 'T' in transaction, 'E' failed transaction

    def encode(self) -> bytes:
        return encode_ready_for_query(self.status)


@dataclass(slots=True)
class Field:
    """One RowDescription column; defaults describe a plain text column."""

    name: str
    table_oid: int = 0
    column: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_mod: int = -1
    format: int = 0


@dataclass(slots=True)
class RowDescription:
    fields: list[Field] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_row_description(self.fields)


@dataclass(slots=True)
class DataRow:
    values: list[bytes | None] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_data_row(self.values)


@dataclass(slots=True)
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return encode_command_complete(self.tag)


@dataclass(slots=True)
class EmptyQueryResponse:
    def encode(self) -> bytes:
        return EMPTY_QUERY_RESPONSE


class _Fields:
    """Accessors shared by ErrorResponse and NoticeResponse."""

    __slots__ = ()
    fields: dict[str, str]

    @property
    def severity(self) -> str:
        """Non-localized severity (V) when sent, else the localized one (S)."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


@dataclass(slots=True)
class ErrorResponse(_Fields):
    fields: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode_error(self.fields)


@dataclass(slots=True)
class NoticeResponse(_Fields):
    fields: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode_notice(self.fields)


@dataclass(slots=True)
class NotificationResponse:
    pid: int
    channel: str
    payload: str = ""

    def encode(self) -> bytes:
        return encode_notification(self.pid, self.channel, self.payload)


@dataclass(slots=True)
class ParseComplete:
    def encode(self) -> bytes:
        return PARSE_COMPLETE


@dataclass(slots=True)
class BindComplete:
    def encode(self) -> bytes:
        return BIND_COMPLETE


@dataclass(slots=True)
class CloseComplete:
    def encode(self) -> bytes:
        return CLOSE_COMPLETE


@dataclass(slots=True)
class NoData:
    def encode(self) -> bytes:
        return NO_DATA


@dataclass(slots=True)
class PortalSuspended:
    def encode(self) -> bytes:
        return PORTAL_SUSPENDED


@dataclass(slots=True)
class ParameterDescription:
    oids: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_parameter_description(self.oids)


@dataclass(slots=True)
class CopyInResponse:
    format: int = 0  # 0 text, 1 binary
    column_formats: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_copy_in_response(self.format, self.column_formats)


@dataclass(slots=True)
class CopyOutResponse:
    format: int = 0
    column_formats: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_copy_out_response(self.format, self.column_formats)


@dataclass(slots=True)
class CopyBothResponse:
    format: int = 0
    column_formats: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_copy_both_response(self.format, self.column_formats)


@dataclass(slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_negotiate_protocol_version(self.newest_minor, self.unrecognized)


@dataclass(slots=True)
class FunctionCallResponse:
    value: bytes | None

    def encode(self) -> bytes:
        return encode_function_call_response(self.value)


BackendMessage = (
    Authentication
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | NotificationResponse
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | PortalSuspended
    | ParameterDescription
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | NegotiateProtocolVersion
    | FunctionCallResponse
)


# ----------------------------------------------------------------------- decoders


def _sasl_mechanisms(data: bytes) -> list[str]:
    r = Reader(data, "AuthenticationSASL")
    names = []
    while True:
        name = r.cstr()
        if not name:
            break
        names.append(name)
    r.finish()
    return names


_AUTH_EMPTY = frozenset((AUTH_OK, AUTH_KERBEROS_V5, AUTH_CLEARTEXT, AUTH_GSS, AUTH_SSPI))


def _decode_authentication(payload: bytes) -> Authentication:
    if len(payload) < 4:
        raise ProtocolViolation("insufficient data left in Authentication message")
    (code,) = _unpack_i32(payload, 0)
    data = payload[4:]
    if code in _AUTH_EMPTY:
        _empty(data, "Authentication")
    elif code == AUTH_MD5:
        if len(data) != 4:
            raise ProtocolViolation("invalid AuthenticationMD5Password message: salt not 4 bytes")
    elif code == AUTH_SASL:
        _sasl_mechanisms(data)  # validate now so callers can trust .mechanisms
    return Authentication(code, data)


def _decode_parameter_status(payload: bytes) -> ParameterStatus:
    r = Reader(payload, "ParameterStatus")
    name = r.cstr()
    value = r.cstr()
    r.finish()
    return ParameterStatus(name, value)


def _decode_backend_key_data(payload: bytes) -> BackendKeyData:
    if len(payload) != 8:
        raise ProtocolViolation("invalid BackendKeyData message: expected 8 bytes")
    return BackendKeyData(*_KEY.unpack(payload))


def _decode_ready_for_query(payload: bytes) -> ReadyForQuery:
    if len(payload) != 1 or payload[0] not in b"ITE":
        raise ProtocolViolation("invalid ReadyForQuery message")
    return ReadyForQuery(chr(payload[0]))


def _decode_row_description(payload: bytes) -> RowDescription:
    r = Reader(payload, "RowDescription")
    n = r.uint16()
    fields = []
    unpack = _FIELD.unpack_from
    for _ in range(n):
        name = r.cstr()
        fields.append(Field(name, *unpack(payload, r.advance(18))))
    r.finish()
    return RowDescription(fields)


def _decode_data_row(payload: bytes) -> DataRow:
    # Hand-rolled loop: rows are the bulk of what a pooler-side query reads.
    size = len(payload)
    if size < 2:
        raise ProtocolViolation("insufficient data left in DataRow message")
    (n,) = U16.unpack_from(payload, 0)
    values: list[bytes | None] = []
    append = values.append
    pos = 2
    for _ in range(n):
        if pos + 4 > size:
            raise ProtocolViolation("insufficient data left in DataRow message")
        (length,) = _unpack_i32(payload, pos)
        pos += 4
        if length < 0:
            if length != -1:
                raise ProtocolViolation(f"invalid value length {length} in DataRow message")
            append(None)
            continue
        end = pos + length
        if end > size:
            raise ProtocolViolation("insufficient data left in DataRow message")
        append(payload[pos:end])
        pos = end
    if pos != size:
        raise ProtocolViolation("invalid DataRow message format: trailing data")
    return DataRow(values)


def _decode_command_complete(payload: bytes) -> CommandComplete:
    r = Reader(payload, "CommandComplete")
    tag = r.cstr()
    r.finish()
    return CommandComplete(tag)


def _decode_fields(payload: bytes, what: str) -> dict[str, str]:
    r = Reader(payload, what)
    fields: dict[str, str] = {}
    while True:
        code = r.byte()
        if code == 0:
            break
        fields[chr(code)] = r.cstr()
    r.finish()
    return fields


def _decode_error(payload: bytes) -> ErrorResponse:
    return ErrorResponse(_decode_fields(payload, "ErrorResponse"))


def _decode_notice(payload: bytes) -> NoticeResponse:
    return NoticeResponse(_decode_fields(payload, "NoticeResponse"))


def _decode_notification(payload: bytes) -> NotificationResponse:
    r = Reader(payload, "NotificationResponse")
    pid = r.int32()
    channel = r.cstr()
    extra = r.cstr()
    r.finish()
    return NotificationResponse(pid, channel, extra)


def _decode_parameter_description(payload: bytes) -> ParameterDescription:
    r = Reader(payload, "ParameterDescription")
    oids = r.uint32_array(r.uint16())
    r.finish()
    return ParameterDescription(oids)


def _copy_response(payload: bytes, what: str) -> tuple[int, list[int]]:
    r = Reader(payload, what)
    fmt = r.byte()
    formats = r.int16_array(r.uint16())
    r.finish()
    return fmt, formats


def _decode_copy_in(payload: bytes) -> CopyInResponse:
    return CopyInResponse(*_copy_response(payload, "CopyInResponse"))


def _decode_copy_out(payload: bytes) -> CopyOutResponse:
    return CopyOutResponse(*_copy_response(payload, "CopyOutResponse"))


def _decode_copy_both(payload: bytes) -> CopyBothResponse:
    return CopyBothResponse(*_copy_response(payload, "CopyBothResponse"))


def _decode_copy_data(payload: bytes) -> CopyData:
    return CopyData(bytes(payload))


def _decode_negotiate(payload: bytes) -> NegotiateProtocolVersion:
    r = Reader(payload, "NegotiateProtocolVersion")
    newest_minor = r.int32()
    n = r.int32()
    if n < 0:
        raise ProtocolViolation(f"invalid option count {n} in NegotiateProtocolVersion message")
    # Each name needs at least its NUL, which bounds n before we loop on it.
    if n > r.remaining():
        raise ProtocolViolation("insufficient data left in NegotiateProtocolVersion message")
    names = [r.cstr() for _ in range(n)]
    r.finish()
    return NegotiateProtocolVersion(newest_minor, names)


def _decode_function_call_response(payload: bytes) -> FunctionCallResponse:
    r = Reader(payload, "FunctionCallResponse")
    value = r.nullable()
    r.finish()
    return FunctionCallResponse(value)


_E = TypeVar("_E")


def _empty_decoder(cls: type[_E], what: str) -> Callable[[bytes], _E]:
    def decode(payload: bytes) -> _E:
        _empty(payload, what)
        return cls()

    return decode


_DECODERS: dict[int, Callable[[bytes], BackendMessage]] = {
    0x52: _decode_authentication,  # R
    0x53: _decode_parameter_status,  # S
    0x4B: _decode_backend_key_data,  # K
    0x5A: _decode_ready_for_query,  # Z
    0x54: _decode_row_description,  # T
    0x44: _decode_data_row,  # D
    0x43: _decode_command_complete,  # C
    0x49: _empty_decoder(EmptyQueryResponse, "EmptyQueryResponse"),  # I
    0x45: _decode_error,  # E
    0x4E: _decode_notice,  # N
    0x41: _decode_notification,  # A
    0x31: _empty_decoder(ParseComplete, "ParseComplete"),  # 1
    0x32: _empty_decoder(BindComplete, "BindComplete"),  # 2
    0x33: _empty_decoder(CloseComplete, "CloseComplete"),  # 3
    0x6E: _empty_decoder(NoData, "NoData"),  # n
    0x73: _empty_decoder(PortalSuspended, "PortalSuspended"),  # s
    0x74: _decode_parameter_description,  # t
    0x47: _decode_copy_in,  # G
    0x48: _decode_copy_out,  # H
    0x57: _decode_copy_both,  # W
    0x64: _decode_copy_data,  # d
    0x63: _empty_decoder(CopyDone, "CopyDone"),  # c
    0x76: _decode_negotiate,  # v
    0x56: _decode_function_call_response,  # V
}


def decode_backend(mtype: int, payload: bytes) -> BackendMessage:
    """Decode one server message (payload without the 5-byte header)."""
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        shown = repr(chr(mtype)) if 0x20 < mtype < 0x7F else f"0x{mtype:02x}"
        raise ProtocolViolation(f"invalid backend message type {shown}")
    return decoder(payload)


def ready_status(raw: bytes) -> str:
    """Transaction status of a raw ReadyForQuery message, without decoding objects.

    Forwarding code sees every 'Z' go by and needs only this byte to know whether
    the server connection can be released.
    """
    if len(raw) != 6 or raw[:5] != b"Z\x00\x00\x00\x05" or raw[5] not in b"ITE":
        raise ProtocolViolation("invalid ReadyForQuery message")
    return chr(raw[5])


# ----------------------------------------------------------------------- encoders


def _int16_array(values: Sequence[int], what: str) -> bytes:
    if len(values) > 0xFFFF:
        raise ValueError(f"too many {what}: {len(values)} (limit 65535)")
    return U16.pack(len(values)) + struct.pack(f"!{len(values)}h", *values)


def encode_authentication(code: int, data: bytes = b"") -> bytes:
    return _msg(0x52, I32.pack(code) + bytes(data))


def encode_auth_ok() -> bytes:
    return AUTH_OK_MESSAGE


def encode_auth_cleartext() -> bytes:
    return encode_authentication(AUTH_CLEARTEXT)


def encode_auth_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    return encode_authentication(AUTH_MD5, salt)


def encode_auth_sasl(mechanisms: Sequence[str]) -> bytes:
    body = b"".join(cstr_bytes(m, "mechanism") for m in mechanisms if m) + b"\0"
    return encode_authentication(AUTH_SASL, body)


def encode_auth_sasl_continue(data: bytes) -> bytes:
    return encode_authentication(AUTH_SASL_CONTINUE, data)


def encode_auth_sasl_final(data: bytes) -> bytes:
    return encode_authentication(AUTH_SASL_FINAL, data)


def encode_parameter_status(name: str, value: str) -> bytes:
    return _msg(0x53, cstr_bytes(name, "parameter name") + cstr_bytes(value, "parameter value"))


def encode_backend_key_data(pid: int, secret: int) -> bytes:
    return _msg(0x4B, _KEY.pack(pid, secret))


def encode_ready_for_query(status: str) -> bytes:
    if status not in ("I", "T", "E"):
        raise ValueError(f"transaction status must be 'I', 'T' or 'E', got {status!r}")
    return b"Z\x00\x00\x00\x05" + status.encode("ascii")


def encode_row_description(fields: Sequence[Field]) -> bytes:
    if len(fields) > 0xFFFF:
        raise ValueError("too many columns")
    parts = [U16.pack(len(fields))]
    for f in fields:
        parts.append(cstr_bytes(f.name, "column name"))
        parts.append(
            _FIELD.pack(f.table_oid, f.column, f.type_oid, f.type_size, f.type_mod, f.format)
        )
    return _msg(0x54, b"".join(parts))


def encode_data_row(values: Sequence[bytes | bytearray | memoryview | str | None]) -> bytes:
    """One row; ``str`` values are sent as UTF-8 text for convenience."""
    if len(values) > 0xFFFF:
        raise ValueError("too many columns")
    parts = [U16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            if isinstance(v, str):
                v = v.encode("utf-8")
            parts.append(I32.pack(len(v)))
            parts.append(bytes(v))
    return _msg(0x44, b"".join(parts))


def encode_command_complete(tag: str) -> bytes:
    return _msg(0x43, cstr_bytes(tag, "command tag"))


def encode_error(fields: Mapping[str, str]) -> bytes:
    return encode_fields(0x45, fields)


def encode_notice(fields: Mapping[str, str]) -> bytes:
    return encode_fields(0x4E, fields)


def encode_notification(pid: int, channel: str, payload: str = "") -> bytes:
    return _msg(0x41, I32.pack(pid) + cstr_bytes(channel, "channel") + cstr_bytes(payload))


def encode_notification_bytes(pid: int, channel: bytes, payload: bytes) -> bytes:
    """A NotificationResponse from the bytes Postgres sent (any server encoding)."""
    if b"\0" in channel or b"\0" in payload:
        raise ValueError("channel and payload must not contain NUL")
    return _msg(0x41, I32.pack(pid) + channel + b"\0" + payload + b"\0")


def encode_negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    body = _I32I32.pack(newest_minor, len(unrecognized)) + b"".join(
        cstr_bytes(name, "option name") for name in unrecognized
    )
    return _msg(0x76, body)


def encode_copy_in_response(format: int, column_formats: Sequence[int]) -> bytes:
    return _msg(0x47, bytes((format,)) + _int16_array(column_formats, "column formats"))


def encode_copy_out_response(format: int, column_formats: Sequence[int]) -> bytes:
    return _msg(0x48, bytes((format,)) + _int16_array(column_formats, "column formats"))


def encode_copy_both_response(format: int, column_formats: Sequence[int]) -> bytes:
    return _msg(0x57, bytes((format,)) + _int16_array(column_formats, "column formats"))


def encode_parameter_description(oids: Sequence[int]) -> bytes:
    if len(oids) > 0xFFFF:
        raise ValueError("too many parameters")
    return _msg(0x74, U16.pack(len(oids)) + struct.pack(f"!{len(oids)}I", *oids))


def encode_function_call_response(value: bytes | None) -> bytes:
    if value is None:
        return _msg(0x56, b"\xff\xff\xff\xff")
    return _msg(0x56, I32.pack(len(value)) + bytes(value))


AUTH_OK_MESSAGE = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION = b"Z\x00\x00\x00\x05T"
READY_FAILED = b"Z\x00\x00\x00\x05E"
