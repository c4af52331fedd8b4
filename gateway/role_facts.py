"""Role and database facts a worker keeps between logins, so a burst of logins for the
same role costs no IPC to the pooler.

The pooler's cache stays the one source: a worker keeps what the pooler answered
for ``TTL`` seconds at most, and only while the shared role-facts epoch has not
moved since before it asked. The pooler bumps that epoch whenever what it knows
of a role may have changed (a refused login anywhere, or a refetch that differs),
so no worker answers from facts the pooler has dropped; a worker bumps it (its own
counter) when a session's transaction that ran ALTER ROLE, ALTER DATABASE, ALTER
SYSTEM or pg_reload_conf() ends.
"""

from __future__ import annotations

import time

from ipc.epoch import SharedEpoch

TTL = 1.0
MAX_ENTRIES = 4096


class RoleFacts:
    __slots__ = ("epoch", "_entries")

    def __init__(self, epoch: SharedEpoch) -> None:
        self.epoch = epoch
        # (user, database) -> (epoch when asked, monotonic deadline, pooler's answer)
        self._entries: dict[tuple[str, str], tuple[int, float, dict]] = {}

    def get(self, user: str, database: str) -> dict | None:
        hit = self._entries.get((user, database))
        if hit is None:
            return None
        if hit[0] != self.epoch.value or time.monotonic() >= hit[1]:
            del self._entries[(user, database)]
            return None
        return hit[2]

    def remember(self, user: str, database: str, asked_at: int, info: dict) -> None:
        """Keep a pooler answer; ``asked_at`` is the epoch read *before* asking, so an
        answer that raced with a bump is dropped at its first use."""
        if not (info.get("role_exists") and info.get("db_exists")):
            return  # a missing role or database is never cached (the pooler's rule too)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        facts = {k: v for k, v in info.items() if k not in ("status", "op", "req")}
        self._entries[(user, database)] = (asked_at, time.monotonic() + TTL, facts)

    def forget(self, user: str) -> None:
        for key in [k for k in self._entries if k[0] == user]:
            del self._entries[key]
