"""``merge`` and ``resize``: exact operations on adapters.

Both sum the dense ΔW of every input module that patches the same weight
(each scaled by its adapter's weight and block weight, s = alpha/rank
applied once), then re-factorise that sum with the truncated SVD of
:mod:`modelkit.lora.factorize`. Nothing is averaged factor by factor, so
there is no weight² and no cross term ``up_i @ down_j`` (kohya's merge).
Any input format works (LoRA, LoCon, LoHa, LoKr, full); (IA)3 and DoRA
modules depend on the base weight and are refused. The output is a kohya
LoRA (alpha = rank); norm-layer patches are kept as ``w_norm``/``b_norm``,
bias patches as ``diff_b``. For a family with its own LoRA module table
(the transformer families) the modules are summed per weight at their rows, so fused and split
q/k/v adapters merge into one, written in kohya, PEFT or ComfyUI names
(:mod:`modelkit.lora.table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch import registry
from modelkit.arch.blocks import block_of
from modelkit.arch.configs import ARCHS, TINY
from modelkit.arch.lora_blocks import parse_lora_blocks
from modelkit.arch.lora_names import ModuleTarget, lora_module_targets, norm_module_targets
from modelkit.core.step import PlannedStep
from modelkit.errors import CancelFlag, ModelkitError, check_cancel
from modelkit.io.source import Source, input_paths_of, source_label
from modelkit.lora.adapter import LORA_ARCHS, Adapter, open_adapter
from modelkit.lora.delta import ModuleDelta, swap_halves
from modelkit.lora.extract import OUTPUT_NAMINGS, ExtractReport, LayerResult
from modelkit.lora.factorize import METHODS, factorize
from modelkit.lora.output import (
    LORA_THREADS,
    LoraBuilder,
    error_metadata,
    lora_metadata,
    storage_dtype,
    torch_threads,
)
from modelkit.lora.table import (
    NAMING_PREFIXES,
    PathGroup,
    dense,
    group_modules,
    has_table,
    out_slots,
    slot_view,
    weight_key,
)
from modelkit.progress import Progress, ProgressFn, no_progress
from modelkit.wording import agree

if TYPE_CHECKING:
    import torch


SVD_LIMIT = 1.8e19  # ~sqrt(float32 max): beyond it the SVD's squares overflow


@dataclass
class MergeReport(ExtractReport):
    """Ranks and errors per output module, and what was merged."""

    inputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Group:
    target: ModuleTarget  # in kohya naming
    shape: tuple[int, ...]
    parts: list[tuple[ModuleDelta, float]] = field(default_factory=list)


def _kohya_index(arch: str) -> dict[tuple[str, tuple[int, int] | None], ModuleTarget]:
    spec = ARCHS[arch]
    found = {**lora_module_targets(spec, "kohya"), **norm_module_targets(spec, "kohya")}
    return {(t.key, t.rows): t for t in found.values()}


def _shape(arch: str, target: ModuleTarget, delta: ModuleDelta, label: str
           ) -> tuple[int, ...]:
    """The patched weight's shape at the adapter's size (full or tiny test
    size), checked against the module's ΔW."""
    for table in (ARCHS, TINY):
        spec = table[arch]
        finder = norm_module_targets if len(target.shape) == 1 else lora_module_targets
        shape = finder(spec, "kohya")[target.name].shape
        if (shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1) == (delta.out,
                                                                         delta.cols):
            return shape
    raise ModelkitError(f"{label}: module {delta.mod.name}: ΔW is {delta.out}x{delta.cols}, "
                        f"which does not fit {target.key} of {arch}")


def _open_all(items: Sequence[tuple[Source, float, object | None]], arch: str | None
              ) -> tuple[str, list[Adapter]]:
    opened = [open_adapter(src, arch) for src, _, _ in items]
    archs = {arch} if arch else {a.arch for a in opened} - {"unknown"}
    if len(archs) > 1:
        archs = _shared_family(opened, archs)
    if not arch and len(archs) == 1:
        archs = {_named_family(opened, next(iter(archs)))}
    if len(archs) != 1 or next(iter(archs)) not in LORA_ARCHS:
        names = ", ".join(f"{a.label} ({a.arch})" for a in opened)
        raise ModelkitError(f"adapters for one known architecture are needed, got {names}; "
                            "pass the architecture explicitly when it is unknown")
    use = next(iter(archs))
    return use, [a if a.arch == use else open_adapter(a.source, use) for a in opened]


