"""``prune``: keep what inference needs, drop the rest, list what went.

Kept: the UNet, VAE and text encoder(s), prediction markers (``v_pred``,
``ztsnr``, ``edm_*``: dropping them silently turns a v-prediction model into
an eps one), and networks a variant needs (SD2 depth's MiDaS, unCLIP's image
encoder). Dropped: EMA weights (unless kept), schedule buffers (every UI
rebuilds them from its scheduler config), training leftovers and unknown keys.
Repaired: CLIP ``position_ids`` stored as float or scrambled (rewritten as
int64 0..76) and NovelAI-style CLIP key names.

The transformer families (Flux.1, SD3, Qwen-Image, Wan, Chroma, Flux.2,
Z-Image) are pruned by their registry entry: kept are the keys under its
components' prefixes (a Flux all-in-one file's ``vae.`` and
``text_encoders.``), or every key of a standalone transformer; dropped are
the entry's training residue (:class:`~modelkit.arch.registry.PrunePolicy`),
EMA copies unless kept, and in an all-in-one file the keys outside every
component. bf16 files stay bf16 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelkit.arch import parts
from modelkit.convert.base import passthrough
from modelkit.core.step import PlannedStep
from modelkit.inspect.describe import require_checkpoint
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info

if TYPE_CHECKING:
    import torch

KEEP_PARTS = (parts.UNET, parts.VAE, parts.TE, parts.MARKER, parts.AUX_MODEL)
DROP_REASONS = {
    parts.EMA: "EMA weights",
    parts.SCHEDULE: "schedule buffer",
    parts.JUNK: "training leftover",
    parts.OTHER: "unknown key",
}


@dataclass
class PruneReport:
    """What prune kept, dropped (key -> reason), renamed and repaired."""

    n_kept: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    dropped_bytes: int = 0
    renamed: dict[str, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    def dropped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.dropped.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def _position_ids_ok(t: torch.Tensor) -> bool:
    import torch

    if t.dtype != torch.int64:
        return False
    return bool(torch.equal(t.reshape(-1), torch.arange(t.numel(), dtype=torch.int64)))


def _family_parts(arch: str, bare: bool) -> Callable[[str], str] | None:
    """The part of a key by a transformer family's registry entry (its
    components' prefixes and prune policy), or None for an SD architecture
    (:func:`modelkit.arch.parts.part_of`). In a standalone transformer
    (``bare``) every key that is not residue or EMA is the transformer."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    if entry is None or entry.spec is not None:
        return None
    policy = entry.prune
    roles = {registry.DENOISER: parts.UNET, registry.VAE: parts.VAE,
             registry.TEXT_ENCODER: parts.TE}
    prefixes = sorted(((c.prefix, roles[c.role]) for c in entry.components),
                      key=lambda pc: -len(pc[0]))

    def part_of(key: str) -> str:
        if policy.ema_prefix and key.startswith(policy.ema_prefix):
            return parts.EMA
        if key.startswith(policy.residue_prefixes):
            return parts.JUNK
        if key.startswith(policy.keep_prefixes):
            return parts.AUX_MODEL
        found = next((p for c, p in prefixes if key.startswith(c)), None)
        return found or (parts.UNET if bare else parts.OTHER)

    return part_of


def prune(src: Source, *, keep_ema: bool = False, dtype: str | None = None) -> PlannedStep:
    """Plan a pruned copy of ``src``; ``dtype`` (safetensors name, e.g. ``F16``)
    casts the float tensors of the kept components (markers and integer
    tensors keep theirs).

    Raises:
        ModelkitError: ``src`` is not a checkpoint.
    """
    import torch

    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    described = require_checkpoint(src, "prune", ("checkpoint", "unet"))
    kind = described.kind
    # a standalone UNet (ComfyUI's diffusion_models) has no key prefix: its bare keys are the UNet
    bare = parts.UNET if kind == "unet" else None
    part_of = _family_parts(described.arch, bare is not None) or parts.part_of
    rep = PruneReport(bytes_in=sum(i.nbytes for i in src.infos.values()))
    infos, origin = {}, {}
    for key, info in src.infos.items():
        part = part_of(key)
        if part == parts.OTHER and bare:
            part = bare
        if part == parts.EMA and keep_ema:
            part = parts.UNET
        if part not in KEEP_PARTS:
            rep.dropped[key] = DROP_REASONS[part]
            rep.dropped_bytes += info.nbytes
            continue
        if part == parts.MARKER:
            rep.markers.append(key)
        new_key = parts.novelai_clip_fix(key) or key
        if new_key != key:
            rep.renamed[key] = new_key
        out_dtype = info.dtype
        if parts.is_position_ids(new_key):
            out_dtype = "I64"
        elif dtype and info.is_float and part != parts.MARKER:
            out_dtype = dtype
        infos[new_key] = tensor_info(new_key, out_dtype, info.shape)
        origin[new_key] = key
    rep.n_kept = len(infos)
    rep.bytes_out = sum(i.nbytes for i in infos.values())

    def produce(key: str) -> torch.Tensor:
        t = src.get(origin[key])
        if parts.is_position_ids(key):
            if not _position_ids_ok(t):
                rep.repaired.append(key)
                # float16 ids round 76 to 76.0 but some files hold 75.99998
                return torch.arange(t.numel(), dtype=torch.int64).reshape(t.shape)
            return t
        return cast(t, to_torch(infos[key].dtype))

    label = f"prune({source_label(src)})"
    unchanged = {k: (src, o) for k, o in origin.items() if not parts.is_position_ids(k)
                 and infos[k].dtype == src.infos[o].dtype}
    out = DerivedSource(label, infos, dict(src.metadata), produce, src.input_paths,
                        stream=passthrough(unchanged))
    params = {"keep_ema": keep_ema, "dtype": dtype}
    return PlannedStep(out, rep, "prune", params, {k: (0, o) for k, o in origin.items()})
