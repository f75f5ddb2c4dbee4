"""The architecture registry: every model family modelkit knows, declared once.

Each :class:`Architecture` is data: how to recognise it from a header (a few
declarative :class:`Rule` s that one generic detector evaluates), its layouts,
its components and their key prefixes, its per-block weight map, what prune
treats as training residue, its LoRA and diffusers naming, its GGUF
architecture name and keep-list, its default dtype and how ``verify`` treats
it. The key tables themselves stay where they are generated
(:mod:`~modelkit.arch.configs`, :mod:`~modelkit.arch.keys`,
:mod:`~modelkit.arch.blocks`, :mod:`~modelkit.arch.diffusers_names`,
:mod:`~modelkit.arch.lora_names`); an entry points at them. Every list of
architecture names elsewhere (command-line choices, the library's names, the
LoRA, verify and compare lists) is derived from :data:`REGISTRY`.

An entry with ``support="full"`` works with every command. ``"detect"``
marks a family that ``inspect`` names (family, variant and layout) while
the other commands still refuse it; ``"partial"`` one that the commands in
its ``commands`` handle (:func:`handles`) while the others refuse it. The
goal is that every entry is ``"full"``.

Importing this module does not import torch.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from modelkit.arch import blocks as _blocks
from modelkit.arch import chroma as _chroma
from modelkit.arch import family_blocks as _family_blocks
from modelkit.arch import flux as _flux
from modelkit.arch import flux2 as _flux2
from modelkit.arch import gguf as _gguf
from modelkit.arch import parts as _parts
from modelkit.arch import probes as _probes
from modelkit.arch import qwen_image as _qwen
from modelkit.arch import sd3 as _sd3
from modelkit.arch import wan as _wan
from modelkit.arch import z_image as _z_image
from modelkit.arch.configs import (
    ARCHS,
    EMA_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ArchSpec,
)
from modelkit.arch.gguf import GgufPolicy

Shape = tuple[int, ...]

FULL, DETECT, PARTIAL = "full", "detect", "partial"
ORIGINAL, DIFFUSERS = "original", "diffusers"  # key layouts
RENDER, PROBE = "render", "probe"  # verify: render with a pipeline, or a static probe only
DENOISER, VAE, TEXT_ENCODER = "denoiser", "vae", "text_encoder"  # component roles
UNKNOWN = "unknown"
EPS, EPS_OR_V, FLOW = "eps", "eps_or_v", "flow"  # prediction of an unmarked file


# --- declarations ---------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A detection rule: it holds when every condition does.

    ``keys`` must be present and ``absent`` missing (names relative to the
    denoiser root: without ``model.diffusion_model.``); ``shapes`` are
    ``(key, axis, size)`` conditions on those keys (axis -1 is the last);
    ``features`` are ``(name, value)`` conditions on facts computed from the
    keys (the LDM UNet's, see :func:`modelkit.arch.detect.unet_facts`).
    ``evidence`` lines are formatted with the facts; a line whose fields are
    missing or empty is left out."""

    keys: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    shapes: tuple[tuple[str, int, int], ...] = ()
    features: tuple[tuple[str, Any], ...] = ()
    evidence: tuple[str, ...] = ()

    def holds(self, keys: Mapping[str, Shape], facts: Mapping[str, Any] | None = None
              ) -> bool:
        """Whether the rule holds for ``keys`` (relative names) and ``facts``."""
        facts = facts or {}
        if any(k not in keys for k in self.keys) or any(k in keys for k in self.absent):
            return False
        for key, axis, size in self.shapes:
            shape = keys.get(key)
            if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] != size:
                return False
        return all(facts.get(name, _MISSING) == value for name, value in self.features)

    def explain(self, facts: Mapping[str, Any]) -> list[str]:
        """The evidence lines, formatted with ``facts``."""
        out = []
        for line in self.evidence:
            names = [f for _, f, _, _ in string.Formatter().parse(line) if f]
            if all(facts.get(n) not in (None, "", 0) for n in names):
                out.append(line.format(**facts))
        return out


_MISSING = object()


@dataclass(frozen=True)
class Variant:
    """A variant of a family, told apart by its own rule (checked after the
    family's, in order: the first that holds names the file; none: the plain
    model)."""

    name: str
    rule: Rule


@dataclass(frozen=True)
class Component:
    """One component: its role, its key prefix in an all-in-one file and in a
    standalone file of that component (``""``: unprefixed)."""

    name: str
    role: str
    prefix: str
    standalone: str = ""


@dataclass(frozen=True)
class BlockMap:
    """Per-block weights: the block names users know, in list order, the key
    -> block maps and the function that applies them
    (``key_to_block(key, arch, map_name, vae_slot)``)."""

    names: tuple[str, ...]
    maps: tuple[str, ...]
    default_map: str
    key_to_block: Callable[..., str]
    vae_slot: bool = True  # a VAE block may be appended
    # a transformer family's declaration (groups, presets, both layouts'
    # prefixes: :class:`modelkit.arch.family_blocks.PrefixBlocks`)
    table: _family_blocks.PrefixBlocks | None = None


@dataclass(frozen=True)
class PrunePolicy:
    """What prune treats as training residue, and what it keeps."""

    residue_prefixes: tuple[str, ...]  # dropped: training leftovers
    keep_prefixes: tuple[str, ...] = ()  # auxiliary networks a variant needs
    ema_prefix: str | None = None  # EMA copies (dropped unless kept)
    schedule_buffers: bool = False  # the file carries the noise schedule


