"""``extract``: a kohya-format LoRA approximating TUNED − BASE, layer by layer
(for a family with its own LoRA module table, the transformer families, every Linear of the
transformer, in kohya, PEFT or ComfyUI names: :mod:`modelkit.lora.table`).

Layers are kohya's (Transformer2D Linear/1x1 modules and the text encoders'
q/k/v/out_proj, fc1, fc2; with ``conv_rank`` also the ResBlock and sampler
convs, 3x3 kernels at ``conv_rank``, 1x1 and Linear ones at ``rank``). Fused
open_clip q/k/v are read as row thirds of ``in_proj_weight``.

Per layer: ΔW = TUNED − BASE in float32 (built in row chunks), skipped when
``||ΔW|| <= skip_below * ||W_base||`` (reported, never all-or-nothing per
text encoder), else factorised (:mod:`modelkit.lora.factorize`). Only one
layer's ΔW and SVD work are in memory at a time, plus the output factors.
The relative error ``||ΔW − up@down|| / ||ΔW||`` of every layer and the
overall one (skipped layers count as fully lost) go into the report and
the file's metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch.configs import ARCHS
from modelkit.arch.lora_names import (
    GROUP_RESNET,
    GROUP_SAMPLER,
    GROUP_TEXT,
    GROUP_TRANSFORMER,
    ModuleTarget,
    kohya_te_layers,
    lora_module_targets,
    te_layer,
)
from modelkit.core.step import PlannedStep
from modelkit.errors import CancelFlag, ModelkitError, check_cancel
from modelkit.inspect.describe import require_checkpoint, require_original_layout
from modelkit.io.source import Source, input_paths_of, source_label
from modelkit.jsontypes import JSONDict
from modelkit.lora.adapter import LORA_ARCHS
from modelkit.lora.delta import swap_halves
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
    Slot,
    checkpoint_key,
    has_table,
    layouts,
    out_slots,
    slot_view,
    weight_key,
)
from modelkit.numeric import CHUNK_ELEMENTS
from modelkit.progress import Progress, ProgressFn, no_progress
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

SKIP_BELOW = 1e-4
OUTPUT_NAMINGS = {"comfy": "comfyui"}  # the command-line spelling of ComfyUI naming


@dataclass
class LayerResult:
    """One layer of an extraction."""

    name: str
    key: str
    rank: int
    relative_error: float
    delta_norm: float
    skipped: bool = False


@dataclass
class ExtractReport:
    """Ranks and errors per layer and overall."""

    arch: str
    rank: int
    conv_rank: int | None
    energy: float | None
    method: str
    layers: list[LayerResult] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # weights the output naming cannot name
    err_sq: float = 0.0
    ref_sq: float = 0.0

    @property
    def relative_error(self) -> float:
        """Overall ``sqrt(sum ||ΔW − BA||^2 / sum ||ΔW||^2)``."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0

    @property
    def skipped(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.skipped]

    @property
    def n_modules(self) -> int:
        return sum(not layer.skipped for layer in self.layers)

    def to_dict(self) -> JSONDict:
        """A JSON-ready dict."""
        d = asdict(self)
        d.update(relative_error=self.relative_error, skipped=self.skipped,
                 n_modules=self.n_modules)
        return d


def extract_targets(arch: str, conv: bool, te: bool) -> list[ModuleTarget]:
    """The kohya modules extraction covers for ``arch``."""
    spec = ARCHS[arch]
    groups = {GROUP_TRANSFORMER}
    if te:
        groups.add(GROUP_TEXT)
    if conv:
        groups |= {GROUP_RESNET, GROUP_SAMPLER}
    limits = {s.name: kohya_te_layers(spec, s) for s in spec.text_encoders}
    out = []
    for t in lora_module_targets(spec, "kohya").values():
        if t.group not in groups:
            continue
        if t.group == GROUP_TEXT and (te_layer(t) or 0) >= limits[t.component]:
            continue
        out.append(t)
    return out


