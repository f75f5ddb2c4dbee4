"""Wan 2.1 / 2.2 (video DiT) key names and shapes, generated from its configuration.

The original layout (Wan-Video's ``wan/modules/model.py``, what ComfyUI's
``comfy/ldm/wan/model.py`` and the single-file releases use): a 3-D
``patch_embedding`` (kernel 1x2x2), ``blocks.N.self_attn``/``cross_attn``
with q/k/v/o and RMS q/k norms, ``ffn.0``/``ffn.2``, per-block
``modulation`` [1, 6, dim] and ``head.modulation`` [1, 2, dim]. The
image-to-video 14B model adds the CLIP image embedder (``img_emb``) and
``cross_attn.k_img``/``v_img``; VACE adds ``vace_patch_embedding`` and
``vace_blocks`` (with ``before_proj``/``after_proj``); Wan 2.2's TI2V-5B
is 3072 wide with 48 latent channels.

Used by ``inspect`` tests (full-size sparse headers). Importing this module
does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch.keys import KeyShapes, Shape, linear_keys
from modelkit.arch.lora_modules import LoraModule, build

ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class WanConfig:
    """Wan's ``WanModel`` config."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096  # UMT5-XXL
    freq_dim: int = 256
    i2v: bool = False  # the CLIP image embedder and k_img/v_img
    vace_layers: tuple[int, ...] = ()  # the blocks VACE hints are added to
    vace_in_dim: int = 96
    clip_dim: int = 1280


VARIANTS: dict[str, WanConfig] = {
    "t2v-1.3b": WanConfig(),
    "t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_layers=40),
    "i2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, i2v=True),
    "vace": WanConfig(dim=5120, ffn_dim=13824, num_layers=40,
                      vace_layers=tuple(range(0, 40, 5))),
    "ti2v-5b": WanConfig(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48),
}



def _block(b: str, cfg: WanConfig) -> Iterator[tuple[str, Shape]]:
    d = cfg.dim
    for attn in ("self_attn", "cross_attn"):
        for p in ("q", "k", "v", "o"):
            yield from linear_keys(f"{b}.{attn}.{p}", d, d)
        yield f"{b}.{attn}.norm_q.weight", (d,)
        yield f"{b}.{attn}.norm_k.weight", (d,)
    if cfg.i2v:
        yield from linear_keys(f"{b}.cross_attn.k_img", d, d)
        yield from linear_keys(f"{b}.cross_attn.v_img", d, d)
        yield f"{b}.cross_attn.norm_k_img.weight", (d,)
    yield f"{b}.norm3.weight", (d,)
    yield f"{b}.norm3.bias", (d,)
    yield from linear_keys(f"{b}.ffn.0", cfg.ffn_dim, d)
    yield from linear_keys(f"{b}.ffn.2", d, cfg.ffn_dim)
    yield f"{b}.modulation", (1, 6, d)


def _transformer(cfg: WanConfig) -> Iterator[tuple[str, Shape]]:
    d = cfg.dim
    yield "patch_embedding.weight", (d, cfg.in_dim, 1, 2, 2)
    yield "patch_embedding.bias", (d,)
    yield from linear_keys("text_embedding.0", d, cfg.text_dim)
    yield from linear_keys("text_embedding.2", d, d)
    yield from linear_keys("time_embedding.0", d, cfg.freq_dim)
    yield from linear_keys("time_embedding.2", d, d)
    yield from linear_keys("time_projection.1", 6 * d, d)
    for i in range(cfg.num_layers):
        yield from _block(f"blocks.{i}", cfg)
    yield from linear_keys("head.head", cfg.out_dim * 4, d)
    yield "head.modulation", (1, 2, d)
    if cfg.i2v:
        yield "img_emb.proj.0.weight", (cfg.clip_dim,)
        yield "img_emb.proj.0.bias", (cfg.clip_dim,)
        yield from linear_keys("img_emb.proj.1", cfg.clip_dim, cfg.clip_dim)
        yield from linear_keys("img_emb.proj.3", d, cfg.clip_dim)
        yield "img_emb.proj.4.weight", (d,)
        yield "img_emb.proj.4.bias", (d,)
    if cfg.vace_layers:
        yield "vace_patch_embedding.weight", (d, cfg.vace_in_dim, 1, 2, 2)
        yield "vace_patch_embedding.bias", (d,)
        for i in range(len(cfg.vace_layers)):
            b = f"vace_blocks.{i}"
            yield from _block(b, cfg)
            if i == 0:
                yield from linear_keys(f"{b}.before_proj", d, d)
            yield from linear_keys(f"{b}.after_proj", d, d)


