"""Standalone text encoders and VAEs of the families after SDXL, as data.

Each :class:`Standalone` entry says how to recognise one component file
(ComfyUI's ``models/text_encoders`` and ``models/vae`` files: CLIP-L, CLIP-G,
T5-XXL, UMT5-XXL, Qwen2.5-VL-7B, the 16-channel Flux.1/SD3 autoencoder, the
Wan 2.1 and 2.2 VAEs; Z-Image's Qwen3-4B, Flux.2's Mistral Small 3.1 and
its VAE) with the registry's declarative
:class:`~modelkit.arch.registry.Rule` s, which families use it, and the
key/shape table it is checked against *at the widths found in the file*
(the full layer count when the width is the released one), so tiny test
files and full-size ones are checked the same way.

Key names and shapes: ComfyUI ``comfy/sd.py`` (``detect_te_model``, the
VAE branch that tells Wan 2.1 from Wan 2.2 by
``decoder.upsamples.0.upsamples.0.residual.2.weight``),
``comfy/text_encoders/llama.py`` (``Qwen25_7BVLI_Config``: 3584 wide, 28
layers, 4 key/value heads of 128), ``comfy/ldm/wan/vae.py`` and
``comfy/ldm/wan/vae2_2.py`` (the 3-D causal VAEs), transformers'
``T5EncoderModel``/``UMT5EncoderModel`` (UMT5 has a relative attention bias
in every layer, T5 in the first only).

Importing this module does not import torch.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from modelkit.arch.configs import CLIP_L, TextEncoderConfig
from modelkit.arch.keys import POSITION_IDS, KeyShapes, Shape, text_encoder_keys
from modelkit.arch.registry import DIFFUSERS, ORIGINAL, TEXT_ENCODER, VAE, Rule, Variant

# prefixes a standalone component file may carry (ComfyUI's all-in-one
# spelling kept by an extraction, or its CLIPSave node), longest first
# (ComfyUI's CLIP state-dict names: comfy/sd.py, comfy_extras CLIPSave's list)
STRIP_PREFIXES = tuple(f"{outer}{name}.transformer." for name in ("t5xxl", "umt5xxl",
                                                                  "clip_l", "clip_g",
                                                                  "qwen25_7b", "qwen3_4b")
                       for outer in ("text_encoders.", ""))

Table = Callable[[Mapping[str, Shape]], KeyShapes | None]


@dataclass(frozen=True)
class Standalone:
    """One standalone component: how it is recognised, what it is checked
    against, who uses it."""

    name: str  # component name (``t5xxl``)
    label: str  # how people write it (``T5-XXL``)
    kind: str  # registry.TEXT_ENCODER or registry.VAE
    arch: str  # the family the library files it under
    used_by: tuple[str, ...]  # registry names of the families that use it
    detect: tuple[Rule, ...]
    table: Table  # the expected keys at the widths in the file (None: not checked)
    variants: tuple[Variant, ...] = ()
    optional: tuple[str, ...] = ()  # keys (or prefixes ending in ".") that may be there
    notes: tuple[str, ...] = ()
    # (layout, rule), first match; none: the original layout, the one the
    # table is of (a diffusers-named file is named, not checked)
    layout_rules: tuple[tuple[str, Rule], ...] = ()


def _count(keys: Mapping[str, Shape], pattern: str) -> int:
    """1 + the highest block number ``N`` in keys matching ``pattern``
    (a regex with one group), at most the number of keys: a forged
    ``layers.999999999`` key must not make a table of a billion layers."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return min(max(found) + 1, len(keys)) if found else 0


def _dim(keys: Mapping[str, Shape], key: str, axis: int) -> int | None:
    shape = keys.get(key)
    return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None


# --- CLIP (transformers' CLIPTextModel names) --------------------------------------

_CLIP_TOKENS = "text_model.embeddings.token_embedding.weight"
_CLIP_G = replace(CLIP_L, width=1280, layers=32, heads=20)


