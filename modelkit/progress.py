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

from collections.abc import Callable
from dataclasses import dataclass

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
        return self.done / self.total if self.total else 1.0


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """A callback that ignores events."""
