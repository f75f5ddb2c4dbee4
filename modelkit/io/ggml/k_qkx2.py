"""GGML Q4_K, Q5_K and Q2_K quantizers: the k-quants whose sub-block scales
and mins come from ``make_qkx2_quants`` (ggml-org/ggml ``src/ggml-quants.c``:
``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``,
``quantize_row_q2_K_ref``), byte-identical to ggml's reference.

For each sub-block the C code tries a first guess and then ``nstep + 1``
candidate scales one after the other, keeping a candidate when its weighted
error is strictly lower; a winner's ``min`` feeds the next candidate's
``iscale = (rmin + rdelta*is + nmax)/(max - min)``, so the candidates stay a
sequence. Every op here runs over all the sub-blocks of a chunk at once: a
``[n, S]`` buffer holds weight ``i`` of sub-block ``s`` at ``[i, s]``, and
each sum over ``i`` is the C loop's sequential float32 sum (torch's sum
over a leading dimension adds up to 16 rows in order: see ``_Rows``), so
every rounding, and so every choice, is the reference's. Divisions, square
roots and ``nearest_int`` are rounded as C rounds them (see ``_rdiv``).
With several intra-op threads the sums fall back to one add per row (exact,
slower); each Python thread has its own buffers.
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
# Weights per chunk: 8192 sub-blocks of 32, 256 Ki weights (measured best
# here: smaller chunks pay torch's per-op cost more often, larger ones leave
# the caches).
CHUNK_WEIGHTS = 1 << 18


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


# torch's float32 sum over a leading dimension (pytorch/pytorch
# aten/src/ATen/native/cpu/SumKernel.cpp, vectorized_outer_sum and
# multi_row_sum) adds each column's rows one after the other in chunks of 16
# rows, then adds the chunk sums, for columns in groups of 4 SIMD vectors
# (64 floats with AVX-512); leftover columns go through row_sum, which keeps
# 4 interleaved partial sums. So with one thread and a multiple of 64
# columns, up to 17 rows are C's loop, and 32 rows are two sums: rows 0-15
# into a carry row, then the carry and rows 16-31 (17 rows).
# `_cascade_is_sequential` checks it on this build first.
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
    sum's result, see above; its content is never read otherwise)."""

    def __init__(self, n: int) -> None:
        if n not in (16, 32):
            raise ValueError(f"sub-blocks of {n}")
        self.n = n
        self.rows = n + (1 if n > 16 else 0)
        self.fast = _cascade_is_sequential()
        # (buffer rows, sub-block positions) of the data
        self.parts = [(slice(0, n), slice(0, n))] if n == 16 else [
            (slice(0, 16), slice(0, 16)), (slice(17, 33), slice(16, 32))]

    def load(self, buf: torch.Tensor, xs: torch.Tensor) -> None:
        """Copy the sub-blocks ``xs`` (``[S', n]``, ``S' <= S``) into the
        columns of ``buf`` (transposed), zeros after them."""
        s = xs.shape[0]
        for rows, cols in self.parts:
            buf[rows, :s].copy_(xs[:, cols].t())
        buf[:, s:] = 0

    def colsum(self, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` = the data rows of ``buf`` summed in C's order (the
        carry row of ``buf`` is overwritten)."""
        import torch

        if not self.fast or torch.get_num_threads() != 1:
            # several intra-op threads may split the columns off the SIMD groups
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
    64), then the final codes of the type's stored scales, with buffers
    reused from chunk to chunk.

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
        # g: sum_w, then the candidate's sum_l, sum_l2, sum_xl, then sum_x
        self.g = torch.empty(5, s)
        self.sums = self.g[1:4]
        self.sum_l, self.sum_l2, self.sum_xl = self.sums
        # C's six products: z[0:3] - z[3:6] = [D, this_scale * D, this_min * D]
        self.z = torch.empty(6, s)
        self.span = torch.empty(s)
        # the candidates' rmin + rdelta*is + nmax as 0-d tensors: a tensor over a
        # tensor divides once (a Python number over a tensor is reciprocal * number)
        self.num_t = [torch.tensor(v, dtype=torch.float32) for v in self.nums]
        # the loop's views, made once (each slice is a Python-level op)
        self.p0, self.p12, self.p01 = self.prod[:, 0], self.prod[:, 1:3], self.prod[:, 0:1]
        z, g = self.z, self.g
        self.fit_ops = [(g[0::4], self.sum_l2, z[0:3:2]),  # sum_w*sum_l2, sum_x*sum_l2
                        (g[0:2], self.sum_xl, z[1::4]),  # sum_w*sum_xl, sum_l*sum_xl
                        (g[1::3], self.sum_l, z[3:5])]  # sum_l*sum_l, sum_x*sum_l
        self.z_left, self.z_right, self.d, self.z_num = z[0:3], z[3:6], z[0], z[1:3]
        self.c_err, self.c_scale, self.c_min = self.cand[0], self.cand[1], self.cand[2]
        self.c_fit, self.c_iscale, self.c_start = self.cand[1:3], self.cand[3], self.cand[4]
        self.nmax = float(p.nmax)
        self.mx = torch.zeros(s)
        self.mn = torch.zeros(s)
        self.exotic = False
        self.codes = torch.empty(p.n, s, dtype=torch.uint8)

    def load(self, xs: torch.Tensor, k4_weights: bool) -> None:
        """Take the sub-blocks ``xs`` (float32 ``[S', n]``) and their
        weights: Q4_K/Q5_K's ``av_x + |x|`` (``av_x = sqrtf(sum x^2 / 32)``)
        or Q2_K's ``|x|``."""
        import torch

        x = self.x
        self.r.load(x, xs)
        if self.r.rows > self.r.n:
            x[16] = x[0]  # the carry row, unread by the sums: no new max or min
        # over the leading dimension: vectorised across columns (the rows of xs
        # are too short for a fast reduction)
        torch.amax(x, dim=0, out=self.mx)
        torch.amin(x, dim=0, out=self.mn).clamp_(max=0.0)
        torch.abs(self.x, out=self.w)
        if k4_weights:
            sq = self.prod[:, 0]
            torch.mul(self.x, self.x, out=sq)
            sum_x2 = self.r.colsum(sq, torch.empty(self.w.shape[1]))
            # sqrtf, correctly rounded (torch.sqrt on float32 may be off by one ulp)
            self.w.add_(sum_x2.div_(32).double().sqrt_().float())

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Search every column; returns the scales and ``the_min`` (``[S]``)
        and leaves the codes in ``self.t``."""
        import torch

        state, cand, mx, mn = self.state, self.cand, self.mx, self.mn
        flat = mx == mn
        span = mx - mn
        # spans so small that iscale overflows (or non-finite values): round
        # with ggml's exact nearest_int, as its release build does. Otherwise
        # |iscale*(x - min)| < 2**22 and torch.round is nearest_int: it stays
        # below num for every x under the max, and a winner's min would have
        # to land within 2**-21 of the span below the max to break that
        # (not seen on any case; ggml's debug build asserts there)
        ok = flat | ((span >= 2.0 ** -100) & (span <= 3.4e38))
        self.exotic = not bool(ok.all())
        self._hoisted()
        iscale = _rdiv(self.nums[0], span)
        self._codes(mn, iscale)
        torch.reciprocal(iscale, out=state[1])
        state[2] = mn
        state[3] = iscale
        state[4] = mn
        self._error(state[1], state[2], state[0])
        start_min, iscale, best, smin, span = self.c_start, self.c_iscale, state[0], state[2], \
            self.span
        for num in self.num_t[1:]:
            start_min.copy_(smin)
            torch.div(num, torch.sub(mx, smin, out=span), out=iscale)
            self._codes(start_min, iscale)
            self._fit()
            self._error(self.c_scale, self.c_min, self.c_err)
            won = (self.d > 0).logical_and_(self.c_err < best)
            torch.where(won, cand, state, out=state)
        self._codes(state[4], state[3])
        if bool(flat.any()):
            self.t[:, flat] = 0
        scale = torch.where(flat, torch.zeros_like(mn), state[1])
        the_min = torch.where(flat, mn, state[2]).neg_()
        return scale, the_min

    def requantize(self, d: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        """The final codes ``nearest_int((x + dm)/d)`` clamped, or the
        search's where ``d`` is 0 (C's ``if (!d) continue;``), as uint8
        ``[n, S]`` (the sub-block index leads)."""
        import torch

        q = self.prod[:, 0]
        torch.add(self.x, dm, out=q).div_(d)
        if self.exotic:
            q.copy_(nearest_int(q))
        else:  # |q| < 2**22 here: round half to even is nearest_int
            q.round_()
        q.clamp_(0.0, float(self.p.nmax))
        zero = d == 0
        if bool(zero.any()):
            q[:, zero] = self.t[:, zero]
        for rows, cols in self.r.parts:
            self.codes[cols] = q[rows]
        return self.codes

    def _hoisted(self) -> None:
        """``sum_w`` and ``sum_x`` (``sum w*x``) of each column into the
        left and right factors."""
        import torch

        prod, g = self.prod, self.g
        torch.mul(self.w, self.x, out=prod[:, 1])
        prod[:, 0] = self.w
        self.r.colsum(prod[:, :2], g[3:5])
        g[0] = g[3]

    def _fit(self) -> None:
        """The least-squares scale and min of the codes in ``self.t`` into
        ``cand[1]``, ``cand[2]`` (C's products and order), ``D`` in
        ``self.d``."""
        import torch

        torch.mul(self.w, self.t, out=self.p0)
        torch.mul(self.p01, self.tx, out=self.p12)
        self.r.colsum(self.prod, self.sums)
        # D = sum_w*sum_l2 - sum_l*sum_l; this_scale = (sum_w*sum_xl -
        # sum_x*sum_l)/D; this_min = (sum_l2*sum_x - sum_l*sum_xl)/D
        for a, b, out in self.fit_ops:
            torch.mul(a, b, out=out)
        self.z_left.sub_(self.z_right)
        torch.div(self.z_num, self.d, out=self.c_fit)
        pos = self.c_min > 0
        if bool(pos.any()):  # rare but for all-positive sub-blocks
            torch.where(pos, self.sum_xl / self.sum_l2, self.c_scale, out=self.c_scale)
            self.c_min.masked_fill_(pos, 0.0)

    def _codes(self, mn: torch.Tensor, iscale: torch.Tensor) -> None:
        """``self.t`` = ``MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))``."""
        import torch

        t = self.t
        torch.sub(self.x, mn, out=t)
        t.mul_(iscale)
        if self.exotic:
            t.copy_(nearest_int(t))
        else:
            t.round_()
        t.clamp_(0.0, self.nmax)

    def _error(self, scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = each column's ``sum w * (scale*L + min - x)**2`` (or
        ``|...|``) for the codes in ``self.t``, summed in C's order."""
        import torch

        e = self.p0
        torch.mul(self.t, scale, out=e)
        e.add_(mn)
        if self.p.use_mad:
            e.sub_(self.x).abs_()
        else:
            # mse_loss without reduction (0): (a - b) * (a - b), both rounded, one
            # pass (its stub wants a str and no out=; the binding an int)
            torch._C._nn.mse_loss(e, self.x, 0, out=e)  # type: ignore[call-arg, arg-type]
        e.mul_(self.w)
        self.r.colsum(e, out)


_LOCAL = threading.local()  # each thread its own buffers


def _searcher(p: Search, s: int) -> _Searcher:
    """This thread's searcher for ``s`` sub-blocks (a multiple of 64)."""
    searchers: dict[tuple[Search, int], _Searcher] = getattr(_LOCAL, "searchers", {})
    _LOCAL.searchers = searchers
    key = (p, s)
    if key not in searchers:
        searchers.clear()  # one shape at a time: the last chunk of a tensor is smaller
        searchers[key] = _Searcher(p, s)
    return searchers[key]


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


def _searched(xb: torch.Tensor, p: Search, sub: int, *, k4_weights: bool
              ) -> tuple[_Searcher, torch.Tensor, torch.Tensor]:
    """The scale search over the ``sub`` sub-blocks of each block of ``xb``
    (float32 ``[B, 256]``): the searcher (for the requantization) and the
    scales and mins, ``[B, sub]``."""
    nb = xb.shape[0]
    se = _searcher(p, -(-nb * sub // COLUMN_MULTIPLE) * COLUMN_MULTIPLE)
    se.load(xb.view(nb * sub, 256 // sub), k4_weights=k4_weights)
    scales, mins = se.run()
    return se, scales[:nb * sub].view(nb, sub), mins[:nb * sub].view(nb, sub)


def _inverse_max(v: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the largest positive value of ``v`` and ``levels`` over it
    (0 where none is positive): the super-block scale's quantization step."""
    import torch

    top = _positive_max(v)
    return top, torch.where(top > 0, _rdiv(levels, top), torch.zeros_like(top))


def _k4_chunk(xb: torch.Tensor, p: Search) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's common part for the blocks ``xb`` (float32 ``[B, 256]``):
    the 16 bytes d, dmin and scales, and the codes (uint8 ``[32, S]``:
    code ``i`` of sub-block ``s``, ``S >= 8B``)."""
    import torch

    nb = xb.shape[0]
    se, scales, mins = _searched(xb, p, 8, k4_weights=True)
    max_scale, inv_scale = _inverse_max(scales, 63.0)
    max_min, inv_min = _inverse_max(mins, 63.0)
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    head = torch.empty(nb, 16, dtype=torch.uint8)
    head[:, 0:2], d16 = _fp16(max_scale / 63.0)
    head[:, 2:4], dmin16 = _fp16(max_min / 63.0)
    head[:, 4:16] = _pack_scales_k4(ls, lm)
    d = _padded(d16[:, None] * ls, se.mx.shape[0])
    dm = _padded(dmin16[:, None] * lm, se.mx.shape[0])
    return head, se.requantize(d, dm)


def _padded(v: torch.Tensor, s: int) -> torch.Tensor:
    """``v`` flattened and padded with ones to ``s`` values."""
    import torch

    v = v.reshape(-1)
    return torch.cat((v, torch.ones(s - v.shape[0]))) if v.shape[0] < s else v


def _q2_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q2_K_ref`` of the blocks ``xb`` (float32 ``[B, 256]``)
    as uint8 ``[B, 84]``: 16 bytes of 4-bit scales and mins, 64 bytes of
    2-bit codes, fp16 d and dmin."""
    import torch

    nb = xb.shape[0]
    se, scales, mins = _searched(xb, Q2_K_SEARCH, 16, k4_weights=False)
    max_scale, inv_scale = _inverse_max(scales, 15.0)
    max_min, inv_min = _inverse_max(mins, 15.0)
    # y[i].scales[j] = l; y[i].scales[j] |= (l << 4): uint8 stores
    sc = (nearest_int(inv_scale[:, None] * scales) | (nearest_int(inv_min[:, None] * mins) << 4)
          ) & 0xFF
    out = torch.empty(nb, 84, dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8)
    out[:, 80:82], d16 = _fp16(max_scale / 15.0)
    out[:, 82:84], dmin16 = _fp16(max_min / 15.0)
    d = _padded(d16[:, None] * (sc & 0xF), se.mx.shape[0])
    dm = _padded(dmin16[:, None] * (sc >> 4), se.mx.shape[0])
    q = se.requantize(d, dm)[:, :nb * 16].view(16, nb, 2, 4, 2)
    # qs[32h + 16u + i] = L[128h + 32k + 16u + i] << 2k summed over k: code i
    # of sub-block 16b + 8h + 2k + u
    low = torch.add(q[:, :, :, 0], q[:, :, :, 1], alpha=4)
    high = torch.add(q[:, :, :, 2], q[:, :, :, 3], alpha=4)
    packed = torch.add(low, high, alpha=16)  # [i, b, h, u]
    out[:, 16:80].view(nb, 2, 2, 16).copy_(packed.permute(1, 2, 3, 0))
    return out


def _nibbles(q: torch.Tensor, nb: int, out: torch.Tensor) -> None:
    """Q4_K/Q5_K's 128 bytes of nibbles into ``out`` (uint8 ``[B, 128]``)
    from 4-bit codes ``q`` (uint8 ``[32, S]``): byte ``32g + l`` of block ``b`` is
    code ``l`` of sub-block ``8b + 2g`` plus 16 times that of ``8b + 2g + 1``."""
    import torch

    nib = torch.add(q[:, 0::2], q[:, 1::2], alpha=16)  # [l, 4b + g]
    out.view(nb, 4, 32).copy_(nib[:, :nb * 4].t().view(nb, 4, 32))


def _q4_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q4_K_ref`` of ``xb`` (float32 ``[B, 256]``) as uint8
    ``[B, 144]``: fp16 d and dmin, 12 bytes of scales, 128 of nibbles."""
    import torch

    nb = xb.shape[0]
    out = torch.empty(nb, 144, dtype=torch.uint8)
    out[:, :16], q = _k4_chunk(xb, Q4_K_SEARCH)
    _nibbles(q, nb, out[:, 16:])
    return out


def _q5_chunk(xb: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q5_K_ref`` of ``xb`` (float32 ``[B, 256]``) as uint8
    ``[B, 176]``: fp16 d and dmin, 12 bytes of scales, 32 bytes of high bits
    (bit j of byte l: code ``l`` of sub-block ``8b + j`` > 15), 128 of low
    nibbles."""
    import torch

    nb = xb.shape[0]
    out = torch.empty(nb, 176, dtype=torch.uint8)
    out[:, :16], q = _k4_chunk(xb, Q5_K_SEARCH)
    # qh[l] = sum over j of (code l of sub-block 8b + j) >> 4 << j
    high = (q[:, :nb * 8] >> 4).view(32, nb, 4, 2)
    pairs = torch.add(high[..., 0], high[..., 1], alpha=2)
    quads = torch.add(pairs[:, :, 0::2], pairs[:, :, 1::2], alpha=4)
    qh = torch.add(quads[:, :, 0], quads[:, :, 1], alpha=16)  # [l, b]
    out[:, 16:48].copy_(qh.t())
    _nibbles(q.bitwise_and_(15), nb, out[:, 48:])
    return out


def _quantize(x: torch.Tensor, chunk_fn: Callable[[torch.Tensor], torch.Tensor],
              block_bytes: int) -> torch.Tensor:
    """Run ``chunk_fn`` over the 256-weight blocks of ``x`` chunk by chunk."""
    import torch

    flat = x.detach().reshape(-1)
    if flat.numel() % QK_K:
        raise ValueError(f"{flat.numel()} values are not a multiple of the block size {QK_K}")
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
