"""Shared statement catalog and per-backend prepared sets, in POSIX shared memory.

One parse per query across workers needs two facts every worker can read:

* the **catalog**: statement fingerprint (the Parse body: query text and parameter
  type OIDs, and the session's search_path when it set one, hashed) -> a small id.
  The backend-side name is ``pgf_<id>``, so the same text gets the same name in
  every worker;
* per **backend slot** (the pooler numbers its backends), the ids prepared on that
  backend, least recently used first.  A backend moves between workers with its
  lease, so what is prepared on it must travel with it.

Catalog entries are never removed; when it is full, callers fall back to a
name derived from the hash alone (still the same in every worker), which the sets
store as a key with the top bit set.  A set is written only by the holder of the
backend's lease (or the pooler while nobody holds it), so sets need no lock; the
lease hand-off over the IPC socket orders the writes.  Catalog inserts take a
process-shared semaphore; lookups take nothing: an entry's digest is written before
its state word, and a reader that sees the state empty falls through to the insert
path, which looks again under the lock.

Layout (little endian)::

    header (64 bytes): magic b"PGFLSTMT", u32 version, u32 capacity, u32 slots,
                       u32 slot capacity, u32 entries used, u32 lock holder pid
    entry i (24 bytes each): 16-byte digest, u32 state (0 empty, 1 assigned,
                             2 parsed successfully somewhere), u32 unused
    slot s: u32 count, u32 unused, then slot-capacity u64 keys
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from array import array

import posix_ipc

from .codec import IpcError
from .shm import create_segment, map_segment, segment_name, store_u32, unlink_segment

__all__ = [
    "HASHED_KEY", "MAX_PREPARED_PER_BACKEND", "SQL_KEY", "StatementCatalog", "backend_name",
    "key_of_name", "sql_key",
]

# Statements kept prepared on one backend before the least recently used are closed.
MAX_PREPARED_PER_BACKEND = 512

_MAGIC = b"PGFLSTMT"
_VERSION = 1
_HEADER = struct.Struct("<8sIIIII")
_HEADER_SIZE = 64
_USED_OFF = 8 + 4 * 4
_LOCK_PID_OFF = _USED_OFF + 4
_ENTRY_SIZE = 24
_DIGEST = 16
_U32 = struct.Struct("<I")
_STATE_ASSIGNED = 1
_STATE_PARSED = 2
# Set keys: a catalog id; or, with the top bit, a hash-derived name (catalog full);
# or, with the next bit, a session's SQL-level PREPARE (gateway pid, number).
HASHED_KEY = 1 << 63
SQL_KEY = 1 << 62
_LOW62 = SQL_KEY - 1
_LOCK_TIMEOUT = 0.2
_MAX_PROBES = 256  # past this the table counts as full for that digest


def fingerprint(body: bytes) -> bytes:
    """The catalog's key for a Parse body (query text + parameter type OIDs)."""
    return hashlib.blake2b(body, digest_size=_DIGEST).digest()


def backend_name(key: int) -> bytes:
    """The statement's name on a backend for a set key."""
    if key & HASHED_KEY:
        return b"pgf_h%x" % (key & _LOW62)
    if key & SQL_KEY:
        return b"pgfs_%d_%d" % ((key & _LOW62) >> 32, key & 0xFFFFFFFF)
    return b"pgf_%d" % key


def sql_key(pid: int, n: int) -> int:
    """The set key of the ``n``-th SQL-level PREPARE of gateway process ``pid``."""
    if not 0 < pid < 1 << 30 or not 0 < n <= 0xFFFFFFFF:
        raise ValueError("pid or statement number out of range")
    return SQL_KEY | pid << 32 | n


def hashed_key(digest: bytes) -> int:
    return HASHED_KEY | int.from_bytes(digest[:8], "little") & _LOW62


def key_of_name(name: bytes) -> int | None:
    """Inverse of :func:`backend_name`; None for a name that is not one of ours."""
    try:
        if name.startswith(b"pgfs_"):
            pid, _, n = name[5:].partition(b"_")
            return sql_key(int(pid), int(n))
        if name.startswith(b"pgf_h"):
            return HASHED_KEY | int(name[5:], 16) & _LOW62
        if name.startswith(b"pgf_"):
            key = int(name[4:])
            return key if 0 < key < SQL_KEY else None
    except ValueError:
        return None
    return None


