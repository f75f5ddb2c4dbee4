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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelkit.io.ggml._cfloat import fp16_bytes, fp16_value, nearest_int
from modelkit.io.ggml.k_qkx2_dequant import dequantize_q2_k, dequantize_q4_k, dequantize_q5_k

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize_q2_k", "dequantize_q4_k", "dequantize_q5_k", "quantize_q2_k",
           "quantize_q4_k", "quantize_q5_k"]

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


# torch's float32 sum over a leading dimension (aten/src/ATen/native/cpu/
# SumKernel.cpp, multi_row_sum) adds each column's rows one after the other
# in chunks of 16 rows, then adds the chunk sums; with one thread and column
# counts in multiples of 4 SIMD vectors. So up to 17 rows it is C's loop, and
# 32 rows are two sums: rows 0-15 into a carry row, then the carry and rows
# 16-31 (17 rows). `_cascade_is_sequential` checks that on this build first.
COLUMN_MULTIPLE = 64
_CASCADE_OK: bool | None = None


def _cascade_is_sequential() -> bool:
    """Whether ``torch.sum`` over dim 0 of up to 17 rows adds them in order
    here (a sum whose every rounding tells the order apart)."""
    global _CASCADE_OK
    if _CASCADE_OK is None:
        import torch

        gen = torch.Generator().manual_seed(20)
        t = torch.randn(17, 3 * COLUMN_MULTIPLE, generator=gen)
        t = t * torch.rand(17, 1, generator=gen).pow(6).mul(1e4)
        _CASCADE_OK = all(
            bool(torch.equal(t[:k].sum(dim=0), _seq_sum(t[:k], torch.empty(t.shape[1]))))
            for k in (16, 17))
    return _CASCADE_OK


