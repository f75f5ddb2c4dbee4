"""The fast route of ``lora bake`` for a safetensors base on the CPU: the same
row-chunk math as :func:`modelkit.lora.bake._produce_chunked`, with the bytes
moved differently (the same bytes come out; tested).

Each patched weight is baked in the same row chunks of about
:data:`modelkit.vocab.CHUNK_ELEMENTS` elements: the chunk's base rows are read
with ``pread`` into a buffer reused for the whole run, converted into a reused
float32 buffer, every module's rows are added (``addmm_``, in the same order),
the range is checked, and the chunk is converted into a reused output buffer
and written at its offset in the output file. Reading through the memory map
and a fresh whole-tensor output per weight faulted every page in (most of a
bake's time on a Flux file: 126 MiB per ``linear1``), and the whole output
tensor was the bake's peak memory.

A worker thread (:data:`WORKERS`) computes the next chunk while the calling
thread writes the current one (two buffer sets); it runs torch with the one
intra-op thread the bake sets, so nothing spins beside a busy process.
Weights patched by modules that read the base weight (DoRA, (IA)3), bias
patches and 1-D weights take the general route (``get``).
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from modelkit.errors import CancelFlag, ModelkitError, check_cancel
from modelkit.io.header import DTYPE_SIZES
from modelkit.vocab import CHUNK_ELEMENTS

# threads computing chunks beside the writing one, each with one torch thread
# (no OpenMP pool waits on a busy core). One: the math overlaps the writes on
# a quiet 2-core machine, and beside a busy process the bake stays within
# about 1.5x of its quiet time (bench/README.md, the SD bake's bound); two
# would take both cores when quiet and double that ratio
WORKERS = 1

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from modelkit.io.reader import ModelSource
    from modelkit.io.source import Source, TensorInfo
    from modelkit.io.writer import TensorSink
    from modelkit.lora.bake import _Patch

class _Slot:
    """One chunk's buffers (input bytes, float32 rows, output rows), grown
    when a chunk needs more and reused for the whole run."""

    def __init__(self) -> None:
        self.raw: Any = None
        self.f32: torch.Tensor | None = None
        self.out: dict[Any, torch.Tensor] = {}

    def buffers(self, n_raw: int, numel: int, out_dtype: torch.dtype
                ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        import numpy as np
        import torch

        size = max(numel, CHUNK_ELEMENTS)
        if self.raw is None or self.raw.nbytes < n_raw:
            self.raw = np.empty(max(n_raw, size * 4), dtype=np.uint8)
        if self.f32 is None or self.f32.numel() < numel:
            self.f32 = torch.empty(size, dtype=torch.float32)
        out = self.out.get(out_dtype)
        if out is None or out.numel() < numel:
            out = self.out[out_dtype] = torch.empty(size, dtype=out_dtype)
        return self.raw[:n_raw], self.f32[:numel], out[:numel]


def check_range(key: str, acc: torch.Tensor, base: torch.Tensor, todo: Sequence[_Patch],
                out_dtype: torch.dtype) -> None:
    """Refuse a baked chunk holding NaN/Inf or values beyond the output
    dtype's finite range (one min/max pass, cheap next to the matmul),
    unless the base rows themselves already did."""
    import torch

    if not out_dtype.is_floating_point:
        return
    limit = torch.finfo(out_dtype).max
    low, high = torch.aminmax(acc)
    if bool(low >= -limit) and bool(high <= limit):
        return
    low, high = torch.aminmax(base.float())
    if not (bool(low >= -limit) and bool(high <= limit)):
        return  # the base's own values, passed on as they are
    from modelkit.io.dtypes import from_torch

    mods = "; ".join(dict.fromkeys(f"{p.delta.ad.label}: module {p.delta.mod.name}"
                                   for p in todo))
    what = ("NaN/Inf" if not bool(torch.isfinite(acc).all()) else
            f"values beyond the {from_torch(out_dtype)} range (±{limit:.6g})")
    raise ModelkitError(f"{key}: baking {mods} gives {what}; the adapter's values are too "
                        "large for this weight (check its alpha and factors, lower its "
                        "weight or bake to --dtype fp32)")


def chunkable(todo: Sequence[_Patch], shape: tuple[int, ...]) -> bool:
    """Whether a weight's patches are plain row additions (no DoRA or (IA)3
    module reading the base, no bias) on a weight of two or more dimensions."""
    return len(shape) >= 2 and not any(p.delta.needs_base or p.bias for p in todo)


def streamer(ckpt: Source, patches: dict[str, list[_Patch]], infos: dict[str, TensorInfo],
             device: str, cancel: CancelFlag | None,
             fallback: Callable[[str, TensorSink], bool] | None
             ) -> Callable[[str, TensorSink], bool] | None:
    """``stream(key, sink)`` for the bake's output: patched weights of a
    safetensors base on the CPU in row chunks (above), other keys through
    ``fallback`` (the file-to-file copy of unchanged tensors). None when
    the base cannot take this route and there is no fallback."""
    from modelkit.io.reader import ModelSource

    if device != "cpu" or not isinstance(ckpt, ModelSource) or not ckpt.raw_readable:
        return fallback
    slots = tuple(_Slot() for _ in range(WORKERS + 1))

    def stream(key: str, sink: TensorSink) -> bool:
        todo = patches.get(key)
        if todo is None or not chunkable(todo, tuple(ckpt.infos[key].shape)):
            return fallback(key, sink) if fallback is not None else False
        _bake_rows(ckpt, key, infos[key].dtype, todo, slots, sink, cancel)
        return True

    return stream


def _bake_rows(ckpt: ModelSource, key: str, dtype: str, todo: list[_Patch],
               slots: Sequence[_Slot], sink: TensorSink, cancel: CancelFlag | None) -> None:
    """Bake one weight chunk by chunk into ``sink``: :data:`WORKERS` threads
    compute the next chunks while this thread writes the current one, in
    order (chunk i uses slot i mod ``len(slots)``, free again once written)."""
    from modelkit.io.dtypes import to_torch
    from modelkit.lora.output import LORA_THREADS

    info = ckpt.infos[key]
    shape = tuple(info.shape)
    n, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // cols)
    starts = list(range(0, n, step))
    job = _Job(ckpt, key, to_torch(info.dtype), int(DTYPE_SIZES[info.dtype]),
               to_torch(dtype), n, cols, step, todo)
    for p in todo:  # load each module's factors here, once, before a worker uses them
        if p.delta.factors() is None:
            p.delta.full()
    out_size = job.out_dtype.itemsize
    ahead = min(WORKERS, len(slots) - 1)
    with ThreadPoolExecutor(ahead, thread_name_prefix="modelkit-bake") as pool:
        pending = deque(pool.submit(job.run, starts[i], slots[i % len(slots)], LORA_THREADS)
                        for i in range(min(ahead, len(starts))))
        for i, a in enumerate(starts):
            chunk = pending.popleft().result()
            if i + ahead < len(starts):
                check_cancel(cancel)
                j = i + ahead
                pending.append(pool.submit(job.run, starts[j], slots[j % len(slots)],
                                           LORA_THREADS))
            sink.write(a * cols * out_size, chunk.view(-1).view(_u8()).numpy().data,
                       i + 1 == len(starts))


def _u8() -> torch.dtype:
    import torch

    return torch.uint8


class _Job:
    """The chunks of one patched weight."""

    def __init__(self, ckpt: ModelSource, key: str, in_dtype: torch.dtype, in_size: int,
                 out_dtype: torch.dtype, n: int, cols: int, step: int,
                 todo: list[_Patch]) -> None:
        self.ckpt, self.key, self.in_dtype, self.in_size = ckpt, key, in_dtype, in_size
        self.out_dtype, self.n, self.cols, self.step, self.todo = out_dtype, n, cols, step, todo

    def run(self, a: int, slot: _Slot, threads: int) -> torch.Tensor:
        """Rows ``a:a+step`` baked into ``slot``'s output buffer, returned as
        ``[rows, cols]``."""
        import torch

        from modelkit.lora.output import torch_threads

        b = min(self.n, a + self.step)
        rows, cols = b - a, self.cols
        raw, f32, out = slot.buffers(rows * cols * self.in_size, rows * cols, self.out_dtype)
        self.ckpt.read_into(self.key, a * cols * self.in_size, memoryview(raw))
        base = torch.from_numpy(raw).view(self.in_dtype).view(rows, cols)
        acc, dst = f32.view(rows, cols), out.view(rows, cols)
        with torch_threads(threads):
            acc.copy_(base)
            for p in self.todo:
                lo, hi = max(a, p.row0), min(b, p.row0 + p.delta.out)
                if lo < hi:
                    p.delta.add_rows_(acc[lo - a:hi - a], lo - p.row0, hi - p.row0, p.k)
            check_range(self.key, acc, base, self.todo, self.out_dtype)
            dst.copy_(acc)
        return dst


__all__ = ["check_range", "chunkable", "streamer"]
