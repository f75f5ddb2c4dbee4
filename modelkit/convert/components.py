"""``swap`` and ``extract``: replace or pull out one component.

Components are found by their single-file prefixes (``model.diffusion_model.``,
``first_stage_model.``, the text-encoder prefixes). A donor may be a full
checkpoint (prefixed keys) or a standalone component file (unprefixed keys,
as A1111's ``VAE/`` folder and ComfyUI's ``diffusion_models/`` hold them).
Every key of the replaced component must exist in the donor with the same
shape: a 16-channel (SD3/Flux) VAE never goes into an SDXL file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch import parts
from modelkit.arch.configs import TE_PREFIXES, UNET_PREFIX, VAE_PREFIX
from modelkit.convert.base import passthrough
from modelkit.core.step import KeyOrigin, PlannedStep
from modelkit.errors import ModelkitError
from modelkit.inspect.describe import describe, require_checkpoint
from modelkit.io.source import DerivedSource, Source, input_paths_of, source_label, tensor_info
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

SWAPPABLE = ("vae", "unet", "te")
EXTRACTABLE = ("vae", "unet", "te", "te1", "te2")
_PREFIX = {"vae": (VAE_PREFIX,), "unet": (UNET_PREFIX,), "te": tuple(TE_PREFIXES)}


@dataclass
class ComponentReport:
    """What swap or extract moved."""

    component: str
    n_tensors: int = 0
    donor: str | None = None
    cast: int = 0
    notes: list[str] = field(default_factory=list)


def _prefixes(component: str, src: Source) -> list[str]:
    if component in ("te1", "te2"):
        found = [p for p, (_, slot) in TE_PREFIXES.items() if slot == component
                 and any(k.startswith(p) for k in src.infos)]
    else:
        found = [p for p in _PREFIX[component] if any(k.startswith(p) for k in src.infos)]
    return found


def _donor_key(donor: Source, key: str, prefix: str, bare_ok: bool) -> str | None:
    if key in donor.infos:
        return key
    short = key[len(prefix):]
    return short if bare_ok and short in donor.infos else None


def _donor_kind(donor: Source, component: str) -> bool:
    """Whether the donor holds ``component`` without prefixes."""
    rep = describe(donor)
    bare = {"vae": "vae", "unet": "unet", "te": "text_encoder"}[component]
    if rep.kind == bare:
        return True
    has = component in rep.components or (
        component == "te" and any(c.startswith("te") for c in rep.components))
    if rep.kind == "checkpoint" and has:
        return False
    raise ModelkitError(f"{source_label(donor)}: is {with_article(rep.kind)} with no {component}; "
                        f"give {with_article(component)} file or a checkpoint that has one")


def swap(src: Source, donor: Source, component: str = "vae") -> PlannedStep:
    """Plan ``src`` with ``component`` taken from ``donor``; the donor's
    tensors are cast to the dtype each replaced key had.

    Raises:
        ModelkitError: unknown component, missing keys, shape mismatches.
    """
    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    if component not in SWAPPABLE:
        raise ModelkitError(f"cannot swap {component!r}; choose one of {', '.join(SWAPPABLE)}")
    require_checkpoint(src, "swap")
    bare = _donor_kind(donor, component)
    prefixes = _prefixes(component, src)
    name, dname = source_label(src), source_label(donor)
    if not prefixes:
        raise ModelkitError(f"{name}: has no {component} to replace")
    report = ComponentReport(component, donor=dname)
    origin: dict[str, str] = {}
    for key, info in src.infos.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None or parts.is_position_ids(key):
            continue
        dkey = _donor_key(donor, key, prefix, bare)
        if dkey is None:
            raise ModelkitError(f"{dname}: has no {key[len(prefix):]!r}; it is not a "
                                f"{component} for this checkpoint")
        dshape = donor.infos[dkey].shape
        if dshape != info.shape:
            raise ModelkitError(f"{dname}: {dkey} is {list(dshape)}, {name} needs "
                                f"{list(info.shape)}; wrong {component} for this model")
        origin[key] = dkey
    report.n_tensors = len(origin)

    def produce(key: str) -> torch.Tensor:
        if key not in origin:
            return src.get(key)
        t = donor.get(origin[key])
        want = to_torch(src.infos[key].dtype)
        if t.dtype != want and t.is_floating_point():
            report.cast += 1
        return cast(t, want)

    unchanged = {k: (src, k) for k in src.infos if k not in origin}
    unchanged.update({k: (donor, o) for k, o in origin.items()
                      if donor.infos[o].dtype == src.infos[k].dtype})
    out = DerivedSource(f"swap({name})", dict(src.infos), dict(src.metadata), produce,
                        input_paths_of([src, donor]), stream=passthrough(unchanged))
    origins: dict[str, KeyOrigin] = {k: ((1, origin[k]) if k in origin else (0, k))
                                     for k in src.infos}
    return PlannedStep(out, report, "swap", {"component": component,
                                             "donor": Path(dname).name},
                       origins)


def extract(src: Source, component: str) -> PlannedStep:
    """Plan a file holding one component of ``src``. ``vae`` and ``unet`` are
    written unprefixed (the layout of standalone VAE and diffusion-model
    files; a UNet keeps the prediction markers); a single text encoder is
    written unprefixed in its own layout, ``te`` on SDXL keeps both prefixed.

    Raises:
        ModelkitError: unknown component, or the file does not have it.
    """
    if component not in EXTRACTABLE:
        raise ModelkitError(f"cannot extract {component!r}; choose one of "
                            f"{', '.join(EXTRACTABLE)}")
    require_checkpoint(src, "extract")
    name = source_label(src)
    prefixes = _prefixes(component, src)
    if not prefixes:
        raise ModelkitError(f"{name}: has no {component}")
    strip = len(prefixes) == 1
    origin: dict[str, str] = {}
    for key in src.infos:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            origin[key[len(prefix):] if strip else key] = key
        elif component == "unet" and parts.part_of(key) == parts.MARKER:
            origin[key] = key
    infos = {k: tensor_info(k, src.infos[o].dtype, src.infos[o].shape)
             for k, o in origin.items()}
    report = ComponentReport(component, n_tensors=len(infos))
    if not strip:
        report.notes.append(f"{len(prefixes)} text encoders: keys keep their prefixes")
    out = DerivedSource(f"extract({name})", infos, dict(src.metadata),
                        lambda k: src.get(origin[k]), src.input_paths,
                        stream=passthrough({k: (src, o) for k, o in origin.items()}))
    return PlannedStep(out, report, "extract", {"component": component},
                       {k: (0, o) for k, o in origin.items()})
