"""What every convert operation returns, and the per-key plumbing they share."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelkit.errors import ModelkitError
from modelkit.io.source import DerivedSource, Source, source_label

if TYPE_CHECKING:
    import torch

    from modelkit.inspect.report import ModelReport


@dataclass
class Converted:
    """A convert operation's result before it is written: the output as a
    source, the operation's report (some fields fill in while the output is
    written) and the ``modelkit.history`` record of what was done."""

    source: DerivedSource
    report: Any
    op: str
    params: dict[str, Any] = field(default_factory=dict)


def describe(source: Source) -> ModelReport:
    """The inspect report of a source, from its infos and metadata alone."""
    from pathlib import Path

    from modelkit.inspect.report import build_report

    return build_report(Path(source_label(source)), source.infos, source.metadata,
                        "safetensors", None)


def require_checkpoint(source: Source, what: str, kinds: tuple[str, ...] = ("checkpoint",)
                       ) -> ModelReport:
    """The report of ``source``; a one-line error unless it is one of ``kinds``
    of a known SD architecture."""
    rep = describe(source)
    name = source_label(source)
    if rep.kind not in kinds:
        want = " or ".join(kinds)
        raise ModelkitError(f"{name}: is a {rep.kind}, not a {want}; {what} takes a "
                            f"Stable Diffusion {want}")
    return rep


def chunked_apply(t: torch.Tensor, out_dtype: torch.dtype, fn: Any,
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


def l2_sums(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """``(sum (a - b)^2, sum b^2)`` in float64 over chunk pairs ``(a, b)``
    (callers yield 1M-element slices, so no whole-tensor float32 copy)."""
    import torch

    diff = ref = 0.0
    for a, b in pairs:
        x, y = a.to(torch.float32), b.to(torch.float32)
        diff += float(torch.sum((x - y) ** 2, dtype=torch.float64))
        ref += float(torch.sum(y * y, dtype=torch.float64))
    return diff, ref


def relative_l2(diff_sq: float, ref_sq: float) -> float:
    """``||a - b|| / ||b||`` from :func:`l2_sums` (0 for an all-zero ``b``)."""
    return math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0


def snr_db(diff_sq: float, ref_sq: float) -> float:
    """Signal-to-noise ratio of ``b`` against ``a - b`` in dB (inf when equal)."""
    if diff_sq == 0:
        return math.inf
    return 10 * math.log10(ref_sq / diff_sq) if ref_sq else 0.0
