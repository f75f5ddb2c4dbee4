"""Dequantizers of GGML's Q4_K, Q5_K and Q2_K as ``dequantize_row_<type>`` in
ggml-org/ggml ``src/ggml-quants.c``, bit for bit the floats of gguf-py's
``gguf.quants`` (the same float32 products and differences, in its order).
Their quantizers live in :mod:`modelkit.io.ggml.k_qkx2`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkit.io.ggml._cfloat import read_fp16

if TYPE_CHECKING:
    import torch

QK_K = 256


def _rows(data: torch.Tensor, nbytes: int) -> torch.Tensor:
    import torch

    if data.dtype != torch.uint8:
        raise ValueError(f"GGML blocks are uint8, not {data.dtype}")
    return data.reshape(-1, nbytes)


def _shifted(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """``(b[..., None, :] >> s) & mask`` for each shift ``s`` (int32)."""
    import torch

    s = torch.tensor(shifts, dtype=torch.int32).view(len(shifts), 1)
    return (b.to(torch.int32).unsqueeze(-2) >> s) & mask


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins ``[nb, 8]`` (int32) packed in the 12
    bytes ``scales`` ``[nb, 12]`` of a Q4_K/Q5_K block (``get_scale_min_k4``)."""
    import torch

    b = scales.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def dequantize_q4_k(data: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks ``[n, 144]`` to float32: ``d * sc * q - dmin * m`` per
    sub-block of 32."""
    import torch

    data = _rows(data, 144)
    nb = data.shape[0]
    sc, mn = scale_min_k4(data[:, 4:16])
    d = (read_fp16(data, 0) * sc.to(torch.float32)).view(nb, 8, 1)
    dm = (read_fp16(data, 2) * mn.to(torch.float32)).view(nb, 8, 1)
    q = _shifted(data[:, 16:].reshape(nb, 4, 32), [0, 4], 0xF)  # [nb, 4, 2, 32]
    q = q.reshape(nb, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(-1)


def dequantize_q5_k(data: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks ``[n, 176]`` to float32: ``d * sc * (q | h << 4) - dmin * m``
    per sub-block of 32."""
    import torch

    data = _rows(data, 176)
    nb = data.shape[0]
    sc, mn = scale_min_k4(data[:, 4:16])
    d = (read_fp16(data, 0) * sc.to(torch.float32)).view(nb, 8, 1)
    dm = (read_fp16(data, 2) * mn.to(torch.float32)).view(nb, 8, 1)
    ql = _shifted(data[:, 48:].reshape(nb, 4, 32), [0, 4], 0xF).reshape(nb, 8, 32)
    qh = _shifted(data[:, 16:48], list(range(8)), 1)  # [nb, 8, 32]
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(-1)


def dequantize_q2_k(data: torch.Tensor) -> torch.Tensor:
    """Q2_K blocks ``[n, 84]`` to float32: ``d * (sc & 15) * q - dmin * (sc >> 4)``
    per sub-block of 16."""
    import torch

    data = _rows(data, 84)
    nb = data.shape[0]
    sb = data[:, :16].to(torch.int32)
    dl = (read_fp16(data, 80) * (sb & 0xF).to(torch.float32)).view(nb, 16, 1)
    ml = (read_fp16(data, 82) * (sb >> 4).to(torch.float32)).view(nb, 16, 1)
    q = _shifted(data[:, 16:80].reshape(nb, 2, 32), [0, 2, 4, 6], 3)  # [nb, 2, 4, 32]
    q = q.reshape(nb, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(-1)
