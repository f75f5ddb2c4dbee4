"""Flux.2 (dev: 32B; 8 double and 48 single blocks, 6144 wide) key names and shapes.

Flux.2 shares one modulation per stream across all blocks
(``double_stream_modulation_img/txt``, ``single_stream_modulation``), has no
biases, a SwiGLU MLP (``linear_in`` twice the hidden MLP width) and takes
128 latent channels and Mistral's 15360-wide text features. Two layouts:

* ``diffusers``: ``Flux2Transformer2DModel`` (huggingface/diffusers
  ``transformer_flux2.py``), checked against that class in the tests;
* ``original``: Black Forest Labs' names (black-forest-labs/flux2
  ``src/flux2/model.py``: ``img_in``, ``txt_in``, ``time_in``/``guidance_in``
  MLP embedders, ``double_blocks.N.{img,txt}_attn.qkv`` fused,
  ``single_blocks.N.linear1`` = qkv + MLP in, ``*.lin`` modulations,
  ``final_layer``), which ComfyUI's single files keep (shared/reference
  families.md: ``double_stream_modulation_img.lin.weight``).

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
from modelkit.arch.lora_modules import LoraModule, build

ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class Flux2Config:
    """Flux.2's transformer sizes (diffusers' defaults: Flux.2 dev)."""

    in_channels: int = 128
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    context_in_dim: int = 15360
    time_dim: int = 256
    mlp_ratio: float = 3.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


VARIANTS: dict[str, Flux2Config] = {"dev": Flux2Config()}


def _original(cfg: Flux2Config) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    yield from linear_keys("img_in", h, cfg.in_channels, bias=False)
    yield from linear_keys("txt_in", h, cfg.context_in_dim, bias=False)
    for embed in ("time_in", "guidance_in"):
        yield from linear_keys(f"{embed}.in_layer", h, cfg.time_dim, bias=False)
        yield from linear_keys(f"{embed}.out_layer", h, h, bias=False)
    yield from linear_keys("double_stream_modulation_img.lin", 6 * h, h, bias=False)
    yield from linear_keys("double_stream_modulation_txt.lin", 6 * h, h, bias=False)
    yield from linear_keys("single_stream_modulation.lin", 3 * h, h, bias=False)
    for i in range(cfg.depth):
        yield from bfl_double_block(f"double_blocks.{i}", h, hd, 2 * mlp, mlp,
                                    modulation=False, bias=False)
    for i in range(cfg.depth_single_blocks):
        yield from bfl_single_block(f"single_blocks.{i}", h, hd, 2 * mlp, mlp,
                                    modulation=False, bias=False)
    yield from linear_keys("final_layer.adaLN_modulation.1", 2 * h, h, bias=False)
    yield from linear_keys("final_layer.linear", cfg.in_channels, h, bias=False)


def _diffusers(cfg: Flux2Config) -> Iterator[tuple[str, Shape]]:
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    t = "time_guidance_embed"
    for embed in ("timestep_embedder", "guidance_embedder"):
        yield from linear_keys(f"{t}.{embed}.linear_1", h, cfg.time_dim, bias=False)
        yield from linear_keys(f"{t}.{embed}.linear_2", h, h, bias=False)
    yield from linear_keys("double_stream_modulation_img.linear", 6 * h, h, bias=False)
    yield from linear_keys("double_stream_modulation_txt.linear", 6 * h, h, bias=False)
    yield from linear_keys("single_stream_modulation.linear", 3 * h, h, bias=False)
    yield from linear_keys("x_embedder", h, cfg.in_channels, bias=False)
    yield from linear_keys("context_embedder", h, cfg.context_in_dim, bias=False)
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}"
        yield from ((k, s) for k, s in joint_attention_keys(b, h, hd)
                    if not k.endswith(".bias"))
        for ff in ("ff", "ff_context"):
            yield from linear_keys(f"{b}.{ff}.linear_in", 2 * mlp, h, bias=False)
            yield from linear_keys(f"{b}.{ff}.linear_out", h, mlp, bias=False)
    for i in range(cfg.depth_single_blocks):
        b = f"single_transformer_blocks.{i}"
        yield from linear_keys(f"{b}.attn.to_qkv_mlp_proj", 3 * h + 2 * mlp, h, bias=False)
        yield f"{b}.attn.norm_q.weight", (hd,)
        yield f"{b}.attn.norm_k.weight", (hd,)
        yield from linear_keys(f"{b}.attn.to_out", h, h + mlp, bias=False)
    yield from linear_keys("norm_out.linear", 2 * h, h, bias=False)
    yield from linear_keys("proj_out", cfg.in_channels, h, bias=False)


def transformer_keys(cfg: Flux2Config, layout: str = ORIGINAL) -> KeyShapes:
    """The transformer's keys and shapes in ``layout`` (unprefixed)."""
    return dict(_original(cfg) if layout == ORIGINAL else _diffusers(cfg))


