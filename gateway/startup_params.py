"""Turning a StartupMessage's parameters into the settings a session replays.

Postgres treats every startup parameter other than a few protocol-level ones as a
configuration setting, and parses ``options`` like a command line. pgfleet does
the same, so a driver's parameters are accepted and applied, never refused.
"""

from __future__ import annotations

from pgwire import sqlstate

NOT_SETTINGS = {"user", "database", "options", "replication"}


class StartupParamError(Exception):
    def __init__(self, sqlstate_code: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate_code
        self.message = message


def split_options(options: str) -> list[str]:
    """Split ``options`` on unescaped whitespace; a backslash escapes the next character."""
    words: list[str] = []
    cur: list[str] = []
    have = False
    i = 0
    while i < len(options):
        ch = options[i]
        if ch == "\\" and i + 1 < len(options):
            cur.append(options[i + 1])
            have = True
            i += 2
            continue
        if ch.isspace():
            if have:
                words.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(ch)
            have = True
        i += 1
    if have:
        words.append("".join(cur))
    return words


def _name_value(arg: str, form: str) -> tuple[str, str]:
    """Split ``name=value``; ``form`` is how the option was written (``-c`` or ``--``)."""
    name, eq, value = arg.partition("=")
    if not eq or not name:
        shown = f"-c {arg}" if form == "-c" else f"--{arg}"
        raise StartupParamError(sqlstate.SYNTAX_ERROR, f"{shown} requires a value")
    return name.replace("-", "_"), value


def parse_options(options: str) -> list[tuple[str, str]]:
    """Settings from ``options``: ``-c name=value``, ``-cname=value`` and ``--name=value``."""
    out: list[tuple[str, str]] = []
    words = split_options(options)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c":
            if i + 1 >= len(words):
                raise StartupParamError(sqlstate.SYNTAX_ERROR, "-c requires a value")
            out.append(_name_value(words[i + 1], "-c"))
            i += 2
            continue
        if w.startswith("-c"):
            out.append(_name_value(w[2:], "-c"))
        elif w.startswith("--"):
            out.append(_name_value(w[2:], "--"))
        else:
            raise StartupParamError(
                sqlstate.SYNTAX_ERROR,
                f"invalid command-line argument for server process: {w}",
            )
        i += 1
    return out


def session_settings(params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """All settings a session asks for: lower-cased name -> (name as given, value).

    ``options`` come first and explicit parameters override them, as in Postgres.
    """
    out: dict[str, tuple[str, str]] = {}
    opts = params.get("options")
    if opts:
        for name, value in parse_options(opts):
            out[name.lower()] = (name, value)
    for name, value in params.items():
        if name in NOT_SETTINGS or name.startswith("_pq_."):
            continue
        out[name.lower()] = (name, value)
    return out
