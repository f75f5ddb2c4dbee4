"""Recognise SD architectures from key names and shapes alone.

The UNet is described by features read off its keys (as ComfyUI derives a
config), then matched to a known family; the expected key/shape table for
that family *at the widths found in the file* is generated from the config, so
tiny test models and full-size ones are checked the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from modelkit.arch.configs import (
    ARCHS,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from modelkit.arch.keys import Shape

VARIANTS_BY_IN_CHANNELS = {9: "inpaint", 8: "pix2pix", 5: "depth"}
_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")


@dataclass
class UNetFeatures:
    """What a UNet's keys say about its configuration."""

    in_channels: int
    model_channels: int
    n_input_blocks: int
    attention_blocks: set[int]
    context_dim: int | None
    use_linear: bool | None
    adm_in_channels: int | None
    evidence: list[str] = field(default_factory=list)


def unet_features(keys: dict[str, Shape]) -> UNetFeatures | None:
    """Features of an LDM UNet given its unprefixed keys, or None when the
    keys are not an LDM UNet."""
    conv_in = keys.get("input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return None
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    attn = {b for b in blocks if f"input_blocks.{b}.1.proj_in.weight" in keys}
    context = use_linear = None
    for k, s in keys.items():
        if k.endswith("attn2.to_k.weight") and context is None and len(s) == 2:
            context = s[1]
        if k.endswith(".proj_in.weight") and use_linear is None:
            use_linear = len(s) == 2
    adm = keys.get("label_emb.0.0.weight")
    return UNetFeatures(
        in_channels=conv_in[1], model_channels=conv_in[0],
        n_input_blocks=max(blocks) + 1, attention_blocks=attn, context_dim=context,
        use_linear=use_linear, adm_in_channels=adm[1] if adm and len(adm) == 2 else None,
    )


def unet_family(f: UNetFeatures) -> tuple[str, list[str]]:
    """The architecture name for UNet features, with the reasons."""
    ev: list[str] = []
    if f.adm_in_channels is not None:
        if f.n_input_blocks == 9:
            ev.append(f"label_emb present (ADM input {f.adm_in_channels}) and 9 input "
                      "blocks: SDXL base layout")
            return "sdxl", ev
        if f.n_input_blocks == 12 and 1 not in f.attention_blocks:
            ev.append(f"label_emb present (ADM input {f.adm_in_channels}), 12 input "
                      "blocks, no attention at the first level: SDXL refiner layout")
            return "sdxl_refiner", ev
        if f.n_input_blocks == 12:
            ev.append("label_emb with SD2 layout: SD2.1 unCLIP")
            return "sd2", ev
        return "unknown", ["label_emb present but the block layout is unknown"]
    if f.n_input_blocks != 12:
        return "unknown", [f"{f.n_input_blocks} input blocks: no known SD layout"]
    if f.use_linear is False:
        ev.append("proj_in is a 1x1 conv (use_linear_in_transformer=False): SD1 layout")
        if f.context_dim:
            ev.append(f"cross-attention context width {f.context_dim}"
                      + (" (CLIP-L)" if f.context_dim == 768 else ""))
        return "sd1", ev
    if f.use_linear:
        ev.append("proj_in is Linear (use_linear_in_transformer=True), no label_emb: "
                  "SD2 layout")
        if f.context_dim:
            ev.append(f"cross-attention context width {f.context_dim}"
                      + (" (OpenCLIP-H)" if f.context_dim == 1024 else ""))
        return "sd2", ev
    return "unknown", ["UNet has no transformer blocks"]


def expected_unet_config(arch: str, f: UNetFeatures) -> UNetConfig | None:
    """The config of ``arch`` at the widths the file uses."""
    if arch not in ARCHS:
        return None
    base = ARCHS[arch].unet
    return replace(
        base,
        in_channels=f.in_channels,
        model_channels=f.model_channels,
        context_dim=f.context_dim or base.context_dim,
        adm_in_channels=f.adm_in_channels if base.adm_in_channels else None,
    )


def expected_vae_config(keys: dict[str, Shape]) -> VAEConfig | None:
    """A KL-f8 VAE config at the widths of the given unprefixed VAE keys."""
    conv_in = keys.get("encoder.conv_in.weight")
    dec_in = keys.get("decoder.conv_in.weight")
    if conv_in is None or dec_in is None or len(conv_in) != 4 or len(dec_in) != 4:
        return None
    return VAEConfig(ch=conv_in[0], z_channels=dec_in[1], embed_dim=dec_in[1],
                     in_channels=conv_in[1])


def expected_text_encoder(keys: dict[str, Shape], layout: str, layers: int
                          ) -> TextEncoderConfig | None:
    """A text encoder config at the width found in the given relative keys."""
    emb_key = ("text_model.embeddings.token_embedding.weight" if layout == "hf"
               else "token_embedding.weight")
    emb = keys.get(emb_key)
    if emb is None or len(emb) != 2:
        return None
    width = emb[1]
    base = TextEncoderConfig(layout=layout, width=width, layers=layers,
                             vocab_size=emb[0])
    pos_key = ("text_model.embeddings.position_embedding.weight" if layout == "hf"
               else "positional_embedding")
    pos = keys.get(pos_key)
    if pos is not None and len(pos) == 2:
        base = replace(base, context_length=pos[0])
    if layout == "hf":
        fc1 = keys.get("text_model.encoder.layers.0.mlp.fc1.weight")
    else:
        fc1 = keys.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc1 is not None and len(fc1) == 2 and width:
        base = replace(base, mlp_ratio=max(1, fc1[0] // width))
    return base


def text_encoder_family(layout: str, width: int) -> str:
    """Name the text encoder: CLIP-L, OpenCLIP-H, OpenCLIP-bigG or a width."""
    names = {("hf", 768): "CLIP-L", ("open_clip", 1024): "OpenCLIP-H",
             ("open_clip", 1280): "OpenCLIP-bigG", ("hf", 1280): "OpenCLIP-bigG (HF)"}
    layout_name = "CLIP, HF layout" if layout == "hf" else "OpenCLIP layout"
    return names.get((layout, width), f"{layout_name}, width {width}")
