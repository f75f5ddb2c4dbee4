"""The per-key loop every transform runs: produce one tensor, write it, free
it. Merge, prune, EMA selection and casts are all ``produce`` functions."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.io.reader import cast, open_model
from modelkit.io.source import Source
from modelkit.io.writer import SafetensorsWriter, TensorSpec
from modelkit.progress import Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WriteResult:
    """What a streaming pass wrote."""

    path: Path
    n_tensors: int
    bytes_written: int
    seconds: float


def stream_pass(
    out: str | os.PathLike[str],
    specs: list[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    progress: ProgressFn = no_progress,
    task: str = "write",
    before_commit: Callable[[SafetensorsWriter], None] | None = None,
) -> WriteResult:
    """Write ``specs`` to ``out``, asking ``produce(name)`` for each tensor in
    turn. Progress is reported in bytes. ``before_commit(writer)`` runs after
    the last tensor (e.g. to patch late metadata). Nothing is left at ``out``
    on error."""
    start = time.perf_counter()
    total = sum(s.nbytes for s in specs)
    done = 0
    with SafetensorsWriter(out, specs, metadata, inputs=inputs) as writer:
        for spec in specs:
            writer.write(spec.name, produce(spec.name))
            done += spec.nbytes
            progress(Progress(task, done, total, "bytes", spec.name))
        if before_commit is not None:
            before_commit(writer)
        size = writer.total_bytes
    return WriteResult(Path(out), len(specs), size, time.perf_counter() - start)


def cast_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | None = None,
    *,
    metadata: dict[str, str] | None = None,
    progress: ProgressFn = no_progress,
) -> WriteResult:
    """Copy a model into a new safetensors file, casting float tensors to
    safetensors dtype ``dtype`` (``None`` keeps every dtype). Source metadata
    is kept and updated with ``metadata``."""
    from modelkit.io.dtypes import to_torch

    with open_model(src) as source:
        target = to_torch(dtype) if dtype else None
        specs = [
            TensorSpec(k, dtype if (dtype and i.is_float) else i.dtype, i.shape)
            for k, i in source.infos.items()
        ]
        meta = {**source.metadata, **(metadata or {})}

        def produce(key: str) -> torch.Tensor:
            t = source.get(key)
            return cast(t, target) if target is not None else t

        return stream_pass(out, specs, produce, metadata=meta, inputs=[src],
                           progress=progress, task="convert")


def write_source(
    source: Source,
    out: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
    progress: ProgressFn = no_progress,
    task: str = "write",
    before_commit: Callable[[SafetensorsWriter], None] | None = None,
) -> WriteResult:
    """Write every tensor of ``source`` to a new safetensors file ``out``,
    with ``metadata`` (default: the source's own)."""
    specs = [TensorSpec(k, i.dtype, i.shape) for k, i in source.infos.items()]
    meta = source.metadata if metadata is None else metadata
    return stream_pass(out, specs, source.get, metadata=meta, inputs=source.input_paths,
                       progress=progress, task=task, before_commit=before_commit)
