"""Adapter module names as data: which checkpoint weight each LoRA/LyCORIS
module patches.

Everything here is derived from the key tables in :mod:`modelkit.arch.keys`
and the :class:`~modelkit.arch.configs.UNetConfig` numbers, so it holds for
every config (SD1/SD2 with 4 levels, SDXL with 3, and the tiny test configs).

Three facts drive the tables (see the project's LoRA reference, section 1):

* kohya/LyCORIS names are ``lora_<part>_`` + the module path with ``.`` turned
  into ``_``. For SD1/SD2 the UNet path is the *diffusers* one
  (``down_blocks.0.attentions.0...``); for SDXL it is the *LDM/SGM* one
  (``input_blocks.4.1...``), because kohya builds a different UNet class.
* Text encoders are always named in the Hugging Face CLIP layout
  (``text_model.encoder.layers.N.self_attn.q_proj``), also for the open_clip
  towers (SD2, SDXL bigG) whose checkpoints store a fused
  ``attn.in_proj_weight``: q, k and v are its row thirds.
* The ``_`` flattening is lossy (module names contain ``_``), so names are
  resolved by table lookup, never by parsing.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from modelkit.arch.configs import UNET_PREFIX, ArchSpec, TextEncoderSlot, UNetConfig
from modelkit.arch.keys import Shape, text_encoder_keys, unet_keys
from modelkit.arch.registry import REGISTRY

# --- LDM <-> diffusers UNet module paths ---------------------------------------

RESNET = "resnet"
ATTENTION = "attention"
LEAF = "leaf"

# inside a ResBlock: LDM sub-path -> diffusers sub-path
RESNET_PARTS: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# modules outside the down/mid/up blocks: LDM path -> diffusers path
UNET_STEMS: dict[str, str] = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

# module groups, as trainers select them
GROUP_TRANSFORMER = "transformer"  # Transformer2D: proj_in/out, attn*, ff (kohya default)
GROUP_RESNET = "resnet"  # ResBlock convs and time_emb_proj (LoCon)
GROUP_SAMPLER = "sampler"  # down/upsampler convs (LoCon)
GROUP_STEM = "stem"  # conv_in, conv_out, time/label embedding (LyCORIS "full")
GROUP_TEXT = "text"  # CLIP q/k/v/out_proj, fc1, fc2
GROUP_NORM = "norm"  # GroupNorm/LayerNorm (LyCORIS w_norm/b_norm, full diff)


def _down_blocks(cfg: UNetConfig, blocks: dict[str, tuple[str, str]]) -> None:
    levels = len(cfg.channel_mult)
    idx = 1
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{idx}.0"] = (f"down_blocks.{i}.resnets.{j}", RESNET)
            if cfg.transformer_depth[i]:
                blocks[f"input_blocks.{idx}.1"] = (f"down_blocks.{i}.attentions.{j}",
                                                   ATTENTION)
            idx += 1
        if i < levels - 1:
            blocks[f"input_blocks.{idx}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv",
                                                  LEAF)
            idx += 1


def _up_blocks(cfg: UNetConfig, blocks: dict[str, tuple[str, str]]) -> None:
    levels = len(cfg.channel_mult)
    idx = 0
    for i, level in enumerate(range(levels - 1, -1, -1)):
        has_attn = bool(cfg.transformer_depth[level])
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{idx}.0"] = (f"up_blocks.{i}.resnets.{j}", RESNET)
            if has_attn:
                blocks[f"output_blocks.{idx}.1"] = (f"up_blocks.{i}.attentions.{j}",
                                                    ATTENTION)
            if level and j == cfg.num_res_blocks:
                # the upsampler follows the attention when the level has one:
                # output_blocks.N.2.conv (SDXL up_blocks.0), else .1 (SD1 up_blocks.0)
                sub = 2 if has_attn else 1
                blocks[f"output_blocks.{idx}.{sub}.conv"] = (
                    f"up_blocks.{i}.upsamplers.0.conv", LEAF)
            idx += 1


@lru_cache(maxsize=32)
def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """LDM block path -> (diffusers block path, kind) for ``cfg``. Kind is
    ``resnet`` (sub-modules renamed by :data:`RESNET_PARTS`), ``attention``
    (sub-modules keep their names) or ``leaf`` (a single module)."""
    blocks: dict[str, tuple[str, str]] = {k: (v, LEAF) for k, v in UNET_STEMS.items()}
    _down_blocks(cfg, blocks)
    blocks["middle_block.0"] = ("mid_block.resnets.0", RESNET)
    blocks["middle_block.1"] = ("mid_block.attentions.0", ATTENTION)
    blocks["middle_block.2"] = ("mid_block.resnets.1", RESNET)
    _up_blocks(cfg, blocks)
    return blocks


def _ldm_module_to_diffusers(module: str, blocks: dict[str, tuple[str, str]]) -> str:
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        hit = blocks.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, kind = hit
        rest = ".".join(parts[cut:])
        if kind == LEAF and not rest:
            return target
        if kind == RESNET and rest in RESNET_PARTS:
            return f"{target}.{RESNET_PARTS[rest]}"
        if kind == ATTENTION and rest:
            return f"{target}.{rest}"
        break
    raise KeyError(f"no diffusers name for UNet module {module!r}")


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


@lru_cache(maxsize=32)
def _ldm_to_diffusers(cfg: UNetConfig) -> dict[str, str]:
    blocks = unet_blocks(cfg)
    modules = dict.fromkeys(_module_of(k) for k in unet_keys(cfg))
    return {m: _ldm_module_to_diffusers(m, blocks) for m in modules}


def unet_ldm_to_diffusers(cfg: UNetConfig) -> dict[str, str]:
    """Every UNet module path (LDM, unprefixed, e.g. ``input_blocks.1.0.in_layers.2``)
    -> its diffusers path (``down_blocks.0.resnets.0.conv1``), norms included."""
    return dict(_ldm_to_diffusers(cfg))


def unet_diffusers_to_ldm(cfg: UNetConfig) -> dict[str, str]:
    """The inverse of :func:`unet_ldm_to_diffusers`."""
    return {d: m for m, d in _ldm_to_diffusers(cfg).items()}


# --- adapter module targets ----------------------------------------------------


@dataclass(frozen=True)
class ModuleTarget:
    """Where one adapter module lands in a single-file checkpoint.

    ``shape`` is the shape ΔW must have: the full weight's shape, or for a
    fused open_clip q/k/v projection the ``rows`` slice ``[start, stop)`` of
    ``key`` (``attn.in_proj_weight``) it patches.
    """

    name: str  # adapter module name in the requested naming
    component: str  # unet, te, te1, te2
    path: str  # module path inside the component, in the naming's style
    group: str  # transformer, resnet, sampler, stem, text
    key: str  # full checkpoint weight key (``...weight`` / ``...in_proj_weight``)
    shape: Shape
    rows: tuple[int, int] | None = None
    bias_key: str | None = None  # same rows slice applies when ``rows`` is set
    # rows of the whole fused weight ``rows`` counts in (a Flux q/k/v or MLP
    # slice; scale by the real weight's rows); None: q/k/v thirds
    of: int | None = None
    # the module's rows are the weight's with its two halves swapped (diffusers'
    # norm_out.linear: scale, shift where the original has shift, scale)
    swap: bool = False

    @property
    def is_conv(self) -> bool:
        """True when the patched weight is a conv kernel (4-D, 1x1 included)."""
        return len(self.shape) == 4

    @property
    def is_fused(self) -> bool:
        """True when the module is a row slice of a fused q/k/v weight."""
        return self.rows is not None


NAMINGS = ("kohya", "peft", "comfyui")
# kohya's SGM UNet class (SDXL) names LDM modules; SD2's open_clip tower is
# converted to a 23-layer HF CLIP (the last is unused): the registry says so
KOHYA_LDM_UNET = frozenset(a.name for a in REGISTRY.values()
                           if a.lora and a.lora.kohya_unet == "ldm")
KOHYA_TE_DROPPED_LAYERS = {a.name: a.lora.kohya_te_dropped_layers for a in REGISTRY.values()
                           if a.lora and a.lora.kohya_te_dropped_layers}

PEFT_TE_PREFIX = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
PEFT_UNET_PREFIX = "unet"
COMFY_UNET_PREFIX = "diffusion_model"
COMFY_TE_PREFIX = "text_encoders"

# HF CLIP module (what names use) -> (open_clip module, q/k/v third or None)
TE_MODULES: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj": ("attn.in_proj", 0),
    "self_attn.k_proj": ("attn.in_proj", 1),
    "self_attn.v_proj": ("attn.in_proj", 2),
    "self_attn.out_proj": ("attn.out_proj", None),
    "mlp.fc1": ("mlp.c_fc", None),
    "mlp.fc2": ("mlp.c_proj", None),
}


def kohya_unet_style(arch: ArchSpec) -> str:
    """``ldm`` for SDXL (kohya's SGM UNet), ``diffusers`` for SD1/SD2."""
    return "ldm" if arch.name in KOHYA_LDM_UNET else "diffusers"


def kohya_te_layers(arch: ArchSpec, slot: TextEncoderSlot) -> int:
    """How many text-encoder layers kohya trains (SD2: 23 of 24)."""
    return slot.config.layers - KOHYA_TE_DROPPED_LAYERS.get(arch.name, 0)


def comfy_clip_name(slot: TextEncoderSlot) -> str:
    """ComfyUI's name for a text encoder: ``clip_l``, ``clip_h`` or ``clip_g``."""
    if slot.name == "te2":
        return "clip_g"
    return "clip_l" if slot.config.layout == "hf" else "clip_h"


def _unet_group(diffusers_path: str) -> str:
    if ".attentions." in diffusers_path:
        return GROUP_TRANSFORMER
    if "samplers." in diffusers_path:
        return GROUP_SAMPLER
    if ".resnets." in diffusers_path:
        return GROUP_RESNET
    return GROUP_STEM


def _unet_name(naming: str, style: str, ldm: str, diffusers: str) -> str:
    path = ldm if style == "ldm" else diffusers
    if naming == "kohya":
        return "lora_unet_" + path.replace(".", "_")
    if naming == "peft":
        return f"{PEFT_UNET_PREFIX}.{path}"
    return f"{COMFY_UNET_PREFIX}.{path}"


def _unet_targets(cfg: UNetConfig, naming: str, style: str) -> list[ModuleTarget]:
    keys = unet_keys(cfg)
    out = []
    for ldm, diffusers in _ldm_to_diffusers(cfg).items():
        shape = keys.get(f"{ldm}.weight")
        if shape is None or len(shape) < 2:
            continue  # norms carry 1-D weights; adapters patch Linear/Conv only
        bias = f"{ldm}.bias"
        out.append(ModuleTarget(
            name=_unet_name(naming, style, ldm, diffusers), component="unet",
            path=ldm if style == "ldm" else diffusers,
            group=_unet_group(diffusers), key=UNET_PREFIX + ldm + ".weight",
            shape=shape, bias_key=UNET_PREFIX + bias if bias in keys else None,
        ))
    return out


def _te_name(naming: str, slot: TextEncoderSlot, hf_path: str) -> str:
    if naming == "kohya":
        return f"lora_{slot.name}_" + hf_path.replace(".", "_")
    if naming == "peft":
        return f"{PEFT_TE_PREFIX[slot.name]}.{hf_path}"
    return f"{COMFY_TE_PREFIX}.{comfy_clip_name(slot)}.transformer.{hf_path}"


def _te_target(slot: TextEncoderSlot, layer: int, module: str, naming: str) -> ModuleTarget:
    keys = text_encoder_keys(slot.config)
    hf_path = f"text_model.encoder.layers.{layer}.{module}"
    name = _te_name(naming, slot, hf_path)
    if slot.config.layout == "hf":
        base = slot.prefix + hf_path
        return ModuleTarget(name, slot.name, hf_path, GROUP_TEXT, base + ".weight",
                            keys[hf_path + ".weight"], None, base + ".bias")
    oc_module, third = TE_MODULES[module]
    oc_path = f"transformer.resblocks.{layer}.{oc_module}"
    base = slot.prefix + oc_path
    if third is None:
        return ModuleTarget(name, slot.name, hf_path, GROUP_TEXT, base + ".weight",
                            keys[oc_path + ".weight"], None, base + ".bias")
    width = slot.config.width
    rows = (third * width, (third + 1) * width)
    return ModuleTarget(name, slot.name, hf_path, GROUP_TEXT, base + "_weight",
                        (width, width), rows, base + "_bias")


def _te_targets(slot: TextEncoderSlot, naming: str) -> list[ModuleTarget]:
    return [_te_target(slot, layer, module, naming)
            for layer in range(slot.config.layers) for module in TE_MODULES]


def te_layer(target: ModuleTarget) -> int | None:
    """The encoder layer index of a text-encoder target (None for the UNet)."""
    if target.group != GROUP_TEXT:
        return None
    return int(target.path.split(".")[3])


@lru_cache(maxsize=64)
def _targets(name: str, unet: UNetConfig, slots: tuple[TextEncoderSlot, ...],
             naming: str, style: str) -> dict[str, ModuleTarget]:
    found = _unet_targets(unet, naming, style)
    for slot in slots:
        found += _te_targets(slot, naming)
    return {t.name: t for t in found}


def _check_naming(naming: str, unet_style: str | None, arch: ArchSpec) -> str:
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; choose one of {', '.join(NAMINGS)}")
    if unet_style is None:
        defaults = {"kohya": kohya_unet_style(arch), "peft": "diffusers", "comfyui": "ldm"}
        return defaults[naming]
    if unet_style not in ("ldm", "diffusers"):
        raise ValueError(f"unknown unet_style {unet_style!r}; use 'ldm' or 'diffusers'")
    return unet_style


def lora_module_targets(arch: ArchSpec, naming: str = "kohya",
                        unet_style: str | None = None) -> dict[str, ModuleTarget]:
    """Adapter module name -> :class:`ModuleTarget` for every Linear/Conv
    module of ``arch``'s UNet and the text encoders' q/k/v/out_proj, fc1, fc2.

    Args:
        naming: ``kohya`` (``lora_unet_...``, ``lora_te1_...``; also LyCORIS),
            ``peft`` (``unet.down_blocks...``, ``text_encoder.text_model...``)
            or ``comfyui`` (``diffusion_model.<LDM path>``,
            ``text_encoders.clip_l.transformer.text_model...``).
        unet_style: ``diffusers`` or ``ldm`` UNet paths; default is what the
            naming's tools write (kohya: diffusers for SD1/SD2, LDM for SDXL).

    The result is shared; do not modify it.
    """
    style = _check_naming(naming, unet_style, arch)
    return _targets(arch.name, arch.unet, arch.text_encoders, naming, style)


def lora_module_map(arch: ArchSpec, naming: str = "kohya",
                    unet_style: str | None = None) -> dict[str, str]:
    """Adapter module name -> the full checkpoint weight key it patches, e.g.
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``.
    Fused q/k/v modules map to ``...attn.in_proj_weight``; their row slice is
    in :func:`lora_module_targets`."""
    return {n: t.key for n, t in lora_module_targets(arch, naming, unet_style).items()}


def checkpoint_key_modules(arch: ArchSpec, naming: str = "kohya",
                           unet_style: str | None = None) -> dict[str, list[str]]:
    """Checkpoint weight key -> the adapter module names that patch it (one,
    or q, k and v in row order for a fused ``in_proj_weight``)."""
    out: dict[str, list[str]] = {}
    targets = lora_module_targets(arch, naming, unet_style).values()
    for t in sorted(targets, key=lambda t: t.rows or (0, 0)):
        out.setdefault(t.key, []).append(t.name)
    return out


# HF CLIP norm (what names use) -> open_clip norm, per layer or final
TE_NORMS: dict[str, str] = {"layer_norm1": "ln_1", "layer_norm2": "ln_2"}
TE_FINAL_NORM = ("text_model.final_layer_norm", "ln_final")


def _unet_norm_targets(cfg: UNetConfig, naming: str, style: str) -> list[ModuleTarget]:
    keys = unet_keys(cfg)
    out = []
    for ldm, diffusers in _ldm_to_diffusers(cfg).items():
        shape = keys.get(f"{ldm}.weight")
        if shape is None or len(shape) != 1:
            continue
        out.append(ModuleTarget(
            name=_unet_name(naming, style, ldm, diffusers), component="unet",
            path=ldm if style == "ldm" else diffusers, group=GROUP_NORM,
            key=UNET_PREFIX + ldm + ".weight", shape=shape,
            bias_key=UNET_PREFIX + ldm + ".bias"))
    return out


def _te_norm_targets(slot: TextEncoderSlot, naming: str) -> list[ModuleTarget]:
    paths = [(f"text_model.encoder.layers.{i}.{hf}", f"transformer.resblocks.{i}.{oc}")
             for i in range(slot.config.layers) for hf, oc in TE_NORMS.items()]
    paths.append(TE_FINAL_NORM)
    out = []
    for hf_path, oc_path in paths:
        base = slot.prefix + (hf_path if slot.config.layout == "hf" else oc_path)
        out.append(ModuleTarget(_te_name(naming, slot, hf_path), slot.name, hf_path,
                                GROUP_NORM, base + ".weight", (slot.config.width,), None,
                                base + ".bias"))
    return out


@lru_cache(maxsize=64)
def _norm_targets(name: str, unet: UNetConfig, slots: tuple[TextEncoderSlot, ...],
                  naming: str, style: str) -> dict[str, ModuleTarget]:
    found = _unet_norm_targets(unet, naming, style)
    for slot in slots:
        found += _te_norm_targets(slot, naming)
    return {t.name: t for t in found}


def norm_module_targets(arch: ArchSpec, naming: str = "kohya",
                        unet_style: str | None = None) -> dict[str, ModuleTarget]:
    """Like :func:`lora_module_targets`, for the norm layers (GroupNorm and
    LayerNorm weights and biases) that LyCORIS ``w_norm``/``b_norm`` and
    full ``diff`` modules patch. The result is shared; do not modify it."""
    style = _check_naming(naming, unet_style, arch)
    return _norm_targets(arch.name, arch.unet, arch.text_encoders, naming, style)


def resolve_module(arch: ArchSpec, name: str) -> ModuleTarget | None:
    """Find ``name`` under any naming and UNet style of ``arch`` (kohya names
    in the other style, e.g. SDXL LoRAs with diffusers paths, included)."""
    for naming in NAMINGS:
        for style in ("diffusers", "ldm"):
            hit = lora_module_targets(arch, naming, style).get(name)
            if hit is not None:
                return hit
    return None


__all__ = [
    "GROUP_NORM",
    "GROUP_RESNET",
    "GROUP_SAMPLER",
    "GROUP_STEM",
    "GROUP_TEXT",
    "GROUP_TRANSFORMER",
    "NAMINGS",
    "RESNET_PARTS",
    "TE_MODULES",
    "UNET_STEMS",
    "ModuleTarget",
    "checkpoint_key_modules",
    "comfy_clip_name",
    "kohya_te_layers",
    "kohya_unet_style",
    "lora_module_map",
    "lora_module_targets",
    "norm_module_targets",
    "resolve_module",
    "te_layer",
    "unet_blocks",
    "unet_diffusers_to_ldm",
    "unet_ldm_to_diffusers",
]