def _rows(shape: tuple[int, ...], t: ModuleTarget) -> tuple[int, int]:
    if t.rows is None:
        return 0, shape[0]
    width = shape[0] // 3
    third = t.rows[0] // (t.rows[1] - t.rows[0])
    return third * width, width


def layer_difference(base: Source, tuned: Source, t: ModuleTarget, device: str
                     ) -> tuple[torch.Tensor, float, tuple[int, ...]]:
    """``(ΔW [out, cols] float32, ||W_base||^2, shape of the patched part)``,
    built in row chunks."""
    import torch

    b, tw = base.get(t.key), tuned.get(t.key)
    shape = tuple(b.shape)
    row0, out = _rows(shape, t)
    cols = math.prod(shape[1:])
    b2, t2 = b.reshape(shape[0], cols), tw.reshape(shape[0], cols)
    diff = torch.empty(out, cols, dtype=torch.float32, device=device)
    base_sq = 0.0
    step = max(1, CHUNK_ELEMENTS // cols)
    for i in range(0, out, step):
        j = min(out, i + step)
        part_b = b2[row0 + i:row0 + j].to(device, torch.float32)
        diff[i:j].copy_(t2[row0 + i:row0 + j].to(device, torch.float32)).sub_(part_b)
        base_sq += float(torch.sum(part_b * part_b, dtype=torch.float64))
    return diff, base_sq, (out, *shape[1:])


def _check_pair(base: Source, tuned: Source) -> str:
    from modelkit.inspect.describe import describe

    # a family with its own LoRA table (the transformers) also comes as a bare transformer file
    kinds = ("checkpoint", "unet") if has_table(describe(base).arch) else ("checkpoint",)
    rb = require_checkpoint(base, "lora extract", kinds)
    rt = require_checkpoint(tuned, "lora extract", kinds)
    nb, nt = Path(source_label(base)).name, Path(source_label(tuned)).name
    if rb.arch != rt.arch:
        raise ModelkitError(f"{nb} is {with_article(rb.arch)} checkpoint but {nt} is {rt.arch}; "
                            "extract needs a base and a fine-tune of the same architecture")
    if rb.arch not in LORA_ARCHS:
        raise ModelkitError(f"{nb}: is {with_article(rb.arch)} checkpoint; lora extract supports "
                            f"{', '.join(LORA_ARCHS)}")
    require_original_layout(rb, nb, "lora extract")
    require_original_layout(rt, nt, "lora extract")
    return rb.arch


def extract(base: Source, tuned: Source, rank: int, conv_rank: int | None = None,
            energy: float | None = None, te: bool = True, device: str = "cpu", *,
            method: str = "auto", dtype: str = "F16", skip_below: float = SKIP_BELOW,
            naming: str = "kohya", cancel: CancelFlag | None = None) -> PlannedStep:
    """Plan a kohya LoRA of ``tuned − base``; the SVDs run in the returned
    :class:`~modelkit.core.step.PlannedStep`'s ``prepare`` step.

    Args:
        rank: rank cap of Linear and 1x1 layers (alpha = rank per layer, s = 1).
        conv_rank: rank cap of 3x3 convs; None leaves ResBlocks out (kohya).
        energy: keep per layer the smallest rank whose singular values hold
            this share of ||ΔW||^2 (capped by the rank).
        te: include the text encoder(s).
        device: ``cpu``, ``cuda`` or ``auto`` for the SVDs.
        method: ``auto`` (randomized unless exact is as cheap), ``randomized``
            or ``exact``.
        dtype: storage type of the factors (F16, BF16, F32).
        skip_below: a layer with ``||ΔW|| <= skip_below * ||W_base||`` is skipped.
        naming: output names, ``kohya``; a family with its own module table
            (the transformer families) also ``peft`` (split q/k/v, each slice its own SVD) or
            ``comfyui``.
    """
    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import resolve_device

    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ModelkitError("extract: --rank and --conv-rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise ModelkitError(f"extract: --energy {energy} must be in (0, 1]")
    if method not in METHODS:
        raise ModelkitError(f"extract: unknown SVD method {method!r}; use {', '.join(METHODS)}")
    naming = OUTPUT_NAMINGS.get(naming, naming)
    if naming not in NAMING_PREFIXES:
        raise ModelkitError(f"extract: unknown format {naming!r}; use kohya, peft or comfyui")
    arch = _check_pair(base, tuned)
    if naming != "kohya" and not has_table(arch):
        raise ModelkitError(f"extract: {arch} LoRAs are extracted in kohya format; turn the "
                            f"result into {naming} with 'modelkit lora convert --to {naming}'")
    same = {p.resolve() for p in base.input_paths} & {p.resolve() for p in tuned.input_paths}
    if same:
        raise ModelkitError(f"extract: BASE and TUNED are the same file "
                            f"({next(iter(same)).name}); nothing differs, so there is no "
                            "LoRA to extract")
    device = resolve_device(device)
    store = to_torch(storage_dtype(dtype))
    report = ExtractReport(arch, rank, conv_rank, energy, method)
    title = Path(source_label(tuned)).stem
    builder = LoraBuilder(f"extract({title})", store, input_paths_of([base, tuned]), naming)
    if has_table(arch):
        work = _table_work(base, tuned, arch, naming, report, builder, device, skip_below)
    else:
        work = _sd_work(base, tuned, extract_targets(arch, conv_rank is not None, te), report,
                        builder, device, store, skip_below)

    planned = PlannedStep(builder.source, report, "lora_extract", {})

    def prepare(progress: ProgressFn = no_progress, stop: CancelFlag | None = None) -> None:
        conv_names: set[str] = set()
        for i, (name, step) in enumerate(work):
            check_cancel(stop)
            check_cancel(cancel)
            with torch_threads(LORA_THREADS):
                step(conv_names)
            progress(Progress("extract", i + 1, len(work), "tensors", name))
        if not builder.tensors:
            raise ModelkitError(f"extract: {Path(source_label(tuned)).name} does not differ "
                                f"from {Path(source_label(base)).name} in any of the "
                                f"{len(work)} layers extraction covers (each change is "
                                f"below {skip_below:g} of its weight); no LoRA written")
        errors = {x.name: x.relative_error for x in report.layers if not x.skipped}
        meta = lora_metadata(arch, builder.ranks, conv_names, title,
                             error_metadata(errors, report.relative_error, report.skipped))
        builder.finish(meta)
        planned.origins = dict.fromkeys(builder.source.infos)

    params = {"rank": rank, "conv_rank": conv_rank, "energy": energy, "te": te,
              "method": method, "dtype": dtype, "skip_below": skip_below, "format": naming}
    planned.params, planned.prepare = params, prepare
    return planned


Step = Callable[[set[str]], None]


def _sd_work(base: Source, tuned: Source, targets: list[ModuleTarget], report: ExtractReport,
             builder: LoraBuilder, device: str, store: torch.dtype, skip_below: float
             ) -> list[tuple[str, Step]]:
    """One step per kohya module of an SD checkpoint."""
    def step(t: ModuleTarget) -> Step:
        return lambda conv: _extract_layer(base, tuned, t, report, builder, conv, device,
                                           store, skip_below)

    return [(t.name, step(t)) for t in targets if t.key in base.infos and t.key in tuned.infos]


def _table_work(base: Source, tuned: Source, arch: str, naming: str, report: ExtractReport,
                builder: LoraBuilder, device: str, skip_below: float
                ) -> list[tuple[str, Step]]:
    """One step per weight of the family's module table found in both files
    (a weight ``naming`` has no module for is left out and listed)."""
    work: list[tuple[str, Step]] = []
    kohya = layouts(arch, "kohya")
    slots = layouts(arch, naming)
    for path in dict.fromkeys([*kohya, *slots]):
        key = weight_key(path)
        bk, tk = checkpoint_key(key, base.infos), checkpoint_key(key, tuned.infos)
        if bk is None or tk is None or len(base.infos[bk].shape) != 2:
            continue
        if path not in slots:
            report.left_out.append(path)
            continue
        rows, cols = base.infos[bk].shape
        # SD3's pre-only context adaLN: written in diffusers' swapped row order
        out = out_slots(arch, naming, path, "extract", (rows, cols))

        def step(conv: set[str], bk: str = bk, tk: str = tk,
                 out: tuple[Slot, ...] = out) -> None:
            _extract_slots(base.get(bk), tuned.get(tk), out, report, builder, device,
                           skip_below)

        work.append((path, step))
    return work


def _extract_slots(b: torch.Tensor, tw: torch.Tensor, slots: tuple[Slot, ...],
                   report: ExtractReport, builder: LoraBuilder, device: str,
                   skip_below: float) -> None:
    """ΔW of one weight (row chunks), then each slot's rows factorised."""
    import torch

    rows, cols = b.shape
    diff = torch.empty(rows, cols, dtype=torch.float32, device=device)
    row_sq = torch.empty(rows, dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // cols)
    for i in range(0, rows, step):
        part = b[i:i + step].to(device, torch.float32)
        diff[i:i + step].copy_(tw[i:i + step].to(device, torch.float32)).sub_(part)
        row_sq[i:i + step] = torch.sum(part * part, dim=1, dtype=torch.float64).cpu()
    for slot in slots:
        row0, n = slot_view(rows, cols, slot.rows, slot.of)
        part = swap_halves(diff[row0:row0 + n]) if slot.swap else diff[row0:row0 + n]
        ref_sq = float(torch.sum(part * part, dtype=torch.float64))
        report.ref_sq += ref_sq
        key = weight_key(slot.path)
        if ref_sq <= (skip_below ** 2) * float(row_sq[row0:row0 + n].sum()):
            report.err_sq += ref_sq
            report.layers.append(LayerResult(slot.name, key, 0, 1.0 if ref_sq else 0.0,
                                             math.sqrt(ref_sq), skipped=True))
            continue
        f = factorize(part, report.rank, report.energy, method=report.method,
                      dtype=builder.dtype, ref_sq=ref_sq)
        report.err_sq += f.err_sq
        report.layers.append(LayerResult(slot.name, key, f.rank, f.relative_error,
                                         math.sqrt(ref_sq)))
        builder.add_lora(slot.name, f.up.cpu(), f.down.cpu(), (n, cols))


def _extract_layer(base: Source, tuned: Source, t: ModuleTarget, report: ExtractReport,
                   builder: LoraBuilder, conv_names: set[str], device: str,
                   store: torch.dtype, skip_below: float) -> None:
    diff, base_sq, shape = layer_difference(base, tuned, t, device)
    import torch

    ref_sq = float(torch.sum(diff * diff, dtype=torch.float64))
    report.ref_sq += ref_sq
    if ref_sq <= (skip_below ** 2) * base_sq:
        report.err_sq += ref_sq
        report.layers.append(LayerResult(t.name, t.key, 0, 1.0 if ref_sq else 0.0,
                                         math.sqrt(ref_sq), skipped=True))
        return
    kernel = len(shape) == 4 and math.prod(shape[2:]) > 1
    cap = report.conv_rank if (kernel and report.conv_rank) else report.rank
    f = factorize(diff, cap, report.energy, method=report.method, dtype=store,
                  ref_sq=ref_sq)
    del diff
    report.err_sq += f.err_sq
    report.layers.append(LayerResult(t.name, t.key, f.rank, f.relative_error,
                                     math.sqrt(ref_sq)))
    builder.add_lora(t.name, f.up.cpu(), f.down.cpu(), shape)
    if kernel:
        conv_names.add(t.name)


__all__ = ["ExtractReport", "LayerResult", "extract", "extract_targets", "layer_difference"]
