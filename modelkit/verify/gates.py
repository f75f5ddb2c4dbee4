"""Per-layer gates: a quantized or converted model against its source.

Every weight the candidate stores is restored to float (GGUF blocks, int8
with its scales, fp8 with or without a per-tensor scale), read one key at a
time beside the same key of the reference, and measured: SNR in dB
(``||ref||^2 / ||cand - ref||^2``) and cosine. Each layer is judged by the
gate of its storage *format class* (:data:`modelkit.core.verify_thresholds.GATES`),
which comes from the candidate's header as the io layer reads it
(:func:`modelkit.io.quantized.layer_quantization`):

* GGUF: the tensor's GGML type (``q8_0``, ``q4_k``...; kept ``F16``/``F32``
  tensors as casts);
* ComfyUI: scaled fp8 (legacy ``scaled_fp8`` marker with ``.scale_weight``,
  or ``float8_e4m3fn``/``float8_e5m2`` layers with ``weight_scale``) as
  ``fp8_e4m3_scaled``/``fp8_e5m2_scaled``; ``int8_tensorwise`` and
  ``int8_blockwise`` as ``int8_tensor``/``int8_block``; these layers are
  read through io's dequantizing open;
* modelkit's ``modelkit.int8.per_channel``: ``int8_channel``;
* plain storage: ``fp8_e4m3``/``fp8_e5m2`` (a cast to fp8, no scale),
  ``f16``, ``bf16``, ``f32`` (an fp32 candidate must equal its reference
  but for rounding).

A scale error keeps the cosine and loses the SNR (x2: 0 dB); a transposed
or swapped weight loses both. Checks are named ``gate.<class>``; each names
its worst layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import UNET_PREFIX
from modelkit.core.verify_thresholds import (
    FAIL,
    GATE_MIN_ELEMENTS,
    GATED_SHARE,
    GATES,
    INFO,
    PASS,
    WORST_LAYERS,
    cosine_at,
)
from modelkit.errors import CancelFlag, check_cancel
from modelkit.numeric import CHUNK_ELEMENTS
from modelkit.progress import VERIFY, Progress, ProgressFn, no_progress
from modelkit.verify.report import Check

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import Source
    from modelkit.verify.models import ModelUnderTest

# storage as io names it (GGML types, ComfyUI formats, modelkit int8, dtypes)
# -> format class; other GGML types are their own class in lower case
SCHEMES = {"float8_e4m3fn": "fp8_e4m3_scaled", "float8_e4m3fn scaled": "fp8_e4m3_scaled",
           "float8_e5m2": "fp8_e5m2_scaled", "float8_e5m2 scaled": "fp8_e5m2_scaled",
           "int8_tensorwise": "int8_tensor", "int8 scaled": "int8_tensor",
           "int8_blockwise": "int8_block", "int8 per_channel": "int8_channel",
           "F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2", "F16": "f16", "BF16": "bf16",
           "F32": "f32", "F64": "f32"}
# classes ComfyUI's formats make (dequantized by io's open)
COMFY_CLASSES = frozenset({"fp8_e4m3_scaled", "fp8_e5m2_scaled", "int8_tensor", "int8_block"})


@dataclass
class LayerGate:
    """One layer's restored error against the reference."""

    key: str
    format: str
    elements: int
    snr_db: float
    cosine: float

    @property
    def level(self) -> float:
        """The SNR this layer must keep (its class's, by its size)."""
        return GATES[self.format].level(self.elements)

    @property
    def passed(self) -> bool:
        # NaN fails both comparisons; inf passes
        return self.snr_db >= self.level and self.cosine >= cosine_at(self.level)

    @property
    def margin(self) -> float:
        """dB above (or below) the layer's level: the worst layer first."""
        return self.snr_db - self.level

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "format": self.format, "elements": self.elements,
                "snr_db": self.snr_db, "cosine": self.cosine, "level_db": self.level,
                "passed": self.passed}


