"""GGML block quantizers and dequantizers in torch, byte-identical to ggml's
reference (ggml-org/ggml ``src/ggml-quants.c``: ``quantize_<type>`` with no
importance matrix, which is what ``llama-quantize`` writes without
``--imatrix``).

One table, :data:`GGML_TYPES`, declares each type once. The kernels work on
float32 rows whose length is a multiple of the type's block, vectorised over
all the blocks of a chunk; inside a block they add in the C source's order so
that every float32 rounding, and so every chosen scale, is the reference's.

API (every module of this package keeps to it):

* ``quantize_blocks(x, name) -> uint8 [n_blocks, block_bytes]`` for a 1-D or
  2-D float32 tensor ``x`` whose element count is a multiple of the block;
* ``dequantize_blocks(data, name) -> float32 [n_blocks * block_size]`` for
  ``uint8 [n_blocks, block_bytes]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type.

    Args:
        name: the GGML name (``Q4_K``), as gguf-py's ``GGMLQuantizationType``.
        block_size: weights per block.
        block_bytes: bytes per block.
        module: the module of this package with its kernels (``""`` for the
            float types, which are plain casts).
    """

    name: str
    block_size: int
    block_bytes: int
    module: str = ""

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight."""
        return 8 * self.block_bytes / self.block_size


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 1, 4),
    GGMLType("F16", 1, 2),
    GGMLType("BF16", 1, 2),
    GGMLType("Q8_0", 32, 34, "legacy"),
    GGMLType("Q5_1", 32, 24, "legacy"),
    GGMLType("Q5_0", 32, 22, "legacy"),
    GGMLType("Q4_1", 32, 20, "legacy"),
    GGMLType("Q4_0", 32, 18, "legacy"),
    GGMLType("Q6_K", 256, 210, "k_qx"),
    GGMLType("Q5_K", 256, 176, "k_qkx2"),
    GGMLType("Q4_K", 256, 144, "k_qkx2"),
    GGMLType("Q3_K", 256, 110, "k_qx"),
    GGMLType("Q2_K", 256, 84, "k_qkx2"),
)}


def _kernel(name: str, what: str) -> Callable[..., torch.Tensor]:
    ggml_type = GGML_TYPES[name]
    if not ggml_type.module:
        raise ValueError(f"{name} is a float type, not a block type")
    module = import_module(f"{__name__}.{ggml_type.module}")
    kernel: Callable[..., torch.Tensor] = getattr(module, f"{what}_{name.lower()}")
    return kernel


def quantize_blocks(x: torch.Tensor, name: str) -> torch.Tensor:
    """The GGML blocks of the float32 values ``x`` (element count a multiple
    of the block size) as uint8 ``[n_blocks, block_bytes]``, byte-identical
    to ggml's reference quantizer for ``name``."""
    return _kernel(name, "quantize")(x)


def dequantize_blocks(data: torch.Tensor, name: str) -> torch.Tensor:
    """The float32 values of the uint8 blocks ``data`` ``[n_blocks,
    block_bytes]`` of type ``name``, as ggml's ``dequantize_row_<type>``."""
    return _kernel(name, "dequantize")(data)
