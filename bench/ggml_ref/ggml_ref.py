"""ctypes access to ggml's reference quantizers built by ``build.sh``.

``quantize(x, qtype)`` returns exactly the bytes ``quantize_<type>(src, dst,
nrows, n_per_row, NULL)`` writes: what ``llama-quantize`` writes without an
importance matrix (ggml-org/ggml ``src/ggml-quants.c``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

LIB_PATH = Path(__file__).with_name("libggmlq.so")
# qtype -> (weights per block, bytes per block)
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
          "q8_0": (32, 34), "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144),
          "q5_k": (256, 176), "q6_k": (256, 210)}
_lib: ctypes.CDLL | None = None


def available() -> bool:
    """Whether ``build.sh`` has been run here."""
    return LIB_PATH.exists()


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        if not LIB_PATH.exists():
            raise SystemExit(f"{LIB_PATH.name} is not built: run bench/ggml_ref/build.sh "
                             "GGML_CHECKOUT (a clone of ggml-org/ggml)")
        _lib = ctypes.CDLL(str(LIB_PATH))
        for qtype in BLOCKS:
            fn = getattr(_lib, f"quantize_{qtype.replace('_k', '_K')}")
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_void_p]
    return _lib


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """ggml's bytes for the rows of the 2-D float32 array ``x``: uint8
    ``[rows, row_bytes]``."""
    lib = _load()
    rows, n = x.shape
    per_block, nbytes = BLOCKS[qtype]
    if n % per_block:
        raise ValueError(f"row length {n} is not a multiple of {per_block}")
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((rows, n // per_block * nbytes), dtype=np.uint8)
    fn = getattr(lib, f"quantize_{qtype.replace('_k', '_K')}")
    fn(src.ctypes.data, out.ctypes.data, rows, n, None)
    return out
