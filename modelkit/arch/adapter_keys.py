"""Adapter tensor names as data: which suffixes each LoRA/LyCORIS/PEFT
format uses, the module-name prefixes of each naming, and the widths that
tell architectures apart. Shared by header-only detection
(:mod:`modelkit.inspect.adapters`) and the LoRA engine (:mod:`modelkit.lora`).

Importing this module does not import torch.
"""

from __future__ import annotations

import re

from modelkit.arch.registry import REGISTRY, lora_archs

# adapter tensor suffixes -> role; multi-part suffixes are tried first
DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora.down.weight",
                 "lora_linear_layer.down.weight")
UP_SUFFIXES = ("lora_up.weight", "lora_B.weight", "lora.up.weight",
               "lora_linear_layer.up.weight")
PEFT_SUFFIXES = frozenset({"lora_A.weight", "lora_B.weight", "lora.down.weight",
                           "lora.up.weight", "lora_linear_layer.down.weight",
                           "lora_linear_layer.up.weight"})
DORA_SUFFIXES = frozenset({"dora_scale", "lora_magnitude_vector",
                           "lora_magnitude_vector.weight"})
ALGO_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lora": (*DOWN_SUFFIXES, *UP_SUFFIXES, "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
             "lokr_t2"),
    "full": ("diff", "diff_b", "w_norm", "b_norm"),
    "ia3": ("on_input",),
}
EXTRA_SUFFIXES = ("alpha", "scale", "dora_scale", "lora_magnitude_vector.weight",
                  "lora_magnitude_vector", "bias_indices", "bias_values", "bias_size")
SUFFIXES: tuple[str, ...] = tuple(sorted(
    {s for group in ALGO_SUFFIXES.values() for s in group} | set(EXTRA_SUFFIXES),
    key=lambda s: (-s.count("."), -len(s)),
))
_SUFFIX_SET = frozenset(SUFFIXES)
_MAX_SUFFIX_DOTS = max(s.count(".") for s in SUFFIXES)
# diffusers' old attention-processor spelling: ...attn1.processor.to_q_lora.down.weight
PROCESSOR_SUFFIXES = {"_lora.down.weight": "lora.down.weight",
                      "_lora.up.weight": "lora.up.weight"}

# XLabs' Flux processor LoRAs: double_blocks.0.processor.qkv_lora1.down.weight
# (diffusers _convert_xlabs_flux_lora_to_diffusers): the module keeps its name
XLABS_KEY = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")

# module-name prefix -> (naming, component); "te" becomes "te1" on SDXL
NAME_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("lora_unet_", "kohya", "unet"),
    ("lora_te1_", "kohya", "te1"),
    ("lora_te2_", "kohya", "te2"),
    ("lora_te_", "kohya", "te"),
    ("unet.", "peft", "unet"),
    ("base_model.model.", "peft", "unet"),
    ("text_encoder_2.", "peft", "te2"),
    ("text_encoder.", "peft", "te"),
    ("transformer.", "peft", "unet"),  # diffusers / ai-toolkit transformers
    ("lora_transformer_", "onetrainer", "unet"),  # OneTrainer: diffusers paths, kohya style
    ("lycoris_", "simpletuner", "unet"),  # SimpleTuner's LyCORIS
    ("diffusion_model.", "comfyui", "unet"),
    ("text_encoders.clip_g.", "comfyui", "te2"),
    ("text_encoders.", "comfyui", "te"),
)
_LORA_SPECS = [(n, spec) for n in lora_archs() if (spec := REGISTRY[n].spec) is not None]
# UNet cross-attention width -> architecture (768 SD1, 1024 SD2, 2048 SDXL)
CONTEXT_DIMS = {spec.unet.context_dim: n for n, spec in _LORA_SPECS}
# text-encoder width -> architectures with an encoder of that width
TE_WIDTHS = {w: frozenset(n for n, spec in _LORA_SPECS
                          if any(s.config.width == w for s in spec.text_encoders))
             for w in sorted({s.config.width for _, spec in _LORA_SPECS
                              for s in spec.text_encoders})}
LDM_UNET_NAMES = ("lora_unet_input_blocks_", "lora_unet_middle_block_",
                  "lora_unet_output_blocks_")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` for an adapter tensor name, or None. Bare
    ``.weight`` keys (IA3) are not split here."""
    if ".processor." in key:
        xlabs = XLABS_KEY.match(key)
        if xlabs is not None:
            return xlabs.group(1), f"lora.{xlabs.group(2)}.weight"
        for old, new in PROCESSOR_SUFFIXES.items():
            if key.endswith(old):
                module = key[: -len(old)].replace(".processor.", ".")
                return module.replace(".to_out", ".to_out.0"), new
    # the tails after the last few dots, longest first: SUFFIXES' order
    # (most dots first) is the order of these tails
    parts = key.rsplit(".", _MAX_SUFFIX_DOTS + 1)
    for n in range(min(_MAX_SUFFIX_DOTS + 1, len(parts) - 1), 0, -1):
        suffix = ".".join(parts[-n:])
        if suffix in _SUFFIX_SET:
            return key[: -len(suffix) - 1], suffix
    return None
