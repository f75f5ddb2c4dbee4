"""``ema``: put the EMA UNet in place of the online UNet.

LDM's LitEma stores one buffer per UNet parameter, named ``model_ema.`` + the
parameter name under ``model.`` with every dot removed. Removing dots is not
injective in principle (``input_blocks.1.1`` and ``input_blocks.11``), so the
map is built forward, from the UNet keys the file has (which must match the
architecture's table), never by re-inserting dots. UIs render with the online
weights (``model.diffusion_model.*``) and ignore ``model_ema.*``; the output
has the EMA values under the UNet names and no ``model_ema.*`` keys.

While writing, the relative L2 distance between EMA and online weights is
measured per block: a merged model whose EMA is stale shows it plainly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelkit.arch import parts
from modelkit.arch.configs import EMA_PREFIX, UNET_PREFIX
from modelkit.arch.keys import ema_key
from modelkit.convert.base import passthrough
from modelkit.core.step import KeyOrigin, PlannedStep
from modelkit.errors import ModelkitError
from modelkit.inspect.describe import require_checkpoint
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.numeric import L2Sums, relative_l2
from modelkit.vocab import ARCH_NAMES

if TYPE_CHECKING:
    import torch

MIN_EMA_KEYS = 100  # diffusers' rule: fewer model_ema.* keys means no EMA


@dataclass
class EmaReport:
    """What ``ema`` swapped, and how far EMA was from the online weights."""

    arch: str
    n_swapped: int = 0
    online_only: list[str] = field(default_factory=list)
    n_ema_dropped: int = 0
    blocks: dict[str, L2Sums] = field(default_factory=dict)  # ||ema - online|| / ||online||

    @property
    def overall_relative_l2(self) -> float:
        return relative_l2(sum(b.diff_sq for b in self.blocks.values()),
                           sum(b.ref_sq for b in self.blocks.values()))


def _transformer_family(arch: str) -> bool:
    """A family without LDM key tables (Flux.1, Wan...): its standalone
    transformer files are read too, for the one-line "no EMA" answer."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    return entry is not None and entry.spec is None


def ema_map(src: Source, arch: str) -> dict[str, str]:
    """UNet key -> EMA key for the UNet keys of ``src`` that have an EMA copy.

    Raises:
        ModelkitError: no EMA in the file, or two UNet keys share one EMA name.
    """
    name = source_label(src)
    n_ema = sum(1 for k in src.infos if k.startswith(EMA_PREFIX))
    if n_ema < MIN_EMA_KEYS:
        what = "transformer" if _transformer_family(arch) else "UNet"
        raise ModelkitError(f"{name}: has no EMA weights ({n_ema} model_ema.* keys); "
                            f"nothing to select (the file already renders with its {what})")
    forward: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in src.infos:
        if not key.startswith(UNET_PREFIX):
            continue
        ek = ema_key(key[len(UNET_PREFIX):])
        if ek in seen:
            raise ModelkitError(f"{name}: UNet keys {seen[ek]!r} and {key!r} share the EMA "
                                f"name {ek!r}; cannot tell which EMA tensor is which")
        seen[ek] = key
        if ek in src.infos:
            forward[key] = ek
    return forward


def select_ema(src: Source, dtype: str | None = None) -> PlannedStep:
    """Plan a copy of ``src`` with EMA weights on the UNet keys; ``dtype`` (a
    safetensors float dtype) casts every float tensor but the markers.

    Raises:
        ModelkitError: not a checkpoint, no EMA, EMA shapes that do not match.
    """
    from modelkit.arch.blocks import block_of
    from modelkit.inspect.describe import describe

    kinds = ("checkpoint", "unet") if _transformer_family(describe(src).arch) else (
        "checkpoint",)
    rep0 = require_checkpoint(src, "ema", kinds)
    forward = ema_map(src, rep0.arch)
    name = source_label(src)
    report = EmaReport(rep0.arch)
    infos = {}
    for key, info in src.infos.items():
        if key.startswith(EMA_PREFIX):
            report.n_ema_dropped += 1
            continue
        if key in forward:
            e = src.infos[forward[key]]
            if e.shape != info.shape:
                raise ModelkitError(f"{name}: EMA tensor {forward[key]!r} is {list(e.shape)}, "
                                    f"the UNet key {key!r} is {list(info.shape)}")
            infos[key] = tensor_info(key, e.dtype, e.shape)
            report.n_swapped += 1
        else:
            if key.startswith(UNET_PREFIX) and info.is_float:
                report.online_only.append(key)
            infos[key] = info
    if dtype:
        infos = {k: (tensor_info(k, dtype, i.shape) if i.is_float and
                     parts.part_of(k) != parts.MARKER else i) for k, i in infos.items()}
    has_blocks = rep0.arch in ARCH_NAMES

    def produce(key: str) -> torch.Tensor:
        from modelkit.io.dtypes import to_torch
        from modelkit.io.reader import cast

        if key not in forward:
            return cast(src.get(key), to_torch(infos[key].dtype))
        ema = src.get(forward[key])
        block = block_of(key, rep0.arch) if has_blocks else "UNet"
        report.blocks.setdefault(block, L2Sums()).add_tensors(ema, src.get(key))
        return cast(ema, to_torch(infos[key].dtype))

    unchanged = {k: (src, k) for k, i in infos.items()
                 if k not in forward and i.dtype == src.infos[k].dtype}
    out = DerivedSource(f"ema({name})", infos, dict(src.metadata), produce, src.input_paths,
                        stream=passthrough(unchanged))
    origins: dict[str, KeyOrigin] = {k: (0, forward.get(k, k)) for k in infos}
    return PlannedStep(out, report, "ema", {"dtype": dtype}, origins)