def _shared_family(opened: list[Adapter], archs: set[str]) -> set[str]:
    """Of the families the adapters were detected as, the ones all of them
    match module for module, when the others share their names (a Flux.1-
    named LoRA with a Chroma one, SD3 PEFT names read as Flux.1's beside an
    SD3 kohya LoRA); ``archs`` unchanged when none or several fit."""
    if not all(has_table(a) for a in archs):
        return archs
    fits = {a for a in archs
            if not any(open_adapter(ad.source, a).unmatched for ad in opened)}
    return fits if len(fits) == 1 else archs


def _named_family(opened: list[Adapter], use: str) -> str:
    """The family the adapters' own metadata names (kohya's
    ``ss_base_model_version``, ``modelspec.architecture``) when it shares
    its module names with ``use`` and every module matches it (a Chroma LoRA
    with Flux.1 names), else ``use``: what the output's metadata says."""
    from modelkit.arch.lora_modules import shares_names

    named = {_family_of_metadata(ad.source.metadata) for ad in opened} - {None}
    if len(named) != 1:
        return use
    fam = next(iter(named))
    assert fam is not None
    if fam == use or not shares_names(fam, use) or any(
            open_adapter(ad.source, fam).unmatched for ad in opened):
        return use
    return fam


def _family_of_metadata(meta: dict[str, str]) -> str | None:
    version = meta.get("ss_base_model_version")
    spec = meta.get("modelspec.architecture", "").removesuffix("/lora")
    for name in LORA_ARCHS:
        lora = registry.REGISTRY[name].lora
        if lora and ((version and version == lora.base_model_version)
                     or (spec and spec == lora.modelspec_arch)):
            return name
    return None


def _check_matched(ad: Adapter, arch: str) -> None:
    if ad.unmatched:
        keys = agree(len(ad.unmatched), "key", "matches", "match")
        raise ModelkitError(f"{ad.label}: {keys} no module of "
                            f"{arch} (first: {ad.unmatched[0]})")


def _groups(arch: str, opened: list[Adapter],
            items: Sequence[tuple[Source, float, object | None]]) -> dict[str, _Group]:
    index = _kohya_index(arch)
    groups: dict[str, _Group] = {}
    for ad, (_, weight, blocks) in zip(opened, items, strict=True):
        _check_matched(ad, arch)
        table = parse_lora_blocks(blocks, arch) if blocks is not None else None
        for mod in ad.modules.values():
            assert mod.target is not None
            delta = ModuleDelta(ad, mod)
            if delta.needs_base:
                raise ModelkitError(f"{ad.label}: module {mod.name} is (IA)3 or DoRA, whose "
                                    "ΔW depends on the base weight; bake it into a "
                                    "checkpoint instead")
            kt = index[(mod.target.key, mod.target.rows)]
            k = weight * (table[block_of(kt.key, arch)] if table else 1.0)
            group = groups.get(kt.name)
            if group is None:
                group = groups[kt.name] = _Group(kt, _shape(arch, kt, delta, ad.label))
            group.parts.append((delta, k))
    return groups


def _dense(group: _Group) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch

    out = group.shape[0]
    cols = math.prod(group.shape[1:]) if len(group.shape) > 1 else 1
    acc = torch.zeros(out, cols)
    bias: torch.Tensor | None = None
    for delta, k in group.parts:
        if delta.mod.algo not in ("full", "norm") or {"diff", "w_norm"} & delta.mod.keys.keys():
            delta.add_rows_(acc, 0, out, k)
        b = delta.bias()
        if b is not None:
            bias = b * k if bias is None else bias.add_(b, alpha=k)
    return acc, bias


def _write_group(name: str, group: _Group, report: MergeReport, builder: LoraBuilder,
                 conv_names: set[str]) -> None:
    import torch

    acc, bias = _dense(group)
    _check_finite_sum(name, acc, [f"{d.ad.label}: module {d.mod.name}" for d, _ in group.parts])
    if len(group.shape) == 1:  # norm layer
        builder.add(f"{name}.w_norm", acc.reshape(-1).to(builder.dtype))
        zeros = torch.zeros(group.shape[0])
        builder.add(f"{name}.b_norm", (zeros if bias is None else bias).to(builder.dtype))
        report.layers.append(LayerResult(name, group.target.key, 0, 0.0, float(acc.norm())))
        return
    kernel = len(group.shape) == 4 and math.prod(group.shape[2:]) > 1
    cap = (report.conv_rank if kernel else report.rank) or min(acc.shape)
    if _factor_into(name, group.target.key, acc, cap, report, builder, group.shape) and kernel:
        conv_names.add(name)
    if bias is not None:
        builder.add(f"{name}.diff_b", bias.to(builder.dtype))


