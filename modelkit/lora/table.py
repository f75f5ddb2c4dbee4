"""LoRA extract, merge/resize and convert for a family that declares its own
LoRA module table in the registry (``LoraNames.modules``: Flux.1, SD3, Chroma,
Flux.2, Qwen-Image, Wan and Z-Image).

A table maps every adapter module name (kohya/musubi, ComfyUI and
diffusers/PEFT spellings) to where it lands: a transformer weight ``path``
and, for diffusers' split projections, the row slice ``rows`` of that fused
weight of ``of`` rows (:class:`modelkit.arch.flux.LoraModule`). Everything
here works on *paths*: the adapter modules that land on one path are
resolved to their rows of the fused weight, so a kohya fused ``qkv`` module
and three PEFT ``to_q/to_k/to_v`` modules are the same thing seen two ways.

Output names come from the same table: a naming's modules are those whose
name starts with its prefix (:data:`NAMING_PREFIXES`), and a path is written
as the naming's *slots* for it: one whole-weight module (kohya, ComfyUI), or
one module per row slice (PEFT's split q/k/v and ``proj_mlp``).

* extract: per path, ΔW = TUNED − BASE of the whole weight, then each slot's
  rows factorised on their own (:mod:`modelkit.lora.factorize`).
* merge/resize: per path, the dense sum of every module's weighted ΔW placed
  at its rows, then each slot's rows factorised.
* convert (exact, no SVD): a module whose rows are an output slot's is
  renamed (alpha kept, or folded into ``lora_B`` for PEFT); otherwise each
  output slot takes the up rows of every LoRA module overlapping it, scaled
  by that module's alpha/rank, and stacks the downs: a fused module split
  into q/k/v keeps its rank, three split modules fused into ``qkv`` give
  rank r_q + r_k + r_v (kohya-ss/sd-scripts ``networks/convert_flux_lora.py``
  does the same in both directions; diffusers ``loaders/
  lora_conversion_utils.py`` ``_convert_kohya_flux_lora_to_diffusers``
  splits the up rows likewise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from modelkit.arch import registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.lora_modules import pre_only_adaln, swapped_by_shape
from modelkit.errors import ModelkitError
from modelkit.lora.adapter import DOWN, MID, UP, Adapter, AdapterModule
from modelkit.lora.delta import (
    DORA,
    ModuleDelta,
    delta_shape,
    module_scale,
    swap_halves,
    target_view,
)

if TYPE_CHECKING:
    import torch

# the module-name prefix of each output naming, shared by the DiT families:
# kohya sd-scripts / musubi-tuner ``lora_unet_``, ComfyUI ``diffusion_model.``,
# diffusers ``transformer.``
NAMING_PREFIXES = {"kohya": "lora_unet_", "comfyui": "diffusion_model.", "peft": "transformer."}
PEFT_DOWN, PEFT_UP = "lora_A.weight", "lora_B.weight"


@dataclass(frozen=True)
class Slot:
    """One output module: its name and the part of weight ``path`` it
    patches (``rows`` of ``of`` at the table's size; None: all of it);
    ``swap``: its rows are the weight's with the halves swapped (diffusers'
    ``norm_out.linear``)."""

    name: str
    path: str
    rows: tuple[int, int] | None = None
    of: int | None = None
    swap: bool = False


def has_table(arch: str) -> bool:
    """Whether ``arch`` declares its own LoRA module table."""
    entry = registry.get(arch)
    return entry is not None and entry.lora is not None and entry.lora.modules is not None


@lru_cache(maxsize=16)
def layouts(arch: str, naming: str) -> dict[str, tuple[Slot, ...]]:
    """Weight path -> the slots ``naming`` writes it as (a whole-weight
    module when the naming has one, else its row slices in row order), in
    the table's order."""
    entry = registry.REGISTRY[arch]
    assert entry.lora is not None and entry.lora.modules is not None
    prefix = NAMING_PREFIXES[naming]
    found: dict[str, list[Slot]] = {}
    for name, m in entry.lora.modules().items():
        if name.startswith(prefix):
            found.setdefault(m.path, []).append(Slot(name, m.path, m.rows, m.of, m.swap))
    out = {}
    for path, slots in found.items():
        whole = [s for s in slots if s.rows is None]
        out[path] = (whole[0],) if whole else tuple(sorted(slots, key=_row_start))
    return out


def _row_start(s: Slot) -> int:
    return s.rows[0] if s.rows else 0


def weight_key(path: str) -> str:
    """The checkpoint key of ``path``'s weight (``model.diffusion_model.``
    spelling; :func:`checkpoint_key` finds a bare file's)."""
    return f"{UNET_PREFIX}{path}.weight"


