"""SQL-level PREPARE / EXECUTE / DEALLOCATE, recognised so they can be renamed per session.

A session's SQL prepared statements live in pgfleet's book, not in one backend:
each gets a backend name unique to the session, is prepared again on a backend
that lacks it, and the client's statements are rewritten to that name. Only a
statement that is a single PREPARE/EXECUTE/DEALLOCATE is rewritten; anything else
mentioning them pins the session, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IDENT = rb'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_LEAD = rb"\A(?:\s|--[^\n]*\n|/\*.*?\*/)*"
_PREPARE = re.compile(_LEAD + rb"(prepare)\s+(" + _IDENT + rb")(?=[\s(]|\Z)", re.I | re.S)
_EXECUTE = re.compile(_LEAD + rb"(execute)\s+(" + _IDENT + rb")(?=[\s(;]|\Z)", re.I | re.S)
_DEALLOCATE = re.compile(
    _LEAD + rb"(deallocate)\s+(?:prepare\s+)?(" + _IDENT + rb")\s*;?\s*\Z", re.I | re.S
)
_STRINGS = re.compile(rb"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)


@dataclass(frozen=True, slots=True)
class SqlPrepareCommand:
    kind: str  # 'prepare' | 'execute' | 'deallocate'
    name: bytes  # normalised: unquoted names lower-cased, quoted ones as written
    start: int  # where the name stands in the statement text
    end: int


def normalise_ident(raw: bytes) -> bytes:
    if raw.startswith(b'"'):
        return raw[1:-1].replace(b'""', b'"')
    return raw.lower()


def parse(sql: bytes) -> SqlPrepareCommand | None:
    """The single PREPARE/EXECUTE/DEALLOCATE statement ``sql`` is, or None."""
    head = sql[:12].lstrip().lower()
    if not (head.startswith((b"prep", b"exec", b"deal")) or head.startswith((b"--", b"/*"))):
        return None
    for rx in (_PREPARE, _EXECUTE, _DEALLOCATE):
        m = rx.match(sql)
        if m is None:
            continue
        kind = m.group(1).lower().decode()
        name = normalise_ident(m.group(2))
        if kind == "deallocate" and name == b"all":
            return None
        if kind == "prepare" and name == b"transaction":
            return None
        # One statement only: no further ';' outside strings and comments.
        rest = _STRINGS.sub(b" ", sql[m.end() :]).rstrip().rstrip(b";")
        if b";" in rest:
            return None
        return SqlPrepareCommand(kind, name, m.start(2), m.end(2))
    return None