def _check_finite_sum(name: str, acc: torch.Tensor, labels: list[str]) -> None:
    if not bool(acc.abs().amax() <= SVD_LIMIT):  # NaN fails too
        raise ModelkitError(f"{name}: the ΔW of {'; '.join(labels)} holds NaN/Inf or values "
                            f"beyond ±{SVD_LIMIT:.3g} (alpha or factors too large); it "
                            "cannot be factorised")


def _factor_into(name: str, key: str, part: torch.Tensor, cap: int, report: MergeReport,
                 builder: LoraBuilder, shape: tuple[int, ...] | None = None) -> bool:
    """Factorise ``part`` (one output module's ΔW, 2-D) into ``builder`` as a
    module of weight ``shape`` (default: ``part``'s); False when ΔW is zero
    (the module is listed as skipped, nothing written)."""
    import torch

    ref_sq = float(torch.sum(part * part, dtype=torch.float64))
    if ref_sq == 0.0:
        report.layers.append(LayerResult(name, key, 0, 0.0, 0.0, skipped=True))
        return False
    f = factorize(part, cap, report.energy, method=report.method, dtype=builder.dtype,
                  ref_sq=ref_sq)
    if not (bool(torch.isfinite(f.up).all()) and bool(torch.isfinite(f.down).all())):
        from modelkit.io.dtypes import from_torch

        raise ModelkitError(f"{name}: its factors exceed the {from_torch(builder.dtype)} "
                            "range (the ΔW is too large); write them with --dtype fp32")
    report.err_sq += f.err_sq
    report.ref_sq += ref_sq
    report.layers.append(LayerResult(name, key, f.rank, f.relative_error, math.sqrt(ref_sq)))
    builder.add_lora(name, f.up, f.down, shape or (part.shape[0], part.shape[1]))
    return True


Step = Callable[[set[str]], None]


def _table_work(arch: str, naming: str, opened: list[Adapter],
                items: Sequence[tuple[Source, float, object | None]], report: MergeReport,
                builder: LoraBuilder) -> list[tuple[str, Step]]:
    """One step per weight the adapters patch (a family with its own module
    table): the weighted ΔW summed at each module's rows, then each output
    slot of ``naming`` factorised."""
    uses = []
    for ad, (_, weight, blocks) in zip(opened, items, strict=True):
        _check_matched(ad, arch)
        uses.append((ad, weight, parse_lora_blocks(blocks, arch) if blocks is not None
                     else None))
    groups = group_modules(arch, uses)
    work: list[tuple[str, Step]] = []
    for path, group in groups.items():
        slots = out_slots(arch, naming, path, "+".join(ad.label for ad in opened),
                          (group.rows, group.cols))

        def step(conv: set[str], group: PathGroup = group, slots: tuple = slots) -> None:
            acc, bias = dense(group)
            _check_finite_sum(group.path, acc, [f"{d.ad.label}: module {d.mod.name}"
                                                for d, _, _ in group.parts])
            for slot in slots:
                row0, n = slot_view(group.rows, group.cols, slot.rows, slot.of)
                part = acc[row0:row0 + n]
                _factor_into(slot.name, weight_key(group.path),
                             swap_halves(part) if slot.swap else part,
                             report.rank or min(n, group.cols), report, builder)
                if bias is not None:
                    if naming == "peft":
                        raise ModelkitError(f"{slot.name}: the adapters patch the bias of "
                                            f"{group.path}, which PEFT LoRA files cannot "
                                            "hold; write --format kohya or comfyui")
                    builder.add(f"{slot.name}.diff_b",
                                bias[row0:row0 + n].to(builder.dtype))

        work.append((path, step))
    return work


