"""Flux.1 key names and shapes, generated from its configuration.

Two layouts of the same transformer: ``original`` (Black Forest Labs'
``flux/model.py``, what ComfyUI and most single files use: fused ``qkv`` and
fused ``linear1`` = qkv + MLP in the single blocks) and ``diffusers``
(``FluxTransformer2DModel``: split ``to_q/to_k/to_v``, ``proj_mlp``).
The variants differ in ``in_channels`` (64; Fill 384, Depth 128) and in the
guidance embedder (dev, Fill, Depth and Kontext have one, schnell not).

Used today by ``inspect`` tests (full-size sparse headers); the other
commands will use it when they handle Flux. Importing this module does not
import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch import family_blocks as _family_blocks
from modelkit.arch.configs import VAEConfig
from modelkit.arch.keys import (
    KeyShapes,
    Shape,
    bfl_double_block,
    bfl_single_block,
    joint_attention_keys,
    linear_keys,
    text_encoder_keys,
    vae_keys,
)
from modelkit.arch.lora_modules import (
    COMFY_PREFIX,
    KOHYA_PREFIX,
    LYCORIS_PREFIX,
    ONETRAINER_PREFIX,
    PEFT_MODEL_PREFIX,
    PEFT_PREFIX,
    LoraModule,
    diffusers_names,
    flat,
)

ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class FluxConfig:
    """BFL's ``FluxParams``."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    guidance_embed: bool = True
    time_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# in_channels and the guidance embedder per variant
VARIANTS: dict[str, FluxConfig] = {
    "dev": FluxConfig(),
    "schnell": FluxConfig(guidance_embed=False),
    "fill": FluxConfig(in_channels=384),
    "depth": FluxConfig(in_channels=128),
    "kontext": FluxConfig(),  # the dev layout: told apart by name only
}



def _original(cfg: FluxConfig) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    yield from linear_keys("img_in", h, cfg.in_channels)
    yield from linear_keys("time_in.in_layer", h, cfg.time_dim)
    yield from linear_keys("time_in.out_layer", h, h)
    yield from linear_keys("vector_in.in_layer", h, cfg.vec_in_dim)
    yield from linear_keys("vector_in.out_layer", h, h)
    if cfg.guidance_embed:
        yield from linear_keys("guidance_in.in_layer", h, cfg.time_dim)
        yield from linear_keys("guidance_in.out_layer", h, h)
    yield from linear_keys("txt_in", h, cfg.context_in_dim)
    for i in range(cfg.depth):
        yield from bfl_double_block(f"double_blocks.{i}", h, hd, mlp, mlp, modulation=True)
    for i in range(cfg.depth_single_blocks):
        yield from bfl_single_block(f"single_blocks.{i}", h, hd, mlp, mlp, modulation=True)
    yield from linear_keys("final_layer.linear", cfg.out_channels, h)
    yield from linear_keys("final_layer.adaLN_modulation.1", 2 * h, h)


def _diffusers(cfg: FluxConfig) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    t = "time_text_embed"
    yield from linear_keys(f"{t}.timestep_embedder.linear_1", h, cfg.time_dim)
    yield from linear_keys(f"{t}.timestep_embedder.linear_2", h, h)
    if cfg.guidance_embed:
        yield from linear_keys(f"{t}.guidance_embedder.linear_1", h, cfg.time_dim)
        yield from linear_keys(f"{t}.guidance_embedder.linear_2", h, h)
    yield from linear_keys(f"{t}.text_embedder.linear_1", h, cfg.vec_in_dim)
    yield from linear_keys(f"{t}.text_embedder.linear_2", h, h)
    yield from linear_keys("context_embedder", h, cfg.context_in_dim)
    yield from linear_keys("x_embedder", h, cfg.in_channels)
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}"
        yield from linear_keys(f"{b}.norm1.linear", 6 * h, h)
        yield from linear_keys(f"{b}.norm1_context.linear", 6 * h, h)
        yield from joint_attention_keys(b, h, hd)
        for ff in ("ff", "ff_context"):
            yield from linear_keys(f"{b}.{ff}.net.0.proj", mlp, h)
            yield from linear_keys(f"{b}.{ff}.net.2", h, mlp)
    for i in range(cfg.depth_single_blocks):
        b = f"single_transformer_blocks.{i}"
        yield from linear_keys(f"{b}.norm.linear", 3 * h, h)
        yield from linear_keys(f"{b}.proj_mlp", mlp, h)
        yield from linear_keys(f"{b}.proj_out", h, h + mlp)
        for proj in ("to_q", "to_k", "to_v"):
            yield from linear_keys(f"{b}.attn.{proj}", h, h)
        for norm in ("norm_q", "norm_k"):
            yield f"{b}.attn.{norm}.weight", (hd,)
    yield from linear_keys("norm_out.linear", 2 * h, h)
    yield from linear_keys("proj_out", cfg.out_channels, h)


