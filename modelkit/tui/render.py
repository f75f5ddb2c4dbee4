"""Rich text for the detail pane and the compare screen. Every string from a
file goes through :func:`safe` (control characters escaped) and into
``Text`` objects, never into markup, so metadata can neither send terminal
escapes nor restyle the screen."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.table import Table
from rich.text import Text

from modelkit.arch.registry import listed
from modelkit.library import metadata as md
from modelkit.library.check import Hint
from modelkit.library.layout import arch_name
from modelkit.library.query import Detail
from modelkit.textsafe import safe_text
from modelkit.wording import human_bytes, param_count

VALUE_WIDTH = 400  # characters of one metadata value shown before "..."
TAGS_SHOWN = 20


def safe(value: object, limit: int = VALUE_WIDTH) -> str:
    """``value`` escaped and cut to ``limit`` characters."""
    text = safe_text(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _section(out: Text, title: str) -> None:
    if out:
        out.append("\n")
    out.append(title + "\n", style="bold underline")


def _row(out: Text, label: str, value: object, style: str = "") -> None:
    out.append(f"{label:<12} ", style="dim")
    out.append(safe(value) + "\n", style=style)


def _ema_and_prune(detail: Detail) -> str:
    e, rep = detail.entry, detail.report
    extra = rep.get("extra_keys") or {}
    junk = sum(v for k, v in extra.items() if k != "prediction_markers")
    bits = [f"EMA: {e.n_ema} tensors" if e.has_ema else "EMA: none"]
    if junk:
        bits.append(f"{junk} keys prune would drop ({', '.join(sorted(extra))})")
    elif e.kind in ("checkpoint", "unet"):
        bits.append("pruned (no EMA or training leftovers)")
    if (e.dtype or "").upper() == "F32" and e.kind in ("checkpoint", "unet"):
        bits.append("fp32: fp16 halves the size")
    return "; ".join(bits)


def _components(out: Text, components: dict[str, dict[str, Any]]) -> None:
    if not components:
        return
    _section(out, "Components")
    for name, c in components.items():
        status = {True: "complete", False: "INCOMPLETE", None: "not checked"}[c.get("complete")]
        out.append(f"{safe(name):<11}", style="bold")
        out.append(f"{safe(c.get('family', '?'))}, {c.get('n_tensors', 0)} tensors, "
                   f"{param_count(c.get('n_params'))} ")
        out.append(status + "\n", style="red" if c.get("complete") is False else "green")


def _adapter(out: Text, rep: dict[str, Any]) -> None:
    a = rep.get("adapter")
    if not a:
        return
    _section(out, "Adapter")
    _row(out, "format", f"{a.get('format')} ({a.get('naming')} names)")
    _row(out, "modules", f"{a.get('n_modules')} ({a.get('conv_modules', 0)} conv)")
    _row(out, "rank", ", ".join(str(r) for r in a.get("ranks") or []) or "-")
    alphas = a.get("alphas")
    _row(out, "alpha", ", ".join(f"{x:g}" for x in alphas) if alphas else "-")
    _row(out, "touches", ", ".join(a.get("targets") or []) or "-")


def _hints(out: Text, hints: Iterable[Hint]) -> None:
    hints = list(hints)
    if not hints:
        return
    _section(out, "Hints")
    for h in hints:
        out.append(f"{h.severity}: ", style="bold red" if h.severity == "error" else
                   "bold yellow")
        out.append(safe(h.message) + "\n")
        if h.expected:
            out.append("  move to: ", style="dim")
            out.append(safe(h.expected) + "\n")


def info_text(detail: Detail, hints: Iterable[Hint] = ()) -> Text:
    """The Info tab: what the file is, its components, EMA/prune status,
    hashes, hints and Civitai info."""
    e, rep = detail.entry, detail.report
    out = Text()
    out.append(safe(e.name) + "\n", style="bold")
    out.append(safe(e.folder) + "\n", style="dim")
    if e.kind == "broken":
        out.append(safe(e.error or "unreadable") + "\n", style="red")
    _row(out, "kind", e.kind + (f" ({e.variant})" if e.variant else ""))
    evidence = (rep.get("arch_evidence") or [""])[0]
    _row(out, "arch", arch_name(e.arch) + (f"  ({safe(evidence, 90)})" if evidence else ""))
    component = rep.get("component")
    if isinstance(component, dict):
        users = tuple(arch_name(str(a)) for a in component.get("used_by") or [])
        _row(out, "component", safe(str(component.get("label")), 60)
             + (f"  (used by {listed(users)})" if users else ""))
    layout = e.key_layout or rep.get("layout")
    if layout:
        _row(out, "layout", f"{safe(str(layout), 20)} key names")
    pred = rep.get("prediction") or {}
    if e.prediction:
        evidence = (pred.get("evidence") or [""])[0]
        _row(out, "prediction", e.prediction + (f"  ({safe(evidence, 90)})" if evidence else ""))
    _row(out, "size", f"{human_bytes(e.size)}, {e.n_tensors or 0} tensors, "
                      f"{param_count(e.n_params)} params")
    dtypes = rep.get("dtypes") or {}
    _row(out, "dtypes", ", ".join(f"{k} {v}" for k, v in dtypes.items()) or "-")
    _row(out, "EMA / prune", _ema_and_prune(detail))
    _row(out, "placement", f"{e.layout}" + (f", {e.role} folder" if e.role else ""))
    _row(out, "sha256", e.sha256 or "not hashed (press h)")
    if e.addnet:
        _row(out, "tensor hash", e.addnet)
    _hints(out, hints)
    _components(out, detail.components)
    _adapter(out, rep)
    for note in rep.get("notes") or []:
        out.append("note ", style="dim")
        out.append(safe(note) + "\n")
    if detail.civitai:
        _section(out, "Civitai")
        for key in ("model", "version", "type", "base_model"):
            if detail.civitai.get(key):
                _row(out, key.replace("_", " "), detail.civitai[key])
        words = detail.civitai.get("trained_words") or []
        if words:
            _row(out, "trigger words", ", ".join(words))
    return out


def metadata_text(meta: dict[str, str]) -> Text:
    """The Metadata tab: kohya training info with top tags, ModelSpec, the
    merge recipe, then every other field."""
    out = Text()
    training = md.training_info(meta)
    if training:
        _section(out, "Training (kohya ss_*)")
        for label, value in training:
            _row(out, label, value)
    tags = md.top_tags(meta, TAGS_SHOWN)
    if tags:
        _section(out, f"Top tags ({len(tags)})")
        out.append(", ".join(f"{safe(t, 60)} ({n})" for t, n in tags) + "\n")
    spec = md.modelspec(meta)
    if spec:
        _section(out, "ModelSpec")
        for k, v in spec:
            _row(out, k, v)
    merge = md.merge_summary(meta)
    if "modelkit.recipe" in merge:
        _section(out, "Merge recipe (modelkit.recipe)")
        out.append(safe_text(merge["modelkit.recipe"], keep_newlines=True).rstrip() + "\n")
    elif isinstance(merge.get("sd_merge_recipe"), dict):
        _section(out, "Merge recipe (sd_merge_recipe)")
        for k, v in merge["sd_merge_recipe"].items():
            _row(out, k, v)
    other = md.other_metadata(meta)
    if other:
        _section(out, f"Other metadata ({len(other)})")
        for k, v in other:
            out.append(safe(k, 60) + ": ", style="dim")
            out.append(safe(v) + "\n")
    if not out:
        out.append("no metadata in this file\n", style="dim")
    return out


def _bar(value: float, top: float, width: int = 20) -> str:
    filled = 0 if top <= 0 else round(width * min(value / top, 1.0))
    return "█" * filled + "·" * (width - filled)


def compare_tables(report: Any) -> tuple[Table, Table]:
    """Per-component and per-block tables of a :class:`CompareReport`."""
    comps = Table(title="per component", box=None)
    for col in ("component", "tensors", "unchanged", "rel. L2"):
        comps.add_column(col, justify="left" if col == "component" else "right")
    for name, d in report.components.items():
        comps.add_row(name, str(d.n_tensors), f"{100 * d.unchanged_share:.0f}%",
                      f"{d.relative_l2:.4f}")
    comps.add_row("all", str(report.overall.n_tensors),
                  f"{100 * report.overall.unchanged_share:.0f}%",
                  f"{report.overall.relative_l2:.4f}", style="bold")
    blocks = Table(title="per block (rel. L2)", box=None)
    for col in ("block", "rel. L2", ""):
        blocks.add_column(col, justify="right" if col == "rel. L2" else "left")
    top = max((d.relative_l2 for d in report.blocks.values()), default=0.0)
    for name, d in report.blocks.items():
        blocks.add_row(name, f"{d.relative_l2:.4f}", _bar(d.relative_l2, top))
    return comps, blocks
