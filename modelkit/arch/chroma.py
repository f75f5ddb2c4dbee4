"""Chroma (8.9B, a Flux.1-schnell derivative) key names and shapes.

Chroma keeps Flux.1's double and single blocks but drops their modulation
layers, ``time_in``/``vector_in``/``guidance_in`` and the final layer's
modulation: one "distilled guidance" approximator (``distilled_guidance_layer``:
an input projection, five MLP layers with RMS norms, an output projection)
computes every modulation vector. Two layouts:

* ``original``: lodestones' and ComfyUI's names (Comfy-Org/ComfyUI
  ``comfy/ldm/chroma/model.py``, ``layers.py``: ``Approximator`` with
  ``in_proj``, ``layers.N.in_layer/out_layer``, ``norms.N.scale``,
  ``out_proj``); ComfyUI's ``model_detection.py`` tells Chroma from Flux by
  ``distilled_guidance_layer.norms.0.scale``;
* ``diffusers``: ``ChromaTransformer2DModel`` (huggingface/diffusers
  ``transformer_chroma.py``), checked against that class in the tests.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from modelkit.arch.keys import (
    KeyShapes,
    Shape,
    bfl_double_block,
    bfl_single_block,
    joint_attention_keys,
    linear_keys,
)
from modelkit.arch.lora_modules import LoraModule, build, linear_paths

ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class ChromaConfig:
    """Chroma's transformer and approximator sizes (diffusers' defaults)."""

    in_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    context_in_dim: int = 4096
    approximator_in: int = 64
    approximator_hidden: int = 5120
    approximator_layers: int = 5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.hidden_size


VARIANTS: dict[str, ChromaConfig] = {"chroma": ChromaConfig()}


def _approximator(cfg: ChromaConfig, layout: str) -> Iterator[tuple[str, Shape]]:
    p, a = "distilled_guidance_layer", cfg.approximator_hidden
    yield from linear_keys(f"{p}.in_proj", a, cfg.approximator_in)
    for i in range(cfg.approximator_layers):
        first, second = (("in_layer", "out_layer") if layout == ORIGINAL
                         else ("linear_1", "linear_2"))
        yield from linear_keys(f"{p}.layers.{i}.{first}", a, a)
        yield from linear_keys(f"{p}.layers.{i}.{second}", a, a)
        yield f"{p}.norms.{i}.{'scale' if layout == ORIGINAL else 'weight'}", (a,)
    yield from linear_keys(f"{p}.out_proj", cfg.hidden_size, a)


def _original(cfg: ChromaConfig) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    yield from linear_keys("img_in", h, cfg.in_channels)
    yield from linear_keys("txt_in", h, cfg.context_in_dim)
    yield from _approximator(cfg, ORIGINAL)
    for i in range(cfg.depth):
        yield from bfl_double_block(f"double_blocks.{i}", h, hd, mlp, mlp, modulation=False)
    for i in range(cfg.depth_single_blocks):
        yield from bfl_single_block(f"single_blocks.{i}", h, hd, mlp, mlp, modulation=False)
    yield from linear_keys("final_layer.linear", cfg.in_channels, h)


def _diffusers(cfg: ChromaConfig) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    yield from _approximator(cfg, DIFFUSERS)
    yield from linear_keys("context_embedder", h, cfg.context_in_dim)
    yield from linear_keys("x_embedder", h, cfg.in_channels)
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}"
        yield from joint_attention_keys(b, h, hd)
        for ff in ("ff", "ff_context"):
            yield from linear_keys(f"{b}.{ff}.net.0.proj", mlp, h)
            yield from linear_keys(f"{b}.{ff}.net.2", h, mlp)
    for i in range(cfg.depth_single_blocks):
        b = f"single_transformer_blocks.{i}"
        yield from linear_keys(f"{b}.proj_mlp", mlp, h)
        yield from linear_keys(f"{b}.proj_out", h, h + mlp)
        for proj in ("to_q", "to_k", "to_v"):
            yield from linear_keys(f"{b}.attn.{proj}", h, h)
        for norm in ("norm_q", "norm_k"):
            yield f"{b}.attn.{norm}.weight", (hd,)
    yield from linear_keys("proj_out", cfg.in_channels, h)


def transformer_keys(cfg: ChromaConfig, layout: str = ORIGINAL) -> KeyShapes:
    """The transformer's keys and shapes in ``layout`` (unprefixed)."""
    return dict(_original(cfg) if layout == ORIGINAL else _diffusers(cfg))


def small(cfg: ChromaConfig) -> ChromaConfig:
    """``cfg`` with the same key names at a small size."""
    return replace(cfg, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2,
                   context_in_dim=64, approximator_hidden=128, approximator_layers=2)


# --- LoRA module names ------------------------------------------------------------
# Flux.1's names (kohya lora_unet_double_blocks_..., ComfyUI diffusion_model.
# ..., diffusers/PEFT transformer.transformer_blocks... on row slices of the
# fused qkv/linear1) without the per-block modulation, plus the guidance
# approximator (diffusers' ChromaTransformer2DModel: linear_1/linear_2 for
# in_layer/out_layer). A Flux.1 LoRA reads the same: the base decides, and
# its modulation modules have no target in a Chroma file.


def lora_modules(cfg: ChromaConfig | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    from modelkit.arch.flux import FluxConfig
    from modelkit.arch.flux import _diffusers_modules as flux_diffusers

    cfg = cfg or ChromaConfig()
    keys = transformer_keys(cfg)
    paths = set(linear_paths(keys.items()))
    like = FluxConfig(in_channels=cfg.in_channels, hidden_size=cfg.hidden_size,
                      num_heads=cfg.num_heads, depth=cfg.depth,
                      depth_single_blocks=cfg.depth_single_blocks, guidance_embed=False)
    shared = [(n, m) for n, m in flux_diffusers(like) if m.path in paths]
    p = "distilled_guidance_layer"
    approx = [(f"{p}.{name}", LoraModule(f"{p}.{name}")) for name in ("in_proj", "out_proj")]
    for i in range(cfg.approximator_layers):
        approx += [(f"{p}.layers.{i}.linear_1", LoraModule(f"{p}.layers.{i}.in_layer")),
                   (f"{p}.layers.{i}.linear_2", LoraModule(f"{p}.layers.{i}.out_layer"))]
    return build(keys.items(), shared + approx)


LORA_MODULE_PREFIXES = tuple(f"{p}distilled_guidance_layer{s}" for p, s in (
    ("lora_unet_", "_"), ("diffusion_model.", "."), ("transformer.", "."), ("", ".")))
