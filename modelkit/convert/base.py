"""What every convert operation returns, and the per-key plumbing they share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkit.errors import ModelkitError
from modelkit.io.source import Source, source_label
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

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
    from modelkit.wording import with_article

    arch = registry.get(rep.arch)
    if arch is not None and not registry.handles(arch.name, what):
        done = (registry.listed(tuple(sorted(arch.commands))) if arch.commands
                else "inspect")
        raise ModelkitError(f"{name}: is {with_article(f'{arch.label} {rep.kind}')}; "
                            "modelkit recognises "
                            f"{arch.label} files ({done}) but {what} does not handle them "
                            f"yet (it handles {registry.listed()})")


def require_original_layout(rep: ModelReport, where: str, what: str) -> None:
    """Refuse a family without LDM key tables (Flux.1) in the diffusers
    layout: its block map and LoRA names are the original (BFL) layout's."""
    from modelkit.arch import registry

    arch = registry.get(rep.arch)
    if arch is not None and arch.spec is None and rep.layout == registry.DIFFUSERS:
        raise ModelkitError(f"{where} is {with_article(arch.label)} transformer in the "
                            f"diffusers layout; {what} handles the original (BFL/ComfyUI) "
                            "layout only (ComfyUI's diffusion_models files)")


def require_checkpoint(source: Source, what: str, kinds: tuple[str, ...] = ("checkpoint",)
                       ) -> ModelReport:
    """The report of ``source``; a one-line error unless it is one of ``kinds``
    of a known SD architecture."""
    rep = describe(source)
    name = source_label(source)
    if rep.kind not in kinds:
        want = " or ".join(kinds)
        raise ModelkitError(f"{name}: is {with_article(rep.kind)}, not {with_article(want)}; "
                            f"{what} takes a "
                            f"Stable Diffusion {want}")
    require_handled(rep, name, what)
    return rep


def chunked_apply(t: torch.Tensor, out_dtype: torch.dtype, fn: Any,
                  chunk: int = 1 << 20) -> torch.Tensor:
    """``fn(float32 chunk) -> chunk`` over ``t`` in 1M-element pieces, written
    into a new ``out_dtype`` tensor of ``t``'s shape (float32 math stays in
    cache, and no whole-tensor float32 copy is made)."""
    import torch

    out = torch.empty(t.shape, dtype=out_dtype, device=t.device)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), chunk):
        dst[i:i + chunk].copy_(fn(src[i:i + chunk].to(torch.float32)))
    return out


def passthrough(keys: dict[str, tuple[Source, str]]) -> Any:
    """A ``stream`` route for a DerivedSource: output keys whose bytes are an
    input tensor's bytes unchanged (same dtype and shape) are copied file to
    file in the kernel, when that input is a safetensors file; the writer
    asks ``get`` for every other key. ``keys`` maps such output keys to
    (source, key in it). Returns None when no key qualifies."""
    raw = {k: (s, o) for k, (s, o) in keys.items() if getattr(s, "raw_readable", False)}
    if not raw:
        return None

    def stream(key: str, sink: Any) -> bool:
        found = raw.get(key)
        if found is None:
            return False
        sink.copy_from(*found)
        return True

    return stream
