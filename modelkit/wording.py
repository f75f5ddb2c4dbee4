"""Small helpers for text written for people: counts with the right noun
form, the right article, and cutting a value at a word boundary.

``plural(1, "tensor")`` is ``1 tensor``; ``with_article("sdxl")`` is ``an sdxl``;
``fit_words("tensors 686, mismatched 3", 18)`` is ``tensors 686...``.
Every message, report and table that says how many of something, or "a"
something whose name comes from data, uses these.
"""

from __future__ import annotations

import re

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
