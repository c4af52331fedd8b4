"""A counter in POSIX shared memory that one process bumps and every process reads.

The pooler bumps the role-facts epoch whenever what it knows of a role may have
changed (a refused login, or a catalog refetch that differs). Workers keep role
facts for a few seconds and drop them once the epoch moved, so a login that fails
on one worker is never answered from stale facts on another, and a steady stream
of logins costs no IPC.

Layout: magic b"PGFLEPCH", u32 version, u32 value (little endian), padded to 64.
A reader needs no lock: the value is one aligned word, written with one copy.
"""

from __future__ import annotations

import mmap
import struct

from .codec import IpcError
from .shm import create_segment, map_segment, segment_name, store_u32, unlink_segment

_MAGIC = b"PGFLEPCH"
_VERSION = 1
_HEADER = struct.Struct("<8sI")
_VALUE_AT = 12
_SIZE = 64


class SharedEpoch:
    def __init__(self, name: str, shm_map: mmap.mmap) -> None:
        # Use create() / attach().
        self.name = name
        self._map = shm_map

    @classmethod
    def create(cls, name: str) -> SharedEpoch:
        name = segment_name(name)
        shm_map = create_segment(name, _SIZE)
        _HEADER.pack_into(shm_map, 0, _MAGIC, _VERSION)
        return cls(name, shm_map)

    @classmethod
    def attach(cls, name: str) -> SharedEpoch:
        name = segment_name(name)
        shm_map = map_segment(name, _SIZE, "epoch")
        magic, version = _HEADER.unpack_from(shm_map, 0)
        if magic != _MAGIC or version != _VERSION:
            shm_map.close()
            raise IpcError(f"epoch {name}: bad header")
        return cls(name, shm_map)

    @property
    def value(self) -> int:
        return int.from_bytes(self._map[_VALUE_AT : _VALUE_AT + 4], "little")

    def bump(self) -> int:
        """Advance the counter (single writer: the pooler) and return the new value."""
        new = (self.value + 1) & 0xFFFFFFFF
        store_u32(self._map, _VALUE_AT, new)
        return new

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()

    def unlink(self) -> None:
        unlink_segment(self.name)
