"""What a statement does to its session beyond its own transaction.

Three questions, each answered by a cheap scan of the statement text:

- ``pin_reason``: does it leave state that lives only in the backend that ran it
  (temp tables, session advisory locks, WITH HOLD cursors, LISTEN, SQL PREPARE,
  SET ROLE, LOAD)? Such a session is pinned to its backend. The scan errs towards
  pinning: a false pin costs sharing, a missed one costs correctness.
- ``changes_settings``: may it change session-level settings (SET, RESET,
  set_config, DISCARD ALL)? Settings are not pinned but replayed; the session's
  book is re-read from the backend at the end of such a transaction.
- ``reset_targets`` / ``drops_statements``: which startup settings must be put
  back after it, and does it deallocate every prepared statement?
"""

from __future__ import annotations

import re
from functools import lru_cache

_COMMENT_OR_STRING = re.compile(rb"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", re.S)
_COMMENT_OR_LITERAL = re.compile(rb"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.S)

# Statement-leading keywords that create backend-local state.
_LEADING = re.compile(
    rb"(?:^|;)\s*(?:\(\s*)*"
    rb"(set\s+(?:session\s+)?(?:role|session\s+authorization)|prepare(?!\s+transaction\b)"
    rb"|listen|load|declare\b[^;]*\bwith\s+hold)\b",
    re.S,
)
# Anywhere in the text: temp objects, session advisory locks.
_ANYWHERE = re.compile(
    rb"\btemp(?:orary)?\b|\bpg_temp\b|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(",
)
_REASONS = {
    b"set": "set_role",
    b"prepare": "sql_prepare",
    b"listen": "listen",
    b"load": "load",
    b"declare": "with_hold_cursor",
}
_PIN_PREFILTER = (b"set", b"prepare", b"listen", b"load", b"hold", b"temp", b"advisory")


def _blank(low: bytes) -> bytes:
    """Strings, quoted identifiers and comments cannot be keywords: blank them."""
    return _COMMENT_OR_STRING.sub(lambda m: b"''" if m.group(0)[:1] == b"'" else b" ", low)


@lru_cache(maxsize=4096)
def pin_reason(sql: bytes) -> str | None:
    """Return why running ``sql`` pins its session to the backend, or None if it does not."""
    low = sql.lower()
    if not any(word in low for word in _PIN_PREFILTER):
        return None
    text = _blank(low)
    m = _LEADING.search(text)
    if m is not None:
        return _REASONS[m.group(1).split(None, 1)[0]]
    m = _ANYWHERE.search(text)
    if m is not None:
        return "advisory_lock" if b"advisory" in m.group(0) else "temp_table"
    return None


_SETTINGS = re.compile(rb"(?:^|;)\s*(?:\(\s*)*(?:set|reset|discard\s+all)\b|\bset_config\s*\(")


@lru_cache(maxsize=4096)
def changes_settings(sql: bytes) -> bool:
    """True if ``sql`` may change session-level settings (so the book must be re-read)."""
    low = sql.lower()
    if b"set" not in low and b"discard" not in low:
        return False
    return _SETTINGS.search(_blank(low)) is not None


_RESET = re.compile(rb"(?:^|;)\s*(?:reset\s+(all\b|\"(?:[^\"]|\"\")*\"|[\w.$]+)|discard\s+(all)\b)")


@lru_cache(maxsize=1024)
def reset_targets(sql: bytes) -> tuple[str, ...]:
    """Setting names put back to their defaults by ``sql`` (lower-cased); 'all' for all.

    Postgres resets a setting to the value the client gave at startup; pgfleet's
    replayed startup values are ordinary SETs, so they must be replayed again.
    """
    low = sql.lower()
    if b"reset" not in low and b"discard" not in low:
        return ()
    out: list[str] = []
    for m in _RESET.finditer(_COMMENT_OR_LITERAL.sub(b" ", low)):
        name = m.group(1) or m.group(2)
        if name.startswith(b'"'):
            name = name[1:-1].replace(b'""', b'"')
        out.append(name.decode("utf-8", "replace"))
    return tuple(out)


_DROPS_STATEMENTS = re.compile(rb"(?:^|;)\s*(?:deallocate\s+(?:prepare\s+)?all|discard\s+all)\b")


def drops_statements(sql: bytes) -> bool:
    """True if ``sql`` deallocates every prepared statement of the backend."""
    low = sql.lower()
    return (b"deallocate" in low or b"discard" in low) and (
        _DROPS_STATEMENTS.search(_blank(low)) is not None
    )


_MIGHT_UNPIN = (b"discard", b"drop", b"unlock", b"close", b"unlisten", b"reset", b"deallocate",
                b"rollback", b"abort")


def might_unpin(sql: bytes) -> bool:
    """True if ``sql`` may remove pinning state (drop a temp table, unlock, close a
    cursor, UNLISTEN, DEALLOCATE, RESET ROLE, roll back): worth asking the backend."""
    low = sql.lower()
    return any(word in low for word in _MIGHT_UNPIN)


_CUSTOM_SET = re.compile(rb"(?:^|;)\s*(?:set|reset)\s+(?:session\s+|local\s+)?"
                         rb"([a-z_][\w$]*\s*\.\s*[a-z_][\w$.]*)")
_CUSTOM_CONFIG = re.compile(rb"set_config\s*\(\s*'([^']*\.[^']*)'")


def custom_setting_names(sql: bytes) -> set[str]:
    """Extension-style settings (``app.tenant``) that ``sql`` may set.

    Postgres lists such placeholders nowhere (pg_settings omits them), so the book
    re-reads them by name, and these are the names.
    """
    low = sql.lower()
    if b"." not in low:
        return set()
    names = {m.group(1).replace(b" ", b"") for m in _CUSTOM_SET.finditer(_blank(low))}
    names.update(m.group(1) for m in _CUSTOM_CONFIG.finditer(low))
    return {n.decode("utf-8", "replace") for n in names}
