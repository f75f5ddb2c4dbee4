"""GGML's 32-weight block types Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 in torch,
byte-identical to ``quantize_row_<type>_ref`` in ggml-org/ggml
``src/ggml-quants.c`` (which ``quantize_<type>`` calls without an importance
matrix), and their dequantizers as ``dequantize_row_<type>`` (bit for bit the
same floats as gguf-py's ``gguf.quants``).

Every kernel takes float32 values whose count is a multiple of 32 and works
chunk by chunk in reused buffers; the float operations are the C source's, in
its order. A chunk runs a fast path (plain truncating casts, valid while every
block's ``1/d`` is finite) or, when a scale's inverse overflows (subnormal or
infinite inputs), the general kernels that reproduce C's out-of-range casts.
NaN inputs are outside the contract (C's max loops skip them, torch's do not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from modelkit.io.ggml._cfloat import (
    c_cast_low_byte,
    first_absmax,
    fp16_bytes,
    read_fp16,
    signed_byte,
)

if TYPE_CHECKING:
    import torch

QK = 32


def _blocks(x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.numel() % QK:
        raise ValueError(f"{x.numel()} values are not a multiple of the block size {QK}")
    return x.detach().reshape(-1, QK).to(torch.float32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return d.reciprocal().masked_fill_(d == 0, 0.0)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """16 bytes per block: ``(q[j] & 0xF) | (q[j + 16] << 4)`` (as stored)."""
    import torch

    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """The 4 little-endian bytes of ``qh``: bit ``j`` is bit 4 of ``q[j]``."""
    import torch

    bits = ((q >> 4) & 1).view(-1, 4, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)
    return (bits * weights).sum(dim=2).to(torch.uint8)


def _q8_0_general(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks ``[n, 34]``: fp16 ``d = amax / 127`` then ``roundf(x / d)``
    (half away from zero, computed as ``floor(2a) - floor(a)`` on ``a = |x *
    id|``) as int8."""
    import torch

    d = x.abs().amax(dim=1, keepdim=True) / 127
    a = (x * _inverse(d)).abs()
    r = torch.copysign(torch.floor(2 * a) - torch.floor(a), x)
    out = torch.empty(x.shape[0], 34, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = c_cast_low_byte(r).to(torch.uint8)
    return out


def _quantize_sym(x: torch.Tensor, nmax: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: ``d = max / -nmax`` and ``MIN(2*nmax-1, (int8_t)(x*id + nmax + 0.5))``
    (an int32 byte value)."""
    _, mx = first_absmax(x)
    d = mx / -nmax
    v = x * _inverse(d) + (nmax + 0.5)
    q = signed_byte(c_cast_low_byte(v)).clamp_(max=(1 << bits) - 1) & 0xFF
    return d, q


def _q4_0_general(x: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks ``[n, 18]``: fp16 ``d``, 16 bytes of nibbles."""
    import torch

    d, q = _quantize_sym(x, 8, 4)
    out = torch.empty(q.shape[0], 18, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).to(torch.uint8)
    return out


def _q5_0_general(x: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks ``[n, 22]``: fp16 ``d``, 4 bytes of high bits, 16 of nibbles."""
    import torch

    d, q = _quantize_sym(x, 16, 5)
    out = torch.empty(q.shape[0], 22, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:6] = _high_bits(q)
    out[:, 6:] = _nibbles(q)
    return out


def _quantize_affine(x: torch.Tensor,
                     levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: ``d = (max - min) / levels``, ``m = min`` and the byte
    of ``(x - min) * id + 0.5`` truncated."""
    import torch

    # the first minimum and maximum, as the C loop finds them: -0.0 and +0.0
    # tie, and the sign of the zero reaches the stored d and m
    mn = torch.gather(x, 1, x.min(dim=1, keepdim=True).indices)
    mx = torch.gather(x, 1, x.max(dim=1, keepdim=True).indices)
    d = (mx - mn) / levels
    q = c_cast_low_byte((x - mn) * _inverse(d) + 0.5)
    return d, mn, q


def _q4_1_general(x: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks ``[n, 20]``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles
    (``MIN(15, (int8_t)(...))``)."""
    import torch

    d, mn, q = _quantize_affine(x, 15)
    q = signed_byte(q).clamp_(max=15) & 0xFF
    out = torch.empty(q.shape[0], 20, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(mn)
    out[:, 4:] = ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).to(torch.uint8)
    return out


def _q5_1_general(x: torch.Tensor) -> torch.Tensor:
    """Q5_1 blocks ``[n, 24]``: fp16 ``d``, fp16 ``m``, 4 bytes of high bits,
    16 of nibbles (``(uint8_t)(...)``, no clamp, as the C)."""
    import torch

    d, mn, q = _quantize_affine(x, 31)
    out = torch.empty(q.shape[0], 24, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(mn)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _nibbles(q)
    return out


CHUNK_BLOCKS = 8192  # blocks per pass: 1 MiB of float32, the buffers stay in cache

Kernel = Callable[["torch.Tensor", "_Work", "torch.Tensor"], bool]


def _run(x: torch.Tensor, nbytes: int, fast: Kernel,
         general: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Blocks of ``x`` chunk by chunk: the fast kernel, or the general one for
    a chunk the fast one declines (a scale whose inverse overflows, infinities:
    values where C's float-to-int casts leave their range)."""
    import torch

    blocks = _blocks(x)
    out = torch.empty(blocks.shape[0], nbytes, dtype=torch.uint8)
    work = _work()
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[start:start + CHUNK_BLOCKS]
        target = out[start:start + chunk.shape[0]]
        if not fast(chunk, work, target):
            target.copy_(general(chunk))
    return out


_WORK: dict[int, _Work] = {}


def _work() -> _Work:
    """The calling thread's buffers, kept between calls (one set: the last
    thread's), so small tensors do not pay for fresh pages."""
    import threading

    key = threading.get_ident()
    if key not in _WORK:
        _WORK.clear()
        _WORK[key] = _Work(CHUNK_BLOCKS)
    return _WORK[key]


def _put_fp16(out: torch.Tensor, column: int, values: torch.Tensor) -> None:
    """Store ``values`` as fp16 in the 2-byte ``column`` of the block rows ``out``."""
    import torch

    out.view(torch.int16)[:, column] = values.to(torch.float16).view(torch.int16)


def _finite(*columns: torch.Tensor) -> bool:
    import torch

    return all(bool(torch.isfinite(c).all()) for c in columns)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The first value of largest magnitude per block (see ``first_absmax``),
    from two fast reductions; only blocks where ``max == -min`` (zero blocks
    included) need the first-occurrence search."""
    import torch

    # per-block values stay 1-D: [n, 1] operands run element by element in torch
    xmax = x.amax(dim=1)
    xmin = x.amin(dim=1)
    neg_min = -xmin
    mx = torch.where(xmax > neg_min, xmax, xmin)
    tie = xmax == neg_min
    if bool(tie.any()):
        rows = tie.nonzero().view(-1)
        mx[rows] = first_absmax(x[rows])[1].view(-1)
    return mx


def _first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block the first minimum and maximum as the C loop keeps them: only
    a zero extreme needs the search (-0.0 and +0.0 tie, the first one stays)."""
    import torch

    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    zero = (mn == 0) | (mx == 0)
    if bool(zero.any()):
        rows = zero.nonzero().view(-1)
        sub = x[rows]
        mn[rows] = torch.gather(sub, 1, sub.min(dim=1, keepdim=True).indices).view(-1)
        mx[rows] = torch.gather(sub, 1, sub.max(dim=1, keepdim=True).indices).view(-1)
    return mn, mx


class _Work:
    """Buffers of one chunk, reused across chunks (no allocation per pass)."""

    def __init__(self, blocks: int) -> None:
        import torch

        self.lo = torch.empty(blocks, 16, dtype=torch.float32)
        self.hi = torch.empty(blocks, 16, dtype=torch.float32)
        self.qlo = torch.empty(blocks, 16, dtype=torch.int8)
        self.qhi = torch.empty(blocks, 16, dtype=torch.int8)
        self.full = [torch.empty(blocks, 32, dtype=torch.float32) for _ in range(3)]
        self.q8 = torch.empty(blocks, 32, dtype=torch.int8)

    def codes(self, x: torch.Tensor, scale: torch.Tensor, offset: float,
              shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 ``(int8_t)((x [- shift]) * scale + offset)`` of each half of the
        blocks (``x[:, :16]``, ``x[:, 16:]``), float ops in the C order; the
        casts truncate as C's within the int8 range the callers ensure."""
        import torch

        n = x.shape[0]
        out = []
        for half, buf, q in ((x[:, :16], self.lo, self.qlo), (x[:, 16:], self.hi, self.qhi)):
            v = buf[:n]
            if shift is None:
                torch.mul(half, scale, out=v)
            else:
                torch.sub(half, shift, out=v)
                v *= scale
            v += offset
            q[:n].copy_(v)
            out.append(q[:n])
        return out[0], out[1]


def _fifth_bits(qlo: torch.Tensor, qhi: torch.Tensor) -> torch.Tensor:
    """The 4 bytes of ``qh`` per block: bit ``j`` of the little-endian uint32 is
    bit 4 of code ``j`` (``qlo`` the codes 0-15, ``qhi`` 16-31)."""
    import torch

    bits = torch.cat([(qlo >> 4) & 1, (qhi >> 4) & 1], dim=1).to(torch.float32)
    weights = torch.tensor([1.0, 2, 4, 8, 16, 32, 64, 128])
    return (bits.view(-1, 4, 8) @ weights).to(torch.int32).to(torch.uint8)


def _nibbles_of(qlo: torch.Tensor, qhi: torch.Tensor) -> torch.Tensor:
    """``(qlo & 0xF) | (qhi << 4)`` as uint8, in place in ``qlo``."""
    import torch

    qlo &= 0x0F
    qhi <<= 4
    qlo |= qhi
    return qlo.view(torch.uint8)


def _q8_0_fast(x: torch.Tensor, work: _Work, out: torch.Tensor) -> bool:
    import torch

    n = x.shape[0]
    r, a, t = (buf[:n] for buf in work.full)
    d = torch.abs(x, out=a).amax(dim=1) / 127
    inv = _inverse(d)
    if not _finite(d * inv):  # 1 or 0 unless d or 1/d overflows
        return False
    torch.mul(x, inv.unsqueeze(1), out=r)
    torch.abs(r, out=a)
    torch.mul(a, 2, out=t).floor_()
    t -= a.floor_()  # roundf(|r|) = floor(2|r|) - floor(|r|)
    torch.copysign(t, r, out=t)
    _put_fp16(out, 0, d)
    out[:, 2:] = work.q8[:n].copy_(t).view(torch.uint8)
    return True


def _sym_fast(x: torch.Tensor, nmax: int, work: _Work, out: torch.Tensor) -> bool:
    """Q4_0 / Q5_0 blocks when every ``1/d`` is finite: then ``x * id`` stays
    within ``nmax`` and the casts are plain truncations."""

    d = _signed_max(x) / -nmax
    inv = _inverse(d)
    if not _finite(d * inv):  # 1 or 0 unless d or 1/d overflows
        return False
    qlo, qhi = work.codes(x, inv.unsqueeze(1), nmax + 0.5)
    qlo.clamp_(max=2 * nmax - 1)
    qhi.clamp_(max=2 * nmax - 1)
    _put_fp16(out, 0, d)
    if nmax == 16:
        out[:, 2:6] = _fifth_bits(qlo, qhi)
    out[:, -16:] = _nibbles_of(qlo, qhi)
    return True


def _affine_fast(x: torch.Tensor, levels: int, work: _Work, out: torch.Tensor) -> bool:
    """Q4_1 / Q5_1 blocks when every ``d`` and ``1/d`` is finite."""

    mn, mx = _first_min_max(x)
    d = (mx - mn) / levels
    inv = _inverse(d)
    if not _finite(d * inv):  # 1 or 0 unless d or 1/d overflows
        return False
    qlo, qhi = work.codes(x, inv.unsqueeze(1), 0.5, shift=mn.unsqueeze(1))
    if levels == 15:
        qlo.clamp_(max=15)
        qhi.clamp_(max=15)
    _put_fp16(out, 0, d)
    _put_fp16(out, 1, mn)
    if levels == 31:
        out[:, 4:8] = _fifth_bits(qlo, qhi)
    out[:, -16:] = _nibbles_of(qlo, qhi)
    return True


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks ``[n, 34]``: fp16 ``d = amax / 127`` then ``roundf(x * id)``
    (half away from zero, computed as ``floor(2a) - floor(a)`` on ``a = |x *
    id|``) as int8."""
    return _run(x, 34, _q8_0_fast, _q8_0_general)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks ``[n, 18]``: fp16 ``d = max / -8`` (``max`` the first value
    of largest magnitude), 16 bytes of nibbles ``MIN(15, (int8_t)(x*id + 8.5))``."""
    return _run(x, 18, lambda c, w, o: _sym_fast(c, 8, w, o), _q4_0_general)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks ``[n, 22]``: fp16 ``d = max / -16``, 4 bytes of fifth bits,
    16 of nibbles of ``MIN(31, (int8_t)(x*id + 16.5))``."""
    return _run(x, 22, lambda c, w, o: _sym_fast(c, 16, w, o), _q5_0_general)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks ``[n, 20]``: fp16 ``d = (max - min) / 15``, fp16 ``m = min``,
    16 bytes of nibbles ``MIN(15, (int8_t)((x - min)*id + 0.5))``."""
    return _run(x, 20, lambda c, w, o: _affine_fast(c, 15, w, o), _q4_1_general)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """Q5_1 blocks ``[n, 24]``: fp16 ``d = (max - min) / 31``, fp16 ``m = min``,
    4 bytes of fifth bits, 16 of nibbles of ``(uint8_t)((x - min)*id + 0.5)``."""
    return _run(x, 24, lambda c, w, o: _affine_fast(c, 31, w, o), _q5_1_general)


def _dequant_input(data: torch.Tensor, nbytes: int) -> torch.Tensor:
    import torch

    data = data.reshape(-1, nbytes)
    if data.dtype != torch.uint8:
        raise ValueError(f"GGML blocks are uint8, not {data.dtype}")
    return data


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """The 32 nibbles of 16 bytes: low nibbles first, then high (int32)."""
    import torch

    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _fifth_bit(qh: torch.Tensor) -> torch.Tensor:
    """Bit ``j`` of the little-endian uint32 ``qh`` ``[n, 4]`` as ``16 * bit`` (int32)."""
    import torch

    shifts = torch.arange(8, dtype=torch.int32)
    bits = (qh.to(torch.int32).unsqueeze(2) >> shifts) & 1
    return bits.reshape(-1, 32) << 4


def dequantize_q8_0(data: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks to float32: ``qs[j] * d``."""
    import torch

    data = _dequant_input(data, 34)
    d = read_fp16(data, 0)
    q = data[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (q * d).reshape(-1)


def dequantize_q4_0(data: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks to float32: ``(nibble - 8) * d``."""
    import torch

    data = _dequant_input(data, 18)
    q = (_low_high(data[:, 2:]) - 8).to(torch.float32)
    return (read_fp16(data, 0) * q).reshape(-1)


def dequantize_q4_1(data: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks to float32: ``nibble * d + m``."""
    import torch

    data = _dequant_input(data, 20)
    q = _low_high(data[:, 4:]).to(torch.float32)
    return (read_fp16(data, 0) * q + read_fp16(data, 2)).reshape(-1)


def dequantize_q5_0(data: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks to float32: ``((nibble | high << 4) - 16) * d``."""
    import torch

    data = _dequant_input(data, 22)
    q = ((_low_high(data[:, 6:]) | _fifth_bit(data[:, 2:6])) - 16).to(torch.float32)
    return (read_fp16(data, 0) * q).reshape(-1)


def dequantize_q5_1(data: torch.Tensor) -> torch.Tensor:
    """Q5_1 blocks to float32: ``(nibble | high << 4) * d + m``."""
    import torch

    data = _dequant_input(data, 24)
    q = (_low_high(data[:, 8:]) | _fifth_bit(data[:, 4:8])).to(torch.float32)
    return (read_fp16(data, 0) * q + read_fp16(data, 2)).reshape(-1)
