"""The block math of verify's streamed functional probe: one function per
block kind (:mod:`modelkit.arch.probes`), written from the original model
code, each run on seeded activations with the weights of one block.

A block function takes a :class:`Weights` (the block's tensors, fetched
from the file one at a time, as float32, and dropped after use: memory is
one weight plus the activations) and the inputs :func:`make_inputs` built
from the *reference's* shapes, and returns its outputs flattened into one
vector; a residual block returns the update it adds to its stream(s)
(output minus input): the stream itself is the same for both files and
would hide a broken attention (tests/test_verify_probe.py: a q/k swap).
Positional embeddings (RoPE), dropout and attention masks other than
CLIP's causal one are left out: they carry no weights, and both files go
through the same math.

Sources, by kind (the forward passes, read for the order of operations):

* Flux.1: black-forest-labs/flux ``src/flux/modules/layers.py``
  (``DoubleStreamBlock``, ``SingleStreamBlock``, ``LastLayer``,
  ``MLPEmbedder``, ``QKNorm``).
* Chroma: comfyanonymous/ComfyUI ``comfy/ldm/chroma/layers.py``
  (``Approximator``, ``DoubleStreamBlock``, ``SingleStreamBlock``: Flux.1's
  blocks fed the approximator's shift/scale/gate).
* Flux.2: huggingface/diffusers ``src/diffusers/models/transformers/
  transformer_flux2.py`` (``Flux2TransformerBlock``,
  ``Flux2SingleTransformerBlock``, ``Flux2SwiGLU``, ``Flux2Modulation``).
* Z-Image: huggingface/diffusers ``src/diffusers/models/transformers/
  transformer_z_image.py`` (``ZImageTransformerBlock``, ``FeedForward``,
  ``FinalLayer``; the original layout's fused ``attention.qkv``).
* SD3: Stability-AI/sd3-ref ``mmditx.py`` / comfyanonymous/ComfyUI
  ``comfy/ldm/modules/diffusionmodules/mmdit.py`` (``JointBlock``,
  ``DismantledBlock``, ``FinalLayer``).
* Qwen-Image: huggingface/diffusers
  ``src/diffusers/models/transformers/transformer_qwenimage.py``
  (``QwenImageTransformerBlock``, ``QwenDoubleStreamAttnProcessor2_0``).
* Wan: Wan-Video/Wan2.1 ``wan/modules/model.py`` (``WanAttentionBlock``,
  ``WanT2VCrossAttention``, ``WanI2VCrossAttention``).
* SD UNet: CompVis/stable-diffusion ``ldm/modules/diffusionmodules/
  openaimodel.py`` (``ResBlock``, ``Downsample``, ``Upsample``) and
  ``ldm/modules/attention.py`` (``SpatialTransformer``,
  ``BasicTransformerBlock``, ``GEGLU``).
* VAE: the same repository's ``ldm/modules/diffusionmodules/model.py``
  (``Encoder``, ``Decoder``, ``ResnetBlock``, ``AttnBlock``).
* Text encoders: huggingface/transformers ``models/clip/modeling_clip.py``
  (``CLIPEncoderLayer``), mlfoundations/open_clip ``src/open_clip/
  transformer.py`` (``ResidualAttentionBlock``), transformers
  ``models/t5/modeling_t5.py`` (``T5Block``, gated-GELU feed-forward).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from modelkit.arch import probes as kinds

if TYPE_CHECKING:
    import torch

    from modelkit.arch.probes import ProbeGroup
    from modelkit.io.source import Source

Shape = tuple[int, ...]
Inputs = dict[str, "torch.Tensor"]


class Weights:
    """The tensors of one block of one file, by name relative to the block
    (``img_attn.qkv.weight``), read on demand as float32."""

    def __init__(self, source: Source, prefix: str, shapes: Mapping[str, Shape]) -> None:
        self.source, self.prefix, self.shapes = source, prefix, shapes

    def __call__(self, name: str) -> torch.Tensor:
        import torch

        return self.source.get(self.prefix + name).to(torch.float32)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> Shape:
        return self.shapes[name]

    def numbered(self, pattern: str) -> list[int]:
        """The numbers N of keys matching ``pattern`` (a regex with one group)."""
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.shapes if (m := rx.match(k))})


# --- shared pieces -------------------------------------------------------------------


def _lin(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    dot = f"{name}." if name else ""
    weight = w(f"{dot}weight")
    if weight.dim() == 4:  # a 1x1 convolution used as a linear layer
        weight = weight.flatten(1)
    bias = w(f"{dot}bias") if w.has(f"{dot}bias") else None
    return F.linear(x, weight, bias)


def _ln(x: torch.Tensor, w: Weights | None = None, name: str = "", eps: float = 1e-6
        ) -> torch.Tensor:
    import torch.nn.functional as F

    if w is None:
        return F.layer_norm(x, (x.shape[-1],), eps=eps)
    return F.layer_norm(x, (x.shape[-1],), w(f"{name}.weight"), w(f"{name}.bias"), eps)


def _rms(x: torch.Tensor, scale: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    import torch

    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if scale is None else y * scale


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, c // head_dim, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
          scale: float | None = None) -> torch.Tensor:
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _head_dim(group: ProbeGroup, width: int) -> int:
    """Channels a head: the group's (``head_dim`` or ``heads``), at most the width
    (tiny test copies are narrower than one real head)."""
    heads = group.option("heads")
    if isinstance(heads, int):
        return max(1, width // heads)
    hd = group.option("head_dim", 64)
    assert isinstance(hd, int)
    return hd if width % hd == 0 else width


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


def _act(name: object) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch
    import torch.nn.functional as F

    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return _gelu_tanh
    if name == "gelu":
        return F.gelu
    return F.silu


def _flat(*xs: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([x.reshape(-1) for x in xs])


# --- inputs ------------------------------------------------------------------------------


def make_inputs(group: ProbeGroup, w: Weights, seed: int) -> Inputs:
    """Seeded activations of the right shapes for ``group``'s kind, widths
    read from the block's (reference) weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    n, nt, kind = group.tokens, group.text_tokens, group.kind
    if kind == kinds.LINEAR:
        return {"x": randn(1, n, w.shape("weight")[1])}
    if kind == kinds.MLP_EMBEDDER:
        first = _embedder_names(group)[0]
        return {"x": randn(1, w.shape(f"{first}.weight")[1])}
    if kind == kinds.FLUX_DOUBLE:
        h = w.shape("img_mod.lin.weight")[1]
        return {"img": randn(1, n, h), "txt": randn(1, nt, h), "vec": randn(1, h)}
    if kind == kinds.FLUX_SINGLE:
        h = w.shape("modulation.lin.weight")[1]
        return {"x": randn(1, n + nt, h), "vec": randn(1, h)}
    if kind in (kinds.CHROMA_DOUBLE, kinds.FLUX2_DOUBLE):
        h = w.shape("img_attn.qkv.weight")[1]
        # shift/scale/gate of both streams, as the shared layers give them
        return {"img": randn(1, n, h), "txt": randn(1, nt, h),
                "mod_img": 0.5 * randn(1, 1, 6 * h), "mod_txt": 0.5 * randn(1, 1, 6 * h)}
    if kind in (kinds.CHROMA_SINGLE, kinds.FLUX2_SINGLE):
        h = w.shape("linear1.weight")[1]
        return {"x": randn(1, n + nt, h), "mod": 0.5 * randn(1, 1, 3 * h)}
    if kind == kinds.CHROMA_APPROXIMATOR:
        return {"x": randn(1, n, w.shape("in_proj.weight")[1])}
    if kind == kinds.RMS_LINEAR:
        return {"x": randn(1, n, w.shape("1.weight")[1])}
    if kind == kinds.Z_IMAGE_LAYER:
        d = w.shape("attention.qkv.weight")[1]
        t = w.shape("adaLN_modulation.0.weight")[1] if w.has("adaLN_modulation.0.weight") else 1
        return {"x": randn(1, n, d), "adaln": randn(1, t)}
    if kind == kinds.Z_IMAGE_FINAL:
        return {"x": randn(1, n, w.shape("linear.weight")[1]),
                "c": randn(1, w.shape("adaLN_modulation.1.weight")[1])}
    if kind == kinds.FLUX_FINAL:
        h = w.shape("adaLN_modulation.1.weight")[1]
        return {"x": randn(1, n, h), "vec": randn(1, h)}
    if kind == kinds.SD3_JOINT:
        h = w.shape("x_block.adaLN_modulation.1.weight")[1]
        return {"x": randn(1, n, h), "context": randn(1, nt, h), "c": randn(1, h)}
    if kind == kinds.QWEN_BLOCK:
        h = w.shape("img_mod.1.weight")[1]
        return {"img": randn(1, n, h), "txt": randn(1, nt, h), "temb": randn(1, h)}
    if kind == kinds.WAN_BLOCK:
        d = w.shape("modulation")[-1]
        ctx = nt + (257 if w.has("cross_attn.k_img.weight") else 0)
        return {"x": randn(1, n, d), "context": randn(1, ctx, d), "e": randn(1, 6, d)}
    if kind == kinds.LDM_BLOCK:
        return _ldm_inputs(group, w, randn)
    if kind == kinds.VAE_ENCODER:
        return {"x": randn(1, w.shape("conv_in.weight")[1], n, n)}
    if kind == kinds.VAE_DECODER:
        return {"z": randn(1, w.shape("conv_in.weight")[1], n, n)}
    if kind in (kinds.CLIP_LAYER, kinds.OPEN_CLIP_LAYER):
        name = "layer_norm1.weight" if kind == kinds.CLIP_LAYER else "ln_1.weight"
        return {"x": randn(1, n, w.shape(name)[0])}
    if kind == kinds.T5_LAYER:
        return {"x": randn(1, n, w.shape("layer.0.layer_norm.weight")[0])}
    raise ValueError(f"no probe inputs for block kind {kind!r}")