@dataclass(frozen=True)
class LoraNames:
    """LoRA naming: the formats the name maps are generated for, the UNet
    naming kohya uses (``ldm`` or ``diffusers``), text-encoder layers kohya
    leaves out, what the LoRA commands do with the family, and the metadata
    written into (and recognised in) a LoRA for it: kohya's
    ``ss_base_model_version`` and ``modelspec.architecture`` (``.../lora``)."""

    namings: tuple[str, ...]
    kohya_unet: str
    kohya_te_dropped_layers: int = 0
    adapters: bool = True  # extract, bake, merge, convert, info
    block_weights: bool = True  # LoRA block weights (LBW)
    base_model_version: str | None = None  # written
    base_model_prefix: str | None = None  # recognised
    modelspec_arch: str | None = None  # written, before "/lora"
    modelspec_prefix: str | None = None  # recognised
    kohya_v2: bool = False  # kohya's ss_v2 flag (SD2)
    # a family without LDM key tables: module name -> where it lands (a
    # table of the family's own, e.g. :func:`modelkit.arch.flux.lora_modules`)
    modules: Callable[[], Mapping[str, Any]] | None = None
    # module-name prefixes only this family's adapters have (``*`` stands for
    # a block number: ``transformer_blocks.*.img_mlp.``)
    module_prefixes: tuple[str, ...] = ()
    # families whose LoRAs use the same module names (a Flux.1 LoRA on
    # Chroma): the base file decides, and a module with no target is reported
    shares_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiffusersNames:
    """The diffusers side: pipeline class per variant (``None``: the plain
    model), the VAE scaling factor and text-encoder layers diffusers drops."""

    pipelines: tuple[tuple[str | None, str], ...]
    scaling_factor: float
    te_dropped_layers: int = 0
    vae_force_upcast: bool = False  # the VAE overflows in fp16 (SDXL's)