def merge(items: Sequence[tuple[Source, float, object | None]], rank: int | None,
          conv_rank: int | None = None, energy: float | None = None, *,
          dtype: str = "F16", method: str = "auto", arch: str | None = None,
          naming: str = "kohya", cancel: CancelFlag | None = None) -> PlannedStep:
    """Plan a kohya LoRA equal to the weighted sum of ``items``
    (``(adapter, weight, blocks or None)``), re-factorised.

    Args:
        rank: rank cap of Linear/1x1 modules (None: no cap; use ``energy``).
        conv_rank: rank cap of 3x3 convs (default ``rank``).
        energy: per module, the smallest rank holding this share of ||ΔW||^2.
        arch: the architecture, when the adapters do not tell it.
        naming: output names: ``kohya``; for a family with its own module
            table (the transformer families) also ``peft`` or ``comfyui``.
    """
    if rank is None and energy is None:
        raise ModelkitError("give a rank, an energy or both")
    if (rank is not None and rank < 1) or (conv_rank is not None and conv_rank < 1):
        raise ModelkitError(f"--rank and --conv-rank must be at least 1 (got "
                            f"{rank if rank is not None and rank < 1 else conv_rank})")
    if method not in METHODS:
        raise ModelkitError(f"unknown SVD method {method!r}; use {', '.join(METHODS)}")
    if not items:
        raise ModelkitError("lora merge needs at least one adapter")
    from modelkit.io.dtypes import to_torch

    naming = OUTPUT_NAMINGS.get(naming, naming)
    if naming not in NAMING_PREFIXES:
        raise ModelkitError(f"unknown format {naming!r}; use kohya, peft or comfyui")
    arch, opened = _open_all(items, arch)
    if naming != "kohya" and not has_table(arch):
        raise ModelkitError(f"{arch} LoRAs are merged and resized in kohya format; turn the "
                            f"result into {naming} with 'modelkit lora convert --to {naming}'")
    inputs = [{"file": ad.label, "weight": w, "blocks": b}
              for ad, (_, w, b) in zip(opened, items, strict=True)]
    report = MergeReport(arch, rank or 0, conv_rank or rank, energy, method, inputs=inputs)
    title = "+".join(Path(source_label(s)).stem for s, _, _ in items)
    builder = LoraBuilder(f"lora_merge({title})", to_torch(storage_dtype(dtype)),
                          input_paths_of([s for s, _, _ in items]), naming)
    if has_table(arch):
        work = _table_work(arch, naming, opened, items, report, builder)
    else:
        def sd_step(name: str, group: _Group) -> Step:
            return lambda conv: _write_group(name, group, report, builder, conv)

        work = [(n, sd_step(n, g)) for n, g in _groups(arch, opened, items).items()]

    planned = PlannedStep(builder.source, report, "lora_merge", {})

    def prepare(progress: ProgressFn = no_progress, stop: CancelFlag | None = None) -> None:
        conv_names: set[str] = set()
        for i, (name, step) in enumerate(work):
            check_cancel(stop)
            check_cancel(cancel)
            with torch_threads(LORA_THREADS):
                step(conv_names)
            progress(Progress("lora merge", i + 1, len(work), "tensors", name))
        errors = {x.name: x.relative_error for x in report.layers if x.rank}
        builder.finish(lora_metadata(arch, builder.ranks, conv_names, title,
                                     error_metadata(errors, report.relative_error)))
        planned.origins = dict.fromkeys(builder.source.infos)

    params = {"inputs": inputs, "rank": rank, "conv_rank": conv_rank, "energy": energy,
              "dtype": dtype, "method": method, "format": naming}
    planned.params, planned.prepare = params, prepare
    return planned


def resize(lora: Source, rank: int | None = None, energy: float | None = None,
           conv_rank: int | None = None, *, dtype: str | None = None, method: str = "auto",
           arch: str | None = None, naming: str = "kohya", cancel: CancelFlag | None = None
           ) -> PlannedStep:
    """Plan ``lora`` re-factorised at ``rank`` (cap) and/or ``energy``; the
    dtype defaults to the input's first factor's. Any format in, kohya out
    (or ``naming``, for a family with its own module table)."""
    if dtype is None:
        floats = [i.dtype for i in lora.infos.values() if i.is_float and len(i.shape) >= 2]
        dtype = floats[0] if floats and floats[0] in ("F16", "BF16", "F32") else "F16"
    conv = merge([(lora, 1.0, None)], rank, conv_rank, energy, dtype=dtype, method=method,
                 arch=arch, naming=naming, cancel=cancel)
    conv.op = "lora_resize"
    conv.params = {"rank": rank, "conv_rank": conv_rank, "energy": energy, "dtype": dtype,
                   "method": method, "format": naming}
    return conv


__all__ = ["MergeReport", "merge", "resize"]
