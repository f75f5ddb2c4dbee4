"""GGML Q4_K, Q5_K and Q2_K quantizers: the k-quants whose sub-block scales
and mins come from ``make_qkx2_quants`` (ggml-org/ggml ``src/ggml-quants.c``:
``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``,
``quantize_row_q2_K_ref``), byte-identical to ggml's reference.

The C code searches, for each sub-block, ``nstep + 1`` candidate scales plus
its first guess, and keeps the first one whose weighted error is strictly
lowest. Here every sub-block of a chunk and every candidate is one column of
a ``[n, candidates, sub-blocks]`` tensor; the within-sub-block index ``n``
leads, so that each sum is the C loop's sequential float32 sum (one
vectorised column add per index, never a pairwise ``torch.sum``) and every
rounding, so every choice, is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QK_K = 256
# Sub-blocks per chunk: 2048 sub-blocks of 32 (64 Ki weights) keep a chunk's
# working set near the L2 cache.
CHUNK_WEIGHTS = 1 << 16


@dataclass(frozen=True)
class Search:
    """The parameters of one type's ``make_qkx2_quants`` call.

    Args:
        n: weights per sub-block.
        nmax: the largest code.
        rmin: the first candidate's offset to ``nmax``.
        rdelta: the step between candidates.
        nstep: candidates after the first (``nstep + 1`` in all).
        use_mad: absolute instead of squared error.
    """

    n: int
    nmax: int
    rmin: float
    rdelta: float
    nstep: int
    use_mad: bool

    def numerators(self) -> list[float]:
        """Each candidate's ``rmin + rdelta*is + nmax`` as C rounds it in
        float32, first guess (``nmax``) first."""
        import numpy as np

        f = np.float32
        out = [float(f(self.nmax))]
        for step in range(self.nstep + 1):
            out.append(float(f(f(self.rmin) + f(self.rdelta) * f(step)) + f(self.nmax)))
        return out


# quantize_row_q4_K_ref / q5_K_ref / q2_K_ref's make_qkx2_quants arguments.
Q4_K_SEARCH = Search(32, 15, -1.0, 0.1, 20, False)
Q5_K_SEARCH = Search(32, 31, -0.5, 0.1, 15, False)
Q2_K_SEARCH = Search(16, 3, -0.5, 0.1, 15, True)


def _seq_sum(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = t[0] + t[1] + ...`` added in that order (C's loop), in place."""
    out.copy_(t[0])
    for i in range(1, t.shape[0]):
        out.add_(t[i])
    return out


