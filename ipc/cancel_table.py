"""Cross-worker cancel table in POSIX shared memory.

A client that wants to cancel a query opens a *new* connection, which may land
on any gateway worker, and sends CancelRequest(pid, secret).  Each worker
publishes its clients here so that whichever worker receives the request can
find the backend currently serving that client.

Clients see ``pid = CLIENT_PID_BASE + slot``.  Slots are partitioned between
workers (:meth:`CancelTable.partition`); a slot is only ever written by the
worker that owns it, so writers need no lock.  Readers may be any process and
use a per-slot sequence counter (seqlock) so they never observe a torn
``(backend_pid, backend_secret)`` pair.

Layout (native byte order: the table never leaves this machine)::

    header (64 bytes): magic b"PGFLCNCL", u32 version, u32 slots, u32 slot size, padding
    slot i at 64 + 16*i: u32 seq, u32 client_secret, u32 backend_pid, u32 backend_secret

A slot is in use iff ``client_secret != 0`` (hence :func:`new_secret` never
returns 0).  ``backend_pid == 0`` means the client is idle (no backend).

Secrets are 32-bit values.  Both the unsigned (``0 .. 2**32-1``) and signed
int32 (``-2**31 .. -1``) spellings are accepted everywhere and compared as the
same 32-bit pattern; values read back are always unsigned.
"""

from __future__ import annotations

import mmap
import os
import struct

from .codec import IpcError
from .shm import create_segment, map_segment, segment_name, unlink_segment

__all__ = ["CLIENT_PID_BASE", "CancelTable", "new_secret"]

CLIENT_PID_BASE = 0x10000000

_MAGIC = b"PGFLCNCL"
_VERSION = 1
_HEADER = struct.Struct("=8sIII")
_HEADER_SIZE = 64
_SLOT = struct.Struct("=IIII")
_SLOT_SIZE = _SLOT.size
_SEQ = struct.Struct("=I")
_FIELDS = struct.Struct("=III")
_U32 = 0xFFFFFFFF
_MAX_SLOTS = 0x7FFFFFFF - CLIENT_PID_BASE  # client pids must stay positive int32
_SPINS = 64  # seqlock read attempts before giving up
_SPINS_BEFORE_YIELD = 4


_SECRET_BATCH = 256
_secret_pool: list[int] = []
# A forked child must not hand out the secrets its parent drew.
os.register_at_fork(after_in_child=_secret_pool.clear)


def new_secret() -> int:
    """Random non-zero 32-bit secret. Drawn from os.urandom (as ``secrets`` does) a
    batch at a time: one syscall per 256 logins instead of one per login."""
    while True:
        if not _secret_pool:
            _secret_pool.extend(v for (v,) in _SEQ.iter_unpack(os.urandom(4 * _SECRET_BATCH)))
        value = _secret_pool.pop()
        if value:
            return value


def _u32(value: int, what: str) -> int:
    if not -0x80000000 <= value <= _U32:
        raise ValueError(f"{what} {value!r} does not fit in 32 bits")
    return value & _U32


