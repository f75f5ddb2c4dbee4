"""LoRA module-name tables of the transformer families, as data.

A family without LDM key tables (Flux.1, Chroma, Flux.2, SD3, Qwen-Image,
Wan, Z-Image) declares one table in the registry
(``LoraNames.modules``): adapter module name -> :class:`LoraModule`, the
weight it patches in the family's original (single-file, ComfyUI) layout
and, for a diffusers projection split out of a fused weight, its row slice.
The tables are generated from the key generators of ``modelkit/arch`` in
every spelling trainers write:

* original paths (:func:`original_names`): kohya / musubi-tuner
  ``lora_unet_<path with _>``, ComfyUI ``diffusion_model.<path>``,
  DiffSynth / bare ``<path>`` and SimpleTuner LyCORIS ``lycoris_<path with _>``
  (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet``);
* diffusers paths (:func:`diffusers_names`): diffusers / ai-toolkit / PEFT
  ``transformer.<path>`` (``base_model.model.<path>``: see :data:`ALIASES`),
  OneTrainer ``lora_transformer_<path with _>`` and SimpleTuner
  ``lycoris_<path with _>`` (ComfyUI ``model_lora_keys_unet``'s SD3 and Flux
  branches); a family whose trainers write diffusers paths under the native
  prefixes too (Z-Image: diffusers ``_convert_non_diffusers_z_image_lora_to_diffusers``)
  adds those spellings.

Importing this module does not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from modelkit.arch.to_diffusers import KeyMap

Shape = tuple[int, ...]
T = TypeVar("T")
KOHYA_PREFIX, COMFY_PREFIX, PEFT_PREFIX = "lora_unet_", "diffusion_model.", "transformer."
ONETRAINER_PREFIX, LYCORIS_PREFIX = "lora_transformer_", "lycoris_"
PEFT_MODEL_PREFIX = "base_model.model."  # PEFT's own spelling (fal's Kontext LoRAs)
# other spellings of a prefix: PEFT's base_model.model. for diffusers'
# transformer.; Wan-Fun's doubled underscore (ComfyUI comfy/lora_convert.py
# convert_lora_wan_fun)
ALIASES = ((PEFT_MODEL_PREFIX, PEFT_PREFIX), ("lora_unet__", KOHYA_PREFIX))


@dataclass(frozen=True)
class LoraModule:
    """Where one adapter module lands: the transformer ``path`` (original
    layout, without ``.weight``) and, for a split diffusers projection, the
    row slice ``[start, stop)`` of that fused weight of ``of`` rows (at the
    size of the config the table was made for; scale by the real rows).
    ``swap``: the module's rows are the weight's with its two halves swapped
    (diffusers stores an adaLN output as scale, shift where the original
    layout has shift, scale: ``norm_out.linear``; diffusers
    loaders/single_file_utils.py ``swap_scale_shift``)."""

    path: str
    rows: tuple[int, int] | None = None
    of: int | None = None
    swap: bool = False


ModuleTable = dict[str, LoraModule]


# SD3's last joint block has a context stream without attention output
# (``context_pre_only``): its adaLN holds only shift and scale ([2h, h]; 6h
# rows elsewhere), and diffusers stores that weight as ``norm1_context.linear``
# with the halves swapped (diffusers loaders/single_file_utils.py
# ``convert_sd3_transformer_checkpoint_to_diffusers``, ``swap_scale_shift``).
# Which block is last depends on the depth (24 in SD3/3.5 Medium, 38 in 3.5
# Large), so a table made for one depth cannot mark it; the weight's rows do.
PRE_ONLY_ADALN = "context_block.adaLN_modulation.1"
SWAPPED_NAME = "norm1_context"


def pre_only_adaln(path: str, rows: int, cols: int) -> bool:
    """Whether weight ``path`` (``rows`` x ``cols``) is SD3's pre-only
    context adaLN, which diffusers stores with its halves swapped."""
    return path.endswith(PRE_ONLY_ADALN) and rows == 2 * cols


def swapped_by_shape(name: str, path: str, rows: int, cols: int) -> bool:
    """Whether diffusers-named module ``name`` on ``path`` (ΔW ``rows`` x
    ``cols``) acts on the halves-swapped rows (see ``PRE_ONLY_ADALN``)."""
    return SWAPPED_NAME in name and pre_only_adaln(path, rows, cols)


def flat(path: str) -> str:
    """kohya's spelling of a module path: dots become underscores."""
    return path.replace(".", "_")


def linear_paths(keys: Iterable[tuple[str, Shape]]) -> Iterator[str]:
    """The paths (without ``.weight``) of the 2-D weights among ``keys``."""
    for key, shape in keys:
        if key.endswith(".weight") and len(shape) == 2:
            yield key.removesuffix(".weight")


def original_names(path: str, *, bare: bool = True) -> Iterator[str]:
    """Every spelling of an original-layout module path."""
    yield KOHYA_PREFIX + flat(path)
    yield COMFY_PREFIX + path
    yield LYCORIS_PREFIX + flat(path)
    if bare:
        yield path


def diffusers_names(path: str, *, native: bool = False) -> Iterator[str]:
    """Every spelling of a diffusers module path (``native``: also under the
    kohya and ComfyUI prefixes and bare)."""
    yield PEFT_PREFIX + path
    yield ONETRAINER_PREFIX + flat(path)
    yield LYCORIS_PREFIX + flat(path)
    if native:
        yield KOHYA_PREFIX + flat(path)
        yield COMFY_PREFIX + path
        yield path


