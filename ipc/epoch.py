"""Two counters in POSIX shared memory, read together as one epoch by every process.

The pooler bumps the role-facts epoch whenever what it knows of a role may have
changed (a refused login, or a catalog refetch that differs). Workers keep role
facts for a few seconds and drop them once the epoch moved, so a login that fails
on one worker is never answered from stale facts on another, and a steady stream
of logins costs no IPC.

The second counter is the workers': one bumps it when a session's transaction that
ran ALTER ROLE / ALTER DATABASE / ALTER SYSTEM / pg_reload_conf() (and the like)
ends, so the very next login, on any worker, reads the catalogs again: the pooler
drops its own caches (role facts, status reports) when it sees this counter move.
Workers write it without a lock: two bumps at once may count as one, but the value
still moves, which is all a reader asks.

Layout: magic b"PGFLEPCH", u32 version, u32 pooler's counter, u32 workers' counter
(little endian), padded to 64. Readers need no lock: each counter is one aligned
word written with one copy; a read torn between the two only looks like a change.
"""

from __future__ import annotations

import mmap
import struct

from .codec import IpcError
from .shm import create_segment, map_segment, segment_name, store_u32, unlink_segment

_MAGIC = b"PGFLEPCH"
_VERSION = 2
_HEADER = struct.Struct("<8sI")
_VALUE_AT = 12
_SESSIONS_AT = 16
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
        """Both counters as one number: it moves when either does."""
        return int.from_bytes(self._map[_VALUE_AT : _SESSIONS_AT + 4], "little")

    @property
    def sessions(self) -> int:
        """The workers' counter alone."""
        return int.from_bytes(self._map[_SESSIONS_AT : _SESSIONS_AT + 4], "little")

    def bump(self) -> int:
        """Advance the pooler's counter (its only writer); the counter's new value."""
        return self._advance(_VALUE_AT)

    def bump_sessions(self) -> int:
        """Advance the workers' counter: a session changed roles, databases or the
        configuration."""
        return self._advance(_SESSIONS_AT)

    def _advance(self, at: int) -> int:
        new = (int.from_bytes(self._map[at : at + 4], "little") + 1) & 0xFFFFFFFF
        store_u32(self._map, at, new)
        return new

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()

    def unlink(self) -> None:
        unlink_segment(self.name)
