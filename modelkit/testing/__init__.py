"""Seeded synthetic SD models for tests, benchmarks and users' own CI.

Every writer streams through :class:`modelkit.io.writer.SafetensorsWriter`, so
a full-size SDXL file is generated one tensor at a time. Values are seeded per
key (the same key and seed always give the same tensor), initialised like a
network at rest (weights ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ 0), so
forward passes stay finite.

Tiny models (``tiny=True``, the default) use :data:`modelkit.arch.configs.TINY`:
the real key names and block structure with small widths.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch.configs import ARCHS, TINY, UNET_PREFIX, ArchSpec
from modelkit.arch.keys import (
    POSITION_IDS,
    Shape,
    checkpoint_keys,
    ema_key,
    unet_keys,
    vae_keys,
)
from modelkit.errors import ModelkitError
from modelkit.io.write import WriteResult
from modelkit.io.writer import TensorSpec
from modelkit.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    import torch

    from modelkit.arch.flux import FluxConfig

VARIANT_CHANNELS = {"inpaint": 9, "pix2pix": 8, "depth": 5}


def arch_spec(arch: str, tiny: bool = True, variant: str | None = None) -> ArchSpec:
    """The :class:`ArchSpec` for ``arch`` (``sd1``, ``sd2``, ``sdxl``,
    ``sdxl_refiner``), tiny or full size, optionally an in-channel variant."""
    table = TINY if tiny else ARCHS
    if arch not in table:
        raise ModelkitError(f"unknown arch {arch!r}; choose one of {', '.join(table)}")
    spec = table[arch]
    if variant:
        if variant not in VARIANT_CHANNELS:
            raise ModelkitError(f"unknown variant {variant!r}; choose one of "
                                f"{', '.join(VARIANT_CHANNELS)}")
        spec = spec.with_variant(VARIANT_CHANNELS[variant])
    return spec


def _key_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFF_FFFF_FFFF


def synthetic_tensor(key: str, shape: Shape, seed: int = 0) -> torch.Tensor:
    """A deterministic float32 tensor for ``key``: what a trained layer of
    that kind looks like in scale, not in content."""
    import torch

    gen = torch.Generator().manual_seed(_key_seed(seed, key))
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0))
    t = torch.randn(shape, generator=gen)
    leaf = key.rsplit(".", 1)[-1]
    is_norm = any(n in key for n in ("norm", "ln_", "layer_norm", "in_layers.0",
                                     "out_layers.0", "out.0."))
    if len(shape) <= 1 and leaf == "weight" and is_norm:
        return t.mul_(0.05).add_(1.0)
    if len(shape) <= 1:
        return t.mul_(0.02)
    fan_in = math.prod(shape[1:])
    if "embedding" in key or key.endswith("positional_embedding"):
        fan_in = 100
    return t.mul_(1.0 / math.sqrt(fan_in))


def _schedule_buffer(name: str) -> torch.Tensor:
    """The LDM scaled-linear schedule buffers (beta 0.00085..0.012)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    table = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return table[name].float()


def _value(key: str, shape: Shape, seed: int) -> torch.Tensor:
    import torch

    if key == "model_ema.decay":
        return torch.tensor(0.9999)
    if key == "model_ema.num_updates":
        return torch.tensor(1000, dtype=torch.int32)
    if key in ("v_pred", "ztsnr"):
        return torch.zeros(0)
    if "." not in key and shape == (1000,):
        return _schedule_buffer(key)
    return synthetic_tensor(key, shape, seed)


def _ema_value(key: str, online_key: str, shape: Shape, seed: int) -> torch.Tensor:
    """EMA weights sit close to the online weights, as in a real run: the
    online tensor plus 1 % noise."""
    return _value(online_key, shape, seed).add_(synthetic_tensor(key, shape, seed), alpha=0.01)


def _specs(keys: Mapping[str, Shape], dtype: str) -> list[TensorSpec]:
    specs = []
    for key, shape in keys.items():
        if key.endswith("position_ids"):
            specs.append(TensorSpec(key, "I64", shape))
        elif key == "model_ema.num_updates":
            specs.append(TensorSpec(key, "I32", shape))
        elif key == "model_ema.decay" or (("." not in key) and shape == (1000,)):
            specs.append(TensorSpec(key, "F32", shape))
        else:
            specs.append(TensorSpec(key, dtype, shape))
    return specs


