"""Show text that came from a file (metadata, key names, file names) on a
terminal without letting it act on the terminal.

Model files are downloaded from sites anyone can upload to. A metadata value
holding ``ESC ] 0 ;`` retitles the window, ``ESC ] 52`` writes the clipboard,
a bare CR or a newline overwrites or forges report lines and a bidi override
reorders what is shown. :func:`shown` escapes all of those and cuts long
strings; every human-readable output passes file-derived strings through it.
JSON output needs nothing: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re

ELLIPSIS = "..."
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls, bidi embeddings/overrides/isolates and marks,
# line/paragraph separators, and UTF-16 surrogates (only lone ones reach a str)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                     "\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufeff]")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def shown(text: object, limit: int | None = None) -> str:
    """``text`` (anything; ``str()`` is taken) safe to print on a terminal.

    Control characters, DEL, C1 controls, bidi overrides and lone surrogates
    become visible escapes (``\\n``, ``\\x1b``, ``\\u202e``; an undecodable
    byte of a file name shows as ``\\xff``). With ``limit``, a longer result
    is cut to at most ``limit`` characters ending in ``...``, never inside an
    escape.
    """
    s = text if isinstance(text, str) else str(text)
    if limit is None:
        return _UNSAFE.sub(lambda m: _escape(m.group()), s)
    if len(s) <= limit and _UNSAFE.search(s) is None:
        return s
    # every character shows as at least one, so the first limit+1 decide
    pieces = [_escape(ch) if _UNSAFE.fullmatch(ch) else ch for ch in s[:limit + 1]]
    if len(s) <= limit and sum(len(p) for p in pieces) <= limit:
        return "".join(pieces)
    room, out = max(limit - len(ELLIPSIS), 0), []
    for p in pieces:
        if len(p) > room:
            break
        out.append(p)
        room -= len(p)
    return "".join(out) + ELLIPSIS


def quoted(text: object, limit: int = 80) -> str:
    """``shown(text, limit)`` in single quotes, for names inside messages."""
    return f"'{shown(text, limit)}'"


__all__ = ["quoted", "shown"]


def safe_text(value: object, *, keep_newlines: bool = False) -> str:
    """:func:`shown` without a length limit; ``keep_newlines`` leaves ``\\n``
    as is, for multi-line blocks (a metadata value shown whole)."""
    text = str(value)
    if not keep_newlines:
        return shown(text)
    return "\n".join(shown(line) for line in text.split("\n"))


def markdown_cell(value: object) -> str:
    """:func:`shown` for a markdown table cell or heading: ``|`` escaped
    too, so a file name or a prompt cannot add columns or rows."""
    return shown(value).replace("|", "\\|")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf|nan")
_FORMULA = ("=", "+", "-", "@")


def csv_cell(value: object) -> object:
    """A CSV value as a spreadsheet should take it: numbers as they are,
    text :func:`shown` and, when it starts like a formula (``= + - @``) and
    is not a number, behind a ``'`` so no spreadsheet evaluates it."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = shown(value)
    if text.startswith(_FORMULA) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text
