"""asyncio I/O for IPC channels over connected AF_UNIX SOCK_STREAM sockets.

Works on uvloop and on the default asyncio loop; it only uses
``add_reader``/``add_writer``/``sock_connect`` and raw ``sendmsg``/``recvmsg``.

Channel
    ``Channel(sock, on_message, on_close, loop=None)`` wraps a connected
    socket.  ``on_message(msg, fds)`` runs for every complete message; the
    callback owns ``fds`` from then on (even if it raises: exceptions are
    logged to ``pgfleet.ipc`` and reading continues).  ``on_close()`` runs
    exactly once when the channel dies *underneath its owner*: peer EOF,
    ECONNRESET/EPIPE, another socket error, or a framing error.  It is
    called synchronously from the loop's reader/writer callback, or via
    ``loop.call_soon`` when the failure is detected inside ``send()``.  An
    explicit ``close()`` by the owner does *not* call ``on_close``.
    ``on_message`` / ``on_close`` are plain attributes and may be replaced.

    ``send(msg, fds=())`` never blocks.  It raises :class:`IpcError` if the
    channel is closed (or breaks during the call) or if the message cannot be
    encoded; in that case nothing was sent and the caller still owns its fds.
    When it returns normally the caller may close its own copies of ``fds``
    at once: they were either already passed to the kernel, or ``dup``'ed and
    queued (the dups are closed once transmitted or when the channel closes).
    ``pending`` is the number of bytes queued in user space (backpressure).

connect(path, on_message, on_close) -> Channel
    Coroutine; connects without blocking the loop.

serve(path, on_channel, *, backlog=128) -> ChannelServer
    Coroutine (for symmetry with ``asyncio.start_unix_server``); same as
    constructing ``ChannelServer(path, on_channel)`` inside a running loop.
    The server unlinks a stale socket at ``path`` (a non-socket file there is
    an error), binds with mode 0600 and accepts on ``add_reader``.  For every
    accepted connection it builds a :class:`Channel` and calls
    ``on_channel(channel) -> (on_message, on_close)``; the returned callbacks
    are installed before the first read, so ``on_channel`` may already
    ``send()`` on the channel.  If ``on_channel`` raises, the error is logged
    and the connection closed.  ``ChannelServer.close()`` stops accepting and
    unlinks the path (if it is still ours); channels already accepted are
    left alone.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

from .codec import MAX_FDS, Decoder, IpcError, encode

__all__ = ["Channel", "ChannelServer", "connect", "serve"]

log = logging.getLogger("pgfleet.ipc")

OnMessage = Callable[[dict, list[int]], None]
OnClose = Callable[[], None]

_RECV_SIZE = 65536
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
# As a plain int: socket's flag constants are enum members, and `&` on them builds one.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_MAX_WRITE = 256 * 1024  # bytes gathered into one sendmsg when flushing the queue
_MAX_IOV = 64  # buffers gathered into one sendmsg
_DISCONNECT_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN}
)
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _current_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.get_event_loop()


def _close_fds(fds: Sequence[int] | None) -> None:
    if fds:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _ancillary(fds: Sequence[int]) -> list:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def _extract_fds(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


class _Pending:
    """One queued, not yet fully written message."""

    __slots__ = ("data", "fds")

    def __init__(self, data: memoryview, fds: list[int] | None) -> None:
        self.data = data  # unsent remainder
        self.fds = fds  # our dups, still to be sent with data[0]; None once sent / if none


class Channel:
    """Length-prefixed orjson messages + SCM_RIGHTS descriptors over a Unix stream socket."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: OnMessage,
        on_close: OnClose,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("Channel needs a connected AF_UNIX SOCK_STREAM socket")
        self.on_message = on_message
        self.on_close = on_close
        self._loop = loop if loop is not None else _current_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._decoder = Decoder()
        self._queue: deque[_Pending] = deque()
        self._pending = 0
        self._writing = False
        self._closed = False
        self._close_notified = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._on_readable)

    # -- public API ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Bytes accepted by ``send()`` but not yet handed to the kernel."""
        return self._pending

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def send(self, msg: dict, fds: Sequence[int] = ()) -> None:
        if self._closed:
            raise IpcError("IPC channel is closed")
        fds = list(fds)
        if fds:
            if len(fds) > MAX_FDS:
                raise IpcError(f"cannot pass {len(fds)} fds in one message (max {MAX_FDS})")
            msg = dict(msg)
            msg["nfds"] = len(fds)
        elif isinstance(msg, dict) and msg.get("nfds"):
            raise IpcError("message has 'nfds' but no fds were given")
        data = encode(msg)

        sent = 0
        if not self._queue:
            try:
                sent = self._sock.sendmsg([data], _ancillary(fds), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                if exc.errno in _DISCONNECT_ERRNOS:
                    self._fail(exc, soon=True)
                    raise IpcError(f"IPC channel broken: {exc}") from exc
                # Nothing was written: the stream is still consistent.
                raise IpcError(f"IPC send failed: {exc}") from exc
            if sent == len(data):
                return

        queued_fds: list[int] | None = None
        if fds and sent == 0:
            queued_fds = []
            try:
                for fd in fds:
                    queued_fds.append(os.dup(fd))
            except OSError as exc:
                _close_fds(queued_fds)
                raise IpcError(f"cannot dup fds for queued IPC message: {exc}") from exc
        rest = memoryview(data)[sent:]
        self._queue.append(_Pending(rest, queued_fds))
        self._pending += len(rest)
        if not self._writing:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def close(self) -> None:
        """Stop I/O, close the socket and any undelivered descriptors. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._writing = False
        while self._queue:
            _close_fds(self._queue.popleft().fds)
        self._pending = 0
        self._decoder.close_pending_fds()
        self._sock.close()

    # -- internals ------------------------------------------------------------

    def _fail(self, exc: BaseException | None, *, soon: bool = False) -> None:
        if self._closed:
            return
        if exc is None:
            log.debug("IPC peer closed the channel (fd %d)", self._fd)
        elif isinstance(exc, OSError) and exc.errno in _DISCONNECT_ERRNOS:
            log.debug("IPC channel (fd %d) disconnected: %s", self._fd, exc)
        else:
            log.warning("IPC channel (fd %d) failed: %s", self._fd, exc)
        self.close()
        if soon:
            self._loop.call_soon(self._notify_close)
        else:
            self._notify_close()

    def _notify_close(self) -> None:
        if self._close_notified:
            return
        self._close_notified = True
        try:
            self.on_close()
        except Exception:
            log.exception("IPC on_close callback raised")

    def _on_readable(self) -> None:
        if self._closed:
            return
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(_RECV_SIZE, _ANC_SIZE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        fds = _extract_fds(ancdata) if ancdata else []
        if flags & _MSG_CTRUNC:
            _close_fds(fds)
            self._fail(IpcError("ancillary data truncated: descriptors were lost"))
            return
        if not data:
            _close_fds(fds)
            self._fail(None)
            return
        decoder = self._decoder
        decoder.feed(data, fds)
        while not self._closed:
            try:
                item = decoder.next()
            except IpcError as exc:
                self._fail(exc)
                return
            if item is None:
                return
            try:
                self.on_message(*item)
            except Exception:
                log.exception("IPC on_message callback raised")

    def _on_writable(self) -> None:
        queue = self._queue
        while queue and not self._closed:
            head = queue[0]
            bufs = [head.data]
            total = len(head.data)
            for item in islice(queue, 1, None):
                if item.fds or total >= _MAX_WRITE or len(bufs) >= _MAX_IOV:
                    break
                bufs.append(item.data)
                total += len(item.data)
            try:
                sent = self._sock.sendmsg(bufs, _ancillary(head.fds), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc)
                return
            if head.fds and sent:
                _close_fds(head.fds)  # the kernel holds its own references now
                head.fds = None
            self._consume(sent)
            if sent < total:
                return  # socket buffer is full; wait for the next writable event
        if self._writing and not self._closed:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _consume(self, n: int) -> None:
        self._pending -= n
        queue = self._queue
        while n:
            head = queue[0]
            size = len(head.data)
            if n >= size:
                queue.popleft()
                n -= size
            else:
                head.data = head.data[n:]
                n = 0


async def connect(path: str, on_message: OnMessage, on_close: OnClose) -> Channel:
    """Connect to a :class:`ChannelServer` at ``path`` without blocking the loop."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, on_message, on_close, loop)


def _ignore_message(msg: dict, fds: list[int]) -> None:
    _close_fds(fds)


def _ignore_close() -> None:
    pass


class ChannelServer:
    """Listening Unix socket that turns each accepted connection into a :class:`Channel`."""

    def __init__(
        self,
        path: str,
        on_channel: Callable[[Channel], tuple[OnMessage, OnClose]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        backlog: int = 128,
    ) -> None:
        self.path = path
        self._on_channel = on_channel
        self._loop = loop if loop is not None else _current_loop()
        self._closed = False
        self._paused_handle: asyncio.TimerHandle | None = None

        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "refusing to replace non-socket file", path)
            os.unlink(path)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = os.lstat(path)
            self._ident = (st.st_dev, st.st_ino)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_acceptable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def close(self) -> None:
        """Stop accepting, close the listening socket, unlink the path if still ours."""
        if self._closed:
            return
        self._closed = True
        if self._paused_handle is not None:
            self._paused_handle.cancel()
            self._paused_handle = None
        elif not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass

    def _on_acceptable(self) -> None:
        for _ in range(64):
            if self._closed:
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    log.error("IPC accept on %s failed (%s); pausing for 0.5s", self.path, exc)
                    self._loop.remove_reader(self._sock.fileno())
                    self._paused_handle = self._loop.call_later(0.5, self._resume)
                    return
                log.error("IPC accept on %s failed: %s", self.path, exc)
                return
            self._start_channel(conn)

    def _resume(self) -> None:
        self._paused_handle = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _start_channel(self, conn: socket.socket) -> None:
        try:
            channel = Channel(conn, _ignore_message, _ignore_close, self._loop)
        except Exception:
            log.exception("IPC: cannot set up accepted connection on %s", self.path)
            conn.close()
            return
        try:
            on_message, on_close = self._on_channel(channel)
        except Exception:
            log.exception("IPC on_channel callback raised; dropping connection")
            channel.close()
            return
        channel.on_message = on_message
        channel.on_close = on_close


async def serve(
    path: str,
    on_channel: Callable[[Channel], tuple[OnMessage, OnClose]],
    *,
    backlog: int = 128,
) -> ChannelServer:
    """Start a :class:`ChannelServer` on the running loop."""
    return ChannelServer(path, on_channel, loop=asyncio.get_running_loop(), backlog=backlog)
