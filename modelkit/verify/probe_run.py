"""``verify --probe``: the streamed functional probe as a verify run, its
checks (one per block) and its plot (relative error per block along the
depth, a PNG drawn with Pillow).

A block fails when the candidate's output is not finite, when the
candidate lacks or reshapes one of the block's weights, or when its output
is further from the reference's than the limit (relative L2;
``settings.probe_max_error``, else :func:`probe_limit`: 0.05, 0.15 for fp8
storage; casts stay below it, a transposed, zeroed, swapped or rescaled
weight lands far above).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.core.verify_thresholds import FAIL, PASS, SKIP
from modelkit.errors import ModelkitError
from modelkit.progress import ProgressFn, no_progress
from modelkit.verify.report import Check, VerifyReport

if TYPE_CHECKING:
    import os

    from PIL import Image

    from modelkit.arch.registry import Architecture
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.errors import CancelFlag
    from modelkit.inspect.report import ModelReport
    from modelkit.io.source import Source
    from modelkit.verify.probe import BlockResult


def block_check(r: BlockResult, max_error: float) -> Check:
    """The verdict on one probed block."""
    label = f"{r.component}:{r.block}"
    limit = f"rel. L2 <= {max_error:g}"
    if r.absent:
        return Check("probe.block", SKIP, f"the candidate has no {r.component} block "
                     f"{r.block}", None, limit, label)
    if r.missing:
        return Check("probe.block", FAIL, f"{len(r.missing)} weights missing or reshaped "
                     f"in the candidate: {', '.join(r.missing[:3])}", r.rel_error, limit,
                     label)
    if not r.reference_finite:
        return Check("probe.block", SKIP, "the reference's output is not finite",
                     r.rel_error, limit, label)
    if not r.finite:
        return Check("probe.block", FAIL, "the candidate's output is not finite (NaN/Inf)",
                     r.rel_error, limit, label)
    if not r.rel_error <= max_error:
        return Check("probe.block", FAIL, f"output differs from the reference's "
                     f"(cosine {r.cosine:.4f})", r.rel_error, limit, label)
    return Check("probe.block", PASS, "", r.rel_error, limit, label)


def probe_limit(settings: VerifySettings, stored: Source) -> tuple[float, str]:
    """The most a block may differ, and why: ``settings.probe_max_error``
    when given, else by the candidate's storage (fp8's 3-bit mantissa moves
    a block by up to ~8 % on the test fixtures; every other storage
    modelkit writes by under 1 %)."""
    from modelkit.core.verify_settings import PROBE_MAX_ERROR, PROBE_MAX_ERROR_FP8

    if settings.probe_max_error is not None:
        return settings.probe_max_error, "given"
    if any(i.dtype.startswith("F8") for i in stored.infos.values()):
        return PROBE_MAX_ERROR_FP8, "the candidate stores fp8"
    return PROBE_MAX_ERROR, "default"


def _standalone_components(rep: Any, name: str) -> tuple[str, ...]:
    """The components the probe compares in a standalone text encoder or VAE
    of the newer families (``modelkit/arch/encoders.py``; their ``arch`` is
    the family that uses them): a VAE's blocks only; a text encoder is
    refused in one line (its keys are no component of the family's probe
    table). ``()`` (all) for any other file."""
    if getattr(rep, "component", None) is None:
        return ()
    if rep.kind != "vae":
        raise ModelkitError(f"{name}: is a standalone {rep.component['label']} text encoder; "
                            "the probe compares checkpoints, transformers and VAEs")
    return ("vae",)


def _refuse_diffusers_layout(arch: Architecture,
                             files: tuple[tuple[str, ModelReport], ...]) -> None:
    """The probe's blocks name the original layout; Flux.1 files in the
    diffusers layout are viewed in it (:mod:`modelkit.verify.probe_layout`),
    the other transformers' are refused in one line naming the conversion."""
    from modelkit.arch import registry

    if arch.name == "flux" or arch.spec is not None or registry.ORIGINAL not in arch.layouts:
        return
    for name, rep in files:
        if rep.layout == registry.DIFFUSERS:
            raise ModelkitError(f"{name}: is a {arch.label} transformer in the diffusers "
                                "layout; the probe reads the original layout: convert it "
                                f"first ('modelkit convert {name} --layout original -o "
                                "OUT.safetensors')")


