"""The fast route of ``lora bake`` for a safetensors base on the CPU: the same
row-chunk math as :func:`modelkit.lora.bake._produce_chunked`, with the bytes
moved differently (the same bytes come out; tested).

Each patched weight is baked in the same row chunks of about
:data:`modelkit.vocab.CHUNK_ELEMENTS` elements: the chunk's base rows are
converted straight from the file's memory map (``ModelSource.view``) into a
reused float32 buffer, every module's rows are added (``addmm_``, in the same
order), the range is checked where it can fail (:func:`range_safe`), and the
chunk is converted into a reused output buffer and written at its offset in
the output file. A fresh whole-tensor output per weight faulted every page
in (most of a bake's time on a Flux file: 126 MiB per ``linear1``) and was
the bake's peak memory; reading the rows with ``pread`` into a buffer first
cost one more copy of every byte (about 10 % of a Flux bake's CPU time, with
the range check it skips on bf16 weights; bench/README.md).

The calling thread and a worker thread (:data:`WORKERS`) are two lanes that
each take the next chunk and read, bake and write it with their own buffers
(``pwrite`` at its offset: no order needed), one torch intra-op thread each,
so nothing spins beside a busy process; on a machine with as many CPUs as
lanes, each lane runs on its own CPU (:func:`_lane_cpus`). The lanes split the reading and
writing as well as the math: with the calling thread only writing and the
worker reading and baking, the writer waited on the worker for most of the
bake (1.3 s of 3.5 s) and beside a busy process the bake got about one core
of two; with both lanes busy it gets about 1.3 (bench/README.md, Flux). The
chunk size is the general route's: MKL's sums depend on the number of rows
in the product (half-size chunks changed bytes of a Flux bake). Weights
patched by modules that read the base weight (DoRA, (IA)3), bias patches and
1-D weights take the general route (``get``).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from modelkit.errors import CancelFlag, Cancelled, ModelkitError, check_cancel
from modelkit.io.header import DTYPE_SIZES
from modelkit.vocab import CHUNK_ELEMENTS

# a |ΔW| under this cannot carry a finite value past the top of the float32 or
# bfloat16 range: it is below half the spacing of float32 values there (2^103,
# about 1e31), so base + ΔW rounds to the base's own value near the top
SAFE_DELTA = 1e30

# lanes beside the calling thread, each with one torch thread (no OpenMP pool
# waits on a busy core). One: two lanes fill a quiet 2-core machine, and
# beside a busy process the bake keeps about 2/3 of each core (the two lanes
# against the one busy thread), within the SD bake's 1.5x of its quiet time
# (bench/README.md); more lanes would only take more from the other process
WORKERS = 1

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch

    from modelkit.io.reader import ModelSource
    from modelkit.io.source import Source, TensorInfo
    from modelkit.io.writer import TensorSink
    from modelkit.lora.bake import _Patch

class _Slot:
    """One chunk's buffers (float32 rows, output rows), grown when a chunk
    needs more and reused for the whole run."""

    def __init__(self) -> None:
        self.f32: torch.Tensor | None = None
        self.out: dict[Any, torch.Tensor] = {}

    def buffers(self, numel: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        size = max(numel, CHUNK_ELEMENTS)
        if self.f32 is None or self.f32.numel() < numel:
            self.f32 = torch.empty(size, dtype=torch.float32)
        out = self.out.get(out_dtype)
        if out is None or out.numel() < numel:
            out = self.out[out_dtype] = torch.empty(size, dtype=out_dtype)
        return self.f32[:numel], out[:numel]


def check_range(key: str, acc: torch.Tensor, base: torch.Tensor, todo: Sequence[_Patch],
                out_dtype: torch.dtype) -> None:
    """Refuse a baked chunk holding NaN/Inf or values beyond the output
    dtype's finite range (a max and a min pass, cheap next to the matmul;
    NaN fails both), unless the base rows themselves already did."""
    import torch

    if not out_dtype.is_floating_point:
        return
    limit = torch.finfo(out_dtype).max
    # amax and amin: together half the time of one aminmax on the CPU
    if float(acc.amax()) <= limit and float(acc.amin()) >= -limit:
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


def range_safe(todo: Sequence[_Patch], out_dtype: torch.dtype) -> bool:
    """Whether :func:`check_range` cannot fail on any chunk of this weight,
    so the bake may skip it: the output is bfloat16 or float32, and the
    modules' ``|k|·bound`` add up to under :data:`SAFE_DELTA`. Then a finite
    base value stays in range (a NaN/Inf can only come from the base, which
    the check passes on as it is)."""
    import torch

    if out_dtype not in (torch.bfloat16, torch.float32):
        return False
    return sum(abs(p.k) * p.delta.bound() for p in todo) < SAFE_DELTA


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
    """Bake one weight chunk by chunk into ``sink``: this thread and
    :data:`WORKERS` more each take the next chunk in order, read, bake and
    write it at its offset with their own buffers (slot ``t`` for lane
    ``t``), until none is left; the weight is marked complete once every
    chunk is written. An error stops every lane at its next chunk, and the
    error of the lowest chunk is raised (the one an in-order bake meets)."""
    from modelkit.io.dtypes import to_torch
    from modelkit.lora.output import LORA_THREADS

    info = ckpt.infos[key]
    shape = tuple(info.shape)
    n, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // cols)
    for p in todo:  # load each module's factors (or ΔW) here, once, before a worker uses them
        p.delta.bound()
    job = _Job(ckpt, key, to_torch(info.dtype), int(DTYPE_SIZES[info.dtype]),
               to_torch(dtype), n, cols, step, todo)
    queue = _Chunks(-(-n // step))
    lanes = min(WORKERS + 1, len(slots), queue.n)
    cpus = _lane_cpus(lanes)
    try:
        if lanes == 1:
            job.lane(slots[0], sink, queue, cancel, LORA_THREADS)
        else:
            with ThreadPoolExecutor(lanes - 1, thread_name_prefix="modelkit-bake") as pool:
                for t in range(1, lanes):
                    pool.submit(job.lane, slots[t], sink, queue, cancel, LORA_THREADS,
                                cpus[t] if cpus else None)
                try:
                    job.lane(slots[0], sink, queue, cancel, LORA_THREADS,
                             cpus[0] if cpus else None)
                finally:
                    queue.stop()  # a signal in this thread: the workers stop at their next chunk
    finally:
        for p in todo:
            p.delta.release()
    if queue.error is not None:
        raise queue.error[1]
    sink.write(n * cols * job.out_dtype.itemsize, memoryview(b""), True)


def _lane_cpus(lanes: int) -> list[int] | None:
    """One CPU per lane when the lanes are as many as the CPUs this process
    may use (a 2-core machine), else None. Beside another busy process the
    scheduler otherwise often leaves both lanes on one core and the other
    process alone on the second (it balances runnable threads, not
    processes): one lane per core gets 1.5 cores there instead of 1."""
    import os

    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    return allowed if len(allowed) == lanes else None


@contextmanager
def _on_cpu(cpu: int | None) -> Iterator[None]:
    """Run the block on one CPU (this thread only), then restore its CPUs."""
    import os

    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class _Chunks:
    """The chunk indexes of one weight, handed out in order to the lanes,
    and the error of the lowest chunk that failed."""

    def __init__(self, n: int) -> None:
        self.n, self.next = n, 0
        self.error: tuple[int, BaseException] | None = None
        self.lock = threading.Lock()

    def take(self) -> int | None:
        """The next chunk to bake, or None when all are taken or one failed
        (chunks below a failed one are still baked: one of them may fail
        first in order)."""
        with self.lock:
            i = self.next
            if i >= self.n or (self.error is not None and i > self.error[0]):
                return None
            self.next = i + 1
            return i

    def fail(self, i: int, exc: BaseException) -> None:
        """Chunk ``i`` raised ``exc``."""
        with self.lock:
            if self.error is None or i < self.error[0]:
                self.error = (i, exc)

    def stop(self) -> None:
        """Hand out no more chunks."""
        with self.lock:
            self.next = self.n


class _Job:
    """The chunks of one weight."""

    def __init__(self, ckpt: ModelSource, key: str, in_dtype: torch.dtype, in_size: int,
                 out_dtype: torch.dtype, n: int, cols: int, step: int,
                 todo: list[_Patch]) -> None:
        self.ckpt, self.key, self.in_dtype, self.in_size = ckpt, key, in_dtype, in_size
        self.out_dtype, self.n, self.cols, self.step, self.todo = out_dtype, n, cols, step, todo
        self.safe = range_safe(todo, out_dtype)

    def lane(self, slot: _Slot, sink: TensorSink, queue: _Chunks, cancel: CancelFlag | None,
             threads: int, cpu: int | None = None) -> None:
        """Bake and write chunks taken from ``queue`` until none is left,
        with ``slot``'s buffers and ``threads`` torch threads; an error is
        handed to ``queue``, not raised."""
        from modelkit.lora.output import torch_threads

        full: _Views | None = None  # the views of a whole chunk, made once per weight
        with torch_threads(threads), _on_cpu(cpu):
            while (i := queue.take()) is not None:
                try:
                    check_cancel(cancel)
                    a = i * self.step
                    rows = min(self.n, a + self.step) - a
                    if rows < self.step:
                        v = self.views(slot, rows)
                    else:
                        v = full = full or self.views(slot, rows)
                    self.run(a, v)
                    sink.write(a * v.row_bytes, v.data)
                except BaseException as exc:  # the caller raises it, in chunk order
                    # a cancel or a signal outranks any chunk's error
                    queue.fail(i if isinstance(exc, Exception) and not isinstance(
                        exc, Cancelled) else -1, exc)
                    return

    def views(self, slot: _Slot, rows: int) -> _Views:
        """``slot``'s buffers seen as a chunk of ``rows`` rows."""
        import torch

        cols = self.cols
        f32, out = slot.buffers(rows * cols, self.out_dtype)
        return _Views(f32.view(rows, cols), out.view(rows, cols),
                      out.view(torch.uint8).numpy().data, cols * self.out_dtype.itemsize)

    def run(self, a: int, v: _Views) -> None:
        """Rows ``a:a+rows`` of the weight, converted from the file's memory
        map (no copy in between) and baked into ``v.dst``."""
        import torch

        rows = v.acc.shape[0]
        b = a + rows
        start, size = a * self.cols * self.in_size, rows * self.cols * self.in_size
        base = torch.frombuffer(self.ckpt.view(self.key, start, size),
                                dtype=self.in_dtype).view(rows, self.cols)
        v.acc.copy_(base)
        self.ckpt.unmap(self.key, start, size)  # read again only if the range check fails
        for p in self.todo:
            lo, hi = max(a, p.row0), min(b, p.row0 + p.delta.out)
            if lo < hi:
                p.delta.add_rows_(v.acc[lo - a:hi - a], lo - p.row0, hi - p.row0, p.k)
        if not self.safe:
            check_range(self.key, v.acc, base, self.todo, self.out_dtype)
        v.dst.copy_(v.acc)


class _Views(NamedTuple):
    """A slot's buffers as one chunk: the float32 rows, the output rows and
    their bytes, and the bytes of one output row."""

    acc: torch.Tensor
    dst: torch.Tensor
    data: memoryview
    row_bytes: int


__all__ = ["check_range", "chunkable", "range_safe", "streamer"]
