"""How modelkit words things for people, in one place for every front end
(the CLI, the TUI, the sweep worker's records): counts with the right noun
form, the right article, cutting a value at a word boundary, sizes,
parameter counts, block-weight tables and the one line an error becomes.

``plural(1, "tensor")`` is ``1 tensor``; ``with_article("sdxl")`` is ``an sdxl``;
``fit_words("tensors 686, mismatched 3", 18)`` is ``tensors 686...``.
Every message, report and table that says how many of something, or "a"
something whose name comes from data, uses these.

Layer 0: plain strings, nothing above :mod:`modelkit.errors` and
:mod:`modelkit.textsafe` is imported; text that came from files or
exceptions passes through :func:`~modelkit.textsafe.shown`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from modelkit.errors import ModelkitError
from modelkit.textsafe import shown

ELLIPSIS = "..."

_IRREGULAR = {"index": "indexes", "child": "children", "person": "people",
              "matrix": "matrices"}
# words that start with a vowel letter but a consonant sound
_CONSONANT_SOUND = re.compile(r"(?:u(?:net|int|ni|s[aeu]|ti|r[aeio])|eu|one\b|once\b)", re.I)
# letters whose name starts with a vowel sound, when read out one by one
_VOWEL_LETTERS = set("aefhilmnorsx")


def plural_of(noun: str) -> str:
    """The plural of an English noun: ``tensor`` ``tensors``, ``entry``
    ``entries``, ``match`` ``matches``, ``index`` ``indexes``."""
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if re.search(r"[^aeiousy]s$", noun):  # already plural: "EMA weights"
        return noun
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    if re.search(r"(?:s|x|z|ch|sh)$", noun):
        return noun + "es"
    return noun + "s"


def plural(n: float, noun: str, many: str | None = None) -> str:
    """``n`` and ``noun`` in the form the count needs: ``1 tensor``,
    ``0 tensors``, ``2 hints``. ``many`` overrides the plural form. An
    ``int`` count is shown with no separator; a float as given."""
    word = noun if n == 1 else (many or plural_of(noun))
    return f"{n} {word}"


def agree(n: float, noun: str, verb_one: str, verb_many: str) -> str:
    """A count, its noun and a verb that agrees: ``agree(1, "key", "matches",
    "match")`` is ``1 key matches``, with 3 ``3 keys match``."""
    return f"{plural(n, noun)} {verb_one if n == 1 else verb_many}"


def noun(n: float, word: str, many: str | None = None) -> str:
    """Only the noun of :func:`plural` (``tensor`` or ``tensors``), for text
    where the number is formatted elsewhere."""
    return word if n == 1 else (many or plural_of(word))


def _initialism(word: str) -> bool:
    """``sdxl``, ``fp16``, ``sd1``, ``CLIP``-like names read letter by letter:
    the letters before the first digit, ``_`` or ``-`` hold no vowel, or the
    word is written in capitals."""
    head = re.split(r"[\d_\-\s.]", word, maxsplit=1)[0]
    if not head:
        return False
    return not re.search(r"[aeiouy]", head, re.I) or (len(head) <= 4 and head.isupper())


def article(word: str) -> str:
    """``a`` or ``an`` for ``word`` by how it is read: ``an sdxl``, ``an
    adapter``, ``a unet``, ``a lora``, ``an 8-bit``, ``an fp16``."""
    w = word.strip().lstrip("'\"`(")
    if not w:
        return "a"
    if w[0].isdigit():
        return "an" if re.match(r"(?:8|11|18)(?!\d)|8\d", w) else "a"
    if _initialism(w):
        return "an" if w[0].lower() in _VOWEL_LETTERS else "a"
    if w[0].lower() in "aeiou" and not _CONSONANT_SOUND.match(w):
        return "an"
    return "a"


def with_article(word: str) -> str:
    """``word`` with its article: ``an sdxl``, ``a checkpoint``."""
    return f"{article(word)} {word}"


a = with_article  # short name for tests and one-off scripts


def fit_words(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` characters at a word boundary, with
    ``...`` where it was cut (a single word longer than the room is cut
    inside it). Text that fits is returned as is."""
    if len(text) <= width:
        return text
    room = width - len(ELLIPSIS)
    if room <= 0:
        return ELLIPSIS[:max(width, 0)]
    cut = text[:room + 1]
    space = cut.rfind(" ")
    head = cut[:space] if space > 0 else text[:room]
    return head.rstrip(" ,;:") + ELLIPSIS


def wrap_words(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces
    (a word longer than a line is cut into pieces)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while len(word) > width:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:width])
            word = word[width:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            lines.append(line)
            line = word
    if line or not lines:
        lines.append(line)
    return lines


__all__ = ["a", "agree", "article", "fit_words", "noun", "plural", "plural_of", "with_article",
           "wrap_words"]


PROGRAM = "modelkit"
DEBUG_HINT = "(set MODELKIT_DEBUG=1 for a traceback and report it)"
BUG_LIMIT = 300  # characters of a bug's message: its type and the start say enough
BLOCKS_PER_ROW = 5  # cells of a block-weight table: 14 columns each, 72 with the indent


def human_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes with a decimal unit: ``2.13 GB``, ``613.21 KB``, ``12 B``."""
    for suffix in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if suffix == "B" else f"{n:.{digits}f} {suffix}"
        n /= 1000
    return f"{n:.{digits}f} TB"


def param_count(n: int | None) -> str:
    """A parameter count: ``859.52 M``, ``3.469 G``; ``-`` when unknown."""
    if n is None:
        return "-"
    return f"{n / 1e6:,.2f} M" if n < 1e9 else f"{n / 1e9:,.3f} G"


def block_rows(weights: Mapping[str, float], indent: str = "  ",
               per_row: int = BLOCKS_PER_ROW) -> list[str]:
    """Block weights as aligned rows of ``NAME value`` cells
    (``IN00  0.5     IN01  0.5 ...``), :data:`BLOCKS_PER_ROW` a row."""
    cells = [f"{name:<5} {value:<7.4g}" for name, value in weights.items()]
    return [(indent + " ".join(cells[i:i + per_row])).rstrip()
            for i in range(0, len(cells), per_row)]


def lora_weights(weight: float, te_weight: float) -> str:
    """The strengths a LoRA is applied at: ``unet 0.8, te 1``."""
    return f"unet {weight:g}, te {te_weight:g}"


def is_bug(exc: BaseException) -> bool:
    """Whether ``exc`` is a bug (anything but a :class:`ModelkitError`, which
    says what is wrong with the input and what to do)."""
    return not isinstance(exc, ModelkitError)


def error_text(exc: BaseException, limit: int | None = None) -> str:
    """``exc`` as one line without the program's name: a
    :class:`ModelkitError` its message; a bug ``internal error: TYPE:
    message`` (cut to :data:`BUG_LIMIT`). Control characters are escaped,
    so the line stays one line; ``limit`` cuts the whole of it."""
    if not is_bug(exc):
        return shown(exc, limit)
    head, message = f"internal error: {type(exc).__name__}", shown(exc, BUG_LIMIT)
    return shown(f"{head}: {message}" if message else head, limit)


def error_line(exc: BaseException) -> str:
    """What a front end shows for an error that ended a command (the CLI on
    stderr, the TUI in its dialog): ``modelkit: error: MESSAGE``, or for a
    bug ``modelkit: internal error: TYPE: message (set MODELKIT_DEBUG=1 ...)``."""
    if is_bug(exc):
        return f"{PROGRAM}: {error_text(exc)} {DEBUG_HINT}"
    return f"{PROGRAM}: error: {error_text(exc)}"
