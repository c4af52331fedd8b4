"""Backend-local state that pins a session to its backend, and the check that unpins it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgwire import frontend as fe
from pgwire.quoting import quote_literal

from .backend import K_QUERY
from .classify import Effects

if TYPE_CHECKING:
    from .backend import BackendLink

# What still ties a session to its backend, in the order of PIN_QUERY's columns.
PIN_REASONS = ("temp_table", "advisory_lock", "with_hold_cursor", "sql_prepare", "listen",
               "set_role")
PIN_QUERY = (
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
    " EXISTS (SELECT FROM pg_catalog.pg_locks"
    " WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),"
    " EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable),"
    " EXISTS (SELECT FROM pg_catalog.pg_prepared_statements"
    " WHERE from_sql AND name NOT LIKE 'pgfs\\_%'),"
    " EXISTS (SELECT FROM pg_catalog.pg_listening_channels()),"
    " current_user <> {user} OR session_user <> {user}"
)


class PinBook:
    """Session mixin: which pin reasons the session has, and asking the backend."""

    __slots__ = ()

    def _add_pin(self, reason: str, check: bool = True) -> None:
        """The session now has backend-local state for ``reason``. ``check``: a later
        look at the backend decides whether it stays (its transaction may still roll
        it back). The set is rebound, never changed in place (it may be shared)."""
        self.pins = self.pins | {reason}
        self.pin_epoch += 1
        if check:
            self.pin_check = True

    def _note_pins(self, fx: Effects) -> None:
        reason = fx.pin
        if reason is not None:
            self._add_pin(reason)
        elif self.pins and fx.unpins:
            self.pin_check = True

    def _recheck_pins(self, link: BackendLink) -> None:
        """Ask the backend which backend-local state the session still has; with none
        left, the session shares backends again."""
        self.pin_check = False
        rows: list[list[bytes | None]] = []

        epoch = self.pin_epoch

        def done(ok: bool) -> None:
            if self.pin_epoch != epoch:
                return  # pinning statements were sent after the check: it says too little
            if ok and rows:
                self.pins = frozenset(
                    r for r, v in zip(PIN_REASONS, rows[0], strict=True) if v == b"t"
                )

        user = quote_literal(self.user)
        link.expect(K_QUERY, swallow=1, on_done=done, rows=rows)
        link.write(fe.encode_query(PIN_QUERY.format(user=user)))
