"""What every convert operation returns, and the per-key plumbing they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from modelkit.io.source import Source

if TYPE_CHECKING:
    import torch

    from modelkit.io.writer import TensorSink


def chunked_apply(t: torch.Tensor, out_dtype: torch.dtype,
                  fn: Callable[[torch.Tensor], torch.Tensor],
                  chunk: int = 1 << 20) -> torch.Tensor:
    """``fn(float32 chunk) -> chunk`` over ``t`` in 1M-element pieces, written
    into a new ``out_dtype`` tensor of ``t``'s shape (float32 math stays in
    cache, and no whole-tensor float32 copy is made)."""
    import torch

    out = torch.empty(t.shape, dtype=out_dtype, device=t.device)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), chunk):
        dst[i:i + chunk].copy_(fn(src[i:i + chunk].to(torch.float32)))
    return out


def passthrough(keys: dict[str, tuple[Source, str]]
                ) -> Callable[[str, TensorSink], bool] | None:
    """A ``stream`` route for a DerivedSource: output keys whose bytes are an
    input tensor's bytes unchanged (same dtype and shape) are copied file to
    file in the kernel, when that input is a safetensors file; the writer
    asks ``get`` for every other key. ``keys`` maps such output keys to
    (source, key in it). Returns None when no key qualifies."""
    raw = {k: (s, o) for k, (s, o) in keys.items() if getattr(s, "raw_readable", False)}
    if not raw:
        return None

    def stream(key: str, sink: TensorSink) -> bool:
        found = raw.get(key)
        if found is None:
            return False
        sink.copy_from(*found)
        return True

    return stream
