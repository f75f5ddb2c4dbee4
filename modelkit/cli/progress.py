"""Progress on stderr for the CLI: a redrawn line on a terminal, a line per
10 % step in logs. Reports are throttled; quiet mode draws nothing."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from modelkit.progress import Progress


def human_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes with a decimal unit: ``2.13 GB``, ``613.21 KB``, ``12 B``."""
    for suffix in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if suffix == "B" else f"{n:.{digits}f} {suffix}"
        n /= 1000
    return f"{n:.{digits}f} TB"


def _fmt(n: float, unit: str) -> str:
    return human_bytes(n, 1) if unit == "bytes" else f"{int(n)}"


class StderrProgress:
    """A :data:`modelkit.progress.ProgressFn` that draws on stderr."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None,
                 min_seconds: float = 0.3) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.min_seconds = min_seconds
        self._start: dict[str, float] = {}
        self._last_draw = 0.0
        self._last_step: dict[str, int] = {}
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        start = self._start.setdefault(p.task, now)
        finished = p.done >= p.total
        if now - start < self.min_seconds and not (finished and self._drawn):
            return
        if self.tty:
            if finished or now - self._last_draw >= 0.1:
                self._draw_tty(p, now - start, finished)
                self._last_draw = now
        else:
            step = int(10 * p.done / p.total) if p.total else 10
            if step > self._last_step.get(p.task, -1):
                self._last_step[p.task] = step
                self.stream.write(self._line(p, now - start) + "\n")
                self._drawn = True

    def _line(self, p: Progress, elapsed: float) -> str:
        pct = 100.0 * p.done / p.total if p.total else 100.0
        rate = ""
        if p.unit == "bytes" and elapsed > 0:
            rate = f" {_fmt(p.done / elapsed, 'bytes')}/s"
        return (f"{p.task}: {pct:5.1f}% {_fmt(p.done, p.unit)}/{_fmt(p.total, p.unit)}"
                f"{rate} {elapsed:.1f}s")

    def _draw_tty(self, p: Progress, elapsed: float, finished: bool) -> None:
        self.stream.write("\r\x1b[2K" + self._line(p, elapsed))
        self._drawn = True
        if finished:
            self.stream.write("\n")
            self._drawn = False
        self.stream.flush()
