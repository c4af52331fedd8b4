"""Framing for the worker <-> pooler IPC stream (sans-IO).

Wire format: every message is a 4-byte big-endian unsigned length ``N``
followed by ``N`` bytes of orjson encoding a JSON *object*.

A message that carries file descriptors has the integer key ``"nfds"`` = k.
The sender attaches those k descriptors as SCM_RIGHTS ancillary data to the
``sendmsg`` call that carries the first byte of the message.  On a Linux
``SOCK_STREAM`` Unix socket descriptors therefore arrive no later than the
bytes of their message, so the receiver keeps a FIFO of every descriptor it
has received and hands the first k of them to the message once the message is
complete.

Nothing in here does I/O; :mod:`ipc.channel` drives it.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterable

import orjson

__all__ = ["MAX_FDS", "MAX_MESSAGE", "Decoder", "IpcError", "encode"]

MAX_MESSAGE = 1 << 20
"""Largest permitted message body, in bytes (the length prefix excluded)."""

MAX_FDS = 64
"""Most descriptors one message may carry (the receiver sizes its ancillary buffer for this)."""

_HEADER = struct.Struct(">I")
_HEADER_SIZE = _HEADER.size

# Compact the receive buffer once this many consumed bytes sit at its front.
_COMPACT_AT = 64 * 1024


class IpcError(Exception):
    """Framing or transport violation on an IPC channel."""


def encode(msg: dict) -> bytes:
    """Frame ``msg`` (a dict) as length prefix + orjson body."""
    if not isinstance(msg, dict):
        raise IpcError(f"IPC message must be a dict, not {type(msg).__name__}")
    try:
        body = orjson.dumps(msg)
    except orjson.JSONEncodeError as exc:
        raise IpcError(f"cannot encode IPC message: {exc}") from exc
    if len(body) > MAX_MESSAGE:
        raise IpcError(f"IPC message of {len(body)} bytes exceeds MAX_MESSAGE ({MAX_MESSAGE})")
    return _HEADER.pack(len(body)) + body


def _nfds_of(msg: dict) -> int:
    nfds = msg.get("nfds", 0)
    # bool is an int subclass; reject it explicitly.
    if type(nfds) is not int or not 0 <= nfds <= MAX_FDS:
        raise IpcError(f"invalid 'nfds' in IPC message: {nfds!r}")
    return nfds


class Decoder:
    """Incremental decoder: ``feed()`` bytes (+ descriptors), pull messages with ``next()``.

    Descriptors handed to ``feed()`` are owned by the decoder until ``next()``
    returns them with their message (ownership then passes to the caller) or
    ``close_pending_fds()`` closes them.  After an :class:`IpcError` the stream
    is corrupt; discard the decoder (calling ``close_pending_fds()``).
    """

    __slots__ = ("_buf", "_pos", "_fds")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Append a received chunk and the descriptors that came with it."""
        pos = self._pos
        if pos:
            if pos >= len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif pos >= _COMPACT_AT:
                del self._buf[:pos]
                self._pos = 0
        self._buf += data
        self._fds.extend(fds)

    def next(self) -> tuple[dict, list[int]] | None:
        """Return the next complete ``(message, fds)`` or ``None`` if more bytes are needed."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < _HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(buf, pos)
        if size > MAX_MESSAGE:
            raise IpcError(f"IPC message of {size} bytes exceeds MAX_MESSAGE ({MAX_MESSAGE})")
        end = pos + _HEADER_SIZE + size
        if len(buf) < end:
            return None
        try:
            with memoryview(buf) as view, view[pos + _HEADER_SIZE : end] as body:
                msg = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise IpcError(f"malformed IPC message: {exc}") from exc
        if not isinstance(msg, dict):
            raise IpcError(f"IPC message must be a JSON object, got {type(msg).__name__}")
        nfds = _nfds_of(msg)
        if nfds > len(self._fds):
            raise IpcError(
                f"IPC message announces {nfds} fds but only {len(self._fds)} were received"
            )
        fds = [self._fds.popleft() for _ in range(nfds)]
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return msg, fds

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    @property
    def pending_fds(self) -> int:
        """Descriptors received but not yet returned with a message."""
        return len(self._fds)

    def close_pending_fds(self) -> None:
        """Close every descriptor still queued (for shutdown / after an error)."""
        while self._fds:
            fd = self._fds.popleft()
            try:
                os.close(fd)
            except OSError:
                pass
