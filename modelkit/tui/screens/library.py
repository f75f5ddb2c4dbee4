"""The main screen: the filterable, sortable library table, the detail pane
of the selected file, and the status line with the running job."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input

from modelkit.library.check import Hint
from modelkit.library.query import Entry
from modelkit.progress import ProgressFn
from modelkit.tui import jobs
from modelkit.tui.messages import (
    DetailLoaded,
    JobFailed,
    JobFinished,
    JobProgress,
    LibraryChanged,
    LibraryLoaded,
)
from modelkit.tui.screens.act import ActScreen
from modelkit.tui.screens.compare import CompareScreen
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.widgets.detail import TABS, DetailPane
from modelkit.tui.widgets.job_bar import JobBar
from modelkit.tui.widgets.model_table import ModelTable

NARROW_COLUMNS = 140  # below this width the detail pane goes under the table
DEBOUNCE_ROWS = 500  # from this many files, the filter waits for a typing pause
DEBOUNCE_S = 0.15
JobFn = Callable[[ProgressFn, threading.Event], Any]


class LibraryScreen(Screen[None]):
    """Browse the library: table, detail pane, status line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "Filter", id="filter",
                tooltip="Filter: words, kind:lora arch:sdxl pred:v has:hint"),
        Binding("m,space", "mark", "Mark", id="mark",
                tooltip="Mark files to compare (two) or act on (in order: A, B, C)"),
        Binding("c", "compare", "Compare", id="compare",
                tooltip="Compare the marked files per component and block"),
        Binding("a", "act", "Act", id="act",
                tooltip="Merge, bake, prune, quantize or extract the marked or selected files"),
        Binding("s", "sort", "Sort", id="sort", tooltip="Sort by the next column"),
        Binding("S", "sort(True)", "Reverse sort", show=False, id="sort-reverse"),
        Binding("r", "rescan", "Rescan", id="rescan", tooltip="Re-scan (reads changed files only)"),
        Binding("h", "hash", "Hash", id="hash", tooltip="Hash the marked or selected file"),
        Binding("H", "hash(True)", "Hash all shown", show=False, id="hash-all"),
        Binding("x", "cancel", "Cancel", id="cancel", tooltip="Cancel the running job"),
        Binding("escape", "back", "Back", show=False, id="back"),
        *(Binding(str(i), f"tab('{t}')", t.title(), show=False, id=f"tab-{t}")
          for i, t in enumerate(TABS, 1)),
        Binding("question_mark", "app.help", "Help", id="help"),
        Binding("q", "app.quit", "Quit", id="quit"),
    ]

    def __init__(self, dirs: list[str], db: str | None, images: bool = True) -> None:
        super().__init__()
        self.dirs = [os.path.abspath(d) for d in dirs]
        self.db = db
        self.images = images
        self.cancel_event = threading.Event()
        self.job: str | None = None
        self.last_result = ""  # how the last job ended, kept on the status line
        self._filter_timer: Timer | None = None
        self.select_after: str | None = None  # a new file to select once indexed
        self.scan_after: list[str] = []  # folders to index when the running job ends

    def compose(self) -> ComposeResult:
        # the layout class from the start: set after mount it restyles every widget
        self.set_class(self.app.size.width < NARROW_COLUMNS, "narrow")
        yield Input(placeholder="/ filter: words  kind:lora  arch:sdxl  pred:v  has:hint",
                    id="filter")
        with Horizontal(id="main"):
            yield ModelTable(id="table")
            yield DetailPane(self.images, id="detail")
        yield JobBar(id="jobbar")
        yield Footer(compact=True)

    @property
    def table(self) -> ModelTable:
        return self.query_one(ModelTable)

    def on_mount(self) -> None:
        self.table.focus()
        self.query_one(JobBar).status("reading the library index...")
        if self.dirs:
            self.start_job("scan", "scanning", jobs.scan_job(self.dirs, self.db))
        else:
            self.load_library()

    def on_resize(self) -> None:
        self.set_class(self.size.width < NARROW_COLUMNS, "narrow")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Grey out what cannot run now."""
        if action == "cancel":
            return self.job is not None
        if action in ("rescan", "hash"):
            return self.job is None or None
        return True

    # --- jobs ------------------------------------------------------------

    def start_job(self, job: str, label: str, fn: JobFn) -> bool:
        """Run ``fn`` in a thread worker, one job at a time."""
        if self.job is not None:
            self.notify(f"{self.job} is running; press x to cancel it", severity="warning")
            return False
        self.job = job
        self.cancel_event = threading.Event()
        self.query_one(JobBar).start(job, label)
        self.refresh_bindings()
        self.run_job_worker(job, fn, self.cancel_event)
        return True

    @work(thread=True, exclusive=True, group="job", exit_on_error=False,
          description="Library job")
    def run_job_worker(self, job: str, fn: JobFn, cancel: threading.Event) -> None:
        jobs.run_job(self, job, fn, cancel)

    def on_job_progress(self, message: JobProgress) -> None:
        if message.job == self.job:
            self.query_one(JobBar).advance(message.progress)

    def on_job_finished(self, message: JobFinished) -> None:
        self._job_ended()
        result = message.result
        if message.job == "scan":
            self.last_result = (f"scanned {result.found}: {result.new} new, {result.changed} "
                                f"changed, {result.removed} removed, {result.broken} broken")
            if result.sweeps_skipped:  # sweep cells are not library files
                self.last_result += f", {result.sweeps_skipped} sweep folder" + \
                    f"{'s' if result.sweeps_skipped > 1 else ''} skipped"
        elif message.job == "hash":
            self.last_result = f"hashed {result} files"
        self.query_one(JobBar).stop(self.last_result)
        self.load_library()

    def on_job_failed(self, message: JobFailed) -> None:
        if message.job != self.job:  # reading the index or one file's details
            self.app.push_screen(ErrorDialog(message.error))
            return
        self._job_ended()
        self.last_result = f"{message.job} {'cancelled' if message.cancelled else 'failed'}"
        self.query_one(JobBar).stop(self.last_result)
        if not message.cancelled:
            self.app.push_screen(ErrorDialog(message.error))
        self.load_library()  # what the job indexed before it stopped

    def _job_ended(self) -> None:
        self.job = None
        self.refresh_bindings()
        if self.scan_after:
            folders, self.scan_after = self.scan_after, []
            self.call_later(self.start_job, "scan", "indexing new files",
                            jobs.scan_job(folders, self.db))

    def on_library_changed(self, message: LibraryChanged) -> None:
        """Files were written (e.g. by an Act job): re-scan their folders
        (after the running job, if any) and select the first new file."""
        folders = sorted({os.path.dirname(os.path.abspath(p)) for p in message.paths})
        if message.paths:
            self.select_after = os.path.abspath(message.paths[0])
        if self.job is not None:
            self.scan_after = sorted({*self.scan_after, *folders})
        elif folders:
            self.start_job("scan", "indexing new files", jobs.scan_job(folders, self.db))

    # --- loading ---------------------------------------------------------

    @work(thread=True, exclusive=True, group="load", exit_on_error=False,
          description="Reading the library index")
    def load_library(self) -> None:
        try:
            jobs.load_library(self, self.db, self.dirs)
        except Exception as exc:
            self.post_message(JobFailed("load", jobs.error_line(exc)))

    def on_library_loaded(self, message: LibraryLoaded) -> None:
        self.table.set_entries(message.entries, message.hints)
        self._select_new_file()
        self._show_counts()
        if not message.entries:
            self.query_one(DetailPane).clear_detail(
                "the library is empty: run 'modelkit tui DIR' or 'modelkit library scan "
                "DIR' with your model folders")

    def _show_counts(self) -> None:
        table = self.table
        if self.job is not None:
            return
        order = f"{table.sort_column} {'desc' if table.sort_reverse else 'asc'}"
        marked = f", {len(table.marked)} marked" if table.marked else ""
        last = f"; {self.last_result}" if self.last_result else ""
        self.query_one(JobBar).stop(f"{len(table.shown)} of {len(table.entries)} files, "
                                    f"sorted by {order}{marked}{last}  (? help)")

    @on(ModelTable.EntryHighlighted)
    def entry_highlighted(self, message: ModelTable.EntryHighlighted) -> None:
        entry = message.entry
        detail = self.query_one(DetailPane)
        if entry is None:
            if self.table.entries:
                detail.clear_detail("no file matches the filter")
            return
        if entry.path != detail.path:
            self.load_detail(entry, self.table.hints.get(entry.path, []))

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False,
          description="Reading one file's details")
    def load_detail(self, entry: Entry, hints: list[Hint]) -> None:
        try:
            jobs.load_detail(self, self.db, entry.path, hints)
        except Exception as exc:
            self.post_message(JobFailed("detail", jobs.error_line(exc)))

    def on_detail_loaded(self, message: DetailLoaded) -> None:
        selected = self.table.selected
        if selected is not None and selected.path == message.path:
            self.query_one(DetailPane).show(message)

    def _select_new_file(self) -> None:
        """Move the cursor to the file an Act job wrote, clearing a filter
        that hides it."""
        path = self.select_after
        if path is None or not any(e.path == path for e in self.table.entries):
            return
        self.select_after = None
        if not self.table.select_path(path):
            self.query_one("#filter", Input).value = ""
            self._apply_filter("")
            self.table.select_path(path)

    # --- actions ---------------------------------------------------------

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        if len(self.table.entries) < DEBOUNCE_ROWS:
            self._apply_filter(event.value)
        else:  # rebuilding thousands of rows per key press would lag the typing
            self._filter_timer = self.set_timer(DEBOUNCE_S,
                                                lambda: self._apply_filter(event.value))

    def _apply_filter(self, text: str) -> None:
        self._filter_timer = None
        self.table.set_query(text)
        self._show_counts()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self) -> None:
        self.table.focus()

    @on(DataTable.RowSelected)
    def row_selected(self) -> None:
        self.set_class(not self.has_class("detail-only"), "detail-only")
        if self.has_class("detail-only"):
            self.query_one(DetailPane).focus_content()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_back(self) -> None:
        if self.has_class("detail-only"):
            self.remove_class("detail-only")
        self.table.focus()

    def action_tab(self, tab: str) -> None:
        detail = self.query_one(DetailPane)
        detail.active = tab
        if self.has_class("detail-only"):
            detail.focus_content()

    def action_sort(self, reverse: bool = False) -> None:
        self.table.cycle_sort(reverse)
        self._show_counts()

    def action_mark(self) -> None:
        self.table.toggle_mark()
        self._show_counts()

    def action_compare(self) -> None:
        pair = self.table.compare_pair()
        if isinstance(pair, str):
            self.notify(pair, severity="warning")
        else:
            self.app.push_screen(CompareScreen(*pair))

    def action_act(self) -> None:
        """The Act screen for the marked files (in marking order), or the
        selected one."""
        table = self.table
        by_path = {e.path: e for e in table.entries}
        chosen = [by_path[p] for p in table.marked if p in by_path] or \
            [e for e in (table.selected,) if e is not None]
        usable = [e for e in chosen if e.kind not in ("broken", "unknown")]
        if not usable:
            self.notify("select or mark readable model files first (m marks)",
                        severity="warning")
            return
        if len(usable) < len(chosen):
            self.notify(f"left out {len(chosen) - len(usable)} broken or unknown files",
                        severity="warning")
        self.app.push_screen(ActScreen(usable, self))

    def action_rescan(self) -> None:
        dirs = self.dirs or sorted({e.root for e in self.table.entries})
        if not dirs:
            self.notify("nothing to re-scan: start with 'modelkit tui DIR'", severity="warning")
            return
        self.start_job("scan", "scanning", jobs.scan_job(dirs, self.db))

    def action_hash(self, every: bool = False) -> None:
        """Hash the marked files, or the selected one (every shown file
        with ``every``) that have no hash yet."""
        table = self.table
        if every:
            wanted = table.shown
        else:
            wanted = [e for e in table.entries if e.path in table.marked] or \
                [e for e in (table.selected,) if e is not None]
        paths = [e.path for e in wanted if e.sha256 is None and e.kind != "broken"]
        if not paths:
            self.notify("already hashed" if wanted else "no file selected")
            return
        self.start_job("hash", f"hashing {len(paths)} files", jobs.hash_job(paths, self.db))

    def action_cancel(self) -> None:
        self.cancel_event.set()
