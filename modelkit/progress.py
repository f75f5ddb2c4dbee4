"""Progress reporting: the library sends typed events, front ends draw them.

A long operation takes a ``progress`` callback (:data:`ProgressFn`) and calls
it with :class:`Progress` events. **Events may arrive from any thread**: the
runner hashes inputs on worker threads while the main thread writes, so a
callback that touches a UI must hand the event over to the UI's own thread
(Textual: ``post_message`` or ``call_from_thread``). The runner serialises its
calls with a lock, so a callback never runs twice at once for one run.

Phases, in the order a run goes through them:

* ``plan``: headers read, recipe checked, nothing computed yet;
* ``hash``: input files hashed (for provenance), beside the write;
* ``read``: inputs loaded or computed before writing (a pickle read whole,
  SVDs of a LoRA extraction);
* ``write``: output tensors computed and written, one at a time;
* ``verify``: sample images rendered and compared.

Other operations (inspect, hash, compare, scan) report their own ``phase``
name in the same shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from modelkit.wording import human_bytes  # re-exported: progress lines and front ends

PLAN = "plan"
HASH = "hash"
READ = "read"
WRITE = "write"
VERIFY = "verify"
PHASES = (PLAN, HASH, READ, WRITE, VERIFY)


@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` units of ``step``.

    Args:
        step: what is being worked on (a recipe step, a file, an operation).
        done, total: progress within ``step``, in ``unit``s.
        unit: ``"bytes"``, ``"tensors"`` or ``"files"``.
        item: what was just processed (a key or a file name), when useful.
        phase: one of :data:`PHASES` for runs, or the operation's own name.
        overall: the fraction (0..1) of the whole run done, when the caller
            knows the whole (the runner always sets it).
    """

    step: str
    done: int
    total: int
    unit: str = "tensors"
    item: str | None = None
    phase: str = WRITE
    overall: float | None = None

    @property
    def fraction(self) -> float:
        """``overall`` when known, else ``done / total`` (1.0 for an empty total)."""
        if self.overall is not None:
            return self.overall
        return self.step_fraction

    @property
    def step_fraction(self) -> float:
        """``done / total`` of this event's own count (1.0 for an empty total):
        the percentage a progress line shows beside ``done/total``."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total else 1.0

    @property
    def label(self) -> str:
        """The phase and the step, without saying a word twice: ``hash
        a.safetensors``, ``write merge``, ``compare`` (not ``compare compare``),
        ``plan cells``."""
        step = " ".join(str(self.step).split())
        if not step or self.phase in re.findall(r"[\w-]+", step):
            return step or self.phase
        return f"{self.phase} {step}"

    def amount(self) -> str:
        """``done/total`` in this event's unit: ``4/6 cells``, ``1.2 MB/7.0 GB``."""
        if self.unit == "bytes":
            return f"{human_bytes(self.done, 1)}/{human_bytes(self.total, 1)}"
        return f"{self.done}/{self.total} {self.unit}"

    def describe(self) -> str:
        """One line for people: ``hash a.safetensors: 100.0% 622.2 KB/622.2 KB,
        overall 6%``. The percentage is the share of what the line counts
        (``done/total``); the share of the whole run, when known and not the
        same, is labelled ``overall``. Command-line progress adds the rate,
        the time and an ETA to this line."""
        step = self.step_fraction
        text = f"{self.label}: {100 * step:.1f}% {self.amount()}"
        if self.overall is not None:
            overall = f"{100 * min(1.0, max(0.0, self.overall)):.0f}"
            if overall != f"{100 * step:.0f}":
                text += f", overall {overall}%"
        return text

    def __str__(self) -> str:
        return self.describe()


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """A callback that ignores events."""
