"""Static checks: what can be told without rendering (seconds even for a
7 GB file, one tensor at a time).

* ``static.architecture``: a checkpoint of a known SD architecture (and the
  reference's, when there is one);
* ``static.keys.<component>``: completeness against the key and shape table
  the architecture implies at the file's widths (missing or wrong shape:
  fail; unexpected: warn); a missing component fails;
* ``static.unknown_keys``: keys outside every component (warn);
* ``static.dtypes``: weights are float (or modelkit int8 with its scale);
* ``static.nan_inf``: no NaN or Inf in any float tensor (streamed);
* ``static.position_ids``: CLIP ``position_ids``, when present, are exactly
  ``0..76`` (transformers ignores the stored buffer, so a broken one renders
  fine here and breaks other UIs: only this check sees it);
* ``static.change``: against a reference, how far each component and block
  moved (relative L2, share of unchanged tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import ARCHS, TE_PREFIXES
from modelkit.arch.keys import POSITION_IDS
from modelkit.core.verify_thresholds import FAIL, INFO, PASS, SKIP, WARN
from modelkit.errors import CancelFlag, check_cancel
from modelkit.numeric import CHUNK_ELEMENTS
from modelkit.progress import VERIFY, Progress, ProgressFn, no_progress
from modelkit.verify.models import RENDER_ARCHS, ModelUnderTest, float32_view
from modelkit.verify.report import Check
from modelkit.wording import plural, with_article

if TYPE_CHECKING:
    from modelkit.inspect.compare import CompareReport
    from modelkit.io.source import Source

# families verify checks without rendering (no pipeline for them yet)
STATIC_ARCHS = frozenset({"flux"})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
INT_DTYPES = frozenset({"I64", "I32"})
LIST = 5  # keys named in a check message
CLIP_CONTEXT = 77


def _names(keys: list[str], total: int | None = None) -> str:
    total = len(keys) if total is None else total
    shown = ", ".join(keys[:LIST])
    return shown + (f" and {total - LIST} more" if total > LIST else "")


def expected_components(arch: str) -> list[str]:
    """Component names a complete checkpoint of ``arch`` has (none for an
    architecture modelkit does not know: the architecture check says so)."""
    if arch not in ARCHS:
        return []
    return ["unet", "vae", *(s.name for s in ARCHS[arch].text_encoders)]


def architecture_check(model: ModelUnderTest, reference: ModelUnderTest | None) -> Check:
    """A checkpoint (or a UNet completed from the reference) of a known
    architecture, matching the reference's."""
    rep = model.report
    name = "static.architecture"
    if model.kind == "vae":
        return Check(name, PASS, "a standalone VAE: static checks and the VAE round trip",
                     "vae")
    if rep.arch in STATIC_ARCHS:
        return _static_arch_check(model, reference)
    allowed = ("checkpoint", "unet") if reference is not None else ("checkpoint",)
    if model.kind not in allowed:
        hint = (" (a UNet-only file is verified with --reference, the checkpoint its VAE "
                "and text encoders come from)" if model.kind == "unet" else "")
        what = ("a file of unknown kind" if model.kind == "unknown"
                else with_article(model.kind))
        return Check(name, FAIL, f"{model.name} is {what}, not a checkpoint{hint}",
                     model.kind)
    if rep.arch not in RENDER_ARCHS:
        return Check(name, FAIL, f"{model.name}: architecture {rep.arch!r} is not one verify "
                     f"knows (SD1, SD2, SDXL, SDXL refiner)", rep.arch)
    value = rep.arch + (f" ({rep.variant})" if rep.variant else "")
    if reference is not None:
        ref = reference.report
        if (ref.arch, ref.variant) != (rep.arch, rep.variant):
            theirs = ref.arch + (f" ({ref.variant})" if ref.variant else "")
            return Check(name, FAIL, f"{model.name} is {value}, the reference "
                         f"{reference.name} is {theirs}", value)
    return Check(name, PASS, "; ".join(rep.arch_evidence[:2]), value)


def _static_arch_check(model: ModelUnderTest, reference: ModelUnderTest | None) -> Check:
    """A family verify does not render yet (Flux.1...): a checkpoint or its
    denoiser alone gets the static checks, the per-layer gates and the VAE
    round trip."""
    from modelkit.arch import registry

    rep, name = model.report, "static.architecture"
    label = registry.label(rep.arch)
    if model.kind not in ("checkpoint", "unet"):
        return Check(name, FAIL, f"{model.name} is {with_article(model.kind)}, not a "
                     f"{label} checkpoint or transformer", model.kind)
    if reference is not None and reference.report.arch != rep.arch:
        return Check(name, FAIL, f"{model.name} is {rep.arch}, the reference "
                     f"{reference.name} is {reference.report.arch}", rep.arch)
    return Check(name, PASS, f"{label}: static checks, per-layer gates and the VAE round "
                 "trip (no render)", rep.arch)


