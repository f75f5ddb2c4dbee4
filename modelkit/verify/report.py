"""The verify report: every check with its value, threshold and verdict,
per-image metrics, the render settings, hashes, versions and timings.

:meth:`VerifyReport.to_dict` is the JSON report (schema ``modelkit.verify/1``);
:func:`to_markdown` and :func:`to_junit` render the same data for people and
CI. Paths in the report are file names only (reports are shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from modelkit.core.verify_thresholds import FAIL, INFO, PASS, SKIP, WARN
from modelkit.jsontypes import JSONDict
from modelkit.wording import plural

if TYPE_CHECKING:
    from modelkit.verify.render import Renders

SCHEMA = "modelkit.verify/1"
REPORTED = "reported"  # the outcome of a comparison no threshold judged
GROUPS = ("static", "gate", "vae", "tokenizer", "load", "render", "compare")


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``inf``/``-inf``/``nan``
    (strict JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fmt_value(value: Any) -> str:
    """A short text form of a check value."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return json_safe(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value[:5]) + (" ..." if len(value) > 5 else "")
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt_value(v)}" for k, v in value.items()
                         if not isinstance(v, (list, dict)))
    return "" if value is None else str(value)


@dataclass
class Check:
    """One check: ``name`` is stable (``static.nan_inf``, ``render.prompt_sensitivity``,
    ``compare.psnr``...); ``case`` names the image for per-image checks."""

    name: str
    verdict: str
    message: str = ""
    value: Any = None
    threshold: str | None = None
    case: str | None = None

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def label(self) -> str:
        return f"{self.name}[{self.case}]" if self.case else self.name

    def to_dict(self) -> JSONDict:
        return json_safe({"name": self.name, "case": self.case, "verdict": self.verdict,
                          "value": self.value, "threshold": self.threshold,
                          "message": self.message})


@dataclass
class ImageMetrics:
    """One rendered case: the candidate's statistics and, with a reference,
    its distance to the reference render (and, for a LoRA oracle, the
    oracle's distance to the base without the LoRA)."""

    case: str
    prompt_index: int
    prompt: str
    seed: int
    mean: float
    min_std: float
    latent: float | None = None
    max_abs: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    lora_effect: float | None = None
    seconds: float = 0.0

    def metric(self, name: str) -> float | None:
        return getattr(self, name)

    def to_dict(self) -> JSONDict:
        return json_safe(dict(self.__dict__))


