"""Original (BFL / Stability / ComfyUI) layout -> diffusers layout of the
transformers of Flux.1, SD3 and Qwen-Image, as data: for every diffusers
key, the original key it comes from and, for a fused weight split in
diffusers, the row slice it takes; ``swap`` marks an adaLN weight whose
two halves diffusers stores the other way round (shift, scale -> scale,
shift).

Sources: huggingface/diffusers ``src/diffusers/loaders/single_file_utils.py``
(``convert_flux_transformer_checkpoint_to_diffusers``,
``convert_sd3_transformer_checkpoint_to_diffusers``, ``swap_scale_shift``)
and ComfyUI ``comfy/utils.py`` (``flux_to_diffusers``,
``MMDIT_MAP_BASIC``/``MMDIT_MAP_BLOCK``). Qwen-Image's single files keep
diffusers' names (``comfy/ldm/qwen_image/model.py``): its map is the
identity. The tables are checked against diffusers' models built on the
meta device (tests/test_render_families.py). Importing this module does
not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from modelkit.arch.flux import FluxConfig
from modelkit.arch.qwen_image import QwenImageConfig
from modelkit.arch.qwen_image import transformer_keys as qwen_keys
from modelkit.arch.sd3 import SD3Config


@dataclass(frozen=True)
class Piece:
    """Where one diffusers tensor comes from: ``source`` (an original key),
    rows ``[start, stop)`` of it (None: all) and whether its two halves
    swap."""

    source: str
    rows: tuple[int, int] | None = None
    swap: bool = False


KeyMap = dict[str, Piece]


def _linear(out: KeyMap, target: str, source: str, rows: tuple[int, int] | None = None,
            bias: bool = True, swap: bool = False) -> None:
    out[f"{target}.weight"] = Piece(f"{source}.weight", rows, swap)
    if bias:
        out[f"{target}.bias"] = Piece(f"{source}.bias", rows, swap)


def _split(out: KeyMap, targets: tuple[str, ...], source: str, sizes: tuple[int, ...]
           ) -> None:
    start = 0
    for target, size in zip(targets, sizes, strict=True):
        _linear(out, target, source, (start, start + size))
        start += size


def flux_map(cfg: FluxConfig) -> KeyMap:
    """Flux.1's diffusers keys (``FluxTransformer2DModel``) from the BFL layout."""
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    out: KeyMap = {}
    t = "time_text_embed"
    embedders = {f"{t}.timestep_embedder": "time_in", f"{t}.text_embedder": "vector_in"}
    if cfg.guidance_embed:
        embedders[f"{t}.guidance_embedder"] = "guidance_in"
    for target, source in embedders.items():
        _linear(out, f"{target}.linear_1", f"{source}.in_layer")
        _linear(out, f"{target}.linear_2", f"{source}.out_layer")
    _linear(out, "context_embedder", "txt_in")
    _linear(out, "x_embedder", "img_in")
    for i in range(cfg.depth):
        b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, (qkv, attn_out, ff, norm, qn, kn) in {
                "img": (("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1", "norm_q",
                        "norm_k"),
                "txt": (("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                        "ff_context", "norm1_context", "norm_added_q", "norm_added_k")
        }.items():
            _linear(out, f"{b}.{norm}.linear", f"{o}.{s}_mod.lin")
            _split(out, tuple(f"{b}.attn.{p}" for p in qkv), f"{o}.{s}_attn.qkv", (h, h, h))
            out[f"{b}.attn.{qn}.weight"] = Piece(f"{o}.{s}_attn.norm.query_norm.scale")
            out[f"{b}.attn.{kn}.weight"] = Piece(f"{o}.{s}_attn.norm.key_norm.scale")
            _linear(out, f"{b}.attn.{attn_out}", f"{o}.{s}_attn.proj")
            _linear(out, f"{b}.{ff}.net.0.proj", f"{o}.{s}_mlp.0")
            _linear(out, f"{b}.{ff}.net.2", f"{o}.{s}_mlp.2")
    for i in range(cfg.depth_single_blocks):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _split(out, (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"),
               f"{o}.linear1", (h, h, h, mlp))
        _linear(out, f"{b}.proj_out", f"{o}.linear2")
        _linear(out, f"{b}.norm.linear", f"{o}.modulation.lin")
        out[f"{b}.attn.norm_q.weight"] = Piece(f"{o}.norm.query_norm.scale")
        out[f"{b}.attn.norm_k.weight"] = Piece(f"{o}.norm.key_norm.scale")
    _linear(out, "norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    _linear(out, "proj_out", "final_layer.linear")
    return out


def sd3_map(cfg: SD3Config) -> KeyMap:
    """SD3/SD3.5's diffusers keys (``SD3Transformer2DModel``) from Stability's
    MMDiT layout."""
    h = cfg.hidden
    out: KeyMap = {"pos_embed.pos_embed": Piece("pos_embed")}
    _linear(out, "pos_embed.proj", "x_embedder.proj")
    t = "time_text_embed"
    for target, source in ((f"{t}.timestep_embedder", "t_embedder.mlp"),
                           (f"{t}.text_embedder", "y_embedder.mlp")):
        _linear(out, f"{target}.linear_1", f"{source}.0")
        _linear(out, f"{target}.linear_2", f"{source}.2")
    _linear(out, "context_embedder", "context_embedder")
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        b, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        x, c = f"{o}.x_block", f"{o}.context_block"
        _linear(out, f"{b}.norm1.linear", f"{x}.adaLN_modulation.1")
        # the pre-only last context block's AdaLayerNormContinuous: scale first
        _linear(out, f"{b}.norm1_context.linear", f"{c}.adaLN_modulation.1", swap=last)
        _split(out, (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"), f"{x}.attn.qkv",
               (h, h, h))
        _split(out, (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"),
               f"{c}.attn.qkv", (h, h, h))
        _linear(out, f"{b}.attn.to_out.0", f"{x}.attn.proj")
        if cfg.qk_norm:
            for target, source in (("norm_q", f"{x}.attn.ln_q"), ("norm_k", f"{x}.attn.ln_k"),
                                   ("norm_added_q", f"{c}.attn.ln_q"),
                                   ("norm_added_k", f"{c}.attn.ln_k")):
                out[f"{b}.attn.{target}.weight"] = Piece(f"{source}.weight")
        if i < cfg.attn2_layers:
            _split(out, (f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"),
                   f"{x}.attn2.qkv", (h, h, h))
            _linear(out, f"{b}.attn2.to_out.0", f"{x}.attn2.proj")
            if cfg.qk_norm:
                out[f"{b}.attn2.norm_q.weight"] = Piece(f"{x}.attn2.ln_q.weight")
                out[f"{b}.attn2.norm_k.weight"] = Piece(f"{x}.attn2.ln_k.weight")
        _linear(out, f"{b}.ff.net.0.proj", f"{x}.mlp.fc1")
        _linear(out, f"{b}.ff.net.2", f"{x}.mlp.fc2")
        if not last:
            _linear(out, f"{b}.attn.to_add_out", f"{c}.attn.proj")
            _linear(out, f"{b}.ff_context.net.0.proj", f"{c}.mlp.fc1")
            _linear(out, f"{b}.ff_context.net.2", f"{c}.mlp.fc2")
    _linear(out, "norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    _linear(out, "proj_out", "final_layer.linear")
    return out


def qwen_image_map(cfg: QwenImageConfig) -> KeyMap:
    """Qwen-Image: the single files keep diffusers' names."""
    return {k: Piece(k) for k in qwen_keys(cfg)}


def sources(key_map: KeyMap) -> Iterator[str]:
    """The original keys a map reads, each once."""
    yield from dict.fromkeys(p.source for p in key_map.values())
