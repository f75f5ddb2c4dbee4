"""Progress reporting: the library calls a callback, front ends draw it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One progress report: ``done`` of ``total`` units of ``task``.

    ``unit`` is ``"bytes"`` or ``"tensors"``; ``item`` names what was just
    processed (a key or a file), when useful.
    """

    task: str
    done: int
    total: int
    unit: str = "tensors"
    item: str | None = None


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """A callback that ignores reports."""
