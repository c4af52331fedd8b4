"""Bounds-checked cursor over a message payload (internal).

Every read checks its length first, so a truncated or garbled payload surfaces as
ProtocolViolation instead of struct.error/IndexError/UnicodeDecodeError.
"""

from __future__ import annotations

import struct

from pgwire.errors import ProtocolViolation

I16 = struct.Struct("!h")
U16 = struct.Struct("!H")
I32 = struct.Struct("!i")
U32 = struct.Struct("!I")


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 decode, reporting failure as a protocol violation."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"invalid UTF-8 in {what}") from None


def cstr_bytes(value: str, what: str = "string") -> bytes:
    """Encode a str as a NUL-terminated C string; a NUL inside would split it."""
    data = value.encode("utf-8")
    if b"\0" in data:
        raise ValueError(f"{what} must not contain NUL: {value!r}")
    return data + b"\0"


class Reader:
    """Sequential reads from one payload; ``what`` names the message in errors."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _need(self, n: int) -> int:
        pos = self.pos
        if n < 0 or pos + n > len(self.data):
            raise ProtocolViolation(f"insufficient data left in {self.what} message")
        self.pos = pos + n
        return pos

    def advance(self, n: int) -> int:
        """Skip n bytes, returning where they start (for unpack_from on ``data``)."""
        return self._need(n)

    def byte(self) -> int:
        return self.data[self._need(1)]

    def int16(self) -> int:
        return I16.unpack_from(self.data, self._need(2))[0]

    def uint16(self) -> int:
        return U16.unpack_from(self.data, self._need(2))[0]

    def int32(self) -> int:
        return I32.unpack_from(self.data, self._need(4))[0]

    def uint32(self) -> int:
        return U32.unpack_from(self.data, self._need(4))[0]

    def int16_array(self, n: int) -> list[int]:
        return list(struct.unpack_from(f"!{n}h", self.data, self._need(2 * n)))

    def uint32_array(self, n: int) -> list[int]:
        return list(struct.unpack_from(f"!{n}I", self.data, self._need(4 * n)))

    def take(self, n: int) -> bytes:
        pos = self._need(n)
        return self.data[pos : pos + n]

    def nullable(self) -> bytes | None:
        """int32 length then that many bytes; -1 means NULL, other negatives are invalid."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolViolation(f"invalid value length {n} in {self.what} message")
        return self.take(n)

    def cstr(self) -> str:
        data = self.data
        pos = self.pos
        end = data.find(b"\0", pos)
        if end < 0:
            raise ProtocolViolation(f"invalid string in {self.what} message: missing terminator")
        self.pos = end + 1
        return decode_utf8(data[pos:end], f"{self.what} message")

    def rest(self) -> bytes:
        pos = self.pos
        self.pos = len(self.data)
        return self.data[pos:]

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def finish(self) -> None:
        """Postgres's pq_getmsgend: trailing bytes mean the peer and we disagree."""
        if self.pos != len(self.data):
            raise ProtocolViolation(f"invalid {self.what} message format: trailing data")