def _diffusers_block(b: str, cfg: WanConfig, i2v: bool) -> Iterator[tuple[str, Shape]]:
    """One block's keys in diffusers' names (``WanTransformerBlock``; a
    VACE block adds its projections around these)."""
    d = cfg.dim
    yield f"{b}.scale_shift_table", (1, 6, d)
    for attn in ("attn1", "attn2"):
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            yield from linear_keys(f"{b}.{attn}.{p}", d, d)
        yield f"{b}.{attn}.norm_q.weight", (d,)
        yield f"{b}.{attn}.norm_k.weight", (d,)
    if i2v:
        yield from linear_keys(f"{b}.attn2.add_k_proj", d, d)
        yield from linear_keys(f"{b}.attn2.add_v_proj", d, d)
        yield f"{b}.attn2.norm_added_k.weight", (d,)
    yield f"{b}.norm2.weight", (d,)
    yield f"{b}.norm2.bias", (d,)
    yield from linear_keys(f"{b}.ffn.net.0.proj", cfg.ffn_dim, d)
    yield from linear_keys(f"{b}.ffn.net.2", d, cfg.ffn_dim)


def _diffusers(cfg: WanConfig) -> Iterator[tuple[str, Shape]]:
    """diffusers' ``WanTransformer3DModel`` names (``WanVACETransformer3DModel``
    with VACE: ``vace_blocks`` with ``proj_in``/``proj_out``)."""
    d, e = cfg.dim, "condition_embedder"
    yield "scale_shift_table", (1, 2, d)
    yield "patch_embedding.weight", (d, cfg.in_dim, 1, 2, 2)
    yield "patch_embedding.bias", (d,)
    yield from linear_keys(f"{e}.time_embedder.linear_1", d, cfg.freq_dim)
    yield from linear_keys(f"{e}.time_embedder.linear_2", d, d)
    yield from linear_keys(f"{e}.time_proj", 6 * d, d)
    yield from linear_keys(f"{e}.text_embedder.linear_1", d, cfg.text_dim)
    yield from linear_keys(f"{e}.text_embedder.linear_2", d, d)
    if cfg.i2v:
        c = cfg.clip_dim
        yield f"{e}.image_embedder.norm1.weight", (c,)
        yield f"{e}.image_embedder.norm1.bias", (c,)
        yield from linear_keys(f"{e}.image_embedder.ff.net.0.proj", c, c)
        yield from linear_keys(f"{e}.image_embedder.ff.net.2", d, c)
        yield f"{e}.image_embedder.norm2.weight", (d,)
        yield f"{e}.image_embedder.norm2.bias", (d,)
    for i in range(cfg.num_layers):
        yield from _diffusers_block(f"blocks.{i}", cfg, cfg.i2v)
    yield from linear_keys("proj_out", cfg.out_dim * 4, d)
    if cfg.vace_layers:
        yield "vace_patch_embedding.weight", (d, cfg.vace_in_dim, 1, 2, 2)
        yield "vace_patch_embedding.bias", (d,)
        for i in range(len(cfg.vace_layers)):
            b = f"vace_blocks.{i}"
            if i == 0:
                yield from linear_keys(f"{b}.proj_in", d, d)
            yield from _diffusers_block(b, cfg, False)
            yield from linear_keys(f"{b}.proj_out", d, d)