def probe_verify(model: str | os.PathLike[str], reference: str | os.PathLike[str] | None,
                 settings: VerifySettings, *, progress: ProgressFn = no_progress,
                 cancel: CancelFlag | None = None) -> VerifyReport:
    """Probe ``model`` block by block against ``reference``.

    Raises:
        ModelkitError: no reference, an unreadable file, or an architecture
            without probe blocks.
    """
    from modelkit.arch import registry
    from modelkit.verify.models import open_model_under_test
    from modelkit.verify.probe import probe
    from modelkit.verify.render import torch_threads
    from modelkit.verify.run import library_versions

    if reference is None:
        raise ModelkitError(f"{Path(model).name}: --probe compares with a reference; give "
                            "--reference (the file MODEL was made from)")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    # as verify's render reads them: int8 files dequantized, GGUF read back
    cand_mut, ref_mut = open_model_under_test(model), open_model_under_test(reference)
    cand, ref = cand_mut.render_source, ref_mut.render_source
    cand_rep, ref_rep = cand_mut.report, ref_mut.report
    only = _standalone_components(ref_rep, Path(reference).name)
    arch = registry.get(ref_rep.arch)
    if arch is None or not arch.probe:
        raise ModelkitError(f"{Path(reference).name}: architecture {ref_rep.arch!r} has no "
                            "probe blocks; the probe knows "
                            f"{registry.listed(registry.names(where=lambda a: bool(a.probe)))}")
    report = VerifyReport(model=Path(model).name, reference=Path(reference).name,
                          arch=arch.name, variant=ref_rep.variant, versions=library_versions(),
                          timings=timings)
    if cand_rep.arch != ref_rep.arch:
        report.add(Check("static.architecture", FAIL, f"{report.model} is {cand_rep.arch}, "
                         f"the reference {report.reference} is {ref_rep.arch}",
                         cand_rep.arch))
        return report
    report.add(Check("static.architecture", PASS, "", arch.name))
    _refuse_diffusers_layout(arch, ((Path(model).name, cand_rep),
                                    (Path(reference).name, ref_rep)))
    if arch.name == "flux":  # a diffusers-layout file is probed in the BFL layout
        from modelkit.verify.probe_layout import as_original

        cand, ref = as_original(cand, cand_rep.layout), as_original(ref, ref_rep.layout)
        for name, rep in ((report.model, cand_rep), (report.reference, ref_rep)):
            if rep.layout == "diffusers":
                report.notes.append(f"{name}: diffusers layout, probed as the BFL layout")
    with torch_threads(1):  # block math on one thread: torch spins beside busy processes
        results = probe(cand, ref, arch, progress=progress, cancel=cancel, only=only)
    timings["probe"] = round(sum(r.seconds for r in results), 4)
    limit, why = probe_limit(settings, cand_mut.stored)
    report.probe = [{**r.to_dict(), "limit": limit} for r in results]
    report.notes += [*cand_mut.notes, f"probe limit {limit:g}: {why}"]
    for r in results:
        report.add(block_check(r, limit))
    if all(r.absent for r in results):
        report.add(Check("probe.coverage", FAIL, f"{report.model} holds none of the "
                         f"reference's {arch.label} blocks (another kind of file?)", 0))
    absent = sorted({r.component for r in results if r.absent})
    if absent:
        report.notes.append(f"not in the candidate, skipped: {', '.join(absent)} (compared: "
                            "what both files hold)")
    bad = [r for r in results if not r.finite and not r.missing and not r.absent]
    if bad:
        report.notes.append(f"the candidate first goes non-finite at {bad[0].component}:"
                            f"{bad[0].block}")
    timings["total"] = round(time.perf_counter() - start, 4)
    return report


# --- the plot ------------------------------------------------------------------------------

_W_BAR, _H, _LEFT, _BOTTOM, _TOP = 6, 300, 56, 40, 28
_LOG_MIN, _LOG_MAX = -8.0, 1.0
_COLORS = ((70, 110, 200), (60, 160, 90), (200, 140, 40), (150, 80, 170), (90, 150, 170))


def plot_image(report: VerifyReport) -> Image.Image:
    """Relative error per block along the depth (log scale, one bar a block,
    a colour per component, the limit as a red line, non-finite or missing
    blocks as full red bars)."""
    from PIL import Image, ImageDraw

    rows = report.probe or []
    max_error = float(str(rows[0]["limit"])) if rows else 0.05
    width = _LEFT + max(len(rows), 1) * _W_BAR + 20
    img = Image.new("RGB", (max(width, 360), _H), "white")
    d = ImageDraw.Draw(img)
    plot_h = _H - _TOP - _BOTTOM

    def y_of(value: float) -> int:
        lg = min(max(math.log10(value), _LOG_MIN), _LOG_MAX) if value > 0 else _LOG_MIN
        return _TOP + int((_LOG_MAX - lg) / (_LOG_MAX - _LOG_MIN) * plot_h)

    for e in range(int(_LOG_MIN), int(_LOG_MAX) + 1):
        y = y_of(10.0 ** e)
        d.line((_LEFT - 3, y, img.width - 10, y), fill=(225, 225, 225))
        d.text((4, y - 6), f"1e{e}", fill="black")
    components: list[str] = []
    for i, row in enumerate(rows):
        comp = str(row["component"])
        x = _LEFT + i * _W_BAR
        if comp not in components:
            components.append(comp)
            # a tick at each component's first block; labels on two rows so
            # that short components' names do not overlap
            d.line((x, _TOP + plot_h, x, _TOP + plot_h + 4), fill="black")
            level = (len(components) - 1) % 2
            d.text((x, _H - _BOTTOM + 6 + 14 * level), comp, fill="black")
        if row.get("absent"):
            continue  # not in the candidate: no bar
        value = float(str(row["rel_error"]))
        broken = not row["finite"] or not math.isfinite(value)
        color = (220, 30, 30) if broken else _COLORS[components.index(comp) % len(_COLORS)]
        top = _TOP if broken else y_of(value)
        d.rectangle((x, top, x + _W_BAR - 2, _TOP + plot_h), fill=color)
    y = y_of(max_error)
    d.line((_LEFT, y, img.width - 10, y), fill=(220, 30, 30), width=1)
    d.text((_LEFT, 6), f"probe: relative error per block vs {report.reference} "
                       f"(limit {max_error:g})", fill="black")
    return img


def write_plot(report: VerifyReport, path: str | os.PathLike[str], overwrite: bool = False
               ) -> Path:
    """Save :func:`plot_image` as a PNG (temp file beside it, then renamed)."""
    from modelkit.io.writer import atomic_path
    from modelkit.verify.outputs import check_outputs

    p = Path(path)
    check_outputs([p], overwrite)
    with atomic_path(p) as tmp:
        plot_image(report).save(tmp, format="PNG")
    return p


def plot_path_beside(reports: list[Path | None]) -> Path | None:
    """``verify-probe.png`` beside the first report written (``verify.json``)."""
    first = next((p for p in reports if p is not None), None)
    return None if first is None else first.with_name(f"{first.stem}-probe.png")
