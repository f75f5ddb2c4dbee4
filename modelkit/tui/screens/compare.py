"""Compare two files: how far B moved from A per component and per merge
block (relative L2), computed in a thread worker with progress and cancel."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from modelkit.tui import jobs
from modelkit.tui.messages import JobFailed, JobFinished, JobProgress
from modelkit.tui.render import compare_tables, safe
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.widgets.job_bar import JobBar

JOB = "compare"


class CompareScreen(Screen[None]):
    """B against A (the reference)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "cancel", "Cancel", id="cancel-compare"),
        Binding("escape,q", "back", "Back", id="back"),
        Binding("question_mark", "app.help", "Help", id="compare-help"),
    ]

    def __init__(self, a: str, b: str) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.cancel_event = threading.Event()
        self.report: Any = None

    def compose(self) -> ComposeResult:
        title = Text()
        title.append("A ", style="bold")
        title.append(safe(Path(self.a).name, 70))
        title.append("\nB ", style="bold")
        title.append(safe(Path(self.b).name, 70))
        yield Static(title, id="compare-title")
        with VerticalScroll(id="compare-results"):
            yield Static(Text("comparing...", style="dim"), id="compare-summary")
            yield Static("", id="compare-components")
            yield Static("", id="compare-blocks")
        yield JobBar(id="compare-bar")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(JobBar).start(JOB, "comparing")
        self.query_one("#compare-results").focus()  # arrows and page keys scroll
        self.run_compare()

    def on_unmount(self) -> None:
        self.cancel_event.set()

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False,
          description="Comparing two models")
    def run_compare(self) -> None:
        jobs.run_job(self, JOB, jobs.compare_job(self.a, self.b), self.cancel_event)

    def on_job_progress(self, message: JobProgress) -> None:
        self.query_one(JobBar).advance(message.progress)

    def on_job_finished(self, message: JobFinished) -> None:
        self.report = message.result
        self.query_one(JobBar).stop("done: escape returns to the library")
        self.show_report(message.result)

    def on_job_failed(self, message: JobFailed) -> None:
        summary = self.query_one("#compare-summary", Static)
        if message.cancelled:
            self.query_one(JobBar).stop("cancelled: escape returns to the library")
            summary.update(Text("comparison cancelled", style="yellow"))
            return
        self.query_one(JobBar).stop("failed")
        summary.update(Text(safe(message.error), style="red"))
        self.app.push_screen(ErrorDialog(message.error))

    def show_report(self, report: Any) -> None:
        """Fill the summary and the two tables."""
        summary = Text()
        if report.identical:
            summary.append("identical: same keys, shapes, dtypes and bytes\n", style="green")
        summary.append(f"arch {report.arch}; overall relative L2 "
                       f"{report.overall.relative_l2:.4f}; "
                       f"{100 * report.overall.unchanged_share:.0f}% of "
                       f"{report.overall.n_tensors} tensors unchanged\n")
        for label, keys in (("only in A", report.only_a), ("only in B", report.only_b),
                            ("other shape or dtype", report.mismatched)):
            if keys:
                summary.append(f"{len(keys)} keys {label}, e.g. {safe(keys[0], 80)}\n",
                               style="yellow")
        self.query_one("#compare-summary", Static).update(summary)
        comps, blocks = compare_tables(report)
        self.query_one("#compare-components", Static).update(comps)
        self.query_one("#compare-blocks", Static).update(
            blocks if report.blocks else Text("no block map for this architecture",
                                              style="dim"))

    def action_cancel(self) -> None:
        self.cancel_event.set()

    def action_back(self) -> None:
        self.cancel_event.set()
        self.dismiss()