def checkpoint_key(key: str, infos: dict[str, Any]) -> str | None:
    """``key`` as the checkpoint spells it (bare transformer files have no
    ``model.diffusion_model.``), or None when it has no such weight."""
    if key in infos:
        return key
    bare = key.removeprefix(UNET_PREFIX)
    return bare if bare in infos else None


def path_of(mod: AdapterModule) -> str:
    """The weight path a resolved module patches."""
    assert mod.target is not None
    return mod.target.key.removeprefix(UNET_PREFIX).removesuffix(".weight")


def slot_view(rows: int, cols: int, part: tuple[int, int] | None, of: int | None
              ) -> tuple[int, int]:
    """``(row0, n_rows)`` of a part (table rows ``part`` of ``of``) of a
    weight with ``rows`` rows."""
    row0, out, _ = target_view((rows, cols), part, of)
    return row0, out


def fused_rows(mod: AdapterModule, out: int, label: str) -> int:
    """The rows of the whole weight a module of ``out`` rows patches part of."""
    t = mod.target
    assert t is not None
    if t.rows is None:
        return out
    span = t.rows[1] - t.rows[0]
    of = t.of if t.of is not None else 3 * span
    if (out * of) % span:
        raise ModelkitError(f"{label}: module {mod.name}: its {out} rows are not the "
                            f"{span}/{of} share of a weight; the adapter does not fit "
                            "this family")
    return out * of // span


# --- merge and resize --------------------------------------------------------------


@dataclass
class PathGroup:
    """Every weighted module that lands on one weight."""

    path: str
    rows: int
    cols: int
    parts: list[tuple[ModuleDelta, float, int]] = field(default_factory=list)  # k, row0


def group_modules(arch: str, adapters: Iterable[tuple[Adapter, float, dict[str, float] | None]]
                  ) -> dict[str, PathGroup]:
    """Path -> its modules with their weight (times the block weight) and
    first row in the whole weight. Sizes are read from the modules and must
    agree between adapters."""
    from modelkit.arch.blocks import block_of

    groups: dict[str, PathGroup] = {}
    for ad, weight, blocks in adapters:
        for mod in ad.modules.values():
            delta = ModuleDelta(ad, mod)
            if delta.needs_base:
                raise ModelkitError(f"{ad.label}: module {mod.name} is (IA)3 or DoRA, whose "
                                    "ΔW depends on the base weight; bake it into a "
                                    "checkpoint instead")
            path = path_of(mod)
            rows = fused_rows(mod, delta.out, ad.label)
            k = weight * (blocks[block_of(weight_key(path), arch)] if blocks else 1.0)
            group = groups.setdefault(path, PathGroup(path, rows, delta.cols))
            if (group.rows, group.cols) != (rows, delta.cols):
                raise ModelkitError(f"{ad.label}: module {mod.name} patches {path} as a "
                                    f"{rows}x{delta.cols} weight, but another module sees "
                                    f"it as {group.rows}x{group.cols}; the adapters are "
                                    "for models of different sizes")
            check_swapped_input(mod, path, rows, delta.cols, ad.label)
            assert mod.target is not None
            row0, _ = slot_view(rows, delta.cols, mod.target.rows, mod.target.of)
            group.parts.append((delta, k, row0))
    return groups


