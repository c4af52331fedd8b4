"""Which statements leave state behind in the backend that serves them.

Part 1 rule: a session that runs such a statement is pinned to its backend. The
check is a cheap scan of the statement text; it errs towards pinning, because a
false pin costs sharing while a missed one costs correctness.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Statement-leading keywords that create session state.
_LEADING = re.compile(
    rb"(?:^|;)\s*(?:\(\s*)*"
    rb"(set(?!\s+(?:local|transaction|constraints)\b)|reset|prepare(?!\s+transaction\b)|listen|load"
    rb"|declare\b[^;]*\bwith\s+hold)\b",
    re.S,
)
# Anywhere in the text: temp objects, session advisory locks, set_config.
_ANYWHERE = re.compile(
    rb"\btemp(?:orary)?\b|\bpg_temp\b|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(|\bset_config\s*\(",
)
_COMMENT_OR_STRING = re.compile(rb"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", re.S)

_REASONS = {
    b"set": "set",
    b"reset": "set",
    b"prepare": "sql_prepare",
    b"listen": "listen",
    b"load": "load",
    b"declare": "with_hold_cursor",
}


@lru_cache(maxsize=4096)
def pin_reason(sql: bytes) -> str | None:
    """Return why running ``sql`` pins its session to the backend, or None if it does not."""
    low = sql.lower()
    if not _maybe_stateful(low):
        return None
    # Strings and comments cannot create state; blank them so they cannot match.
    text = _COMMENT_OR_STRING.sub(lambda m: b"''" if m.group(0)[:1] == b"'" else b" ", low)
    m = _LEADING.search(text)
    if m is not None:
        word = m.group(1).split(None, 1)[0]
        return _REASONS.get(word, "set")
    m = _ANYWHERE.search(text)
    if m is not None:
        hit = m.group(0)
        if b"advisory" in hit:
            return "advisory_lock"
        if b"set_config" in hit:
            return "set"
        return "temp_table"
    return None


_PREFILTER = (b"set", b"prepare", b"listen", b"load", b"hold", b"temp", b"advisory", b"set_config")


def _maybe_stateful(low: bytes) -> bool:
    return any(word in low for word in _PREFILTER)


_DROPS_STATEMENTS = re.compile(rb"(?:^|;)\s*(?:deallocate\s+(?:prepare\s+)?all|discard\s+all)\b")
_RESETS_SETTINGS = re.compile(rb"(?:^|;)\s*(?:reset\b|discard\s+all\b)")


def drops_statements(sql: bytes) -> bool:
    """True if ``sql`` deallocates every prepared statement of the backend."""
    low = sql.lower()
    return (b"deallocate" in low or b"discard" in low) and (
        _DROPS_STATEMENTS.search(_COMMENT_OR_STRING.sub(b" ", low)) is not None
    )


def resets_settings(sql: bytes) -> bool:
    """True if ``sql`` puts settings back to their defaults (RESET, DISCARD ALL).

    Postgres resets a setting to the value the client gave at startup; pgfleet's
    replayed values are ordinary SETs, so they must be replayed again after this.
    """
    low = sql.lower()
    return (b"reset" in low or b"discard" in low) and (
        _RESETS_SETTINGS.search(_COMMENT_OR_STRING.sub(b" ", low)) is not None
    )
