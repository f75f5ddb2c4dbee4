"""Make strings that come from files safe to show in a terminal.

File names, tensor key names and ``__metadata__`` values are written by
whoever made the file. Printed as they are, an ESC byte could move the cursor,
retitle the window or hide text, and a bidi override could reorder what the
user reads. :func:`safe_text` escapes every such character visibly.
"""

from __future__ import annotations

import unicodedata

# bidi embeddings, overrides and isolates reorder the text around them
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


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
    if ch in _BIDI:
        return True
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Zl", "Zp")


def safe_text(value: object, *, keep_newlines: bool = False) -> str:
    """``str(value)`` with control characters (C0, DEL, C1), line and
    paragraph separators and bidi controls escaped as ``\\xNN``/``\\uNNNN``.
    ``keep_newlines`` leaves ``\\n`` as is, for multi-line blocks."""
    text = str(value)
    if text.isprintable() and not any(ch in _BIDI for ch in text):
        return text
    return "".join(
        ch if (keep_newlines and ch == "\n") or not _unsafe(ch) else _escape(ch)
        for ch in text)
