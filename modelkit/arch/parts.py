"""Which part of a single-file checkpoint a key belongs to.

One table for prune, quantize, swap, extract and merge: the component
prefixes come from :mod:`modelkit.arch.configs`, the root buffers and
markers from :mod:`modelkit.arch.keys`.
"""

from __future__ import annotations

from modelkit.arch.configs import EMA_PREFIX, TE_PREFIXES, UNET_PREFIX, VAE_PREFIX
from modelkit.arch.keys import POSITION_IDS, PREDICTION_MARKERS, SCHEDULE_BUFFERS

UNET = "unet"
VAE = "vae"
TE = "te"
EMA = "ema"
MARKER = "marker"
SCHEDULE = "schedule"
AUX_MODEL = "aux_model"  # parts of special models (SD2 depth's MiDaS, unCLIP's image encoder)
JUNK = "junk"
OTHER = "other"

# prefixes of networks a variant needs at inference, beyond UNet/VAE/TE
AUX_MODEL_PREFIXES = ("depth_model.", "embedder.model.visual.")
# known training leftovers: textual-inversion managers, LoRA keys saved into
# a checkpoint, a ControlNet left in by a training script, cond-stage noise
JUNK_PREFIXES = ("embedding_manager.", "lora_te_", "lora_unet_", "control_model.",
                 "cond_stage_model.noise_augmentor.", "denoiser.", "conditioner.embedders.2",
                 "optimizer", "lr_scheduler")
# NovelAI-era SD1 files lack ``text_model.`` under the CLIP prefix
NOVELAI_CLIP_PREFIX = "cond_stage_model.transformer."
NOVELAI_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def te_prefix_of(key: str) -> str | None:
    """The text-encoder prefix ``key`` sits under, if any."""
    for prefix in TE_PREFIXES:
        if key.startswith(prefix):
            return prefix
    return None


def part_of(key: str) -> str:
    """The part a single-file checkpoint key belongs to (one of the module
    constants: ``unet``, ``vae``, ``te``, ``ema``, ``marker``, ``schedule``,
    ``aux_model``, ``junk``, ``other``)."""
    if key.startswith(UNET_PREFIX):
        return UNET
    if key.startswith(VAE_PREFIX):
        return VAE
    if te_prefix_of(key):
        return TE
    if key.startswith(EMA_PREFIX):
        return EMA
    if key in PREDICTION_MARKERS:
        return MARKER
    if key in SCHEDULE_BUFFERS or key == "logvar":
        return SCHEDULE
    if key.startswith(AUX_MODEL_PREFIXES):
        return AUX_MODEL
    if key.startswith(JUNK_PREFIXES):
        return JUNK
    return OTHER


def novelai_clip_fix(key: str) -> str | None:
    """The standard name for a NovelAI-style SD1 CLIP key, or ``None`` when
    ``key`` is not one."""
    if not key.startswith(NOVELAI_CLIP_PREFIX):
        return None
    rest = key[len(NOVELAI_CLIP_PREFIX):]
    if rest.startswith(NOVELAI_CLIP_PARTS):
        return NOVELAI_CLIP_PREFIX + "text_model." + rest
    return None


def is_position_ids(key: str) -> bool:
    """Whether ``key`` is a CLIP ``position_ids`` buffer."""
    return key.endswith(POSITION_IDS) and te_prefix_of(key) is not None
