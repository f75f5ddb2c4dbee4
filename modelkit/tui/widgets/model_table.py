"""The library table: every indexed file, filtered and sorted, with marks
for compare. Row keys are file paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from modelkit.library.check import Hint
from modelkit.library.query import Entry
from modelkit.tui import rows

WIDE_COLUMNS = 90  # table width from which the hash column is shown
FULL_COLUMNS = 130  # ... and the variant and key-layout columns
HINTS_MAX = 24  # the hints column grows to its longest cell up to this
NAME_MIN = 24  # ... while the name column keeps this much (or its longest name)
MARK = "●"


class ModelTable(DataTable[Any]):
    """A :class:`DataTable` over library entries."""

    @dataclass
    class EntryHighlighted(Message):
        """The cursor moved to ``entry`` (None: the table is empty)."""

        entry: Entry | None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.entries: list[Entry] = []
        self.hints: dict[str, list[Hint]] = {}
        self.marked: list[str] = []
        self.query_text = ""
        self.sort_column = "name"
        self.sort_reverse = False
        self.shown: list[Entry] = []
        self._wide: bool | None = None
        self._width = 0

    @property
    def wide(self) -> bool:
        return (self.size.width or self.app.size.width) >= WIDE_COLUMNS

    @property
    def full(self) -> bool:
        """Wide enough for the variant and key-layout columns."""
        return (self.size.width or self.app.size.width) >= FULL_COLUMNS

    def set_entries(self, entries: list[Entry], hints: dict[str, list[Hint]]) -> None:
        """Replace the data (after a scan or reload), keeping the cursor's file."""
        self.entries, self.hints = entries, hints
        known = {e.path for e in entries}
        self.marked = [p for p in self.marked if p in known]
        self.refresh_rows()

    def set_query(self, text: str) -> None:
        self.query_text = text
        self.refresh_rows()

    def cycle_sort(self, reverse: bool = False) -> str:
        """Sort by the next column (or flip the order); returns the column."""
        if reverse:
            self.sort_reverse = not self.sort_reverse
        else:
            cols = rows.columns(self.wide, self.full)
            i = cols.index(self.sort_column) if self.sort_column in cols else -1
            self.sort_column = cols[(i + 1) % len(cols)]
            self.sort_reverse = False
        self.refresh_rows()
        return self.sort_column

    def sort_by(self, column: str) -> None:
        """Sort by ``column``; again on the same column flips the order."""
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self.refresh_rows()

    @property
    def selected(self) -> Entry | None:
        if not self.shown or not (0 <= self.cursor_row < len(self.shown)):
            return None
        return self.shown[self.cursor_row]

    def toggle_mark(self) -> list[str]:
        """Mark or unmark the selected file; marks keep their order (an
        Act merge takes them as A, B, C)."""
        entry = self.selected
        if entry is None:
            return self.marked
        if entry.path in self.marked:
            self.marked.remove(entry.path)
        else:
            self.marked = [*self.marked, entry.path]
        self.refresh_rows()
        return self.marked

    def select_path(self, path: str) -> bool:
        """Move the cursor to ``path``; False when it is not shown."""
        paths = [e.path for e in self.shown]
        if path not in paths:
            return False
        self.move_cursor(row=paths.index(path))
        return True

    def compare_pair(self) -> tuple[str, str] | str:
        """The two files to compare (the marked ones, or the one marked and
        the cursor's), or why there are none."""
        pair = list(self.marked)
        if len(pair) == 1 and self.selected is not None and self.selected.path != pair[0]:
            pair.append(self.selected.path)
        if len(pair) > 2:
            return f"compare takes two files; {len(pair)} are marked (m unmarks)"
        if len(pair) != 2:
            return "mark two files with m (or one, then move to another), then press c"
        kinds = {e.kind for e in self.entries if e.path in pair}
        if len(kinds) != 1 or kinds & {"broken", "unknown"}:
            return ("compare needs two readable files of the same kind (two checkpoints, "
                    "two LoRAs, ...)")
        return pair[0], pair[1]

    def _widths(self, cols: tuple[str, ...], names: list[str], hints: list[str]
                ) -> dict[str, int]:
        """Column widths for the table's width: the name column takes what
        the others leave; the hints column grows to its longest cell (up to
        :data:`HINTS_MAX`) while the names still fit (or keep
        :data:`NAME_MIN` columns)."""
        widths = {c: rows.WIDTHS[c] for c in cols if c != "name"}
        pad = 2 * self.cell_padding
        fixed = 1 + pad + sum(w + pad for w in widths.values()) + pad
        avail = (self.size.width or self.app.size.width) - fixed - 2  # 2: scrollbar
        longest = max((len(n) for n in names), default=4) + 2  # room for the sort arrow
        wanted = min(HINTS_MAX, max((len(h) for h in hints), default=0))
        grow = max(0, min(wanted - widths["hints"], avail - min(longest, NAME_MIN)))
        widths["hints"] += grow
        widths["name"] = max(12, min(avail - grow, longest))
        return widths

    def _build_columns(self, names: list[str], hints: list[str]) -> int:
        """Columns for the current width; returns the name column's width."""
        self.clear(columns=True)
        self.add_column(" ", key="mark", width=1)
        cols = rows.columns(self.wide, self.full)
        widths = self._widths(cols, names, hints)
        for key in cols:
            label = key + (" ▼" if self.sort_reverse else " ▲") \
                if key == self.sort_column else key
            self.add_column(label, key=key, width=widths[key])
        self._wide = self.wide
        self._width = self.size.width
        return widths["name"]

    def refresh_rows(self) -> None:
        """Rebuild the rows from the data, filter and sort order."""
        keep = self.selected.path if self.selected else None
        query = rows.parse_filter(self.query_text)
        shown = [e for e in self.entries if rows.matches(e, query, self.hints.get(e.path, ()))]
        shown.sort(key=rows.sort_key(self.sort_column, self.hints), reverse=self.sort_reverse)
        self.shown = shown
        name_width = self._build_columns([rows.display_name(e) for e in shown],
                                         [rows.hint_cell(self.hints.get(e.path, ()))
                                          for e in shown])
        wide, full = self.wide, self.full
        for e in shown:
            mark = Text(MARK, style="bold") if e.path in self.marked else ""
            hints = self.hints.get(e.path, [])
            cells = [Text(c) for c in rows.row_cells(e, hints, wide, full)]
            cells[0].truncate(name_width, overflow="ellipsis")
            if hints:
                cells[-1].stylize("red" if any(h.severity == "error" for h in hints)
                                  else "yellow")
            self.add_row(mark, *cells, key=e.path)
        if keep is not None and any(e.path == keep for e in shown):
            self.move_cursor(row=[e.path for e in shown].index(keep))
        self.post_message(self.EntryHighlighted(self.selected))

    def on_resize(self) -> None:
        if self._wide is not None and (self._wide != self.wide or
                                       self._width != self.size.width):
            self.refresh_rows()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.EntryHighlighted(self.selected))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        key = str(event.column_key.value)
        if key != "mark":
            self.sort_by(key)
