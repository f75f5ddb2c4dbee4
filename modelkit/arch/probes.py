"""What the streamed functional probe of ``modelkit verify --probe`` runs,
per architecture: which keys form block N of each component, which block
math applies to it and how many tokens (or, for convolutional blocks, what
spatial side) its seeded input activations have. The widths of the
activations are read from the block's own weights, so one entry serves
every size of a family (full-size files and the tiny test copies).

Data only: the block math lives in :mod:`modelkit.verify.probe_blocks`,
keyed by :attr:`ProbeGroup.kind`. Importing this module does not import
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# block kinds (the math of each: modelkit/verify/probe_blocks.py)
LINEAR = "linear"  # one Linear: img_in, txt_in, x_embedder...
MLP_EMBEDDER = "mlp_embedder"  # Linear, SiLU, Linear (BFL MLPEmbedder, time/vector/guidance)
FLUX_DOUBLE = "flux_double"
FLUX_SINGLE = "flux_single"
FLUX_FINAL = "flux_final"  # adaLN final layer (BFL LastLayer; SD3's final_layer too)
SD3_JOINT = "sd3_joint"
CHROMA_DOUBLE = "chroma_double"  # Flux.1's double block, modulation given
CHROMA_SINGLE = "chroma_single"
CHROMA_APPROXIMATOR = "chroma_approximator"  # distilled_guidance_layer
FLUX2_DOUBLE = "flux2_double"  # SwiGLU, no biases, shared modulation given
FLUX2_SINGLE = "flux2_single"
RMS_LINEAR = "rms_linear"  # RMSNorm + Linear (Z-Image's cap_embedder)
Z_IMAGE_LAYER = "z_image_layer"  # layers, noise_refiner, context_refiner
Z_IMAGE_FINAL = "z_image_final"
QWEN_BLOCK = "qwen_block"
WAN_BLOCK = "wan_block"
LDM_BLOCK = "ldm_block"  # an LDM UNet TimestepEmbedSequential: res, transformer, up/down
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
CLIP_LAYER = "clip_layer"  # transformers' CLIPEncoderLayer
OPEN_CLIP_LAYER = "open_clip_layer"  # open_clip's ResidualAttentionBlock
T5_LAYER = "t5_layer"  # transformers' T5Block (encoder)

KINDS = (LINEAR, MLP_EMBEDDER, FLUX_DOUBLE, FLUX_SINGLE, FLUX_FINAL, SD3_JOINT, QWEN_BLOCK,
         CHROMA_DOUBLE, CHROMA_SINGLE, CHROMA_APPROXIMATOR, FLUX2_DOUBLE, FLUX2_SINGLE,
         RMS_LINEAR, Z_IMAGE_LAYER, Z_IMAGE_FINAL, WAN_BLOCK, LDM_BLOCK, VAE_ENCODER,
         VAE_DECODER, CLIP_LAYER, OPEN_CLIP_LAYER, T5_LAYER)


@dataclass(frozen=True)
class ProbeGroup:
    """Blocks of one kind in one component.

    ``pattern`` is the blocks' key prefix inside the component, with ``{n}``
    standing for the block number (``double_blocks.{n}``); without ``{n}`` it
    names one block. ``tokens`` is the image-token count (the spatial side
    for convolutional kinds), ``text_tokens`` the text-token count of the
    kinds that take both streams. ``options`` are per-kind switches as
    ``(name, value)`` pairs (``("heads", 8)``, ``("head_dim", 64)``,
    ``("act", "quick_gelu")``)."""

    component: str
    pattern: str
    kind: str
    tokens: int = 64
    text_tokens: int = 16
    options: tuple[tuple[str, object], ...] = ()

    def option(self, name: str, default: object = None) -> object:
        """The value of option ``name``."""
        return dict(self.options).get(name, default)


# --- per family -------------------------------------------------------------------

_VAE = (ProbeGroup("vae", "encoder", VAE_ENCODER, tokens=64),
        ProbeGroup("vae", "decoder", VAE_DECODER, tokens=8))


def _clip(component: str, layout: str) -> ProbeGroup:
    if layout == "open_clip":
        return ProbeGroup(component, "transformer.resblocks.{n}", OPEN_CLIP_LAYER,
                          tokens=77, options=(("head_dim", 64),))
    # OpenAI's CLIP-L uses quick_gelu (transformers' CLIPTextConfig hidden_act)
    return ProbeGroup(component, "text_model.encoder.layers.{n}", CLIP_LAYER, tokens=77,
                      options=(("head_dim", 64), ("act", "quick_gelu")))


def ldm(text_encoders: tuple[tuple[str, str], ...], *, heads: int | None,
        head_dim: int | None) -> tuple[ProbeGroup, ...]:
    """An SD1/SD2/SDXL checkpoint: the UNet's input, middle and output blocks
    (``heads`` fixed, as SD1's 8, or ``head_dim`` per head, as SD2's and
    SDXL's 64), the VAE encoder and decoder, and each text encoder's layers
    (``(component, layout)`` pairs; the component prefixes of
    :mod:`modelkit.arch.configs` end at ``transformer.`` or ``model.``)."""
    opts = (("heads", heads),) if heads else (("head_dim", head_dim),)
    unet = tuple(ProbeGroup("unet", p, LDM_BLOCK, tokens=16, text_tokens=77, options=opts)
                 for p in ("input_blocks.{n}", "middle_block", "output_blocks.{n}"))
    tes = tuple(_clip(c, layout) for c, layout in text_encoders)
    return unet + _VAE + tes


def flux() -> tuple[ProbeGroup, ...]:
    """Flux.1 (BFL layout): embedders, 19 double and 38 single blocks, the
    final layer, the 16-channel autoencoder, CLIP-L and T5-XXL layers."""
    t = "transformer"
    return (ProbeGroup(t, "img_in", LINEAR), ProbeGroup(t, "txt_in", LINEAR),
            ProbeGroup(t, "time_in", MLP_EMBEDDER), ProbeGroup(t, "vector_in", MLP_EMBEDDER),
            ProbeGroup(t, "guidance_in", MLP_EMBEDDER),
            ProbeGroup(t, "double_blocks.{n}", FLUX_DOUBLE, options=(("head_dim", 128),)),
            ProbeGroup(t, "single_blocks.{n}", FLUX_SINGLE, options=(("head_dim", 128),)),
            ProbeGroup(t, "final_layer", FLUX_FINAL),
            *_VAE,
            ProbeGroup("clip_l", "transformer.text_model.encoder.layers.{n}", CLIP_LAYER,
                       tokens=77, options=(("head_dim", 64), ("act", "quick_gelu"))),
            ProbeGroup("t5xxl", "transformer.encoder.block.{n}", T5_LAYER, tokens=32,
                       options=(("head_dim", 64),)))


def sd3() -> tuple[ProbeGroup, ...]:
    """SD3/SD3.5 (original layout): embedders, the joint blocks (64 channels
    a head), the final layer, the VAE and the text encoders' layers."""
    t = "transformer"
    hd = (("head_dim", 64),)
    return (ProbeGroup(t, "context_embedder", LINEAR),
            ProbeGroup(t, "t_embedder.mlp", MLP_EMBEDDER, options=(("names", "0,2"),)),
            ProbeGroup(t, "y_embedder.mlp", MLP_EMBEDDER, options=(("names", "0,2"),)),
            ProbeGroup(t, "joint_blocks.{n}", SD3_JOINT, options=hd),
            ProbeGroup(t, "final_layer", FLUX_FINAL),
            *_VAE,
            ProbeGroup("clip_l", "transformer.text_model.encoder.layers.{n}", CLIP_LAYER,
                       tokens=77, options=(("head_dim", 64), ("act", "quick_gelu"))),
            ProbeGroup("clip_g", "transformer.text_model.encoder.layers.{n}", CLIP_LAYER,
                       tokens=77, options=(("head_dim", 64), ("act", "gelu"))),
            ProbeGroup("t5xxl", "transformer.encoder.block.{n}", T5_LAYER, tokens=32,
                       options=hd))


def qwen_image() -> tuple[ProbeGroup, ...]:
    """Qwen-Image: the input projections, the 60 transformer blocks (128
    channels a head) and the output layer."""
    t = "transformer"
    return (ProbeGroup(t, "img_in", LINEAR), ProbeGroup(t, "txt_in", LINEAR),
            ProbeGroup(t, "transformer_blocks.{n}", QWEN_BLOCK, options=(("head_dim", 128),)),
            ProbeGroup(t, "proj_out", LINEAR))


def wan() -> tuple[ProbeGroup, ...]:
    """Wan 2.1/2.2 (original layout): the text embedder and the transformer
    blocks (128 channels a head)."""
    t = "transformer"
    return (ProbeGroup(t, "text_embedding", MLP_EMBEDDER, options=(("names", "0,2"),
                                                                   ("act", "gelu_tanh"))),
            ProbeGroup(t, "blocks.{n}", WAN_BLOCK, text_tokens=32,
                       options=(("head_dim", 128),)),
            ProbeGroup(t, "head.head", LINEAR))


_HD128 = (("head_dim", 128),)


def chroma() -> tuple[ProbeGroup, ...]:
    """Chroma (original layout): the embedders, the guidance approximator
    (the modulation of every block; 16 of its 344 rows of inputs), the 19
    double and 38 single blocks (Flux.1's, their shift/scale/gate fed as
    seeded inputs: in the model they come from the approximator's output)
    and the final Linear (its norm and modulation carry no weights)."""
    t = "transformer"
    return (ProbeGroup(t, "img_in", LINEAR), ProbeGroup(t, "txt_in", LINEAR),
            ProbeGroup(t, "distilled_guidance_layer", CHROMA_APPROXIMATOR, tokens=16),
            ProbeGroup(t, "double_blocks.{n}", CHROMA_DOUBLE, options=_HD128),
            ProbeGroup(t, "single_blocks.{n}", CHROMA_SINGLE, options=_HD128),
            ProbeGroup(t, "final_layer.linear", LINEAR))


def flux2() -> tuple[ProbeGroup, ...]:
    """Flux.2 (original layout): the embedders, the three modulation layers
    all blocks share (each a Linear), the double and single blocks (their
    shift/scale/gate fed as seeded inputs) and the final layer."""
    t = "transformer"
    return (ProbeGroup(t, "img_in", LINEAR), ProbeGroup(t, "txt_in", LINEAR),
            ProbeGroup(t, "time_in", MLP_EMBEDDER), ProbeGroup(t, "guidance_in", MLP_EMBEDDER),
            *(ProbeGroup(t, f"{m}.lin", LINEAR, tokens=1) for m in (
                "double_stream_modulation_img", "double_stream_modulation_txt",
                "single_stream_modulation")),
            ProbeGroup(t, "double_blocks.{n}", FLUX2_DOUBLE, options=_HD128),
            ProbeGroup(t, "single_blocks.{n}", FLUX2_SINGLE, options=_HD128),
            ProbeGroup(t, "final_layer", FLUX_FINAL))


def z_image() -> tuple[ProbeGroup, ...]:
    """Z-Image (original layout): the embedders, the noise and context
    refiners, the 30 layers (128 channels a head; RoPE left out as
    everywhere) and the final layer."""
    t = "transformer"
    return (ProbeGroup(t, "x_embedder", LINEAR),
            ProbeGroup(t, "t_embedder", MLP_EMBEDDER, options=(("names", "mlp.0,mlp.2"),)),
            ProbeGroup(t, "cap_embedder", RMS_LINEAR, tokens=16),
            ProbeGroup(t, "noise_refiner.{n}", Z_IMAGE_LAYER, options=_HD128),
            ProbeGroup(t, "context_refiner.{n}", Z_IMAGE_LAYER, tokens=16, options=_HD128),
            ProbeGroup(t, "layers.{n}", Z_IMAGE_LAYER, options=_HD128),
            ProbeGroup(t, "final_layer", Z_IMAGE_FINAL))
