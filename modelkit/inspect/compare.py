"""Compare two models key by key: how far B moved from A, per component and
per merge block.

Each shared float tensor contributes ``||B - A||^2`` and ``||A||^2`` (float64
sums over 1M-element chunks), so a component's or block's relative L2 is
``||B - A|| / ||A||`` over all its tensors. A tensor is *unchanged* when its
bytes are equal. Keys only in one model, and shared keys whose shapes or
dtypes differ, are listed instead of compared. Tensors are read one at a
time from both sources; cancel is checked before each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelkit.arch import parts, registry
from modelkit.errors import CancelFlag, check_cancel
from modelkit.jsontypes import JSONDict
from modelkit.numeric import chunk_pairs, l2_sums, relative_l2
from modelkit.progress import Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    from modelkit.io.source import Source

# per-block figures for the LDM block lists (a Flux.1 all-in-one file would put its
# VAE and text encoders in img_in, as its block map does for merges)
BLOCK_ARCHS = registry.names(where=lambda a: a.blocks is not None and a.spec is not None)
LIST_LIMIT = 50


@dataclass
class Delta:
    """Sums over a group of tensors for ``||B - A|| / ||A||``."""

    n_tensors: int = 0
    n_unchanged: int = 0
    diff_sq: float = 0.0
    ref_sq: float = 0.0

    @property
    def relative_l2(self) -> float:
        return relative_l2(self.diff_sq, self.ref_sq)

    @property
    def unchanged_share(self) -> float:
        """The share of tensors whose bytes are equal (1.0 for an empty group)."""
        return self.n_unchanged / self.n_tensors if self.n_tensors else 1.0

    def add(self, other: Delta) -> None:
        self.n_tensors += other.n_tensors
        self.n_unchanged += other.n_unchanged
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq

    def to_dict(self) -> JSONDict:
        return {"n_tensors": self.n_tensors, "n_unchanged": self.n_unchanged,
                "unchanged_share": self.unchanged_share, "relative_l2": self.relative_l2}


@dataclass
class CompareReport:
    """How model B differs from model A."""

    a: str
    b: str
    arch: str
    overall: Delta = field(default_factory=Delta)
    components: dict[str, Delta] = field(default_factory=dict)
    blocks: dict[str, Delta] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # same key, other shape or dtype

    @property
    def identical(self) -> bool:
        """Same keys, shapes, dtypes and bytes."""
        return (not self.only_a and not self.only_b and not self.mismatched
                and self.overall.n_unchanged == self.overall.n_tensors)

    def to_dict(self) -> JSONDict:
        return {
            "a": self.a, "b": self.b, "arch": self.arch, "identical": self.identical,
            "overall": self.overall.to_dict(),
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "blocks": {k: v.to_dict() for k, v in self.blocks.items()},
            "n_only_a": len(self.only_a), "only_a": self.only_a[:LIST_LIMIT],
            "n_only_b": len(self.only_b), "only_b": self.only_b[:LIST_LIMIT],
            "n_mismatched": len(self.mismatched), "mismatched": self.mismatched[:LIST_LIMIT],
        }


def component_of(key: str) -> str:
    """The component a single-file key belongs to: ``unet``, ``vae``, ``te1``,
    ``te2`` or ``te`` (the text-encoder slot), ``ema`` or ``other``."""
    from modelkit.arch.configs import TE_PREFIXES

    part = parts.part_of(key)
    if part == parts.TE:
        prefix = parts.te_prefix_of(key)
        return TE_PREFIXES[prefix][1] if prefix else parts.TE
    return part if part in (parts.UNET, parts.VAE, parts.EMA) else "other"


def _key_delta(a: Any, b: Any) -> Delta:
    import torch

    d = Delta(n_tensors=1)
    if a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                          b.reshape(-1).view(torch.uint8)):
        d.n_unchanged = 1
        d.ref_sq = l2_sums(chunk_pairs(a, a))[1]
        return d
    # l2_sums measures (x - y) against y: y is the reference, A
    d.diff_sq, d.ref_sq = l2_sums(chunk_pairs(b, a))
    return d


def _block_namer(arch: str) -> Callable[[str], str] | None:
    if arch not in BLOCK_ARCHS:
        return None
    from modelkit.arch.blocks import block_of

    return lambda key: block_of(key, arch, vae_slot=True)


def compare_models(a: Source, b: Source, *, arch: str | None = None,
                   progress: ProgressFn = no_progress,
                   cancel: CancelFlag | None = None) -> CompareReport:
    """Compare ``b`` against ``a`` (the reference), tensor by tensor.

    ``arch`` names the block map used for the per-block figures (default:
    detected from ``a``'s keys). Progress is in bytes of ``a``'s shared
    tensors.

    Raises:
        Cancelled: ``cancel`` was set; nothing is returned.
    """
    from modelkit.io.source import source_label

    if arch is None:
        from pathlib import Path

        from modelkit.inspect.report import build_report

        arch = build_report(Path(source_label(a)), a.infos, a.metadata, "safetensors",
                            None).arch
    report = CompareReport(source_label(a), source_label(b), arch)
    block = _block_namer(arch)
    shared = []
    for key, info in a.infos.items():
        other = b.infos.get(key)
        if other is None:
            report.only_a.append(key)
        elif other.shape != info.shape or other.dtype != info.dtype:
            report.mismatched.append(key)
        elif info.is_float:
            shared.append(key)
    report.only_b = [k for k in b.infos if k not in a.infos]
    total = sum(a.infos[k].nbytes for k in shared)
    done = 0
    for key in shared:
        check_cancel(cancel)
        d = _key_delta(a.get(key), b.get(key))
        report.overall.add(d)
        report.components.setdefault(component_of(key), Delta()).add(d)
        if block is not None and component_of(key) in ("unet", "vae", "te", "te1", "te2"):
            report.blocks.setdefault(block(key), Delta()).add(d)
        done += a.infos[key].nbytes
        progress(Progress("compare", done, total, "bytes", key, "compare"))
    return report
