"""SQL literal and identifier quoting for the few statements pgfleet writes itself.

Values come from clients (startup parameters, role names), so they are always
quoted here, never interpolated raw. ``E''`` literals are used because they mean
the same thing whatever ``standard_conforming_strings`` the session has set.
"""

from __future__ import annotations


def quote_literal(value: str) -> str:
    """Quote ``value`` as an escape-string literal that is safe in any session."""
    if "\x00" in value:
        raise ValueError("NUL byte in SQL literal")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """Quote one identifier, keeping its case and any odd characters."""
    if "\x00" in name:
        raise ValueError("NUL byte in SQL identifier")
    return '"' + name.replace('"', '""') + '"'


def quote_guc_name(name: str) -> str:
    """Quote a (possibly dotted, ``ext.setting``) configuration parameter name."""
    return ".".join(quote_ident(part) for part in name.split("."))