@dataclass
class VerifyReport:
    """What :func:`modelkit.verify.verify` found. ``renders`` holds the
    rendered arrays (for the grid and image files); it is not serialized."""

    model: str
    reference: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)
    hashes: dict[str, dict[str, Any]] = field(default_factory=dict)
    arch: str = "unknown"
    variant: str | None = None
    prediction: str | None = None
    tiny: bool = False
    operation: str | None = None
    operation_reason: str = ""
    checks: list[Check] = field(default_factory=list)
    images: list[ImageMetrics] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    change: dict[str, Any] | None = None
    gates: dict[str, Any] | None = None  # per-layer gates (verify.gates)
    vae: dict[str, Any] | None = None  # the VAE round trip (verify.vae_roundtrip)
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    renders: Renders | None = field(default=None, repr=False)
    probe: list[dict[str, Any]] | None = None  # verify --probe: one row a block

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def by_verdict(self, verdict: str) -> list[Check]:
        return [c for c in self.checks if c.verdict == verdict]

    @property
    def failed(self) -> list[Check]:
        return self.by_verdict(FAIL)

    @property
    def verdict(self) -> str:
        """``fail`` if any check failed, ``warn`` if any warned, else ``pass``."""
        if self.failed:
            return FAIL
        return WARN if self.by_verdict(WARN) else PASS

    @property
    def outcome(self) -> str:
        """The verdict as people are shown it: :data:`REPORTED` instead of
        ``pass`` when the render was compared with a reference but no
        threshold judged the comparison (a merge changes the picture on
        purpose: its metrics are reported, not judged), else :attr:`verdict`."""
        compare = [c for c in self.checks if c.group == "compare"]
        if self.verdict == PASS and compare and all(c.verdict == INFO for c in compare):
            return REPORTED
        return self.verdict

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 otherwise (the CLI's exit code)."""
        return 0 if self.passed else 1

    def summary(self) -> str:
        """One line: the outcome and the failing checks (``REPORTED: ...,
        16 reported`` when nothing judged the comparison)."""
        counts = {v: len(self.by_verdict(v)) for v in (PASS, WARN, FAIL, SKIP, INFO)}
        text = (f"{self.outcome.upper()}: {counts[PASS]} passed, "
                f"{plural(counts[WARN], 'warning')}, {counts[FAIL]} failed, {counts[SKIP]} skipped")
        if counts[INFO]:
            text += f", {counts[INFO]} reported"
        names = list(dict.fromkeys(c.name for c in self.failed))
        if names:
            text += f" ({', '.join(names)})"
        return text

    def to_dict(self) -> JSONDict:
        """The JSON report (schema ``modelkit.verify/1``)."""
        return json_safe({
            "schema": SCHEMA, "verdict": self.verdict, "passed": self.passed,
            "model": self.model, "reference": self.reference, "loras": self.loras,
            "hashes": self.hashes, "arch": self.arch, "variant": self.variant,
            "prediction": self.prediction, "tiny_model": self.tiny,
            "operation": self.operation, "operation_reason": self.operation_reason,
            "checks": [c.to_dict() for c in self.checks],
            "images": [m.to_dict() for m in self.images],
            "settings": self.plan, "tokenizer": self.tokenizer, "change": self.change,
            "gates": self.gates, "vae_round_trip": self.vae,
            "versions": self.versions, "timings": self.timings, "notes": self.notes,
            **({"probe": self.probe} if self.probe is not None else {}),
        })


def _md_cell(text: Any) -> str:
    from modelkit.textsafe import markdown_cell

    return markdown_cell(fmt_value(text))  # prompts, names, messages: escaped


def _md_metric(value: float | None) -> str:
    return "-" if value is None else _md_cell(value)


def to_markdown(report: VerifyReport) -> str:
    """A markdown summary: verdict, settings, a check table, the per-image
    metrics and the change report per component."""
    lines = [f"# modelkit verify: {_md_cell(report.model)}", "",
             f"**{report.outcome.upper()}** - {report.summary()}", ""]
    facts = [("architecture", f"{report.arch}" + (f" ({report.variant})"
                                                   if report.variant else "")),
             ("reference", report.reference or "-"),
             ("operation", f"{report.operation or '-'} {report.operation_reason}".strip())]
    if report.loras:
        facts.append(("runtime LoRAs", ", ".join(f"{d['file']}:{d['weight']:g}"
                                                 for d in report.loras)))
    if report.plan:
        p = report.plan
        facts.append(("settings", f"{p['width']}x{p['height']}, {p['steps']} steps, "
                                  f"{p['scheduler']}, CFG {p['guidance_scale']:g}, "
                                  f"seeds {p['seeds']}, {p['threads']} threads, "
                                  f"{p['device']}"))
    lines += [f"- {k}: {_md_cell(v)}" for k, v in facts]
    lines += ["", "| check | case | value | threshold | verdict | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in report.checks:
        lines.append(f"| {c.name} | {_md_cell(c.case or '')} | {_md_cell(c.value)} | "
                     f"{_md_cell(c.threshold or '')} | {c.verdict.upper()} | "
                     f"{_md_cell(c.message)} |")
    if report.images:
        lines += ["", "| case | seed | latent rel. L2 | max abs | PSNR dB | SSIM | prompt |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in report.images:
            lines.append(f"| {_md_cell(m.case)} | {m.seed} | {_md_metric(m.latent)} | "
                         f"{_md_metric(m.max_abs)} | {_md_metric(m.psnr)} | "
                         f"{_md_metric(m.ssim)} | {_md_cell(m.prompt)} |")
    if report.change:
        lines += ["", "| component | tensors | unchanged | relative L2 |",
                  "| --- | --- | --- | --- |"]
        for name, d in report.change.get("components", {}).items():
            lines.append(f"| {_md_cell(name)} | {d['n_tensors']} | {d['unchanged_share']:.0%} | "
                         f"{_md_cell(d['relative_l2'])} |")
    lines += _md_gates(report.gates)
    lines += _probe_markdown(report)
    return "\n".join(lines) + "\n"


def _md_gates(gates: dict[str, Any] | None, rows: int = 10) -> list[str]:
    """The worst layers of the per-layer gates (all of them are in the JSON)."""
    if not gates or not gates["layers"]:
        return []
    out = ["", f"Per-layer gates ({'judged' if gates['judged'] else 'reported'}: "
           f"{_md_cell(gates['reason'])}); worst layers:", "",
           "| layer | format | SNR dB | cosine | verdict |", "| --- | --- | --- | --- | --- |"]
    for g in gates["layers"][:rows]:
        out.append(f"| {_md_cell(g['key'])} | {g['format']} | {_md_cell(g['snr_db'])} | "
                   f"{_md_cell(g['cosine'])} | {'PASS' if g['passed'] else 'FAIL'} |")
    return out


def _probe_markdown(report: VerifyReport) -> list[str]:
    if not report.probe:
        return []
    lines = ["", "| component | block | kind | params | rel. error | cosine | finite |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report.probe:
        lines.append(f"| {_md_cell(r['component'])} | {_md_cell(r['block'])} | {r['kind']} | "
                     f"{r['params']} | {_md_cell(r['rel_error'])} | {_md_cell(r['cosine'])} | "
                     f"{'yes' if r['finite'] else 'NO'} |")
    return lines


def to_junit(report: VerifyReport) -> str:
    """JUnit XML: one test case per check (warnings pass, with the message
    in ``system-out``; info rows pass)."""
    fails, skips = len(report.failed), len(report.by_verdict(SKIP))
    total = sum(report.timings.values())
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f"<testsuites tests=\"{len(report.checks)}\" failures=\"{fails}\" "
           f"skipped=\"{skips}\" time=\"{total:.3f}\">",
           f"  <testsuite name={quoteattr('modelkit verify ' + report.model)} "
           f"tests=\"{len(report.checks)}\" failures=\"{fails}\" errors=\"0\" "
           f"skipped=\"{skips}\" time=\"{total:.3f}\">"]
    for c in report.checks:
        text = f"value {fmt_value(c.value)}" + (f", threshold {c.threshold}"
                                                 if c.threshold else "")
        if c.message:
            text += f": {c.message}"
        out.append(f"    <testcase classname={quoteattr('verify.' + c.group)} "
                   f"name={quoteattr(c.label)}>")
        if c.verdict == FAIL:
            out.append(f"      <failure message={quoteattr(text)}>{escape(text)}</failure>")
        elif c.verdict == SKIP:
            out.append(f"      <skipped message={quoteattr(text)}/>")
        elif c.verdict in (WARN, INFO):
            out.append(f"      <system-out>{escape(c.verdict.upper() + ': ' + text)}"
                       "</system-out>")
        out.append("    </testcase>")
    out += ["  </testsuite>", "</testsuites>"]
    return "\n".join(out) + "\n"
