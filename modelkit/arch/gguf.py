"""GGUF export policy as data: per family, what goes in, what stays float, and
the ``_S``/``_M`` mixes, as the files ComfyUI-GGUF users load are made.

Those files come from city96/ComfyUI-GGUF's ``tools/convert.py`` (F16/BF16,
with per-architecture ``keys_hiprec`` kept F32 and ``shape_fix`` reshapes)
then a llama.cpp patched by ``tools/lcpp.patch`` (``llama-quantize``: per
architecture the tensors never quantized, only 2-D tensors quantized, and
``img_tensor_get_type``: which tensors a ``_M``/``_S`` mix raises, and the
F16 fallback of a k-quant whose rows are not a multiple of 256). Qwen-Image
is declared on the repository's ``auto_convert`` branch (commit 16341cc,
"Convert code for qwen image"), as are Wan's S2V keys, Flux.2's shared
modulations (ec7506d) and Z-Image's pad tokens (a0a0d2e). Chroma and Flux.2
files are ``flux`` (convert.py's ModelFlux matches them; ComfyUI tells them
apart by their keys), Z-Image ``lumina2``.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class GgufPolicy:
    """GGUF export of one family's denoiser.

    Args:
        arch: ``general.architecture`` (ComfyUI-GGUF's ``IMG_ARCH_LIST``).
        keep_f32: exact tensor names stored F32.
        keep_float_parts: name parts never quantized (``lcpp.patch``): such a
            tensor keeps its float type.
        parts: the key prefixes of the denoiser that go in (``()``: every
            key under the denoiser prefix, or every key of an unprefixed file).
        keep_float_names: exact names never quantized (``lcpp.patch``'s
            ``name != ...`` rules).
        hiprec_parts: ``convert.py``'s ``keys_hiprec``: stored F32 (parameters
            the model uses directly, which the loader cannot dequantize).
        shape_fix: ``convert.py``'s ``shape_fix``: a tensor whose last
            dimension does not fit the block is stored as rows of 256 with
            ``comfy.gguf.orig_shape``; without it only 2-D tensors are
            quantized (the patch's ``ggml_n_dims(tensor) == 2``).
    """

    arch: str
    keep_f32: frozenset[str]
    keep_float_parts: tuple[str, ...]
    parts: tuple[str, ...]
    keep_float_names: frozenset[str] = frozenset()
    hiprec_parts: tuple[str, ...] = ()
    shape_fix: bool = False


class Raise(NamedTuple):
    """A mix rule's type under one file type: ``to`` for the first ``first``
    matching tensors (every one when ``first`` is None), then ``after``
    (None: the file type's default)."""

    to: str
    first: int | None = None
    after: str | None = None


@dataclass(frozen=True)
class MixRule:
    """One branch of ``img_tensor_get_type`` (city96/ComfyUI-GGUF
    ``tools/lcpp.patch``): tensors whose name contains one of ``parts`` get
    the type ``raises`` gives for the file type (user names, ``q4_k_m``)."""

    name: str
    parts: tuple[str, ...]
    raises: tuple[tuple[str, Raise], ...]


# img_tensor_get_type, in its order (the first rule whose parts match applies);
# Q3_K_L, which modelkit does not offer, is left out
MIX_RULES: tuple[MixRule, ...] = (
    MixRule("attn_v", ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight",
                       ".attn.w2v.weight", "_attn.v_proj.weight"),
            (("q2_k", Raise("Q3_K")), ("q3_k_m", Raise("Q5_K", 2, "Q4_K")),
             ("q4_k_m", Raise("Q6_K")), ("q5_k_m", Raise("Q6_K")),
             ("q4_k_s", Raise("Q5_K", 4)))),
    MixRule("attn_qkv", ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight"),
            (("q3_k_m", Raise("Q4_K")), ("q4_k_m", Raise("Q5_K")),
             ("q5_k_m", Raise("Q6_K")))),
    MixRule("ffn_down", ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight",
                         ".mlp.layer2.weight", ".adaln_modulation_mlp.2.weight",
                         ".feed_forward.w2.weight"),
            (("q3_k_m", Raise("Q4_K")), ("q4_k_s", Raise("Q5_K")),
             ("q4_k_m", Raise("Q6_K")), ("q5_k_m", Raise("Q6_K")),
             ("q4_0", Raise("Q4_1")), ("q5_0", Raise("Q5_1")))),
)

