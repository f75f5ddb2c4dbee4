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
from modelkit.arch.registry import LDM_VARIANTS, REGISTRY

# UNet input channels -> variant (inpaint 9, instruct-pix2pix 8, depth 5)
VARIANTS_BY_IN_CHANNELS = {v.rule.shapes[0][2]: v.name for v in LDM_VARIANTS}
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


def unet_facts(f: UNetFeatures) -> dict[str, object]:
    """The facts the registry's UNet rules test (:class:`~modelkit.arch.registry.Rule`)."""
    return {"adm": f.adm_in_channels is not None, "adm_in_channels": f.adm_in_channels,
            "n_input_blocks": f.n_input_blocks, "use_linear": f.use_linear,
            "first_level_attention": 1 in f.attention_blocks,
            "context_dim": f.context_dim, "context_te": ""}


def _context_te(arch: str, context_dim: int | None) -> str:
    """`` (CLIP-L)`` when ``context_dim`` is the width of the arch's text encoder."""
    spec = ARCHS.get(arch)
    for slot in spec.text_encoders if spec else ():
        if slot.config.width == context_dim:
            return f" ({text_encoder_family(slot.config.layout, slot.config.width)})"
    return ""


def unet_family(f: UNetFeatures) -> tuple[str, list[str]]:
    """The architecture name for UNet features, with the reasons: the first
    registry entry whose UNet rule holds."""
    facts = unet_facts(f)
    for arch in REGISTRY.values():
        for rule in arch.detect:
            if rule.features and rule.holds({}, facts):
                facts["context_te"] = _context_te(arch.name, f.context_dim)
                return arch.name, rule.explain(facts)
    if f.adm_in_channels is not None:
        return "unknown", ["label_emb present but the block layout is unknown"]
    if f.n_input_blocks != 12:
        return "unknown", [f"{f.n_input_blocks} input blocks: no known SD layout"]
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


def _te_archs() -> tuple[dict[str, str], dict[int, str]]:
    """Text-encoder family -> the first architecture that uses it, and a lone
    ``te`` slot's width -> its architecture (what an embedding's width says)."""
    by_family: dict[str, str] = {}
    by_width: dict[int, str] = {}
    for arch in REGISTRY.values():
        for slot in arch.spec.text_encoders if arch.spec else ():
            by_family.setdefault(text_encoder_family(slot.config.layout, slot.config.width),
                                 arch.name)
            if slot.name == "te":
                by_width.setdefault(slot.config.width, arch.name)
    return by_family, by_width


# CLIP-L: sd1, OpenCLIP-H: sd2, OpenCLIP-bigG: sdxl; embedding width 768: sd1, 1024: sd2
TE_FAMILY_ARCH, EMBEDDING_WIDTH_ARCH = _te_archs()
