"""``swap`` and ``extract``: replace or pull out one component.

Components are found by their single-file prefixes (``model.diffusion_model.``,
``first_stage_model.``, the text-encoder prefixes). A donor may be a full
checkpoint (prefixed keys) or a standalone component file (unprefixed keys,
as A1111's ``VAE/`` folder and ComfyUI's ``diffusion_models/`` hold them).
Every key of the replaced component must exist in the donor with the same
shape: a 16-channel (SD3/Flux) VAE never goes into an SDXL file.

The transformer families (Flux.1, SD3, ...) declare their components in the
architecture registry (:class:`~modelkit.arch.registry.Component`: a Flux
all-in-one file holds ``vae.``, ``text_encoders.clip_l.`` and
``text_encoders.t5xxl.``, as ComfyUI saves it). A text encoder of its own is
written as ComfyUI's ``text_encoders/`` files hold it: transformers' names
without the ``transformer.`` of the all-in-one file (ComfyUI
``comfy/sd.py``: the clip model's ``transformer`` is what a standalone file
loads into).
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
from modelkit.vocab import EXTRACTABLE as _EXTRACTABLE
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

SWAPPABLE = ("vae", "unet", "te")
EXTRACTABLE = _EXTRACTABLE  # unet, vae, te, te1, te2 and the families' text encoders
_INNER_TE = "transformer."  # under a family text encoder's prefix in an all-in-one file
_PREFIX = {"vae": (VAE_PREFIX,), "unet": (UNET_PREFIX,), "te": tuple(TE_PREFIXES)}


@dataclass
class ComponentReport:
    """What swap or extract moved."""

    component: str
    n_tensors: int = 0
    donor: str | None = None
    cast: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Part:
    """A family component: its prefix in an all-in-one file, in a file of its
    own, and what its own file also leaves out (``transformer.``)."""

    name: str
    prefix: str
    standalone: str = ""
    inner: str = ""

    def own_key(self, key: str) -> str:
        """``key`` (under :attr:`prefix`) as a file of this component alone names it."""
        rest = key[len(self.prefix):]
        return self.standalone + (rest[len(self.inner):] if self.inner and
                                  rest.startswith(self.inner) else rest)


def _family_parts(src: Source, component: str, arch: str) -> list[_Part] | None:
    """The registry components of a transformer family that ``component``
    (``unet``, ``vae``, ``te`` or a component name such as ``t5xxl``)
    selects and ``src`` has; None for an SD architecture (its prefixes are
    the LDM ones)."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    if entry is None or entry.spec is not None:
        return None
    roles = {"unet": registry.DENOISER, "vae": registry.VAE, "te": registry.TEXT_ENCODER}
    chosen = [c for c in entry.components
              if c.role == roles.get(component) or c.name == component]
    if not chosen:
        names = ", ".join(c.name for c in entry.components if c.role == registry.TEXT_ENCODER)
        raise ModelkitError(f"{source_label(src)}: {entry.label} has no {component!r}; "
                            f"choose unet, vae or te" + (f" ({names})" if names else ""))
    return [_Part(c.name, c.prefix, c.standalone,
                  _INNER_TE if c.role == registry.TEXT_ENCODER else "")
            for c in chosen if any(k.startswith(c.prefix) for k in src.infos)]


