"""The fast route of a merge group whose leaves are safetensors files on the
CPU: the same per-key math as :func:`modelkit.merge.evaluate.merge_key`, with
the bytes moved differently.

* merged keys of an element-wise group: each 1M-element chunk of every input
  is read with ``pread`` into a buffer reused for the whole run, converted
  into a reused float32 buffer, evaluated, converted into a reused output
  buffer and written at its offset in the output file. Reading through the
  memory map instead faulted every page in (most of a merge's system time),
  and fresh buffers per chunk faulted their pages again;
* copied keys (unchanged tensors of model A, a baked VAE of the same dtype):
  copied file to file in the kernel.

Every other key (rebuilt position ids, a cast, inpainting channels) takes the
general route. Both routes give the same bytes (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkit.io.header import DTYPE_SIZES
from modelkit.merge.evaluate import Evaluator
from modelkit.merge.plan import Plan
from modelkit.vocab import CHUNK_ELEMENTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from modelkit.io.source import Source
    from modelkit.io.writer import TensorSink


def _raw(source: Source) -> bool:
    return bool(getattr(source, "raw_readable", False))


class _Buffers:
    """Chunk buffers reused for the whole run."""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {}
        self.f32: dict[str, torch.Tensor] = {}
        self.out: dict[Any, torch.Tensor] = {}

    def raw_for(self, name: str, nbytes: int) -> Any:
        import numpy as np

        buf = self.raw.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.raw[name] = np.empty(max(nbytes, CHUNK_ELEMENTS * 4), dtype=np.uint8)
        return buf

    def f32_for(self, name: str) -> torch.Tensor:
        import torch

        if name not in self.f32:
            self.f32[name] = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
        return self.f32[name]

    def out_for(self, dtype: torch.dtype) -> torch.Tensor:
        import torch

        if dtype not in self.out:
            self.out[dtype] = torch.empty(CHUNK_ELEMENTS, dtype=dtype)
        return self.out[dtype]


def streamer(plan: Plan, ev: Evaluator, vae: Source | None
             ) -> Callable[[str, TensorSink], bool] | None:
    """``stream(key, sink)`` for the group's output source, or None when the
    group cannot take the fast route (not on the CPU, or an input that is
    not a safetensors file)."""
    if ev.device != "cpu" or not all(_raw(s) for s in ev.sources.values()):
        return None
    by_key = {k.key: k for k in plan.keys}
    primary = ev.sources[plan.primary]
    buffers = _Buffers()

    def stream(key: str, sink: TensorSink) -> bool:
        kp = by_key[key]
        if kp.action == "copy":
            if primary.infos[key].dtype != kp.dtype:
                return False
            sink.copy_from(primary, key)
            return True
        if kp.action == "vae":
            if vae is None or kp.source_key is None or not _raw(vae) \
                    or vae.infos[kp.source_key].dtype != kp.dtype:
                return False
            sink.copy_from(vae, kp.source_key)
            return True
        if kp.action != "merge" or not ev.elementwise:
            return False
        shapes = {s.infos[key].shape for s in ev.sources.values()}
        if len(shapes) != 1:  # an inpainting A merges its first channels only
            return False
        _merge_chunks(ev, key, kp.dtype, buffers, sink)
        return True

    return stream


def _merge_chunks(ev: Evaluator, key: str, out_dtype: str, buffers: _Buffers,
                  sink: TensorSink) -> None:
    import torch

    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import ModelSource

    infos = {n: s.infos[key] for n, s in ev.sources.items()}
    numel = next(iter(infos.values())).numel
    out = buffers.out_for(to_torch(out_dtype))
    out_size = out.element_size()
    for start in range(0, numel, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, numel - start)
        leaves: dict[str, torch.Tensor] = {}
        for name, src in ev.sources.items():
            dtype = to_torch(infos[name].dtype)
            size = int(DTYPE_SIZES[infos[name].dtype])
            raw = buffers.raw_for(name, n * size)[:n * size]
            if not isinstance(src, ModelSource):  # streamer() took raw_readable sources only
                raise TypeError(f"{name}: the fast route reads safetensors files only")
            src.read_into(key, start * size, memoryview(raw))
            f32 = buffers.f32_for(name)[:n]
            f32.copy_(torch.from_numpy(raw).view(dtype))
            leaves[name] = f32
        result = ev.run(key, leaves.__getitem__)
        chunk = out[:n]
        chunk.copy_(result)
        del result
        sink.write(start * out_size, chunk.view(torch.uint8).numpy().data,
                   start + n >= numel)
