"""POSIX shared-memory segments as mmaps: the one way ipc's shared tables make and
map theirs."""

from __future__ import annotations

import mmap

import posix_ipc

from .codec import IpcError


def segment_name(name: str) -> str:
    """POSIX shared-memory names start with a slash."""
    return name if name.startswith("/") else "/" + name


def unlink_segment(name: str) -> None:
    """Remove the name if it exists (existing mappings stay valid)."""
    try:
        posix_ipc.unlink_shared_memory(segment_name(name))
    except posix_ipc.ExistentialError:
        pass


def create_segment(name: str, size: int) -> mmap.mmap:
    """A new zero-filled segment of ``size`` bytes, replacing a stale one of that name."""
    name = segment_name(name)
    unlink_segment(name)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        return mmap.mmap(shm.fd, size)
    except BaseException:
        posix_ipc.unlink_shared_memory(name)
        raise
    finally:
        shm.close_fd()


def store_u32(buf: mmap.mmap, offset: int, value: int) -> None:
    """Store a little-endian u32 with one copy. ``Struct.pack_into`` zeroes its target
    before packing, so a reader in another process could see 0 in between: a seqlock
    word read as 0 twice around a torn write would look consistent."""
    buf[offset : offset + 4] = value.to_bytes(4, "little")


def map_segment(name: str, min_size: int, what: str) -> mmap.mmap:
    """Map an existing segment whole (after fork or exec); IpcError if it is smaller
    than ``min_size`` (its header)."""
    name = segment_name(name)
    shm = posix_ipc.SharedMemory(name)
    try:
        if shm.size < min_size:
            raise IpcError(f"{what} {name}: too small ({shm.size} bytes)")
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()
