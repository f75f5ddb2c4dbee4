"""Strings from files, made safe to print on a terminal.

Metadata values, key names and file names come from files anyone can
upload; printed raw, a control sequence in them can retitle the window,
clear the screen or forge report lines. :func:`shown` escapes them.
"""

from __future__ import annotations

import unicodedata


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Cs", "Cf") or (cat.startswith("Z") and ch != " ")


def shown(text: object, limit: int | None = None) -> str:
    """``text`` with control, format (bidi) and surrogate characters escaped
    and, with ``limit``, cut to about that many characters with ``...``."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[:max(0, limit - 3)] + "..."
    return "".join(_escape(c) if _unsafe(c) else c for c in s)