@dataclass(frozen=True)
class Architecture:
    """One architecture (family or member of a family), declared once."""

    name: str  # the name in reports, recipes and command-line choices
    label: str  # how people write it
    short: str  # table column
    family: str  # archs of one family share folders and VAEs
    aliases: tuple[str, ...]  # folder names that say a file is for it
    support: str  # FULL, PARTIAL or DETECT
    detect: tuple[Rule, ...]  # any rule recognises the denoiser
    variants: tuple[Variant, ...]
    layouts: tuple[str, ...]
    components: tuple[Component, ...]
    spec: ArchSpec | None  # the config key tables are generated from
    blocks: BlockMap | None
    prune: PrunePolicy
    lora: LoraNames | None
    diffusers: DiffusersNames | None
    gguf: GgufPolicy | None
    default_dtype: str
    verify: str  # RENDER or PROBE
    prediction: str  # what an unmarked file predicts: EPS, EPS_OR_V (read it) or FLOW
    # denoiser key prefixes (without the component prefix) whose weights a
    # scaled fp8/int8 export keeps in high precision: the first and last
    # layers and the embeddings (norms and biases are 1-D and always kept)
    quant_keep: tuple[str, ...]
    layout_rules: tuple[tuple[str, Rule], ...] = ()  # (layout, rule), first match
    commands: frozenset[str] = frozenset()  # what handles a PARTIAL entry (see handles())
    # the blocks verify's streamed functional probe runs (modelkit/arch/probes.py)
    probe: tuple[_probes.ProbeGroup, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def denoiser(self) -> Component:
        """The denoiser component (UNet or transformer)."""
        return next(c for c in self.components if c.role == DENOISER)

    def pipeline(self, variant: str | None) -> str | None:
        """The diffusers pipeline class for ``variant``."""
        return dict(self.diffusers.pipelines).get(variant) if self.diffusers else None


# --- SD1, SD2, SDXL, SDXL refiner -------------------------------------------------

_IN_CONV = "input_blocks.0.0.weight"
# the UNet input channels tell inpaint, instruct-pix2pix and depth models apart
LDM_VARIANTS = tuple(Variant(name, Rule(shapes=((_IN_CONV, 1, ch),)))
                      for name, ch in (("inpaint", 9), ("pix2pix", 8), ("depth", 5)))
_CONTEXT = "cross-attention context width {context_dim}{context_te}"
_LDM_PRUNE = PrunePolicy(residue_prefixes=_parts.JUNK_PREFIXES,
                         keep_prefixes=_parts.AUX_MODEL_PREFIXES, ema_prefix=EMA_PREFIX)
_NAMINGS = ("kohya", "peft", "comfyui")
# kept in high precision by scaled fp8/int8: the layers city96/ComfyUI-GGUF's
# tools/lcpp.patch never quantizes for SD1/SDXL (timestep and class
# embeddings, conv_in, conv_out)
_LDM_QUANT_KEEP = ("time_embed.", "label_emb.", "input_blocks.0.0.", "out.")


def _ldm_components(spec: ArchSpec) -> tuple[Component, ...]:
    return (Component("unet", DENOISER, UNET_PREFIX), Component("vae", VAE, VAE_PREFIX),
            *(Component(s.name, TEXT_ENCODER, s.prefix) for s in spec.text_encoders))


def _ldm_blocks(name: str) -> BlockMap:
    return BlockMap(tuple(_blocks.block_names(name)), _blocks.MAPS, _blocks.DEFAULT_MAP,
                    _blocks.block_of)


def _ldm(name: str, *, label: str, short: str, family: str, aliases: tuple[str, ...],
         detect: tuple[Rule, ...], variants: tuple[str, ...], lora: LoraNames,
         pipelines: tuple[tuple[str | None, str], ...], scaling: float, gguf: str,
         diffusers_te_dropped: int = 0, prediction: str = EPS) -> Architecture:
    spec = ARCHS[name]
    return Architecture(
        name=name, label=label, short=short, family=family, aliases=aliases, support=FULL,
        detect=detect, variants=tuple(v for v in LDM_VARIANTS if v.name in variants),
        layouts=(ORIGINAL, DIFFUSERS), components=_ldm_components(spec), spec=spec,
        blocks=_ldm_blocks(name),
        prune=PrunePolicy(_LDM_PRUNE.residue_prefixes, _LDM_PRUNE.keep_prefixes,
                          EMA_PREFIX, spec.has_schedule_buffers),
        lora=lora, diffusers=DiffusersNames(pipelines, scaling, diffusers_te_dropped,
                                            vae_force_upcast=family == "sdxl"),
        gguf=_gguf.ldm(gguf), default_dtype="fp16", verify=RENDER, prediction=prediction,
        quant_keep=_LDM_QUANT_KEEP,
        probe=_probes.ldm(tuple((s.name, s.config.layout) for s in spec.text_encoders),
                          heads=None if spec.unet.num_head_channels else spec.unet.num_heads,
                          head_dim=spec.unet.num_head_channels),
    )


SD1 = _ldm(
    "sd1", label="SD1", short="sd1", family="sd1",
    aliases=("sd1", "sd15", "sd1.5", "sd-1.5", "sd_1.5", "sd 1.5", "1.5", "sd1x"),
    detect=(Rule(features=(("adm", False), ("n_input_blocks", 12), ("use_linear", False)),
                 evidence=("proj_in is a 1x1 conv (use_linear_in_transformer=False): "
                           "SD1 layout", _CONTEXT)),),
    variants=("inpaint", "pix2pix"),
    lora=LoraNames(_NAMINGS, kohya_unet="diffusers", base_model_version="sd_v1",
                   base_model_prefix="sd_v1", modelspec_arch="stable-diffusion-v1",
                   modelspec_prefix="stable-diffusion-v1"),
    pipelines=((None, "StableDiffusionPipeline"),
               ("inpaint", "StableDiffusionInpaintPipeline"),
               ("pix2pix", "StableDiffusionInstructPix2PixPipeline")),
    scaling=0.18215, gguf="sd1",
)
SD2 = _ldm(
    "sd2", label="SD2", short="sd2", family="sd2",
    aliases=("sd2", "sd21", "sd2.1", "sd-2.1", "sd_2.1", "sd 2.1", "2.1", "sd2x"),
    detect=(Rule(features=(("adm", False), ("n_input_blocks", 12), ("use_linear", True)),
                 evidence=("proj_in is Linear (use_linear_in_transformer=True), no "
                           "label_emb: SD2 layout", _CONTEXT)),
            Rule(features=(("adm", True), ("n_input_blocks", 12),
                           ("first_level_attention", True)),
                 evidence=("label_emb with SD2 layout: SD2.1 unCLIP",))),
    variants=("inpaint", "depth"),
    # kohya converts SD2's open_clip tower to a 23-layer HF CLIP (the last is unused)
    lora=LoraNames(_NAMINGS, kohya_unet="diffusers", kohya_te_dropped_layers=1, kohya_v2=True,
                   base_model_version="sd_v2", base_model_prefix="sd_v2",
                   modelspec_arch="stable-diffusion-v2", modelspec_prefix="stable-diffusion-v2"),
    pipelines=((None, "StableDiffusionPipeline"),
               ("inpaint", "StableDiffusionInpaintPipeline"),
               ("depth", "StableDiffusionDepth2ImgPipeline")),
    scaling=0.18215, gguf="sd1", diffusers_te_dropped=1, prediction=EPS_OR_V,
)
SDXL = _ldm(
    "sdxl", label="SDXL", short="sdxl", family="sdxl",
    aliases=("sdxl", "sd-xl", "sd_xl", "xl", "sdxl1.0", "sdxl 1.0", "pony", "illustrious",
             "noobai"),
    detect=(Rule(features=(("adm", True), ("n_input_blocks", 9)),
                 evidence=("label_emb present (ADM input {adm_in_channels}) and 9 input "
                           "blocks: SDXL base layout",)),),
    variants=("inpaint", "pix2pix"),
    lora=LoraNames(_NAMINGS, kohya_unet="ldm",  # kohya's SGM UNet class
                   base_model_version="sdxl_base_v1-0", base_model_prefix="sdxl",
                   modelspec_arch="stable-diffusion-xl-v1-base",
                   modelspec_prefix="stable-diffusion-xl"),
    pipelines=((None, "StableDiffusionXLPipeline"),
               ("inpaint", "StableDiffusionXLInpaintPipeline"),
               ("pix2pix", "StableDiffusionXLInstructPix2PixPipeline")),
    scaling=0.13025, gguf="sdxl",
)
SDXL_REFINER = _ldm(
    "sdxl_refiner", label="SDXL refiner", short="xl-ref", family="sdxl",
    aliases=("sdxl_refiner", "sdxl-refiner", "refiner"),
    detect=(Rule(features=(("adm", True), ("n_input_blocks", 12),
                           ("first_level_attention", False)),
                 evidence=("label_emb present (ADM input {adm_in_channels}), 12 input "
                           "blocks, no attention at the first level: SDXL refiner "
                           "layout",)),),
    variants=(),
    # no refiner LoRAs are trained; the names are generated for extraction checks
    lora=LoraNames(_NAMINGS, kohya_unet="ldm", adapters=False, block_weights=False),
    pipelines=((None, "StableDiffusionXLImg2ImgPipeline"),),
    scaling=0.13025, gguf="sdxl",
)

# --- the transformer families (every command handles them) -----------------------

# a transformer file: the LDM leftovers, and what trainers leave beside the
# weights (optimizer and scheduler state, a grad scaler, LoRA keys saved in,
# an ema./ema_model. copy); LDM's model_ema. copy is dropped unless kept
_DIT_PRUNE = PrunePolicy(residue_prefixes=(*_parts.JUNK_PREFIXES, "scaler.", "lora_",
                                           "ema.", "ema_model."),
                         ema_prefix=EMA_PREFIX)


def _own_blocks(table: _family_blocks.PrefixBlocks) -> BlockMap:
    """The block map of a transformer family: its names, one map (ComfyUI's
    names), no VAE entry."""
    return BlockMap(table.names, ("comfyui",), "comfyui", table.key_to_block,
                    vae_slot=False, table=table)


# SD3 / SD3.5 (Stability's MMDiT, original layout; ComfyUI's model_detection.py)
_SD3_QKV = "joint_blocks.0.context_block.attn.qkv.weight"
_SD3_POS = "pos_embed"
# the diffusers layout (SD3Transformer2DModel; diffusers' single_file_utils.py
# convert_sd3_transformer_checkpoint_to_diffusers): split to_q/to_k/to_v,
# PatchEmbed's pos_embed.proj and pos_embed.pos_embed
_SD3_DIFFUSERS_Q = "transformer_blocks.0.attn.to_q.weight"
_SD3_DIFFUSERS_POS = "pos_embed.pos_embed"


def _sd3_variants(block: str, attn2: str, pos: str) -> tuple[Variant, ...]:
    """SD3 variants in one layout (``block``: block N's self-attention query
    or fused qkv, ``attn2``: block 0's second self-attention, ``pos``: the
    position table): 38 blocks, attn2 with 384x384 positions, 24 blocks with
    192x192."""
    return (Variant("sd3.5-large", Rule(keys=(block.format(37),))),
            Variant("sd3.5-medium", Rule(keys=(attn2,), shapes=((pos, 1, 147456),))),
            Variant("sd3-medium", Rule(absent=(block.format(24),),
                                       shapes=((pos, 1, 36864),))))


SD3_VARIANTS = (
    *_sd3_variants("joint_blocks.{}.x_block.attn.qkv.weight",
                   "joint_blocks.0.x_block.attn2.qkv.weight", _SD3_POS),
    *_sd3_variants("transformer_blocks.{}.attn.to_q.weight",
                   "transformer_blocks.0.attn2.to_q.weight", _SD3_DIFFUSERS_POS),
)

# every LoRA command, through the family's module table (lora/table.py). The
# metadata written per family is what its trainers write: kohya sd-scripts
# ss_base_model_version "chroma" (library/flux_utils.py MODEL_VERSION_CHROMA) and
# modelspec "chroma" (library/sai_model_spec.py ARCH_FLUX_1_CHROMA); musubi-tuner
# writes its architecture_full_name ("wan", "qwen_image", "z_image",
# "flux_2_dev": dataset/architectures.py) and modelspec "wan2.1", "Qwen-Image",
# "Z-Image" (utils/sai_model_spec.py); none found for SD3 (kohya appends the
# model variant) or Flux.2's modelspec, so none is written

SD3 = Architecture(
    name="sd3", label="SD3", short="sd3", family="sd3", aliases=("sd3", "sd3.5", "sd35"),
    support=FULL,
    detect=(Rule(keys=(_SD3_QKV, "x_embedder.proj.weight"),
                 evidence=("joint_blocks.0.context_block.attn.qkv with x_embedder.proj: "
                           "SD3 MMDiT (original layout)",)),
            Rule(keys=(_SD3_DIFFUSERS_Q, "pos_embed.proj.weight", "context_embedder.weight",
                       "transformer_blocks.0.norm1_context.linear.weight",
                       "time_text_embed.text_embedder.linear_1.weight"),
                 evidence=("transformer_blocks.0.attn.to_q with pos_embed.proj and "
                           "time_text_embed: SD3 MMDiT (diffusers layout)",))),
    variants=SD3_VARIANTS, layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=(_SD3_QKV,))),
                  (DIFFUSERS, Rule(keys=(_SD3_DIFFUSERS_Q,)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),
                Component("vae", VAE, VAE_PREFIX),
                Component("clip_l", TEXT_ENCODER, "text_encoders.clip_l."),
                Component("clip_g", TEXT_ENCODER, "text_encoders.clip_g."),
                Component("t5xxl", TEXT_ENCODER, "text_encoders.t5xxl.")),
    spec=None, blocks=_own_blocks(_family_blocks.SD3), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.SD3,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="sd3", adapters=True,
                   block_weights=True, modules=_sd3.lora_modules,
                   module_prefixes=_sd3.LORA_MODULE_PREFIXES),
    default_dtype="fp16", verify=PROBE, prediction=FLOW,
    # patch, text, timestep and pooled embedders, the final layer (ComfyUI's
    # comfy/ldm/modules/diffusionmodules/mmdit.py names)
    quant_keep=("x_embedder.", "context_embedder.", "t_embedder.", "y_embedder.",
                "final_layer.", "pos_embed"),
    probe=_probes.sd3(),
    notes=("a merge takes the VAE and text encoders of an all-in-one file from model A",),
)

