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
