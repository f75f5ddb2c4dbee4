"""Architecture configurations for the Stable Diffusion families modelkit knows.

These mirror the LDM/SGM configs (``v1-inference.yaml``, ``v2-inference.yaml``,
``sd_xl_base.yaml``, ``sd_xl_refiner.yaml``). Every key list and shape the project
uses is generated from these numbers by :mod:`modelkit.arch.keys`, so the tables
live in one place. ``TINY`` holds scaled-down configs with the *same key
structure* (same block counts, same places where channel counts change) that
the test fixtures use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

CLIP_VOCAB = 49408
CLIP_CONTEXT = 77


@dataclass(frozen=True)
class UNetConfig:
    """An LDM ``openaimodel.UNetModel`` configuration."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # transformer depth per resolution level; 0 means no attention there
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    # attention heads are not visible in weights; kept for diffusers configs
    num_heads: int = 8
    num_head_channels: int | None = None


@dataclass(frozen=True)
class VAEConfig:
    """An LDM ``AutoencoderKL`` configuration."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text encoder: ``layout`` is ``hf`` (transformers CLIPTextModel) or
    ``open_clip`` (fused ``in_proj_weight``, used by SD2 and SDXL's bigG)."""

    layout: str = "hf"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    vocab_size: int = CLIP_VOCAB
    context_length: int = CLIP_CONTEXT
    has_projection: bool = False


@dataclass(frozen=True)
class TextEncoderSlot:
    """Where one text encoder sits in a single-file checkpoint."""

    name: str  # te, te1, te2
    prefix: str
    config: TextEncoderConfig


@dataclass(frozen=True)
class ArchSpec:
    """Everything modelkit knows about one checkpoint architecture."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSlot, ...]
    has_schedule_buffers: bool = False
    default_resolution: int = 512
    extra: dict[str, str] = field(default_factory=dict)

    def with_variant(self, in_channels: int) -> ArchSpec:
        """The same architecture with a different UNet input channel count
        (inpainting: 9, instruct-pix2pix: 8, depth: 5)."""
        return replace(self, unet=replace(self.unet, in_channels=in_channels))


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."

# where text encoders sit in single-file checkpoints: prefix -> (layout, slot)
TE_PREFIXES: dict[str, tuple[str, str]] = {
    "cond_stage_model.transformer.": ("hf", "te"),
    "cond_stage_model.model.": ("open_clip", "te"),
    "conditioner.embedders.0.transformer.": ("hf", "te1"),
    "conditioner.embedders.1.model.": ("open_clip", "te2"),
    "conditioner.embedders.0.model.": ("open_clip", "te2"),
}

CLIP_L = TextEncoderConfig(layout="hf", width=768, layers=12, heads=12)
OPEN_CLIP_H = TextEncoderConfig(
    layout="open_clip", width=1024, layers=24, heads=16, has_projection=True
)
OPEN_CLIP_BIGG = TextEncoderConfig(
    layout="open_clip", width=1280, layers=32, heads=20, has_projection=True
)

SD1 = ArchSpec(
    name="sd1",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoders=(TextEncoderSlot("te", "cond_stage_model.transformer.", CLIP_L),),
    has_schedule_buffers=True,
    default_resolution=512,
)
SD2 = ArchSpec(
    name="sd2",
    unet=UNetConfig(
        context_dim=1024, use_linear_in_transformer=True, num_head_channels=64
    ),
    vae=VAEConfig(),
    text_encoders=(TextEncoderSlot("te", "cond_stage_model.model.", OPEN_CLIP_H),),
    has_schedule_buffers=True,
    default_resolution=768,
)
SDXL = ArchSpec(
    name="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_head_channels=64,
    ),
    vae=VAEConfig(),
    text_encoders=(
        TextEncoderSlot("te1", "conditioner.embedders.0.transformer.", CLIP_L),
        TextEncoderSlot("te2", "conditioner.embedders.1.model.", OPEN_CLIP_BIGG),
    ),
    default_resolution=1024,
)
SDXL_REFINER = ArchSpec(
    name="sdxl_refiner",
    unet=UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4,
        context_dim=1280,
        use_linear_in_transformer=True,
        adm_in_channels=2560,
        num_head_channels=64,
    ),
    vae=VAEConfig(),
    text_encoders=(
        TextEncoderSlot("te2", "conditioner.embedders.0.model.", OPEN_CLIP_BIGG),
    ),
    default_resolution=1024,
)

ARCHS: dict[str, ArchSpec] = {a.name: a for a in (SD1, SD2, SDXL, SDXL_REFINER)}

# SDXL's vector conditioning: pooled bigG output plus 6 (base) or 5 (refiner)
# Fourier-embedded size/crop/aesthetic numbers of 256 channels each.
SDXL_ADM_EXTRA = {"sdxl": 6 * 256, "sdxl_refiner": 5 * 256}


# tiny text-encoder widths by real width: SDXL's two encoders keep different
# widths (as the real 768/1280), because diffusers' single-file loader tells
# them apart by width and would fill text_encoder_2 from CLIP-L otherwise
TINY_TE_WIDTHS = {768: 32, 1024: 32, 1280: 64}


def _tiny_te(te: TextEncoderConfig) -> TextEncoderConfig:
    return replace(te, width=TINY_TE_WIDTHS.get(te.width, 32), heads=4)


def _tiny(arch: ArchSpec) -> ArchSpec:
    """Scale an architecture down while keeping its key structure: channel
    multipliers stay, so skip connections appear where they do at full size."""
    tes = tuple(replace(s, config=_tiny_te(s.config)) for s in arch.text_encoders)
    context = sum(s.config.width for s in tes)
    if arch.name == "sdxl_refiner":
        context = tes[0].config.width
    adm = None
    if arch.unet.adm_in_channels is not None:
        pooled = tes[-1].config.width
        adm = pooled + SDXL_ADM_EXTRA[arch.name]
    unet = replace(
        arch.unet,
        model_channels=16,
        context_dim=context,
        adm_in_channels=adm,
        num_heads=2,
        num_head_channels=None if arch.unet.num_head_channels is None else 8,
    )
    return replace(arch, unet=unet, vae=replace(arch.vae, ch=16), text_encoders=tes)


TINY: dict[str, ArchSpec] = {name: _tiny(spec) for name, spec in ARCHS.items()}
