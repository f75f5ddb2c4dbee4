"""Qwen-Image (MMDiT, 20B) key names and shapes, generated from its configuration.

One layout: diffusers' ``QwenImageTransformer2DModel`` names, which ComfyUI's
``comfy/ldm/qwen_image/model.py`` and the single-file releases use too
(``transformer_blocks.N.attn.to_q`` ..., ``img_mod.1``/``txt_mod.1``,
``img_mlp``/``txt_mlp``; the block norms carry no weights). The text input
is Qwen2.5-VL-7B's 3584-wide hidden state, RMS-normed (``txt_norm``).

Used by ``inspect`` tests (full-size sparse headers). Importing this module
does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch.keys import KeyShapes, Shape, joint_attention_keys, linear_keys
from modelkit.arch.lora_modules import LoraModule, build, linear_paths


@dataclass(frozen=True)
class QwenImageConfig:
    """diffusers' ``QwenImageTransformer2DModel`` config."""

    in_channels: int = 64
    out_channels: int = 16
    patch: int = 2
    num_layers: int = 60
    head_dim: int = 128
    num_heads: int = 24
    joint_attention_dim: int = 3584
    time_dim: int = 256

    @property
    def hidden(self) -> int:
        return self.head_dim * self.num_heads


VARIANTS: dict[str, QwenImageConfig] = {"qwen-image": QwenImageConfig()}



def _transformer(cfg: QwenImageConfig) -> Iterator[tuple[str, Shape]]:
    h, hd = cfg.hidden, cfg.head_dim
    yield from linear_keys("img_in", h, cfg.in_channels)
    yield "txt_norm.weight", (cfg.joint_attention_dim,)
    yield from linear_keys("txt_in", h, cfg.joint_attention_dim)
    yield from linear_keys("time_text_embed.timestep_embedder.linear_1", h, cfg.time_dim)
    yield from linear_keys("time_text_embed.timestep_embedder.linear_2", h, h)
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        yield from linear_keys(f"{b}.img_mod.1", 6 * h, h)
        yield from linear_keys(f"{b}.txt_mod.1", 6 * h, h)
        yield from joint_attention_keys(b, h, hd)
        for mlp in ("img_mlp", "txt_mlp"):
            yield from linear_keys(f"{b}.{mlp}.net.0.proj", 4 * h, h)
            yield from linear_keys(f"{b}.{mlp}.net.2", h, 4 * h)
    yield from linear_keys("norm_out.linear", 2 * h, h)
    yield from linear_keys("proj_out", cfg.patch ** 2 * cfg.out_channels, h)


def transformer_keys(cfg: QwenImageConfig) -> KeyShapes:
    """The transformer's keys and shapes (unprefixed)."""
    return dict(_transformer(cfg))


def small(cfg: QwenImageConfig) -> QwenImageConfig:
    """``cfg`` with the same key names at a small size (two blocks, width 256,
    head width 128 as at full size)."""
    return replace(cfg, num_layers=2, num_heads=2, joint_attention_dim=64)


# --- LoRA module names ------------------------------------------------------------
# One layout (diffusers' names, which ComfyUI keeps): kohya/musubi
# lora_unet_transformer_blocks_0_attn_to_q, ComfyUI/DiffSynth
# diffusion_model.transformer_blocks... or bare transformer_blocks..., PEFT
# transformer.transformer_blocks..., SimpleTuner lycoris_ (ComfyUI comfy/lora.py
# model_lora_keys_unet, QwenImage branch; diffusers
# _convert_non_diffusers_qwen_lora_to_diffusers).


def lora_modules(cfg: QwenImageConfig | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    keys = transformer_keys(cfg or QwenImageConfig())
    return build(keys.items(), ((p, LoraModule(p)) for p in linear_paths(keys.items())))


# blocks only Qwen-Image's MMDiT has: per-stream MLPs and modulation
LORA_MODULE_PREFIXES = tuple(f"{p}transformer_blocks.*.{m}" for p in (
    "", "diffusion_model.", "transformer.", "base_model.model.")
    for m in ("img_mlp.", "txt_mlp.", "img_mod.", "txt_mod.")) + tuple(
    f"{p}transformer_blocks_*_{m}" for p in ("lora_unet_", "lycoris_", "lora_transformer_")
    for m in ("img_mlp_", "txt_mlp_", "img_mod_", "txt_mod_"))
