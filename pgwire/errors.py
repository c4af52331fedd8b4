"""The codec's single exception type, and builders for ErrorResponse/NoticeResponse.

Decoders and framers raise only :class:`ProtocolViolation`, so a gateway needs one
``except`` clause to turn any malformed input into an error reply plus disconnect.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from pgwire import sqlstate as _sqlstate

__all__ = [
    "ProtocolViolation",
    "error_fields",
    "error_response",
    "notice_response",
    "encode_fields",
]

_HEADER = struct.Struct("!BI")


class ProtocolViolation(Exception):
    """Malformed or out-of-limits protocol input.

    ``sqlstate`` is what a server would report to the peer (08P01 unless the
    problem is better described otherwise, e.g. 0A000 for an unsupported version).
    """

    def __init__(self, message: str, sqlstate: str = _sqlstate.PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    def __repr__(self) -> str:
        return f"ProtocolViolation({self.message!r}, sqlstate={self.sqlstate!r})"


def error_fields(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
) -> dict[str, str]:
    """Field dict for an error/notice; V (non-localized severity) mirrors S."""
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    return fields


def _field_value(value: str) -> bytes:
    # Field values are C strings: an embedded NUL would truncate the field and
    # desynchronise the peer. Error text often quotes client input, so sanitise
    # rather than fail while reporting a failure.
    if "\0" in value:
        value = value.replace("\0", "\ufffd")
    return value.encode("utf-8", "replace")


def encode_fields(mtype: int, fields: Mapping[str, str]) -> bytes:
    """Encode an 'E'/'N'-style message: (code byte, C string)* then a NUL."""
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or code == "\0" or ord(code) > 0x7F:
            raise ValueError(f"error field code must be one ASCII character, got {code!r}")
        parts.append(code.encode("ascii"))
        parts.append(_field_value(value))
        parts.append(b"\0")
    parts.append(b"\0")
    body = b"".join(parts)
    return _HEADER.pack(mtype, len(body) + 4) + body


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An encoded ErrorResponse ('E'), ready to write to a client."""
    return encode_fields(0x45, error_fields(severity, sqlstate, message, detail, hint))


def notice_response(
    severity: str = "NOTICE",
    sqlstate: str = _sqlstate.SUCCESSFUL_COMPLETION,
    message: str = "",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An encoded NoticeResponse ('N'); same argument order as :func:`error_response`."""
    return encode_fields(0x4E, error_fields(severity, sqlstate, message, detail, hint))
