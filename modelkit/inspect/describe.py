"""The inspect report of an opened source (its infos and metadata, no file
read), and the check every operation that takes a checkpoint makes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkit.errors import ModelkitError
from modelkit.io.source import Source, source_label
from modelkit.wording import with_article

if TYPE_CHECKING:
    from modelkit.inspect.report import ModelReport


def describe(source: Source) -> ModelReport:
    """The inspect report of a source, from its infos and metadata alone."""
    from pathlib import Path

    from modelkit.inspect.report import build_report

    return build_report(Path(source_label(source)), source.infos, source.metadata,
                        "safetensors", None)


def require_handled(rep: ModelReport, name: str, what: str) -> None:
    """A one-line error when ``rep``'s architecture is one the registry
    declares for detection only, or partly supported without ``what``
    (:func:`modelkit.arch.registry.handles`)."""
    from modelkit.arch import registry

    arch = registry.get(rep.arch)
    if arch is not None and not registry.handles(arch.name, what):
        done = registry.listed(registry.commands_of(arch.name))
        raise ModelkitError(f"{name}: is {with_article(f'{arch.label} {rep.kind}')}; "
                            "modelkit recognises "
                            f"{arch.label} files ({done}) but {what} does not handle them "
                            f"yet (it handles {registry.listed()})")


def require_original_layout(rep: ModelReport, where: str, what: str) -> None:
    """Refuse a family without LDM key tables (Flux.1) in the diffusers
    layout: its block map and LoRA names are the original (BFL) layout's."""
    from modelkit.arch import registry

    arch = registry.get(rep.arch)
    if (arch is not None and arch.spec is None and rep.layout == registry.DIFFUSERS
            and registry.ORIGINAL in arch.layouts):  # Qwen-Image has one layout
        raise ModelkitError(f"{where} is {with_article(arch.label)} transformer in the "
                            f"diffusers layout; {what} handles the original (BFL/ComfyUI) "
                            "layout only (ComfyUI's diffusion_models files); run `modelkit "
                            "convert --layout original` first")


def require_checkpoint(source: Source, what: str, kinds: tuple[str, ...] = ("checkpoint",)
                       ) -> ModelReport:
    """The report of ``source``; a one-line error unless it is one of ``kinds``
    of an architecture ``what`` handles."""
    rep = describe(source)
    name = source_label(source)
    if rep.kind not in kinds:
        want = " or ".join(kinds)
        raise ModelkitError(f"{name}: is {with_article(rep.kind)}, not {with_article(want)}; "
                            f"{what} takes a model's {want} file")
    require_handled(rep, name, what)
    return rep