class CancelTable:
    """Shared table mapping client (pid, secret) to the backend serving that client."""

    def __init__(self, name: str, shm_map: mmap.mmap, slots: int) -> None:
        # Use create() / attach().
        self.name = name
        self.slots = slots
        self._map = shm_map
        # The table as u32 words, for the seqlock writer: assigning a word is one
        # 4-byte store, where Struct.pack_into would zero its target first.
        self._words = memoryview(shm_map).cast("I")

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    def create(cls, name: str, slots: int) -> CancelTable:
        """Create a zero-filled table (replacing a stale one of the same name)."""
        if not 0 < slots <= _MAX_SLOTS:
            raise ValueError(f"slots must be in 1..{_MAX_SLOTS}, got {slots}")
        name = segment_name(name)
        shm_map = create_segment(name, _HEADER_SIZE + slots * _SLOT_SIZE)
        _HEADER.pack_into(shm_map, 0, _MAGIC, _VERSION, slots, _SLOT_SIZE)
        return cls(name, shm_map, slots)

    @classmethod
    def attach(cls, name: str) -> CancelTable:
        """Map an existing table (workers, after fork or exec)."""
        name = segment_name(name)
        shm_map = map_segment(name, _HEADER_SIZE, "cancel table")
        size = len(shm_map)
        magic, version, slots, slot_size = _HEADER.unpack_from(shm_map, 0)
        if (
            magic != _MAGIC
            or version != _VERSION
            or slot_size != _SLOT_SIZE
            or not 0 < slots <= _MAX_SLOTS
            or size < _HEADER_SIZE + slots * _SLOT_SIZE
        ):
            shm_map.close()
            raise IpcError(f"cancel table {name}: bad header or size")
        return cls(name, shm_map, slots)

    def close(self) -> None:
        """Unmap (idempotent). The shared memory object itself survives."""
        if not self._map.closed:
            self._words.release()
            self._map.close()

    def unlink(self) -> None:
        """Remove the shared memory name (existing mappings stay valid). Idempotent."""
        unlink_segment(self.name)

    def __enter__(self) -> CancelTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- slots ----------------------------------------------------------------

    def partition(self, worker_index: int, workers: int) -> range:
        """Contiguous, near-equal share of the slots owned by ``worker_index``."""
        if workers <= 0 or not 0 <= worker_index < workers:
            raise ValueError(f"bad worker index {worker_index} of {workers}")
        return range(
            self.slots * worker_index // workers, self.slots * (worker_index + 1) // workers
        )

    def owner_of(self, client_pid: int, workers: int) -> int | None:
        """Index of the worker whose partition holds ``client_pid``'s slot, or None."""
        slot = client_pid - CLIENT_PID_BASE
        if not 0 <= slot < self.slots or workers <= 0:
            return None
        for i in range(workers):
            if slot in self.partition(i, workers):
                return i
        return None

    def client_pid(self, slot: int) -> int:
        self._check_slot(slot)
        return CLIENT_PID_BASE + slot

    def claim(self, slot: int, secret: int) -> int:
        """Mark ``slot`` in use by a client with ``secret``; returns the client-facing pid."""
        self._check_slot(slot)
        secret = _u32(secret, "secret")
        if secret == 0:
            raise ValueError("client secret must be non-zero")
        self.serve(slot, 0, 0, secret)
        return CLIENT_PID_BASE + slot

    def set_backend(self, slot: int, backend_pid: int, backend_secret: int) -> None:
        """Record the backend now serving the slot's client (0, 0 = none)."""
        self._check_slot(slot)
        backend_pid = _u32(backend_pid, "backend_pid")
        backend_secret = _u32(backend_secret, "backend_secret")
        self.serve(slot, backend_pid, backend_secret)

    def release(self, slot: int) -> None:
        """Free the slot."""
        self._check_slot(slot)
        self.serve(slot, 0, 0, 0)

    def reset_range(self, r: range) -> None:
        """Free every slot in ``r`` (a restarted worker clearing its partition)."""
        for slot in r:
            self._check_slot(slot)
        for slot in r:
            self.serve(slot, 0, 0, 0)

    def lookup(self, client_pid: int, secret: int) -> tuple[int, int] | None:
        """``(backend_pid, backend_secret)`` for a CancelRequest, or None.

        None if the pid is not one of ours, the secret does not match, the
        client has no backend right now, or the slot kept changing under us.
        """
        fields = self._keyed(client_pid, secret)
        if fields is None or fields[1] == 0:
            return None
        return fields[1], fields[2]

    def holds(self, client_pid: int, secret: int) -> bool:
        """Whether ``client_pid``'s slot is in use with ``secret`` (a CancelRequest's key
        is a real client's, whether or not a backend serves it now)."""
        return self._keyed(client_pid, secret) is not None

    def _keyed(self, client_pid: int, secret: int) -> tuple[int, int, int] | None:
        """The slot's fields if ``(client_pid, secret)`` is the key of a client in it
        (any spelling of the 32-bit secret; 0 never matches), else None."""
        slot = client_pid - CLIENT_PID_BASE
        if not 0 <= slot < self.slots or not -0x80000000 <= secret <= _U32:
            return None
        secret &= _U32
        if secret == 0:
            return None
        fields = self._read(slot)
        if fields is None or fields[0] != secret:
            return None
        return fields

    def find_client_by_backend(self, backend_pid: int) -> int | None:
        """Client pid of the in-use slot currently served by ``backend_pid`` (linear scan)."""
        if not 0 < backend_pid <= _U32:
            return None
        # Cheap scan over a snapshot, then confirm candidates with a consistent read.
        end = _HEADER_SIZE + self.slots * _SLOT_SIZE
        snapshot = self._map[_HEADER_SIZE:end]
        for slot, (_seq, client_secret, pid, _bsecret) in enumerate(_SLOT.iter_unpack(snapshot)):
            if pid != backend_pid or client_secret == 0:
                continue
            fields = self._read(slot)
            if fields is not None and fields[0] != 0 and fields[1] == backend_pid:
                return CLIENT_PID_BASE + slot
        return None

    # -- seqlock ----------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"cancel table slot {slot} out of range 0..{self.slots - 1}")

    @staticmethod
    def _offset(slot: int) -> int:
        return _HEADER_SIZE + slot * _SLOT_SIZE

    def serve(
        self, slot: int, backend_pid: int, backend_secret: int, client_secret: int | None = None
    ) -> None:
        """set_backend for the owning worker's hot path (each backend a client gets, and
        its release): the caller passes values it knows to be valid, so there are no
        checks, and the client's secret, set by claim, is left as it is (unless given:
        claim and release write all of the slot)."""
        i = (_HEADER_SIZE + slot * _SLOT_SIZE) >> 2
        words = self._words
        seq = words[i]
        # Odd = write in progress. A writer that died mid-update may have left it
        # odd already; bump past it either way.
        odd = (seq + 1 if seq % 2 == 0 else seq + 2) & _U32
        words[i] = odd
        if client_secret is not None:
            words[i + 1] = client_secret
        words[i + 2] = backend_pid
        words[i + 3] = backend_secret
        words[i] = (odd + 1) & _U32

    def _read(self, slot: int) -> tuple[int, int, int] | None:
        off = self._offset(slot)
        shm_map = self._map
        for attempt in range(_SPINS):
            (seq1,) = _SEQ.unpack_from(shm_map, off)
            if seq1 % 2 == 0:
                fields = _FIELDS.unpack_from(shm_map, off + 4)
                (seq2,) = _SEQ.unpack_from(shm_map, off)
                if seq1 == seq2:
                    return fields
            if attempt >= _SPINS_BEFORE_YIELD:
                os.sched_yield()
        return None
