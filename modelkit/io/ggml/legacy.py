"""GGML's 32-weight block types Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 in torch,
byte-identical to ``quantize_row_<type>_ref`` in ggml-org/ggml
``src/ggml-quants.c`` (which ``quantize_<type>`` calls without an importance
matrix), and their dequantizers as ``dequantize_row_<type>`` (bit for bit the
same floats as gguf-py's ``gguf.quants``).

Every kernel takes float32 values whose count is a multiple of 32 and works
on all blocks at once; the float operations are the C source's, in its order.
"""

from __future__ import annotations

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
    import torch

    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


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


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks ``[n, 34]``: fp16 ``d = amax / 127`` then ``roundf(x / d)``
    (half away from zero, computed as ``floor(2a) - floor(a)`` on ``a = |x *
    id|``) as int8."""
    import torch

    x = _blocks(x)
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


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks ``[n, 18]``: fp16 ``d``, 16 bytes of nibbles."""
    import torch

    d, q = _quantize_sym(_blocks(x), 8, 4)
    out = torch.empty(q.shape[0], 18, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).to(torch.uint8)
    return out


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks ``[n, 22]``: fp16 ``d``, 4 bytes of high bits, 16 of nibbles."""
    import torch

    d, q = _quantize_sym(_blocks(x), 16, 5)
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


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks ``[n, 20]``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles
    (``MIN(15, (int8_t)(...))``)."""
    import torch

    d, mn, q = _quantize_affine(_blocks(x), 15)
    q = signed_byte(q).clamp_(max=15) & 0xFF
    out = torch.empty(q.shape[0], 20, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(mn)
    out[:, 4:] = ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).to(torch.uint8)
    return out


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """Q5_1 blocks ``[n, 24]``: fp16 ``d``, fp16 ``m``, 4 bytes of high bits,
    16 of nibbles (``(uint8_t)(...)``, no clamp, as the C)."""
    import torch

    d, mn, q = _quantize_affine(_blocks(x), 31)
    out = torch.empty(q.shape[0], 24, dtype=torch.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(mn)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _nibbles(q)
    return out


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
