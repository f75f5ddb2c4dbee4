"""``info``: where an adapter acts and how strongly.

Per module: ‖ΔW‖_F at strength 1, and its effective rank (the smallest rank
whose singular values hold ``energy`` of ‖ΔW‖²). LoRA modules get exact
singular values from their factors (QR of up and downᵀ, then an r x r SVD);
other formats use the randomized SVD of :mod:`modelkit.lora.factorize`
(at most :data:`INFO_RANK_CAP` values; a layer needing more is shown as
that cap with ``rank_capped``). Per block (LoRA Block Weight's full list,
text encoders under BASE): sqrt(Σ‖ΔW‖²) over its modules and, with a base
checkpoint, the same relative to sqrt(Σ‖W‖²) of the weights it touches (a
transformer base in the diffusers layout: the fused weights joined back).
(IA)3 and DoRA updates depend on the base: without one, DoRA modules show
their ΔW before normalisation and (IA)3 modules are listed without a norm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch.blocks import block_names, block_of
from modelkit.arch.lora_modules import block_of_path, shares_names
from modelkit.errors import CancelFlag, ModelkitError
from modelkit.io.source import Source, source_label
from modelkit.jsontypes import JSONDict
from modelkit.lora.adapter import LORA_ARCHS, Adapter, open_adapter
from modelkit.lora.delta import ModuleDelta, check_fit, target_view
from modelkit.lora.output import LORA_THREADS, torch_threads
from modelkit.progress import Progress, ProgressFn, no_progress
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

INFO_RANK_CAP = 64


@dataclass
class LayerInfo:
    """One module."""

    name: str
    key: str
    block: str
    algo: str
    delta_norm: float | None
    effective_rank: int | None
    rank_capped: bool = False
    base_norm: float | None = None

    @property
    def relative(self) -> float | None:
        if self.delta_norm is None or not self.base_norm:
            return None
        return self.delta_norm / self.base_norm


@dataclass
class BlockInfo:
    """One block: modules, ‖ΔW‖ and (with a base) ‖ΔW‖/‖W‖."""

    n_modules: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.delta_sq)

    @property
    def relative(self) -> float | None:
        return math.sqrt(self.delta_sq / self.base_sq) if self.base_sq else None


@dataclass
class InfoReport:
    """What :func:`info` found."""

    file: str
    arch: str
    format: str
    naming: str
    energy: float
    layers: list[LayerInfo] = field(default_factory=list)
    blocks: dict[str, BlockInfo] = field(default_factory=dict)
    keys_touched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    base: str | None = None
    alpha_source: str = ""  # alpha tensor, header metadata or none (alpha = rank)

    def to_dict(self) -> JSONDict:
        """A JSON-ready dict (block and layer norms included)."""
        d = asdict(self)
        d["blocks"] = {n: {"n_modules": b.n_modules, "delta_norm": b.delta_norm,
                           "relative": b.relative} for n, b in self.blocks.items()}
        for row, layer in zip(d["layers"], self.layers, strict=True):
            row["relative"] = layer.relative
        return d


def _lora_singular_values(delta: ModuleDelta) -> torch.Tensor:
    import torch

    f = delta.factors()
    assert f is not None
    up, down = f
    _, r1 = torch.linalg.qr(up)
    _, r2 = torch.linalg.qr(down.T)
    return torch.linalg.svdvals(r1 @ r2.T) * abs(delta.scale)


def _effective_rank(delta: ModuleDelta, dense: torch.Tensor | None, ref_sq: float,
                    energy: float) -> tuple[int, bool]:
    from modelkit.lora.factorize import choose_rank, truncated_svd

    if delta.mod.algo == "lora" and dense is None:
        s = _lora_singular_values(delta)
        return choose_rank(s, ref_sq, s.numel(), energy), False
    assert dense is not None
    _, s, _ = truncated_svd(dense, INFO_RANK_CAP)
    r = choose_rank(s, ref_sq, min(INFO_RANK_CAP, s.numel()), energy)
    kept = float((s[:r].double() ** 2).sum())
    return r, kept < energy * ref_sq * (1 - 1e-6)


def _layer(ad: Adapter, delta: ModuleDelta, base: Source | None, arch: str, energy: float,
           layout: _DiffusersBase | None = None) -> LayerInfo:
    import torch

    mod, t = delta.mod, delta.mod.target
    assert t is not None
    block = _block(t.key, t.path, arch)
    key = _base_key(t.key, base) if base is not None else t.key
    found = layout.weight(t) if layout is not None else None
    if found is not None and base is not None:
        key, whole = found
        shape = tuple(whole.shape)
        check_fit(delta, Path(source_label(base)).name, shape, shape[0],
                  math.prod(shape[1:]))
        w0: torch.Tensor | None = whole.reshape(shape[0], -1)
    else:
        if base is not None and key in base.infos:
            shape = tuple(base.infos[key].shape)
            _, out, cols = target_view(shape, t.rows, t.of)
            check_fit(delta, Path(source_label(base)).name, shape, out, cols)
        w0 = _base_rows(base, key, t, delta.out) if base is not None else None
    base_norm = float(w0.norm()) if w0 is not None else None
    if delta.needs_base and w0 is None and mod.algo == "ia3":
        return LayerInfo(mod.name, t.key, block, mod.algo, None, None)
    dense: torch.Tensor | None = None
    if delta.needs_base and w0 is not None and base is not None:
        shape = (delta.out, *(w0.shape[1:] if found is not None
                              else tuple(base.infos[key].shape)[1:]))
        dense = delta.check_finite(delta.base_update(w0, 1.0, shape), "ΔW")
    elif mod.algo != "lora":
        dense = delta.full()
    if dense is None:
        pair = delta.factors()
        if pair is None:
            raise ModelkitError(f"module {mod.name}: no LoRA factors")
        up, down = pair
        # ||up @ down||^2 = trace((upᵀup)(down downᵀ)): no dense product needed
        ref_sq = float(((up.T @ up) * (down @ down.T)).sum()) * delta.scale ** 2
    else:
        ref_sq = float(torch.sum(dense * dense, dtype=torch.float64))
    if dense is not None and dense.shape[1] == 1:
        rank, capped = (1 if ref_sq else 0), False
    else:
        rank, capped = _effective_rank(delta, dense, ref_sq, energy) if ref_sq else (0, False)
    return LayerInfo(mod.name, t.key, block, mod.algo, math.sqrt(max(ref_sq, 0.0)), rank,
                     capped, base_norm)


class _DiffusersBase:
    """Where a module's original-layout target sits in a transformer base in
    the diffusers layout: a renamed weight, or the weights diffusers splits
    a fused one into (joined back here, row by row:
    :mod:`modelkit.lora.bake_split`)."""

    def __init__(self, base: Source, family: str, arch: str) -> None:
        from modelkit.arch.lora_modules import diffusers_paths
        from modelkit.lora.bake_split import split_index

        self.base, self.remap = base, diffusers_paths(arch)
        self.index = split_index(family, base.infos, Path(source_label(base)).name)

    def weight(self, t: Any) -> tuple[str, torch.Tensor] | None:
        """``(key, the weight t patches in the original layout, float32)``,
        or None when the base has no such weight."""
        import torch

        from modelkit.arch.configs import UNET_PREFIX
        from modelkit.lora.bake_split import runs_of

        parts = self.index.get(f"{t.path}.weight") if t.rows is None else None
        if parts:
            keys = [_base_key(f"{UNET_PREFIX}{p.key}", self.base) for p in parts]
            if any(k not in self.base.infos for k in keys):
                return None
            ws = [self.base.get(k).to(torch.float32) for k in keys]
            n = sum(w.shape[0] for w in ws)
            whole = torch.empty((n, *ws[0].shape[1:]), dtype=torch.float32)
            for part, w in zip(parts, ws, strict=True):
                for dst, src, rows in runs_of(part.piece, n):
                    whole[src:src + rows] = w[dst:dst + rows]
            return t.key, whole
        path = self.remap.get((t.path, t.rows))
        key = _base_key(f"{UNET_PREFIX}{path}.weight", self.base) if path else None
        if key is None or key not in self.base.infos:
            return None
        return key, self.base.get(key).to(torch.float32)


def _has_block_map(arch: str) -> bool:
    from modelkit.arch import registry

    entry = registry.get(arch)
    return entry is None or entry.blocks is not None or entry.spec is not None


def _block(key: str, path: str, arch: str) -> str:
    """The block of a module: the family's block map, or for a transformer
    family without one its numbered block (``blocks.3``) or top-level part."""
    return block_of(key, arch) if _has_block_map(arch) else block_of_path(path)


def _block_order(name: str) -> tuple[str, int]:
    head, _, num = name.partition(".")
    return (head, int(num) if num.isdigit() else -1)


def _base_key(key: str, base: Source) -> str:
    """``key`` as the base spells it: a bare transformer file (Flux.1 as
    ComfyUI's ``diffusion_models``) has no ``model.diffusion_model.``."""
    from modelkit.arch.configs import UNET_PREFIX

    if key not in base.infos and key.startswith(UNET_PREFIX) \
            and key[len(UNET_PREFIX):] in base.infos:
        return key[len(UNET_PREFIX):]
    return key


def _base_rows(base: Source, key: str, t: Any, out: int) -> torch.Tensor | None:
    """The base rows module ``t`` patches (a q/k/v third or, for Flux.1, a
    row slice of a fused ``qkv``/``linear1``), float32."""
    import torch

    if key not in base.infos:
        return None
    w = base.get(key)
    shape = tuple(w.shape)
    row0, n, _ = target_view(shape, t.rows, t.of)
    return w.reshape(shape[0], -1)[row0:row0 + min(n, out)].to(torch.float32)


def _handled() -> tuple[str, ...]:
    """Architectures ``lora info`` reads: the registry's, among those with
    LoRA name tables."""
    from modelkit.arch import registry

    def tables(name: str) -> bool:
        arch = registry.get(name)
        return name in LORA_ARCHS or bool(arch and arch.lora and arch.lora.modules)

    return tuple(n for n in registry.handling("lora info") if tables(n))


def _diffusers_layout(base: Source | None, arch: str) -> _DiffusersBase | None:
    """A resolver for a transformer base in the diffusers layout, else None."""
    if base is None:
        return None
    from modelkit.arch import registry
    from modelkit.inspect.describe import describe

    own = registry.get(arch)
    if (own is None or own.lora is None or own.lora.modules is None
            or describe(base).layout != registry.DIFFUSERS
            or registry.ORIGINAL not in own.layouts):
        return None
    return _DiffusersBase(base, own.family, arch)


def info(lora: Source, base: Source | None = None, *, energy: float = 0.9,
         progress: ProgressFn = no_progress, cancel: CancelFlag | None = None) -> InfoReport:
    """Describe where ``lora`` acts: per-module ‖ΔW‖ and effective rank at
    ``energy``, per-block strength (relative to ``base`` when given) and the
    checkpoint keys it touches.

    Raises:
        ModelkitError: not an adapter, unknown architecture, or a base of
            another architecture.
    """
    from modelkit.arch import registry
    from modelkit.errors import check_cancel

    arch = None
    if base is not None:
        from modelkit.inspect.describe import describe, require_checkpoint

        # a family with its own LoRA table (Flux.1) also comes as a bare transformer file
        own = registry.get(describe(base).arch)
        kinds = ("checkpoint", "unet") if own and own.lora and own.lora.modules \
            else ("checkpoint",)
        arch = require_checkpoint(base, "lora info", kinds).arch
    ad = open_adapter(lora)
    if arch is not None and ad.arch not in (arch, "unknown") and not shares_names(ad.arch, arch) \
            and open_adapter(lora, arch).unmatched:
        raise ModelkitError(f"{ad.label}: is {with_article(ad.arch)} adapter but the base is "
                            f"{with_article(arch)} "
                            "checkpoint")
    use = arch or ad.arch
    handled = _handled()
    if use not in handled and use != "unknown":
        raise ModelkitError(f"{ad.label}: is {with_article(registry.label(use))} adapter; "
                            f"lora info does not handle {registry.label(use)} adapters yet "
                            f"(it handles {registry.listed(handled)})")
    if use not in handled:
        raise ModelkitError(f"{ad.label}: cannot tell its architecture "
                            f"({'; '.join(ad.evidence) or 'no evidence'}); pass --base")
    if ad.arch != use:
        ad = open_adapter(lora, use)
    report = InfoReport(ad.label, use, ad.format, ad.naming, energy,
                        unmatched=list(ad.unmatched),
                        base=None if base is None else getattr(base, "label", None))
    report.alpha_source = ", ".join(sorted({ad.alpha_source(m) for m in ad.modules.values()}))
    if _has_block_map(use):
        report.blocks = {name: BlockInfo() for name in block_names(use)}
    touched: set[str] = set()
    mods = list(ad.modules.values())
    layout = _diffusers_layout(base, use)
    for i, mod in enumerate(mods):
        check_cancel(cancel)
        with torch_threads(LORA_THREADS):
            layer = _layer(ad, ModuleDelta(ad, mod), base, use, energy, layout)
        report.layers.append(layer)
        touched.add(layer.key)
        b = report.blocks.setdefault(layer.block, BlockInfo())
        b.n_modules += 1
        b.delta_sq += (layer.delta_norm or 0.0) ** 2
        b.base_sq += (layer.base_norm or 0.0) ** 2
        progress(Progress("lora info", i + 1, len(mods), "tensors", mod.name, "lora info"))
    if not _has_block_map(use):  # numbered blocks in their order
        report.blocks = dict(sorted(report.blocks.items(), key=lambda kv: _block_order(kv[0])))
    report.keys_touched = sorted(touched)
    return report


__all__ = ["BlockInfo", "InfoReport", "LayerInfo", "info"]
