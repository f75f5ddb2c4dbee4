"""``static.zeroed``: weight tensors that are all zeros; :func:`scan_checks`
runs it with ``static.nan_inf`` in one read of each tensor.

A trained matrix or convolution is never exactly zero; a zeroed one is a
broken merge, a failed load written back, or a bad edit. Biases and norm
vectors may legitimately be zero (and LoRA ``up`` weights start at zero,
but verify checks checkpoints), so only tensors of two or more dimensions
count. One reduction per 1M-element chunk; an all-zero tensor costs a full
read, any other usually stops at its first chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from modelkit.core.verify_thresholds import FAIL, PASS
from modelkit.errors import CancelFlag, check_cancel
from modelkit.numeric import CHUNK_ELEMENTS
from modelkit.progress import ProgressFn, no_progress
from modelkit.verify.report import Check

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import Source

LIST = 5


def is_zero(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is zero (NaN is not zero)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[i:i + CHUNK_ELEMENTS]
        if chunk.element_size() == 1:
            chunk = chunk.float()  # fp8/int8: no CPU kernel for some reductions
        if bool(chunk.any()) or bool(chunk.isnan().any()):
            return False
    return flat.numel() > 0


def zeroed_check(source: Source, cancel: CancelFlag | None = None) -> Check:
    """Fail naming the weight tensors (2-D or more) that are all zeros."""
    keys = [k for k, i in source.infos.items() if len(i.shape) >= 2]
    bad = []
    for key in keys:
        check_cancel(cancel)
        if is_zero(source.get(key)):
            bad.append(key)
    return _zeroed(bad, len(keys))


def scan_checks(source: Source, progress: ProgressFn = no_progress,
                cancel: CancelFlag | None = None) -> tuple[Check, Check]:
    """``static.nan_inf`` and ``static.zeroed`` from one read of each tensor
    (the same checks as :func:`modelkit.verify.static.finite_check` and
    :func:`zeroed_check`)."""
    from modelkit.verify.static import finite_check

    zeroed: list[str] = []
    weights = {k for k, i in source.infos.items() if len(i.shape) >= 2}

    def get(key: str) -> torch.Tensor:
        t = source.get(key)
        if key in weights and is_zero(t):
            zeroed.append(key)
        return t

    nan = finite_check(cast("Source", _Reading(source, get)), progress, cancel)
    for key in sorted(weights - {k for k, i in source.infos.items() if i.is_float}):
        check_cancel(cancel)  # int8 weights: not in the NaN scan
        if is_zero(source.get(key)):
            zeroed.append(key)
    return nan, _zeroed(zeroed, len(weights))


class _Reading:
    """``source`` whose ``get`` goes through ``get`` (to look at each tensor
    read once by the NaN scan)."""

    def __init__(self, source: Source, get: Callable[[str], torch.Tensor]) -> None:
        self.infos = source.infos
        self.get = get


def _zeroed(bad: list[str], scanned: int) -> Check:
    if bad:
        more = f" and {len(bad) - LIST} more" if len(bad) > LIST else ""
        return Check("static.zeroed", FAIL, f"{len(bad)} weight tensors are all zeros: "
                     f"{', '.join(bad[:LIST])}{more}", len(bad))
    return Check("static.zeroed", PASS, f"{scanned} weight tensors scanned", 0)
