"""Pass/warn/fail limits per operation class.

Each operation that makes a model (a lossless rewrite, a cast to fp16 or
bf16, fp8/int8 quantization, a LoRA bake) has an expected closeness to its
oracle render. Merges change the picture on purpose: their metrics are
reported, not judged (unless the user sets a threshold). The values are
modelkit's defaults for real weights (for scale: comfyanonymous/ComfyUI's
quality test, ``tests/compare/test_quality.py``, passes an image at SSIM
0.95); tiny random models pass them by a wide margin (fp16 ~79 dB, int8
~45 dB, a LoRA bake against its runtime oracle >100 dB).

Metrics (per image, candidate against reference):

* ``latent``: relative L2 of the final latents, ``||c - r|| / ||r||``;
* ``max_abs``: largest absolute pixel difference (images in [0, 1]);
* ``psnr``: peak signal-to-noise ratio in dB (peak 1.0);
* ``ssim``: structural similarity (mean over channels);
* ``lora_effect``: PSNR of the LoRA-oracle render against the base without
  the LoRA: it must stay *below* this, or the LoRA did nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modelkit.errors import ModelkitError

PASS, WARN, FAIL, SKIP, INFO = "pass", "warn", "fail", "skip", "info"
METRIC_NAMES = ("latent", "max_abs", "psnr", "ssim", "lora_effect")
HIGHER_IS_BETTER = {"latent": False, "max_abs": False, "psnr": True, "ssim": True,
                    "lora_effect": False}
UNITS = {"psnr": " dB", "lora_effect": " dB"}


@dataclass(frozen=True)
class Limit:
    """``metric`` must be at least (or at most) ``fail``; between ``fail``
    and ``warn`` it warns."""

    metric: str
    fail: float
    warn: float | None = None

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    def _ok(self, value: float, bound: float) -> bool:
        return value >= bound if self.higher_is_better else value <= bound

    def judge(self, value: float) -> str:
        """``pass``, ``warn`` or ``fail`` for ``value`` (NaN fails)."""
        if value != value:  # NaN
            return FAIL
        if not self._ok(value, self.fail):
            return FAIL
        if self.warn is not None and not self._ok(value, self.warn):
            return WARN
        return PASS

    def describe(self) -> str:
        """``>= 40 dB`` (with ``warn below 30 dB`` when there is a warn level)."""
        op = ">=" if self.higher_is_better else "<="
        unit = UNITS.get(self.metric, "")
        text = f"{op} {self.fail:g}{unit}"
        if self.warn is not None:
            side = "below" if self.higher_is_better else "above"
            text += f" (warn {side} {self.warn:g}{unit})"
        return text


QUANTIZED = (Limit("psnr", 20.0, warn=30.0), Limit("ssim", 0.7, warn=0.9))
LIMITS: dict[str, tuple[Limit, ...]] = {
    "lossless": (Limit("max_abs", 1e-5), Limit("latent", 1e-5)),
    "fp16": (Limit("psnr", 40.0), Limit("ssim", 0.98)),
    "bf16": (Limit("psnr", 35.0), Limit("ssim", 0.95)),
    "fp8": QUANTIZED,
    "int8": QUANTIZED,
    "lora_bake": (Limit("psnr", 50.0), Limit("lora_effect", 60.0)),
    "merge": (),
}
DESCRIPTIONS = {
    "lossless": "lossless rewrite (expected identical renders)",
    "fp16": "fp16 storage", "bf16": "bf16 storage",
    "fp8": "fp8 quantization (dequantized for the render)",
    "int8": "int8/GGUF quantization (dequantized for the render)",
    "lora_bake": "LoRA bake, against the same LoRA applied at render time",
    "merge": "merge or other change: metrics reported, not judged",
}


def limits_for(operation: str, overrides: dict[str, float] | None = None) -> list[Limit]:
    """The limits of ``operation`` with ``overrides`` (metric -> fail value)
    applied: an override replaces that metric's fail level (its warn level
    stays only while it is still stricter) or adds the metric."""
    if operation not in LIMITS:
        raise ModelkitError(f"unknown operation {operation!r}; choose one of "
                            f"{', '.join(LIMITS)}")
    limits = {lim.metric: lim for lim in LIMITS[operation]}
    for metric, value in (overrides or {}).items():
        if metric not in HIGHER_IS_BETTER:
            raise ModelkitError(f"unknown threshold {metric!r}; choose one of "
                                f"{', '.join(METRIC_NAMES)}")
        old = limits.get(metric)
        lim = Limit(metric, value)
        if old is not None and old.warn is not None and lim._ok(old.warn, value) \
                and old.warn != value:
            lim = replace(lim, warn=old.warn)
        limits[metric] = lim
    return list(limits.values())


# --- per-layer gates ----------------------------------------------------------------


def cosine_at(snr_db: float) -> float:
    """The cosine of a restored layer whose error is exactly at ``snr_db``
    and uncorrelated with the weight: ``1 / sqrt(1 + 10^(-snr/10))``."""
    import math

    return 1.0 / math.sqrt(1.0 + 10.0 ** (-snr_db / 10.0))


@dataclass(frozen=True)
class Gate:
    """The per-layer limit of one storage format class: a layer restored from
    that format must keep ``snr_db`` (signal-to-noise ratio of the reference
    layer against the difference, in dB) and the cosine that SNR implies.
    ``calibrated`` is the worst SNR bench/calibrate_gates.py measured on
    seeded Gaussian, Student-t (3) and outlier weights; the fail level is
    3 dB below it, rounded down (None: a fixed level) (a scale error keeps the cosine at 1 and
    loses the SNR; a transposed or swapped weight loses both)."""

    snr_db: float
    calibrated: float | None
    label: str
    rounding: float | None = None  # casts: the SNR round-to-nearest guarantees

    @property
    def small_snr_db(self) -> float:
        """The level for layers under :data:`GATE_MIN_ELEMENTS` elements, whose
        SNR scatters more: a cast's guaranteed rounding SNR less 3 dB, else
        ``snr_db`` less :data:`SMALL_ALLOWANCE_DB`."""
        if self.rounding is not None:
            return min(self.snr_db, self.rounding - 3.0)
        return self.snr_db - SMALL_ALLOWANCE_DB

    @property
    def cosine(self) -> float:
        """The cosine at ``snr_db`` (:func:`cosine_at`)."""
        return cosine_at(self.snr_db)

    def level(self, elements: int) -> float:
        """The SNR level for a layer of ``elements`` elements."""
        return self.snr_db if elements >= GATE_MIN_ELEMENTS else self.small_snr_db


# format class -> gate (bench/calibrate_gates.py: 256x1024 matrices, 3 seeds
# per distribution; GGUF types through ggml-org/ggml's reference quantizers)
GATES: dict[str, Gate] = {
    "q8_0": Gate(37, 40.3, "GGUF Q8_0"),
    "q6_k": Gate(28, 31.1, "GGUF Q6_K"),
    "q5_k": Gate(23, 26.5, "GGUF Q5_K"),
    "q4_k": Gate(17, 20.6, "GGUF Q4_K"),
    "q3_k": Gate(11, 14.4, "GGUF Q3_K"),
    "q2_k": Gate(5, 9.0, "GGUF Q2_K"),
    "q5_1": Gate(23, 26.2, "GGUF Q5_1"),
    "q5_0": Gate(19, 22.9, "GGUF Q5_0"),
    "q4_1": Gate(16, 19.9, "GGUF Q4_1"),
    "q4_0": Gate(14, 17.8, "GGUF Q4_0"),
    "fp8_e4m3_scaled": Gate(28, 31.1, "fp8 e4m3fn with a per-tensor scale"),
    "fp8_e4m3": Gate(27, 30.6, "plain fp8 e4m3fn"),
    "fp8_e5m2_scaled": Gate(22, 25.4, "fp8 e5m2 with a per-tensor scale"),
    "fp8_e5m2": Gate(22, 25.4, "plain fp8 e5m2"),
    "int8_channel": Gate(23, 26.6, "int8 per output channel (modelkit.int8.per_channel)"),
    "int8_block": Gate(15, 18.9, "int8 per 128x128 block"),
    "int8_tensor": Gate(11, 14.7, "int8 per tensor"),
    # rounding: every element within 2^-11 (fp16) / 2^-8 (bf16) / 2^-24
    # (fp32) of itself, relative: SNR >= 20 log10(2^bits)
    "f16": Gate(70, 73.5, "fp16 storage", rounding=66.2),
    "bf16": Gate(52, 55.6, "bf16 storage", rounding=48.2),
    # fp32 (or wider) storage: a rewrite or the expected output itself, equal
    # but for float32 rounding (not calibrated: a fixed level)
    "f32": Gate(100, None, "fp32 storage", rounding=144.5),
}
# the worst layers a gate check names
WORST_LAYERS = 5
# layers with fewer elements are held to Gate.small_snr_db (few blocks or
# elements: their SNR is a small sample); INT8_MIN_ELEMENTS is the same size
GATE_MIN_ELEMENTS = 4096
SMALL_ALLOWANCE_DB = 6.0
# a "cast" where more than this share of one component's layers fail their
# gates is a merge stored narrower (reported, not judged)
GATED_SHARE = 0.5


# --- the VAE round trip -------------------------------------------------------------


@dataclass(frozen=True)
class RoundTrip:
    """Limits of the VAE round trip (encode the synthetic picture, decode,
    PSNR against it in dB, images in [0, 1]).

    ``absolute``: PSNR a real VAE of the family must reach on the picture
    (a proposal: no real weights were available to calibrate on; trained KL
    VAEs reconstruct natural images at 25-30+ dB). ``relative``: with a
    reference, the candidate's reconstruction against the reference's must
    reach this PSNR (a cast moves it by rounding only; a broken layer by
    much more); this is what judges random-weight test models."""

    absolute: float
    relative: float


ROUND_TRIP = {"kl4": RoundTrip(absolute=20.0, relative=30.0),
              "kl16": RoundTrip(absolute=22.0, relative=30.0)}
