"""Errors modelkit raises for bad input. Messages are one line, for people:
they name the file, key or field and say what to do. The CLI maps them to
exit codes without a traceback."""

from __future__ import annotations

import threading
from typing import Protocol

# set by a front end's signal handler: an error raised while it unwinds is
# the interrupt showing through a C extension, not a broken input
INTERRUPTED = threading.Event()


class _Deferral(threading.local):
    depth = 0


_DEFERRAL = _Deferral()


class defer_signals:
    """A block a signal must not cut in two, such as creating a temp file and
    recording its name: inside it a front end's signal handler only sets
    :data:`INTERRUPTED`, and the run stops at its next :func:`check_cancel`."""

    def __enter__(self) -> None:
        _DEFERRAL.depth += 1

    def __exit__(self, *_exc: object) -> None:
        _DEFERRAL.depth -= 1


def signals_deferred() -> bool:
    """Whether this thread is inside a :class:`defer_signals` block."""
    return _DEFERRAL.depth > 0


class Interrupted(BaseException):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) asked the program to stop. A
    BaseException, so nothing on the way mistakes it for an error; writers
    remove their temp files as it passes."""


class ModelkitError(Exception):
    """Base class: a user-facing problem (exit code 2 in the CLI)."""

    exit_code = 2


class BadFileError(ModelkitError):
    """A file that is not a readable model file (truncated, not safetensors,
    header too large, unsafe pickle)."""


class UnsafePickleError(BadFileError):
    """A pickle that references a class outside the allow-list."""


class OutputError(ModelkitError):
    """The output path is not acceptable (an input, a directory, ...)."""


class MissingKeyError(ModelkitError):
    """A key needed by the operation is absent."""


class Cancelled(ModelkitError):
    """The caller cancelled the operation (a cancel event was set, or Ctrl-C).
    Nothing was written (exit code 130 in the CLI)."""

    exit_code = 130


class CancelFlag(Protocol):
    """What a ``cancel`` argument is: anything with ``is_set()``, such as a
    :class:`threading.Event`."""

    def is_set(self) -> bool: ...


def check_cancel(cancel: CancelFlag | None) -> None:
    """Raise :class:`Cancelled` when ``cancel`` (anything with ``is_set()``,
    such as a :class:`threading.Event`) is set, and :class:`Interrupted`
    when a signal was received (in case a library on the way swallowed the
    exception the signal handler raised)."""
    if INTERRUPTED.is_set() and threading.current_thread() is threading.main_thread():
        raise Interrupted
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled; no output was written")
