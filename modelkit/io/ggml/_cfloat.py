"""C float semantics the GGML reference quantizers rely on, in torch float32.

ggml's ``src/ggml-quants.c`` (ggml-org/ggml) rounds with ``nearest_int``
(the ``+ 12582912.f`` bit trick), converts floats to small integers with C
casts (``(int8_t)f``: x86-64 ``cvttss2si`` then the low byte), and stores its
scales with ``GGML_FP32_TO_FP16`` (round to nearest even, as torch's cast).
These helpers reproduce each bit for bit, for every float input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves round-half-even(x) in the mantissa
INT32_LIMIT = 2.0 ** 31


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int(x)`` as int32: the mantissa bits of the float32
    ``x + 12582912.f`` less ``0x400000`` (round half to even for |x| < 2^22,
    and the same bits as C beyond)."""
    import torch

    bits = (x + MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def c_cast_low_byte(x: torch.Tensor) -> torch.Tensor:
    """The low byte (int32 in 0..255) of C's ``(int8_t)x`` / ``(uint8_t)x``
    on float32 ``x``: truncation toward zero through a 32-bit ``cvttss2si``,
    whose out-of-range and NaN result ``0x80000000`` has a zero low byte."""
    import torch

    t = torch.trunc(x)
    valid = t.abs() < INT32_LIMIT  # False for NaN and infinities too
    if bool(valid.all()):
        return t.to(torch.int32) & 0xFF
    t = torch.where(valid, t, torch.zeros_like(t))
    return t.to(torch.int32) & 0xFF


def signed_byte(b: torch.Tensor) -> torch.Tensor:
    """The int8 value of low bytes ``b`` (int32 in 0..255)."""
    return b - ((b & 0x80) << 1)


def fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes ``[n, 2]`` of the float32 column ``d`` ``[n, 1]``
    (``GGML_FP32_TO_FP16``: round to nearest even, as torch's cast)."""
    import torch

    return d.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def fp16_value(d: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(d))``: ``d`` rounded to fp16, as float32."""
    import torch

    return d.to(torch.float16).to(torch.float32)


def read_fp16(data: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of each row of uint8 ``data``, as float32 ``[n, 1]``."""
    import torch

    return data[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` ``[n, k]``: ``(amax, max)`` as the C loop ``if (amax <
    fabsf(v)) { amax = fabsf(v); max = v; }`` from ``amax = max = 0`` finds
    them: the first value of largest magnitude, and ``+0.0`` for a zero row
    (whose sign reaches the stored ``d = max / -8``)."""
    import torch

    a = x.abs()
    amax, idx = a.max(dim=1, keepdim=True)
    mx = torch.gather(x, 1, idx)
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx
