"""SD3 / SD3.5 (MMDiT) key names and shapes, generated from its configuration.

The original layout (Stability's ``mmditx.py``, what ComfyUI and the
single-file releases use): ``joint_blocks.N.context_block`` and
``x_block`` with fused ``attn.qkv``; the last context block is
``pre_only`` (no projection, no MLP). SD3.5 adds RMS q/k norms
(``attn.ln_q``/``ln_k``); SD3.5-medium adds a second self-attention
(``x_block.attn2``) in its first 13 blocks and a 384x384 position
embedding. Sizes: ComfyUI ``comfy/model_detection.py`` and
``comfy/ldm/modules/diffusionmodules/mmdit.py``.

Used by ``inspect`` tests (full-size sparse headers). Importing this module
does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch.configs import CLIP_L, UNET_PREFIX, VAE_PREFIX, VAEConfig
from modelkit.arch.keys import (
    KeyShapes,
    Shape,
    linear_keys,
    text_encoder_keys,
    vae_keys,
)
from modelkit.arch.lora_modules import LoraModule, build, from_key_map


@dataclass(frozen=True)
class SD3Config:
    """The MMDiT's size: depth (64 channels a head, one head a block)."""

    depth: int = 24
    pos_embed_max: int = 192  # pos_embed holds pos_embed_max**2 positions
    qk_norm: bool = False
    attn2_layers: int = 0  # blocks 0..n-1 carry x_block.attn2 (SD3.5-medium)
    in_channels: int = 16
    patch: int = 2
    adm_in: int = 2048  # pooled CLIP-L + CLIP-G
    context_in: int = 4096  # T5-XXL
    time_dim: int = 256

    @property
    def hidden(self) -> int:
        return 64 * self.depth


VARIANTS: dict[str, SD3Config] = {
    "sd3-medium": SD3Config(),
    "sd3.5-medium": SD3Config(pos_embed_max=384, qk_norm=True, attn2_layers=13),
    "sd3.5-large": SD3Config(depth=38, qk_norm=True),
}



def _attn(p: str, h: int, qk_norm: bool, proj: bool = True) -> Iterator[tuple[str, Shape]]:
    yield from linear_keys(f"{p}.qkv", 3 * h, h)
    if qk_norm:
        yield f"{p}.ln_q.weight", (64,)
        yield f"{p}.ln_k.weight", (64,)
    if proj:
        yield from linear_keys(f"{p}.proj", h, h)


def _transformer(cfg: SD3Config) -> Iterator[tuple[str, Shape]]:
    h, out = cfg.hidden, cfg.in_channels * cfg.patch ** 2
    yield "pos_embed", (1, cfg.pos_embed_max ** 2, h)
    yield "x_embedder.proj.weight", (h, cfg.in_channels, cfg.patch, cfg.patch)
    yield "x_embedder.proj.bias", (h,)
    yield from linear_keys("t_embedder.mlp.0", h, cfg.time_dim)
    yield from linear_keys("t_embedder.mlp.2", h, h)
    yield from linear_keys("y_embedder.mlp.0", h, cfg.adm_in)
    yield from linear_keys("y_embedder.mlp.2", h, h)
    yield from linear_keys("context_embedder", h, cfg.context_in)
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        c, x = f"joint_blocks.{i}.context_block", f"joint_blocks.{i}.x_block"
        yield from linear_keys(f"{c}.adaLN_modulation.1", (2 if last else 6) * h, h)
        yield from _attn(f"{c}.attn", h, cfg.qk_norm, proj=not last)
        if not last:
            yield from linear_keys(f"{c}.mlp.fc1", 4 * h, h)
            yield from linear_keys(f"{c}.mlp.fc2", h, 4 * h)
        attn2 = i < cfg.attn2_layers
        yield from linear_keys(f"{x}.adaLN_modulation.1", (9 if attn2 else 6) * h, h)
        yield from _attn(f"{x}.attn", h, cfg.qk_norm)
        if attn2:
            yield from _attn(f"{x}.attn2", h, cfg.qk_norm)
        yield from linear_keys(f"{x}.mlp.fc1", 4 * h, h)
        yield from linear_keys(f"{x}.mlp.fc2", h, 4 * h)
    yield from linear_keys("final_layer.linear", out, h)
    yield from linear_keys("final_layer.adaLN_modulation.1", 2 * h, h)


def transformer_keys(cfg: SD3Config) -> KeyShapes:
    """The MMDiT's keys and shapes (original layout, unprefixed)."""
    return dict(_transformer(cfg))


# the SD3 VAE: KL-f8 with 16 latent channels, no quant_conv/post_quant_conv
VAE = VAEConfig(z_channels=16, embed_dim=16)
CLIP_G = replace(CLIP_L, width=1280, layers=32, heads=20, has_projection=True)
TE_PREFIX = "text_encoders."


def all_in_one_keys(cfg: SD3Config) -> KeyShapes:
    """Stability's all-in-one SD3 checkpoint (``sd3_medium_incl_clips_t5xxlfp16``):
    the MMDiT under ``model.diffusion_model.``, the VAE under
    ``first_stage_model.``, CLIP-L, CLIP-G and T5-XXL under ``text_encoders.``."""
    from modelkit.arch.flux import t5xxl_keys

    out = {UNET_PREFIX + k: s for k, s in transformer_keys(cfg).items()}
    out.update({VAE_PREFIX + k: s for k, s in vae_keys(VAE).items() if "quant_conv" not in k})
    for name, clip in (("clip_l", CLIP_L), ("clip_g", CLIP_G)):
        out.update({f"{TE_PREFIX}{name}.transformer.{k}": s
                    for k, s in text_encoder_keys(clip).items()})
    out.update({f"{TE_PREFIX}t5xxl.transformer.{k}": s for k, s in t5xxl_keys().items()})
    return out


# --- LoRA module names ------------------------------------------------------------
# kohya/ComfyUI name the MMDiT's own paths (lora_unet_joint_blocks_0_x_block_attn_qkv,
# diffusion_model.joint_blocks...); diffusers/PEFT, OneTrainer and SimpleTuner
# name diffusers' SD3Transformer2DModel, whose split q/k/v land on row slices
# of the fused qkv (ComfyUI comfy/lora.py model_lora_keys_unet, SD3 branch).
# One table for every variant: SD3.5-large's 38 blocks with SD3.5-medium's attn2.
LORA_CONFIG = SD3Config(depth=38, qk_norm=True, attn2_layers=13)


def lora_modules(cfg: SD3Config | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    from modelkit.arch.to_diffusers import sd3_map

    cfg = cfg or LORA_CONFIG
    keys = transformer_keys(cfg)
    return build(keys.items(), from_key_map(sd3_map(cfg), keys))


LORA_MODULE_PREFIXES = ("lora_unet_joint_blocks_", "diffusion_model.joint_blocks.",
                        "lycoris_joint_blocks_")