def write_tensors(
    path: str | os.PathLike[str],
    keys: Mapping[str, Shape],
    *,
    dtype: str = "F16",
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
    progress: ProgressFn = no_progress,
) -> WriteResult:
    """Write synthetic values for ``keys`` (name -> shape) to ``path``.
    ``overrides`` supplies exact tensors for some keys."""
    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    overrides = overrides or {}
    specs = _specs(keys, dtype)
    kinds = {s.name: s.dtype for s in specs}
    for name, t in overrides.items():
        from modelkit.io.dtypes import from_torch

        kinds[name] = from_torch(t.dtype)
    specs = [TensorSpec(s.name, kinds[s.name], s.shape) for s in specs]

    online = {ema_key(k[len(UNET_PREFIX):]): k for k in keys if k.startswith(UNET_PREFIX)}

    def produce(key: str) -> torch.Tensor:
        if key in overrides:
            return overrides[key]
        if key in online:
            return cast(_ema_value(key, online[key], keys[key], seed), to_torch(kinds[key]))
        return cast(_value(key, keys[key], seed), to_torch(kinds[key]))

    return write_model(path, specs, produce, metadata, progress)


def write_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "sd1",
    *,
    tiny: bool = True,
    variant: str | None = None,
    ema: bool = False,
    dtype: str = "F16",
    seed: int = 0,
    markers: Iterable[str] = (),
    components: Iterable[str] | None = None,
    metadata: dict[str, str] | None = None,
    progress: ProgressFn = no_progress,
) -> WriteResult:
    """Write a single-file checkpoint in the original (LDM/SGM) layout.

    Args:
        arch: ``sd1``, ``sd2``, ``sdxl`` or ``sdxl_refiner``.
        tiny: small widths (tests) or the real shapes (benchmarks).
        variant: ``inpaint``, ``pix2pix`` or ``depth`` (UNet input channels).
        ema: add LitEma ``model_ema.*`` buffers.
        markers: root marker keys to add, e.g. ``("v_pred", "ztsnr")``.
        components: limit to some of ``unet``, ``vae``, ``te`` (all text
            encoders); default all.
    """
    spec = arch_spec(arch, tiny, variant)
    keys = checkpoint_keys(spec, ema=ema)
    if components is not None:
        wanted = set(components)
        keys = {k: s for k, s in keys.items() if _component_of(k) in wanted}
    for m in markers:
        keys[m] = (0,)
    return write_tensors(path, keys, dtype=dtype, seed=seed, metadata=metadata,
                         progress=progress)


def write_sparse_checkpoint(path: str | os.PathLike[str], arch: str = "sd1", *,
                            tiny: bool = False, ema: bool = False, dtype: str = "F16",
                            variant: str | None = None) -> Path:
    """A full-size key/shape layout with all-zero tensors stored sparsely:
    inspect-level tests of real shapes without writing gigabytes."""
    from modelkit.io.writer import write_sparse

    spec = arch_spec(arch, tiny, variant)
    return write_sparse(path, _specs(checkpoint_keys(spec, ema=ema), dtype))


def write_sparse_flux(path: str | os.PathLike[str], variant: str = "dev", *,
                      layout: str = "original", prefixed: bool = False,
                      all_in_one: bool = False, dtype: str = "BF16", tiny: bool = False
                      ) -> Path:
    """A full-size Flux.1 header (real key names and shapes) with sparse
    all-zero data: the transformer alone, unprefixed or under
    ``model.diffusion_model.``, in the ``original`` or ``diffusers`` layout,
    or (``all_in_one``) with the VAE, CLIP-L and T5-XXL as ComfyUI saves it.
    ``tiny``: the same key names at a small size (for commands that map the file)."""
    from modelkit.arch import flux
    from modelkit.io.writer import write_sparse

    cfg = flux.small(flux.VARIANTS[variant]) if tiny else flux.VARIANTS[variant]
    if all_in_one:
        keys = flux.all_in_one_keys(cfg, tiny=tiny)
    else:
        prefix = UNET_PREFIX if prefixed else ""
        keys = {prefix + k: s for k, s in flux.transformer_keys(cfg, layout).items()}
    return write_sparse(path, _specs(keys, dtype))


