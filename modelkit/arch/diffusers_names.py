"""Where each original single-file key lives in a diffusers folder, as data.

A diffusers SD folder splits a checkpoint into component folders (``unet/``,
``vae/``, ``text_encoder/``, ``text_encoder_2/``), each with its own key
names. :func:`diffusers_layout` lists, for every key of an :class:`ArchSpec`'s
key tables (:mod:`modelkit.arch.keys`), its *home*: the component, the
diffusers key(s) and the operation between the two:

* ``copy``: same tensor under another name;
* ``reshape``: the VAE mid-block attention 1x1 convs ``[C, C, 1, 1]`` are
  ``Linear`` ``[C, C]`` weights in diffusers;
* ``transpose``: open_clip's ``text_projection`` ``[width, proj]`` is
  ``text_projection.weight`` ``[proj, width]`` (a ``Linear`` weight);
* ``split``: open_clip's fused ``attn.in_proj_weight``/``in_proj_bias`` are
  q, k and v (row thirds, q first).

Keys with no home (schedule buffers, EMA, markers, ``logit_scale``, SD2's
last text-encoder layer and its ``text_projection``) are not listed; the
converter keeps them beside the folder. The module also turns an ArchSpec
into the diffusers/transformers ``config.json`` dicts and back.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from modelkit.arch.configs import (
    ARCHS,
    TINY,
    UNET_PREFIX,
    VAE_PREFIX,
    ArchSpec,
    TextEncoderConfig,
    TextEncoderSlot,
    UNetConfig,
    VAEConfig,
)
from modelkit.arch.keys import POSITION_IDS, Shape, text_encoder_keys, unet_keys, vae_keys
from modelkit.arch.lora_names import unet_ldm_to_diffusers
from modelkit.arch.registry import REGISTRY, DiffusersNames
from modelkit.errors import ModelkitError

COPY, RESHAPE, TRANSPOSE, SPLIT = "copy", "reshape", "transpose", "split"

UNET, VAE = "unet", "vae"
TEXT_ENCODER, TEXT_ENCODER_2 = "text_encoder", "text_encoder_2"
# single-file text encoder slot -> diffusers component folder
TE_FOLDERS = {"te": TEXT_ENCODER, "te1": TEXT_ENCODER, "te2": TEXT_ENCODER_2}
# weight file stems: diffusers models / transformers models
WEIGHT_STEMS = {UNET: "diffusion_pytorch_model", VAE: "diffusion_pytorch_model",
                TEXT_ENCODER: "model", TEXT_ENCODER_2: "model"}
# diffusers' SD2 text encoder is a 23-layer CLIPTextModel: SD2 conditions on the
# penultimate layer, so the last layer and text_projection are never used
DIFFUSERS_TE_DROPPED_LAYERS = {a.name: a.diffusers.te_dropped_layers
                               for a in REGISTRY.values()
                               if a.diffusers and a.diffusers.te_dropped_layers}

SCALING_FACTORS = {a.name: a.diffusers.scaling_factor for a in REGISTRY.values()
                   if a.diffusers}
DEFAULT_SCALING_FACTOR = 0.18215
SCHEDULER_CLASS = "EulerDiscreteScheduler"


@dataclass(frozen=True)
class KeyHome:
    """Where one original key lives in a diffusers folder.

    ``names`` holds one diffusers key, or three (q, k, v) for ``split``;
    ``part_shape`` is the shape of each.
    """

    original: str
    component: str
    names: tuple[str, ...]
    op: str
    shape: Shape
    part_shape: Shape


@dataclass(frozen=True)
class DiffusersLayout:
    """Every original key of ``arch`` that has a diffusers home."""

    arch: ArchSpec
    homes: dict[str, KeyHome]
    optional: frozenset[str] = frozenset()  # homes a checkpoint may lack
    # component -> diffusers key -> (original key, part index)
    by_component: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        """Component folders in writing order."""
        return list(self.by_component)

    def homeless(self, keys: list[str]) -> list[str]:
        """The given original keys that have no diffusers home."""
        return [k for k in keys if k not in self.homes]


def _diffusers(name: str) -> DiffusersNames:
    arch = REGISTRY.get(name)
    if arch is None or arch.diffusers is None:
        raise ModelkitError(f"no diffusers layout for architecture {name!r}")
    return arch.diffusers


def te_folder(slot: TextEncoderSlot) -> str:
    """The diffusers folder of a text-encoder slot."""
    return TE_FOLDERS[slot.name]


def te_has_projection(slot: TextEncoderSlot) -> bool:
    """SDXL's bigG (slot ``te2``) is a CLIPTextModelWithProjection in diffusers."""
    return slot.name == "te2"