def _family_origin(src: Source, donor: Source, parts_: list[_Part], component: str
                   ) -> dict[str, str]:
    """Key of ``src`` -> key of ``donor`` for every part the donor holds
    whole (an all-in-one donor's own key, or a file of that component alone);
    a part the donor holds only some keys of is an error."""
    name, dname = source_label(src), source_label(donor)
    origin: dict[str, str] = {}
    for part in parts_:
        found: dict[str, str] = {}
        keys = [k for k in src.infos if k.startswith(part.prefix)]
        for key in keys:
            cands = (key, part.own_key(key), key[len(part.prefix):])
            dkey = next((c for c in cands if c in donor.infos), None)
            if dkey is not None:
                found[key] = dkey
        if found and len(found) < len(keys):
            miss = next(k for k in keys if k not in found)
            raise ModelkitError(f"{dname}: has no {part.own_key(miss)!r}; it is not a "
                                f"{part.name} for {name}")
        origin.update(found)
    if not origin:
        first = parts_[0]
        example = first.own_key(next(k for k in src.infos if k.startswith(first.prefix)))
        raise ModelkitError(f"{dname}: has none of the {' or '.join(p.name for p in parts_)} "
                            f"keys of {name} (e.g. {example!r}); give a {component} file "
                            "for this model")
    return origin


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

    if component not in SWAPPABLE:
        raise ModelkitError(f"cannot swap {component!r}; choose one of {', '.join(SWAPPABLE)}")
    rep = require_checkpoint(src, "swap")
    name, dname = source_label(src), source_label(donor)
    report = ComponentReport(component, donor=dname)
    family = _family_parts(src, component, rep.arch)
    if family is not None:
        if not family:
            raise ModelkitError(f"{name}: has no {component} to replace")
        origin = _family_origin(src, donor, family, component)
        _check_shapes(src, donor, origin, component)
    else:
        origin = _ldm_origin(src, donor, component)
    return _swapped(src, donor, origin, report)


def _check_shapes(src: Source, donor: Source, origin: dict[str, str], component: str
                  ) -> None:
    for key, dkey in origin.items():
        dshape, shape = donor.infos[dkey].shape, src.infos[key].shape
        if dshape != shape:
            raise ModelkitError(f"{source_label(donor)}: {dkey} is {list(dshape)}, "
                                f"{source_label(src)} needs {list(shape)}; wrong {component} "
                                "for this model")


def _ldm_origin(src: Source, donor: Source, component: str) -> dict[str, str]:
    """Key of ``src`` -> donor key for an SD checkpoint's ``component``."""
    bare = _donor_kind(donor, component)
    prefixes = _prefixes(component, src)
    name, dname = source_label(src), source_label(donor)
    if not prefixes:
        raise ModelkitError(f"{name}: has no {component} to replace")
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
    return origin


def _swapped(src: Source, donor: Source, origin: dict[str, str], report: ComponentReport
             ) -> PlannedStep:
    """``src`` with the keys of ``origin`` read from ``donor`` (cast to the
    dtype each replaced key had)."""
    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    name, dname = source_label(src), source_label(donor)
    component = report.component
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
    rep = require_checkpoint(src, "extract")
    name = source_label(src)
    family = _family_parts(src, component, rep.arch)
    if family is not None:
        return _extract_family(src, component, family)
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


def _extract_family(src: Source, component: str, parts_: list[_Part]) -> PlannedStep:
    """A transformer family's component on its own: one component with the
    names of a file of its own (the transformer bare, as ComfyUI's
    diffusion_models; a text encoder as its text_encoders), several (``te``
    of a file with two encoders) keeping their prefixes."""
    name = source_label(src)
    if not parts_:
        raise ModelkitError(f"{name}: has no {component}")
    origin: dict[str, str] = {}
    for part in parts_:
        for key in src.infos:
            if key.startswith(part.prefix):
                origin[part.own_key(key) if len(parts_) == 1 else key] = key
    infos = {k: tensor_info(k, src.infos[o].dtype, src.infos[o].shape)
             for k, o in origin.items()}
    report = ComponentReport(component, n_tensors=len(infos))
    if len(parts_) > 1:
        report.notes.append(f"{len(parts_)} text encoders "
                            f"({', '.join(p.name for p in parts_)}): keys keep their prefixes")
    out = DerivedSource(f"extract({name})", infos, dict(src.metadata),
                        lambda k: src.get(origin[k]), src.input_paths,
                        stream=passthrough({k: (src, o) for k, o in origin.items()}))
    return PlannedStep(out, report, "extract", {"component": component},
                       {k: (0, o) for k, o in origin.items()})
