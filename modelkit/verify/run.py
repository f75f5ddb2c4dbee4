"""``verify()``: static checks, offline load and render, comparison against a
reference or a runtime-LoRA oracle, and the report.

Phases (each recorded in ``report.timings``):

1. static checks on the stored model (:mod:`modelkit.verify.static`), and
   the change report against the reference;
2. the operation class (given, or inferred from storage types and the
   change report) that picks the thresholds;
3. the tokenizer (found offline and checked);
4. the reference renders: the reference model, with ``loras`` applied at
   render time when there are any (the LoRA-bake oracle), and then the same
   model without them (the "LoRA had an effect" check);
5. the candidate renders, a re-render of the first case (determinism), the
   sanity checks and the per-image comparison.

Render phases are skipped (``skip`` rows) when a static or tokenizer check
fails. Only one pipeline is in memory at a time.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.core.verify_settings import (
    LoraUse,
    RenderPlan,
    VerifySettings,
    default_threads,
    is_tiny,
    resolve_plan,
)
from modelkit.core.verify_thresholds import DESCRIPTIONS, FAIL, INFO, PASS, SKIP, limits_for
from modelkit.progress import ProgressFn, no_progress
from modelkit.verify import metrics
from modelkit.verify.models import (
    RENDER_ARCHS,
    ModelUnderTest,
    open_model_under_test,
    render_path,
)
from modelkit.verify.render import torch_threads
from modelkit.verify.report import Check, ImageMetrics, VerifyReport

if TYPE_CHECKING:
    import os

    from modelkit.core.verify_library import Library
    from modelkit.errors import CancelFlag
    from modelkit.verify.render import LoadedPipeline, Rendered
    from modelkit.verify.tokenizer import TokenizerSource

# how far a cast may move a component (relative L2) before it counts as a merge
CAST_DRIFT = {"fp16": 1e-3, "bf16": 1e-2, "fp8": 0.15, "int8": 0.05}
BLACK_MEAN = 0.02
FLAT_STD = 0.01
PROMPT_SENSITIVITY = 1e-3
VERSION_PACKAGES = ("torch", "diffusers", "transformers", "peft",
                    "huggingface_hub", "safetensors", "numpy", "pillow")


@dataclass
class VerifySession:
    """State kept between :func:`verify` calls in one process: reference
    renders (a reference rendered with the same plan and adapters is not
    rendered again). Pass one session to several calls, e.g. when a recipe's
    outputs are verified against the same input."""

    renders: dict[tuple[Any, ...], tuple[list[Rendered], list[Rendered] | None]] = \
        field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 4)


def library_versions() -> dict[str, str]:
    """Versions of the packages a render depends on (and Python's).
    modelkit's own is the code that ran (``modelkit.__version__``), not the
    metadata of an installed distribution: the distribution is
    ``sd-modelkit``, and PyPI's ``modelkit`` is an unrelated package."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from modelkit import __version__

    out = {"python": platform.python_version(), "modelkit": __version__}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- operation class ------------------------------------------------------------


def _float_dtypes(model: ModelUnderTest) -> Counter[str]:
    return Counter(i.dtype for i in model.stored.infos.values() if i.is_float)


def infer_operation(model: ModelUnderTest, reference: ModelUnderTest | None,
                    loras: tuple[LoraUse, ...]) -> tuple[str | None, str]:
    """The operation class from what is stored (refined by
    :func:`refine_operation` once the change report is known)."""
    if reference is None:
        return None, "no reference to compare with"
    if loras:
        return "lora_bake", ("inferred: --lora with a reference (oracle: the reference "
                             "with the LoRA applied at render time)")
    if model.file_format == "gguf":
        return "int8", "inferred: GGUF UNet (q8_0), dequantized"
    if model.int8:
        return "int8", "inferred: modelkit int8 file, dequantized"
    from modelkit.io.quantized import dequantized_on_read

    on_read = dequantized_on_read(model.stored)
    if on_read:
        layers: dict[str, str] = getattr(model.stored, "quantized_layers", {})
        scaled_fp8 = any(f.startswith("float8") for f in layers.values())
        return ("fp8" if scaled_fp8 else "int8"), f"inferred: {on_read}"
    mine, theirs = _float_dtypes(model), _float_dtypes(reference)
    fp8 = [d for d in mine if d.startswith("F8")]
    if fp8:
        return "fp8", f"inferred: stored in {fp8[0]}"
    main = mine.most_common(1)[0][0] if mine else "F32"
    ref_main = theirs.most_common(1)[0][0] if theirs else "F32"
    if main != ref_main and main == "BF16":
        return "bf16", f"inferred: stored in BF16, the reference in {ref_main}"
    if main != ref_main and main == "F16" and ref_main in ("F32", "F64"):
        return "fp16", f"inferred: stored in F16, the reference in {ref_main}"
    return "lossless", "inferred: same or wider storage types"


def refine_operation(operation: str, reason: str, change: dict[str, Any] | None
                     ) -> tuple[str, str]:
    """A "lossless" model whose weights changed, or a cast that moved a
    component further than its rounding can, is a merge (reported, not judged)."""
    if change is None:
        return operation, reason
    overall = change["overall"]
    if operation == "lossless" and overall["n_unchanged"] < overall["n_tensors"]:
        return "merge", (f"inferred: {overall['n_tensors'] - overall['n_unchanged']} "
                         "tensors changed (a merge or other edit)")
    drift = CAST_DRIFT.get(operation)
    if drift is not None:
        worst = max((d["relative_l2"] for d in change["components"].values()), default=0.0)
        if worst > drift:
            return "merge", (f"inferred: weights moved (relative L2 up to {worst:.3g}) more "
                             f"than {operation} rounding does ({drift:g})")
    return operation, reason


# --- static phase -------------------------------------------------------------------


def _static_phase(report: VerifyReport, model: ModelUnderTest,
                  reference: ModelUnderTest | None, progress: ProgressFn,
                  cancel: CancelFlag | None) -> None:
    from modelkit.verify import static
    from modelkit.verify.families import family_checks
    from modelkit.verify.scan import scan_checks

    if model.report.arch not in static.STATIC_ARCHS:
        for check in static.component_checks(model):
            report.add(check)
    for check in family_checks(model):
        report.add(check)
    report.add(static.unknown_keys_check(model))
    report.add(static.dtype_check(model))
    for check in scan_checks(model.stored, progress, cancel):
        report.add(check)
    report.add(static.position_ids_check(model.render_source))


def _gate_phase(report: VerifyReport, cand: ModelUnderTest, ref: ModelUnderTest,
                operation: str | None, given: bool, progress: ProgressFn,
                cancel: CancelFlag | None) -> None:
    """Per-layer gates against the reference (:mod:`modelkit.verify.gates`); a
    cast judged by its gates stays a cast (not refined into a merge)."""
    from modelkit.verify import gates

    with _timed(report.timings, "gates"):
        layers = gates.layer_gates(cand, ref, progress, cancel)
    judge, why = gates.judged(layers, operation, given)
    for check in gates.gate_checks(layers, judge):
        report.add(check)
    report.gates = gates.gates_dict(layers, judge, why)
    if judge and report.operation != operation and operation is not None:
        report.operation = operation
        report.operation_reason += ("; kept: most layers pass their format's gate (a "
                                    f"{operation} with broken layers, not a merge)")


def _hashes(report: VerifyReport, model: ModelUnderTest,
            reference: ModelUnderTest | None, loras: tuple[LoraUse, ...]) -> None:
    from modelkit.io.hashcache import cached_hashes

    files = [("model", model.path)] + ([("reference", reference.path)] if reference else [])
    files += [(f"lora:{lu.path.name}", lu.path) for lu in loras]
    for role, path in files:
        if path.is_file():
            h = cached_hashes(path, tensor_hash=False)
            report.hashes[role] = {"file": path.name, "sha256": h.sha256, "autov2": h.autov2,
                                   "size_bytes": h.size_bytes}


# --- render phase -------------------------------------------------------------------


@dataclass
class _RenderContext:
    plan: RenderPlan
    library: Library
    tokenizer: Any
    tokenizer_source: TokenizerSource
    work: Path
    progress: ProgressFn
    cancel: CancelFlag | None


def _load(ctx: _RenderContext, model: ModelUnderTest, role: str,
          report: VerifyReport) -> LoadedPipeline | None:
    """Load ``model``; None (with a failing check) when parameters stayed on
    the meta device."""
    from modelkit.convert.diffusers import write_diffusers_configs
    from modelkit.verify.render import load_pipeline, tokenizer_slots
    from modelkit.verify.tokenizer import pipeline_tokenizers

    folder = ctx.work / f"{role}-config"
    config = write_diffusers_configs(model.render_source, folder)
    file = render_path(model, ctx.work)
    toks = pipeline_tokenizers(ctx.tokenizer, config.arch, tokenizer_slots(config))
    loaded = load_pipeline(file, model.name, config, toks, ctx.plan)
    name = "load.meta_params"
    if loaded.meta_params:
        report.add(Check(name, FAIL, f"{role} {model.name}: {len(loaded.meta_params)} "
                         "parameters left on the meta device (weights missing from the "
                         f"file): {', '.join(loaded.meta_params[:5])}",
                         len(loaded.meta_params), case=role))
        loaded.close()
        return None
    report.add(Check(name, PASS, f"{role} {model.name} loaded ({config.pipeline_class})",
                     0, case=role))
    if role == "candidate":
        report.notes += [n for n in config.notes if "prediction_type" in n]
    return loaded


def _render_key(model: ModelUnderTest, ctx: _RenderContext,
                loras: tuple[LoraUse, ...]) -> tuple[Any, ...]:
    st = model.path.stat() if model.path.exists() else None
    ident = (str(model.path.resolve()), st.st_size if st else 0, st.st_mtime_ns if st else 0)
    lora_ids = tuple((str(lu.path.resolve()), lu.weight) for lu in loras)
    return (ident, ctx.plan, lora_ids, str(ctx.library.root),
            str(ctx.tokenizer_source.location))


def _render_reference(report: VerifyReport, ctx: _RenderContext, reference: ModelUnderTest,
                      loras: tuple[LoraUse, ...], session: VerifySession | None,
                      timings: dict[str, float]) -> tuple[list[Rendered],
                                                          list[Rendered] | None] | None:
    from modelkit.verify.render import cases_of, prepare_adapters, render_all

    key = _render_key(reference, ctx, loras)
    if session is not None and key in session.renders:
        report.notes.append(f"reference renders of {reference.name} reused from this session")
        return session.renders[key]
    with _timed(timings, "load_reference"):
        loaded = _load(ctx, reference, "reference", report)
    if loaded is None:
        return None
    try:
        cases = cases_of(ctx.plan)
        with _timed(timings, "render_reference"):
            adapters = prepare_adapters(loaded, ctx.plan, ctx.library, loras)
            oracle = render_all(loaded, ctx.plan, cases, adapters.with_loras,
                                "render reference", ctx.progress, ctx.cancel)
            base = None
            if loras:
                base = render_all(loaded, ctx.plan, cases, adapters.tags_only,
                                  "render reference without the LoRAs",
                                  ctx.progress, ctx.cancel)
        report.notes += loaded.notes
    finally:
        loaded.close()
    if session is not None:
        session.renders[key] = (oracle, base)
    return oracle, base


def _render_candidate(report: VerifyReport, ctx: _RenderContext, model: ModelUnderTest,
                      loras: tuple[LoraUse, ...], timings: dict[str, float]
                      ) -> tuple[list[Rendered], Rendered | None] | None:
    from modelkit.verify.render import cases_of, prepare_adapters, render_all

    with _timed(timings, "load_candidate"):
        loaded = _load(ctx, model, "candidate", report)
    if loaded is None:
        return None
    try:
        cases = cases_of(ctx.plan)
        with _timed(timings, "render_candidate"):
            adapters = prepare_adapters(loaded, ctx.plan, ctx.library, loras)
            # the first case once more at the end: the determinism check
            renders = render_all(loaded, ctx.plan, [*cases, cases[0]], adapters.with_loras,
                                 "render candidate", ctx.progress, ctx.cancel)
            again = renders.pop()
        if loaded.embeddings:
            report.notes.append(f"embeddings used: {', '.join(loaded.embeddings)}")
        report.notes += loaded.notes
    finally:
        loaded.close()
    return renders, again


# --- checks on renders ------------------------------------------------------------------


def sanity_checks(renders: list[Rendered], again: Rendered | None) -> list[Check]:
    """Finite, not black, not flat, prompt sensitivity and determinism."""
    import numpy as np

    checks = []
    bad = [r.case for r in renders if not (metrics.is_finite(r.latents)
                                           and metrics.is_finite(r.image))]
    checks.append(Check("render.finite", FAIL if bad else PASS,
                        f"NaN/Inf in {', '.join(bad)}" if bad else "", len(bad)))
    stats = {r.case: metrics.image_stats(r.image) for r in renders}
    dark = [c for c, (mean, _) in stats.items() if not mean > BLACK_MEAN]
    checks.append(Check("render.not_black", FAIL if dark else PASS,
                        f"black images: {', '.join(dark)}" if dark else "",
                        min(m for m, _ in stats.values()), f"mean > {BLACK_MEAN:g}"))
    flat = [c for c, (_, std) in stats.items() if not std > FLAT_STD]
    checks.append(Check("render.not_flat", FAIL if flat else PASS,
                        f"flat images: {', '.join(flat)}" if flat else "",
                        min(s for _, s in stats.values()), f"channel std > {FLAT_STD:g}"))
    checks.append(_prompt_sensitivity(renders))
    if again is not None:
        first = renders[0]
        same = bool(np.array_equal(first.latents, again.latents)
                    and np.array_equal(first.image, again.image))
        diff = metrics.max_abs(again.image, first.image)
        checks.append(Check("render.deterministic", PASS if same else FAIL,
                            "" if same else f"re-rendering {first.case} gave a different "
                            f"result (max abs pixel difference {diff:.3g})", diff, "identical",
                            case=first.case))
    return checks


def _prompt_sensitivity(renders: list[Rendered]) -> Check:
    """Two prompts at the same seed must give different latents (a dead or
    zeroed text encoder, or a placeholder tokenizer, gives the same)."""
    by_seed: dict[int, dict[int, Rendered]] = {}
    for r in renders:
        by_seed.setdefault(r.seed, {})[r.prompt_index] = r
    distances = [metrics.relative_l2(group[1].latents, group[0].latents)
                 for group in by_seed.values() if 0 in group and 1 in group]
    value = min(distances) if distances else 0.0
    ok = value > PROMPT_SENSITIVITY
    msg = "" if ok else ("prompts 1 and 2 give the same latents: the text conditioning is "
                         "dead (zeroed text encoder or broken tokenizer)")
    return Check("render.prompt_sensitivity", PASS if ok else FAIL, msg, value,
                 f"latent rel. L2 > {PROMPT_SENSITIVITY:g}")


def image_rows(renders: list[Rendered], reference: list[Rendered] | None,
               base: list[Rendered] | None) -> list[ImageMetrics]:
    """Per-case metrics (against the reference and, for a LoRA oracle, the
    oracle against its base)."""
    rows = []
    for i, r in enumerate(renders):
        mean, std = metrics.image_stats(r.image)
        row = ImageMetrics(r.case, r.prompt_index, r.prompt, r.seed, mean, std,
                           seconds=round(r.seconds, 4))
        if reference is not None:
            ref = reference[i]
            row.latent = metrics.relative_l2(r.latents, ref.latents)
            row.max_abs = metrics.max_abs(r.image, ref.image)
            row.psnr = metrics.psnr(r.image, ref.image)
            row.ssim = metrics.ssim(r.image, ref.image)
            if base is not None:
                row.lora_effect = metrics.psnr(ref.image, base[i].image)
        rows.append(row)
    return rows


def compare_checks(rows: list[ImageMetrics], operation: str,
                   overrides: dict[str, float]) -> list[Check]:
    """One check per metric and image: judged by the operation's limits,
    reported (``info``) where the operation has none."""
    limits = {lim.metric: lim for lim in limits_for(operation, overrides)}
    shown = ["latent", "max_abs", "psnr", "ssim", "lora_effect"]
    checks = []
    for row in rows:
        for metric in shown:
            value = row.metric(metric)
            if value is None:
                continue
            lim = limits.get(metric)
            if lim is None:
                checks.append(Check(f"compare.{metric}", INFO, "", value, case=row.case))
                continue
            verdict = lim.judge(value)
            msg = ""
            if verdict != PASS and metric == "lora_effect":
                msg = "the runtime LoRA barely changed the base: the LoRA had no effect"
            elif verdict != PASS:
                msg = f"{DESCRIPTIONS[operation]}: {metric} out of bounds"
            checks.append(Check(f"compare.{metric}", verdict, msg, value, lim.describe(),
                                case=row.case))
    return checks


def _skip_render(report: VerifyReport, why: str) -> None:
    report.add(Check("render", SKIP, why))


def _tokenizer(report: VerifyReport, model: ModelUnderTest, settings: VerifySettings,
               library: Library, tiny: bool) -> tuple[Any, TokenizerSource] | None:
    from modelkit.verify.tokenizer import find_tokenizer, load_tokenizer, tokenizer_check

    source = find_tokenizer(library, settings.tokenizer, settings.allow_download, tiny=tiny)
    tok = load_tokenizer(source)
    check = report.add(tokenizer_check(tok, source, tiny=tiny, text_vocab=_te_vocab(model)))
    report.tokenizer = {**source.to_dict(), "size": len(tok)}
    return None if check.verdict == FAIL else (tok, source)


def _te_vocab(model: ModelUnderTest) -> int:
    """The smallest text-encoder vocabulary (token-embedding rows)."""
    sizes = []
    for key, info in model.render_source.infos.items():
        if key.endswith(("token_embedding.weight",)) and len(info.shape) == 2:
            sizes.append(info.shape[0])
    return min(sizes) if sizes else 49408


def _unet_channels(model: ModelUnderTest) -> int:
    from modelkit.arch.configs import UNET_PREFIX

    info = model.render_source.infos.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return int(info.shape[0]) if info is not None else 320


def verify(model: str | os.PathLike[str], settings: VerifySettings | None = None,
           reference: str | os.PathLike[str] | None = None,
           loras: tuple[LoraUse, ...] | list[LoraUse] = (), *,
           progress: ProgressFn = no_progress, cancel: CancelFlag | None = None,
           session: VerifySession | None = None) -> VerifyReport:
    """Verify a checkpoint: static checks, an offline render, and a
    comparison against ``reference`` (or the runtime-LoRA oracle).

    Args:
        model: the checkpoint to verify (``.safetensors``, legacy pickle,
            diffusers folder, modelkit int8 file, or a GGUF/UNet-only file
            with ``reference``).
        settings: prompts, seeds, size, steps, device, operation, thresholds
            (default :class:`VerifySettings`).
        reference: the model to compare with (the input of the operation).
        loras: LoRAs applied at render time; with ``reference`` they make the
            oracle of a LoRA bake (the reference plus these LoRAs), without it
            they are applied to ``model``.
        progress: progress callback (bytes for scans, images for renders).
        cancel: an event; when set, :class:`modelkit.errors.Cancelled` is raised.
        session: keeps reference renders between calls.

    Returns:
        The report; ``report.passed`` is False when any check failed.

    Raises:
        ModelkitError: unreadable input, no tokenizer found, a model diffusers
            cannot load (load errors, exit code 2 in the CLI).
        Cancelled: ``cancel`` was set.
    """
    settings = settings or VerifySettings()
    settings.validate()
    if settings.probe:
        from modelkit.errors import ModelkitError
        from modelkit.verify.probe_run import probe_verify

        if loras:
            raise ModelkitError("--probe compares two files block by block; a runtime "
                                "--lora has no place in it (bake it first)")
        return probe_verify(model, reference, settings, progress=progress, cancel=cancel)
    loras = tuple(loras)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _timed(timings, "open"):
        ref = open_model_under_test(reference) if reference is not None else None
        cand = open_model_under_test(model, ref)
    report = VerifyReport(model=cand.name, reference=ref.name if ref else None,
                          loras=[lu.to_dict() for lu in loras], arch=cand.report.arch,
                          variant=cand.report.variant,
                          prediction=cand.report.prediction.type,
                          versions=library_versions(), timings=timings)
    report.notes += cand.notes
    report.tiny = is_tiny(_unet_channels(cand))
    from modelkit.verify.static import architecture_check

    arch = report.add(architecture_check(cand, ref))
    if arch.verdict == FAIL and not (cand.kind == "checkpoint" or cand.completed):
        # nothing renderable (a LoRA, a VAE, a UNet without a reference):
        # nothing else to check, and no torch needed
        with _timed(timings, "hash"):
            _hashes(report, cand, ref, loras)
        _skip_render(report, "not a checkpoint")
    else:
        threads = settings.threads or default_threads("tiny" if report.tiny else "smoke")
        with torch_threads(threads):
            _checks(report, cand, ref, loras, settings, progress, cancel, session)
    timings["total"] = round(time.perf_counter() - start, 4)
    return report


def _checks(report: VerifyReport, cand: ModelUnderTest, ref: ModelUnderTest | None,
            loras: tuple[LoraUse, ...], settings: VerifySettings, progress: ProgressFn,
            cancel: CancelFlag | None, session: VerifySession | None) -> None:
    timings = report.timings
    with _timed(timings, "static"):
        _static_phase(report, cand, ref, progress, cancel)
    operation, reason = infer_operation(cand, ref, loras)
    if settings.operation != "auto" and ref is not None:
        operation, reason = settings.operation, "given"
    stored_as = operation
    if ref is not None and operation is not None and not report.failed:
        from modelkit.verify.static import change_check, change_report

        with _timed(timings, "change"):
            report.change = change_report(cand, ref, progress, cancel)
        if settings.operation == "auto":
            operation, reason = refine_operation(operation, reason, report.change)
        report.add(change_check(report.change, operation))
    report.operation, report.operation_reason = operation, reason
    if ref is not None and not loras:
        _gate_phase(report, cand, ref, stored_as, settings.operation != "auto",
                    progress, cancel)
    from modelkit.verify.vae_roundtrip import round_trip_check

    with _timed(timings, "vae_round_trip"):
        report.add(round_trip_check(report, cand, ref, cancel))
    with _timed(timings, "hash"):
        _hashes(report, cand, ref, loras)
    if not settings.render:
        _skip_render(report, "static checks only")
    elif cand.kind == "vae" or report.arch not in RENDER_ARCHS:
        _skip_render(report, "no render for " + ("a standalone VAE" if cand.kind == "vae"
                                                 else report.arch))
    elif report.failed:
        _skip_render(report, "static checks failed")
    else:
        _render_phase(report, cand, ref, loras, settings, progress, cancel, session)


def _render_phase(report: VerifyReport, cand: ModelUnderTest, ref: ModelUnderTest | None,
                  loras: tuple[LoraUse, ...], settings: VerifySettings,
                  progress: ProgressFn, cancel: CancelFlag | None,
                  session: VerifySession | None) -> None:
    from modelkit.core.verify_library import find_library
    from modelkit.io.reader import resolve_device
    from modelkit.verify.render import Renders

    timings = report.timings
    tiny = report.tiny
    library = find_library(cand.path, settings.library)
    if library.root is None and ref is not None:
        library = find_library(ref.path)  # e.g. an output written outside the library
    with _timed(timings, "tokenizer"):
        found = _tokenizer(report, cand, settings, library, tiny)
    if found is None:
        _skip_render(report, "tokenizer check failed")
        return
    device = resolve_device(settings.device)
    plan = resolve_plan(settings, tiny=tiny, default_resolution=_resolution(cand),
                        device=device)
    report.plan = plan.to_dict()
    renders = Renders(reference_label="runtime LoRA oracle" if (ref and loras)
                      else "reference")
    report.renders = renders
    with tempfile.TemporaryDirectory(prefix="modelkit-verify-", dir=settings.work_dir) as tmp:
        ctx = _RenderContext(plan, library, found[0], found[1], Path(tmp), progress, cancel)
        if ref is not None:
            got = _render_reference(report, ctx, ref, loras, session, timings)
            if got is None:
                _skip_render(report, "the reference did not load")
                return
            renders.reference, renders.base = got
        got_cand = _render_candidate(report, ctx, cand, () if ref else loras, timings)
    if got_cand is None:
        _skip_render(report, "the candidate did not load")
        return
    renders.candidate, again = got_cand
    with _timed(timings, "compare"):
        for check in sanity_checks(renders.candidate, again):
            report.add(check)
        report.images = image_rows(renders.candidate, renders.reference, renders.base)
        if report.operation is not None and renders.reference is not None:
            for check in compare_checks(report.images, report.operation,
                                        settings.thresholds):
                report.add(check)


def _resolution(model: ModelUnderTest) -> int:
    from modelkit.arch.configs import ARCHS

    spec = ARCHS.get(model.report.arch)
    return spec.default_resolution if spec else 512