def component_checks(model: ModelUnderTest) -> list[Check]:
    """One check per expected component: missing keys or wrong shapes fail,
    unexpected keys warn, an absent component fails."""
    rep = model.report
    wanted = ["unet"] if rep.kind == "unet" else expected_components(rep.arch)
    if model.completed:
        wanted = ["unet"]  # the rest is the reference's
    checks = []
    for comp in wanted:
        name = f"static.keys.{comp}"
        c = rep.components.get(comp)
        if c is None:
            checks.append(Check(name, FAIL, f"no {comp} in the file; verify renders "
                                "complete checkpoints", "absent"))
            continue
        value = {"tensors": c.n_tensors, "missing": c.n_missing,
                 "wrong_shape": c.n_shape_mismatches, "unexpected": c.n_unexpected}
        if c.n_missing or c.n_shape_mismatches:
            parts = []
            if c.n_missing:
                parts.append(f"{c.n_missing} missing: {_names(c.missing, c.n_missing)}")
            if c.n_shape_mismatches:
                parts.append(f"{c.n_shape_mismatches} wrong shape: "
                             f"{_names(c.shape_mismatches, c.n_shape_mismatches)}")
            checks.append(Check(name, FAIL, f"{c.family}: " + "; ".join(parts), value))
        elif c.n_unexpected:
            checks.append(Check(name, WARN, f"{c.family}: {c.n_unexpected} unexpected: "
                                f"{_names(c.unexpected, c.n_unexpected)}", value))
        elif c.complete is None:
            checks.append(Check(name, FAIL, f"{c.family}: layout not recognised", value))
        else:
            checks.append(Check(name, PASS, f"{c.family}, complete", value))
    return checks


def unknown_keys_check(model: ModelUnderTest) -> Check:
    keys = model.report.unknown_keys
    if not keys:
        return Check("static.unknown_keys", PASS, "", 0)
    return Check("static.unknown_keys", WARN, f"keys outside every component (ignored by "
                 f"loaders): {_names(keys)}", len(keys))


def _int8_weights(model: ModelUnderTest) -> set[str]:
    from modelkit.convert.quantize import SCALE_SUFFIX

    if not model.int8:
        return set()
    infos = model.stored.infos
    return {k for k, i in infos.items() if i.dtype == "I8" and k + SCALE_SUFFIX in infos}


def dtype_check(model: ModelUnderTest) -> Check:
    """Component weights are float, modelkit int8 with a scale, or integer
    ``position_ids``."""
    from modelkit.arch.parts import MARKER, SCHEDULE, part_of

    int8 = _int8_weights(model)
    bad = []
    for key, info in model.stored.infos.items():
        if part_of(key) in (MARKER, SCHEDULE) or key in int8:
            continue
        if key.endswith(POSITION_IDS) or key.endswith("num_updates"):
            continue  # integer buffers (position_ids are checked on their own)
        if info.dtype not in FLOAT_DTYPES:
            bad.append(f"{key} ({info.dtype})")
    if bad:
        are = "tensor is not a float weight" if len(bad) == 1 else "tensors are not float weights"
        return Check("static.dtypes", FAIL, f"{len(bad)} {are}: "
                     f"{_names(bad)}", len(bad))
    kinds = sorted({i.dtype for i in model.stored.infos.values()})
    return Check("static.dtypes", PASS, "", kinds)


def _non_finite(t: Any) -> int:
    """NaN/Inf count of one tensor. NaN and Inf propagate through a max of
    absolute values, so a finite chunk costs one fast reduction (about 40x
    faster than a float64 sum on fp16 here); only a bad chunk is counted."""
    import torch

    flat = t.reshape(-1)
    upcast = flat.element_size() == 1  # fp8 has no CPU max kernel
    bad = 0
    for i in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[i:i + CHUNK_ELEMENTS]
        if upcast:
            chunk = chunk.float()
        if chunk.numel() and not bool(torch.isfinite(chunk.abs().amax())):
            bad += int(chunk.numel() - torch.isfinite(chunk).sum())
    return bad


