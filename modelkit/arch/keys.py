"""Key names and shapes of SD components, generated from their configs.

The generators walk the same construction order as the original LDM/SGM
modules (``openaimodel.UNetModel``, ``AutoencoderKL``, transformers'
``CLIPTextModel`` and open_clip's text tower), so the names are exactly those
found in single-file checkpoints. Shapes are tuples of ints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache

from modelkit.arch.configs import (
    EMA_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ArchSpec,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

Shape = tuple[int, ...]
KeyShapes = dict[str, Shape]

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
PREDICTION_MARKERS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max",
                      "edm_vpred.sigma_min")
POSITION_IDS = "text_model.embeddings.position_ids"


def _norm(p: str, ch: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (ch,)
    yield f"{p}.bias", (ch,)


def linear_keys(p: str, out: int, inp: int, bias: bool = True
                ) -> Iterator[tuple[str, Shape]]:
    """The keys and shapes of a linear layer ``p`` (``inp`` -> ``out``)."""
    yield f"{p}.weight", (out, inp)
    if bias:
        yield f"{p}.bias", (out,)


def joint_attention_keys(b: str, hidden: int, head_dim: int) -> Iterator[tuple[str, Shape]]:
    """diffusers' joint (image + text stream) attention of block ``b``:
    q/k/v and output projections of both streams and the per-head q/k norms
    (Flux's ``transformer_blocks``, Qwen-Image's)."""
    for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                 "to_out.0", "to_add_out"):
        yield from linear_keys(f"{b}.attn.{proj}", hidden, hidden)
    for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        yield f"{b}.attn.{norm}.weight", (head_dim,)


def bfl_double_block(b: str, hidden: int, head_dim: int, mlp_in: int, mlp_hidden: int, *,
                     modulation: bool, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    """Black Forest Labs' double-stream block ``b`` (Flux.1, Chroma, Flux.2;
    black-forest-labs/flux ``modules/layers.py``): per stream (img, txt) the
    optional modulation, fused ``qkv`` with q/k norms, the output projection
    and the MLP (``mlp_in`` wide: twice ``mlp_hidden`` for a gated one)."""
    for s in ("img", "txt"):
        if modulation:
            yield from linear_keys(f"{b}.{s}_mod.lin", 6 * hidden, hidden, bias)
        yield from linear_keys(f"{b}.{s}_attn.qkv", 3 * hidden, hidden, bias)
        yield f"{b}.{s}_attn.norm.query_norm.scale", (head_dim,)
        yield f"{b}.{s}_attn.norm.key_norm.scale", (head_dim,)
        yield from linear_keys(f"{b}.{s}_attn.proj", hidden, hidden, bias)
        yield from linear_keys(f"{b}.{s}_mlp.0", mlp_in, hidden, bias)
        yield from linear_keys(f"{b}.{s}_mlp.2", hidden, mlp_hidden, bias)


def bfl_single_block(b: str, hidden: int, head_dim: int, mlp_in: int, mlp_hidden: int, *,
                     modulation: bool, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    """Black Forest Labs' single-stream block ``b``: ``linear1`` = fused qkv
    and MLP input, ``linear2`` = attention and MLP output, q/k norms, the
    optional modulation."""
    yield from linear_keys(f"{b}.linear1", 3 * hidden + mlp_in, hidden, bias)
    yield from linear_keys(f"{b}.linear2", hidden, hidden + mlp_hidden, bias)
    yield f"{b}.norm.query_norm.scale", (head_dim,)
    yield f"{b}.norm.key_norm.scale", (head_dim,)
    if modulation:
        yield from linear_keys(f"{b}.modulation.lin", 3 * hidden, hidden, bias)


def _conv(p: str, out: int, inp: int, k: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (out, inp, k, k)
    yield f"{p}.bias", (out,)


# --- UNet ---------------------------------------------------------------------


def _resblock(p: str, ch_in: int, ch_out: int, emb: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.in_layers.0", ch_in)
    yield from _conv(f"{p}.in_layers.2", ch_out, ch_in, 3)
    yield from linear_keys(f"{p}.emb_layers.1", ch_out, emb)
    yield from _norm(f"{p}.out_layers.0", ch_out)
    yield from _conv(f"{p}.out_layers.3", ch_out, ch_out, 3)
    if ch_in != ch_out:
        yield from _conv(f"{p}.skip_connection", ch_out, ch_in, 1)


def _proj(p: str, ch: int, linear: bool) -> Iterator[tuple[str, Shape]]:
    if linear:
        yield from linear_keys(p, ch, ch)
    else:
        yield from _conv(p, ch, ch, 1)


def _transformer(
    p: str, ch: int, depth: int, context: int, linear: bool
) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm", ch)
    yield from _proj(f"{p}.proj_in", ch, linear)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", ch), ("attn2", context)):
            yield from linear_keys(f"{b}.{attn}.to_q", ch, ch, bias=False)
            yield from linear_keys(f"{b}.{attn}.to_k", ch, kv_dim, bias=False)
            yield from linear_keys(f"{b}.{attn}.to_v", ch, kv_dim, bias=False)
            yield from linear_keys(f"{b}.{attn}.to_out.0", ch, ch)
            if attn == "attn1":
                yield from linear_keys(f"{b}.ff.net.0.proj", ch * 8, ch)
                yield from linear_keys(f"{b}.ff.net.2", ch, ch * 4)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{b}.{n}", ch)
    yield from _proj(f"{p}.proj_out", ch, linear)


def _unet_items(cfg: UNetConfig) -> Iterator[tuple[str, Shape]]:
    mc = cfg.model_channels
    emb = mc * 4
    yield from linear_keys("time_embed.0", emb, mc)
    yield from linear_keys("time_embed.2", emb, emb)
    if cfg.adm_in_channels is not None:
        yield from linear_keys("label_emb.0.0", emb, cfg.adm_in_channels)
        yield from linear_keys("label_emb.0.2", emb, emb)
    yield from _conv("input_blocks.0.0", mc, cfg.in_channels, 3)
    chans = [mc]
    ch = mc
    idx = 1
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        depth = cfg.transformer_depth[level]
        for _ in range(cfg.num_res_blocks):
            yield from _resblock(f"input_blocks.{idx}.0", ch, mult * mc, emb)
            ch = mult * mc
            if depth:
                yield from _transformer(
                    f"input_blocks.{idx}.1", ch, depth, cfg.context_dim,
                    cfg.use_linear_in_transformer,
                )
            chans.append(ch)
            idx += 1
        if level != last:
            yield from _conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    yield from _resblock("middle_block.0", ch, ch, emb)
    yield from _transformer(
        "middle_block.1", ch, cfg.transformer_depth_middle, cfg.context_dim,
        cfg.use_linear_in_transformer,
    )
    yield from _resblock("middle_block.2", ch, ch, emb)
    idx = 0
    for level in range(last, -1, -1):
        mult = cfg.channel_mult[level]
        depth = cfg.transformer_depth[level]
        for i in range(cfg.num_res_blocks + 1):
            skip = chans.pop()
            yield from _resblock(f"output_blocks.{idx}.0", ch + skip, mult * mc, emb)
            ch = mult * mc
            sub = 1
            if depth:
                yield from _transformer(
                    f"output_blocks.{idx}.1", ch, depth, cfg.context_dim,
                    cfg.use_linear_in_transformer,
                )
                sub = 2
            if level and i == cfg.num_res_blocks:
                yield from _conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    yield from _norm("out.0", ch)
    yield from _conv("out.2", cfg.out_channels, mc, 3)


@lru_cache(maxsize=64)
def unet_keys(cfg: UNetConfig) -> KeyShapes:
    """UNet keys (without the ``model.diffusion_model.`` prefix) and shapes."""
    return dict(_unet_items(cfg))


# --- VAE ----------------------------------------------------------------------


def _vae_resnet(p: str, ch_in: int, ch_out: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm1", ch_in)
    yield from _conv(f"{p}.conv1", ch_out, ch_in, 3)
    yield from _norm(f"{p}.norm2", ch_out)
    yield from _conv(f"{p}.conv2", ch_out, ch_out, 3)
    if ch_in != ch_out:
        yield from _conv(f"{p}.nin_shortcut", ch_out, ch_in, 1)


def _vae_mid(p: str, ch: int) -> Iterator[tuple[str, Shape]]:
    yield from _vae_resnet(f"{p}.block_1", ch, ch)
    yield from _norm(f"{p}.attn_1.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.attn_1.{n}", ch, ch, 1)
    yield from _vae_resnet(f"{p}.block_2", ch, ch)


def _vae_items(cfg: VAEConfig) -> Iterator[tuple[str, Shape]]:
    levels = len(cfg.ch_mult)
    yield from _conv("encoder.conv_in", cfg.ch, cfg.in_channels, 3)
    in_mult = (1, *cfg.ch_mult)
    ch = cfg.ch
    for lvl in range(levels):
        ch = cfg.ch * in_mult[lvl]
        out = cfg.ch * cfg.ch_mult[lvl]
        for b in range(cfg.num_res_blocks):
            yield from _vae_resnet(f"encoder.down.{lvl}.block.{b}", ch, out)
            ch = out
        if lvl != levels - 1:
            yield from _conv(f"encoder.down.{lvl}.downsample.conv", ch, ch, 3)
    yield from _vae_mid("encoder.mid", ch)
    yield from _norm("encoder.norm_out", ch)
    yield from _conv("encoder.conv_out", 2 * cfg.z_channels, ch, 3)
    ch = cfg.ch * cfg.ch_mult[-1]
    yield from _conv("decoder.conv_in", ch, cfg.z_channels, 3)
    yield from _vae_mid("decoder.mid", ch)
    for lvl in range(levels - 1, -1, -1):
        out = cfg.ch * cfg.ch_mult[lvl]
        for b in range(cfg.num_res_blocks + 1):
            yield from _vae_resnet(f"decoder.up.{lvl}.block.{b}", ch, out)
            ch = out
        if lvl != 0:
            yield from _conv(f"decoder.up.{lvl}.upsample.conv", ch, ch, 3)
    yield from _norm("decoder.norm_out", ch)
    yield from _conv("decoder.conv_out", cfg.out_ch, ch, 3)
    yield from _conv("quant_conv", 2 * cfg.embed_dim, 2 * cfg.z_channels, 1)
    yield from _conv("post_quant_conv", cfg.z_channels, cfg.embed_dim, 1)


@lru_cache(maxsize=16)
def vae_keys(cfg: VAEConfig) -> KeyShapes:
    """VAE keys (without the ``first_stage_model.`` prefix) and shapes."""
    return dict(_vae_items(cfg))


# --- text encoders ------------------------------------------------------------


def _hf_clip_items(cfg: TextEncoderConfig) -> Iterator[tuple[str, Shape]]:
    w = cfg.width
    yield "text_model.embeddings.token_embedding.weight", (cfg.vocab_size, w)
    yield "text_model.embeddings.position_embedding.weight", (cfg.context_length, w)
    for i in range(cfg.layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from linear_keys(f"{p}.self_attn.{n}", w, w)
        yield from _norm(f"{p}.layer_norm1", w)
        yield from linear_keys(f"{p}.mlp.fc1", w * cfg.mlp_ratio, w)
        yield from linear_keys(f"{p}.mlp.fc2", w, w * cfg.mlp_ratio)
        yield from _norm(f"{p}.layer_norm2", w)
    yield from _norm("text_model.final_layer_norm", w)


def _open_clip_items(cfg: TextEncoderConfig) -> Iterator[tuple[str, Shape]]:
    w = cfg.width
    yield "positional_embedding", (cfg.context_length, w)
    yield "text_projection", (w, w)
    yield "token_embedding.weight", (cfg.vocab_size, w)
    for i in range(cfg.layers):
        p = f"transformer.resblocks.{i}"
        yield from _norm(f"{p}.ln_1", w)
        yield f"{p}.attn.in_proj_weight", (3 * w, w)
        yield f"{p}.attn.in_proj_bias", (3 * w,)
        yield from linear_keys(f"{p}.attn.out_proj", w, w)
        yield from _norm(f"{p}.ln_2", w)
        yield from linear_keys(f"{p}.mlp.c_fc", w * cfg.mlp_ratio, w)
        yield from linear_keys(f"{p}.mlp.c_proj", w, w * cfg.mlp_ratio)
    yield from _norm("ln_final", w)
    yield "logit_scale", ()


@lru_cache(maxsize=16)
def text_encoder_keys(cfg: TextEncoderConfig) -> KeyShapes:
    """Text-encoder keys (relative to the slot prefix) and shapes.

    The HF layout's ``position_ids`` buffer is optional in real files and is
    listed separately (:data:`POSITION_IDS`), not here.
    """
    items = _hf_clip_items(cfg) if cfg.layout == "hf" else _open_clip_items(cfg)
    return dict(items)


# --- whole checkpoints --------------------------------------------------------


def ema_key(unet_key: str) -> str:
    """The LitEma buffer name for a UNet key: ``model_ema.`` + the key under
    ``model.`` with every dot removed."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def component_keys(arch: ArchSpec) -> dict[str, KeyShapes]:
    """Full (prefixed) keys per component: ``unet``, ``vae`` and each text
    encoder slot name (``te``, ``te1``, ``te2``)."""
    comps: dict[str, KeyShapes] = {
        "unet": {UNET_PREFIX + k: s for k, s in unet_keys(arch.unet).items()},
        "vae": {VAE_PREFIX + k: s for k, s in vae_keys(arch.vae).items()},
    }
    for slot in arch.text_encoders:
        keys = text_encoder_keys(slot.config)
        comps[slot.name] = {slot.prefix + k: s for k, s in keys.items()}
    return comps


