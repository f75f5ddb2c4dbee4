"""Image and latent metrics, in numpy: relative L2, max abs difference,
PSNR, SSIM and the single-image statistics of the sanity checks.

Images are float arrays ``[H, W, C]`` in [0, 1]. SSIM follows Wang et al.
2004 as commonly implemented (scikit-image ``gaussian_weights=True``): an
11-tap Gaussian window with sigma 1.5, constants ``K1 = 0.01``, ``K2 = 0.03``
for a data range of 1, local statistics over the window positions that fit
inside the image ("valid"), averaged over positions and channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03


def relative_l2(candidate: np.ndarray, reference: np.ndarray) -> float:
    """``||c - r|| / ||r||`` in float64 (0 when both are zero, inf when only
    the reference is)."""
    import numpy as np

    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    diff = float(np.linalg.norm(c - r))
    ref = float(np.linalg.norm(r))
    if ref == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / ref


def max_abs(candidate: np.ndarray, reference: np.ndarray) -> float:
    """The largest absolute difference."""
    import numpy as np

    return float(np.max(np.abs(np.asarray(candidate, np.float64)
                               - np.asarray(reference, np.float64))))


def psnr(candidate: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    import numpy as np

    mse = float(np.mean((np.asarray(candidate, np.float64)
                         - np.asarray(reference, np.float64)) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def _gaussian_taps() -> np.ndarray:
    import numpy as np

    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-(x * x) / (2 * SSIM_SIGMA * SSIM_SIGMA))
    return taps / taps.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering of ``[H, W]``, "valid" positions only."""
    import numpy as np

    n = len(taps)
    h, w = img.shape
    rows = sum(taps[i] * img[i:h - n + 1 + i, :] for i in range(n))
    return np.asarray(sum(taps[j] * rows[:, j:w - n + 1 + j] for j in range(n)))


def ssim(candidate: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity over all channels (1.0 when identical)."""
    import numpy as np

    c = np.asarray(candidate, np.float64)
    r = np.asarray(reference, np.float64)
    if c.shape != r.shape:
        raise ValueError(f"ssim: shapes differ {c.shape} vs {r.shape}")
    if c.ndim == 2:
        c, r = c[..., None], r[..., None]
    side = 2 * SSIM_RADIUS + 1
    if min(c.shape[:2]) < side:
        raise ValueError(f"ssim: images must be at least {side}x{side}")
    taps = _gaussian_taps()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    scores = []
    for ch in range(c.shape[2]):
        x, y = c[..., ch], r[..., ch]
        mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
        vx = _filter_valid(x * x, taps) - mx * mx
        vy = _filter_valid(y * y, taps) - my * my
        cov = _filter_valid(x * y, taps) - mx * my
        num = (2 * mx * my + c1) * (2 * cov + c2)
        den = (mx * mx + my * my + c1) * (vx + vy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """``(mean, smallest per-channel standard deviation)`` of an image."""
    import numpy as np

    img = np.asarray(image, np.float64)
    stds = img.reshape(-1, img.shape[-1]).std(axis=0)
    return float(img.mean()), float(stds.min())


def is_finite(array: np.ndarray) -> bool:
    """Whether every value is finite."""
    import numpy as np

    return bool(np.isfinite(array).all())
