"""Message type bytes, session phases and byte helpers shared by the session modules."""

from __future__ import annotations

import struct

from pgwire.errors import ProtocolViolation
from pgwire.quoting import quote_literal

STARTUP, AUTH, READY, CLOSED = range(4)  # a session's phases

Q, P, B, D, E, C, S, H, X, F = (ord(c) for c in "QPBDECSHXF")
COPY_MSGS = frozenset(b"dcf")
EXTENDED = frozenset(b"PBDECH")
RFQ_IDLE = b"Z\x00\x00\x00\x05I"
# A session's pending entry holding a whole plain unit: (WHOLE, reply kinds, its bytes).
WHOLE = -1
_HDR = struct.Struct("!BI")


def msg(mtype: int, payload: bytes) -> bytes:
    """A whole message: type byte, length, payload."""
    return _HDR.pack(mtype, len(payload) + 4) + payload


def cstr_end(payload: bytes, start: int) -> int:
    """Where the C string starting at ``start`` ends; a missing NUL is a protocol error."""
    end = payload.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation("invalid string in message")
    return end


def raise_sql(code: str, message: str) -> str:
    """A statement that fails with exactly this SQLSTATE and message on the backend."""
    text = quote_literal(message).replace("$", "\\x24")  # cannot end the dollar quote
    return (f"DO $pgfleet$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', "
            f"MESSAGE = {text}; END$pgfleet$")
