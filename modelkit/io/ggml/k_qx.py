"""GGML's k-quants Q6_K and Q3_K in torch, byte-identical to
``quantize_row_q6_K_ref`` / ``quantize_row_q3_K_ref`` in ggml-org/ggml
``src/ggml-quants.c`` (what ``quantize_q6_K`` / ``quantize_q3_K`` run without
an importance matrix), and their dequantizers as ``dequantize_row_<type>``
(bit for bit gguf-py's ``gguf.quants``).

Both search a scale per sub-block of 16 weights (``make_qx_quants`` for Q6_K,
``make_q3_quants`` for Q3_K). The search runs on all sub-blocks of a chunk at
once, laid out ``[16, sub-blocks]`` so that each within-sub-block sum adds
its 16 terms one after the other as the C loop does (float32 addition is not
associative, and a different order flips scale choices); every comparison
that picks a scale is the C source's, in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from modelkit.io.ggml._cfloat import (
    MAGIC,
    first_absmax,
    fp16_bytes,
    nearest_int,
    read_fp16,
)

if TYPE_CHECKING:
    import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: sub-blocks below are all zero
CHUNK_BLOCKS = 1024  # super-blocks per pass: fewer, longer torch calls win (measured)
Q3_CHUNK_BLOCKS = 2048  # its refinement runs 16 small steps a pass: wider steps
Q6_TRIES = [i for i in range(-9, 10) if i]  # make_qx_quants' candidate scales, in order


def _super_blocks(x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.numel() % QK_K:
        raise ValueError(f"{x.numel()} values are not a multiple of the block size {QK_K}")
    return x.detach().reshape(-1, QK_K).to(torch.float32)


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` over the first dimension, left to right."""
    acc = terms[0].clone()
    for t in terms[1:]:
        acc += t
    return acc


def _chunks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], nbytes: int,
            blocks: int = CHUNK_BLOCKS) -> torch.Tensor:
    """``fn`` on ``blocks`` super-blocks at a time, into one ``[n, nbytes]`` array."""
    import torch

    out = torch.empty(x.shape[0], nbytes, dtype=torch.uint8)
    for start in range(0, x.shape[0], blocks):
        out[start:start + blocks] = fn(x[start:start + blocks])
    return out