def _clip_table(full: TextEncoderConfig) -> Table:
    def table(keys: Mapping[str, Shape]) -> KeyShapes | None:
        width = _dim(keys, _CLIP_TOKENS, 1)
        vocab = _dim(keys, _CLIP_TOKENS, 0)
        fc1 = _dim(keys, "text_model.encoder.layers.0.mlp.fc1.weight", 0)
        if width is None or vocab is None or fc1 is None:
            return None
        layers = full.layers if width == full.width else _count(
            keys, r"text_model\.encoder\.layers\.(\d+)\.")
        ctx = _dim(keys, "text_model.embeddings.position_embedding.weight", 0)
        cfg = replace(full, width=width, vocab_size=vocab, layers=layers,
                      mlp_ratio=max(1, fc1 // width), context_length=ctx or full.context_length)
        return dict(text_encoder_keys(cfg))
    return table


# --- T5 v1.1 and UMT5 encoders (gated GELU: wi_0, wi_1) ------------------------------

_T5_BLOCK = r"encoder\.block\.(\d+)\."
_T5_BIAS = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
_T5_WI = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"


def _t5_table(full_width: int, full_layers: int, bias_every_layer: bool) -> Table:
    def table(keys: Mapping[str, Shape]) -> KeyShapes | None:
        vocab, width = _dim(keys, "shared.weight", 0), _dim(keys, "shared.weight", 1)
        ff = _dim(keys, _T5_WI, 0)
        bias = keys.get(_T5_BIAS.format(0))
        if vocab is None or width is None or ff is None or bias is None or len(bias) != 2:
            return None
        layers = full_layers if width == full_width else _count(keys, _T5_BLOCK)
        return t5_encoder_keys(layers, width, ff, vocab, tuple(bias), every=bias_every_layer)
    return table


def t5_encoder_keys(layers: int = 24, width: int = 4096, ff: int = 10240, vocab: int = 32128,
                    bias: Shape = (32, 64), *, every: bool = False) -> KeyShapes:
    """A T5 v1.1 encoder's keys (transformers' ``T5EncoderModel``; ``every``:
    UMT5's, a relative attention bias of shape ``bias`` in every layer)."""
    return dict(_t5_items(layers, width, ff, vocab, bias, every))


def _t5_items(layers: int, width: int, ff: int, vocab: int, bias: Shape, every: bool
              ) -> Iterator[tuple[str, Shape]]:
    yield "shared.weight", (vocab, width)
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        for p in ("q", "k", "v", "o"):
            yield f"{b}.0.SelfAttention.{p}.weight", (width, width)
        if i == 0 or every:
            yield _T5_BIAS.format(i), bias
        yield f"{b}.0.layer_norm.weight", (width,)
        yield f"{b}.1.DenseReluDense.wi_0.weight", (ff, width)
        yield f"{b}.1.DenseReluDense.wi_1.weight", (ff, width)
        yield f"{b}.1.DenseReluDense.wo.weight", (width, ff)
        yield f"{b}.1.layer_norm.weight", (width,)
    yield "encoder.final_layer_norm.weight", (width,)


# --- Qwen2.5-VL's language model (transformers' / ComfyUI's model.layers.N) ----------

_QWEN_TOKENS = "model.embed_tokens.weight"
_QWEN_K_BIAS = "model.layers.0.self_attn.k_proj.bias"


def _qwen_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    vocab, h = _dim(keys, _QWEN_TOKENS, 0), _dim(keys, _QWEN_TOKENS, 1)
    kv = _dim(keys, _QWEN_K_BIAS, 0)
    ff = _dim(keys, "model.layers.0.mlp.gate_proj.weight", 0)
    if vocab is None or h is None or kv is None or ff is None:
        return None
    layers = 28 if h == 3584 else _count(keys, r"model\.layers\.(\d+)\.")
    return qwen25_text_keys(layers, h, kv, ff, vocab)


def qwen25_text_keys(layers: int = 28, h: int = 3584, kv: int = 512, ff: int = 18944,
                     vocab: int = 152064) -> KeyShapes:
    """Qwen2.5(-VL)'s language model keys (``model.``: transformers' and
    ComfyUI's names; ``kv``: the key/value projection width)."""
    out: KeyShapes = {_QWEN_TOKENS: (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        for name, rows in (("q", h), ("k", kv), ("v", kv)):
            out[f"{p}.self_attn.{name}_proj.weight"] = (rows, h)
            out[f"{p}.self_attn.{name}_proj.bias"] = (rows,)
        out[f"{p}.self_attn.o_proj.weight"] = (h, h)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.mlp.gate_proj.weight"] = (ff, h)
        out[f"{p}.mlp.up_proj.weight"] = (ff, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, ff)
    out["model.norm.weight"] = (h,)
    return out


# --- Qwen3 (Z-Image's text encoder: Qwen3-4B; transformers' Qwen3 names) ------------

_QWEN3_Q_NORM = "model.layers.0.self_attn.q_norm.weight"


def qwen3_text_keys(layers: int = 36, h: int = 2560, heads: int = 32, kv_heads: int = 8,
                    head_dim: int = 128, ff: int = 9728, vocab: int = 151936) -> KeyShapes:
    """Qwen3's language model keys (transformers' ``Qwen3ForCausalLM`` under
    ``model.``: no q/k/v biases, RMS norms on the query and key heads);
    Qwen3-4B by default (tied embeddings: no ``lm_head``)."""
    out: KeyShapes = {_QWEN_TOKENS: (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                           ("v", kv_heads * head_dim)):
            out[f"{p}.self_attn.{name}_proj.weight"] = (rows, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, heads * head_dim)
        out[f"{p}.self_attn.q_norm.weight"] = (head_dim,)
        out[f"{p}.self_attn.k_norm.weight"] = (head_dim,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.mlp.gate_proj.weight"] = (ff, h)
        out[f"{p}.mlp.up_proj.weight"] = (ff, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, ff)
    out["model.norm.weight"] = (h,)
    return out


# --- Mistral Small 3.1 (Flux.2's text encoder; Llama names, no biases, no q/k norms) --

_MISTRAL_VOCAB, _MISTRAL_WIDTH = 131072, 5120  # ComfyUI-GGUF tells it by this embedding


def llama_text_keys(layers: int = 40, h: int = 5120, q: int = 4096, kv: int = 1024,
                    ff: int = 32768, vocab: int = 131072) -> KeyShapes:
    """A Llama-style language model's keys under ``model.`` (no biases, no
    query/key norms); Mistral Small 3.1 24B's text model by default."""
    out: KeyShapes = {_QWEN_TOKENS: (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            out[f"{p}.self_attn.{name}_proj.weight"] = (rows, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, q)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.mlp.gate_proj.weight"] = (ff, h)
        out[f"{p}.mlp.up_proj.weight"] = (ff, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, ff)
    out["model.norm.weight"] = (h,)
    return out


def _mistral_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    vocab, h = _dim(keys, _QWEN_TOKENS, 0), _dim(keys, _QWEN_TOKENS, 1)
    q = _dim(keys, "model.layers.0.self_attn.q_proj.weight", 0)
    k = _dim(keys, "model.layers.0.self_attn.k_proj.weight", 0)
    ff = _dim(keys, "model.layers.0.mlp.gate_proj.weight", 0)
    if vocab is None or h is None or q is None or k is None or ff is None:
        return None
    layers = 40 if h == _MISTRAL_WIDTH else _count(keys, r"model\.layers\.(\d+)\.")
    return llama_text_keys(layers, h, q, k, ff, vocab)


def _qwen3_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    vocab, h = _dim(keys, _QWEN_TOKENS, 0), _dim(keys, _QWEN_TOKENS, 1)
    hd = _dim(keys, _QWEN3_Q_NORM, 0)
    q = _dim(keys, "model.layers.0.self_attn.q_proj.weight", 0)
    k = _dim(keys, "model.layers.0.self_attn.k_proj.weight", 0)
    ff = _dim(keys, "model.layers.0.mlp.gate_proj.weight", 0)
    if vocab is None or h is None or not hd or q is None or k is None or ff is None:
        return None
    layers = 36 if h == 2560 else _count(keys, r"model\.layers\.(\d+)\.")
    return qwen3_text_keys(layers, h, q // hd, k // hd, hd, ff, vocab)


# --- the 16-channel KL-f8 autoencoder (Flux.1 ae, SD3 VAE) ----------------------------


def _ae_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    from modelkit.arch.flux import ae_keys

    ch = _dim(keys, "encoder.conv_in.weight", 0)
    return ae_keys(ch) if ch else None


# --- Wan's 3-D causal VAEs (comfy/ldm/wan/vae.py, vae2_2.py) ------------------------


def _conv3(name: str, cout: int, cin: int, k: tuple[int, int, int] = (3, 3, 3)
           ) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (cout, cin, *k)
    yield f"{name}.bias", (cout,)


def _wan_res(p: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    """ResidualBlock: RMS_norm, SiLU, conv, RMS_norm, SiLU, dropout, conv."""
    yield f"{p}.residual.0.gamma", (cin, 1, 1, 1)
    yield from _conv3(f"{p}.residual.2", cout, cin)
    yield f"{p}.residual.3.gamma", (cout, 1, 1, 1)
    yield from _conv3(f"{p}.residual.6", cout, cout)
    if cin != cout:
        yield from _conv3(f"{p}.shortcut", cout, cin, (1, 1, 1))


def _wan_attn(p: str, dim: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.norm.gamma", (dim, 1, 1)
    yield f"{p}.to_qkv.weight", (3 * dim, dim, 1, 1)
    yield f"{p}.to_qkv.bias", (3 * dim,)
    yield f"{p}.proj.weight", (dim, dim, 1, 1)
    yield f"{p}.proj.bias", (dim,)


def _wan_resample(p: str, dim: int, mode: str, halve: bool) -> Iterator[tuple[str, Shape]]:
    """Resample: a 2-D conv (upsampling halves the channels in Wan 2.1, not in
    2.2) and, for the 3-D modes, a temporal conv."""
    up = mode.startswith("up")
    out = dim // 2 if up and halve else dim
    yield f"{p}.resample.1.weight", (out, dim, 3, 3)
    yield f"{p}.resample.1.bias", (out,)
    if mode == "upsample3d":
        yield from _conv3(f"{p}.time_conv", dim * 2, dim, (3, 1, 1))
    elif mode == "downsample3d":
        yield from _conv3(f"{p}.time_conv", dim, dim, (3, 1, 1))


def _wan_middle(p: str, dim: int) -> Iterator[tuple[str, Shape]]:
    yield from _wan_res(f"{p}.middle.0", dim, dim)
    yield from _wan_attn(f"{p}.middle.1", dim)
    yield from _wan_res(f"{p}.middle.2", dim, dim)


def _wan_head(p: str, dim: int, out: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.head.0.gamma", (dim, 1, 1, 1)
    yield from _conv3(f"{p}.head.2", out, dim)


MULT = (1, 2, 4, 4)
TIME_DOWN = (False, True, True)


def wan21_vae_keys(dim: int = 96, z: int = 16) -> KeyShapes:
    """Wan 2.1 VAE keys (ComfyUI ``comfy/ldm/wan/vae.py`` ``WanVAE``: 2
    residual blocks a level, no attention but in the middle)."""
    out: KeyShapes = {}
    dims = [dim * u for u in (1, *MULT)]
    out.update(_conv3("encoder.conv1", dims[0], 3))
    n = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        for _ in range(2):
            out.update(_wan_res(f"encoder.downsamples.{n}", cin, cout))
            cin, n = cout, n + 1
        if i != len(MULT) - 1:
            mode = "downsample3d" if TIME_DOWN[i] else "downsample2d"
            out.update(_wan_resample(f"encoder.downsamples.{n}", cout, mode, True))
            n += 1
    out.update(_wan_middle("encoder", dims[-1]))
    out.update(_wan_head("encoder", dims[-1], 2 * z))
    out.update(_conv3("conv1", 2 * z, 2 * z, (1, 1, 1)))
    out.update(_conv3("conv2", z, z, (1, 1, 1)))
    ddims = [dim * u for u in (MULT[-1], *MULT[::-1])]
    out.update(_conv3("decoder.conv1", ddims[0], z))
    out.update(_wan_middle("decoder", ddims[0]))
    n = 0
    time_up = TIME_DOWN[::-1]
    for i, (cin, cout) in enumerate(itertools.pairwise(ddims)):
        if i in (1, 2, 3):
            cin //= 2
        for _ in range(3):
            out.update(_wan_res(f"decoder.upsamples.{n}", cin, cout))
            cin, n = cout, n + 1
        if i != len(MULT) - 1:
            mode = "upsample3d" if time_up[i] else "upsample2d"
            out.update(_wan_resample(f"decoder.upsamples.{n}", cout, mode, True))
            n += 1
    out.update(_wan_head("decoder", ddims[-1], 3))
    return out


def wan22_vae_keys(dim: int = 160, z: int = 48, dec_dim: int = 256) -> KeyShapes:
    """Wan 2.2 VAE keys (ComfyUI ``comfy/ldm/wan/vae2_2.py`` ``WanVAE``: 12
    patchified input channels, residual levels nested in
    ``Down_ResidualBlock``/``Up_ResidualBlock``, upsampling keeps the width)."""
    out: KeyShapes = {}
    dims = [dim * u for u in (1, *MULT)]
    out.update(_conv3("encoder.conv1", dims[0], 12))
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        p = f"encoder.downsamples.{i}.downsamples"
        for j in range(2):
            out.update(_wan_res(f"{p}.{j}", cin if j == 0 else cout, cout))
        if i != len(MULT) - 1:
            mode = "downsample3d" if TIME_DOWN[i] else "downsample2d"
            out.update(_wan_resample(f"{p}.2", cout, mode, False))
    out.update(_wan_middle("encoder", dims[-1]))
    out.update(_wan_head("encoder", dims[-1], 2 * z))
    out.update(_conv3("conv1", 2 * z, 2 * z, (1, 1, 1)))
    out.update(_conv3("conv2", z, z, (1, 1, 1)))
    ddims = [dec_dim * u for u in (MULT[-1], *MULT[::-1])]
    out.update(_conv3("decoder.conv1", ddims[0], z))
    out.update(_wan_middle("decoder", ddims[0]))
    time_up = TIME_DOWN[::-1]
    for i, (cin, cout) in enumerate(itertools.pairwise(ddims)):
        p = f"decoder.upsamples.{i}.upsamples"
        for j in range(3):
            out.update(_wan_res(f"{p}.{j}", cin if j == 0 else cout, cout))
        if i != len(MULT) - 1:
            mode = "upsample3d" if time_up[i] else "upsample2d"
            out.update(_wan_resample(f"{p}.3", cout, mode, False))
    out.update(_wan_head("decoder", ddims[-1], 12))
    return out


def _wan22_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    dim, z = _dim(keys, "encoder.conv1.weight", 0), _dim(keys, "decoder.conv1.weight", 1)
    dec = _dim(keys, "decoder.head.0.gamma", 0)
    return wan22_vae_keys(dim, z, dec) if dim and z and dec else None


def _wan21_table(keys: Mapping[str, Shape]) -> KeyShapes | None:
    dim, z = _dim(keys, "encoder.conv1.weight", 0), _dim(keys, "decoder.conv1.weight", 1)
    return wan21_vae_keys(dim, z) if dim and z else None


def _unchecked(keys: Mapping[str, Shape]) -> KeyShapes | None:
    """No key table (yet): the component is named, not checked."""
    return None


# --- the table -------------------------------------------------------------------------

_WAN21_MARK = "decoder.middle.0.residual.0.gamma"
_WAN_DIFFUSERS = "encoder.mid_block.attentions.0.to_qkv.weight"  # AutoencoderKLWan
_KL_DIFFUSERS = "encoder.down_blocks.0.resnets.0.conv1.weight"  # AutoencoderKL
_WAN22_MARK = "decoder.upsamples.0.upsamples.0.residual.2.weight"
_CLIP_FC1 = "text_model.encoder.layers.0.mlp.fc1.weight"
# a projection (SD3's clip_g/clip_l), and what ComfyUI's old CLIPSave node wrote
# (comfy/sd.py: text_projection transposed, logit_scale)
_CLIP_OPTIONAL = (POSITION_IDS, "text_projection.weight", "text_projection", "logit_scale")
_T5_KEYS = ("shared.weight", _T5_WI, _T5_BIAS.format(0))

STANDALONE: tuple[Standalone, ...] = (
    Standalone(
        "clip_g", "CLIP-G", TEXT_ENCODER, "sdxl", ("sdxl", "sd3"),
        detect=(Rule(keys=(_CLIP_TOKENS, _CLIP_FC1), shapes=((_CLIP_TOKENS, 1, 1280),),
                     evidence=("text_model.encoder.layers with token embeddings 1280 "
                               "wide: CLIP-G (OpenCLIP bigG, transformers names)",)),),
        table=_clip_table(_CLIP_G),
        optional=_CLIP_OPTIONAL,
    ),
    Standalone(
        "clip_l", "CLIP-L", TEXT_ENCODER, "sd1", ("sd1", "sdxl", "sd3", "flux"),
        detect=(Rule(keys=(_CLIP_TOKENS, _CLIP_FC1), shapes=((_CLIP_TOKENS, 1, 768),),
                     evidence=("text_model.encoder.layers with token embeddings 768 "
                               "wide: CLIP-L (OpenAI ViT-L/14 text model)",)),),
        table=_clip_table(CLIP_L),
        optional=_CLIP_OPTIONAL,
    ),
    Standalone(
        "umt5xxl", "UMT5-XXL", TEXT_ENCODER, "wan", ("wan",),
        detect=(Rule(keys=(*_T5_KEYS, _T5_BIAS.format(1)),
                     evidence=("T5 encoder blocks with a relative attention bias in every "
                               "layer: UMT5 (Wan's text encoder)",)),),
        table=_t5_table(4096, 24, bias_every_layer=True),
        variants=(Variant("xxl", Rule(keys=("encoder.block.23.layer.0.SelfAttention.q.weight",),
                                      absent=("encoder.block.24.layer.0.SelfAttention.q.weight",),
                                      shapes=(("shared.weight", 1, 4096),))),),
        optional=("encoder.embed_tokens.weight",),
    ),
    Standalone(
        "t5xxl", "T5-XXL", TEXT_ENCODER, "flux", ("sd3", "flux", "chroma"),
        detect=(Rule(keys=_T5_KEYS, absent=(_T5_BIAS.format(1),),
                     evidence=("T5 v1.1 encoder blocks (gated GELU wi_0/wi_1, a relative "
                               "attention bias in the first layer only): T5-XXL family",)),),
        table=_t5_table(4096, 24, bias_every_layer=False),
        variants=(Variant("xxl", Rule(keys=("encoder.block.23.layer.0.SelfAttention.q.weight",),
                                      absent=("encoder.block.24.layer.0.SelfAttention.q.weight",),
                                      shapes=(("shared.weight", 1, 4096),))),),
        optional=("encoder.embed_tokens.weight",),
    ),
    Standalone(
        "qwen25vl", "Qwen2.5-VL", TEXT_ENCODER, "qwen_image", ("qwen_image",),
        detect=(Rule(keys=(_QWEN_TOKENS, _QWEN_K_BIAS, "model.layers.0.mlp.gate_proj.weight"),
                     absent=("model.layers.0.self_attn.q_norm.weight",),
                     evidence=("model.layers with q/k/v biases and no q_norm: Qwen2.5 "
                               "language model (Qwen-Image's text encoder)",)),),
        table=_qwen_table,
        variants=(Variant("7b", Rule(keys=("model.layers.27.mlp.gate_proj.weight",),
                                     absent=("model.layers.28.mlp.gate_proj.weight",),
                                     shapes=((_QWEN_TOKENS, 1, 3584), (_QWEN_K_BIAS, 0, 512)))),),
        optional=("visual.", "lm_head.weight"),
        notes=("the vision tower (visual.*) is optional: Qwen-Image reads the text model, "
               "Qwen-Image-Edit the image too",),
    ),
    Standalone(
        "qwen3", "Qwen3", TEXT_ENCODER, "z_image", ("z_image",),
        detect=(Rule(keys=(_QWEN_TOKENS, _QWEN3_Q_NORM, "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.mlp.gate_proj.weight"),
                     absent=(_QWEN_K_BIAS,),
                     evidence=("model.layers with query/key norms and no q/k/v biases: Qwen3 "
                               "language model (Z-Image's text encoder)",)),),
        table=_qwen3_table,
        variants=(Variant("4b", Rule(keys=("model.layers.35.mlp.gate_proj.weight",),
                                     absent=("model.layers.36.mlp.gate_proj.weight",),
                                     shapes=((_QWEN_TOKENS, 1, 2560),))),),
        optional=("lm_head.weight",),
    ),
    Standalone(
        "mistral3", "Mistral Small 3.1", TEXT_ENCODER, "flux2", ("flux2",),
        detect=(Rule(keys=(_QWEN_TOKENS, "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.mlp.gate_proj.weight"),
                     absent=(_QWEN_K_BIAS, _QWEN3_Q_NORM),
                     shapes=((_QWEN_TOKENS, 0, _MISTRAL_VOCAB), (_QWEN_TOKENS, 1, _MISTRAL_WIDTH)),
                     evidence=("a Llama-style language model with a 131072 x 5120 token "
                               "embedding: Mistral Small 3.1 (Flux.2's text encoder)",)),),
        table=_mistral_table,
        variants=(Variant("24b", Rule(keys=("model.layers.39.mlp.gate_proj.weight",),
                                      absent=("model.layers.40.mlp.gate_proj.weight",))),),
        optional=("lm_head.weight", "model.vision_tower.", "model.multi_modal_projector.",
                  "vision_tower.", "multi_modal_projector."),
    ),
    Standalone(
        "wan22_vae", "Wan 2.2 VAE", VAE, "wan", ("wan",),
        detect=(Rule(keys=(_WAN21_MARK, _WAN22_MARK, "encoder.conv1.weight"),
                     evidence=("3-D causal VAE with nested decoder upsample blocks: Wan 2.2 "
                               "VAE (48 latent channels, 16x spatial)",)),
                Rule(keys=(_WAN_DIFFUSERS, "decoder.conv_in.weight"),
                     shapes=(("decoder.conv_in.weight", 1, 48),),
                     evidence=("3-D causal VAE with 48 latent channels: Wan 2.2 VAE "
                               "(diffusers' AutoencoderKLWan names)",))),
        table=_wan22_table,
        layout_rules=((DIFFUSERS, Rule(keys=(_WAN_DIFFUSERS,))),),
    ),
    Standalone(
        "wan21_vae", "Wan 2.1 VAE", VAE, "wan", ("wan", "qwen_image"),
        detect=(Rule(keys=(_WAN21_MARK, "encoder.conv1.weight", "decoder.conv1.weight"),
                     absent=(_WAN22_MARK,),
                     evidence=("3-D causal VAE (5-D encoder.conv1): Wan 2.1 VAE "
                               "(16 latent channels; Qwen-Image's VAE has its layout)",)),
                Rule(keys=(_WAN_DIFFUSERS, "decoder.conv_in.weight"),
                     shapes=(("decoder.conv_in.weight", 1, 16),),
                     evidence=("3-D causal VAE with 16 latent channels: Wan 2.1 VAE "
                               "(diffusers' AutoencoderKLWan names)",))),
        table=_wan21_table,
        layout_rules=((DIFFUSERS, Rule(keys=(_WAN_DIFFUSERS,))),),
    ),
    Standalone(
        "ae16", "Flux.1/SD3 VAE (16 channels)", VAE, "flux", ("flux", "sd3", "chroma",
                                                             "z_image"),
        detect=(Rule(keys=("encoder.conv_in.weight", "decoder.conv_in.weight",
                           "encoder.down.0.block.0.conv1.weight"),
                     shapes=(("decoder.conv_in.weight", 1, 16),),
                     evidence=("KL-f8 VAE with 16 latent channels: the Flux.1 autoencoder "
                               "and SD3's VAE share keys and shapes",)),
                Rule(keys=("encoder.conv_in.weight", "decoder.conv_in.weight",
                           _KL_DIFFUSERS),
                     shapes=(("decoder.conv_in.weight", 1, 16),),
                     evidence=("KL-f8 VAE with 16 latent channels in diffusers' "
                               "AutoencoderKL names: the Flux.1 or SD3 VAE",))),
        table=_ae_table,
        layout_rules=((DIFFUSERS, Rule(keys=(_KL_DIFFUSERS,))),),
    ),
    # Flux.2's VAE (diffusers' AutoencoderKLFlux2: 32 latent channels and a
    # BatchNorm over the 2x2-patchified latents): named, not checked (no table yet)
    Standalone(
        "flux2_vae", "Flux.2 VAE (32 channels)", VAE, "flux2", ("flux2",),
        detect=(Rule(keys=("encoder.conv_in.weight", "decoder.conv_in.weight"),
                     shapes=(("decoder.conv_in.weight", 1, 32),),
                     evidence=("KL-f8 VAE with 32 latent channels: the Flux.2 VAE",)),),
        table=_unchecked,
        layout_rules=((DIFFUSERS, Rule(keys=(_KL_DIFFUSERS,))),),
        optional=("bn.",),
    ),
)

BY_NAME = {s.name: s for s in STANDALONE}


@dataclass(frozen=True)
class Match:
    """A recognised standalone component."""

    entry: Standalone
    prefix: str  # stripped from every key
    variant: str | None
    evidence: tuple[str, ...]
    keys: Mapping[str, Shape]  # the component's keys, relative, in the table's names
    layout: str = ORIGINAL


def common_prefix(keys: Mapping[str, Shape]) -> str:
    """The :data:`STRIP_PREFIXES` entry every key carries, or ``""``."""
    for p in STRIP_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


# transformers 5 saves Qwen2.5-VL under model.language_model. and
# model.visual.; ComfyUI's and the released files use model. and visual.
RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _renamed(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# llama.cpp's names in GGUF text encoders -> the original ones, replaced in
# order in every key, as city96/ComfyUI-GGUF's loader.py (T5_SD_MAP,
# LLAMA_SD_MAP) does before ComfyUI loads them
GGUF_T5_NAMES = (("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
                 ("output_norm", "final_layer_norm"),
                 ("attn_q", "layer.0.SelfAttention.q"), ("attn_k", "layer.0.SelfAttention.k"),
                 ("attn_v", "layer.0.SelfAttention.v"), ("attn_o", "layer.0.SelfAttention.o"),
                 ("attn_norm", "layer.0.layer_norm"),
                 ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
                 ("ffn_up", "layer.1.DenseReluDense.wi_1"),
                 ("ffn_down", "layer.1.DenseReluDense.wo"),
                 ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_norm", "layer.1.layer_norm"))
GGUF_LLAMA_NAMES = (("blk.", "model.layers."), ("attn_norm", "input_layernorm"),
                    ("attn_q_norm.", "self_attn.q_norm."), ("attn_k_norm.", "self_attn.k_norm."),
                    ("attn_v_norm.", "self_attn.v_norm."), ("attn_q", "self_attn.q_proj"),
                    ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                    ("attn_output", "self_attn.o_proj"), ("ffn_up", "mlp.up_proj"),
                    ("ffn_down", "mlp.down_proj"), ("ffn_gate", "mlp.gate_proj"),
                    ("ffn_norm", "post_attention_layernorm"),
                    ("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"),
                    ("output.weight", "lm_head.weight"))


def _gguf_names(keys: Mapping[str, Shape]) -> Mapping[str, Shape]:
    """``keys`` in the original names when they are llama.cpp's (a GGUF text
    encoder: ``token_embd.weight``), else themselves."""
    if "token_embd.weight" not in keys:
        return keys
    table = GGUF_T5_NAMES if any(k.startswith("enc.") for k in keys) else GGUF_LLAMA_NAMES
    out = {}
    for key, shape in keys.items():
        for old, new in table:
            key = key.replace(old, new)
        out[key] = shape
    return out


def recognise(keys: Mapping[str, Shape]) -> Match | None:
    """The standalone text encoder or VAE ``keys`` hold, or None (keys in
    the original names, transformers 5's, or llama.cpp's of a GGUF file)."""
    keys = _gguf_names(keys)
    prefix = common_prefix(keys)
    inner = {_renamed(k[len(prefix):]): s for k, s in keys.items()}
    for entry in STANDALONE:
        rule = next((r for r in entry.detect if r.holds(inner)), None)
        if rule is None:
            continue
        variant = next((v.name for v in entry.variants if v.rule.holds(inner)), None)
        layout = next((n for n, r in entry.layout_rules if r.holds(inner)), ORIGINAL)
        return Match(entry, prefix, variant, tuple(rule.explain({})), inner, layout)
    return None


def is_optional(entry: Standalone, key: str) -> bool:
    """Whether ``key`` (relative) may be present or absent in ``entry``'s files."""
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in entry.optional)