def transformer_keys(cfg: FluxConfig, layout: str = ORIGINAL) -> KeyShapes:
    """The transformer's keys and shapes in ``layout`` (unprefixed)."""
    return dict(_original(cfg) if layout == ORIGINAL else _diffusers(cfg))


# Flux's autoencoder ("ae"): the KL-f8 layout with 16 latent channels and
# no quant_conv/post_quant_conv
AE = VAEConfig(z_channels=16, embed_dim=16)


def ae_keys(ch: int = AE.ch) -> KeyShapes:
    """The Flux autoencoder's keys (unprefixed), at base width ``ch``."""
    return {k: s for k, s in vae_keys(replace(AE, ch=ch)).items() if "quant_conv" not in k}


def small(cfg: FluxConfig) -> FluxConfig:
    """``cfg`` with the same key names at a small size (one block of each
    kind, width 256 with head width 128 as at full size)."""
    return replace(cfg, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1,
                   vec_in_dim=32, context_in_dim=64)


def t5xxl_keys(layers: int = 24, width: int = 4096, ff: int = 10240, vocab: int = 32128
               ) -> KeyShapes:
    """T5 v1.1 XXL encoder keys (transformers' ``T5EncoderModel``)."""
    out: KeyShapes = {"shared.weight": (vocab, width)}
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        for p in ("q", "k", "v", "o"):
            out[f"{b}.0.SelfAttention.{p}.weight"] = (width, width)
        if i == 0:
            out[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
        out[f"{b}.0.layer_norm.weight"] = (width,)
        out[f"{b}.1.DenseReluDense.wi_0.weight"] = (ff, width)
        out[f"{b}.1.DenseReluDense.wi_1.weight"] = (ff, width)
        out[f"{b}.1.DenseReluDense.wo.weight"] = (width, ff)
        out[f"{b}.1.layer_norm.weight"] = (width,)
    out["encoder.final_layer_norm.weight"] = (width,)
    return out


def all_in_one_keys(cfg: FluxConfig, *, tiny: bool = False) -> KeyShapes:
    """A ComfyUI all-in-one Flux checkpoint: transformer under
    ``model.diffusion_model.``, ``vae.``, CLIP-L and T5-XXL under
    ``text_encoders.`` (``tiny``: the VAE and text encoders scaled down)."""
    from modelkit.arch.configs import CLIP_L, UNET_PREFIX

    clip = replace(CLIP_L, width=32, layers=1, heads=2) if tiny else CLIP_L
    t5 = t5xxl_keys(1, 64, 128, 100) if tiny else t5xxl_keys()
    out = {UNET_PREFIX + k: s for k, s in transformer_keys(cfg).items()}
    out.update({"vae." + k: s for k, s in ae_keys(16 if tiny else AE.ch).items()})
    out.update({"text_encoders.clip_l.transformer." + k: s
                for k, s in text_encoder_keys(clip).items()})
    out.update({"text_encoders.t5xxl.transformer." + k: s for k, s in t5.items()})
    return out


# --- per-block weights ------------------------------------------------------------
# ComfyUI's ModelMergeFlux1 names, declared with the other families' block
# lists in :mod:`modelkit.arch.family_blocks` (both layouts); these names are
# kept for the code that asks Flux.1 directly.

EMBEDDERS = tuple(b.name for b in _family_blocks.FLUX.ins)
FINAL = "final_layer"
DOUBLE, SINGLE = "double_blocks", "single_blocks"
BLOCKS: tuple[str, ...] = _family_blocks.FLUX.names
DENOISER_PREFIX = _family_blocks.DENOISER_PREFIX


def block_of(key: str, arch: str = "flux", map_name: str | None = None,
             vae_slot: bool = False) -> str:
    """The ModelMergeFlux1 block of a Flux transformer key (bare or under
    ``model.diffusion_model.``, BFL or diffusers names); any other key takes
    the first entry (``img_in``). ``arch``, ``map_name`` and ``vae_slot`` are
    accepted for the common block-map signature: Flux has one map and no VAE
    entry."""
    return _family_blocks.FLUX.block_of(key)


def groups() -> dict[str, list[str]]:
    """Block groups a ``--blocks`` mapping may name (upper case):
    ``DOUBLE``, ``SINGLE``, ``BLOCKS``, ``IN`` (the embedders) and ``OUT``
    (final layer)."""
    return _family_blocks.FLUX.groups()


PRESET_DOCS: dict[str, str] = _family_blocks.FLUX.preset_docs()
"""Flux.1's block presets: values are the method parameter (for
``weighted_sum``'s alpha: how much of model B)."""


def preset(name: str) -> dict[str, float]:
    """The block weights of Flux preset ``name``."""
    return _family_blocks.FLUX.preset(name)


# --- LoRA module names ------------------------------------------------------------
# kohya / musubi-tuner: ``lora_unet_`` + the BFL path with ``.`` -> ``_`` (fused
# ``qkv`` and ``linear1`` are one module each); ComfyUI: ``diffusion_model.`` +
# the BFL path; diffusers / ai-toolkit PEFT: ``transformer.`` + the diffusers
# path, whose split q/k/v (and the single blocks' proj_mlp) land on row
# slices of the fused weight (diffusers lora_conversion_utils.py
# ``_convert_kohya_flux_lora_to_diffusers``; ComfyUI comfy/utils.py
# ``flux_to_diffusers``). ``norm_out.linear`` is left out: diffusers stores
# final_layer.adaLN_modulation.1 with its shift and scale halves swapped.

# the prefixes and LoraModule live in modelkit.arch.lora_modules (shared by
# every transformer family) and are re-exported here.
# module-name prefixes no SD adapter has: they tell a Flux.1 adapter
LORA_MODULE_PREFIXES = (f"{KOHYA_PREFIX}{DOUBLE}_", f"{KOHYA_PREFIX}{SINGLE}_",
                        f"{COMFY_PREFIX}{DOUBLE}.", f"{COMFY_PREFIX}{SINGLE}.",
                        *(f"{p}{b}." for p in (PEFT_PREFIX, PEFT_MODEL_PREFIX)
                          for b in ("transformer_blocks", "single_transformer_blocks")),
                        f"{ONETRAINER_PREFIX}single_transformer_blocks_",
                        f"{LYCORIS_PREFIX}single_transformer_blocks_")


def _diffusers_modules(cfg: FluxConfig) -> Iterator[tuple[str, LoraModule]]:
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    t = "time_text_embed"
    stems = {"x_embedder": "img_in", "context_embedder": "txt_in",
             f"{t}.timestep_embedder.linear_1": "time_in.in_layer",
             f"{t}.timestep_embedder.linear_2": "time_in.out_layer",
             f"{t}.text_embedder.linear_1": "vector_in.in_layer",
             f"{t}.text_embedder.linear_2": "vector_in.out_layer",
             f"{t}.guidance_embedder.linear_1": "guidance_in.in_layer",
             f"{t}.guidance_embedder.linear_2": "guidance_in.out_layer",
             "proj_out": "final_layer.linear"}
    for name, path in stems.items():
        yield name, LoraModule(path)
    # diffusers stores the final adaLN as scale, shift (BFL: shift, scale)
    yield "norm_out.linear", LoraModule("final_layer.adaLN_modulation.1", swap=True)
    qkv = ("to_q", "to_k", "to_v")
    for i in range(cfg.depth):
        b, o = f"transformer_blocks.{i}", f"{DOUBLE}.{i}"
        for s, (projs, out, ff, norm) in {
                "img": (qkv, "to_out.0", "ff", "norm1"),
                "txt": (("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                        "ff_context", "norm1_context")}.items():
            for j, p in enumerate(projs):
                yield f"{b}.attn.{p}", LoraModule(f"{o}.{s}_attn.qkv", (j * h, (j + 1) * h),
                                                  3 * h)
            yield f"{b}.attn.{out}", LoraModule(f"{o}.{s}_attn.proj")
            yield f"{b}.{ff}.net.0.proj", LoraModule(f"{o}.{s}_mlp.0")
            yield f"{b}.{ff}.net.2", LoraModule(f"{o}.{s}_mlp.2")
            yield f"{b}.{norm}.linear", LoraModule(f"{o}.{s}_mod.lin")
    for i in range(cfg.depth_single_blocks):
        b, o = f"single_transformer_blocks.{i}", f"{SINGLE}.{i}"
        fused = 3 * h + mlp  # linear1 rows: q, k, v, then the MLP input
        for j, p in enumerate(qkv):
            yield f"{b}.attn.{p}", LoraModule(f"{o}.linear1", (j * h, (j + 1) * h), fused)
        yield f"{b}.proj_mlp", LoraModule(f"{o}.linear1", (3 * h, fused), fused)
        yield f"{b}.proj_out", LoraModule(f"{o}.linear2")
        yield f"{b}.norm.linear", LoraModule(f"{o}.modulation.lin")


def _xlabs_modules(cfg: FluxConfig) -> Iterator[tuple[str, LoraModule]]:
    """XLabs' attention-processor LoRAs (x-flux; diffusers
    ``_convert_xlabs_flux_lora_to_diffusers``, ComfyUI comfy/lora_convert.py
    ``convert_uso_lora``): ``qkv_lora1``/``proj_lora1`` patch the image
    stream, ``qkv_lora2``/``proj_lora2`` the text stream; a single block's
    ``qkv_lora`` patches the q/k/v rows of ``linear1``, ``proj_lora`` its
    ``linear2``. The files carry no alpha (scale 1, as diffusers reads them)."""
    h, fused = cfg.hidden_size, 3 * cfg.hidden_size + cfg.mlp_hidden
    for i in range(cfg.depth):
        b = f"{DOUBLE}.{i}"
        for n, s in (("1", "img"), ("2", "txt")):
            yield f"{b}.processor.qkv_lora{n}", LoraModule(f"{b}.{s}_attn.qkv")
            yield f"{b}.processor.proj_lora{n}", LoraModule(f"{b}.{s}_attn.proj")
    for i in range(cfg.depth_single_blocks):
        b = f"{SINGLE}.{i}"
        yield f"{b}.processor.qkv_lora", LoraModule(f"{b}.linear1", (0, 3 * h), fused)
        yield f"{b}.processor.proj_lora", LoraModule(f"{b}.linear2")


def lora_modules(cfg: FluxConfig | None = None) -> dict[str, LoraModule]:
    """Adapter module name (kohya, ComfyUI, SimpleTuner LyCORIS, diffusers/PEFT,
    OneTrainer and XLabs spellings) -> :class:`LoraModule`, for every Linear
    of the transformer (default: the full-size dev config, which names every
    block any Flux.1 file has)."""
    cfg = cfg or VARIANTS["dev"]
    out: dict[str, LoraModule] = {}
    for key, shape in _original(cfg):
        if key.endswith(".weight") and len(shape) == 2:
            path = key.removesuffix(".weight")
            out[KOHYA_PREFIX + flat(path)] = LoraModule(path)
            out[COMFY_PREFIX + path] = LoraModule(path)
            out[LYCORIS_PREFIX + flat(path)] = LoraModule(path)
            out[path] = LoraModule(path)  # bare BFL names
    for name, m in _diffusers_modules(cfg):
        for spelled in diffusers_names(name):
            out.setdefault(spelled, m)
    for name, m in _xlabs_modules(cfg):
        out[name] = m
        out[COMFY_PREFIX + name] = m
    return out


__all__ = ["COMFY_PREFIX", "KOHYA_PREFIX", "LYCORIS_PREFIX", "ONETRAINER_PREFIX",
           "PEFT_MODEL_PREFIX", "PEFT_PREFIX", "LoraModule", "lora_modules"]