def checkpoint_keys(arch: ArchSpec, *, ema: bool = False) -> KeyShapes:
    """Every key of a complete single-file checkpoint of ``arch``, in file
    order, optionally with LitEma buffers (shapes of ``decay``/``num_updates``
    are scalars)."""
    out: KeyShapes = {}
    for keys in component_keys(arch).values():
        out.update(keys)
    for slot in arch.text_encoders:
        if slot.config.layout == "hf":
            out[slot.prefix + POSITION_IDS] = (1, slot.config.context_length)
    if ema:
        for k, s in unet_keys(arch.unet).items():
            out[ema_key(k)] = s
        out[EMA_PREFIX + "decay"] = ()
        out[EMA_PREFIX + "num_updates"] = ()
    if arch.has_schedule_buffers:
        for name in SCHEDULE_BUFFERS:
            out[name] = (1000,)
    return out


def n_params(keys: KeyShapes) -> int:
    """Number of elements over a key/shape table."""
    return sum(math.prod(shape) for shape in keys.values())


# --- ControlNet ---------------------------------------------------------------

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


def _controlnet_items(cfg: UNetConfig, hint_channels: int) -> Iterator[tuple[str, Shape]]:
    unet = unet_keys(cfg)
    for k, s in unet.items():
        if not k.startswith(("output_blocks.", "out.")):
            yield k, s
    ch_in = hint_channels
    for i, ch in enumerate(HINT_CHANNELS):
        yield from _conv(f"input_hint_block.{2 * i}", ch, ch_in, 3)
        ch_in = ch
    yield from _conv(f"input_hint_block.{2 * len(HINT_CHANNELS)}", cfg.model_channels,
                     ch_in, 3)
    n_inputs = len({k.split(".")[1] for k in unet if k.startswith("input_blocks.")})
    for i in range(n_inputs):
        ch = unet[f"input_blocks.{i}.0.weight" if i == 0 else _block_out_key(unet, i)][0]
        yield from _conv(f"zero_convs.{i}.0", ch, ch, 1)
    mid = unet["middle_block.2.out_layers.3.weight"][0]
    yield from _conv("middle_block_out.0", mid, mid, 1)


def _block_out_key(unet: KeyShapes, i: int) -> str:
    res = f"input_blocks.{i}.0.out_layers.3.weight"
    return res if res in unet else f"input_blocks.{i}.0.op.weight"


def controlnet_keys(cfg: UNetConfig, hint_channels: int = 3) -> KeyShapes:
    """Keys of an LDM ControlNet (``cldm.ControlNet``) without the
    ``control_model.`` prefix: the UNet's encoder half, the hint encoder and
    one zero conv per input block."""
    return dict(_controlnet_items(cfg, hint_channels))