# Qwen-Image (diffusers' QwenImageTransformer2DModel names, which ComfyUI keeps)
_QWEN_TXT_NORM = "txt_norm.weight"
QWEN_IMAGE = Architecture(
    name="qwen_image", label="Qwen-Image", short="qwen", family="qwen_image",
    aliases=("qwen_image", "qwen-image", "qwenimage"),
    support=FULL,
    detect=(Rule(keys=(_QWEN_TXT_NORM, "img_in.weight", "txt_in.weight",
                       "transformer_blocks.0.img_mod.1.weight",
                       "transformer_blocks.0.attn.add_q_proj.weight"),
                 evidence=("txt_norm, img_in and transformer_blocks.0.img_mod: Qwen-Image "
                           "transformer",)),),
    variants=(Variant("qwen-image", Rule(
        keys=("transformer_blocks.59.img_mod.1.weight",),
        absent=("transformer_blocks.60.img_mod.1.weight",),
        shapes=((_QWEN_TXT_NORM, 0, 3584), ("img_in.weight", 0, 3072),
                ("img_in.weight", 1, 64)))),),
    layouts=(DIFFUSERS,),
    layout_rules=((DIFFUSERS, Rule(keys=("transformer_blocks.0.attn.to_q.weight",))),),
    components=(Component("transformer", DENOISER, UNET_PREFIX),),
    spec=None, blocks=_own_blocks(_family_blocks.QWEN_IMAGE), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.QWEN_IMAGE,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="qwen_image", adapters=True,
                   block_weights=True, base_model_version="qwen_image",
                   modelspec_arch="Qwen-Image", modules=_qwen.lora_modules,
                   module_prefixes=_qwen.LORA_MODULE_PREFIXES),
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    # image and text inputs, timestep embedder, output norm and projection
    # (ComfyUI's comfy/ldm/qwen_image/model.py names)
    quant_keep=("img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "norm_out.",
                "proj_out."),
    probe=_probes.qwen_image(),
)