# the patch's fallback for a k-quant whose rows are not a multiple of 256
# (llama.cpp's own llama_tensor_get_type falls back to Q5_0/Q5_1/Q8_0; the
# patch comments that out and uses F16, which is what ComfyUI-GGUF users get)
K_FALLBACK = "F16"

# city96/ComfyUI-GGUF tools/convert.py: conv_in/conv_out stay F32, embeddings
# and transformer projections stay in their float type (lcpp.patch, SD1/SDXL)
LDM_KEEP_F32 = frozenset({"input_blocks.0.0.weight", "out.2.weight"})
LDM_KEEP_FLOAT = ("time_embed.", "label_emb.", "proj_in.", "proj_out.")
LDM_UNET_PARTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.",
                  "output_blocks.", "out.")


def ldm(arch: str) -> GgufPolicy:
    """The SD1/SD2/SDXL UNet policy with ``general.architecture`` ``arch``."""
    return GgufPolicy(arch, LDM_KEEP_F32, LDM_KEEP_FLOAT, LDM_UNET_PARTS, shape_fix=True)


# lcpp.patch LLM_ARCH_FLUX (main branch)
FLUX = GgufPolicy("flux", frozenset(), ("txt_in.", "img_in.", "time_in.", "vector_in.",
                                        "guidance_in.", "final_layer."), ())
# Chroma: convert.py's ModelFlux detects it (double_blocks.0.img_attn.proj.weight)
# and writes "flux", so LLM_ARCH_FLUX's list applies: the guidance approximator
# (distilled_guidance_layer, plain Linears ComfyUI-GGUF dequantizes) is
# quantized; its RMSNorm scales are 1-D and stay F32. ComfyUI's
# model_detection.py then tells Chroma from Flux.1 by distilled_guidance_layer.
CHROMA = FLUX
# Flux.2: also "flux" (same detection); the auto_convert branch's lcpp.patch
# (commit ec7506d, "Flux2 specific filter") adds the shared modulations to
# LLM_ARCH_FLUX's list
FLUX2 = GgufPolicy("flux", frozenset(), (*FLUX.keep_float_parts, "single_stream_modulation.",
                                         "double_stream_modulation_"), ())
# Z-Image: convert.py's ModelLumina2 (cap_embedder.1.weight and
# context_refiner.0.attention.qkv.weight) writes "lumina2"; lcpp.patch
# LLM_ARCH_LUMINA2 keeps the embedders, the final layer and both refiners
# float; the auto_convert branch (commit a0a0d2e, "Z-Image conversion
# support") keeps the pad tokens F32 (keys_hiprec: parameters used directly;
# the patch's "x_pad_token." never matches, their [1, dim] is 1-D to GGML)
Z_IMAGE = GgufPolicy("lumina2", frozenset(), ("t_embedder.", "x_embedder.", "final_layer.",
                                              "cap_embedder.", "context_refiner.",
                                              "noise_refiner."), (),
                     hiprec_parts=("x_pad_token", "cap_pad_token"))
# lcpp.patch LLM_ARCH_SD3
SD3 = GgufPolicy("sd3", frozenset(), ("final_layer.", "time_text_embed.", "context_embedder.",
                                      "t_embedder.", "y_embedder.", "x_embedder."), (),
                 keep_float_names=frozenset({"proj_out.weight", "pos_embed"}))
# lcpp.patch LLM_ARCH_QWEN_IMAGE (auto_convert branch)
QWEN_IMAGE = GgufPolicy("qwen_image", frozenset(), ("img_in.", "txt_in.", "time_text_embed.",
                                                    "proj_out.", "norm_out."), ())
# lcpp.patch LLM_ARCH_WAN and convert.py ModelWan.keys_hiprec (with S2V's keys)
WAN = GgufPolicy("wan", frozenset(), ("modulation.", "patch_embedding.", "text_embedding.",
                                      "time_projection.", "time_embedding.", "img_emb.",
                                      "head.", "cond_encoder.", "frame_packer.",
                                      "audio_injector."), (),
                 hiprec_parts=(".modulation", ".encoder.padding_tokens", "trainable_cond_mask",
                               "casual_audio_encoder.weights",
                               "casual_audio_encoder.encoder.conv"))
