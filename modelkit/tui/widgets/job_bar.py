"""The status line: what the table shows, and the running job's progress
with how to cancel it."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from modelkit.progress import Progress
from modelkit.textsafe import safe_text
from modelkit.wording import human_bytes


def progress_line(p: Progress) -> str:
    """``scan 12/2000 files: name`` or ``hash 1.2 GB/7.0 GB: name``."""
    if p.unit == "bytes":
        amount = f"{human_bytes(p.done, 1)}/{human_bytes(p.total, 1)}"
    else:
        amount = f"{p.done}/{p.total} {p.unit}"
    item = f": {safe_text(p.item)}" if p.item else ""
    return f"{safe_text(p.step)} {amount}{item}"


class JobBar(Horizontal):
    """A status label, and a progress bar while a job runs. With
    ``phases``, a run's phase leads the label and the bar follows the
    event's ``overall`` fraction of the whole run."""

    def __init__(self, cancel_key: str = "x", phases: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.running: str | None = None
        self.cancel_hint = f"  ({cancel_key} cancels)"
        self.phases = phases

    def compose(self) -> ComposeResult:
        yield Label("", id="status")
        yield ProgressBar(total=100, show_eta=False, id="job-progress")

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    def status(self, text: str | Text) -> None:
        """Show ``text`` (never parsed as markup: it may hold file names)."""
        self.query_one("#status", Label).update(Text(text) if isinstance(text, str) else text)

    def start(self, job: str, label: str) -> None:
        """A job started: show the bar and how to cancel."""
        self.running = job
        bar = self.query_one(ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        self.status(label + self.cancel_hint)

    def advance(self, p: Progress) -> None:
        """Show a progress report of the running job."""
        bar = self.query_one(ProgressBar)
        if self.phases and p.overall is not None:
            bar.update(total=1000, progress=round(1000 * p.overall))
            line = progress_line(p)
            phase = "" if line.startswith(p.phase) else f"{p.phase}: "
            self.status(f"{phase}{line}{self.cancel_hint}")
        else:
            bar.update(total=max(p.total, 1), progress=p.done)
            self.status(progress_line(p) + self.cancel_hint)

    def stop(self, text: str) -> None:
        """The job ended: hide the bar and say how it went."""
        self.running = None
        self.query_one(ProgressBar).display = False
        self.status(text)