# Wan 2.1 / 2.2 (Wan-Video's WanModel names, which ComfyUI keeps)
_WAN_PATCH = "patch_embedding.weight"


def _wan_size(dim: int, in_dim: int) -> tuple[tuple[str, int, int], ...]:
    return ((_WAN_PATCH, 0, dim), (_WAN_PATCH, 1, in_dim))


def _wan_variants(q: str, img: str, k_img: str) -> tuple[Variant, ...]:
    """Wan variants in one layout (``q``: block 0's self-attention query,
    ``img``/``k_img``: the image embedder and image key projection)."""
    last = q.replace("blocks.0.", "blocks.{}.")
    return (Variant("i2v-14b", Rule(keys=(img, k_img), shapes=((_WAN_PATCH, 0, 5120),))),
            Variant("t2v-14b", Rule(absent=(last.format(40),), shapes=_wan_size(5120, 16))),
            Variant("t2v-1.3b", Rule(absent=(last.format(30),), shapes=_wan_size(1536, 16))),
            Variant("ti2v-5b", Rule(shapes=_wan_size(3072, 48))))


_WAN_Q, _WAN_DIFFUSERS_Q = "blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"
WAN = Architecture(
    name="wan", label="Wan", short="wan", family="wan",
    aliases=("wan", "wan2.1", "wan2.2", "wan21", "wan22"),
    support=FULL,
    detect=(Rule(keys=("head.modulation", _WAN_PATCH, _WAN_Q, "blocks.0.cross_attn.q.weight"),
                 evidence=("head.modulation, a 3-D patch_embedding and blocks.0.self_attn: "
                           "Wan video transformer (original layout)",)),
            Rule(keys=("scale_shift_table", _WAN_PATCH, _WAN_DIFFUSERS_Q,
                       "condition_embedder.time_proj.weight"),
                 evidence=("scale_shift_table, a 3-D patch_embedding and "
                           "condition_embedder: Wan video transformer (diffusers "
                           "layout)",))),
    # 1.3B: 1536 wide, 14B: 5120 (image-to-video adds the image embedder and
    # k_img), VACE adds vace_blocks, Wan 2.2 TI2V-5B: 3072 wide, 48 channels
    variants=(Variant("vace", Rule(keys=("vace_patch_embedding.weight",
                                         "vace_blocks.0.after_proj.weight"))),
              Variant("vace", Rule(keys=("vace_patch_embedding.weight",
                                         "vace_blocks.0.proj_out.weight"))),
              *_wan_variants(_WAN_Q, "img_emb.proj.1.weight",
                             "blocks.0.cross_attn.k_img.weight"),
              *_wan_variants(_WAN_DIFFUSERS_Q,
                             "condition_embedder.image_embedder.ff.net.0.proj.weight",
                             "blocks.0.attn2.add_k_proj.weight")),
    layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=(_WAN_Q,))), (DIFFUSERS, Rule(keys=(_WAN_DIFFUSERS_Q,)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),),
    spec=None, blocks=_own_blocks(_family_blocks.WAN), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.WAN,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="wan", adapters=True,
                   block_weights=True, base_model_version="wan",
                   modelspec_arch="wan2.1", modules=_wan.lora_modules,
                   module_prefixes=_wan.LORA_MODULE_PREFIXES),
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    # patch, text, time and image embedders and the head, in both layouts
    # (Wan-Video's wan/modules/model.py; diffusers' transformer_wan.py)
    quant_keep=("patch_embedding.", "text_embedding.", "time_embedding.",
                "time_projection.", "img_emb.", "head.", "condition_embedder.",
                "proj_out.", "norm_out."),
    probe=_probes.wan(),
)