def _absmax_cols(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``xt`` ``[16, S]``: ``(amax, max)``, the first value of
    largest magnitude as the C loop ``if (ax > amax) { amax = ax; max = x; }``
    keeps it; two fast reductions, and the first-occurrence search only for
    columns where ``max == -min`` (zero columns included, which give +0)."""
    import torch

    xmax = xt.amax(dim=0)
    neg_min = -xt.amin(dim=0)
    mx = torch.where(xmax > neg_min, xmax, -neg_min)
    amax = torch.maximum(xmax, neg_min)
    tie = xmax == neg_min
    if bool(tie.any()):
        cols = tie.nonzero().view(-1)
        amax[cols], mx[cols] = (v.view(-1) for v in first_absmax(xt[:, cols].t()))
    return amax, mx


class _Buffers:
    """Named float32 scratch arrays reused from chunk to chunk (a fresh
    megabyte-sized array costs its page faults on every chunk)."""

    def __init__(self) -> None:
        self.flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        """A contiguous ``shape`` view of the scratch array ``name``."""
        import torch

        n = 1
        for dim in shape:
            n *= dim
        if name not in self.flat or self.flat[name].numel() < n:
            self.flat[name] = torch.empty(n, dtype=torch.float32)
        return self.flat[name][:n].view(shape)


_BUFFERS: dict[int, _Buffers] = {}


def _buffers() -> _Buffers:
    """The calling thread's scratch arrays (one set: the last thread's)."""
    import threading

    key = threading.get_ident()
    if key not in _BUFFERS:
        _BUFFERS.clear()
        _BUFFERS[key] = _Buffers()
    return _BUFFERS[key]


def _make_qx_quants(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(16, nmax, x, L, rmse_type=1, NULL)`` on every column of
    ``xt`` ``[16, S]``: ``(scale [S], L [16, S])`` (L as float).

    All 19 candidate scales are tried at once (``[19, S]`` per weight, added
    weight after weight as the C loop does); the choice between them is the
    C's sequential comparison with the best so far."""
    import torch

    buf = _buffers()
    n_cols = xt.shape[1]
    amax, mx = _absmax_cols(xt)
    w = torch.mul(xt, xt, out=buf.get("w", 16, n_cols))
    wx = torch.mul(w, xt, out=buf.get("wx", 16, n_cols))
    # iscale = -(nmax + 0.1f*is) / max in float32, the first try being -nmax / max
    steps = torch.tensor(0.1, dtype=torch.float32) * torch.tensor(Q6_TRIES, dtype=torch.float32)
    tries = torch.cat([torch.tensor([float(nmax)]), nmax + steps])
    shape = (len(tries), n_cols)
    iscale = torch.div((-tries).unsqueeze(1), mx, out=buf.get("iscale", *shape))  # [T, S]
    sumlx = buf.get("sumlx", *shape).zero_()
    suml2 = buf.get("suml2", *shape).zero_()
    lv = buf.get("lv", *shape)
    term = buf.get("term", *shape)
    for i in range(16):
        torch.mul(iscale, xt[i], out=lv)
        lv.round_().clamp_(-nmax, nmax - 1)  # |iscale * x| <= nmax + 1: round is nearest_int
        torch.mul(lv, wx[i], out=term)
        sumlx += term
        torch.mul(lv, w[i], out=term)
        term *= lv
        suml2 += term
    scales = torch.div(sumlx, suml2, out=buf.get("scales", *shape))
    scales[0] = torch.where(suml2[0] != 0, scales[0], torch.zeros_like(scales[0]))
    best = scales[0] * sumlx[0]
    wins = torch.mul(scales, sumlx, out=lv)  # the best each candidate would set
    squares = torch.mul(sumlx, sumlx, out=term)
    squares.masked_fill_(suml2 <= 0, -float("inf"))  # a candidate needs suml2 > 0
    pick = torch.zeros(xt.shape[1], dtype=torch.long)
    for t in range(1, len(tries)):
        take = squares[t] > best * suml2[t]
        best = torch.where(take, wins[t], best)
        pick.masked_fill_(take, t)
    pick = pick.unsqueeze(0)
    scale = torch.gather(scales, 0, pick).view(-1)
    levels = torch.mul(xt, torch.gather(iscale, 0, pick), out=buf.get("levels", 16, n_cols))
    levels.round_().clamp_(-nmax, nmax - 1).add_(nmax)
    zero = amax < GROUP_MAX_EPS
    if bool(zero.any()):
        scale = scale.masked_fill(zero, 0.0)
        levels = levels.masked_fill(zero, 0.0)
    return scale, levels


def _q6_chunk(x: torch.Tensor) -> torch.Tensor:
    import torch

    nb = x.shape[0]
    xt = _buffers().get("xt", 16, nb * 16).copy_(x.reshape(nb * 16, 16).t())  # [16, S]
    scales, levels = _make_qx_quants(xt, 32)
    scales = scales.view(nb, 16)
    max_abs, max_scale = first_absmax(scales)
    iscale = -128.0 / max_scale
    d = 1.0 / iscale
    sc = _signed_byte_min(nearest_int(iscale * scales), 127)
    dq = read_fp16(fp16_bytes(d), 0) * sc.to(torch.float32)  # [nb, 16]
    dq_t = dq.reshape(1, -1)
    # nearest_int(x / d) in place in scratch memory: add 12582912, keep the mantissa
    codes = torch.div(xt, dq_t, out=_buffers().get("codes", 16, nb * 16))
    codes += MAGIC
    requant = codes.view(torch.int32)
    requant &= 0x007FFFFF
    requant -= 0x00400000 - 32  # then + 32: the stored code
    requant.clamp_(0, 63)
    skipped = dq_t == 0  # sub-blocks whose scale rounds to 0 keep make_qx_quants' L
    if bool(skipped.any()):
        requant = torch.where(skipped, levels.to(torch.int32), requant)
    lv = requant.t().reshape(nb, 2, 4, 32)  # [block, half, quarter, l]
    out = torch.empty(nb, 210, dtype=torch.uint8)
    ql = (lv[:, :, 0:2] & 0xF) | ((lv[:, :, 2:4] & 0xF) << 4)  # ql[l], ql[l+32] per half
    out[:, :128] = ql.reshape(nb, 128).to(torch.uint8)
    qh = (lv[:, :, 0] >> 4) | ((lv[:, :, 1] >> 4) << 2) | ((lv[:, :, 2] >> 4) << 4) | (
        (lv[:, :, 3] >> 4) << 6)
    out[:, 128:192] = qh.reshape(nb, 64).to(torch.uint8)
    out[:, 192:208] = (sc & 0xFF).to(torch.uint8)
    out[:, 208:210] = fp16_bytes(d)
    zero = (max_abs < GROUP_MAX_EPS).reshape(-1)
    if bool(zero.any()):
        out[zero] = 0
    return out