def format_classes(model: ModelUnderTest) -> dict[str, str]:
    """Stored (presented) weight key -> format class, from the storage the
    io layer reads in the header (:func:`modelkit.io.quantized.layer_quantization`);
    keys whose storage has no gate (integer buffers, NF4...) are left out."""
    from modelkit.io.quantized import layer_quantization

    if not model.path.is_file():
        return {k: c for k, i in model.stored.infos.items()
                if (c := SCHEMES.get(i.dtype)) is not None}
    out = {}
    for key, scheme in layer_quantization(model.path).items():
        cls = SCHEMES.get(scheme, scheme.lower())
        if cls in GATES:
            out[key] = cls
    return out


def _restorer(model: ModelUnderTest, classes: dict[str, str]) -> Callable[[str, str],
                                                                         torch.Tensor]:
    """``(stored key, render key) -> float32 tensor``: ComfyUI-quantized
    layers through io's dequantizing open (:func:`modelkit.io.open.open_source`),
    the others from the model's render source (GGUF and modelkit int8 are
    dequantized there already)."""
    opened: list[Source] = []

    def get(key: str, render_key: str) -> torch.Tensor:
        if classes.get(key) in COMFY_CLASSES and model.file_format == "safetensors":
            if not opened:
                from modelkit.io.open import open_source

                opened.append(open_source(model.path))
            return opened[0].get(key).float()
        return model.render_source.get(render_key).float()
    return get


def _render_key(key: str, source: Source) -> str | None:
    if key in source.infos:
        return key
    return UNET_PREFIX + key if UNET_PREFIX + key in source.infos else None