def te_diffusers_layers(arch: ArchSpec, slot: TextEncoderSlot) -> int:
    """How many encoder layers the diffusers text encoder keeps."""
    return slot.config.layers - DIFFUSERS_TE_DROPPED_LAYERS.get(arch.name, 0)


# --- key homes ---------------------------------------------------------------------


def _unet_homes(cfg: UNetConfig) -> list[KeyHome]:
    modules = unet_ldm_to_diffusers(cfg)
    out = []
    for key, shape in unet_keys(cfg).items():
        module, leaf = key.rsplit(".", 1)
        out.append(KeyHome(UNET_PREFIX + key, UNET, (f"{modules[module]}.{leaf}",), COPY,
                           shape, shape))
    return out


VAE_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}
VAE_RENAMES = {"norm_out": "conv_norm_out", "nin_shortcut": "conv_shortcut"}


def _vae_module(module: str, levels: int) -> tuple[str, bool]:
    """Diffusers path of an LDM VAE module; True when it is an attention
    projection stored as a 1x1 conv in LDM and a Linear in diffusers."""
    parts = module.split(".")
    side = parts[0]  # encoder, decoder or quant_conv/post_quant_conv
    rest = parts[1:]
    if not rest:
        return module, False
    if rest[0] in ("down", "up"):
        level = int(rest[1])
        idx = level if rest[0] == "down" else levels - 1 - level  # decoder runs reversed
        block = f"{side}.{rest[0]}_blocks.{idx}"
        if rest[2] == "block":
            tail = [VAE_RENAMES.get(p, p) for p in rest[4:]]
            return ".".join([block, "resnets", rest[3], *tail]), False
        sampler = "downsamplers" if rest[2] == "downsample" else "upsamplers"
        return f"{block}.{sampler}.0.{'.'.join(rest[3:])}", False
    if rest[0] == "mid":
        if rest[1].startswith("block_"):
            tail = [VAE_RENAMES.get(p, p) for p in rest[2:]]
            n = int(rest[1].removeprefix("block_")) - 1
            return ".".join([f"{side}.mid_block.resnets.{n}", *tail]), False
        part = rest[2]
        return f"{side}.mid_block.attentions.0.{VAE_ATTN_PARTS[part]}", part != "norm"
    return f"{side}.{VAE_RENAMES.get(rest[0], rest[0])}", False


def _vae_homes(cfg: VAEConfig) -> list[KeyHome]:
    out = []
    for key, shape in vae_keys(cfg).items():
        module, leaf = key.rsplit(".", 1)
        target, is_attn = _vae_module(module, len(cfg.ch_mult))
        if is_attn and leaf == "weight":
            out.append(KeyHome(VAE_PREFIX + key, VAE, (f"{target}.{leaf}",), RESHAPE,
                               shape, shape[:2]))
        else:
            out.append(KeyHome(VAE_PREFIX + key, VAE, (f"{target}.{leaf}",), COPY,
                               shape, shape))
    return out


def _hf_clip_homes(slot: TextEncoderSlot, folder: str, layers: int) -> list[KeyHome]:
    keys = dict(text_encoder_keys(slot.config))
    keys[POSITION_IDS] = (1, slot.config.context_length)
    out = []
    for key, shape in keys.items():
        if key.startswith("text_model.encoder.layers.") and int(key.split(".")[3]) >= layers:
            continue
        out.append(KeyHome(slot.prefix + key, folder, (key,), COPY, shape, shape))
    return out