def finite_check(source: Source, progress: ProgressFn = no_progress,
                 cancel: CancelFlag | None = None) -> Check:
    """Count NaN/Inf in every float tensor, one tensor (and 1M elements) at a
    time; fails naming the tensors."""
    keys = [k for k, i in source.infos.items() if i.is_float]
    total = sum(source.infos[k].nbytes for k in keys)
    done = 0
    bad: list[str] = []
    n_bad = 0
    for key in keys:
        check_cancel(cancel)
        n = _non_finite(source.get(key))
        if n:
            bad.append(f"{key} ({n})")
            n_bad += n
        done += source.infos[key].nbytes
        progress(Progress("NaN/Inf scan", done, total, "bytes", key, VERIFY))
    if bad:
        hint = ""
        if any(source.infos[b.rsplit(" (", 1)[0]].dtype == "F16" for b in bad):
            hint = ("; in fp16 storage, Inf is a weight beyond the fp16 range (65504) cast "
                    "without saturation (modelkit quantize saturates)")
        return Check("static.nan_inf", FAIL, f"{n_bad} NaN/Inf values in {len(bad)} "
                     f"tensors: {_names(bad)}{hint}", n_bad)
    return Check("static.nan_inf", PASS, f"{len(keys)} float tensors scanned", 0)


def position_ids_check(source: Source) -> Check:
    """CLIP ``position_ids`` (HF layout), when present, must be exactly
    ``arange(77)``; float storage with exact integers passes."""
    import torch

    name = "static.position_ids"
    found = []
    for prefix, (layout, _) in TE_PREFIXES.items():
        key = prefix + POSITION_IDS
        if layout != "hf" or key not in source.infos:
            continue
        t = source.get(key).reshape(-1)
        expected = torch.arange(CLIP_CONTEXT, dtype=torch.float64)
        if t.numel() != CLIP_CONTEXT:
            return Check(name, FAIL, f"{key} has {t.numel()} entries, not {CLIP_CONTEXT}; "
                         "'modelkit prune' rewrites them as 0..76", t.numel())
        off = (t.to(torch.float64) - expected).abs()
        if bool((off > 0).any()):
            return Check(name, FAIL, f"{key} is not 0..76 ({int((off > 0).sum())} positions "
                         f"off, by up to {float(off.max()):g}): broken CLIP position ids "
                         "(a known merge bug); 'modelkit prune' rewrites them", float(off.max()))
        found.append(key + ("" if not t.is_floating_point() else " (stored as float)"))
    if not found:
        return Check(name, PASS, "absent (loaders rebuild them)", "absent")
    return Check(name, PASS, "; ".join(found), "0..76")


def _compare_dict(rep: CompareReport, a: str, b: str) -> dict[str, Any]:
    """The report's dict with file names (not paths) for the two models."""
    d = rep.to_dict()
    d["a"], d["b"] = a, b
    return d


def change_report(model: ModelUnderTest, reference: ModelUnderTest,
                  progress: ProgressFn = no_progress,
                  cancel: CancelFlag | None = None) -> dict[str, Any]:
    """How far each component and block of ``model`` moved from the
    reference (both read as float32), as :meth:`CompareReport.to_dict` with
    file names for ``a`` (reference) and ``b`` (model)."""
    from modelkit.inspect.compare import compare_models

    rep = compare_models(float32_view(reference.render_source),
                         float32_view(model.render_source), arch=model.report.arch,
                         progress=progress, cancel=cancel)
    return _compare_dict(rep, reference.name, model.name)


def change_check(change: dict[str, Any], operation: str) -> Check:
    """The change report as a check: shape mismatches fail; a lossless
    rewrite must change nothing and a LoRA bake must change something;
    otherwise it is reported (``info``)."""
    overall = change["overall"]
    comps = ", ".join(f"{k} {v['relative_l2']:.3g}" for k, v in change["components"].items())
    n, same = overall["n_tensors"], overall["n_unchanged"]
    msg = f"{same}/{n} tensors unchanged; relative L2 {comps}"
    value = overall["relative_l2"]
    if change["n_mismatched"]:
        n_bad = change["n_mismatched"]
        return Check("static.change", FAIL, f"{plural(n_bad, 'tensor')} "
                     f"differ{'s' if n_bad == 1 else ''} in "
                     f"shape from the reference: {_names(change['mismatched'])}", value)
    if operation == "lossless":
        if same == n:
            return Check("static.change", PASS, msg, value)
        return Check("static.change", FAIL, f"a lossless rewrite changed {n - same} "
                     f"tensors; {msg}", value)
    if operation == "lora_bake" and same == n:
        return Check("static.change", FAIL, "the bake changed no tensor: the LoRA was not "
                     "applied", value)
    return Check("static.change", INFO, msg, value)


def skipped(name: str, why: str) -> Check:
    return Check(name, SKIP, why)

