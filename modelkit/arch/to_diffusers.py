"""Original (BFL / Stability / ComfyUI) layout -> diffusers layout of the
transformers of Flux.1, SD3, Chroma, Flux.2, Z-Image, Wan and Qwen-Image,
as data: for every diffusers
key, the original key it comes from and, for a fused weight split in
diffusers, the row slice it takes; ``swap`` marks an adaLN weight whose
two halves diffusers stores the other way round (shift, scale -> scale,
shift).

Sources: huggingface/diffusers ``src/diffusers/loaders/single_file_utils.py``
(``convert_flux_transformer_checkpoint_to_diffusers``,
``convert_sd3_transformer_checkpoint_to_diffusers``, ``swap_scale_shift``)
and ComfyUI ``comfy/utils.py`` (``flux_to_diffusers``,
``MMDIT_MAP_BASIC``/``MMDIT_MAP_BLOCK``); for Chroma, Flux.2, Z-Image and
Wan diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``,
``convert_flux2_transformer_checkpoint_to_diffusers``,
``convert_z_image_transformer_checkpoint_to_diffusers`` and
``convert_wan_transformer_to_diffusers`` (diffusers 0.42.1). No map needs a
reshape: every diffusers tensor is an original tensor, a row slice of one
or (``swap``) one with its two row halves exchanged. Qwen-Image's single files keep
diffusers' names (``comfy/ldm/qwen_image/model.py``): its map is the
identity. The tables are checked against diffusers' models built on the
meta device (tests/test_render_families.py). Importing this module does
not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from modelkit.arch.chroma import ChromaConfig
from modelkit.arch.flux import FluxConfig
from modelkit.arch.flux2 import Flux2Config
from modelkit.arch.qwen_image import QwenImageConfig
from modelkit.arch.qwen_image import transformer_keys as qwen_keys
from modelkit.arch.sd3 import SD3Config
from modelkit.arch.wan import WanConfig
from modelkit.arch.z_image import ZImageConfig


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


def _split(out: KeyMap, targets: tuple[str, ...], source: str, sizes: tuple[int, ...],
           bias: bool = True) -> None:
    start = 0
    for target, size in zip(targets, sizes, strict=True):
        _linear(out, target, source, (start, start + size), bias)
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


def _bfl_double(out: KeyMap, b: str, o: str, h: int, *, bias: bool, ff: tuple[str, str],
                modulation: bool) -> None:
    """A Black Forest Labs double block ``o`` as diffusers' ``b``: fused
    ``qkv`` split in three, the q/k norms, output projections and MLPs
    (``ff``: the names of the MLP's two linears in diffusers)."""
    streams = {"img": (("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1", "norm_q",
                       "norm_k"),
               "txt": (("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                       "ff_context", "norm1_context", "norm_added_q", "norm_added_k")}
    for s, (qkv, attn_out, mlp, norm, qn, kn) in streams.items():
        if modulation:
            _linear(out, f"{b}.{norm}.linear", f"{o}.{s}_mod.lin", bias=bias)
        _split(out, tuple(f"{b}.attn.{p}" for p in qkv), f"{o}.{s}_attn.qkv", (h, h, h),
               bias)
        out[f"{b}.attn.{qn}.weight"] = Piece(f"{o}.{s}_attn.norm.query_norm.scale")
        out[f"{b}.attn.{kn}.weight"] = Piece(f"{o}.{s}_attn.norm.key_norm.scale")
        _linear(out, f"{b}.attn.{attn_out}", f"{o}.{s}_attn.proj", bias=bias)
        _linear(out, f"{b}.{mlp}.{ff[0]}", f"{o}.{s}_mlp.0", bias=bias)
        _linear(out, f"{b}.{mlp}.{ff[1]}", f"{o}.{s}_mlp.2", bias=bias)


def chroma_map(cfg: ChromaConfig) -> KeyMap:
    """Chroma's diffusers keys (``ChromaTransformer2DModel``) from lodestones'
    (ComfyUI's) layout: Flux.1's blocks without modulation, the guidance
    approximator renamed (``in_layer``/``out_layer`` -> ``linear_1``/``linear_2``,
    ``norms.N.scale`` -> ``.weight``)."""
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    out: KeyMap = {}
    g = "distilled_guidance_layer"
    _linear(out, f"{g}.in_proj", f"{g}.in_proj")
    for i in range(cfg.approximator_layers):
        _linear(out, f"{g}.layers.{i}.linear_1", f"{g}.layers.{i}.in_layer")
        _linear(out, f"{g}.layers.{i}.linear_2", f"{g}.layers.{i}.out_layer")
        out[f"{g}.norms.{i}.weight"] = Piece(f"{g}.norms.{i}.scale")
    _linear(out, f"{g}.out_proj", f"{g}.out_proj")
    _linear(out, "context_embedder", "txt_in")
    _linear(out, "x_embedder", "img_in")
    for i in range(cfg.depth):
        _bfl_double(out, f"transformer_blocks.{i}", f"double_blocks.{i}", h, bias=True,
                    ff=("net.0.proj", "net.2"), modulation=False)
    for i in range(cfg.depth_single_blocks):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _split(out, (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"),
               f"{o}.linear1", (h, h, h, mlp))
        _linear(out, f"{b}.proj_out", f"{o}.linear2")
        out[f"{b}.attn.norm_q.weight"] = Piece(f"{o}.norm.query_norm.scale")
        out[f"{b}.attn.norm_k.weight"] = Piece(f"{o}.norm.key_norm.scale")
    _linear(out, "proj_out", "final_layer.linear")
    return out


def flux2_map(cfg: Flux2Config) -> KeyMap:
    """Flux.2's diffusers keys (``Flux2Transformer2DModel``) from Black Forest
    Labs' layout: no biases; the double blocks' ``qkv`` split, the single
    blocks' ``linear1`` kept fused (``attn.to_qkv_mlp_proj``), the final
    modulation's halves swapped."""
    h = cfg.hidden_size
    out: KeyMap = {}
    t = "time_guidance_embed"
    for target, source in ((f"{t}.timestep_embedder", "time_in"),
                           (f"{t}.guidance_embedder", "guidance_in")):
        _linear(out, f"{target}.linear_1", f"{source}.in_layer", bias=False)
        _linear(out, f"{target}.linear_2", f"{source}.out_layer", bias=False)
    for mod in ("double_stream_modulation_img", "double_stream_modulation_txt",
                "single_stream_modulation"):
        _linear(out, f"{mod}.linear", f"{mod}.lin", bias=False)
    _linear(out, "x_embedder", "img_in", bias=False)
    _linear(out, "context_embedder", "txt_in", bias=False)
    for i in range(cfg.depth):
        _bfl_double(out, f"transformer_blocks.{i}", f"double_blocks.{i}", h, bias=False,
                    ff=("linear_in", "linear_out"), modulation=False)
    for i in range(cfg.depth_single_blocks):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _linear(out, f"{b}.attn.to_qkv_mlp_proj", f"{o}.linear1", bias=False)
        out[f"{b}.attn.norm_q.weight"] = Piece(f"{o}.norm.query_norm.scale")
        out[f"{b}.attn.norm_k.weight"] = Piece(f"{o}.norm.key_norm.scale")
        _linear(out, f"{b}.attn.to_out", f"{o}.linear2", bias=False)
    _linear(out, "norm_out.linear", "final_layer.adaLN_modulation.1", bias=False, swap=True)
    _linear(out, "proj_out", "final_layer.linear", bias=False)
    return out


def z_image_map(cfg: ZImageConfig) -> KeyMap:
    """Z-Image's diffusers keys (``ZImageTransformer2DModel``) from the Lumina-2
    layout ComfyUI uses: ``attention.qkv`` split, ``out`` -> ``to_out.0``,
    ``q_norm``/``k_norm`` -> ``norm_q``/``norm_k``, the patch embedder and
    final layer under ``all_x_embedder.2-1``/``all_final_layer.2-1`` (patch 2,
    frame patch 1, as diffusers' converter writes them)."""
    d, p = cfg.dim, cfg.patch
    out: KeyMap = {k: Piece(k) for k in ("x_pad_token", "cap_pad_token",
                                          "cap_embedder.0.weight")}
    _linear(out, f"all_x_embedder.{p}-1", "x_embedder")
    _linear(out, f"all_final_layer.{p}-1.linear", "final_layer.linear")
    _linear(out, f"all_final_layer.{p}-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
    layers = [(f"noise_refiner.{i}", True) for i in range(cfg.num_refiner_layers)]
    layers += [(f"context_refiner.{i}", False) for i in range(cfg.num_refiner_layers)]
    layers += [(f"layers.{i}", True) for i in range(cfg.num_layers)]
    for b, modulated in layers:
        a = f"{b}.attention"
        _split(out, (f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"), f"{a}.qkv", (d, d, d),
               bias=False)
        _linear(out, f"{a}.to_out.0", f"{a}.out", bias=False)
        out[f"{a}.norm_q.weight"] = Piece(f"{a}.q_norm.weight")
        out[f"{a}.norm_k.weight"] = Piece(f"{a}.k_norm.weight")
        for w in ("w1", "w2", "w3"):
            _linear(out, f"{b}.feed_forward.{w}", f"{b}.feed_forward.{w}", bias=False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            out[f"{b}.{norm}.weight"] = Piece(f"{b}.{norm}.weight")
        if modulated:
            _linear(out, f"{b}.adaLN_modulation.0", f"{b}.adaLN_modulation.0")
    for layer in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"):
        _linear(out, layer, layer)
    return out


# keys an original Z-Image file may carry that the model never uses and
# diffusers' converter drops (``norm_final.weight``)
Z_IMAGE_UNUSED = ("norm_final.weight",)


def wan_map(cfg: WanConfig) -> KeyMap:
    """Wan 2.1/2.2's diffusers keys (``WanTransformer3DModel``, with VACE
    ``WanVACETransformer3DModel``) from Wan-Video's layout: renames only
    (``self_attn``/``cross_attn`` -> ``attn1``/``attn2``, ``q/k/v/o`` ->
    ``to_q/to_k/to_v/to_out.0``, ``norm3`` -> ``norm2``, ``modulation`` ->
    ``scale_shift_table``, the embedders under ``condition_embedder``, VACE's
    ``before_proj``/``after_proj`` -> ``proj_in``/``proj_out``; diffusers'
    single_file_utils.py convert_wan_transformer_to_diffusers)."""
    e = "condition_embedder"
    out: KeyMap = {"scale_shift_table": Piece("head.modulation"),
                   "patch_embedding.weight": Piece("patch_embedding.weight"),
                   "patch_embedding.bias": Piece("patch_embedding.bias")}
    for target, source in ((f"{e}.time_embedder.linear_1", "time_embedding.0"),
                           (f"{e}.time_embedder.linear_2", "time_embedding.2"),
                           (f"{e}.time_proj", "time_projection.1"),
                           (f"{e}.text_embedder.linear_1", "text_embedding.0"),
                           (f"{e}.text_embedder.linear_2", "text_embedding.2")):
        _linear(out, target, source)
    if cfg.i2v:
        for target, source in (("norm1", "0"), ("ff.net.0.proj", "1"), ("ff.net.2", "3"),
                               ("norm2", "4")):
            _linear(out, f"{e}.image_embedder.{target}", f"img_emb.proj.{source}")
    for i in range(cfg.num_layers):
        _wan_block(out, f"blocks.{i}", cfg.i2v)
    _linear(out, "proj_out", "head.head")
    if cfg.vace_layers:
        _linear(out, "vace_patch_embedding", "vace_patch_embedding")
        for i in range(len(cfg.vace_layers)):
            b = f"vace_blocks.{i}"
            if i == 0:
                _linear(out, f"{b}.proj_in", f"{b}.before_proj")
            _wan_block(out, b, False)
            _linear(out, f"{b}.proj_out", f"{b}.after_proj")
    return out


def _wan_block(out: KeyMap, b: str, i2v: bool) -> None:
    """One Wan block's renames (a VACE block's too)."""
    out[f"{b}.scale_shift_table"] = Piece(f"{b}.modulation")
    for attn, source in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for proj, p in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
            _linear(out, f"{b}.{attn}.{proj}", f"{b}.{source}.{p}")
        for norm in ("norm_q", "norm_k"):
            out[f"{b}.{attn}.{norm}.weight"] = Piece(f"{b}.{source}.{norm}.weight")
    if i2v:
        _linear(out, f"{b}.attn2.add_k_proj", f"{b}.cross_attn.k_img")
        _linear(out, f"{b}.attn2.add_v_proj", f"{b}.cross_attn.v_img")
        out[f"{b}.attn2.norm_added_k.weight"] = Piece(f"{b}.cross_attn.norm_k_img.weight")
    _linear(out, f"{b}.norm2", f"{b}.norm3")  # the cross-attention norm
    _linear(out, f"{b}.ffn.net.0.proj", f"{b}.ffn.0")
    _linear(out, f"{b}.ffn.net.2", f"{b}.ffn.2")


def qwen_image_map(cfg: QwenImageConfig) -> KeyMap:
    """Qwen-Image: the single files keep diffusers' names."""
    return {k: Piece(k) for k in qwen_keys(cfg)}


def sources(key_map: KeyMap) -> Iterator[str]:
    """The original keys a map reads, each once."""
    yield from dict.fromkeys(p.source for p in key_map.values())