OPEN_CLIP_STEMS = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_LAYER_MODULES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
OPEN_CLIP_LAYERS = "transformer.resblocks."


def _open_clip_layer_home(slot: TextEncoderSlot, folder: str, key: str,
                          shape: Shape) -> KeyHome:
    layer, rest = key.removeprefix(OPEN_CLIP_LAYERS).split(".", 1)
    base = f"text_model.encoder.layers.{layer}"
    original = slot.prefix + key
    if rest in OPEN_CLIP_FUSED:
        leaf = OPEN_CLIP_FUSED[rest]
        names = tuple(f"{base}.self_attn.{p}_proj.{leaf}" for p in ("q", "k", "v"))
        return KeyHome(original, folder, names, SPLIT, shape, (shape[0] // 3, *shape[1:]))
    module, leaf = rest.rsplit(".", 1)
    return KeyHome(original, folder, (f"{base}.{OPEN_CLIP_LAYER_MODULES[module]}.{leaf}",),
                   COPY, shape, shape)


def _open_clip_homes(slot: TextEncoderSlot, folder: str, layers: int,
                     projection: bool) -> list[KeyHome]:
    out = []
    for key, shape in text_encoder_keys(slot.config).items():
        original = slot.prefix + key
        if key in OPEN_CLIP_STEMS:
            out.append(KeyHome(original, folder, (OPEN_CLIP_STEMS[key],), COPY, shape, shape))
        elif key == "text_projection" and projection:
            out.append(KeyHome(original, folder, ("text_projection.weight",), TRANSPOSE,
                               shape, shape[::-1]))
        elif key.startswith(OPEN_CLIP_LAYERS) and int(key.split(".")[2]) < layers:
            out.append(_open_clip_layer_home(slot, folder, key, shape))
    return out


def _te_homes(arch: ArchSpec, slot: TextEncoderSlot) -> list[KeyHome]:
    layers = te_diffusers_layers(arch, slot)
    folder = te_folder(slot)
    if slot.config.layout == "hf":
        return _hf_clip_homes(slot, folder, layers)
    return _open_clip_homes(slot, folder, layers, te_has_projection(slot))


@lru_cache(maxsize=32)
def _layout(name: str, unet: UNetConfig, vae: VAEConfig,
            slots: tuple[TextEncoderSlot, ...]) -> DiffusersLayout:
    arch = replace(ARCHS[name], unet=unet, vae=vae, text_encoders=slots)
    homes = _unet_homes(unet) + _vae_homes(vae)
    for slot in slots:
        homes += _te_homes(arch, slot)
    by_component: dict[str, dict[str, tuple[str, int]]] = {}
    for h in homes:
        names = by_component.setdefault(h.component, {})
        for i, n in enumerate(h.names):
            names[n] = (h.original, i)
    optional = frozenset(s.prefix + POSITION_IDS for s in slots if s.config.layout == "hf")
    return DiffusersLayout(arch, {h.original: h for h in homes}, optional, by_component)


def diffusers_layout(arch: ArchSpec) -> DiffusersLayout:
    """The diffusers home of every original key of ``arch`` (shared; do not
    modify). Components are ``unet``, ``vae`` and the text encoders' folders."""
    if arch.name not in ARCHS:
        raise ModelkitError(f"no diffusers layout for architecture {arch.name!r}")
    return _layout(arch.name, arch.unet, arch.vae, arch.text_encoders)


# --- configs: ArchSpec -> config.json --------------------------------------------


def norm_groups(channels: list[int]) -> int:
    """GroupNorm groups: 32 as in SD, fewer when a (tiny) width is not a
    multiple of 32. Group count is not visible in the weights."""
    groups = 32
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups


def _depths(cfg: UNetConfig) -> int | list[int]:
    attn = [d for d in cfg.transformer_depth if d]
    if set(attn) <= {cfg.transformer_depth_middle}:
        return cfg.transformer_depth_middle
    if cfg.transformer_depth[-1] not in (0, cfg.transformer_depth_middle):
        raise ModelkitError("UNet: the middle transformer depth differs from the last "
                            "level's; diffusers cannot express this layout")
    depths = [d or 1 for d in cfg.transformer_depth]
    depths[-1] = cfg.transformer_depth_middle
    return depths


def unet_config(arch: ArchSpec, version: str) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config.json for ``arch``."""
    cfg = arch.unet
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    heads: int | list[int] = cfg.num_heads
    if cfg.num_head_channels:
        heads = [c // cfg.num_head_channels for c in channels]
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": version,
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": channels,
        "center_input_sample": False, "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D"
                             for d in cfg.transformer_depth],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": cfg.in_channels, "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5,
        "norm_num_groups": norm_groups(channels), "out_channels": cfg.out_channels,
        "sample_size": arch.default_resolution // 8,
        "transformer_layers_per_block": _depths(cfg),
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D"
                           for d in reversed(cfg.transformer_depth)],
        "upcast_attention": False, "use_linear_projection": cfg.use_linear_in_transformer,
    }
    if cfg.adm_in_channels is not None:
        if REGISTRY[arch.name].family != "sdxl":
            raise ModelkitError(f"{arch.name} UNet with label_emb (unCLIP) is not "
                                "supported for diffusers conversion")
        out.update(addition_embed_type="text_time", addition_embed_type_num_heads=64,
                   addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return out


def vae_config(arch: ArchSpec, version: str) -> dict[str, Any]:
    """An ``AutoencoderKL`` config.json for ``arch``."""
    cfg = arch.vae
    channels = [cfg.ch * m for m in cfg.ch_mult]
    n = len(channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": version, "act_fn": "silu",
        "block_out_channels": channels, "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": _diffusers(arch.name).vae_force_upcast, "in_channels": cfg.in_channels,
        "latent_channels": cfg.z_channels, "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": norm_groups(channels), "out_channels": cfg.out_ch,
        "sample_size": arch.default_resolution,
        "scaling_factor": SCALING_FACTORS.get(arch.name, DEFAULT_SCALING_FACTOR),
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def te_class(slot: TextEncoderSlot) -> str:
    """The transformers class of a slot's diffusers text encoder."""
    return "CLIPTextModelWithProjection" if te_has_projection(slot) else "CLIPTextModel"


def text_encoder_config(arch: ArchSpec, slot: TextEncoderSlot, dtype: str,
                        version: str) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` config.json for one text encoder.
    Token ids 0/1/2 are what SD's own configs hold (transformers then pools at
    the highest token id, CLIP's end token)."""
    cfg = slot.config
    proj = cfg.width
    if te_has_projection(slot):
        proj = text_encoder_keys(cfg)["text_projection"][1]
    return {
        "architectures": [te_class(slot)], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu" if cfg.layout == "hf" else "gelu",
        "hidden_size": cfg.width, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": cfg.width * cfg.mlp_ratio, "layer_norm_eps": 1e-5,
        "max_position_embeddings": cfg.context_length, "model_type": "clip_text_model",
        "num_attention_heads": cfg.heads,
        "num_hidden_layers": te_diffusers_layers(arch, slot), "pad_token_id": 1,
        "projection_dim": proj, "torch_dtype": dtype, "transformers_version": version,
        "vocab_size": cfg.vocab_size,
    }


def scheduler_config(prediction: str, zero_snr: bool, version: str) -> dict[str, Any]:
    """An ``EulerDiscreteScheduler`` config with SD's scaled-linear betas;
    ``prediction`` is ``epsilon`` or ``v_prediction``."""
    return {
        "_class_name": SCHEDULER_CLASS, "_diffusers_version": version,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": prediction, "rescale_betas_zero_snr": zero_snr,
        "steps_offset": 1, "timestep_spacing": "trailing" if zero_snr else "leading",
        "trained_betas": None, "use_karras_sigmas": False,
    }


PIPELINES = {(a.name, variant): cls for a in REGISTRY.values() if a.diffusers
             for variant, cls in a.diffusers.pipelines}
NONE_ENTRY = [None, None]


def model_index(arch: ArchSpec, variant: str | None, components: list[str],
                version: str) -> dict[str, Any]:
    """``model_index.json``: the pipeline class and each component's class.
    Tokenizers are listed as absent (``[null, null]``)."""
    pipeline = PIPELINES.get((arch.name, variant)) or PIPELINES[(arch.name, None)]
    out: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": version,
                           "scheduler": ["diffusers", SCHEDULER_CLASS],
                           "unet": ["diffusers", "UNet2DConditionModel"],
                           "vae": ["diffusers", "AutoencoderKL"] if VAE in components
                           else NONE_ENTRY}
    xl = REGISTRY[arch.name].family == "sdxl"
    folders = (TEXT_ENCODER, TEXT_ENCODER_2) if xl else (TEXT_ENCODER,)
    classes = {te_folder(s): te_class(s) for s in arch.text_encoders}
    for folder in folders:
        present = folder in components and folder in classes
        out[folder] = ["transformers", classes[folder]] if present else NONE_ENTRY
        out[folder.replace("text_encoder", "tokenizer")] = NONE_ENTRY
    out["feature_extractor"] = NONE_ENTRY
    if xl:
        out["image_encoder"] = NONE_ENTRY
        out["force_zeros_for_empty_prompt"] = arch.name == "sdxl"
        if arch.name == "sdxl_refiner":
            out["requires_aesthetics_score"] = True
    else:
        out["safety_checker"] = NONE_ENTRY
        out["requires_safety_checker"] = False
    if variant == "depth":
        out["depth_estimator"] = NONE_ENTRY
    return out


# --- configs: config.json -> ArchSpec ------------------------------------------------


def _bad_field(where: str, name: str, value: object) -> ModelkitError:
    return ModelkitError(f"{where}: {name}={value!r} is not an SD1/SD2/SDXL layout; "
                         "modelkit converts only those UNet/VAE layouts")


def _channel_mult(where: str, channels: list[int]) -> tuple[int, ...]:
    base = channels[0]
    if any(c % base for c in channels):
        raise _bad_field(where, "block_out_channels", channels)
    return tuple(c // base for c in channels)


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def _unet_depths(where: str, cfg: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    down = list(cfg.get("down_block_types") or [])
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if not down or any(t not in kinds for t in down):
        raise _bad_field(where, "down_block_types", down)
    expect_up = [t.replace("Down", "Up") for t in reversed(down)]
    if list(cfg.get("up_block_types") or []) != expect_up:
        raise _bad_field(where, "up_block_types", cfg.get("up_block_types"))
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise _bad_field(where, "mid_block_type", cfg.get("mid_block_type"))
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise _bad_field(where, "reverse_transformer_layers_per_block",
                         cfg["reverse_transformer_layers_per_block"])
    per = _per_level(cfg.get("transformer_layers_per_block", 1), len(down))
    if len(per) != len(down) or not all(isinstance(d, int) for d in per):
        raise _bad_field(where, "transformer_layers_per_block", per)
    return tuple(d if kinds[t] else 0 for d, t in zip(per, down, strict=True)), per[-1]


def _unet_heads(cfg: dict[str, Any], channels: list[int]) -> tuple[int, int | None]:
    heads = cfg.get("attention_head_dim", 8)
    if isinstance(heads, int):
        return heads, None
    return UNetConfig.num_heads, channels[0] // heads[0]


def unet_config_from_diffusers(cfg: dict[str, Any], where: str = "unet/config.json"
                               ) -> UNetConfig:
    """The LDM :class:`UNetConfig` of a diffusers ``UNet2DConditionModel``
    config.json; raises :class:`ModelkitError` for layouts SD never used."""
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _bad_field(where, "_class_name", cfg.get("_class_name"))
    channels = list(cfg.get("block_out_channels") or [])
    if not channels:
        raise _bad_field(where, "block_out_channels", channels)
    lpb = cfg.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise _bad_field(where, "layers_per_block", lpb)
    context = cfg.get("cross_attention_dim")
    if not isinstance(context, int):
        raise _bad_field(where, "cross_attention_dim", context)
    if cfg.get("class_embed_type") is not None:
        raise _bad_field(where, "class_embed_type", cfg["class_embed_type"])
    adm = None
    if cfg.get("addition_embed_type") is not None:
        if cfg["addition_embed_type"] != "text_time":
            raise _bad_field(where, "addition_embed_type", cfg["addition_embed_type"])
        adm = int(cfg["projection_class_embeddings_input_dim"])
    depths, middle = _unet_depths(where, cfg)
    heads, head_channels = _unet_heads(cfg, channels)
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        model_channels=channels[0], channel_mult=_channel_mult(where, channels),
        num_res_blocks=lpb, transformer_depth=depths, transformer_depth_middle=middle,
        context_dim=context, use_linear_in_transformer=bool(cfg.get("use_linear_projection")),
        adm_in_channels=adm, num_heads=heads, num_head_channels=head_channels,
    )


def vae_config_from_diffusers(cfg: dict[str, Any], where: str = "vae/config.json"
                              ) -> VAEConfig:
    """The LDM :class:`VAEConfig` of a diffusers ``AutoencoderKL`` config.json."""
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _bad_field(where, "_class_name", cfg.get("_class_name"))
    channels = list(cfg.get("block_out_channels") or [])
    down = cfg.get("down_block_types") or []
    if not channels or any(t != "DownEncoderBlock2D" for t in down):
        raise _bad_field(where, "down_block_types", down)
    z = int(cfg.get("latent_channels", 4))
    return VAEConfig(ch=channels[0], ch_mult=_channel_mult(where, channels),
                     num_res_blocks=int(cfg.get("layers_per_block", 2)), z_channels=z,
                     embed_dim=z, in_channels=int(cfg.get("in_channels", 3)),
                     out_ch=int(cfg.get("out_channels", 3)))


def te_config_from_diffusers(arch_name: str, slot: TextEncoderSlot, cfg: dict[str, Any]
                             ) -> TextEncoderConfig:
    """The single-file text-encoder config (``slot``'s layout) of a
    transformers ``CLIPTextConfig`` dict; SD2 gets its dropped layer back."""
    width = int(cfg.get("hidden_size", 512))
    layers = int(cfg.get("num_hidden_layers", 12))
    return replace(
        slot.config, width=width, heads=int(cfg.get("num_attention_heads", 8)),
        layers=layers + DIFFUSERS_TE_DROPPED_LAYERS.get(arch_name, 0),
        mlp_ratio=max(1, int(cfg.get("intermediate_size", 4 * width)) // width),
        vocab_size=int(cfg.get("vocab_size", slot.config.vocab_size)),
        context_length=int(cfg.get("max_position_embeddings", slot.config.context_length)),
    )


# --- heads are not in the weights ----------------------------------------------------


def guess_unet_heads(arch_name: str, cfg: UNetConfig) -> UNetConfig:
    """Give a UNet config read off weights the head settings of the known
    config (full size or tiny) with the same width."""
    for table in (ARCHS, TINY):
        known = table[arch_name].unet
        if known.model_channels == cfg.model_channels:
            return replace(cfg, num_heads=known.num_heads,
                           num_head_channels=known.num_head_channels)
    nhc = cfg.num_head_channels
    if nhc and cfg.model_channels % nhc:
        return replace(cfg, num_head_channels=None, num_heads=1)
    return cfg


def guess_te_heads(arch_name: str, slot_name: str, cfg: TextEncoderConfig
                   ) -> TextEncoderConfig:
    """Head count of a text encoder read off weights: the known one at that
    width, else 64 channels per head."""
    for table in (ARCHS, TINY):
        for s in table[arch_name].text_encoders:
            if s.name == slot_name and s.config.width == cfg.width:
                return replace(cfg, heads=s.config.heads)
    return replace(cfg, heads=max(1, cfg.width // 64))