class StatementCatalog:
    """The shared catalog and the per-backend prepared sets (see the module docstring)."""

    def __init__(self, name: str, shm_map: mmap.mmap, lock: posix_ipc.Semaphore) -> None:
        self.name = name
        self._map = shm_map
        self._lock = lock
        _magic, _v, self.capacity, self.slots, self.slot_capacity, _used = _HEADER.unpack_from(
            shm_map, 0
        )
        self._entries_off = _HEADER_SIZE
        self._slots_off = _HEADER_SIZE + self.capacity * _ENTRY_SIZE
        self._slot_size = 8 + 8 * self.slot_capacity

    # -- lifecycle --------------------------------------------------------------------------
    @staticmethod
    def _size(capacity: int, slots: int, slot_capacity: int) -> int:
        return _HEADER_SIZE + capacity * _ENTRY_SIZE + slots * (8 + 8 * slot_capacity)

    @classmethod
    def create(cls, name: str, capacity: int, slots: int, slot_capacity: int) -> StatementCatalog:
        """Create an empty catalog (replacing a stale one of the same name)."""
        if capacity < 1 or slots < 1 or slot_capacity < 1:
            raise ValueError("capacity, slots and slot capacity must be positive")
        name = segment_name(name)
        cls._unlink(name)
        shm_map = create_segment(name, cls._size(capacity, slots, slot_capacity))
        _HEADER.pack_into(shm_map, 0, _MAGIC, _VERSION, capacity, slots, slot_capacity, 0)
        lock = posix_ipc.Semaphore(name + "-lock", posix_ipc.O_CREX, mode=0o600, initial_value=1)
        return cls(name, shm_map, lock)

    @classmethod
    def attach(cls, name: str) -> StatementCatalog:
        """Map an existing catalog (the pooler and the workers)."""
        name = segment_name(name)
        shm_map = map_segment(name, _HEADER_SIZE, "statement catalog")
        magic, version, capacity, slots, slot_capacity, _used = _HEADER.unpack_from(shm_map, 0)
        if (
            magic != _MAGIC
            or version != _VERSION
            or len(shm_map) < cls._size(capacity, slots, slot_capacity)
        ):
            shm_map.close()
            raise IpcError(f"statement catalog {name}: bad header or size")
        return cls(name, shm_map, posix_ipc.Semaphore(name + "-lock"))

    @staticmethod
    def _unlink(name: str) -> None:
        unlink_segment(name)
        try:
            posix_ipc.unlink_semaphore(name + "-lock")
        except posix_ipc.ExistentialError:
            pass

    def unlink(self) -> None:
        """Remove the names (existing mappings stay valid). Idempotent."""
        self._unlink(self.name)

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        self._lock.close()

    # -- the catalog ------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return _U32.unpack_from(self._map, _USED_OFF)[0]

    def _find(self, digest: bytes) -> tuple[int, bool]:
        """(index, found): the entry holding ``digest``, or the empty one where it would go
        (index -1 when the table is too full around it and it is not there)."""
        m, cap, base = self._map, self.capacity, self._entries_off
        i = int.from_bytes(digest[:8], "little") % cap
        for _ in range(min(cap, _MAX_PROBES)):
            off = base + i * _ENTRY_SIZE
            if _U32.unpack_from(m, off + _DIGEST)[0] == 0:
                return i, False
            if m[off : off + _DIGEST] == digest:
                return i, True
            i = i + 1 if i + 1 < cap else 0
        return -1, False

    def key_for(self, body: bytes) -> int:
        """The set key (catalog id, or a hashed key when the catalog is full or busy)
        for a Parse body, assigning an id on first sight."""
        digest = fingerprint(body)
        i, found = self._find(digest)
        if found:
            return i + 1
        if i < 0 or not self._acquire():
            return hashed_key(digest)
        try:
            i, found = self._find(digest)
            if found:
                return i + 1
            if i < 0:
                return hashed_key(digest)
            off = self._entries_off + i * _ENTRY_SIZE
            self._map[off : off + _DIGEST] = digest
            store_u32(self._map, off + _DIGEST, _STATE_ASSIGNED)  # publishes the entry
            store_u32(self._map, _USED_OFF, self.used + 1)
            return i + 1
        finally:
            self._release()

    def mark_parsed(self, key: int) -> None:
        """Postgres accepted this statement once: another worker may answer its Parse
        before it has a backend (the text is valid; it is prepared when first used)."""
        if not key & HASHED_KEY and 0 < key <= self.capacity:
            store_u32(self._map, self._entries_off + (key - 1) * _ENTRY_SIZE + _DIGEST,
                           _STATE_PARSED)

    def parsed(self, key: int) -> bool:
        if key & HASHED_KEY or not 0 < key <= self.capacity:
            return False
        off = self._entries_off + (key - 1) * _ENTRY_SIZE + _DIGEST
        return _U32.unpack_from(self._map, off)[0] == _STATE_PARSED

    def _acquire(self) -> bool:
        """Take the insert lock; a holder that died with it is detected and replaced."""
        for _ in range(2):
            try:
                self._lock.acquire(_LOCK_TIMEOUT)
            except posix_ipc.BusyError:
                holder = _U32.unpack_from(self._map, _LOCK_PID_OFF)[0]
                if holder and not _alive(holder):
                    store_u32(self._map, _LOCK_PID_OFF, 0)
                    self._lock.release()
                continue
            store_u32(self._map, _LOCK_PID_OFF, os.getpid())
            return True
        return False

    def _release(self) -> None:
        store_u32(self._map, _LOCK_PID_OFF, 0)
        self._lock.release()

    # -- per-backend sets -------------------------------------------------------------------
    def _slot_off(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"backend slot {slot} out of range 0..{self.slots - 1}")
        return self._slots_off + slot * self._slot_size

    def load(self, slot: int) -> list[int]:
        """Keys prepared on the backend in ``slot``, least recently used first."""
        off = self._slot_off(slot)
        n = min(_U32.unpack_from(self._map, off)[0], self.slot_capacity)
        keys = array("Q")
        keys.frombytes(self._map[off + 8 : off + 8 + 8 * n])
        return keys.tolist()

    def store(self, slot: int, keys: list[int]) -> None:
        """Record what is prepared on the backend in ``slot`` (the newest, if too many)."""
        off = self._slot_off(slot)
        keys = keys[-self.slot_capacity :]
        data = array("Q", keys).tobytes()
        self._map[off + 8 : off + 8 + len(data)] = data
        store_u32(self._map, off, len(keys))

    def clear(self, slot: int) -> None:
        """Nothing is prepared on the backend in ``slot`` (new, or after DISCARD ALL)."""
        store_u32(self._map, self._slot_off(slot), 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
