"""modelkit's vocabulary in one place: architecture and component names,
dtype names, devices, block maps and the chunk size.

Architecture names come from the registry (:mod:`modelkit.arch.registry`);
command-line choices and recipe validation are generated from these tuples,
so a new architecture or dtype is added here once. Importing this module
does not import torch.
"""

from __future__ import annotations

from modelkit.arch.blocks import DEFAULT_MAP, MAPS
from modelkit.arch.configs import ARCHS, EMA_PREFIX, TE_PREFIXES, UNET_PREFIX, VAE_PREFIX
from modelkit.arch.registry import DETECT, FULL, REGISTRY, TEXT_ENCODER, names

# architectures with key tables (merge, convert, verify work on these)
ARCH_NAMES: tuple[str, ...] = names(support=FULL)
# architectures inspect recognises (family, variant, layout) that the other
# commands do not handle yet
RECOGNISED_ONLY: tuple[str, ...] = names(support=DETECT)

# the components of a single-file checkpoint and their key prefixes
UNET, VAE, TE = "unet", "vae", "te"
COMPONENTS: tuple[str, ...] = (UNET, VAE, TE)
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    UNET: (UNET_PREFIX,), VAE: (VAE_PREFIX,), TE: tuple(TE_PREFIXES),
}
# text-encoder slots (``te`` for one encoder, ``te1``/``te2`` for SDXL's two)
TE_SLOTS: tuple[str, ...] = tuple(dict.fromkeys(
    slot.name for arch in ARCHS.values() for slot in arch.text_encoders))
# what ``extract`` can write on its own: a component or one text encoder
# (the transformer families' text encoders by their registry names: clip_l, t5xxl...)
EXTRACTABLE: tuple[str, ...] = COMPONENTS + tuple(s for s in TE_SLOTS if s != TE) + tuple(
    dict.fromkeys(c.name for a in REGISTRY.values() if a.spec is None for c in a.components
                  if c.role == TEXT_ENCODER))
EMA = EMA_PREFIX

# dtype names users write -> safetensors dtypes
USER_DTYPES: dict[str, str] = {
    "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp32": "F32", "float32": "F32", "float": "F32",
    "fp64": "F64",
    "fp8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3", "fp8_e5m2": "F8_E5M2",
    "int8": "I8",
}
# float storage types, as users write them and as safetensors dtypes
FLOAT_STORAGE: tuple[str, ...] = ("fp16", "bf16", "fp32")
FLOAT_STORAGE_DTYPES: tuple[str, ...] = tuple(USER_DTYPES[n] for n in FLOAT_STORAGE)
# what ``quantize`` stores a model as (modelkit.convert.quantize)
QUANT_TARGETS: tuple[str, ...] = (*FLOAT_STORAGE, "fp8_e4m3fn", "fp8_e5m2", "int8")
# how ``quantize`` spells an 8-bit file: modelkit's own int8 scheme and plain
# fp8, or ComfyUI's scaled formats (modelkit.convert.comfy_quant)
QUANT_FORMATS: tuple[str, ...] = ("modelkit", "comfy", "comfy-legacy")
KEEP = "keep"  # leave each tensor's dtype as it is
MERGE_OUTPUT_DTYPES: tuple[str, ...] = (*FLOAT_STORAGE, KEEP)
# what ``modelkit merge`` writes without --dtype: fp16, except that bf16
# tensors stay bf16 (Flux.1 and other bf16 models overflow in fp16)
AUTO_DTYPE = "auto"

DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
BLOCK_MAPS: tuple[str, ...] = MAPS
DEFAULT_BLOCK_MAP = DEFAULT_MAP
MISSING_KEY_POLICIES: tuple[str, ...] = ("error", "take-first", "skip")

OUTPUT_FORMATS: tuple[str, ...] = ("safetensors", "diffusers", "gguf")
# llama.cpp's file types (the _S/_M mixes raise some tensors; modelkit.arch.gguf)
GGUF_QUANT_TYPES: tuple[str, ...] = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s",
                                     "q3_k_m", "q3_k_s", "q2_k", "q5_1", "q5_0", "q4_1",
                                     "q4_0")
GGUF_FLOAT_DTYPES: tuple[str, ...] = ("fp16", "bf16")
GGUF_TYPES: tuple[str, ...] = (*GGUF_QUANT_TYPES, "f16", "bf16")  # recipe output.quant

# elements per chunk for float32 math over big tensors: on a 2-core CPU one 1 GB
# fp16->fp32 call was measured at 8 s against 0.15 s in 1M-element chunks
CHUNK_ELEMENTS = 1 << 20
