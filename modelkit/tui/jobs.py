"""The bodies of the TUI's thread workers: each calls the library and
reports through messages only.

:func:`run_job` is the one wrapper: it turns library progress callbacks
into throttled :class:`JobProgress` messages and the outcome into exactly one
:class:`JobFinished` or :class:`JobFailed` with the CLI's one-line wording.
An Act screen runs ``modelkit``'s core ``run(recipe, progress=, cancel=)``
the same way: ``run_job(screen, "act", lambda p, c: run(recipe, progress=p,
cancel=c), cancel)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from textual.message_pump import MessagePump

from modelkit.errors import Cancelled
from modelkit.progress import Progress, ProgressFn
from modelkit.tui.messages import (
    DetailLoaded,
    JobFailed,
    JobFinished,
    JobProgress,
    LibraryLoaded,
    SweepCellDone,
    TransformsLoaded,
)
from modelkit.wording import error_line  # the CLI's one-line wording (jobs.error_line)

if TYPE_CHECKING:
    from modelkit.core.recipe import Recipe
    from modelkit.engine.report import RunReport
    from modelkit.inspect.compare import CompareReport
    from modelkit.library.scan import ScanReport
    from modelkit.sweep.run import SweepReport
    from modelkit.sweep.spec import SweepSpec

T = TypeVar("T")
PROGRESS_INTERVAL = 0.05  # seconds between progress messages of one job


def throttled(node: MessagePump, job: str) -> ProgressFn:
    """A progress callback posting :class:`JobProgress` at most every
    :data:`PROGRESS_INTERVAL` seconds, and always the last step."""
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL or p.done >= p.total:
            last[0] = now
            node.post_message(JobProgress(job, p))

    return report


def run_job(node: MessagePump, job: str,
            fn: Callable[[ProgressFn, threading.Event], T],
            cancel: threading.Event) -> T | None:
    """Run ``fn(progress, cancel)`` (in the calling worker thread) and post
    its outcome to ``node``; returns the result, or None when it failed."""
    try:
        result = fn(throttled(node, job), cancel)
    except Cancelled as exc:
        node.post_message(JobFailed(job, str(exc), cancelled=True))
        return None
    except Exception as exc:  # every failure becomes a dialog, never a crash
        if os.environ.get("MODELKIT_DEBUG"):
            raise
        node.post_message(JobFailed(job, error_line(exc)))
        return None
    node.post_message(JobFinished(job, result))
    return result


# --- library jobs (called inside thread workers) ---------------------------


def load_library(node: MessagePump, db: str | None, under: list[str]) -> None:
    """Read every entry (under ``under`` folders when given) and the hints."""
    from modelkit.library import db as dbm
    from modelkit.library.check import check
    from modelkit.library.query import Filters, list_entries

    filters = Filters(under=under) if under else None
    with dbm.opened(db) as conn:
        entries = list_entries(conn, filters)
        hints = check(conn, filters).by_path()
    node.post_message(LibraryLoaded(entries, hints))


def load_detail(node: MessagePump, db: str | None, path: str,
                hints: list[Any]) -> None:
    """Read one file's details and lineage tree."""
    from modelkit.library import db as dbm
    from modelkit.library.lineage import lineage
    from modelkit.library.query import get_detail

    with dbm.opened(db) as conn:
        detail = get_detail(conn, path)
        tree = lineage(conn, detail.entry) if detail is not None else None
    node.post_message(DetailLoaded(path, detail, tree, hints))


def scan_job(dirs: list[str], db: str | None
             ) -> Callable[[ProgressFn, threading.Event], ScanReport]:
    """A job scanning ``dirs`` into ``db``."""
    from modelkit.library.scan import scan

    return lambda progress, cancel: scan(dirs, db, progress=progress, cancel=cancel)


def hash_job(paths: list[str], db: str | None
             ) -> Callable[[ProgressFn, threading.Event], int]:
    """A job hashing ``paths`` (through the shared hash cache)."""
    from modelkit.library import db as dbm
    from modelkit.library.scan import hash_missing

    def run(progress: ProgressFn, cancel: threading.Event) -> int:
        with dbm.opened(db) as conn:
            return hash_missing(conn, paths, progress, cancel)

    return run


def compare_job(a: str, b: str) -> Callable[[ProgressFn, threading.Event], CompareReport]:
    """A job comparing model ``b`` against ``a`` per component and block."""
    def run(progress: ProgressFn, cancel: threading.Event) -> CompareReport:
        from contextlib import ExitStack

        from modelkit.inspect.compare import compare_models
        from modelkit.io.open import open_source

        with ExitStack() as stack:
            src_a, src_b = open_source(a), open_source(b)
            for src in (src_a, src_b):
                close = getattr(src, "close", None)
                if close is not None:
                    stack.callback(close)
            return compare_models(src_a, src_b, progress=progress, cancel=cancel)

    return run


# --- Act jobs ------------------------------------------------------------------


def load_transforms(node: MessagePump) -> None:
    """Load the transform registry (imports every method and operation module)."""
    from modelkit.core.registry import all_transforms

    node.post_message(TransformsLoaded(all_transforms()))


@dataclass
class ActOutcome:
    """What an Act job returns: the run's report and, when the run verified
    and rendered, the comparison grid written beside the output."""

    report: RunReport
    grid: Path | None = None


def act_job(recipe: Recipe, output: str, dry_run: bool = False
            ) -> Callable[[ProgressFn, threading.Event], ActOutcome]:
    """A job running ``recipe`` into ``output`` through the one runner
    (planning only with ``dry_run``; verifying when the recipe has a
    ``verify:`` section, then writing its grid as ``OUTPUT.verify.png``)."""
    def run(progress: ProgressFn, cancel: threading.Event) -> ActOutcome:
        from modelkit.engine.runner import run as run_recipe

        report = run_recipe(recipe, output=output, progress=progress, cancel=cancel,
                            dry_run=dry_run)
        grid = None
        renders = getattr(report.verify, "renders", None)
        if renders is not None and renders.candidate:
            from modelkit.tui.recipes import free_path
            from modelkit.verify.outputs import write_grid

            out = Path(output)
            grid = write_grid(report.verify, free_path(out.parent, f"{out.stem}.verify",
                                                       ".png"))
        return ActOutcome(report, grid)

    return run


def sweep_job(node: MessagePump, spec: SweepSpec, out_dir: Path, jobs: int = 1
              ) -> Callable[[ProgressFn, threading.Event], SweepReport]:
    """A job running the sweep ``spec`` into ``out_dir`` (one cell after
    another in this process with ``jobs`` 1, else a process pool); each
    finished cell is posted as :class:`SweepCellDone`; returns the
    :class:`~modelkit.sweep.SweepReport` (``cancelled`` set after a cancel)."""
    def run(progress: ProgressFn, cancel: threading.Event) -> SweepReport:
        from modelkit.sweep import make_executor, run_sweep

        if jobs > 1:
            _start_resource_tracker()
        return run_sweep(spec, out_dir, executor=make_executor(jobs), progress=progress,
                         cancel=cancel, on_cell=lambda r: node.post_message(SweepCellDone(r)))

    return run


_TRACKER_LOCK = threading.Lock()


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (which a process pool needs)
    against the real stderr: it passes ``sys.stderr.fileno()`` to its
    process, and Textual's captured stderr answers -1, which fails the
    spawn ("bad value(s) in fds_to_keep")."""
    import sys
    from multiprocessing import resource_tracker

    with _TRACKER_LOCK:
        captured = sys.stderr
        try:
            sys.stderr = sys.__stderr__
            resource_tracker.ensure_running()
        finally:
            sys.stderr = captured
