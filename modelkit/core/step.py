"""What a transform returns: its output as a lazy source, plus its report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from modelkit.errors import CancelFlag
from modelkit.io.source import DerivedSource
from modelkit.progress import ProgressFn

# where an output key comes from: (input index, key in that input); None for
# a key the transform creates (an int8 scale, a LoRA factor)
KeyOrigin = tuple[int, str] | None


@dataclass
class PlannedStep:
    """A transform applied to its inputs, before anything is computed.

    Args:
        source: the output, computed one tensor at a time when the writer
            asks for it (nothing is read while planning).
        report: the transform's own report; figures measured while the output
            is computed (saturated values, int8 error, EMA deltas) fill in
            during the write, so read them after the run.
        op: the transform's name, for the ``modelkit.history`` entry.
        params: the parameters as recorded in the history.
        origins: every output key's origin (see :data:`KeyOrigin`); input keys
            no output key comes from are dropped. The contract tests check it
            against the transform's declared key relations.
        prepare: work that must run before the output header is known (a LoRA
            extraction picks each layer's rank from its SVD): called once with
            a progress callback and a cancel event before writing; afterwards
            ``source.infos`` and ``origins`` are final.
    """

    source: DerivedSource
    report: Any
    op: str
    params: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, KeyOrigin] = field(default_factory=dict)
    prepare: Callable[[ProgressFn, CancelFlag], None] | None = None


def same_origins(keys: Iterable[str], index: int = 0) -> dict[str, KeyOrigin]:
    """Origins for keys that keep their name from input ``index``."""
    return {k: (index, k) for k in keys}
