"""Small numeric helpers shared by reports: chunked L2 sums, relative L2 and
SNR. torch is imported only when a helper runs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelkit.vocab import CHUNK_ELEMENTS

if TYPE_CHECKING:
    import torch


def chunk_pairs(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK_ELEMENTS
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat slices of two tensors with the same number of elements."""
    x, y = a.reshape(-1), b.reshape(-1)
    for i in range(0, x.numel(), chunk):
        yield x[i:i + chunk], y[i:i + chunk]


def l2_sums(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """``(sum (a - b)^2, sum b^2)`` over chunk pairs ``(a, b)`` (callers yield
    1M-element slices, so no whole-tensor float32 copy). Each chunk's sums
    are float32 dot products (blocked BLAS sums: relative error around 1e-6,
    plenty for a reported error figure, and several times faster than
    float64 sums); the chunks add up in Python floats."""
    import torch

    diff = ref = 0.0
    for a, b in pairs:
        x = a.reshape(-1).to(torch.float32)
        y = b.reshape(-1).to(torch.float32)
        d = x - y
        diff += float(torch.dot(d, d))
        ref += float(torch.dot(y, y))
    return diff, ref


@dataclass
class L2Sums:
    """Running sums over a group of tensors for ``||a - b|| / ||b||`` (``b``
    the reference): per block, per component, overall."""

    n_tensors: int = 0
    diff_sq: float = 0.0
    ref_sq: float = 0.0

    @property
    def relative_l2(self) -> float:
        return relative_l2(self.diff_sq, self.ref_sq)

    def add_tensors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add one tensor pair (``b`` the reference), chunk by chunk."""
        diff, ref = l2_sums(chunk_pairs(a, b))
        self.diff_sq += diff
        self.ref_sq += ref
        self.n_tensors += 1


def relative_l2(diff_sq: float, ref_sq: float) -> float:
    """``||a - b|| / ||b||`` from :func:`l2_sums` (0 for an all-zero ``b``)."""
    return math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0


def snr_db(diff_sq: float, ref_sq: float) -> float:
    """Signal-to-noise ratio of ``b`` against ``a - b`` in dB (inf when equal)."""
    if diff_sq == 0:
        return math.inf
    return 10 * math.log10(ref_sq / diff_sq) if ref_sq else 0.0
