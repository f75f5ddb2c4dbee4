"""A fused module baked into a base in the diffusers layout, row by row.

A kohya / ComfyUI LoRA names the original (BFL / Stability / ComfyUI)
weights: one module on a fused ``qkv`` (Flux.1, Chroma, Flux.2 and SD3
double blocks, Z-Image's ``attention.qkv``), on Flux.1's and Chroma's single
block ``linear1`` (q, k, v and the MLP input) or on an adaLN modulation whose
halves diffusers stores the other way round (``norm_out.linear``). Diffusers
splits or reorders those weights. The layout map of the family
(:func:`modelkit.arch.layouts.family_map`, built from
:mod:`modelkit.arch.to_diffusers`) says, for every diffusers weight, which
rows of which original weight it holds (``Piece(source, rows, swap)``), so
the fused ΔW = s·up@down lands row by row: the diffusers weight holding rows
``[a, b)`` of the fused weight is patched with s·up[a:b]@down, and a
``swap`` piece takes the second half of up's rows, then the first.

No ΔW is materialised whole: :class:`RowsDelta` forwards each row range to
the module's own :class:`~modelkit.lora.delta.ModuleDelta`. Importing this
module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelkit.arch import layouts
from modelkit.arch.configs import UNET_PREFIX

if TYPE_CHECKING:
    import torch

    from modelkit.arch.to_diffusers import Piece
    from modelkit.lora.delta import ModuleDelta

# (first row in the diffusers weight, first row in the fused ΔW, rows)
Run = tuple[int, int, int]


@dataclass(frozen=True)
class Part:
    """One diffusers weight (``key``, unprefixed) that holds rows of a fused
    original weight, and how (the map's :class:`Piece`)."""

    key: str
    piece: Piece


def runs_of(piece: Piece, fused_rows: int) -> tuple[Run, ...]:
    """Where the rows of a diffusers weight come from in the fused ΔW (in
    the weight's row order): one run, or with ``swap`` its second half then
    its first (the inverse of what :func:`modelkit.arch.layouts.to_original`
    joins)."""
    start, stop = piece.rows or (0, fused_rows)
    n = stop - start
    if not piece.swap:
        return ((0, start, n),)
    half = n // 2
    return (0, start + half, n - half), (n - half, start, half)


def split_index(family: str, infos: Mapping[str, object], where: str
                ) -> dict[str, list[Part]]:
    """``original weight key (unprefixed) -> the diffusers weights holding
    its rows`` for a ``family`` transformer in the diffusers layout
    (``infos``: the base's tensor infos, with or without the
    ``model.diffusion_model.`` prefix), from the family's layout map at the
    base's own size; only weights diffusers splits or reorders are listed."""
    shapes = {k.removeprefix(UNET_PREFIX): tuple(getattr(i, "shape", ()))
              for k, i in infos.items()}
    key_map = layouts.family_map(family, shapes, layouts.DIFFUSERS, where)
    out: dict[str, list[Part]] = {}
    for key, piece in key_map.items():
        if key.endswith(".weight") and (piece.rows is not None or piece.swap):
            out.setdefault(piece.source, []).append(Part(key, piece))
    return out


class RowsDelta:
    """The rows of a fused module's ΔW that one diffusers weight holds, with
    the interface of :class:`~modelkit.lora.delta.ModuleDelta` the bake's
    row loop uses (``out``, ``add_rows_``, ``bias``)."""

    def __init__(self, inner: ModuleDelta, runs: tuple[Run, ...]) -> None:
        self.inner, self.runs = inner, runs
        self.ad, self.mod = inner.ad, inner.mod
        self.out = sum(n for _, _, n in runs)
        self.cols = inner.cols
        self.has_dora = self.needs_base = False  # refused before one is made

    def add_rows_(self, acc: torch.Tensor, start: int, stop: int, k: float) -> None:
        """``acc += k·ΔW[rows start:stop of this weight]``."""
        for dst, src, n in self.runs:
            lo, hi = max(start, dst), min(stop, dst + n)
            if lo < hi:
                self.inner.add_rows_(acc[lo - start:hi - start], src + lo - dst,
                                     src + hi - dst, k)

    def release(self) -> None:
        """Forget the module's loaded factors (another row map of the same
        module loads them again)."""
        self.inner.release()

    def bias(self) -> torch.Tensor | None:
        """This weight's rows of the module's Δb, or None."""
        import torch

        b = self.inner.bias()
        if b is None:
            return None
        return torch.cat([b[src:src + n] for _, src, n in self.runs])


__all__ = ["Part", "RowsDelta", "runs_of", "split_index"]
