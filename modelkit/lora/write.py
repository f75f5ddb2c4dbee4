"""Write a planned LoRA operation to a file through the convert pipeline's
writer (provenance, atomic output), running its ``prepare`` step first."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from modelkit.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from modelkit.convert.base import Converted
    from modelkit.convert.pipeline import OutputResult


def write_converted(conv: Converted, out: str | os.PathLike[str], *,
                    progress: ProgressFn = no_progress) -> OutputResult:
    """Run ``conv.prepare`` (when set) and write ``conv.source`` to ``out``
    (``.safetensors``) with a ``modelkit.history`` entry."""
    import time

    from modelkit.convert.pipeline import write_output

    start = time.perf_counter()
    if conv.prepare is not None:
        conv.prepare(progress)
    history = [(conv.op, conv.params, conv.source.input_paths)]
    result = write_output(conv.source, out, fmt="safetensors", history=history,
                          progress=progress, task=conv.op)
    result.seconds = time.perf_counter() - start  # the prepare step included
    return result


__all__ = ["write_converted"]