# Flux.1 (BFL layout, ComfyUI's model_detection.py; diffusers' single_file_utils.py)
_FLUX_QK_NORM = "double_blocks.0.img_attn.norm.key_norm.scale"
_FLUX_DIFFUSERS_QK_NORM = "transformer_blocks.0.attn.norm_added_k.weight"
FLUX_BLOCKS = _flux.BLOCKS  # ComfyUI's ModelMergeFlux1 names


def _flux_variant_rules(img_in: str, guidance: str) -> tuple[Variant, ...]:
    """Flux variants by the image input width (64 plain, 384 Fill, 128 Depth)
    and the guidance embedder (dev has one, schnell not)."""
    return (Variant("fill", Rule(shapes=((img_in, 1, 384),))),
            Variant("depth", Rule(shapes=((img_in, 1, 128),))),
            Variant("dev", Rule(keys=(guidance,), shapes=((img_in, 1, 64),))),
            Variant("schnell", Rule(absent=(guidance,), shapes=((img_in, 1, 64),))))


FLUX = Architecture(
    name="flux", label="Flux.1", short="flux", family="flux",
    aliases=("flux", "flux1", "flux.1"), support=FULL,
    # per-block modulation and the pooled-text input tell Flux.1 from Chroma
    # (distilled guidance, no vector_in) and Flux.2 (shared modulation)
    detect=(Rule(keys=(_FLUX_QK_NORM, "double_blocks.0.img_mod.lin.weight",
                       "vector_in.in_layer.weight"),
                 shapes=((_FLUX_QK_NORM, 0, 128),),
                 evidence=("double_blocks.0.img_attn.norm.key_norm.scale [128] with "
                           "per-block modulation and vector_in: Flux.1 transformer "
                           "(BFL layout)",)),
            Rule(keys=(_FLUX_DIFFUSERS_QK_NORM, "single_transformer_blocks.0.proj_mlp.weight",
                       "transformer_blocks.0.norm1.linear.weight",
                       "time_text_embed.text_embedder.linear_1.weight"),
                 shapes=((_FLUX_DIFFUSERS_QK_NORM, 0, 128),),
                 evidence=("transformer_blocks.0.attn.norm_added_k [128] and "
                           "single_transformer_blocks: Flux.1 transformer (diffusers "
                           "layout)",))),
    # Kontext has the dev layout and cannot be told from dev by the header
    variants=(*_flux_variant_rules("img_in.weight", "guidance_in.in_layer.weight"),
              *_flux_variant_rules("x_embedder.weight",
                                   "time_text_embed.guidance_embedder.linear_1.weight")),
    layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=(_FLUX_QK_NORM,))),
                  (DIFFUSERS, Rule(keys=(_FLUX_DIFFUSERS_QK_NORM,)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),
                Component("vae", VAE, "vae."), Component("clip_l", TEXT_ENCODER,
                                                          "text_encoders.clip_l."),
                Component("t5xxl", TEXT_ENCODER, "text_encoders.t5xxl.")),
    spec=None,
    blocks=_own_blocks(_family_blocks.FLUX),
    prune=_DIT_PRUNE,
    # every LoRA command through the module table (block weights: the merge
    # block names); kohya sd-scripts writes ss_base_model_version "flux1"
    # (library/flux_utils.py MODEL_VERSION_FLUX_V1) and modelspec
    # "flux-1-dev/lora" (library/sai_model_spec.py ARCH_FLUX_1_DEV)
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="flux", adapters=True,
                   block_weights=True, base_model_version="flux1", modelspec_arch="flux-1-dev",
                   modules=_flux.lora_modules,
                   module_prefixes=_flux.LORA_MODULE_PREFIXES,
                   shares_names=("chroma", "flux2")),
    diffusers=None, gguf=_gguf.FLUX,
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    # what city96/ComfyUI-GGUF's tools/lcpp.patch never quantizes for Flux
    # (BFL layout), and the same layers in the diffusers layout
    quant_keep=("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
                "final_layer.", "x_embedder.", "context_embedder.", "time_text_embed.",
                "norm_out.", "proj_out."),
    probe=_probes.flux(),
    notes=("Kontext has the dev layout and reads as dev",
           "merge takes either layout (all inputs in one); a merge takes the VAE and "
           "text encoders of an all-in-one file from model A"),
)

# Chroma (Flux.1-schnell derivative: no per-block modulation; ComfyUI's
# model_detection.py tells it by distilled_guidance_layer.norms.0.scale)
_CHROMA_APPROX = "distilled_guidance_layer.in_proj.weight"
CHROMA = Architecture(
    name="chroma", label="Chroma", short="chroma", family="chroma",
    aliases=("chroma",),
    support=FULL,
    detect=(Rule(keys=(_CHROMA_APPROX, _FLUX_QK_NORM, "single_blocks.0.linear1.weight"),
                 absent=("double_blocks.0.img_mod.lin.weight",),
                 evidence=("distilled_guidance_layer with Flux.1 blocks and no per-block "
                           "modulation: Chroma transformer (original layout)",)),
            Rule(keys=(_CHROMA_APPROX, _FLUX_DIFFUSERS_QK_NORM,
                       "single_transformer_blocks.0.proj_mlp.weight"),
                 evidence=("distilled_guidance_layer with transformer_blocks: Chroma "
                           "transformer (diffusers layout)",))),
    variants=(Variant("radiance", Rule(keys=("nerf_blocks.0.norm.scale",))),
              Variant("chroma", Rule(shapes=(("img_in.weight", 1, 64),))),
              Variant("chroma", Rule(shapes=(("x_embedder.weight", 1, 64),)))),
    layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=(_FLUX_QK_NORM,))),
                  (DIFFUSERS, Rule(keys=(_FLUX_DIFFUSERS_QK_NORM,)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),),
    spec=None, blocks=_own_blocks(_family_blocks.CHROMA), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.CHROMA,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="chroma", adapters=True,
                   block_weights=True, base_model_version="chroma",
                   modelspec_arch="chroma", modules=_chroma.lora_modules,
                   module_prefixes=_chroma.LORA_MODULE_PREFIXES,
                   shares_names=("flux", "flux2")),
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    probe=_probes.chroma(),
    # the embedders, the guidance approximator and the final layer (Flux.1's keep
    # list, both layouts)
    quant_keep=("img_in.", "txt_in.", "distilled_guidance_layer.", "final_layer.",
                "x_embedder.", "context_embedder.", "proj_out."),
)

