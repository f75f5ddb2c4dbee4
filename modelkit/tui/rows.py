"""What the library table shows: the filter language, sorting and the cells
of each row. Plain Python (no textual import), so it is tested directly.

Filter text: words match the file name or folder (any case, all must
match); ``key:value`` terms narrow by field, ``,`` separates alternatives:
``kind:lora arch:sdxl,sd1 pred:v dtype:f16 variant:dev layout:diffusers has:ema
has:hint has:preview has:hash``. ``k:``, ``a:``, ``p:`` and ``v:`` abbreviate kind,
arch, pred and variant; ``layout:`` is the key names (``original``,
``diffusers``), not the UI folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from modelkit.arch import registry
from modelkit.library.check import Hint
from modelkit.library.query import Entry
from modelkit.textsafe import safe_text
from modelkit.wording import human_bytes

KIND_SHORT = {"checkpoint": "ckpt", "embedding": "embed", "controlnet": "cnet",
              "text_encoder": "te", "unknown": "?"}
ARCH_SHORT = {**{a.name: a.short for a in registry.REGISTRY.values() if a.short != a.name},
              registry.UNKNOWN: "?"}
KEY_ALIASES = {"k": "kind", "kind": "kind", "a": "arch", "arch": "arch", "p": "pred",
               "pred": "pred", "prediction": "pred", "dtype": "dtype", "d": "dtype",
               "has": "has", "v": "variant", "variant": "variant", "layout": "layout"}
SORT_COLUMNS = ("name", "kind", "arch", "variant", "layout", "pred", "size", "dtype", "hash",
                "hints")
HAS_TERMS = ("ema", "hint", "hints", "preview", "hash", "error")


@dataclass(frozen=True)
class Query:
    """A parsed filter."""

    words: tuple[str, ...] = ()
    fields: dict[str, frozenset[str]] = field(default_factory=dict)
    has: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.words and not self.fields and not self.has


def _long_kind(value: str) -> str:
    for long, short in KIND_SHORT.items():
        if value == short:
            return long
    return value


def parse_filter(text: str) -> Query:
    """Parse the filter box's text (never fails: unknown terms are words)."""
    words: list[str] = []
    fields: dict[str, set[str]] = {}
    has: set[str] = set()
    for token in text.lower().split():
        key, sep, value = token.partition(":")
        name = KEY_ALIASES.get(key)
        if not sep or name is None or not value:
            words.append(token)
        elif name == "has":
            has.update(v.rstrip("s") if v == "hints" else v for v in value.split(",") if v)
        else:
            values = {_long_kind(v) if name == "kind" else v for v in value.split(",") if v}
            fields.setdefault(name, set()).update(values)
    return Query(tuple(words), {k: frozenset(v) for k, v in fields.items()}, frozenset(has))


def _field_value(e: Entry, name: str) -> str:
    if name == "kind":
        return e.kind
    if name == "arch":
        return e.arch
    if name == "pred":
        return e.prediction or "-"
    if name == "variant":
        return (e.variant or "-").lower()
    if name == "layout":
        return e.key_layout or "-"
    return (e.dtype or "-").lower()


def _has(e: Entry, term: str, hints: Sequence[Hint]) -> bool:
    return {"ema": e.has_ema, "hint": bool(hints), "preview": bool(e.previews),
            "hash": e.sha256 is not None, "error": e.kind == "broken"}.get(term, False)


def matches(e: Entry, q: Query, hints: Sequence[Hint] = ()) -> bool:
    """Whether entry ``e`` passes filter ``q``."""
    haystack = f"{e.name}\n{e.folder}".lower()
    if any(w not in haystack for w in q.words):
        return False
    for name, values in q.fields.items():
        value = _field_value(e, name)
        if value not in values and not (name == "arch" and
                                        ARCH_SHORT.get(value) in values):
            return False
    return all(_has(e, term, hints) for term in q.has)


def name_key(name: str) -> tuple[list[str | int], str]:
    """How file names sort: by the stem (the file extension is no part of
    it), case-insensitively, numbers by value (``sd2`` before ``sd15``), so
    a name comes before its longer extensions (``tiny-sd15`` before
    ``tiny-sd15-mix``); the whole name breaks ties."""
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    parts: list[str | int] = [int(p) if i % 2 else p
                              for i, p in enumerate(_DIGITS.split(stem.casefold()))]
    return parts, name


_DIGITS = re.compile(r"(\d+)")


def sort_key(column: str, hints: dict[str, list[Hint]]
             ) -> Callable[[Entry], tuple[object, object, str]]:
    """A key function sorting entries by ``column`` (the name, then the
    path, break ties)."""
    def key(e: Entry) -> tuple[object, object, str]:
        value: object = 0 if column == "name" else {
            "kind": e.kind, "arch": e.arch, "variant": e.variant or "~",
            "layout": e.key_layout or "~", "pred": e.prediction or "~", "size": e.size,
            "dtype": e.dtype or "~",
            "hash": e.sha256 or "~", "hints": -len(hints.get(e.path, ())),
        }[column]
        return value, name_key(e.name), e.path
    return key


def hint_cell(hints: Sequence[Hint]) -> str:
    """The table's hint column: the first hint's code, and how many more."""
    if not hints:
        return ""
    more = f" +{len(hints) - 1}" if len(hints) > 1 else ""
    return f"{hints[0].code}{more}"


def display_name(e: Entry) -> str:
    """The file name without ``.safetensors`` (other extensions stay, so a
    legacy pickle stands out), escaped."""
    name = e.name[:-len(".safetensors")] if e.name.endswith(".safetensors") else e.name
    return safe_text(name)


def row_cells(e: Entry, hints: Sequence[Hint], wide: bool, full: bool = False
              ) -> tuple[str, ...]:
    """The cells of ``e``'s row, strings from the file escaped; ``wide``
    adds the hash column, ``full`` the variant and key-layout columns."""
    cells = [display_name(e), KIND_SHORT.get(e.kind, e.kind), ARCH_SHORT.get(e.arch, e.arch)]
    if full:
        cells += [e.variant or "-", e.key_layout or "-"]
    cells += [e.prediction or "-", human_bytes(e.size, 1).replace(" ", ""),
              (e.dtype or "-").lower()]
    if wide:
        cells.append(e.short_hash or "-")
    cells.append(hint_cell(hints))
    return tuple(cells)


# widths of every column but the name, which takes the rest
WIDTHS = {"kind": 5, "arch": 6, "variant": 11, "layout": 9, "pred": 4, "size": 7, "dtype": 5,
          "hash": 10, "hints": 11}


def columns(wide: bool, full: bool = False) -> tuple[str, ...]:
    """Column keys in display order (the mark column comes first); ``full``
    adds the variant and key layout after the arch."""
    cols = ["name", "kind", "arch", *(("variant", "layout") if full else ()), "pred", "size",
            "dtype"]
    if wide:
        cols.append("hash")
    return (*cols, "hints")