def _ldm_inputs(group: ProbeGroup, w: Weights, randn: Callable[..., torch.Tensor]) -> Inputs:
    side = group.tokens
    first = min(int(k.split(".", 1)[0]) for k in w.shapes if k.split(".", 1)[0].isdigit())
    p = f"{first}."
    if w.has(p + "in_layers.0.weight"):
        ch = w.shape(p + "in_layers.0.weight")[0]
    elif w.has(p + "op.weight"):
        ch = w.shape(p + "op.weight")[1]
    elif w.has(p + "conv.weight"):
        ch = w.shape(p + "conv.weight")[1]
    else:  # input_blocks.0: the UNet's conv_in
        ch = w.shape(p + "weight")[1]
    emb = next((s[1] for k, s in w.shapes.items() if k.endswith("emb_layers.1.weight")), 4)
    ctx = next((s[1] for k, s in w.shapes.items() if k.endswith("attn2.to_k.weight")), 8)
    return {"x": randn(1, ch, side, side), "emb": randn(1, emb),
            "context": randn(1, group.text_tokens, ctx)}


def _embedder_names(group: ProbeGroup) -> tuple[str, str]:
    names = str(group.option("names", "in_layer,out_layer")).split(",")
    return names[0], names[1]


# --- transformers ---------------------------------------------------------------------