def build(original: Iterable[tuple[str, Shape]],
          diffusers: Iterable[tuple[str, LoraModule]] = (), *, native: bool = False,
          bare: bool = True) -> ModuleTable:
    """A module table: every 2-D weight of ``original`` (key, shape) in every
    original spelling, then every ``(diffusers path, module)`` in the
    diffusers spellings (an original spelling wins a clash)."""
    out: ModuleTable = {}
    for path in linear_paths(original):
        for name in original_names(path, bare=bare):
            out.setdefault(name, LoraModule(path))
    for path, module in diffusers:
        for name in diffusers_names(path, native=native):
            out.setdefault(name, module)
    return out


def from_key_map(key_map: KeyMap, shapes: Mapping[str, Shape]
                 ) -> Iterator[tuple[str, LoraModule]]:
    """``(diffusers path, module)`` for every 2-D weight of a layout map
    (:mod:`modelkit.arch.to_diffusers`): a split piece keeps its row slice
    of the fused original weight; a piece whose halves swap (diffusers'
    ``norm_out``) is marked ``swap``."""
    for key, piece in key_map.items():
        shape = shapes.get(piece.source)
        if not key.endswith(".weight") or shape is None or len(shape) != 2 or (
                piece.swap and piece.rows is not None):
            continue
        of = shape[0] if piece.rows is not None else None
        yield key.removesuffix(".weight"), LoraModule(
            piece.source.removesuffix(".weight"), piece.rows, of, piece.swap)


def lookup(table: Mapping[str, T], name: str) -> T | None:
    """The module ``name`` patches, under any spelling of :data:`ALIASES`."""
    hit = table.get(name)
    if hit is not None:
        return hit
    for old, new in ALIASES:
        if name.startswith(old):
            return table.get(new + name[len(old):])
    return None


@lru_cache(maxsize=16)
def table_of(arch: str) -> ModuleTable:
    """The registry's module table of ``arch`` (empty when it has none)."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    if entry is None or entry.lora is None or entry.lora.modules is None:
        return {}
    return dict(entry.lora.modules())


def tabled_archs() -> tuple[str, ...]:
    """The architectures with a module table, in registry order."""
    from modelkit.arch import registry

    return registry.names(where=lambda a: a.lora is not None and a.lora.modules is not None)


def resolved_counts(names: Iterable[str]) -> dict[str, int]:
    """How many of the module ``names`` each tabled architecture resolves."""
    names = list(names)
    return {arch: sum(lookup(table_of(arch), n) is not None for n in names)
            for arch in tabled_archs()}


@lru_cache(maxsize=16)
def diffusers_paths(arch: str) -> dict[tuple[str, tuple[int, int] | None], str]:
    """``(original path, rows) -> diffusers path`` for the modules whose
    target is one whole weight of the diffusers layout (a split q/k/v slice,
    a renamed Linear), from the table's ``transformer.`` spellings; a fused
    weight diffusers splits (a kohya ``qkv``) or stores reordered (Flux's
    ``norm_out``) has none."""
    out: dict[tuple[str, tuple[int, int] | None], str] = {}
    for name, m in table_of(arch).items():
        if name.startswith(PEFT_PREFIX) and not m.swap:
            out.setdefault((m.path, m.rows), name[len(PEFT_PREFIX):])
    return out


def known_name(name: str) -> bool:
    """Whether any tabled architecture knows module ``name``."""
    return any(lookup(table_of(a), name) is not None for a in tabled_archs())


def shares_names(a: str, b: str) -> bool:
    """Whether LoRAs of ``a`` and ``b`` are written with the same module
    names (a Flux.1 LoRA on Chroma), so that the base decides what matches."""
    from modelkit.arch import registry

    ea, eb = registry.get(a), registry.get(b)
    return a == b or bool(ea and ea.lora and b in ea.lora.shares_names) or bool(
        eb and eb.lora and a in eb.lora.shares_names)


_NUMBERED = re.compile(r"(^|\.)\d+(?=\.|$)")


def module_kind(path: str) -> str:
    """A module path without its block numbers, to group modules in a
    report: ``blocks.3.cross_attn.k_img`` -> ``blocks.cross_attn.k_img``."""
    return _NUMBERED.sub("", path)


_BLOCK = re.compile(r"^([A-Za-z_]+)\.(\d+)\.")


def block_of_path(path: str) -> str:
    """The block a transformer module path is in, for per-block reports of a
    family without a block map: its numbered block (``blocks.3``,
    ``transformer_blocks.0``, ``noise_refiner.1``), else its top-level part
    (``img_in``, ``time_embedding``)."""
    hit = _BLOCK.match(path)
    return f"{hit.group(1)}.{int(hit.group(2))}" if hit else path.split(".", 1)[0]


def unmatched_reason(arch: str, no_target: Mapping[str, int]) -> str | None:
    """Why modules of these kinds (:func:`module_kind`) have no target in a
    file of ``arch``, when the family knows (a Wan 2.1 image-to-video LoRA's
    image cross-attention on a Wan 2.2 or text-to-video file)."""
    if arch == "wan":
        from modelkit.arch.wan import I2V_ONLY

        if any(i in kind for kind in no_target for i in I2V_ONLY):
            return ("a Wan 2.1 I2V LoRA on a Wan 2.2 or text-to-video file: its image "
                    "cross-attention (k_img, v_img, img_emb) has no target there")
    if arch == "chroma" and any(k.endswith("_mod.lin") or k.endswith("modulation.lin")
                                for k in no_target):
        return "a Flux.1 LoRA on Chroma: Chroma has no per-block modulation"
    return None


__all__ = ["PRE_ONLY_ADALN", "SWAPPED_NAME", "LoraModule", "ModuleTable", "block_of_path", "build",
           "diffusers_names", "diffusers_paths", "flat", "from_key_map", "known_name", "lookup",
           "module_kind", "original_names", "pre_only_adaln", "resolved_counts", "shares_names",
           "swapped_by_shape", "table_of", "tabled_archs", "unmatched_reason"]