def _search(x: torch.Tensor, w: torch.Tensor, p: Search
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` for every column of ``x`` and ``w`` (``[n, S]``:
    the sub-block index leads). Returns the codes ``L`` (float32 ``[n, S]``),
    the scales and the mins (``the_min``, float32 ``[S]``).

    The candidates run one after the other: when one wins, C's loop goes on
    with its ``min`` (``iscale = (...)/(max - min)`` and ``x[i] - min``), so
    each candidate depends on the previous winner."""
    import torch

    s = x.shape[1]
    mx = x.amax(dim=0)
    mn = torch.clamp(x.amin(dim=0), max=0.0)
    flat = mx == mn
    sum_w = _seq_sum(w, torch.empty(s))
    sum_x = _seq_sum(w * x, torch.empty(s))
    nums = p.numerators()
    iscale = _rdiv(nums[0], mx - mn)
    scale = 1 / iscale
    codes = ((x - mn) * iscale).round_().clamp_(0, p.nmax)
    best = _error(x, w, codes, scale, mn, p.use_mad)
    for num in nums[1:]:
        iscale = _rdiv(num, mx - mn)
        cand = ((x - mn) * iscale).round_().clamp_(0, p.nmax)
        wl = w * cand
        sums = _seq_sum(torch.stack((wl, wl * cand, wl * x), dim=1), torch.empty(3, s))
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        cur = _error(x, w, cand, this_scale, this_min, p.use_mad)
        won = (d > 0) & (cur < best)
        codes = torch.where(won, cand, codes)
        best = torch.where(won, cur, best)
        scale = torch.where(won, this_scale, scale)
        mn = torch.where(won, this_min, mn)
    codes[:, flat] = 0
    scale[flat] = 0
    return codes, scale, -mn


def _error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
           mn: torch.Tensor, use_mad: bool) -> torch.Tensor:
    """The weighted error ``sum w * (scale*L + min - x)**2`` (or ``|...|``)
    of each column, summed in C's order."""
    import torch

    diff = (scale * codes + mn) - x
    diff = diff.abs_() if use_mad else diff.mul_(diff)
    return _seq_sum(w * diff, torch.empty(x.shape[1]))


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` rounded once, as C divides (torch computes a Python
    number over a tensor as ``t.reciprocal() * num``: two roundings)."""
    import torch

    return torch.full_like(t, num).div_(t)


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """C's ``max = 0; if (v > max) max = v;`` over each row of ``v``: +0.0
    when nothing is positive."""
    import torch

    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (exact for |v| < 2**22), as
    int32."""
    import torch

    return (v + 12582912.0).view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16`` (round to nearest even) of ``v`` ``[B]`` as uint8
    ``[B, 2]`` (little-endian) and its value back in float32."""
    import torch

    h = v.to(torch.float16)
    return h.view(torch.uint8).view(-1, 2), h.to(torch.float32)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of 6-bit scales ``ls`` and mins ``lm`` (int32 ``[B, 8]``)
    as ``quantize_row_q4_K_ref`` packs them (read by ``get_scale_min_k4``)."""
    import torch

    out = torch.empty(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out.to(torch.uint8)


def _k4_chunk(xb: torch.Tensor, p: Search) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's common part for the blocks ``xb`` (float32 ``[B, 256]``):
    the 16 bytes d, dmin and scales, and the codes (int32 ``[B, 256]``)."""
    import torch

    nb = xb.shape[0]
    xt = xb.reshape(nb * 8, 32).t().contiguous()  # [32, S]
    sum_x2 = _seq_sum(xt * xt, torch.empty(xt.shape[1]))
    # sqrtf, correctly rounded (torch.sqrt on float32 may be off by one ulp)
    av_x = (sum_x2 / 32).double().sqrt_().float()
    w = xt.abs() + av_x
    codes, scales, mins = _search(xt, w, p)
    scales = scales.view(nb, 8)
    mins = mins.view(nb, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    head = torch.empty(nb, 16, dtype=torch.uint8)
    head[:, 0:2], d16 = _fp16_bytes(max_scale / 63.0)
    head[:, 2:4], dmin16 = _fp16_bytes(max_min / 63.0)
    head[:, 4:16] = _pack_scales_k4(ls, lm)
    d = (d16[:, None] * ls).view(-1)  # [S]
    dm = (dmin16[:, None] * lm).view(-1)
    q = _nearest_int((xt + dm) / d).clamp_(0, p.nmax)
    # `if (!d) continue;`: those sub-blocks keep the search's codes
    q = torch.where(d == 0, codes.to(torch.int32), q)
    return head, q.t().reshape(nb, 256), codes


def _q2_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q2_K_ref`` of the blocks ``xb`` (float32 ``[B, 256]``)
    as uint8 ``[B, 84]``: 16 bytes of 4-bit scales and mins, 64 bytes of
    2-bit codes, fp16 d and dmin."""
    import torch

    nb = xb.shape[0]
    xt = xb.reshape(nb * 16, 16).t().contiguous()  # [16, S]
    codes, scales, mins = _search(xt, xt.abs(), Q2_K_SEARCH)
    scales = scales.view(nb, 16)
    mins = mins.view(nb, 16)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _rdiv(15.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(15.0, max_min), torch.zeros_like(max_min))
    # y[i].scales[j] = l; y[i].scales[j] |= (l << 4): uint8 stores
    sc = (_nearest_int(inv_scale[:, None] * scales) | (_nearest_int(inv_min[:, None] * mins) << 4)
          ) & 0xFF
    out = torch.empty(nb, 84, dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8)
    out[:, 80:82], d16 = _fp16_bytes(max_scale / 15.0)
    out[:, 82:84], dmin16 = _fp16_bytes(max_min / 15.0)
    d = (d16[:, None] * (sc & 0xF)).view(-1)
    dm = (dmin16[:, None] * (sc >> 4)).view(-1)
    q = _nearest_int((xt + dm) / d).clamp_(0, 3)
    q = torch.where(d == 0, codes.to(torch.int32), q)
    q = q.t().reshape(nb, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out[:, 16:80] = packed.reshape(nb, 64).to(torch.uint8)
    return out


def _q4_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q4_K_ref`` of ``xb`` (float32 ``[B, 256]``) as uint8
    ``[B, 144]``: fp16 d and dmin, 12 bytes of scales, 128 of nibbles."""
    import torch

    head, q, _ = _k4_chunk(xb, Q4_K_SEARCH)
    q = q.view(-1, 4, 2, 32)
    nibbles = q[:, :, 0] | (q[:, :, 1] << 4)
    return torch.cat((head, nibbles.reshape(-1, 128).to(torch.uint8)), dim=1)


def _q5_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q5_K_ref`` of ``xb`` (float32 ``[B, 256]``) as uint8
    ``[B, 176]``: fp16 d and dmin, 12 bytes of scales, 32 bytes of high bits
    (bit k of byte j: code ``32k + j`` > 15), 128 of low nibbles."""
    import torch

    head, q, _ = _k4_chunk(xb, Q5_K_SEARCH)
    q = q.view(-1, 8, 32)
    high = (q >> 4) << torch.arange(8, dtype=torch.int32)[:, None]
    qh = high.sum(dim=1)
    low = (q & 0xF).view(-1, 4, 2, 32)
    nibbles = low[:, :, 0] | (low[:, :, 1] << 4)
    return torch.cat((head, qh.to(torch.uint8), nibbles.reshape(-1, 128).to(torch.uint8)), dim=1)


def _quantize(x: torch.Tensor, chunk_fn: Callable[[torch.Tensor], torch.Tensor],
              block_bytes: int) -> torch.Tensor:
    """Run ``chunk_fn`` over the 256-weight blocks of ``x`` chunk by chunk."""
    import torch

    flat = x.reshape(-1)
    if flat.numel() % QK_K:
        raise ValueError(f"{flat.numel()} values are not a multiple of {QK_K}")
    blocks = flat.view(-1, QK_K)
    out = torch.empty(blocks.shape[0], block_bytes, dtype=torch.uint8)
    step = CHUNK_WEIGHTS // QK_K
    for start in range(0, blocks.shape[0], step):
        xb = blocks[start:start + step].to(torch.float32)
        out[start:start + step] = chunk_fn(xb)
    return out


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """GGML Q4_K blocks (uint8 ``[n / 256, 144]``) of the float32 values
    ``x``, byte-identical to ggml's ``quantize_q4_K`` without importance."""
    return _quantize(x, _q4_chunk, 144)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """GGML Q5_K blocks (uint8 ``[n / 256, 176]``) of the float32 values
    ``x``, byte-identical to ggml's ``quantize_q5_K`` without importance."""
    return _quantize(x, _q5_chunk, 176)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    """GGML Q2_K blocks (uint8 ``[n / 256, 84]``) of the float32 values
    ``x``, byte-identical to ggml's ``quantize_q2_K`` without importance."""
    return _quantize(x, _q2_chunk, 84)