def write_sparse_sd3(path: str | os.PathLike[str], variant: str = "sd3-medium", *,
                     prefixed: bool = False, all_in_one: bool = False, dtype: str = "F16",
                     layout: str = "original") -> Path:
    """A full-size SD3/SD3.5 header (real key names and shapes, in the
    ``original`` or ``diffusers`` layout) with sparse all-zero data: the
    MMDiT alone, unprefixed or under ``model.diffusion_model.``, or
    (``all_in_one``, original layout) with the VAE, CLIP-L, CLIP-G and
    T5-XXL as Stability's all-in-one release."""
    from modelkit.arch import layouts, sd3
    from modelkit.io.writer import write_sparse

    cfg = sd3.VARIANTS[variant]
    if all_in_one:
        keys = sd3.all_in_one_keys(cfg)
    else:
        prefix = UNET_PREFIX if prefixed else ""
        table = sd3.transformer_keys(cfg)
        if layout == "diffusers":
            plan = layouts.to_diffusers(layouts.family_map("sd3", table, "original", "sd3"),
                                        table, "sd3")
            table = {k: t.shape for k, t in plan.items()}
        keys = {prefix + k: s for k, s in table.items()}
    return write_sparse(path, _specs(keys, dtype))


def write_sparse_qwen_image(path: str | os.PathLike[str], *, prefixed: bool = False,
                            dtype: str = "BF16", tiny: bool = False) -> Path:
    """A full-size Qwen-Image transformer header (real key names and shapes)
    with sparse all-zero data, unprefixed or under ``model.diffusion_model.``
    (``tiny``: the same key names at a small size, for commands that map the
    file)."""
    from modelkit.arch import qwen_image
    from modelkit.io.writer import write_sparse

    prefix = UNET_PREFIX if prefixed else ""
    cfg = qwen_image.VARIANTS["qwen-image"]
    keys = qwen_image.transformer_keys(qwen_image.small(cfg) if tiny else cfg)
    return write_sparse(path, _specs({prefix + k: s for k, s in keys.items()}, dtype))


def write_sparse_wan(path: str | os.PathLike[str], variant: str = "t2v-1.3b", *,
                     layout: str = "original", prefixed: bool = False, dtype: str = "BF16",
                     tiny: bool = False) -> Path:
    """A full-size Wan 2.1/2.2 transformer header (real key names and shapes)
    with sparse all-zero data in the ``original`` or ``diffusers`` layout,
    unprefixed or under ``model.diffusion_model.`` (``tiny``: the same key
    names at a small size)."""
    from modelkit.arch import wan
    from modelkit.io.writer import write_sparse

    prefix = UNET_PREFIX if prefixed else ""
    cfg = wan.small(wan.VARIANTS[variant]) if tiny else wan.VARIANTS[variant]
    keys = wan.transformer_keys(cfg, layout)
    return write_sparse(path, _specs({prefix + k: s for k, s in keys.items()}, dtype))


def write_sparse_dit(path: str | os.PathLike[str], family: str, *, layout: str = "original",
                     prefixed: bool = False, dtype: str = "BF16", tiny: bool = False) -> Path:
    """A full-size transformer header of ``family`` (``chroma``, ``flux2`` or
    ``z_image``: real key names and shapes, the family's one variant) with
    sparse all-zero data, in the ``original`` or ``diffusers`` layout,
    unprefixed or under ``model.diffusion_model.`` (``tiny``: the same key
    names at a small size)."""
    from importlib import import_module

    from modelkit.io.writer import write_sparse

    module = import_module(f"modelkit.arch.{family}")
    cfg = next(iter(module.VARIANTS.values()))
    keys = module.transformer_keys(module.small(cfg) if tiny else cfg, layout)
    prefix = UNET_PREFIX if prefixed else ""
    return write_sparse(path, _specs({prefix + k: s for k, s in keys.items()}, dtype))


def flux_config(variant: str = "dev", *, hidden: int = 256, depth: int = 2,
                single: int = 2, full_text: bool = False) -> FluxConfig:
    """A Flux.1 config with the real key names at a reduced width and depth
    (head width 128 as at full size; the text inputs scaled down too unless
    ``full_text``: CLIP-L's 768 and T5-XXL's 4096)."""
    from dataclasses import replace

    from modelkit.arch import flux

    base = flux.VARIANTS[variant]
    return replace(base, hidden_size=hidden, num_heads=max(1, hidden // 128), depth=depth,
                   depth_single_blocks=single,
                   vec_in_dim=base.vec_in_dim if full_text else 32,
                   context_in_dim=base.context_in_dim if full_text else 64)


def write_flux(path: str | os.PathLike[str], variant: str = "dev", *, hidden: int = 256,
               depth: int = 2, single: int = 2, prefixed: bool = False,
               all_in_one: bool = False, dtype: str = "BF16", seed: int = 0,
               metadata: dict[str, str] | None = None, full_text: bool = False
               ) -> WriteResult:
    """A Flux.1 transformer (original/BFL layout) with real values at a
    reduced width (``hidden``, 3072 at full size) and depth (``depth``
    double and ``single`` single blocks; the full-size block names): bare
    keys, under ``model.diffusion_model.`` (``prefixed``) or an all-in-one
    file with a tiny VAE and text encoders (``all_in_one``). Full width and
    any depth work too (``hidden=3072, full_text=True``: benchmarks)."""
    from modelkit.arch import flux

    cfg = flux_config(variant, hidden=hidden, depth=depth, single=single, full_text=full_text)
    if all_in_one:
        keys = flux.all_in_one_keys(cfg, tiny=True)
    else:
        prefix = UNET_PREFIX if prefixed else ""
        keys = {prefix + k: s for k, s in flux.transformer_keys(cfg).items()}
    return write_tensors(path, keys, dtype=dtype, seed=seed, metadata=metadata)


def _component_of(key: str) -> str:
    """``unet`` (EMA copies included), ``vae``, ``te`` or another part."""
    from modelkit.arch.parts import EMA, UNET, part_of

    part = part_of(key)
    return UNET if part == EMA else part


def write_unet(path: str | os.PathLike[str], arch: str = "sd1", *, tiny: bool = True,
               dtype: str = "F16", seed: int = 0) -> WriteResult:
    """A diffusion-model-only file (unprefixed LDM UNet keys, as ComfyUI's
    ``diffusion_models/`` files are)."""
    spec = arch_spec(arch, tiny)
    return write_tensors(path, dict(unet_keys(spec.unet)), dtype=dtype, seed=seed)


def write_vae(path: str | os.PathLike[str], *, tiny: bool = True, dtype: str = "F16",
              seed: int = 0) -> WriteResult:
    """A standalone KL-f8 VAE (unprefixed ``encoder.*``/``decoder.*`` keys)."""
    spec = arch_spec("sd1", tiny)
    return write_tensors(path, dict(vae_keys(spec.vae)), dtype=dtype, seed=seed)


def write_embedding(path: str | os.PathLike[str], arch: str = "sd1", *,
                    tiny: bool = False, n_vectors: int = 4, seed: int = 0,
                    name: str | None = None) -> WriteResult:
    """A textual inversion embedding as A1111 saves it: ``emb_params``
    [n, width] for SD1/SD2, ``clip_l``/``clip_g`` for SDXL. Real widths by
    default (they are small); ``tiny=True`` matches the tiny text encoders."""
    spec = arch_spec(arch, tiny)
    widths = {s.name: s.config.width for s in spec.text_encoders}
    if arch == "sdxl":
        keys = {"clip_l": (n_vectors, widths["te1"]), "clip_g": (n_vectors, widths["te2"])}
    elif arch in ("sd1", "sd2"):
        keys = {"emb_params": (n_vectors, widths["te"])}
    else:
        raise ModelkitError(f"no textual inversion format for {arch}")
    meta = {"name": name or Path(path).stem, "step": "1000", "modelkit.synthetic": "1"}
    return write_tensors(path, keys, dtype="F32", seed=seed, metadata=meta)


def ema_keys_for(arch: str, tiny: bool = True) -> dict[str, str]:
    """UNet key -> LitEma key for ``arch`` (handy in tests)."""
    spec = arch_spec(arch, tiny)
    return {UNET_PREFIX + k: ema_key(k) for k in unet_keys(spec.unet)}


__all__ = [
    "POSITION_IDS",
    "arch_spec",
    "ema_keys_for",
    "flux_config",
    "synthetic_tensor",
    "write_checkpoint",
    "write_embedding",
    "write_flux",
    "write_sparse_checkpoint",
    "write_sparse_flux",
    "write_tensors",
    "write_unet",
    "write_vae",
]


def write_model(path: str | os.PathLike[str], specs: list[TensorSpec],
                produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                progress: ProgressFn = no_progress) -> WriteResult:
    """Write a model whose tensors ``produce(name)`` computes, through the
    one write path (replacing ``path`` if it exists: fixtures are rebuilt)."""
    from modelkit.io.source import DerivedSource, tensor_info
    from modelkit.io.write import OutputSpec, write

    infos = {s.name: tensor_info(s.name, s.dtype, s.shape) for s in specs}
    source = DerivedSource(str(path), infos, dict(metadata or {}), produce)
    return write(source, OutputSpec(Path(path), "safetensors", overwrite=True),
                 progress=progress)