class _Rows:
    """The row layout of a ``[rows, S]`` buffer for sub-blocks of ``n``:
    ``n`` rows, plus a carry row after row 15 when ``n`` is 32 (the first
    sum's result, see above)."""

    def __init__(self, n: int) -> None:
        if n not in (16, 32):
            raise ValueError(f"sub-blocks of {n}")
        self.n = n
        self.rows = n + (1 if n > 16 else 0)
        self.fast = _cascade_is_sequential()

    def load(self, buf: torch.Tensor, xt: torch.Tensor) -> None:
        """Copy ``xt`` (``[n, S]``) into the data rows of ``buf``, zero the
        carry row."""
        if self.n == 16:
            buf.copy_(xt)
            return
        buf[:16] = xt[:16]
        buf[16] = 0
        buf[17:] = xt[16:]

    def data(self, buf: torch.Tensor) -> torch.Tensor:
        """The ``n`` data rows of ``buf`` (a copy when there is a carry row)."""
        import torch

        return buf if self.n == 16 else torch.cat((buf[:16], buf[17:]))

    def colsum(self, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` = the data rows of ``buf`` summed in C's order (the
        carry row of ``buf`` is overwritten)."""
        import torch

        if not self.fast:
            out.copy_(buf[0])
            for i in range(1, self.rows):
                if i != 16 or self.n == 16:
                    out.add_(buf[i])
            return out
        if self.n == 16:
            return torch.sum(buf, dim=0, out=out)
        torch.sum(buf[:16], dim=0, out=buf[16])
        return torch.sum(buf[16:], dim=0, out=out)


class _Searcher:
    """``make_qkx2_quants`` of ``S`` sub-blocks at once (``S`` a multiple of
    64), with its buffers reused from chunk to chunk.

    The candidates run one after the other: when one wins, C's loop goes on
    with its ``min`` (``iscale = (...)/(max - min)`` and ``x[i] - min``), so
    each candidate depends on the previous winner. Within a candidate every
    op is over all ``S`` columns and all rows at once. The winner's codes are
    not copied as it wins: its ``iscale`` and the ``min`` it started from are
    kept, and its codes computed again (the same ops) at the end."""

    def __init__(self, p: Search, s: int) -> None:
        import torch

        self.p = p
        self.r = _Rows(p.n)
        rows = self.r.rows
        # tx[:, 0]: the candidate's codes, tx[:, 1]: x (one product with both)
        self.tx = torch.empty(rows, 2, s)
        self.t, self.x = self.tx[:, 0], self.tx[:, 1]
        self.w = torch.empty(rows, s)
        self.prod = torch.empty(rows, 3, s)
        self.nums = p.numerators()
        # state rows: best error, scale, min, the winner's iscale, its start min
        self.state = torch.empty(5, s)
        self.cand = torch.empty(5, s)
        self.sums = torch.empty(3, s)

    def run(self, xt: torch.Tensor, wt: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Search the columns of ``xt`` with weights ``wt`` (``[n, S]``).
        Returns the codes (float32 ``[n, S]``), the scales and ``the_min``
        (``[S]``)."""
        import torch

        r, w, state, cand = self.r, self.w, self.state, self.cand
        r.load(self.x, xt)
        r.load(w, wt)
        mx = xt.amax(dim=0)
        mn = torch.clamp(xt.amin(dim=0), max=0.0)
        flat = mx == mn
        span = mx - mn
        # spans so small that iscale overflows (or non-finite values): round
        # with ggml's exact nearest_int, as its release build does
        ok = flat | ((span >= 2.0 ** -100) & (span <= 3.4e38))
        exotic = not bool(ok.all())
        sum_w, sum_x = self._hoisted()
        iscale = _rdiv(self.nums[0], span)
        self._codes(mn, iscale, exotic)
        torch.reciprocal(iscale, out=state[1])
        state[2] = mn
        state[3] = iscale
        state[4] = mn
        self._error(state[1], state[2], state[0])
        for num in self.nums[1:]:
            cand[4] = state[2]
            _rdiv(num, mx - state[2], out=cand[3])
            self._codes(cand[4], cand[3], exotic)
            d = self._fit(sum_w, sum_x)
            self._error(cand[1], cand[2], cand[0])
            won = (d > 0) & (cand[0] < state[0])
            torch.where(won, cand, state, out=state)
        self._codes(state[4], state[3], exotic)
        codes = r.data(self.t)
        codes[:, flat] = 0
        scale = torch.where(flat, torch.zeros_like(mn), state[1])
        the_min = torch.where(flat, mn, state[2]).neg_()
        return codes, scale, the_min

    def _hoisted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_w`` and ``sum_x`` (``sum w*x``) of each column."""
        import torch

        prod = self.prod
        torch.mul(self.w, self.x, out=prod[:, 1])
        prod[:, 0] = self.w
        out = torch.empty(2, self.w.shape[1])
        self.r.colsum(prod[:, :2], out)
        return out[0], out[1]

    def _fit(self, sum_w: torch.Tensor, sum_x: torch.Tensor) -> torch.Tensor:
        """The least-squares scale and min of the codes in ``self.t`` into
        ``cand[1]``, ``cand[2]`` (C's order of operations); returns ``D``."""
        import torch

        prod, cand = self.prod, self.cand
        torch.mul(self.w, self.t, out=prod[:, 0])
        torch.mul(prod[:, 0:1], self.tx, out=prod[:, 1:3])
        self.r.colsum(prod, self.sums)
        sum_l, sum_l2, sum_xl = self.sums[0], self.sums[1], self.sums[2]
        d = sum_w * sum_l2 - sum_l * sum_l
        torch.sub(sum_w * sum_xl, sum_x * sum_l, out=cand[1]).div_(d)
        torch.sub(sum_l2 * sum_x, sum_l * sum_xl, out=cand[2]).div_(d)
        pos = cand[2] > 0
        torch.where(pos, sum_xl / sum_l2, cand[1], out=cand[1])
        cand[2].masked_fill_(pos, 0.0)
        return d

    def _codes(self, mn: torch.Tensor, iscale: torch.Tensor, exotic: bool) -> None:
        """``self.t`` = ``MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))``."""
        import torch

        t = self.t
        torch.sub(self.x, mn, out=t)
        t.mul_(iscale)
        if exotic:
            t.copy_(nearest_int(t))
        else:
            t.round_()
        t.clamp_(0.0, float(self.p.nmax))

    def _error(self, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = each column's ``sum w * (scale*L + min - x)**2`` (or
        ``|...|``) for the codes in ``self.t``, summed in C's order."""
        import torch

        e = self.prod[:, 0]
        torch.mul(self.t, scale, out=e)
        e.add_(mn).sub_(self.x)
        if self.p.use_mad:
            e.abs_()
        else:
            e.mul_(e)
        e.mul_(self.w)
        self.r.colsum(e, out)


# per thread: a writer encodes chunks on two threads at once (io/gguf.py)
_LOCAL = threading.local()


def _search(xt: torch.Tensor, wt: torch.Tensor, p: Search
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` of the columns of ``xt`` (``[n, S]``) with
    weights ``wt``: codes (float32 ``[n, S]``), scales, ``the_min``."""
    import torch

    s = xt.shape[1]
    pad = -s % COLUMN_MULTIPLE
    if pad:  # zero columns: flat sub-blocks, dropped below
        xt = torch.nn.functional.pad(xt, (0, pad))
        wt = torch.nn.functional.pad(wt, (0, pad))
    key = (p, s + pad)
    searchers: dict[tuple[Search, int], _Searcher] = _LOCAL.__dict__.setdefault(
        "searchers", {})
    if key not in searchers:
        if len(searchers) > 4:
            searchers.clear()
        searchers[key] = _Searcher(p, s + pad)
    codes, scale, the_min = searchers[key].run(xt, wt)
    return codes[:, :s], scale[:s], the_min[:s]


def _rdiv(num: float, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``num / t`` rounded once, as C divides (torch computes a Python
    number over a tensor as ``t.reciprocal() * num``: two roundings)."""
    import torch

    if out is None:
        return torch.full_like(t, num).div_(t)
    return out.fill_(num).div_(t)


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """C's ``max = 0; if (v > max) max = v;`` over each row of ``v``: +0.0
    when nothing is positive."""
    import torch

    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``GGML_FP32_TO_FP16`` of ``v`` ``[B]``: its bytes ``[B, 2]`` and its
    value back in float32 ``[B]``."""
    return fp16_bytes(v), fp16_value(v)


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
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    head = torch.empty(nb, 16, dtype=torch.uint8)
    head[:, 0:2], d16 = _fp16(max_scale / 63.0)
    head[:, 2:4], dmin16 = _fp16(max_min / 63.0)
    head[:, 4:16] = _pack_scales_k4(ls, lm)
    d = (d16[:, None] * ls).view(-1)  # [S]
    dm = (dmin16[:, None] * lm).view(-1)
    q = nearest_int((xt + dm) / d).clamp_(0, p.nmax)
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
    sc = (nearest_int(inv_scale[:, None] * scales) | (nearest_int(inv_min[:, None] * mins) << 4)
          ) & 0xFF
    out = torch.empty(nb, 84, dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8)
    out[:, 80:82], d16 = _fp16(max_scale / 15.0)
    out[:, 82:84], dmin16 = _fp16(max_min / 15.0)
    d = (d16[:, None] * (sc & 0xF)).view(-1)
    dm = (dmin16[:, None] * (sc >> 4)).view(-1)
    q = nearest_int((xt + dm) / d).clamp_(0, 3)
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