# Flux.2 (shared per-stream modulation; 128 latent channels)
_FLUX2_MOD = "double_stream_modulation_img.lin.weight"
_FLUX2_DIFFUSERS_MOD = "double_stream_modulation_img.linear.weight"
FLUX2 = Architecture(
    name="flux2", label="Flux.2", short="flux2", family="flux2",
    aliases=("flux2", "flux.2"),
    support=FULL,
    detect=(Rule(keys=(_FLUX2_MOD, "single_stream_modulation.lin.weight",
                       "double_blocks.0.img_attn.qkv.weight"),
                 evidence=("double_stream_modulation_img and single_stream_modulation "
                           "shared by all blocks: Flux.2 transformer (original layout)",)),
            Rule(keys=(_FLUX2_DIFFUSERS_MOD, "single_stream_modulation.linear.weight",
                       "transformer_blocks.0.attn.to_q.weight"),
                 evidence=("double_stream_modulation_img and single_stream_modulation "
                           "shared by all blocks: Flux.2 transformer (diffusers "
                           "layout)",))),
    variants=(Variant("dev", Rule(keys=("double_blocks.7.img_attn.qkv.weight",),
                                  absent=("double_blocks.8.img_attn.qkv.weight",),
                                  shapes=((_FLUX2_MOD, 1, 6144),))),
              Variant("dev", Rule(keys=("transformer_blocks.7.attn.to_q.weight",),
                                  absent=("transformer_blocks.8.attn.to_q.weight",),
                                  shapes=((_FLUX2_DIFFUSERS_MOD, 1, 6144),)))),
    layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=(_FLUX2_MOD,))),
                  (DIFFUSERS, Rule(keys=(_FLUX2_DIFFUSERS_MOD,)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),),
    spec=None, blocks=_own_blocks(_family_blocks.FLUX2), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.FLUX2,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="flux2", adapters=True,
                   block_weights=True, base_model_version="flux_2_dev",
                   modules=_flux2.lora_modules,
                   module_prefixes=_flux2.LORA_MODULE_PREFIXES,
                   shares_names=("flux", "chroma")),
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    probe=_probes.flux2(),
    quant_keep=("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.",
                "x_embedder.", "context_embedder.", "time_guidance_embed.", "norm_out.",
                "proj_out."),
)

# Z-Image (Lumina-2 family; ComfyUI's model_detection.py: cap_embedder.1.weight,
# whose width tells Z-Image's 2560 -> 3840 from Lumina 2.0's 2304 -> 2304)
_ZIMAGE_CAP = "cap_embedder.1.weight"
Z_IMAGE = Architecture(
    name="z_image", label="Z-Image", short="zimage", family="z_image",
    aliases=("z_image", "z-image", "zimage"),
    support=FULL,
    detect=(Rule(keys=(_ZIMAGE_CAP, "noise_refiner.0.adaLN_modulation.0.weight",
                       "context_refiner.0.feed_forward.w1.weight"),
                 shapes=((_ZIMAGE_CAP, 0, 3840), (_ZIMAGE_CAP, 1, 2560)),
                 evidence=("cap_embedder.1 [3840, 2560] with noise and context refiners: "
                           "Z-Image transformer",)),),
    variants=(Variant("z-image", Rule(keys=("layers.29.feed_forward.w1.weight",),
                                      absent=("layers.30.feed_forward.w1.weight",))),),
    layouts=(ORIGINAL, DIFFUSERS),
    layout_rules=((ORIGINAL, Rule(keys=("layers.0.attention.qkv.weight",))),
                  (DIFFUSERS, Rule(keys=("layers.0.attention.to_q.weight",)))),
    components=(Component("transformer", DENOISER, UNET_PREFIX),),
    spec=None, blocks=_own_blocks(_family_blocks.Z_IMAGE), prune=_DIT_PRUNE,
    diffusers=None, gguf=_gguf.Z_IMAGE,
    lora=LoraNames(("kohya", "peft", "comfyui"), kohya_unet="z_image", adapters=True,
                   block_weights=True, base_model_version="z_image",
                   modelspec_arch="Z-Image", modules=_z_image.lora_modules,
                   module_prefixes=_z_image.LORA_MODULE_PREFIXES),
    default_dtype="bf16", verify=PROBE, prediction=FLOW,
    probe=_probes.z_image(),
    quant_keep=("x_embedder.", "all_x_embedder.", "final_layer.", "all_final_layer.",
                "t_embedder.", "cap_embedder.", "x_pad_token", "cap_pad_token"),
    notes=("Z-Image and Z-Image-Turbo share one layout and read as z-image",),
)

REGISTRY: dict[str, Architecture] = {a.name: a for a in (
    SD1, SD2, SDXL, SDXL_REFINER, SD3, FLUX, CHROMA, FLUX2, QWEN_IMAGE, WAN, Z_IMAGE)}