def linear(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """One Linear layer."""
    return _flat(_lin(w, "", x["x"]))


def mlp_embedder(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Linear, activation (SiLU; Wan's text embedder: tanh GELU), Linear."""
    first, second = _embedder_names(group)
    act = _act(group.option("act", "silu"))
    return _flat(_lin(w, second, act(_lin(w, first, x["x"]))))


def _flux_qkv(w: Weights, s: str, x: torch.Tensor, hd: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_heads(t, hd) for t in _lin(w, f"{s}.qkv", x).chunk(3, -1))
    return (_rms(q, w(f"{s}.norm.query_norm.scale")), _rms(k, w(f"{s}.norm.key_norm.scale")), v)


def flux_double(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """BFL ``DoubleStreamBlock``: modulated image and text streams, joint
    attention (text first), gated residual attention and MLP."""
    import torch.nn.functional as F

    mods = {s: _lin(w, f"{s}_mod.lin", F.silu(x["vec"]))[:, None, :].chunk(6, -1)
            for s in ("img", "txt")}
    return _bfl_double(w, x["img"], x["txt"], mods, group, _gelu_tanh)


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    a, b = x.chunk(2, -1)
    return F.silu(a) * b


def _given_mods(x: Inputs) -> dict[str, tuple[torch.Tensor, ...]]:
    return {s: x[f"mod_{s}"].chunk(6, -1) for s in ("img", "txt")}


def chroma_double(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Chroma's ``DoubleStreamBlock``: Flux.1's, its shift/scale/gate given
    (Chroma computes them for every block at once in the guidance
    approximator, so the probe feeds seeded ones)."""
    return _bfl_double(w, x["img"], x["txt"], _given_mods(x), group, _gelu_tanh)


def flux2_double(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Flux.2's ``DoubleStreamBlock``: Flux.1's without biases, a SwiGLU
    MLP, its shift/scale/gate given (the shared
    ``double_stream_modulation_img/txt`` layers, probed on their own)."""
    return _bfl_double(w, x["img"], x["txt"], _given_mods(x), group, _swiglu)


def _bfl_double(w: Weights, img: torch.Tensor, txt: torch.Tensor,
                mods: dict[str, tuple[torch.Tensor, ...]], group: ProbeGroup,
                act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    hd = _head_dim(group, img.shape[-1])
    streams = {"img": img, "txt": txt}
    qkv = {s: _flux_qkv(w, f"{s}_attn", (1 + m[1]) * _ln(streams[s]) + m[0], hd)
           for s, m in mods.items()}
    attn = _merge(_sdpa(*(torch_cat((qkv["txt"][i], qkv["img"][i]), 2) for i in range(3))))
    split = {"txt": attn[:, :txt.shape[1]], "img": attn[:, txt.shape[1]:]}
    out = []
    for s in ("img", "txt"):
        m, h = mods[s], streams[s]
        h = h + m[2] * _lin(w, f"{s}_attn.proj", split[s])
        mlp_in = (1 + m[4]) * _ln(h) + m[3]
        h = h + m[5] * _lin(w, f"{s}_mlp.2", act(_lin(w, f"{s}_mlp.0", mlp_in)))
        out.append(h - streams[s])
    return _flat(*out)


def torch_cat(xs: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """``torch.cat`` (imported here, not at module level)."""
    import torch

    return torch.cat(xs, dim)


def flux_single(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """BFL ``SingleStreamBlock``: fused qkv + MLP input (``linear1``),
    attention, fused output (``linear2``), gated residual."""
    import torch.nn.functional as F

    mod = _lin(w, "modulation.lin", F.silu(x["vec"]))[:, None, :].chunk(3, -1)
    return _bfl_single(w, x["x"], mod, group, _gelu_tanh)


def chroma_single(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Chroma's ``SingleStreamBlock``: Flux.1's with given shift/scale/gate."""
    return _bfl_single(w, x["x"], x["mod"].chunk(3, -1), group, _gelu_tanh)


def flux2_single(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Flux.2's ``SingleStreamBlock``: SwiGLU MLP (``linear1`` yields twice
    the MLP width), given shift/scale/gate (``single_stream_modulation``)."""
    return _bfl_single(w, x["x"], x["mod"].chunk(3, -1), group, _swiglu)


def _bfl_single(w: Weights, h: torch.Tensor, mod: tuple[torch.Tensor, ...],
                group: ProbeGroup, act: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
    width = h.shape[-1]
    hd = _head_dim(group, width)
    shift, scale, gate = mod
    y = _lin(w, "linear1", (1 + scale) * _ln(h) + shift)
    qkv, mlp = y[..., :3 * width], y[..., 3 * width:]
    q, k, v = (_heads(t, hd) for t in qkv.chunk(3, -1))
    q, k = _rms(q, w("norm.query_norm.scale")), _rms(k, w("norm.key_norm.scale"))
    attn = _merge(_sdpa(q, k, v))
    return _flat(gate * _lin(w, "linear2", torch_cat((attn, act(mlp)), 2)))


def chroma_approximator(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Chroma's ``Approximator`` (``distilled_guidance_layer``): in_proj, n
    residual RMS-normed SiLU MLPs, out_proj: the modulation of every block."""
    import torch.nn.functional as F

    h = _lin(w, "in_proj", x["x"])
    for i in w.numbered(r"layers\.(\d+)\."):
        y = _rms(h, w(f"norms.{i}.scale"))
        h = h + _lin(w, f"layers.{i}.out_layer", F.silu(_lin(w, f"layers.{i}.in_layer", y)))
    return _flat(_lin(w, "out_proj", h))


def final_layer(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """BFL ``LastLayer`` (SD3's ``FinalLayer`` is the same): adaLN shift and
    scale, LayerNorm, Linear."""
    import torch.nn.functional as F

    shift, scale = _lin(w, "adaLN_modulation.1", F.silu(x["vec"]))[:, None, :].chunk(2, -1)
    return _flat(_lin(w, "linear", (1 + scale) * _ln(x["x"]) + shift))


def _sd3_qkv(w: Weights, p: str, x: torch.Tensor, hd: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_heads(t, hd) for t in _lin(w, f"{p}.qkv", x).chunk(3, -1))
    if w.has(f"{p}.ln_q.weight"):  # SD3.5's RMS q/k norms
        q, k = _rms(q, w(f"{p}.ln_q.weight")), _rms(k, w(f"{p}.ln_k.weight"))
    return q, k, v


def sd3_joint(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """SD3 ``JointBlock``: context and x ``DismantledBlock`` s, joint
    attention (context first); the last context block is pre-only; SD3.5-
    medium's x blocks add a second self-attention (``attn2``)."""
    import torch.nn.functional as F

    h, ctx, c = x["x"], x["context"], x["c"]
    hd = _head_dim(group, h.shape[-1])
    pre_only = not w.has("context_block.attn.proj.weight")
    cm = _lin(w, "context_block.adaLN_modulation.1", F.silu(c))[:, None, :].chunk(
        2 if pre_only else 6, -1)
    xm = _lin(w, "x_block.adaLN_modulation.1", F.silu(c))[:, None, :]
    xm_chunks = xm.chunk(xm.shape[-1] // h.shape[-1], -1)
    cq = _sd3_qkv(w, "context_block.attn", _ln(ctx) * (1 + cm[1]) + cm[0], hd)
    x_norm = _ln(h)
    xq = _sd3_qkv(w, "x_block.attn", x_norm * (1 + xm_chunks[1]) + xm_chunks[0], hd)
    attn = _merge(_sdpa(*(torch_cat((cq[i], xq[i]), 2) for i in range(3))))
    c_attn, x_attn = attn[:, :ctx.shape[1]], attn[:, ctx.shape[1]:]
    attn2 = None
    if len(xm_chunks) == 9:  # SD3.5-medium: self-attention only on x, before the MLP
        q2 = _sd3_qkv(w, "x_block.attn2", x_norm * (1 + xm_chunks[7]) + xm_chunks[6], hd)
        attn2 = _merge(_sdpa(*q2))
    out = [_sd3_post(w, "x_block", h, x_attn, xm_chunks, attn2) - h]
    if not pre_only:
        out.append(_sd3_post(w, "context_block", ctx, c_attn, cm) - ctx)
    return _flat(*out)


def _sd3_post(w: Weights, p: str, h: torch.Tensor, attn: torch.Tensor,
              m: tuple[torch.Tensor, ...], attn2: torch.Tensor | None = None) -> torch.Tensor:
    h = h + m[2] * _lin(w, f"{p}.attn.proj", attn)
    if attn2 is not None:
        h = h + m[8] * _lin(w, f"{p}.attn2.proj", attn2)
    mlp_in = _ln(h) * (1 + m[4]) + m[3]
    return h + m[5] * _lin(w, f"{p}.mlp.fc2", _gelu_tanh(_lin(w, f"{p}.mlp.fc1", mlp_in)))


def qwen_block(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """diffusers' ``QwenImageTransformerBlock``: per-stream modulation (two
    sets of shift/scale/gate), joint attention (text first) with RMS q/k
    norms, gated residual attention and GELU MLPs."""
    import torch.nn.functional as F

    img, txt, temb = x["img"], x["txt"], x["temb"]
    hd = _head_dim(group, img.shape[-1])
    mods = {s: _lin(w, f"{s}_mod.1", F.silu(temb))[:, None, :].chunk(6, -1)
            for s in ("img", "txt")}
    streams = {"img": img, "txt": txt}
    names = {"img": ("to_q", "to_k", "to_v", "norm_q", "norm_k"),
             "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q",
                     "norm_added_k")}
    qkv = {}
    for s, (pq, pk, pv, nq, nk) in names.items():
        m = mods[s]
        hm = _ln(streams[s]) * (1 + m[1]) + m[0]
        q, k, v = (_heads(_lin(w, f"attn.{p}", hm), hd) for p in (pq, pk, pv))
        qkv[s] = (_rms(q, w(f"attn.{nq}.weight")), _rms(k, w(f"attn.{nk}.weight")), v)
    attn = _merge(_sdpa(*(torch_cat((qkv["txt"][i], qkv["img"][i]), 2) for i in range(3))))
    split = {"txt": attn[:, :txt.shape[1]], "img": attn[:, txt.shape[1]:]}
    out = []
    for s, proj in (("img", "attn.to_out.0"), ("txt", "attn.to_add_out")):
        m, h = mods[s], streams[s]
        h = h + m[2] * _lin(w, proj, split[s])
        mlp_in = _ln(h) * (1 + m[4]) + m[3]
        h = h + m[5] * _lin(w, f"{s}_mlp.net.2",
                            _gelu_tanh(_lin(w, f"{s}_mlp.net.0.proj", mlp_in)))
        out.append(h - streams[s])
    return _flat(*out)


def _wan_attn(w: Weights, p: str, q_in: torch.Tensor, kv_in: torch.Tensor, hd: int,
              k: str = "k", v: str = "v", norm_k: str = "norm_k") -> torch.Tensor:
    q = _heads(_rms(_lin(w, f"{p}.q", q_in), w(f"{p}.norm_q.weight")), hd)
    kk = _heads(_rms(_lin(w, f"{p}.{k}", kv_in), w(f"{p}.{norm_k}.weight")), hd)
    return _merge(_sdpa(q, kk, _heads(_lin(w, f"{p}.{v}", kv_in), hd)))


def wan_block(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Wan's ``WanAttentionBlock``: modulated self-attention with RMS q/k
    norms over the full width, cross-attention on the text (and, image-to-
    video, on 257 image tokens), modulated GELU feed-forward."""
    h = h0 = x["x"]
    ctx = x["context"]
    hd = _head_dim(group, h.shape[-1])
    e = (w("modulation") + x["e"]).chunk(6, dim=1)
    y = _wan_attn(w, "self_attn", _ln(h) * (1 + e[1]) + e[0], _ln(h) * (1 + e[1]) + e[0], hd)
    h = h + _lin(w, "self_attn.o", y) * e[2]
    q_in = _ln(h, w, "norm3")
    if w.has("cross_attn.k_img.weight"):
        img_ctx, ctx = ctx[:, :257], ctx[:, 257:]
        cross = _wan_attn(w, "cross_attn", q_in, ctx, hd) + _wan_attn(
            w, "cross_attn", q_in, img_ctx, hd, "k_img", "v_img", "norm_k_img")
    else:
        cross = _wan_attn(w, "cross_attn", q_in, ctx, hd)
    h = h + _lin(w, "cross_attn.o", cross)
    y = _lin(w, "ffn.2", _gelu_tanh(_lin(w, "ffn.0", _ln(h) * (1 + e[4]) + e[3])))
    return _flat(h + y * e[5] - h0)


def rms_linear(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """RMSNorm then Linear (Z-Image's ``cap_embedder``: ``0`` the norm, ``1``
    the Linear; eps 1e-5)."""
    return _flat(_lin(w, "1", _rms(x["x"], w("0.weight"), 1e-5)))


def z_image_layer(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Z-Image's ``ZImageTransformerBlock`` (Lumina-2's ``JointTransformerBlock``):
    sandwich RMS norms around fused-qkv self-attention (RMS q/k norms) and a
    SwiGLU feed-forward (``w2(silu(w1 x) * w3 x)``); with ``adaLN_modulation``
    (layers, noise refiner) scaled inputs and tanh gates, without it (context
    refiner) plain residuals."""
    import torch

    h = h0 = x["x"]
    hd = _head_dim(group, h.shape[-1])
    one = torch.ones(1)
    scale_a = scale_f = gate_a = gate_f = one
    if w.has("adaLN_modulation.0.weight"):
        mod = _lin(w, "adaLN_modulation.0", x["adaln"])[:, None, :].chunk(4, -1)
        scale_a, gate_a, scale_f, gate_f = 1 + mod[0], mod[1].tanh(), 1 + mod[2], mod[3].tanh()

    def norm(name: str, t: torch.Tensor) -> torch.Tensor:
        return _rms(t, w(f"{name}.weight"), 1e-5)

    q, k, v = (_heads(t, hd) for t in _lin(w, "attention.qkv", norm("attention_norm1", h)
                                             * scale_a).chunk(3, -1))
    q, k = _rms(q, w("attention.q_norm.weight"), 1e-5), _rms(k, w("attention.k_norm.weight"),
                                                             1e-5)
    h = h + gate_a * norm("attention_norm2", _lin(w, "attention.out", _merge(_sdpa(q, k, v))))
    f = norm("ffn_norm1", h) * scale_f
    ff = _lin(w, "feed_forward.w2", torch.nn.functional.silu(_lin(w, "feed_forward.w1", f))
              * _lin(w, "feed_forward.w3", f))
    return _flat(h + gate_f * norm("ffn_norm2", ff) - h0)


def z_image_final(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """Z-Image's ``FinalLayer``: LayerNorm scaled by ``1 + adaLN(silu(c))``
    (no shift), Linear."""
    import torch.nn.functional as F

    scale = 1 + _lin(w, "adaLN_modulation.1", F.silu(x["c"]))[:, None, :]
    return _flat(_lin(w, "linear", _ln(x["x"]) * scale))


# --- SD UNet ------------------------------------------------------------------------------


def _gn(w: Weights, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    import torch.nn.functional as F

    return F.group_norm(x, 32 if x.shape[1] % 32 == 0 else _groups(x.shape[1]),
                        w(f"{name}.weight"), w(f"{name}.bias"), eps)


def _groups(ch: int) -> int:
    # tiny test copies have fewer than 32 channels a group would need
    return next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0)


def _conv(w: Weights, name: str, x: torch.Tensor, stride: int = 1, padding: int = 1
          ) -> torch.Tensor:
    import torch.nn.functional as F

    return F.conv2d(x, w(f"{name}.weight"), w(f"{name}.bias"), stride, padding)


def _resblock(w: Weights, p: str, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    h = _conv(w, f"{p}.in_layers.2", F.silu(_gn(w, f"{p}.in_layers.0", x, 1e-5)))
    h = h + _lin(w, f"{p}.emb_layers.1", F.silu(emb))[:, :, None, None]
    h = _conv(w, f"{p}.out_layers.3", F.silu(_gn(w, f"{p}.out_layers.0", h, 1e-5)))
    skip = _conv(w, f"{p}.skip_connection", x, padding=0) \
        if w.has(f"{p}.skip_connection.weight") else x
    return skip + h


def _cross_attention(w: Weights, p: str, x: torch.Tensor, ctx: torch.Tensor, hd: int
                     ) -> torch.Tensor:
    q, k, v = (_heads(_lin(w, f"{p}.to_{n}", t), hd)
               for n, t in (("q", x), ("k", ctx), ("v", ctx)))
    return _lin(w, f"{p}.to_out.0", _merge(_sdpa(q, k, v)))


def _spatial_transformer(w: Weights, p: str, x: torch.Tensor, ctx: torch.Tensor,
                         group: ProbeGroup) -> torch.Tensor:
    import torch.nn.functional as F

    b, c, hh, ww = x.shape
    hd = _head_dim(group, c)
    linear = len(w.shape(f"{p}.proj_in.weight")) == 2
    h = _gn(w, f"{p}.norm", x, 1e-6)
    if not linear:
        h = _conv(w, f"{p}.proj_in", h, padding=0)
    h = h.flatten(2).transpose(1, 2)
    if linear:
        h = _lin(w, f"{p}.proj_in", h)
    for d in w.numbered(re.escape(p) + r"\.transformer_blocks\.(\d+)\."):
        t = f"{p}.transformer_blocks.{d}"
        h = h + _cross_attention(w, f"{t}.attn1", _ln(h, w, f"{t}.norm1", 1e-5),
                                 _ln(h, w, f"{t}.norm1", 1e-5), hd)
        h = h + _cross_attention(w, f"{t}.attn2", _ln(h, w, f"{t}.norm2", 1e-5), ctx, hd)
        a, gate = _lin(w, f"{t}.ff.net.0.proj", _ln(h, w, f"{t}.norm3", 1e-5)).chunk(2, -1)
        h = h + _lin(w, f"{t}.ff.net.2", a * F.gelu(gate))
    if linear:
        h = _lin(w, f"{p}.proj_out", h)
    h = h.transpose(1, 2).reshape(b, -1, hh, ww)
    if not linear:
        h = _conv(w, f"{p}.proj_out", h, padding=0)
    return h + x


def ldm_block(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """One LDM UNet ``TimestepEmbedSequential`` (``input_blocks.N``,
    ``middle_block``, ``output_blocks.N``): its res blocks, spatial
    transformers and down/upsamplers in order; ``input_blocks.0`` is the
    input convolution."""
    import torch.nn.functional as F

    h, emb, ctx = x["x"], x["emb"], x["context"]
    for i in w.numbered(r"(\d+)\."):
        p = str(i)
        if w.has(f"{p}.in_layers.0.weight"):
            h = _resblock(w, p, h, emb)
        elif w.has(f"{p}.proj_in.weight"):
            h = _spatial_transformer(w, p, h, ctx, group)
        elif w.has(f"{p}.op.weight"):
            h = _conv(w, f"{p}.op", h, stride=2)
        elif w.has(f"{p}.conv.weight"):
            h = _conv(w, f"{p}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
        else:
            h = _conv(w, p, h)
    return _flat(h)


# --- VAE ----------------------------------------------------------------------------------


def _vae_res(w: Weights, p: str, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    h = _conv(w, f"{p}.conv1", F.silu(_gn(w, f"{p}.norm1", x, 1e-6)))
    h = _conv(w, f"{p}.conv2", F.silu(_gn(w, f"{p}.norm2", h, 1e-6)))
    skip = _conv(w, f"{p}.nin_shortcut", x, padding=0) \
        if w.has(f"{p}.nin_shortcut.weight") else x
    return skip + h


def _vae_attn(w: Weights, p: str, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    h = _gn(w, f"{p}.norm", x, 1e-6).flatten(2).transpose(1, 2)[:, None]
    q, k, v = (_lin(w, f"{p}.{n}", h) for n in ("q", "k", "v"))
    out = _lin(w, f"{p}.proj_out", _sdpa(q, k, v)[:, 0])
    return x + out.transpose(1, 2).reshape(b, c, hh, ww)


def _vae_mid(w: Weights, h: torch.Tensor) -> torch.Tensor:
    h = _vae_res(w, "mid.block_1", h)
    return _vae_res(w, "mid.block_2", _vae_attn(w, "mid.attn_1", h))


def vae_encoder(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """The LDM ``Encoder``: input conv, res blocks and downsamplers (pad
    right/bottom, stride 2) per level, the middle block, norm and output."""
    import torch.nn.functional as F

    h = _conv(w, "conv_in", x["x"])
    for level in w.numbered(r"down\.(\d+)\."):
        for j in w.numbered(rf"down\.{level}\.block\.(\d+)\."):
            h = _vae_res(w, f"down.{level}.block.{j}", h)
        if w.has(f"down.{level}.downsample.conv.weight"):
            h = _conv(w, f"down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), 2, 0)
    h = _vae_mid(w, h)
    return _flat(_conv(w, "conv_out", F.silu(_gn(w, "norm_out", h, 1e-6))))


def vae_decoder(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """The LDM ``Decoder``: input conv, the middle block, res blocks and
    nearest-neighbour upsamplers from the deepest level up, norm and output."""
    import torch.nn.functional as F

    h = _vae_mid(w, _conv(w, "conv_in", x["z"]))
    for level in reversed(w.numbered(r"up\.(\d+)\.")):
        for j in w.numbered(rf"up\.{level}\.block\.(\d+)\."):
            h = _vae_res(w, f"up.{level}.block.{j}", h)
        if w.has(f"up.{level}.upsample.conv.weight"):
            h = _conv(w, f"up.{level}.upsample.conv",
                      F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _flat(_conv(w, "conv_out", F.silu(_gn(w, "norm_out", h, 1e-6))))


# --- text encoders ----------------------------------------------------------------------


def clip_layer(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """transformers' ``CLIPEncoderLayer``: pre-norm causal self-attention and
    MLP (quick GELU for OpenAI's CLIP-L, GELU for bigG), residuals."""
    h = h0 = x["x"]
    hd = _head_dim(group, h.shape[-1])
    a = _ln(h, w, "layer_norm1", 1e-5)
    q, k, v = (_heads(_lin(w, f"self_attn.{n}_proj", a), hd) for n in ("q", "k", "v"))
    h = h + _lin(w, "self_attn.out_proj", _merge(_sdpa(q, k, v, causal=True)))
    act = _act(group.option("act", "quick_gelu"))
    return _flat(h - h0 + _lin(w, "mlp.fc2",
                               act(_lin(w, "mlp.fc1", _ln(h, w, "layer_norm2", 1e-5)))))


def open_clip_layer(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock``: causal self-attention through
    a fused ``in_proj``, GELU MLP, pre-norm residuals."""
    import torch.nn.functional as F

    h = h0 = x["x"]
    hd = _head_dim(group, h.shape[-1])
    a = _ln(h, w, "ln_1", 1e-5)
    qkv = F.linear(a, w("attn.in_proj_weight"), w("attn.in_proj_bias"))
    q, k, v = (_heads(t, hd) for t in qkv.chunk(3, -1))
    h = h + _lin(w, "attn.out_proj", _merge(_sdpa(q, k, v, causal=True)))
    return _flat(h - h0 + _lin(w, "mlp.c_proj",
                               F.gelu(_lin(w, "mlp.c_fc", _ln(h, w, "ln_2", 1e-5)))))


def t5_layer(w: Weights, x: Inputs, group: ProbeGroup) -> torch.Tensor:
    """transformers' ``T5Block`` (encoder, v1.1): RMS-normed self-attention
    without score scaling (the relative position bias left out), gated-GELU
    feed-forward."""
    h = h0 = x["x"]
    a = _rms(h, w("layer.0.layer_norm.weight"))
    p = "layer.0.SelfAttention"
    hd = _head_dim(group, w.shape(f"{p}.q.weight")[0])
    q, k, v = (_heads(_lin(w, f"{p}.{n}", a), hd) for n in ("q", "k", "v"))
    h = h + _lin(w, f"{p}.o", _merge(_sdpa(q, k, v, scale=1.0)))
    f = _rms(h, w("layer.1.layer_norm.weight"))
    d = "layer.1.DenseReluDense"
    gated = _gelu_tanh(_lin(w, f"{d}.wi_0", f)) * _lin(w, f"{d}.wi_1", f)
    return _flat(h - h0 + _lin(w, f"{d}.wo", gated))


BLOCKS: dict[str, Callable[[Weights, Inputs, ProbeGroup], torch.Tensor]] = {
    kinds.LINEAR: linear, kinds.MLP_EMBEDDER: mlp_embedder,
    kinds.FLUX_DOUBLE: flux_double, kinds.FLUX_SINGLE: flux_single,
    kinds.FLUX_FINAL: final_layer, kinds.SD3_JOINT: sd3_joint,
    kinds.CHROMA_DOUBLE: chroma_double, kinds.CHROMA_SINGLE: chroma_single,
    kinds.CHROMA_APPROXIMATOR: chroma_approximator,
    kinds.FLUX2_DOUBLE: flux2_double, kinds.FLUX2_SINGLE: flux2_single,
    kinds.RMS_LINEAR: rms_linear, kinds.Z_IMAGE_LAYER: z_image_layer,
    kinds.Z_IMAGE_FINAL: z_image_final,
    kinds.QWEN_BLOCK: qwen_block, kinds.WAN_BLOCK: wan_block,
    kinds.LDM_BLOCK: ldm_block, kinds.VAE_ENCODER: vae_encoder,
    kinds.VAE_DECODER: vae_decoder, kinds.CLIP_LAYER: clip_layer,
    kinds.OPEN_CLIP_LAYER: open_clip_layer, kinds.T5_LAYER: t5_layer,
}
