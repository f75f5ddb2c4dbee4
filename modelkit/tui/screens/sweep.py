"""A sweep started from the Act form: :func:`modelkit.sweep.run_sweep` in a
thread worker with progress (cells done / total, the current cell) and
cancel, and its results table filled as cells finish: one row per cell, one
column per axis and metric, a failed cell's one-line error. At the end the
table is the report's (what ``table.md`` holds) and the paths of
``table.md`` and ``contact_sheet.png`` are shown. The cells are sweep
output, not library files: they are not indexed (the library's scan skips
sweep folders).

A sweep whose planning fails (a bad value: the CLI's one line) closes this
screen with the error, which the Act form shows; nothing was written."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from modelkit.sweep.results import columns as table_columns
from modelkit.sweep.results import row as table_row
from modelkit.sweep.spec import SweepSpec
from modelkit.textsafe import safe_text
from modelkit.tui import jobs
from modelkit.tui.messages import (
    JobFailed,
    JobFinished,
    JobProgress,
    SweepCellDone,
)
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.sweeps import cell_text, files_text, row_detail, shown_columns
from modelkit.tui.widgets.job_bar import JobBar

JOB = "sweep"


class SweepScreen(Screen[str | None]):
    """Runs ``spec`` into ``out_dir`` with ``jobs`` workers and shows the
    table; dismissed with the error line when the sweep could not start."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="sweep-cancel",
                tooltip="Stop: pending cells never start, the running ones stop at their "
                        "next tensor; no partial file is left, the table is kept"),
        Binding("x", "cancel", "Cancel", show=False, id="sweep-cancel-x"),
        Binding("escape", "back", "Back", id="sweep-back"),
        Binding("f1", "app.help", "Help", id="sweep-help"),
    ]

    def __init__(self, spec: SweepSpec, out_dir: Path, jobs: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.out_dir = out_dir
        self.jobs = jobs
        self.cancel_event = threading.Event()
        self.running = False
        self.cells = spec.cells()
        self.records: dict[int, dict[str, Any]] = {}
        self.table_rows: list[dict[str, Any]] = []  # what the table shows
        self.report: Any = None
        self.columns = table_columns(spec.axes, spec.verify is not None)

    def compose(self) -> ComposeResult:
        name = Path(self.spec.source).name
        yield Static(Text(safe_text(f"Sweep ({name}): {len(self.cells)} cells into "
                                    f"{self.out_dir}")), id="sweep-title")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="sweep-table")
        yield Static("", id="sweep-cell")
        yield Static("", id="sweep-files")
        yield JobBar(cancel_key="x or escape", phases=True, id="sweep-bar")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#sweep-files").display = False  # until the sweep ends
        self.fill(self.columns, self.rows())
        self.running = True
        self.query_one(JobBar).start(JOB, f"planning {len(self.cells)} cells")
        self.query_one(DataTable).focus()
        self.refresh_bindings()
        self.run_sweep(self.cancel_event)

    def on_unmount(self) -> None:
        self.cancel_event.set()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.running
        if action == "back":
            return not self.running
        return True

    @work(thread=True, exclusive=True, group="sweep", exit_on_error=False,
          description="Running the sweep")
    def run_sweep(self, cancel: threading.Event) -> None:
        jobs.run_job(self, JOB, jobs.sweep_job(self, self.spec, self.out_dir, self.jobs),
                     cancel)

    # --- the table -------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """The rows known now: finished cells' records, the others pending."""
        out = []
        for cell in self.cells:
            r = table_row(self.spec.axes, cell.index, cell.labels,
                          self.records.get(cell.index))
            if cell.index not in self.records and self.running:
                r["status"] = "pending"
            out.append(r)
        return out

    def fill(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Show ``rows`` (one per cell) under ``columns``."""
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear(columns=True)
        columns = shown_columns(columns)
        for name in columns:
            table.add_column(name, key=name)
        for r in rows:
            table.add_row(*(cell_text(c, r.get(c)) for c in columns), key=str(r["cell"]))
        if rows:
            table.move_cursor(row=min(max(cursor, 0), len(rows) - 1))
        self.table_rows = rows
        self.show_row(table.cursor_row)

    @on(DataTable.RowHighlighted)
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_row(event.cursor_row)

    def show_row(self, index: int) -> None:
        """The highlighted row's error whole, or its output's path."""
        rows = self.table_rows
        axes = [a.name for a in self.spec.axes]
        text = row_detail(rows[index], axes) if 0 <= index < len(rows) else ""
        self.query_one("#sweep-cell", Static).update(text)

    def on_sweep_cell_done(self, message: SweepCellDone) -> None:
        """One cell finished: its row only (a sweep may have thousands)."""
        record = message.record
        index = record["index"]
        self.records[index] = record
        position = next((i for i, r in enumerate(self.table_rows) if r["cell"] == index), None)
        if position is None:
            return
        cell = self.cells[position]
        row = self.table_rows[position] = table_row(self.spec.axes, index, cell.labels, record)
        table = self.query_one(DataTable)
        for name in shown_columns(self.columns):
            table.update_cell(str(index), name, cell_text(name, row.get(name)))
        if table.cursor_row == position:
            self.show_row(position)

    # --- progress and the end -----------------------------------------------------

    def on_job_progress(self, message: JobProgress) -> None:
        if self.running:
            self.query_one(JobBar).advance(message.progress)

    def on_job_finished(self, message: JobFinished) -> None:
        report = self.report = message.result
        self.running = False
        self.records = dict(report.records)
        self.columns = report.columns
        self.fill(report.columns, report.rows())
        files = self.query_one("#sweep-files", Static)
        files.update(files_text(report))
        files.display = True
        done = f"{report.n_ok + report.n_failed}/{len(report.cells)} cells"
        self.query_one(JobBar).stop(
            f"cancelled after {done}; no partial file left; escape returns to the form"
            if report.cancelled else f"done: {done}; escape returns to the form")
        self.refresh_bindings()

    def on_job_failed(self, message: JobFailed) -> None:
        self.running = False
        self.refresh_bindings()
        if message.cancelled:
            self.fill(self.columns, self.rows())
            self.query_one(JobBar).stop("cancelled while planning: nothing was run; escape "
                                        "returns to the form")
        elif not self.records:  # it never started: the form shows why
            self.dismiss(message.error)
        else:
            self.query_one(JobBar).stop("the sweep failed; escape returns to the form")
            self.app.push_screen(ErrorDialog(message.error))

    def action_cancel(self) -> None:
        self.cancel_event.set()

    def action_back(self) -> None:
        self.dismiss(None)
