"""Framers: split a byte stream into protocol messages without decoding them.

This is the gateway's hot path: most messages are forwarded as raw bytes, so the
framers only read the 5-byte header, enforce Postgres's size limits (so a bogus
length cannot make us buffer a gigabyte) and slice. Buffered data is read through
an offset and dropped in bulk, never per message, so a feed holding thousands of
small messages costs O(n), not O(n^2).
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pgwire.errors import ProtocolViolation

__all__ = [
    "MAX_STARTUP_PACKET",
    "SMALL_MESSAGE_LIMIT",
    "LARGE_MESSAGE_LIMIT",
    "FRONTEND_TYPES",
    "FRONTEND_LARGE_TYPES",
    "StartupFramer",
    "MessageFramer",
]

#: Postgres's MAX_STARTUP_PACKET_LENGTH (length word included).
MAX_STARTUP_PACKET = 10000
#: PQ_SMALL_MESSAGE_LIMIT: most frontend messages are tiny and capped here.
SMALL_MESSAGE_LIMIT = 10000
#: Ceiling for messages that legitimately carry user data (about 1 GiB).
LARGE_MESSAGE_LIMIT = 0x3FFFFFFF

#: Type bytes a client may send after startup.
FRONTEND_TYPES = frozenset(b"QPBDECSHXdcfFp")
#: Frontend types allowed up to LARGE_MESSAGE_LIMIT, as in postgres.c/auth.c.
FRONTEND_LARGE_TYPES = frozenset(b"QPBdFp")

_U32 = struct.Struct("!I")
_unpack_u32 = _U32.unpack_from

Data = bytes | bytearray | memoryview


@lru_cache(maxsize=64)
def _limit_table(frontend: bool, max_length: int | None) -> tuple[int, ...]:
    """Per-type-byte length limit; -1 marks a type byte that is not allowed.
    Shared by every framer with the same limits (one per connection otherwise)."""
    if not frontend:
        limit = LARGE_MESSAGE_LIMIT if max_length is None else max_length
        return (limit,) * 256
    table = [-1] * 256
    for t in FRONTEND_TYPES:
        if max_length is not None:
            table[t] = max_length
        elif t in FRONTEND_LARGE_TYPES:
            table[t] = LARGE_MESSAGE_LIMIT
        else:
            table[t] = SMALL_MESSAGE_LIMIT
    return tuple(table)


def _type_repr(mtype: int) -> str:
    return repr(chr(mtype)) if 0x20 < mtype < 0x7F else f"0x{mtype:02x}"


class StartupFramer:
    """Frames the untyped packets a connection opens with (startup, SSL/GSS, cancel).

    Reusable across an SSLRequest refusal followed by the real StartupMessage.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: Data) -> None:
        """Append received bytes."""
        self._buf += data

    def next_packet(self) -> bytes | None:
        """Payload of the next complete packet (after the length word), or None."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = _unpack_u32(buf, pos)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        end = pos + length
        if end > len(buf):
            return None
        payload = bytes(buf[pos + 4 : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return payload

    def remaining(self) -> bytes:
        """Take whatever follows the packets read so far (a pipelined first message)."""
        data = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return data

    def buffered(self) -> int:
        return len(self._buf) - self._pos


class MessageFramer:
    """Frames typed messages: 1 type byte, int32 length (counting itself), body.

    ``frontend=True`` frames what a client sends: unknown type bytes are rejected
    and sizes are capped per type like Postgres does. ``frontend=False`` frames a
    server's stream (any type byte, LARGE_MESSAGE_LIMIT). ``max_length`` (length
    word included) overrides both caps.

    Buffering: a chunk fed into an empty framer is kept as-is (no copy) and read
    through an offset, so each message costs one slice per returned value. Only
    when a message straddles feeds are bytes accumulated in a bytearray (amortised
    appends, so a 1 GiB CopyData arriving in 64 KiB reads stays linear); once that
    message is out, whatever follows it goes back to being an immutable chunk.
    """

    __slots__ = ("_buf", "_pos", "_limits", "frontend")

    def __init__(self, frontend: bool = True, max_length: int | None = None) -> None:
        if max_length is not None and max_length < 4:
            raise ValueError("max_length must be at least 4")
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._limits = _limit_table(frontend, max_length)
        self.frontend = frontend

    def feed(self, data: Data) -> None:
        """Append received bytes (any split: one byte or many messages)."""
        if not data:
            return
        buf = self._buf
        if type(buf) is bytearray:
            buf += data  # still completing a message that straddles feeds
        elif self._pos == len(buf):
            # Nothing pending: adopt the chunk. Copy mutable input, since callers
            # reuse recv_into() buffers.
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        else:
            with memoryview(buf) as view:
                acc = bytearray(view[self._pos :])
            acc += data
            self._buf = acc
            self._pos = 0

    def buffered(self) -> int:
        """Bytes held that have not been returned as messages yet."""
        return len(self._buf) - self._pos

    def next_message(self) -> tuple[int, bytes, bytes] | None:
        """``(mtype, payload, raw)`` for the next complete message, or None.

        Header problems are reported as soon as the header has arrived, without
        waiting for (or buffering) the declared body.
        """
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if size - pos < 5:
            if size > pos and self._limits[buf[pos]] < 0:
                raise ProtocolViolation(f"invalid frontend message type {_type_repr(buf[pos])}")
            return None
        mtype = buf[pos]
        (length,) = _unpack_u32(buf, pos + 1)
        if length < 4 or length > self._limits[mtype]:
            self._bad_header(mtype, length)
        end = pos + 1 + length
        if end > size:
            return None
        if type(buf) is bytes:
            raw = buf[pos:end]
            payload = buf[pos + 5 : end]
            if end == size:
                self._buf = b""  # drop the chunk reference as soon as it is spent
                self._pos = 0
            else:
                self._pos = end
            return mtype, payload, raw
        # Accumulated message (bytearray, pos is always 0 here).
        with memoryview(buf) as view:
            raw = bytes(view[:end])
            self._buf = bytes(view[end:]) if end < size else b""
        self._pos = 0
        return mtype, raw[5:], raw

    def _bad_header(self, mtype: int, length: int) -> None:
        limit = self._limits[mtype]
        if limit < 0:
            raise ProtocolViolation(f"invalid frontend message type {_type_repr(mtype)}")
        if length < 4:
            raise ProtocolViolation(
                f"invalid message length {length} for message type {_type_repr(mtype)}"
            )
        raise ProtocolViolation(
            f"message of type {_type_repr(mtype)} too long: {length} bytes (limit {limit})"
        )

    def __iter__(self) -> MessageFramer:
        return self

    def __next__(self) -> tuple[int, bytes, bytes]:
        """Drain complete messages: ``for mtype, payload, raw in framer: ...``."""
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg
