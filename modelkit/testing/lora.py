"""Seeded synthetic adapters (LoRA, LoCon, LoHa, LoKr, PEFT, ComfyUI-native,
full diff, IA3, DoRA) for SD1/SD2/SDXL, written through :func:`write_tensors`.

Module names and shapes come from :mod:`modelkit.arch.lora_names`, so every
adapter fits the matching checkpoint from :func:`modelkit.testing.write_checkpoint`
(same ``arch`` and ``tiny``) and can be baked into it.

Which modules a fixture covers, per ``kind``:

* ``lora``: kohya's default, every Transformer2D Linear/1x1 (proj_in/out,
  attn1/attn2 q/k/v/out, ff) plus the text encoders' q/k/v/out_proj, fc1, fc2
  (SD2: 23 of 24 layers, as kohya trains). ``conv=True`` adds the ResBlock and
  down/upsampler modules (LoCon).
* ``loha``, ``lokr``, ``full``, ``ia3``: the same, as LyCORIS writes them;
  ``conv=True`` also adds LyCORIS's named stems (conv_in, conv_out,
  time_embedding) where the names exist (SD1/SD2).
* ``peft``: diffusers' default targets, attention to_q/k/v/to_out.0 and the
  text encoders' q/k/v/out_proj, as ``unet.``/``text_encoder.`` keys with
  ``lora_A``/``lora_B``.
* ``comfyui``: ComfyUI ``LoraSave`` keys (``diffusion_model.<LDM path>``,
  ``text_encoders.clip_l.transformer...``), no alpha, no metadata.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

from modelkit.arch.configs import ArchSpec
from modelkit.arch.keys import Shape
from modelkit.arch.lora_names import (
    GROUP_RESNET,
    GROUP_SAMPLER,
    GROUP_STEM,
    GROUP_TEXT,
    GROUP_TRANSFORMER,
    ModuleTarget,
    kohya_te_layers,
    kohya_unet_style,
    lora_module_targets,
    te_layer,
)
from modelkit.errors import ModelkitError
from modelkit.testing import arch_spec, synthetic_tensor, write_tensors

if TYPE_CHECKING:
    import torch

    from modelkit.io.write import WriteResult

KINDS = ("lora", "loha", "lokr", "peft", "comfyui", "full", "ia3")
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "full": "full", "ia3": "ia3"}
NAMING_OF_KIND = {"peft": "peft", "comfyui": "comfyui"}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}
PEFT_UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)``, ``m <= n``, ``m * n == dim``, as LyCORIS
    LoKr does: with ``factor > 0`` dividing ``dim`` use it; otherwise take the
    divisor pair closest to the square root, with ``m`` at most ``factor``
    (``-1``: no limit). 320 -> (16, 20), 640 -> (20, 32), 320 with factor 8 ->
    (8, 40)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor <= 0 else factor
    best = (1, dim)
    for m in range(2, math.isqrt(dim) + 1):
        if m > limit:
            break
        if dim % m == 0:
            best = (m, dim // m)
    return best


def lokr_shapes(shape: Shape, rank: int, factor: int = -1) -> dict[str, Shape]:
    """LoKr tensor shapes for a weight of ``shape`` (LyCORIS defaults: ``w1``
    full; ``w2`` full when ``rank >= max(b, d) / 2``, else ``w2_a @ w2_b``)."""
    a, b = factorization(shape[0], factor)
    c, d = factorization(shape[1], factor)
    kernel = tuple(shape[2:])
    shapes: dict[str, Shape] = {"lokr_w1": (a, c)}
    if rank >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    else:
        shapes["lokr_w2_a"] = (b, rank)
        shapes["lokr_w2_b"] = (rank, d * math.prod(kernel))
    return shapes


def _is_kernel_conv(t: ModuleTarget) -> bool:
    return t.is_conv and math.prod(t.shape[2:]) > 1


def _module_shapes(kind: str, t: ModuleTarget, rank: int) -> dict[str, Shape]:
    out, inn, kernel = t.shape[0], t.shape[1], tuple(t.shape[2:])
    ones = (1,) * len(kernel)
    flat_in = inn * math.prod(kernel)
    if kind in ("lora", "comfyui"):
        return {"lora_down.weight": (rank, inn, *kernel),
                "lora_up.weight": (out, rank, *ones)}
    if kind == "peft":
        return {"lora_A.weight": (rank, inn, *kernel), "lora_B.weight": (out, rank, *ones)}
    if kind == "loha":
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, flat_in),
                "hada_w2_a": (out, rank), "hada_w2_b": (rank, flat_in)}
    if kind == "lokr":
        return lokr_shapes(t.shape, rank)
    if kind == "full":
        return {"diff": t.shape, **({"diff_b": (out,)} if t.bias_key else {})}
    return {"weight": (out,), "on_input": ()}  # ia3


def _wanted_groups(kind: str, conv: bool, arch: ArchSpec) -> set[str]:
    groups = {GROUP_TRANSFORMER, GROUP_TEXT}
    if conv:
        groups |= {GROUP_RESNET, GROUP_SAMPLER}
        if kind in LYCORIS_ALGOS and kohya_unet_style(arch) == "diffusers":
            groups.add(GROUP_STEM)
    return groups


def _keep(t: ModuleTarget, kind: str, arch: ArchSpec) -> bool:
    if kind == "peft":
        leaves = PEFT_TE_LEAVES if t.group == GROUP_TEXT else PEFT_UNET_LEAVES
        return t.path.endswith(leaves)
    if t.group == GROUP_TEXT and kind != "comfyui":
        slot = next(s for s in arch.text_encoders if s.name == t.component)
        return (te_layer(t) or 0) < kohya_te_layers(arch, slot)
    return True


def select_modules(arch: ArchSpec, kind: str = "lora", *, conv: bool = False,
                   text_encoder: bool = True) -> list[ModuleTarget]:
    """The modules a fixture of ``kind`` covers (see the module docstring)."""
    if kind not in KINDS:
        raise ModelkitError(f"unknown adapter kind {kind!r}; "
                            f"choose one of {', '.join(KINDS)}")
    naming = NAMING_OF_KIND.get(kind, "kohya")
    groups = _wanted_groups(kind, conv, arch)
    if not text_encoder:
        groups.discard(GROUP_TEXT)
    targets = lora_module_targets(arch, naming).values()
    return [t for t in targets if t.group in groups and _keep(t, kind, arch)]


def _module_rank(t: ModuleTarget, rank: int, conv_rank: int | None) -> int:
    return conv_rank if (conv_rank is not None and _is_kernel_conv(t)) else rank


def _dora_entry(kind: str, t: ModuleTarget) -> tuple[str, Shape]:
    if kind == "peft":
        return "lora_magnitude_vector", (t.shape[0],)
    return "dora_scale", (t.shape[0], 1, *((1,) * (len(t.shape) - 2)))


def _plan(arch: str, kind: str, tiny: bool, rank: int, conv: bool,
          conv_rank: int | None, text_encoder: bool, dora: bool,
          ) -> list[tuple[ModuleTarget, int, dict[str, Shape]]]:
    """Per module: its target, its rank and its tensors (suffix -> shape)."""
    spec = arch_spec(arch, tiny)
    plan = []
    for t in select_modules(spec, kind, conv=conv, text_encoder=text_encoder):
        r = _module_rank(t, rank, conv_rank)
        shapes = _module_shapes(kind, t, r)
        if kind in ("lora", "loha", "lokr"):
            shapes["alpha"] = ()
        if dora:
            suffix, shape = _dora_entry(kind, t)
            shapes[suffix] = shape
        plan.append((t, r, shapes))
    return plan


def lora_keys(arch: str = "sd1", *, kind: str = "lora", tiny: bool = True, rank: int = 4,
              conv: bool = False, conv_rank: int | None = None,
              text_encoder: bool = True, dora: bool = False) -> dict[str, Shape]:
    """Tensor names and shapes of the fixture :func:`write_lora` writes."""
    return _keys(_plan(arch, kind, tiny, rank, conv, conv_rank, text_encoder, dora))


def _keys(plan: list[tuple[ModuleTarget, int, dict[str, Shape]]]) -> dict[str, Shape]:
    return {f"{t.name}.{suffix}": shape for t, _, shapes in plan
            for suffix, shape in shapes.items()}


def _alpha(t: ModuleTarget, r: int, shapes: dict[str, Shape], alpha: float,
           conv_alpha: float) -> float:
    if "lokr_w1" in shapes and "lokr_w2" in shapes:
        return float(r)  # LoKr with no low-rank factor: alpha forced to rank
    return conv_alpha if _is_kernel_conv(t) else alpha


def _overrides(plan: list[tuple[ModuleTarget, int, dict[str, Shape]]], dtype: str,
               seed: int, alpha: float, conv_alpha: float) -> dict[str, torch.Tensor]:
    import torch

    from modelkit.io.dtypes import to_torch

    tdtype = to_torch(dtype)
    out: dict[str, torch.Tensor] = {}
    for t, r, shapes in plan:
        for suffix, shape in shapes.items():
            key = f"{t.name}.{suffix}"
            if suffix == "alpha":
                value = _alpha(t, r, shapes, alpha, conv_alpha)
                out[key] = torch.tensor(value, dtype=tdtype)
            elif suffix == "on_input":
                out[key] = torch.tensor(False)
            elif suffix in ("dora_scale", "lora_magnitude_vector"):
                # magnitudes are norms: positive
                out[key] = synthetic_tensor(key, shape, seed).abs_().add_(0.5).to(tdtype)
    return out


def kohya_metadata(arch: str, kind: str, rank: int, alpha: float, conv: bool,
                   conv_rank: int | None, conv_alpha: float,
                   dora: bool = False) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` metadata as kohya's trainer (``networks.lora``)
    or LyCORIS through it (``lycoris.kohya``) writes them."""
    if arch not in BASE_MODEL_VERSION:
        raise ModelkitError(f"no kohya metadata for {arch!r}; use sd1, sd2 or sdxl")
    lycoris = kind in LYCORIS_ALGOS or dora  # kohya's networks.lora has no DoRA
    args: dict[str, str] = {}
    if lycoris:
        args["algo"] = LYCORIS_ALGOS.get(kind, "locon")
    if conv:
        args["conv_dim"] = str(conv_rank or rank)
        args["conv_alpha"] = _num(conv_alpha)
    if dora:
        args["dora_wd"] = "True"
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[arch],
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if arch == "sdxl" else "diffusers"),
    }
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _peft_metadata(rank: int, alpha: float, text_encoder: bool) -> dict[str, str]:
    cfg: dict[str, object] = {"unet.r": rank, "unet.lora_alpha": alpha}
    if text_encoder:
        cfg.update({"text_encoder.r": rank, "text_encoder.lora_alpha": alpha})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}


def _default_metadata(arch: str, kind: str, rank: int, alpha: float, conv: bool,
                      conv_rank: int | None, conv_alpha: float, text_encoder: bool,
                      dora: bool) -> dict[str, str]:
    if kind == "comfyui":
        return {}
    if kind == "peft":
        return _peft_metadata(rank, alpha, text_encoder)
    return kohya_metadata(arch, kind, rank, alpha, conv, conv_rank, conv_alpha, dora)


def write_lora(
    path: str | os.PathLike[str],
    arch: str = "sd1",
    *,
    kind: str = "lora",
    tiny: bool = True,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    conv: bool = False,
    text_encoder: bool = True,
    metadata: dict[str, str] | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dora: bool = False,
    dtype: str = "F16",
    with_metadata: bool = True,
) -> WriteResult:
    """Write a seeded adapter for ``arch`` (``sd1``, ``sd2``, ``sdxl``).

    Args:
        kind: ``lora`` (kohya ``lora_down``/``lora_up``/``alpha``; with
            ``conv=True`` a LoCon), ``loha``, ``lokr``, ``peft``, ``comfyui``,
            ``full`` (``diff``/``diff_b``) or ``ia3``.
        tiny: shapes of the tiny test configs, or the real ones.
        rank: linear (and 1x1) rank; ``conv_rank`` for 3x3 convs (default ``rank``).
        alpha: stored as a 0-dim tensor per module; default ``rank`` (scale 1).
            LoKr modules without a low-rank factor store ``alpha = rank``.
        conv_alpha: alpha of 3x3 conv modules; default ``alpha``, or
            ``conv_rank`` when neither is given.
        conv: add ResBlock/sampler modules (and LyCORIS stems for LyCORIS kinds).
        text_encoder: include text-encoder modules.
        metadata: merged over the trainer-style metadata.
        dora: add DoRA magnitudes (``dora_scale`` per output row, LyCORIS's
            default orientation; ``lora_magnitude_vector`` for ``peft``).
        with_metadata: False writes no trainer metadata (only ``metadata``).
    """
    if conv_alpha is None:
        conv_alpha = float(conv_rank or rank) if alpha is None else float(alpha)
    alpha = float(rank if alpha is None else alpha)
    plan = _plan(arch, kind, tiny, rank, conv, conv_rank, text_encoder, dora)
    keys = _keys(plan)
    overrides = _overrides(plan, dtype, seed, alpha, conv_alpha)
    meta = {}
    if with_metadata:
        meta = _default_metadata(arch, kind, rank, alpha, conv, conv_rank, conv_alpha,
                                 text_encoder, dora)
    meta.update(metadata or {})
    return write_tensors(path, keys, dtype=dtype, seed=seed, metadata=meta or None,
                         overrides=overrides)


def flux_lora_keys(naming: str = "kohya", *, hidden: int = 256, depth: int = 2,
                   single: int = 2, rank: int = 4, modules: tuple[str, ...] | None = None,
                   full_text: bool = False) -> dict[str, Shape]:
    """Keys and shapes of a Flux.1 LoRA for the reduced Flux of
    :func:`modelkit.testing.write_flux` (same ``hidden``/``depth``/``single``):
    ``kohya`` (``lora_unet_<BFL path>``: fused ``qkv`` and ``linear1`` as one
    module, with ``alpha``), ``comfyui`` (``diffusion_model.<BFL path>``) or
    ``peft`` (diffusers/ai-toolkit ``transformer.<diffusers path>``: split
    q/k/v and ``proj_mlp``, ``lora_A``/``lora_B``, no alpha tensor).
    ``modules`` limits them to those names."""
    from modelkit.arch import flux
    from modelkit.testing import flux_config

    cfg = flux_config(hidden=hidden, depth=depth, single=single, full_text=full_text)
    shapes = flux.transformer_keys(cfg)
    prefix = {"kohya": flux.KOHYA_PREFIX, "comfyui": flux.COMFY_PREFIX,
              "peft": flux.PEFT_PREFIX}[naming]
    down, up = (("lora_A.weight", "lora_B.weight") if naming == "peft"
                else ("lora_down.weight", "lora_up.weight"))
    out: dict[str, Shape] = {}
    for name, m in flux.lora_modules(cfg).items():
        if not name.startswith(prefix) or (modules is not None and name not in modules):
            continue
        rows, cols = shapes[f"{m.path}.weight"]
        if m.rows is not None:
            rows = m.rows[1] - m.rows[0]
        out[f"{name}.{down}"] = (rank, cols)
        out[f"{name}.{up}"] = (rows, rank)
        if naming == "kohya":
            out[f"{name}.alpha"] = ()
    return out


def write_flux_lora(path: str | os.PathLike[str], naming: str = "kohya", *,
                    hidden: int = 256, depth: int = 2, single: int = 2, rank: int = 4,
                    alpha: float | None = None, alpha_in_metadata: bool = False,
                    modules: tuple[str, ...] | None = None, dtype: str = "F32",
                    seed: int = 0, full_text: bool = False) -> WriteResult:
    """A seeded Flux.1 LoRA (:func:`flux_lora_keys`) with values of about
    0.1. ``alpha`` (default ``rank``): a tensor per module for kohya; for
    ``peft`` with ``alpha_in_metadata`` diffusers' ``lora_adapter_metadata``
    (``transformer.r``, ``transformer.lora_alpha``), else none (scale 1)."""
    import torch

    from modelkit.io.dtypes import to_torch

    keys = flux_lora_keys(naming, hidden=hidden, depth=depth, single=single, rank=rank,
                          modules=modules, full_text=full_text)
    alpha = float(rank if alpha is None else alpha)
    gen = torch.Generator().manual_seed(seed)
    overrides = {}
    for k, shape in keys.items():
        value = (torch.tensor(alpha) if k.endswith(".alpha")
                 else torch.randn(shape, generator=gen) * 0.1)
        overrides[k] = value.to(to_torch(dtype))
    meta = {}
    if naming == "peft" and alpha_in_metadata:
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank,
                                                    "transformer.lora_alpha": alpha})
    return write_tensors(path, keys, dtype=dtype, seed=seed, metadata=meta or None,
                         overrides=overrides)


__all__ = [
    "KINDS",
    "factorization",
    "flux_lora_keys",
    "kohya_metadata",
    "lokr_shapes",
    "lora_keys",
    "select_modules",
    "write_flux_lora",
    "write_lora",
]
