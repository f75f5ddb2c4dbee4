"""Low-rank factorisation of one ΔW: a fast truncated SVD, the rank rule and
the exact reconstruction error, shared by extract, resize and merge.

SVD: for a rank cap r on an ``m x n`` matrix, a randomized range finder
(Halko, Martinsson & Tropp 2011): ``q = r + OVERSAMPLE`` Gaussian probes,
``POWER_ITERS`` power iterations with QR re-orthonormalisation, then an
exact SVD of the small ``q x n`` projection (on synthetic low-rank + noise
SD layers the error was 0.5-1.2 % above the exact optimum with one power
iteration, 0.4-0.7 % with two, at 1.5x the time). When ``q`` reaches half the
smaller dimension an exact thin SVD is as cheap and is used instead.

Rank rule: the rank cap, or with ``energy`` e the smallest r (at most the
cap) whose singular values keep ``sum(S[:r]^2) >= e * ||ΔW||^2`` (the total
is the exact Frobenius norm, not the sum of the computed values).

Error: ``||ΔW - up @ down|| / ||ΔW||`` computed on the stored factors
(after the cast to the output dtype), chunked over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelkit.numeric import CHUNK_ELEMENTS

if TYPE_CHECKING:
    import torch

OVERSAMPLE = 10
POWER_ITERS = 1  # measured: within ~1% of the exact optimum at 1.5x the speed of 2
METHODS = ("auto", "randomized", "exact")


@dataclass
class Factors:
    """``up [m, r]`` and ``down [r, n]`` with ΔW ≈ up @ down, and the squared
    norms behind the error figures."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    err_sq: float  # ||ΔW - up @ down||^2 with the stored factors
    ref_sq: float  # ||ΔW||^2

    @property
    def relative_error(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def _gen(device: torch.device | str, seed: int) -> torch.Generator:
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def randomized_svd(a: torch.Tensor, q: int, iters: int = POWER_ITERS, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``q`` ``(U, S, Vh)`` of ``a`` (float32) by a randomized range finder."""
    import torch

    transpose = a.shape[0] < a.shape[1]
    mat = a.T if transpose else a  # tall: m >= n
    probe = torch.randn(mat.shape[1], q, generator=_gen(a.device, seed), device=a.device)
    basis, _ = torch.linalg.qr(mat @ probe)
    for _ in range(iters):
        back, _ = torch.linalg.qr(mat.T @ basis)
        basis, _ = torch.linalg.qr(mat @ back)
    small = basis.T @ mat  # q x n
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ u_small
    if transpose:
        return vh.T, s, u.T
    return u, s, vh


def truncated_svd(a: torch.Tensor, cap: int, method: str = "auto", seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least the top ``cap`` singular triplets of ``a`` (more when cheap)."""
    import torch

    small = min(a.shape)
    q = min(small, cap + OVERSAMPLE)
    if method == "exact" or (method == "auto" and 2 * q >= small):
        return torch.linalg.svd(a, full_matrices=False)
    return randomized_svd(a, q, seed=seed)


def choose_rank(s: torch.Tensor, ref_sq: float, cap: int, energy: float | None) -> int:
    """The rank to keep: ``cap``, or the smallest rank reaching ``energy`` of
    ``ref_sq`` (capped)."""
    import torch

    cap = max(1, min(cap, s.numel()))
    if energy is None:
        return cap
    kept = torch.cumsum(s.double() ** 2, 0)
    need = energy * ref_sq
    hit = int(torch.searchsorted(kept, torch.tensor([need], dtype=kept.dtype)).item()) + 1
    return max(1, min(cap, hit))


def residual_sq(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||a - up @ down||^2`` in row chunks (float32 math, float64 sum)."""
    import torch

    total = 0.0
    step = max(1, CHUNK_ELEMENTS // max(1, a.shape[1]))
    upf, downf = up.float(), down.float()
    for i in range(0, a.shape[0], step):
        part = torch.addmm(a[i:i + step], upf[i:i + step], downf, alpha=-1.0)
        total += float(torch.sum(part * part, dtype=torch.float64))
    return total


def factorize(a: torch.Tensor, cap: int, energy: float | None = None, *,
              method: str = "auto", dtype: torch.dtype | None = None, seed: int = 0,
              ref_sq: float | None = None) -> Factors:
    """Factor ``a`` (``[m, n]`` float32) into ``up @ down`` of rank at most
    ``cap``; singular values are split evenly (``up = U·√S``, ``down =
    √S·Vh``) so half-precision factors keep their range. ``dtype`` is the
    storage type the error is measured in."""
    import torch

    if ref_sq is None:
        ref_sq = float(torch.sum(a * a, dtype=torch.float64))
    u, s, vh = truncated_svd(a, cap, method, seed)
    r = choose_rank(s, ref_sq, cap, energy)
    root = s[:r].sqrt()
    up = (u[:, :r] * root).contiguous()
    down = (vh[:r] * root[:, None]).contiguous()
    if dtype is not None:
        up, down = up.to(dtype), down.to(dtype)
    return Factors(up, down, r, residual_sq(a, up, down), ref_sq)


__all__ = ["METHODS", "Factors", "choose_rank", "factorize", "randomized_svd",
           "residual_sq", "truncated_svd"]