def _signed_byte_min(v: torch.Tensor, top: int) -> torch.Tensor:
    """``(int8_t)MIN(top, v)``: the int8 value a C store of ``MIN(top, v)`` keeps."""
    m = v.clamp(max=top) & 0xFF
    return m - ((m & 0x80) << 1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks ``[n, 210]`` of float32 ``x`` (count a multiple of 256):
    ``ql[128]``, ``qh[64]``, int8 ``scales[16]``, fp16 ``d``."""
    return _chunks(_super_blocks(x), _q6_chunk, 210)


def dequantize_q6_k(data: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks to float32: ``d * scale * (q - 32)`` per sub-block of 16."""
    import torch

    data = data.reshape(-1, 210)
    nb = data.shape[0]
    ql = data[:, :128].to(torch.int32).view(nb, 2, 1, 64)
    ql = torch.cat([ql & 0xF, ql >> 4], dim=2).view(nb, 2, 4, 32)  # ql[l], ql[l+32], >>4 ...
    qh = data[:, 128:192].to(torch.int32).view(nb, 2, 1, 32)
    qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)) & 3
    q = ((ql | (qh << 4)) - 32).to(torch.float32).view(nb, 16, 16)
    scales = data[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (read_fp16(data, 208) * scales).view(nb, 16, 1)
    return (d * q).reshape(-1)


def _q3_pass(xt: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, levels: torch.Tensor,
             sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int) -> torch.Tensor:
    """One pass of ``make_q3_quants``' refinement over the 16 weights of every
    column, updating ``levels``, ``sumlx`` and ``suml2`` in place; returns
    which columns changed."""
    import torch

    changed = torch.zeros(xt.shape[1], dtype=torch.bool)
    for i in range(16):
        li, wi, wxi = levels[i], w[i], wx[i]
        slx = sumlx - wxi * li
        sl2 = suml2 - wi * li * li
        new_l = nearest_int(xt[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
        take = (slx > 0) & (new_l != li)
        slx += wxi * new_l
        sl2 += wi * new_l * new_l
        take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
        li.copy_(torch.where(take, new_l, li))
        sumlx.copy_(torch.where(take, slx, sumlx))
        suml2.copy_(torch.where(take, sl2, suml2))
        changed |= take
    return changed


def _make_q3_quants(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(16, nmax, x, L, do_rmse=true)`` on every column of
    ``xt`` ``[16, S]``: ``(scale [S], L [16, S])`` (L as float).

    The C refines one weight at a time, five passes at most, stopping after
    a pass that changed nothing; such a pass leaves the state as it found
    it, so running every column for as long as any column changes gives the
    same result."""
    import torch

    amax, mx = _absmax_cols(xt)
    w = xt * xt
    wx = w * xt
    iscale = -float(nmax) / mx
    levels = torch.round(xt * iscale).clamp_(-nmax, nmax - 1)  # |iscale*x| <= nmax
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(w * levels * levels)
    active = torch.arange(xt.shape[1])
    for _ in range(5):
        # only the columns the last pass changed can change again
        sub = [t.index_select(-1, active) for t in (xt, w, wx, levels, sumlx, suml2)]
        changed = _q3_pass(sub[0], sub[1], sub[2], sub[3], sub[4], sub[5], nmax)
        levels.index_copy_(1, active, sub[3])
        sumlx.index_copy_(0, active, sub[4])
        suml2.index_copy_(0, active, sub[5])
        active = active[changed]
        if not active.numel():
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = amax < GROUP_MAX_EPS
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return scale, levels


def _q3_scale_bytes(l6: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of 16 six-bit scales ``l6`` ``[nb, 16]`` (int32 0..63):
    low nibbles of 0-7 and 8-15 in bytes 0-7, the high 2 bits in bytes 8-11."""
    import torch

    low = l6 & 0xF
    high = l6 >> 4
    out = torch.empty(l6.shape[0], 12, dtype=torch.int32)
    out[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    h = high.view(-1, 4, 4)  # [nb, j/4, j%4]
    out[:, 8:] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return out


def _q3_chunk(x: torch.Tensor) -> torch.Tensor:
    import torch

    nb = x.shape[0]
    xt = x.reshape(nb * 16, 16).t().contiguous()  # [16, S]
    scales, levels = _make_q3_quants(xt, 4)
    scales = scales.view(nb, 16)
    _, max_scale = first_absmax(scales)
    nonzero = max_scale != 0
    iscale = -32.0 / max_scale
    l6 = (nearest_int(iscale * scales).clamp_(-32, 31) + 32)
    l6 = torch.where(nonzero, l6, torch.zeros_like(l6))
    d = torch.where(nonzero, 1.0 / iscale, torch.zeros_like(iscale))
    # the stored scale read back: 0 bytes read as -32
    dq = read_fp16(fp16_bytes(d), 0) * (l6 - 32).to(torch.float32)
    dq_t = dq.reshape(1, -1)
    requant = nearest_int(xt / dq_t).clamp_(-4, 3).to(torch.float32) + 4
    levels = torch.where(dq_t != 0, requant, levels)
    lv = levels.t().reshape(nb, QK_K).to(torch.int32)
    high = (lv > 3).to(torch.int32)
    lv = lv - 4 * high
    out = torch.empty(nb, 110, dtype=torch.uint8)
    hm = high.view(nb, 8, 32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)
    out[:, :32] = hm.sum(dim=1).to(torch.uint8)
    q = lv.view(nb, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out[:, 32:96] = qs.reshape(nb, 64).to(torch.uint8)
    out[:, 96:108] = _q3_scale_bytes(l6).to(torch.uint8)
    out[:, 108:110] = fp16_bytes(d)
    return out


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    """Q3_K blocks ``[n, 110]`` of float32 ``x`` (count a multiple of 256):
    ``hmask[32]``, ``qs[64]``, 12 bytes of 6-bit scales, fp16 ``d``."""
    return _chunks(_super_blocks(x), _q3_chunk, 110, Q3_CHUNK_BLOCKS)


def dequantize_q3_k(data: torch.Tensor) -> torch.Tensor:
    """Q3_K blocks to float32: ``d * (scale - 32) * (q - 4 * !hbit)``."""
    import torch

    data = data.reshape(-1, 110)
    nb = data.shape[0]
    hm = data[:, :32].to(torch.int32).view(nb, 1, 32)
    hbit = (hm >> torch.arange(8, dtype=torch.int32).view(1, 8, 1)) & 1  # [nb, 8, 32]
    qs = data[:, 32:96].to(torch.int32).view(nb, 2, 1, 32)
    low = (qs >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)) & 3
    q = (low.reshape(nb, 8, 32) - ((hbit ^ 1) << 2)).to(torch.float32).view(nb, 16, 16)
    sb = data[:, 96:108].to(torch.int32)
    lows = torch.cat([sb[:, :8] & 0xF, sb[:, :8] >> 4], dim=1)  # [nb, 16]
    highs = (sb[:, 8:12].view(nb, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(
        1, 4, 1)) & 3  # [nb, j/4, j%4]
    sc = ((lows | (highs.reshape(nb, 16) << 4)) - 32).to(torch.float32)
    d = (read_fp16(data, 108) * sc).view(nb, 16, 1)
    return (d * q).reshape(-1)
