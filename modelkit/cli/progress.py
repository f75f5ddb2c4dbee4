"""Progress on stderr for the CLI.

On a terminal: one line, redrawn at most ten times a second; in logs (stderr
not a terminal): a few plain lines per run (start, each quarter of the run,
end), or, for events without an ``overall`` fraction (verify's scans and
renders, hashing several files), per step. Both draw the same line: the
event's own :meth:`~modelkit.progress.Progress.describe` (the phase and
step, the share of what the line counts, ``done/total``, and the run's
``overall`` share when it differs) with the rate, the time so far and an
ETA of the run (of the step, for events without ``overall``).
Quiet mode draws nothing. Events may come from several threads; drawing is serialised.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from typing import TextIO

from modelkit.progress import PLAN, Progress, human_bytes
from modelkit.textsafe import shown

__all__ = ["StderrProgress", "human_bytes"]


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
        self._log_step: str | None = None
        self._step_fraction: dict[str, tuple[float, float]] = {}
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
        self._step_fraction.setdefault(p.step, (now, fraction))
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
        if p.overall is None and p.step != self._log_step:
            # a new step of a multi-step operation: its own few lines (the
            # renders after a finished scan once logged nothing for minutes)
            self._log_step, self._logged = p.step, -1
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
            eta = self._eta(p, now, fraction, elapsed)
        step = shown(p.step, 40)
        line = (p if step == p.step else replace(p, step=step)).describe()
        return f"{line}{rate} {_duration(elapsed)}{eta}"

    def _eta(self, p: Progress, now: float, fraction: float, elapsed: float) -> str:
        """From the whole run's pace when events carry ``overall``, else from
        this step's own (a render after a long scan: not the scan's time)."""
        if p.overall is not None:
            return f" ETA {_duration(elapsed * (1 - fraction) / fraction)}"
        began, first = self._step_fraction[p.step]
        if fraction <= first or now <= began:
            return ""
        return f" ETA {_duration((now - began) * (1 - fraction) / (fraction - first))}"

    def close(self) -> None:
        """End a redrawn line (before printing a report)."""
        if self._open_line and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self._open_line = False