def small(cfg: Flux2Config) -> Flux2Config:
    """``cfg`` with the same key names at a small size."""
    return replace(cfg, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2,
                   context_in_dim=64)


# --- LoRA module names ------------------------------------------------------------
# kohya/musubi and ComfyUI name BFL's paths (double_blocks, single_blocks, the
# shared modulations), as for Flux.1; diffusers/PEFT name Flux2Transformer2DModel
# (diffusers _convert_non_diffusers_flux2_lora_to_diffusers): split q/k/v on
# row slices of the fused qkv, ff.linear_in/linear_out for the MLP, the single
# blocks' fused to_qkv_mlp_proj is linear1 whole.


def _diffusers_modules(cfg: Flux2Config) -> Iterator[tuple[str, LoraModule]]:
    h = cfg.hidden_size
    t = "time_guidance_embed"
    stems = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             f"{t}.timestep_embedder.linear_1": "time_in.in_layer",
             f"{t}.timestep_embedder.linear_2": "time_in.out_layer",
             f"{t}.guidance_embedder.linear_1": "guidance_in.in_layer",
             f"{t}.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin"}
    for name, path in stems.items():
        yield name, LoraModule(path)
    # diffusers stores the final adaLN as scale, shift (BFL: shift, scale;
    # single_file_utils.py convert_flux2_transformer_checkpoint_to_diffusers)
    yield "norm_out.linear", LoraModule("final_layer.adaLN_modulation.1", swap=True)
    for i in range(cfg.depth):
        b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, (projs, out, ff) in {
                "img": (("to_q", "to_k", "to_v"), "to_out.0", "ff"),
                "txt": (("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                        "ff_context")}.items():
            for j, p in enumerate(projs):
                yield f"{b}.attn.{p}", LoraModule(f"{o}.{s}_attn.qkv", (j * h, (j + 1) * h),
                                                  3 * h)
            yield f"{b}.attn.{out}", LoraModule(f"{o}.{s}_attn.proj")
            yield f"{b}.{ff}.linear_in", LoraModule(f"{o}.{s}_mlp.0")
            yield f"{b}.{ff}.linear_out", LoraModule(f"{o}.{s}_mlp.2")
    for i in range(cfg.depth_single_blocks):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        yield f"{b}.attn.to_qkv_mlp_proj", LoraModule(f"{o}.linear1")
        yield f"{b}.attn.to_out", LoraModule(f"{o}.linear2")


def lora_modules(cfg: Flux2Config | None = None) -> dict[str, LoraModule]:
    """Adapter module name (every spelling) -> :class:`LoraModule`."""
    cfg = cfg or Flux2Config()
    return build(transformer_keys(cfg).items(), _diffusers_modules(cfg))


# names only Flux.2 has: the shared modulations, diffusers' fused single projection
LORA_MODULE_PREFIXES = (
    "lora_unet_double_stream_modulation_", "lora_unet_single_stream_modulation",
    "diffusion_model.double_stream_modulation_", "diffusion_model.single_stream_modulation",
    "transformer.single_transformer_blocks.*.attn.to_qkv_mlp_proj",
    "transformer.transformer_blocks.*.ff.linear_in",
    "transformer.transformer_blocks.*.ff_context.linear_in")