# --- derived lists ----------------------------------------------------------------


def names(*, support: str | None = None, where: Callable[[Architecture], bool] | None = None
          ) -> tuple[str, ...]:
    """Registered names in registry order, optionally only those with
    ``support`` and for which ``where`` holds."""
    return tuple(a.name for a in REGISTRY.values()
                 if (support is None or a.support == support) and (where is None or where(a)))


# commands that handle every entry declaring their table, whatever its support
# level: the table is what they need (export-gguf: the GGUF policy; verify:
# the probe's blocks, its per-layer gates and static checks; quantize: the
# layers kept in high precision)
TABLE_OF_COMMAND = {"export-gguf": "gguf", "verify": "probe", "quantize": "quant_keep"}


def handles(name: str, command: str) -> bool:
    """Whether ``command`` (``merge``, ``lora bake``, ``prune``...) handles
    architecture ``name``: every command handles a FULL entry, a PARTIAL one
    the commands it lists, and a command of :data:`TABLE_OF_COMMAND` every
    entry with its table."""
    arch = REGISTRY.get(name)
    if arch is None:
        return False
    table = TABLE_OF_COMMAND.get(command)
    if table is not None and getattr(arch, table):
        return True
    return arch.support == FULL or (arch.support == PARTIAL and command in arch.commands)


def commands_of(name: str) -> tuple[str, ...]:
    """The commands that handle a PARTIAL or DETECT entry, sorted: those it
    lists, those of :data:`TABLE_OF_COMMAND` whose table it declares, and
    ``inspect``, which names every entry."""
    arch = REGISTRY.get(name)
    if arch is None:
        return ()
    tables = {c for c in TABLE_OF_COMMAND if handles(name, c)}
    return tuple(sorted(set(arch.commands) | tables | {"inspect"}))


def handling(command: str) -> tuple[str, ...]:
    """The architectures ``command`` handles, in registry order."""
    return names(where=lambda a: handles(a.name, command))


def lora_archs(*, block_weights: bool = False) -> tuple[str, ...]:
    """Architectures the LoRA commands handle (with ``block_weights``: those
    with LoRA block weights)."""
    return names(where=lambda a: a.lora is not None and a.lora.adapters
                 and (a.lora.block_weights or not block_weights))


def block_list_archs() -> tuple[str, ...]:
    """One architecture per distinct block list (SD2 and the refiner share
    SD1's 26 blocks): ``("sd1", "sdxl")``."""
    seen: dict[tuple[str, ...], str] = {}
    for a in REGISTRY.values():
        if a.blocks is not None:
            seen.setdefault(a.blocks.names, a.name)
    return tuple(seen.values())


def listed(archs: tuple[str, ...] | None = None) -> str:
    """``sd1, sd2, sdxl and sdxl_refiner``: names for a message (default: the
    fully supported ones)."""
    archs = names(support=FULL) if archs is None else archs
    return archs[0] if len(archs) == 1 else f"{', '.join(archs[:-1])} and {archs[-1]}"


def get(name: str) -> Architecture | None:
    """The entry for ``name``, or None."""
    return REGISTRY.get(name)


def label(name: str) -> str:
    """How people write an architecture (``SDXL``), the name itself when unknown."""
    arch = REGISTRY.get(name)
    return arch.label if arch else name


def same_family(a: str, b: str) -> bool:
    """Whether two architectures are of one family (SDXL and its refiner)."""
    fa, fb = REGISTRY.get(a), REGISTRY.get(b)
    return a == b or (fa is not None and fb is not None and fa.family == fb.family)


def folder_aliases() -> dict[str, str]:
    """Folder name -> architecture, from every entry's aliases."""
    return {alias: a.name for a in REGISTRY.values() for alias in a.aliases}


# --- the generic detector ------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """What the rules say: architecture, variant, layout and the reasons."""

    arch: str
    variant: str | None
    layout: str | None
    evidence: tuple[str, ...]


def first_match(rules: Iterable[tuple[str, Rule]], keys: Mapping[str, Shape],
                facts: Mapping[str, Any] | None = None) -> tuple[str, Rule] | None:
    """The first ``(name, rule)`` whose rule holds."""
    return next(((n, r) for n, r in rules if r.holds(keys, facts)), None)


def detect_denoiser(keys: Mapping[str, Shape], facts: Mapping[str, Any] | None = None, *,
                    archs: Iterable[Architecture] | None = None) -> Detection | None:
    """Match ``keys`` (denoiser keys, relative to its root) against every
    entry's detection rules in registry order."""
    entries = list(REGISTRY.values() if archs is None else archs)
    hit = first_match(((a.name, r) for a in entries for r in a.detect), keys, facts)
    if hit is None:
        return None
    arch = REGISTRY[hit[0]]
    variant = first_match(((v.name, v.rule) for v in arch.variants), keys, facts)
    layout = first_match(arch.layout_rules, keys, facts)
    return Detection(arch.name, variant[0] if variant else None,
                     layout[0] if layout else None, tuple(hit[1].explain(facts or {})))


def strip_denoiser_prefix(keys: Mapping[str, Shape]) -> dict[str, Shape]:
    """The keys under the denoiser prefix ``model.diffusion_model.`` without
    it, or ``keys`` themselves when none carries the prefix."""
    inner = {k[len(UNET_PREFIX):]: s for k, s in keys.items() if k.startswith(UNET_PREFIX)}
    return inner or dict(keys)


def declared_fields() -> tuple[str, ...]:
    """The fields every entry declares (the registry test checks them)."""
    return tuple(f.name for f in fields(Architecture))