def transformer_keys(cfg: WanConfig, layout: str = ORIGINAL) -> KeyShapes:
    """The transformer's keys and shapes in ``layout`` (unprefixed)."""
    return dict(_transformer(cfg) if layout == ORIGINAL else _diffusers(cfg))


def small(cfg: WanConfig) -> WanConfig:
    """``cfg`` with the same key names at a small size (two blocks, width 128)."""
    return replace(cfg, dim=128, ffn_dim=256, num_layers=2, text_dim=64, clip_dim=32,
                   vace_layers=cfg.vace_layers[:1])


# --- LoRA module names ------------------------------------------------------------
# musubi-tuner lora_unet_blocks_0_self_attn_q, ComfyUI diffusion_model.blocks.0.
# self_attn.q (Wan-Video's names); diffusers/PEFT transformer.blocks.0.attn1.to_q
# (diffusers _convert_non_diffusers_wan_lora_to_diffusers: self_attn -> attn1,
# cross_attn -> attn2, k_img/v_img -> add_k_proj/add_v_proj, ffn.0 ->
# ffn.net.0.proj). One table for every variant: 14B depth with the image-to-
# video modules (k_img, v_img, img_emb) and VACE's blocks, so that a Wan 2.1
# I2V LoRA reads as Wan and its image modules are reported when a Wan 2.2 or
# text-to-video file has no target for them.
LORA_CONFIG = WanConfig(dim=5120, ffn_dim=13824, num_layers=40, i2v=True,
                        vace_layers=tuple(range(0, 40, 5)))
# module paths only an image-to-video (Wan 2.1 I2V) file has
I2V_ONLY = ("cross_attn.k_img", "cross_attn.v_img", "img_emb.")


def _diffusers_modules(cfg: WanConfig) -> Iterator[tuple[str, LoraModule]]:
    e = "condition_embedder"
    stems = {f"{e}.time_embedder.linear_1": "time_embedding.0",
             f"{e}.time_embedder.linear_2": "time_embedding.2",
             f"{e}.time_proj": "time_projection.1",
             f"{e}.text_embedder.linear_1": "text_embedding.0",
             f"{e}.text_embedder.linear_2": "text_embedding.2",
             f"{e}.image_embedder.ff.net.0.proj": "img_emb.proj.1",
             f"{e}.image_embedder.ff.net.2": "img_emb.proj.3", "proj_out": "head.head"}
    for name, path in stems.items():
        yield name, LoraModule(path)
    for i in range(cfg.num_layers):
        yield from _block_modules(f"blocks.{i}")
    for i in range(len(cfg.vace_layers)):
        b = f"vace_blocks.{i}"
        yield from _block_modules(b)
        if i == 0:
            yield f"{b}.proj_in", LoraModule(f"{b}.before_proj")
        yield f"{b}.proj_out", LoraModule(f"{b}.after_proj")


def _block_modules(b: str) -> Iterator[tuple[str, LoraModule]]:
    """One block's diffusers module names -> its Wan-Video module."""
    for attn, orig in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for p, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
            yield f"{b}.{attn}.{p}", LoraModule(f"{b}.{orig}.{o}")
    yield f"{b}.attn2.add_k_proj", LoraModule(f"{b}.cross_attn.k_img")
    yield f"{b}.attn2.add_v_proj", LoraModule(f"{b}.cross_attn.v_img")
    yield f"{b}.ffn.net.0.proj", LoraModule(f"{b}.ffn.0")
    yield f"{b}.ffn.net.2", LoraModule(f"{b}.ffn.2")


def lora_modules(cfg: WanConfig | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    cfg = cfg or LORA_CONFIG
    return build(transformer_keys(cfg).items(), _diffusers_modules(cfg))


LORA_MODULE_PREFIXES = tuple(f"{p}blocks{s}*{s}{m}" for p, s in (
    ("lora_unet_", "_"), ("lora_unet__", "_"), ("lycoris_", "_"), ("diffusion_model.", "."),
    ("", "."), ("transformer.", "."), ("base_model.model.", "."))
    for m in ("self_attn", "cross_attn", "ffn", "attn1", "attn2"))
