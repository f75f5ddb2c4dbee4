"""The help screen: every key binding and the filter language."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from modelkit.tui import rows

KEYS = (
    ("Library", (
        ("/", "filter the table (escape returns to the table)"),
        ("up/down, pgup/pgdn", "move through the files"),
        ("enter", "the detail pane alone / back to the table"),
        ("1 2 3 4", "detail tabs: info, metadata, lineage, preview"),
        ("s / S", "sort by the next column / reverse (or click a header)"),
        ("m or space", "mark a file (compare two; act on several, in order)"),
        ("c", "compare the two marked files (or marked + cursor)"),
        ("a", "act on the marked or selected files: merge, bake..."),
        ("r", "re-scan the folders (reads changed files only)"),
        ("h / H", "hash the marked or selected file / every shown file"),
        ("x", "cancel the running job"),
        ("?", "this help"),
        ("q", "quit"),
    )),
    ("Act", (
        ("tab / shift+tab", "next / previous field"),
        ("enter, space", "open a choice list, flip a switch"),
        ("ctrl+p", "preview: plan it (dry run), nothing is read or written"),
        ("ctrl+r", "run: write the new file in the background"),
        ("ctrl+s", "sweep: run the form once per value of the sweep axes "
                   "(alpha = 0.3, 0.5) or a sweep file; shows the table"),
        ("x", "cancel the running job (no file is left)"),
        ("escape", "cancel the running job / back to the library"),
        ("f1", "this help"),
    )),
    ("Sweep", (
        ("up/down", "a cell: its error whole, or its output's path"),
        ("x", "cancel: pending cells never start; no partial file is left; the table "
              "stays"),
        ("escape", "cancel / back to the form"),
    )),
    ("Compare", (
        ("x", "cancel the comparison"),
        ("escape or q", "back to the library"),
    )),
)


def help_text() -> Group:
    """The help page: per screen, the keys and what they do in two aligned
    columns (the second wraps at word boundaries), then the filter syntax."""
    width = max(len(key) for _, keys in KEYS for key, _ in keys)
    parts: list[RenderableType] = []
    for title, keys in KEYS:
        parts.append(Text(title, style="bold underline"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(min_width=width, no_wrap=True, style="bold")
        grid.add_column()
        for key, what in keys:
            grid.add_row(key, what)
        parts += [Padding(grid, (0, 0, 0, 2)), Text()]
    parts.append(Text("Filter", style="bold underline"))
    filters = (rows.__doc__ or "").split("\n\n", 1)[1].strip()
    parts.append(Text(" ".join(filters.replace("``", "").split())))  # wrapped to the box
    return Group(*parts)


class HelpScreen(ModalScreen[None]):
    """Key bindings and filter syntax; any of escape, q or ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "close", "Close", id="close-help"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(help_text(), id="help-text")

    def action_close(self) -> None:
        self.dismiss()
