"""A session's settings book: replayed on every backend that serves the session, and
read back from the backend after statements that may have changed it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgwire import frontend as fe
from pgwire.quoting import quote_literal

from .backend import K_QUERY

if TYPE_CHECKING:
    from .backend import BackendLink

# Session-level settings as Postgres sees them; SET ROLE / SESSION AUTHORIZATION pin instead.
SETTINGS_SQL = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
    "AND name NOT IN ('role', 'session_authorization')"
)


class SettingsBook:
    """Session mixin: RESET's replay of startup values, and re-reading the book."""

    __slots__ = ()

    def _after_resets(self, link: BackendLink, targets: tuple[str, ...]) -> None:
        """RESET puts a setting back to its startup value in Postgres, not to the server
        default: replay the startup values it touched, right behind the statement."""
        if not targets or not self.startup_settings:
            return
        if "all" in targets:
            again = dict(self.startup_settings)
        else:
            again = {k: v for k, v in self.startup_settings.items() if k in targets}
        if again:
            query = link.queue[-1]
            if self.worker.apply_settings(link, again, quiet=True, force=True):
                query.hold_z = True

    def _reread_settings(self, link: BackendLink) -> None:
        """Take the session's settings from the backend itself, which already applied
        Postgres's rules (transactions, savepoints, SET LOCAL, RESET, failed SETs)."""
        self.settings_dirty = False
        rows: list[list[bytes | None]] = []

        def done(ok: bool) -> None:
            if not ok:
                link.needs_reset = True  # we no longer know what it holds
                return
            book = {}
            for name, value in rows:
                if value is None:
                    continue  # a custom setting never defined here
                n = name.decode()
                book[n.lower()] = (n, value.decode())
            book = self.worker.shared_book(book)
            self.settings = book
            link.applied = {k: v for k, (_, v) in book.items()}
            link.synced_with = book

        query = SETTINGS_SQL
        if self.custom_names:
            names = ", ".join(quote_literal(n) for n in sorted(self.custom_names))
            query += (" UNION ALL SELECT n, pg_catalog.current_setting(n, true)"
                      f" FROM pg_catalog.unnest(ARRAY[{names}]::text[]) AS n")
        link.expect(K_QUERY, swallow=1, on_done=done, rows=rows)
        link.write(fe.encode_query(query))
