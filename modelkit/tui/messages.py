"""Messages the TUI's thread workers post. Workers never touch widgets:
they call the library and post one of these (``post_message`` is
thread-safe); the screen that started the job handles them.

Every long job (scan, hash, compare, and later merge/bake/verify) goes
through :func:`modelkit.tui.jobs.run_job`, so it posts ``JobProgress`` while
it runs and ends with exactly one ``JobFinished`` or ``JobFailed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

from modelkit.library.check import Hint
from modelkit.library.lineage import LineageNode
from modelkit.library.query import Detail, Entry
from modelkit.progress import Progress


@dataclass
class JobProgress(Message):
    """A progress report from job ``job`` (replaces the previous one still
    queued, so a fast job cannot flood the UI)."""

    job: str
    progress: Progress

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobProgress) and message.job == self.job


@dataclass
class JobFinished(Message):
    """Job ``job`` returned ``result`` (its report object)."""

    job: str
    result: Any


@dataclass
class JobFailed(Message):
    """Job ``job`` raised; ``error`` is the CLI's one-line wording."""

    job: str
    error: str
    cancelled: bool = False


@dataclass
class LibraryLoaded(Message):
    """The index was (re)read: every entry and the hints per path."""

    entries: list[Entry]
    hints: dict[str, list[Hint]] = field(default_factory=dict)


@dataclass
class DetailLoaded(Message):
    """Everything the detail pane shows about one file."""

    path: str
    detail: Detail | None
    lineage: LineageNode | None
    hints: list[Hint] = field(default_factory=list)


@dataclass
class LibraryChanged(Message):
    """Files were written or changed (by a job or the Act screen): the
    library screen re-scans ``paths``' folders and reloads."""

    paths: list[str] = field(default_factory=list)


@dataclass
class TransformsLoaded(Message):
    """The transform registry was loaded (it imports every method and
    operation module, so a worker loads it): each one by name."""

    transforms: dict[str, Any]


@dataclass
class SweepCellDone(Message):
    """A sweep cell finished (or was recorded as finished): its record, as
    ``sweep.jsonl`` holds it."""

    record: dict[str, Any]
