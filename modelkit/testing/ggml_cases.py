"""Seeded float32 inputs that exercise GGML quantizers' corner cases.

The same ``(name, rows, cols, seed)`` always gives the same array (numpy's
PCG64 ``default_rng``), so tests regenerate the inputs whose ggml bytes are
stored in ``tests/data/ggml/`` and benchmarks compare on larger ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

Maker = Callable[["np.random.Generator", tuple[int, int]], "np.ndarray"]


def _gauss(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape)


def _student(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_t(2.0, shape)


def _outliers(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x = rng.standard_normal(shape)
    pick = rng.random(shape) < 0.001
    x[pick] *= 50
    return x


def _zeros(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    x = np.zeros(shape)
    x[rng.random(shape) < 0.5] = -0.0  # the sign of zero reaches legacy scales
    return x


def _constant(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    levels = rng.standard_normal((shape[0], shape[1] // 16))
    return np.repeat(levels, 16, axis=1)


def _tiny(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape) * 1e-30


def _subnormal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape) * 1e-40


def _fp16_underflow(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # block scales below fp16's smallest subnormal: stored d is 0, scales are not
    return rng.standard_normal(shape) * 1e-10


def _huge(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.uniform(-6e4, 6e4, shape)


def _mixed_signs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    x = np.abs(rng.standard_normal(shape))
    signs = np.where(rng.random((shape[0], shape[1] // 16)) < 0.5, -1.0, 1.0)
    return x * np.repeat(signs, 16, axis=1)


def _one_nonzero(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    x = np.zeros(shape)
    rows, cols = shape
    idx = rng.integers(0, 32, (rows, cols // 32)) + np.arange(0, cols, 32)
    np.put_along_axis(x, idx, rng.standard_normal(idx.shape), axis=1)
    keep = rng.random(idx.shape) < 0.25  # and blocks of 256 with a single one
    x[:, :] *= np.repeat(keep | (np.arange(cols // 32) % 8 == 0), 32, axis=1)
    return x


def _integers(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # exact ties everywhere: every rounding rule shows
    return rng.integers(-8, 9, shape).astype(float)


def _uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, shape)


def _weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape) * 0.02


def _bf16(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _fp16(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    return (rng.standard_normal(shape) * 0.05).astype(np.float16)


CASES: dict[str, Maker] = {
    "gauss": _gauss, "student_t2": _student, "outliers": _outliers, "zeros": _zeros,
    "constant": _constant, "tiny": _tiny, "subnormal": _subnormal,
    "fp16_underflow": _fp16_underflow, "huge": _huge, "mixed_signs": _mixed_signs,
    "one_nonzero": _one_nonzero, "integers": _integers, "uniform": _uniform,
    "weights": _weights, "bf16": _bf16, "fp16": _fp16,
}


def make_case(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """The float32 array ``[rows, cols]`` of case ``name`` (``cols`` a
    multiple of 256) for ``seed``."""
    import numpy as np

    rng = np.random.default_rng([seed, sorted(CASES).index(name)])
    return np.ascontiguousarray(CASES[name](rng, (rows, cols)), dtype=np.float32)
