"""Progress on stderr for the CLI.

On a terminal: one line, redrawn at most ten times a second, with the phase,
the step, the percentage, the rate and an ETA. In logs (stderr not a
terminal): a few plain lines per run (start, each quarter, end). Quiet mode
draws nothing. Events may come from several threads; drawing is serialised.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from modelkit.progress import PLAN, Progress
from modelkit.textsafe import shown
from modelkit.wording import human_bytes  # re-exported: the CLI commands import it here


def _amount(n: float, unit: str) -> str:
    return human_bytes(n, 1) if unit == "bytes" else f"{int(n)} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


MIN_ETA_FRACTION = 0.01


class StderrProgress:
    """A :data:`modelkit.progress.ProgressFn` that draws on stderr."""

    LOG_STEPS = 4  # plain lines per run besides the first: each quarter

    def __init__(self, quiet: bool = False, stream: TextIO | None = None,
                 min_seconds: float = 0.3) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.min_seconds = min_seconds
        self._lock = threading.Lock()
        self._start: float | None = None
        self._step_start: dict[str, tuple[float, int]] = {}
        self._last_draw = 0.0
        self._logged = -1
        self._open_line = False

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        with self._lock:
            self._draw(p)

    def _draw(self, p: Progress) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        self._step_start.setdefault(p.step, (now, p.done))
        fraction = min(1.0, max(0.0, p.fraction))
        if self.tty:
            if now - self._start < self.min_seconds and fraction < 1.0:
                return
            if fraction >= 1.0 or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r\x1b[2K" + self._line(p, now, fraction))
                self._open_line = True
                if fraction >= 1.0 and p.overall is not None:
                    self.close()
                self.stream.flush()
            return
        if p.phase == PLAN:
            return
        quarter = int(fraction * self.LOG_STEPS)
        done = fraction >= 1.0
        if quarter > self._logged and (now - self._start >= self.min_seconds
                                       or (done and self._logged >= 0)):
            self._logged = quarter
            self.stream.write(self._line(p, now, fraction) + "\n")
            self.stream.flush()

    def _line(self, p: Progress, now: float, fraction: float) -> str:
        began, base = self._step_start[p.step]
        elapsed = now - (self._start or now)
        rate = ""
        if now - began > 0 and p.unit == "bytes":
            rate = f" {human_bytes((p.done - base) / (now - began), 1)}/s"
        eta = ""
        if MIN_ETA_FRACTION <= fraction < 1 and elapsed > 0:  # below it, the first block's noise
            eta = f" ETA {_duration(elapsed * (1 - fraction) / fraction)}"
        item = f" {shown(p.step, 40)}"
        return (f"{p.phase}{item}: {100 * fraction:5.1f}% "
                f"{_amount(p.done, p.unit)}/{_amount(p.total, p.unit)}{rate}"
                f" {_duration(elapsed)}{eta}")

    def close(self) -> None:
        """End a redrawn line (before printing a report)."""
        if self._open_line and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self._open_line = False
