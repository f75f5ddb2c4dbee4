"""``modelkit tui``: the Textual app.

Structure:

- :class:`ModelkitApp` holds screens only; :func:`make_app` builds it for the
  CLI and for tests.
- ``screens/``: :class:`LibraryScreen` (main), :class:`CompareScreen`,
  :class:`ActScreen`, :class:`SweepScreen`, :class:`HelpScreen`,
  :class:`ErrorDialog`.
- ``widgets/``: the table, detail pane, preview, job bar and the parameter
  form generated from the transform registry.
- ``messages.py``: what workers post; ``jobs.py``: the worker bodies, all
  through :func:`modelkit.tui.jobs.run_job` (progress, cancel, one-line
  errors).
- The Act screen takes the marked (or selected) entries, builds a recipe in
  a form (``recipes.py``: plain logic, tested without the app), plans it
  with ``dry_run`` and runs it through ``run_job(screen, "act", ...)`` in a
  ``@work(thread=True)`` worker with a :class:`JobBar`, then posts
  :class:`LibraryChanged` with the new file to the library screen, which
  indexes and selects it.
- From the same form (ctrl+s) a sweep (``sweeps.py``: the form's recipe
  over typed axes, or a sweep file) runs on :class:`SweepScreen` through
  ``run_job(screen, "sweep", jobs.sweep_job(...))``: progress per cell,
  cancel, and the results table as cells finish.

The library package (:mod:`modelkit.library`) never imports this one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.worker import Worker, WorkerState

from modelkit.tui.jobs import error_line
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.screens.help import HelpScreen
from modelkit.tui.screens.library import LibraryScreen

DEFAULT_THEME = "ansi-dark"  # the terminal's own colours


class ModelkitApp(App[None]):
    """Browse, inspect and compare the model library."""

    CSS_PATH = "modelkit.tcss"
    TITLE = "modelkit"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", show=False, id="app-quit"),
    ]

    def __init__(self, dirs: Sequence[str] = (), db: str | None = None, *,
                 images: bool = True, theme: str = DEFAULT_THEME) -> None:
        super().__init__()
        self.dirs = list(dirs)
        self.db = db
        self.images = images
        self.start_theme = theme

    def on_mount(self) -> None:
        self.theme = self.start_theme
        self.push_screen(LibraryScreen(self.dirs, self.db, self.images))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Any worker that died of an uncaught error: show it, never crash."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            if os.environ.get("MODELKIT_DEBUG"):
                raise event.worker.error
            self.push_screen(ErrorDialog(error_line(event.worker.error)))


def make_app(dirs: Sequence[str] = (), db: str | None = None, *, images: bool = True,
             theme: str = DEFAULT_THEME) -> ModelkitApp:
    """The app over the index ``db`` (default location when None); ``dirs``
    are scanned at start and limit the table to files under them."""
    return ModelkitApp(dirs, db, images=images, theme=theme)
