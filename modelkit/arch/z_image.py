"""Z-Image (6B single-stream DiT of the Lumina-2 family) key names and shapes.

30 ``layers`` 3840 wide with adaLN modulation, two ``noise_refiner`` layers
(modulated) and two ``context_refiner`` layers (not) before them, Qwen3-4B's
2560-wide text features through ``cap_embedder`` (RMS norm + linear). ComfyUI
detects the Lumina-2 family by ``cap_embedder.1.weight`` (Comfy-Org/ComfyUI
``comfy/model_detection.py``); its width tells Z-Image (3840 <- 2560) from
Lumina 2.0 (2304 <- 2304). Two layouts:

* ``diffusers``: ``ZImageTransformer2DModel`` (huggingface/diffusers
  ``transformer_z_image.py``: split ``to_q/to_k/to_v``, ``all_x_embedder.2-1``),
  checked against that class in the tests;
* ``original``: the Lumina-2 names ComfyUI uses (``comfy/ldm/lumina/model.py``:
  fused ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``,
  ``x_embedder``, ``final_layer``).

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch.keys import KeyShapes, Shape, linear_keys
from modelkit.arch.lora_modules import LoraModule, build, linear_paths

ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class ZImageConfig:
    """diffusers' ``ZImageTransformer2DModel`` defaults (Z-Image, Z-Image-Turbo)."""

    in_channels: int = 16
    patch: int = 2
    dim: int = 3840
    num_heads: int = 30
    num_layers: int = 30
    num_refiner_layers: int = 2
    cap_feat_dim: int = 2560
    time_dim: int = 256
    t_hidden: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)


VARIANTS: dict[str, ZImageConfig] = {"z-image": ZImageConfig()}


def _layer(cfg: ZImageConfig, b: str, layout: str, modulated: bool
           ) -> Iterator[tuple[str, Shape]]:
    d, hd = cfg.dim, cfg.head_dim
    a = f"{b}.attention"
    if layout == ORIGINAL:
        yield f"{a}.q_norm.weight", (hd,)
        yield f"{a}.k_norm.weight", (hd,)
        yield from linear_keys(f"{a}.qkv", 3 * d, d, bias=False)
        yield from linear_keys(f"{a}.out", d, d, bias=False)
    else:
        yield f"{a}.norm_q.weight", (hd,)
        yield f"{a}.norm_k.weight", (hd,)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            yield from linear_keys(f"{a}.{proj}", d, d, bias=False)
    yield from linear_keys(f"{b}.feed_forward.w1", cfg.ffn_hidden, d, bias=False)
    yield from linear_keys(f"{b}.feed_forward.w2", d, cfg.ffn_hidden, bias=False)
    yield from linear_keys(f"{b}.feed_forward.w3", cfg.ffn_hidden, d, bias=False)
    for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        yield f"{b}.{norm}.weight", (d,)
    if modulated:
        yield from linear_keys(f"{b}.adaLN_modulation.0", 4 * d, cfg.time_dim)


def _transformer(cfg: ZImageConfig, layout: str) -> Iterator[tuple[str, Shape]]:
    d, p = cfg.dim, cfg.patch
    patch_in = p * p * cfg.in_channels
    yield "x_pad_token", (1, d)
    yield "cap_pad_token", (1, d)
    embed, final = (("x_embedder", "final_layer") if layout == ORIGINAL
                    else (f"all_x_embedder.{p}-1", f"all_final_layer.{p}-1"))
    yield from linear_keys(embed, d, patch_in)
    yield from linear_keys(f"{final}.linear", patch_in, d)
    yield from linear_keys(f"{final}.adaLN_modulation.1", d, cfg.time_dim)
    for i in range(cfg.num_refiner_layers):
        yield from _layer(cfg, f"noise_refiner.{i}", layout, True)
    for i in range(cfg.num_refiner_layers):
        yield from _layer(cfg, f"context_refiner.{i}", layout, False)
    yield from linear_keys("t_embedder.mlp.0", cfg.t_hidden, cfg.time_dim)
    yield from linear_keys("t_embedder.mlp.2", cfg.time_dim, cfg.t_hidden)
    yield "cap_embedder.0.weight", (cfg.cap_feat_dim,)
    yield from linear_keys("cap_embedder.1", d, cfg.cap_feat_dim)
    for i in range(cfg.num_layers):
        yield from _layer(cfg, f"layers.{i}", layout, True)


def transformer_keys(cfg: ZImageConfig, layout: str = ORIGINAL) -> KeyShapes:
    """The transformer's keys and shapes in ``layout`` (unprefixed)."""
    return dict(_transformer(cfg, layout))


def small(cfg: ZImageConfig) -> ZImageConfig:
    """``cfg`` with the same key names at a small size."""
    return replace(cfg, dim=256, num_heads=2, num_layers=2, cap_feat_dim=64)


# --- LoRA module names ------------------------------------------------------------
# Trainers write diffusers' ZImageTransformer2DModel names under every prefix
# (kohya lora_unet_layers_0_attention_to_q, ComfyUI diffusion_model.layers.0.
# attention.to_q, PEFT transformer.layers...: diffusers
# _convert_non_diffusers_z_image_lora_to_diffusers); the original layout fuses
# q/k/v into attention.qkv (their row slices) and calls to_out.0 attention.out.


def _diffusers_modules(cfg: ZImageConfig) -> Iterator[tuple[str, LoraModule]]:
    d, p = cfg.dim, cfg.patch
    renamed = {f"all_x_embedder.{p}-1": "x_embedder",
               f"all_final_layer.{p}-1.linear": "final_layer.linear",
               f"all_final_layer.{p}-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}
    for path in linear_paths(_transformer(cfg, DIFFUSERS)):
        a, _, proj = path.rpartition(".attention.")
        if proj in ("to_q", "to_k", "to_v"):
            j = ("to_q", "to_k", "to_v").index(proj)
            yield path, LoraModule(f"{a}.attention.qkv", (j * d, (j + 1) * d), 3 * d)
        elif proj == "to_out.0":
            yield path, LoraModule(f"{a}.attention.out")
        else:
            yield path, LoraModule(renamed.get(path, path))


def lora_modules(cfg: ZImageConfig | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    cfg = cfg or ZImageConfig()
    return build(transformer_keys(cfg).items(), _diffusers_modules(cfg), native=True)


LORA_MODULE_PREFIXES = tuple(f"{p}{b}" for p, s in (
    ("lora_unet_", "_"), ("lycoris_", "_"), ("diffusion_model.", "."), ("transformer.", "."),
    ("", ".")) for b in (f"layers{s}*{s}attention{s}", f"layers{s}*{s}feed_forward{s}",
                         f"noise_refiner{s}", f"context_refiner{s}"))
