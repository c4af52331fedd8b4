"""What a statement does to its session beyond its own transaction.

Three questions, each answered by a cheap scan of the statement text (and, for
pinning, Postgres's own parser on the texts the scan flags):

- ``pin_reason``: does it leave state that lives only in the backend that ran it
  (temp tables, session advisory locks, WITH HOLD cursors, LISTEN, SQL PREPARE,
  SET ROLE, LOAD)? Such a session is pinned to its backend. The scan errs towards
  pinning: a false pin costs sharing, a missed one costs correctness.
- ``changes_settings``: may it change session-level settings (SET, RESET,
  set_config, DISCARD ALL)? Settings are not pinned but replayed; the session's
  book is re-read from the backend at the end of such a transaction.
- ``reset_targets`` / ``drops_statements``: which startup settings must be put
  back after it, and does it deallocate every prepared statement?
- ``changes_logins``: may it change what a new session starts from (a role's
  password, LOGIN, defaults; a database's defaults; the server's configuration)?
  Logins then stop trusting what the workers and the pooler cached.
- ``Effects.sequences``: does it read the session's sequence state (currval(),
  lastval()), which lives in whichever backend ran its nextval()? And
  ``Effects.advances``: does it write that state (nextval(), setval())?
- ``returns_no_rows``: can it never return rows (INSERT, UPDATE, DELETE without
  RETURNING; COMMIT)? Then a prepared copy of it cannot fail under DDL with
  "cached plan must not change result type".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import orjson
from pglast.parser import ParseError, parse_sql_json

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
_BODY_LEADING = re.compile(
    rb"\b(set\s+(?:session\s+)?(?:role|session\s+authorization)|prepare(?!\s+transaction\b)"
    rb"|listen|load|declare\b[^;]*\bwith\s+hold)\b",
    re.S,
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


def _scan_pin_reason(low: bytes) -> str | None:
    """The keyword scan: for text the parser cannot read and for DO block bodies."""
    text = _blank(low)
    m = _LEADING.search(text)
    if m is not None:
        return _REASONS[m.group(1).split(None, 1)[0]]
    m = _ANYWHERE.search(text)
    if m is not None:
        return "advisory_lock" if b"advisory" in m.group(0) else "temp_table"
    return None


_ADVISORY_SESSION = frozenset(
    ("pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_lock_shared",
     "pg_try_advisory_lock_shared")
)
_ROLE_SETTINGS = frozenset(("role", "session_authorization"))
_CURSOR_OPT_HOLD = 0x0020  # DeclareCursorStmt.options bit, from Postgres's parsenodes.h
# LISTEN is not here: the LISTEN hub serves it without pinning (see gateway.listen).
_LEADING_REASON = {"LoadStmt": "load", "PrepareStmt": "sql_prepare"}


def _const_text(node: object) -> str | None:
    if isinstance(node, dict):
        const = node.get("A_Const")
        if isinstance(const, dict) and "sval" in const:
            return const["sval"].get("sval", "")
    return None


def _node_reason(kind: str, node: dict) -> str | None:
    """Why one parse-tree node pins, if it does."""
    if kind == "String":
        name = node.get("sval", "")
        if name == "pg_temp" or name.startswith("pg_temp_"):
            return "temp_table"  # an object in the session's temporary schema
    elif kind == "FuncCall":
        fname = node["funcname"][-1].get("String", {}).get("sval", "")
        if fname in _ADVISORY_SESSION:
            return "advisory_lock"
        if fname == "set_config":
            args = node.get("args") or []
            setting = _const_text(args[0]) if args else None
            if setting is None or setting.lower() in _ROLE_SETTINGS:
                local = args[2].get("A_Const", {}).get("boolval") if len(args) > 2 else None
                if not (isinstance(local, dict) and local.get("boolval")):
                    return "set_role"  # set_config('role', ..., false) or unknowable
    elif kind == "VariableSetStmt":
        if (
            node.get("name") in _ROLE_SETTINGS
            and node.get("kind") == "VAR_SET_VALUE"
            and not node.get("is_local")
            and _const_text((node.get("args") or [None])[0]) != "none"
        ):
            return "set_role"
    elif kind == "DeclareCursorStmt":
        if node.get("options", 0) & _CURSOR_OPT_HOLD:
            return "with_hold_cursor"
    elif kind == "DoStmt":
        # Its body is PL/pgSQL text the parser does not look into: scan it.
        for arg in node.get("args") or ():
            body = arg.get("DefElem", {}).get("arg", {}).get("String", {}).get("sval")
            if body is not None:
                low = body.lower().encode()
                reason = _scan_pin_reason(low)
                if reason is None:
                    # PL/pgSQL puts statements after BEGIN, THEN, LOOP...: look anywhere.
                    m = _BODY_LEADING.search(_blank(low))
                    reason = None if m is None else _REASONS[m.group(1).split(None, 1)[0]]
                if reason is not None:
                    return reason
    else:
        return _LEADING_REASON.get(kind)
    return None


def _temp_relation(rel: dict) -> bool:
    """A RangeVar (the JSON form omits the node name where the field's type is fixed)
    naming a temporary relation: TEMP in CREATE/SELECT INTO, or the pg_temp schema."""
    schema = rel.get("schemaname", "")
    return (rel["relpersistence"] == "t" or schema == "pg_temp"
            or schema.startswith("pg_temp_"))


def _tree_pin_reason(tree: object) -> str | None:
    """Walk the parse tree; a reason other than SQL PREPARE wins (a PREPAREd statement
    that takes a lock or creates a temp table pins for that too)."""
    found: str | None = None
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "relpersistence" in node and _temp_relation(node):
                return "temp_table"
            for kind, value in node.items():
                if isinstance(value, dict):
                    if kind[:1].isupper():
                        reason = _node_reason(kind, value)
                        if reason is not None:
                            if reason != "sql_prepare":
                                return reason
                            found = reason
                    stack.append(value)
                elif isinstance(value, list):
                    stack.extend(value)
        elif isinstance(node, list):
            stack.extend(node)
    return found


@lru_cache(maxsize=4096)
def pin_reason(sql: bytes) -> str | None:
    """Return why running ``sql`` pins its session to the backend, or None if it does not.

    A keyword prefilter first; candidates are read by Postgres's own parser (pglast),
    so that a column called ``temp`` or a string mentioning LISTEN pins nothing. Text
    the parser rejects gets the keyword scan, which errs towards pinning.
    """
    low = sql.lower()
    if not any(word in low for word in _PIN_PREFILTER):
        return None
    tree = _parse_tree(sql)
    if tree is None:
        return _scan_pin_reason(low)
    return _tree_pin_reason(tree)


@lru_cache(maxsize=1024)
def _parse_tree(sql: bytes) -> dict | None:
    """Postgres's parse tree of ``sql`` (as pglast's JSON), None if it does not parse."""
    try:
        return orjson.loads(parse_sql_json(sql.decode("utf-8")))
    except (ParseError, UnicodeDecodeError, orjson.JSONDecodeError):
        return None


ListenOps = tuple[tuple[str, "str | None"], ...]


@lru_cache(maxsize=4096)
def listen_ops(sql: bytes) -> ListenOps:
    """The LISTEN / UNLISTEN [*] / DISCARD ALL statements of ``sql``, in order, as
    ("listen", channel) and ("unlisten", channel or None for all). Empty for text the
    parser rejects: that pins for "listen" instead (see pin_reason)."""
    low = sql.lower()
    if b"listen" not in low and b"discard" not in low:
        return ()
    tree = _parse_tree(sql)
    if tree is None:
        return ()
    ops: list[tuple[str, str | None]] = []
    for raw in tree.get("stmts", ()):
        stmt = raw.get("stmt", {})
        if "ListenStmt" in stmt:
            ops.append(("listen", stmt["ListenStmt"].get("conditionname", "")))
        elif "UnlistenStmt" in stmt:
            ops.append(("unlisten", stmt["UnlistenStmt"].get("conditionname")))
        elif stmt.get("DiscardStmt", {}).get("target") == "DISCARD_ALL":
            ops.append(("unlisten", None))
    return tuple(ops)


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


_LOGIN_FACTS = re.compile(
    rb"(?:^|;)\s*(?:\(\s*)*(?:(?:alter|drop)\s+(?:role|user|group|database)|alter\s+system"
    rb"|(?:grant|revoke)\b[^;]*\bon\s+database)\b"
    rb"|\bpg_reload_conf\s*\("
)


def changes_logins(sql: bytes) -> bool:
    """True if ``sql`` may change what a new session starts from: ALTER/DROP ROLE
    (USER, GROUP) for passwords, LOGIN, VALID UNTIL, renames and ``SET`` defaults;
    ALTER/DROP DATABASE for its defaults and ALLOW_CONNECTIONS; GRANT/REVOKE ... ON
    DATABASE for CONNECT; ALTER SYSTEM and pg_reload_conf() for the values a new
    session reports (TimeZone, ...)."""
    low = sql.lower()
    if not any(word in low for word in (b"alter", b"drop", b"reload", b"database")):
        return False
    return _LOGIN_FACTS.search(_blank(low)) is not None


_MIGHT_UNPIN = (b"discard", b"drop", b"unlock", b"close", b"unlisten", b"reset", b"deallocate",
                b"rollback", b"abort", b"none", b"default")


_ENDS_TRANSACTION = (b"rollback", b"abort", b"commit", b"end", b"prepare")


def might_end_transaction(sql: bytes) -> bool:
    """False if ``sql`` certainly holds no statement that Postgres runs in an aborted
    transaction (ROLLBACK, ABORT, COMMIT, END, PREPARE TRANSACTION): there it fails."""
    low = sql.lower()
    return any(word in low for word in _ENDS_TRANSACTION)


def might_unpin(sql: bytes) -> bool:
    """True if ``sql`` may remove pinning state (drop a temp table, unlock, close a
    cursor, UNLISTEN, DEALLOCATE, RESET ROLE / SET ROLE NONE / SET SESSION AUTHORIZATION
    DEFAULT, roll back): worth asking the backend."""
    low = sql.lower()
    return any(word in low for word in _MIGHT_UNPIN)


_ROWLESS_HEADS = frozenset((b"insert", b"update", b"delete"))
_TRANSACTION_ENDS = frozenset((b"commit", b"end", b"rollback", b"abort"))


def returns_no_rows(query: bytes) -> bool:
    """True when ``query`` (one statement) can never return rows, whatever DDL happens:
    Postgres's plan cache compares a prepared statement's result type at each use, and a
    statement without one has nothing to compare. Errs towards False: a leading comment,
    or ``returning`` anywhere in the text (even in a string), says it may."""
    low = query.strip().lower()
    if low[:6] in _ROWLESS_HEADS and low[6:7].isspace():
        return b"returning" not in low
    return low.rstrip(b"; \t\r\n") in _TRANSACTION_ENDS


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


NAMEDATALEN = 64


def channel_key(name: str) -> bytes:
    """A channel name as Postgres keeps it: truncated to NAMEDATALEN - 1 bytes on a
    character boundary, as it truncates every identifier."""
    data = name.encode("utf-8")
    if len(data) < NAMEDATALEN:
        return data
    return data[: NAMEDATALEN - 1].decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True, slots=True)
class Effects:
    """Everything the session needs to know about one statement text, found once."""

    pin: str | None = None
    listen: tuple[tuple[str, bytes | None], ...] = ()  # (op, channel key or None for *)
    sets: bool = False
    resets: tuple[str, ...] = ()
    drops: bool = False
    custom: frozenset[str] = frozenset()
    unpins: bool = False
    prepared: bool = False  # mentions PREPARE/EXECUTE/DEALLOCATE
    # Databases it needs no one else connected to (DROP, RENAME, TEMPLATE of, SET TABLESPACE).
    vacates: tuple[str, ...] = ()
    # May change what a new session starts from (see changes_logins).
    logins: bool = False
    # Reads the session's sequence state: currval() or lastval().
    sequences: bool = False
    # Writes it: nextval() or setval() called by name (an INSERT's column default shows
    # in its CommandComplete instead, see BackendLink.data_received).
    advances: bool = False


PLAIN = Effects()
# A statement mentioning none of these does nothing to its session beyond its result.
_ANY_EFFECT = tuple(dict.fromkeys((
    b"set", b"prepare", b"listen", b"load", b"hold", b"temp", b"advisory", b"discard",
    b"execute", b"deallocate", b"database", b"role", b"user", b"group", b"system", b"reload",
    b"currval", b"lastval", b"nextval", b"setval", *_MIGHT_UNPIN)))
# Lower-case, and every digit as 0, in one pass: texts that differ only in the values
# of their numbers (most generated queries) share one shape. No keyword above has a
# digit, so a shape without keywords comes from a text without them; and whether a
# statement does anything to its session depends on its kind and the functions and
# names it uses, not on which digits its literals and names hold (digits are kept as
# digits, so pg_temp1 and pg_temp stay apart).
_SHAPE_TABLE = bytes.maketrans(bytes(range(65, 91)) + b"123456789",
                               bytes(range(97, 123)) + b"000000000")
_PLAIN_SHAPES: dict[bytes, None] = {}
_PLAIN_SHAPES_MAX = 8192


def effects(sql: bytes) -> Effects:
    """The pin reason, LISTEN ops, settings effects and unpin hint of ``sql``.

    The hot path: a text whose shape was seen to be plain costs one translate and a
    dict lookup, not a keyword scan (nor a parse, for an UPDATE ... SET)."""
    shape = sql.translate(_SHAPE_TABLE)
    if shape in _PLAIN_SHAPES:
        return PLAIN
    fx = _effects(sql) if any(word in shape for word in _ANY_EFFECT) else PLAIN
    if fx is PLAIN:
        if len(_PLAIN_SHAPES) >= _PLAIN_SHAPES_MAX:
            _PLAIN_SHAPES.clear()
        _PLAIN_SHAPES[shape] = None
    return fx


@lru_cache(maxsize=8192)
def _effects(sql: bytes) -> Effects:
    low = sql.lower()
    sets = changes_settings(sql)
    fx = Effects(
        pin=pin_reason(sql),
        listen=tuple((op, None if ch is None else channel_key(ch))
                     for op, ch in listen_ops(sql)),
        sets=sets,
        resets=reset_targets(sql) if sets else (),
        drops=drops_statements(sql),
        custom=frozenset(custom_setting_names(sql)) if sets else frozenset(),
        unpins=might_unpin(sql),
        prepared=b"prepare" in low or b"execute" in low or b"deallocate" in low,
        vacates=vacated_databases(sql) if b"database" in low else (),
        logins=changes_logins(sql),
        sequences=b"currval" in low or b"lastval" in low,
        advances=b"nextval" in low or b"setval" in low,
    )
    return PLAIN if fx == PLAIN else fx  # (callers test ``is PLAIN``)


def vacated_databases(sql: bytes) -> tuple[str, ...]:
    """Databases that ``sql`` needs without other sessions: pgfleet's idle pooled
    backends there must go first, or Postgres refuses (55006, "is being accessed by
    other users")."""
    tree = _parse_tree(sql)
    if tree is None:
        return ()
    out: list[str] = []
    for raw in tree.get("stmts", ()):
        stmt = raw.get("stmt", {})
        if "DropdbStmt" in stmt:
            out.append(stmt["DropdbStmt"]["dbname"])
        elif stmt.get("RenameStmt", {}).get("renameType") == "OBJECT_DATABASE":
            out.append(stmt["RenameStmt"]["subname"])
        elif "CreatedbStmt" in stmt or "AlterDatabaseStmt" in stmt:
            node = stmt.get("CreatedbStmt") or stmt["AlterDatabaseStmt"]
            wanted = "template" if "CreatedbStmt" in stmt else "tablespace"
            if wanted == "template" and not any(
                o.get("DefElem", {}).get("defname") == "template" for o in node.get("options") or ()
            ):
                out.append("template1")  # CREATE DATABASE copies template1 by default
            for opt in node.get("options") or ():
                elem = opt.get("DefElem", {})
                if elem.get("defname") == wanted:
                    if wanted == "template":
                        value = elem.get("arg", {}).get("String", {}).get("sval")
                        if value:
                            out.append(value)
                    else:
                        out.append(node["dbname"])
    return tuple(out)