def measure(cand: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """SNR (dB) of ``ref`` against ``cand - ref`` and the cosine of the two,
    summed in float64 over 1M-element chunks (a full-size layer never gets a
    whole-tensor float64 copy); inf/1.0 when equal, NaN when ``cand`` is
    not finite."""
    import torch

    a_all, b_all = cand.reshape(-1), ref.reshape(-1)
    dd = bb = aa = ab = 0.0
    for i in range(0, a_all.numel(), CHUNK_ELEMENTS):
        a = a_all[i:i + CHUNK_ELEMENTS].double()
        b = b_all[i:i + CHUNK_ELEMENTS].double()
        d = a - b
        dd += float(torch.dot(d, d))
        bb += float(torch.dot(b, b))
        aa += float(torch.dot(a, a))
        ab += float(torch.dot(a, b))
    if dd != dd:
        return math.nan, math.nan
    snr = math.inf if dd == 0 else (10 * math.log10(bb / dd) if bb else -math.inf)
    if aa == 0 or bb == 0:
        return snr, 1.0 if aa == bb else 0.0
    return snr, ab / math.sqrt(aa * bb)


def layer_gates(model: ModelUnderTest, reference: ModelUnderTest,
                progress: ProgressFn = no_progress,
                cancel: CancelFlag | None = None) -> list[LayerGate]:
    """Every weight the candidate stores that the reference has at the same
    shape, measured one key at a time (two tensors in memory)."""
    classes = format_classes(model)
    restored = _restorer(model, classes)
    ref_src = reference.render_source
    pairs = []
    for key, cls in classes.items():
        render_key = _render_key(key, model.render_source)
        ref_key = _render_key(key, ref_src)
        if render_key is None or ref_key is None or not ref_src.infos[ref_key].is_float:
            continue
        if tuple(model.render_source.infos[render_key].shape) != \
                tuple(ref_src.infos[ref_key].shape):
            continue  # a shape mismatch is the change check's
        pairs.append((key, cls, render_key, ref_key))
    out = []
    for i, (key, cls, render_key, ref_key) in enumerate(pairs):
        check_cancel(cancel)
        snr, cos = measure(restored(key, render_key), ref_src.get(ref_key))
        elements = math.prod(ref_src.infos[ref_key].shape)
        out.append(LayerGate(render_key, cls, elements, snr, cos))
        progress(Progress("per-layer gates", i + 1, len(pairs), "tensors", key, VERIFY))
    return out


def judged(layers: list[LayerGate], operation: str | None, given: bool) -> tuple[bool, str]:
    """Whether the gates decide the verdict, and why. A given ``--op`` other
    than merge or lora_bake judges them. Inferred, a cast or quantization
    where most layers of some component (UNet, VAE, a text encoder) fail is
    a merge stored narrower (reported); one where every component mostly
    passes is a cast with broken layers (judged)."""
    if operation in (None, "merge", "lora_bake"):
        return False, f"operation {operation or 'unknown'}: per-layer errors reported"
    if given:
        return True, f"--op {operation}: every layer must pass its format's gate"
    if operation == "lossless":
        return False, ("same storage as the reference and not told it is a rewrite "
                       "(--op lossless judges it): reported")
    from modelkit.arch.parts import part_of

    parts: dict[str, list[LayerGate]] = {}
    for g in layers:
        parts.setdefault(part_of(g.key), []).append(g)
    for part, group in parts.items():
        bad = sum(not g.passed for g in group)
        if bad / len(group) > GATED_SHARE:
            return False, (f"{bad} of {len(group)} {part} layers beyond their format's "
                           "gate: a merge or other edit, reported")
    return True, f"{operation}: every layer must pass its format's gate"


def _fmt(g: LayerGate) -> str:
    return f"{g.key} ({g.snr_db:.1f} dB, cos {g.cosine:.4f})"


def gate_checks(layers: list[LayerGate], judge: bool) -> list[Check]:
    """One ``gate.<class>`` check per format class present: the worst SNR
    as value, the class's levels as threshold, the failing (or worst)
    layers named."""
    by_class: dict[str, list[LayerGate]] = {}
    for g in layers:
        by_class.setdefault(g.format, []).append(g)
    checks = []
    for cls, group in by_class.items():
        gate = GATES[cls]
        group.sort(key=lambda g: (g.margin if g.margin == g.margin else -math.inf,
                                  g.cosine if g.cosine == g.cosine else -math.inf))
        bad = [g for g in group if not g.passed]
        worst = group[0]
        shown = bad or group
        names = ", ".join(_fmt(g) for g in shown[:WORST_LAYERS])
        more = f" and {len(shown) - WORST_LAYERS} more" if len(shown) > WORST_LAYERS else ""
        if bad:
            verdict = FAIL if judge else INFO
            msg = (f"{len(bad)} of {len(group)} {gate.label} layers below the gate: "
                   f"{names}{more}")
        else:
            verdict = PASS if judge else INFO
            msg = f"{len(group)} {gate.label} layers; worst {names}"
        threshold = f">= {gate.snr_db:g} dB, cosine >= {gate.cosine:.10g}"
        if any(g.level != gate.snr_db for g in group):
            threshold += f" ({gate.small_snr_db:g} dB under {GATE_MIN_ELEMENTS} elements)"
        checks.append(Check(f"gate.{cls}", verdict, msg, worst.snr_db, threshold))
    return checks


def gates_dict(layers: list[LayerGate], judge: bool, reason: str) -> dict[str, Any]:
    """The report's ``gates`` section: the decision, the levels of the classes
    present and every layer, worst first."""
    ordered = sorted(layers, key=lambda g: g.margin if g.margin == g.margin else -math.inf)
    classes = sorted({g.format for g in layers})
    return {"judged": judge, "reason": reason,
            "classes": {c: {"snr_db": GATES[c].snr_db, "cosine": GATES[c].cosine,
                            "small_snr_db": GATES[c].small_snr_db,
                            "calibrated_snr_db": GATES[c].calibrated,
                            "label": GATES[c].label,
                            "layers": sum(g.format == c for g in layers),
                            "failed": sum(g.format == c and not g.passed for g in layers)}
                        for c in classes},
            "layers": [g.to_dict() for g in ordered]}
