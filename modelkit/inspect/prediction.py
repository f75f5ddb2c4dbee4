"""Prediction type (eps or v) with the evidence for the verdict.

Prediction type is mostly *not* in the weights. In order of strength:
root marker keys (``v_pred``, ``ztsnr``, ``edm_*``, ComfyUI/A1111
convention), ModelSpec or kohya metadata, an A1111 sidecar ``.yaml``, and for
SD2 ComfyUI's weight heuristic (the std of one norm bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelkit.arch import registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.jsontypes import JSONDict

SD2_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_PROBE_KEY = UNET_PREFIX + SD2_PROBE
SD2_V_THRESHOLD = 0.09  # ComfyUI's SD20.model_type rule
# values of a small tensor, or None when they cannot be read without torch
ValueReader = Callable[[str], "list[float] | None"]


@dataclass
class Prediction:
    """``type`` is ``eps``, ``v`` or ``unknown``; ``evidence`` says why."""

    type: str = "unknown"
    evidence: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False

    def to_dict(self) -> JSONDict:
        return asdict(self)


def _from_markers(keys: set[str]) -> Prediction | None:
    if "edm_vpred.sigma_max" in keys:
        return Prediction("v", ["root key edm_vpred.sigma_max: EDM v-prediction"])
    if "v_pred" in keys:
        return Prediction("v", ["root marker key v_pred"])
    if "edm_mean" in keys or "edm_std" in keys:
        return Prediction("unknown", ["root keys edm_mean/edm_std: EDM parameterisation "
                                      "(Playground v2.5), neither plain eps nor v"])
    return None


def _from_metadata(meta: dict[str, str]) -> Prediction | None:
    for key in ("modelspec.prediction_type", "modelspec.predict_key"):
        value = meta.get(key, "").strip().lower()
        if value in ("v", "v_prediction", "v-prediction"):
            return Prediction("v", [f"metadata {key} = {meta[key]}"])
        if value in ("epsilon", "eps"):
            return Prediction("eps", [f"metadata {key} = {meta[key]}"])
    if meta.get("ss_v_parameterization", "").lower() == "true":
        return Prediction("v", ["metadata ss_v_parameterization = True"])
    base = meta.get("ss_base_model_version", "")
    if base.endswith("_v"):
        return Prediction("v", [f"metadata ss_base_model_version = {base}"])
    return None


def _from_sidecar(path: Path) -> Prediction | None:
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        text = yaml_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        stripped = line.strip().replace('"', "").replace("'", "")
        if stripped.startswith("parameterization:"):
            value = stripped.split(":", 1)[1].strip()
            kind = "v" if value == "v" else "eps"
            return Prediction(kind, [f"sidecar {yaml_path.name}: parameterization {value}"])
    return Prediction("eps", [f"sidecar {yaml_path.name} sets no parameterization "
                              "(LDM default eps)"])


def _sd2_heuristic(read: ValueReader | None, keys: set[str]) -> Prediction:
    probe = next((k for k in (SD2_PROBE_KEY, SD2_PROBE) if k in keys), None)
    if read is None or probe is None:
        return Prediction("unknown", ["SD2 without markers; weights not probed"])
    values = read(probe)
    if values is None:
        return Prediction("unknown", ["SD2 without markers; the probe tensor's dtype "
                                      "cannot be read without torch"])
    if not all(math.isfinite(v) for v in values):
        return Prediction("unknown", ["SD2 without markers; output_blocks.11.1 norm1.bias "
                                      "holds NaN or infinite values (damaged weights)"])
    std = population_std(values)
    kind = "v" if std > SD2_V_THRESHOLD else "eps"
    return Prediction(kind, [
        f"heuristic: std of output_blocks.11.1 norm1.bias = {std:.4f} "
        f"({'>' if kind == 'v' else '<='} {SD2_V_THRESHOLD}, ComfyUI's SD2 rule); "
        "weak evidence, a sidecar .yaml or modelspec.prediction_type is better"])


def population_std(values: list[float]) -> float:
    """Population standard deviation of finite ``values`` (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def detect_prediction(path: Path, keys: set[str], metadata: dict[str, str], arch: str,
                      has_unet: bool, read: ValueReader | None = None) -> Prediction:
    """The prediction-type verdict for a model file."""
    if not has_unet:
        meta = _from_metadata(metadata)
        return meta or Prediction("unknown", ["no denoiser in this file"])
    pred = (_from_markers(keys) or _from_metadata(metadata) or _from_sidecar(path))
    if pred is None:
        declared = registry.get(arch)
        unmarked = declared.prediction if declared else None
        if unmarked == registry.EPS:
            pred = Prediction("eps", [f"no v_pred marker or metadata; {arch} models are "
                                      "eps unless marked"])
        elif unmarked == registry.EPS_OR_V:
            pred = _sd2_heuristic(read, keys)
        elif unmarked == registry.FLOW:
            pred = Prediction("unknown", [f"{arch} is a rectified-flow model"])
        else:
            pred = Prediction("unknown", ["unknown architecture"])
    if "ztsnr" in keys:
        pred.zero_terminal_snr = True
        pred.evidence.append("root marker key ztsnr: zero terminal SNR schedule")
    return pred