def dense(group: PathGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's summed ΔW ``[rows, cols]`` (float32) and Δb (or None)."""
    import torch

    acc = torch.zeros(group.rows, group.cols)
    bias: torch.Tensor | None = None
    for delta, k, row0 in group.parts:
        keys = delta.mod.keys
        if delta.mod.algo not in ("full", "norm") or {"diff", "w_norm"} & keys.keys():
            delta.add_rows_(acc[row0:row0 + delta.out], 0, delta.out, k)
        b = delta.bias()
        if b is not None:
            if bias is None:
                bias = torch.zeros(group.rows)
            bias[row0:row0 + b.numel()].add_(b, alpha=k)
    return acc, bias


def swapped_in_diffusers(path: str, rows: int, cols: int) -> bool:
    """Whether diffusers stores weight ``path`` (``rows`` x ``cols``) with its
    shift/scale halves swapped where the module table does not mark it (SD3's
    pre-only context adaLN: :data:`modelkit.arch.lora_modules.PRE_ONLY_ADALN`)."""
    return pre_only_adaln(path, rows, cols)


def check_swapped_input(mod: AdapterModule, path: str, rows: int, cols: int, label: str
                        ) -> None:
    """Refuse a diffusers-named module on SD3's pre-only context adaLN that
    resolution could not mark swapped (a LyCORIS algorithm: its ΔW rows are
    in diffusers' swapped order and not reordered here)."""
    swapped = mod.target is not None and mod.target.swap
    if not swapped and swapped_by_shape(mod.name, path, rows, cols):
        raise ModelkitError(f"{label}: module {mod.name} patches {path}, which diffusers "
                            "stores with its shift and scale halves swapped; modelkit "
                            "reorders LoRA modules there, not this one: leave it out")


def out_slots(arch: str, naming: str, path: str, what: str,
              size: tuple[int, int] | None = None) -> tuple[Slot, ...]:
    """The slots ``naming`` writes ``path`` (of ``size`` rows x cols when
    known) as, or a one-line error."""
    slots = layouts(arch, naming).get(path)
    if (naming == "peft" and size is not None and slots and len(slots) == 1
            and not slots[0].swap and swapped_in_diffusers(path, *size)):
        slots = (replace(slots[0], swap=True),)  # diffusers' row order
    if not slots:
        raise ModelkitError(f"{what}: {naming} names have no module for {path} (a weight "
                            f"this adapter patches); write kohya or comfyui names instead")
    return slots


# --- convert -----------------------------------------------------------------------


Maker = Callable[[], "torch.Tensor"]


@dataclass
class PlannedTensor:
    """One output tensor: storage dtype, shape and how to make it."""

    dtype: str
    shape: tuple[int, ...]
    make: Maker


def _suffixes(naming: str) -> tuple[str, str]:
    return (PEFT_DOWN, PEFT_UP) if naming == "peft" else (DOWN, UP)


def _same_part(mod: AdapterModule, slot: Slot) -> bool:
    t = mod.target
    assert t is not None
    return t.rows == slot.rows and (t.rows is None or t.of == slot.of) and t.swap == slot.swap


def _copy(ad: Adapter, key: str, how: Any = None) -> PlannedTensor:
    info = ad.source.infos[key]

    def make() -> torch.Tensor:
        t = ad.get(key)
        if isinstance(how, tuple):
            return t.reshape(how).contiguous()
        if how is not None and how != 1.0:
            return (t.float() * how).to(t.dtype)
        return t

    return PlannedTensor(info.dtype, how if isinstance(how, tuple) else tuple(info.shape), make)


def _scalar(value: float, dtype: str) -> PlannedTensor:
    def make() -> torch.Tensor:
        import torch

        from modelkit.io.dtypes import to_torch

        return torch.tensor(value, dtype=to_torch(dtype))

    return PlannedTensor(dtype, (), make)


def rename(ad: Adapter, mod: AdapterModule, name: str, naming: str,
           plan: dict[str, PlannedTensor]) -> None:
    """``mod`` under ``name``: its tensors as they are (kohya, ComfyUI; a PEFT
    module's scale from the header metadata becomes an alpha), or plain
    LoRA with alpha/rank folded into ``lora_B`` (PEFT)."""
    if naming != "peft":
        for suffix, key in mod.keys.items():
            how: Any = None
            if suffix == DORA and not key.endswith(DORA):  # PEFT magnitude -> [out, 1]
                how = (ad.source.infos[key].shape[0], 1)
            plan[f"{name}.{suffix}"] = _copy(ad, key, how)
        if mod.algo == "lora" and "alpha" not in mod.keys and mod.peft_scale is not None:
            rank = ad.source.infos[mod.keys[DOWN]].shape[0]
            plan[f"{name}.alpha"] = _scalar(mod.peft_scale * rank,
                                            ad.source.infos[mod.keys[UP]].dtype)
        return
    _plain_lora(ad, mod, "PEFT/diffusers files hold plain LoRA only (convert to kohya "
                         "or comfyui instead)")
    plan[f"{name}.{PEFT_DOWN}"] = _copy(ad, mod.keys[DOWN])
    plan[f"{name}.{PEFT_UP}"] = _copy(ad, mod.keys[UP], module_scale(ad, mod))
    if DORA in mod.keys:
        out = ad.source.infos[mod.keys[UP]].shape[0]
        if math.prod(ad.source.infos[mod.keys[DORA]].shape) != out:
            raise ModelkitError(f"{ad.label}: {mod.keys[DORA]}: PEFT keeps DoRA magnitudes "
                                "per output row only; this one is per input channel")
        plan[f"{name}.lora_magnitude_vector"] = _copy(ad, mod.keys[DORA], (out,))


def _plain_lora(ad: Adapter, mod: AdapterModule, why: str) -> None:
    if mod.algo != "lora" or MID in mod.keys or DORA in mod.keys:
        kind = ("Tucker LoCon" if MID in mod.keys else "DoRA" if DORA in mod.keys
                else mod.algo)
        raise ModelkitError(f"{ad.label}: module {mod.name} is {kind}; {why}")


def restack(ad: Adapter, mods: list[AdapterModule], slot: Slot, rows: int, naming: str,
            plan: dict[str, PlannedTensor]) -> int:
    """Slot ``slot`` of a ``rows``-row weight from the LoRA modules ``mods``
    that overlap it: each module's up rows inside the slot, times its
    alpha/rank, side by side; their downs stacked. Exact; the rank is the sum
    of theirs (written with alpha = rank, scale 1). Returns the rank."""
    for mod in mods:
        _plain_lora(ad, mod, "only plain LoRA modules can be split or fused exactly "
                             "(keep the input's naming)")
    cols = ad.source.infos[mods[0].keys[DOWN]].shape[1]
    s0, n = slot_view(rows, cols, slot.rows, slot.of)
    spans = []  # (module, its row0 in the weight, its rank)
    for mod in mods:
        assert mod.target is not None
        up_shape = ad.source.infos[mod.keys[UP]].shape
        m0, _ = slot_view(rows, cols, mod.target.rows, mod.target.of)
        spans.append((mod, m0, up_shape[1]))
    rank = sum(r for _, _, r in spans)
    dtype = ad.source.infos[mods[0].keys[UP]].dtype

    def make_up() -> torch.Tensor:
        import torch

        up = torch.zeros(n, rank)
        c = 0
        for mod, m0, r in spans:
            u = ad.get(mod.keys[UP]).float().reshape(-1, r) * module_scale(ad, mod)
            if mod.target is not None and mod.target.swap:  # to the weight's row order
                u = swap_halves(u)
            lo, hi = max(s0, m0), min(s0 + n, m0 + u.shape[0])
            if hi > lo:
                up[lo - s0:hi - s0, c:c + r] = u[lo - m0:hi - m0]
            c += r
        if slot.swap:
            up = swap_halves(up)
        return up.to(ad.get(mods[0].keys[UP]).dtype)

    def make_down() -> torch.Tensor:
        import torch

        return torch.cat([ad.get(m.keys[DOWN]).reshape(r, -1) for m, _, r in spans]).to(
            ad.get(mods[0].keys[DOWN]).dtype)

    down_suffix, up_suffix = _suffixes(naming)
    down_dtype = ad.source.infos[mods[0].keys[DOWN]].dtype
    plan[f"{slot.name}.{down_suffix}"] = PlannedTensor(down_dtype, (rank, cols), make_down)
    plan[f"{slot.name}.{up_suffix}"] = PlannedTensor(dtype, (n, rank), make_up)
    if naming != "peft":
        plan[f"{slot.name}.alpha"] = _scalar(float(rank), dtype)
    return rank


def convert_path(ad: Adapter, arch: str, naming: str, path: str, mods: list[AdapterModule],
                 plan: dict[str, PlannedTensor], ranks: dict[str, str]) -> None:
    """Plan the output modules of one weight path (see the module doc);
    ``ranks`` records each slot whose rank changed (``"4+4+4 -> 12"``)."""
    rows, cols = delta_shape(ad, mods[0])
    rows = fused_rows(mods[0], rows, ad.label)
    for mod in mods:
        check_swapped_input(mod, path, rows, cols, ad.label)
    slots = out_slots(arch, naming, path, ad.label, (rows, cols))
    matched = {}
    for mod in mods:
        hit = [s for s in slots if _same_part(mod, s)]
        if not hit or hit[0].name in matched:
            break
        matched[hit[0].name] = mod
    else:
        for slot in slots:
            if slot.name in matched:
                rename(ad, matched[slot.name], slot.name, naming, plan)
        return
    for slot in slots:
        s0, n = slot_view(rows, 1, slot.rows, slot.of)
        over = []
        for mod in mods:
            assert mod.target is not None
            m0, mn = slot_view(rows, 1, mod.target.rows, mod.target.of)
            if m0 < s0 + n and s0 < m0 + mn:
                over.append(mod)
        if not over:
            continue
        rank = restack(ad, over, slot, rows, naming, plan)
        before = [str(ad.source.infos[m.keys[DOWN]].shape[0]) for m in over]
        if before != [str(rank)]:
            ranks[slot.name] = f"{'+'.join(before)} -> {rank}"


__all__ = ["NAMING_PREFIXES", "PathGroup", "PlannedTensor", "Slot", "check_swapped_input",
           "checkpoint_key",
           "convert_path", "dense", "fused_rows", "group_modules", "has_table", "layouts",
           "out_slots", "path_of", "rename", "restack", "slot_view", "swapped_in_diffusers",
           "weight_key"]
