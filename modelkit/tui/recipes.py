"""What the Act screen builds and shows, without any widget: which actions
the chosen files allow (from the transform registry), the inputs in the
order a transform takes them, each field's initial text, a
default output name, the recipe, and the dry-run plan or result as text.

Plain Python plus ``rich`` text (no textual import), so it is tested
directly; the registry is loaded by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from modelkit.arch.blocks import weights_title
from modelkit.core.recipe import COMMAND_LINE, Recipe, validate
from modelkit.core.registry import CHECKPOINT, METHOD, MODEL, ROLE_KINDS, Param, Transform
from modelkit.errors import ModelkitError
from modelkit.library.query import Entry
from modelkit.textsafe import safe_text, shown
from modelkit.wording import block_rows, human_bytes, lora_weights

MERGE = "merge"
FIRST = ("lora_bake", "prune", "quantize", "extract")  # listed first, in this order
LAST = ("convert",)  # a plain copy fits every file: listed after the specific ones
UNUSABLE_KINDS = ("broken", "unknown")
STEM_CHARS = 40  # of each input's name in a default output name
VERIFY_CHOICES = (("no", "off"), ("static checks", "static"),
                  ("render and compare", "render"))  # the form's "verify after" select
VERIFY_SECTIONS: dict[str, dict[str, Any] | None] = {  # the recipe's verify: section
    "off": None, "static": {"render": False}, "render": {}}
REPORT_FIELDS = 6  # scalar fields of a step's own report shown in the plan
SHOWN_ABOVE = frozenset({"arch", "n_keys", "n_tensors", "n_merged", "n_copied", "n_skipped",
                         "n_ignored", "peak_estimate_bytes", "warnings", "notes",
                         "block_weights", "adapters", "policy"})


@dataclass(frozen=True)
class ActSpec:
    """What the Act form says: ``action`` (:data:`MERGE` or an operation),
    the merge ``method``, the input ``paths`` in the order the transform
    takes them, parameter values, the merge's output ``dtype`` and the
    output path."""

    action: str
    paths: tuple[str, ...]
    output: str
    params: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    dtype: str = "fp16"

    @property
    def transform(self) -> str:
        """The registered transform the step runs."""
        return self.method if self.action == MERGE else self.action


# --- what the files allow ------------------------------------------------------------


def _fits(entry: Entry, role: str) -> bool:
    kinds = ROLE_KINDS.get(role, ())
    return not kinds or entry.kind in kinds


def arrange(t: Transform, entries: Sequence[Entry]) -> list[Entry] | None:
    """``entries`` in the order ``t`` takes them (a LoRA bake's checkpoint
    first whatever was marked first), or None when they do not fit its
    inputs. A merge keeps the marked order: A, B, C."""
    if not t.accepts(len(entries)):
        return None
    if t.kind == METHOD:
        return list(entries) if all(_fits(e, MODEL) for e in entries) else None
    rest, out = list(entries), []
    for _, role in t.inputs[:-1] if t.variadic else t.inputs:
        pick = next((e for e in rest if _fits(e, role)), None)
        if pick is None:
            return None
        rest.remove(pick)
        out.append(pick)
    if rest and not all(_fits(e, t.inputs[-1][1]) for e in rest):
        return None
    return out + rest


def merge_methods(transforms: Mapping[str, Transform], entries: Sequence[Entry]) -> list[str]:
    """The merge methods that take these files."""
    return [n for n, t in transforms.items()
            if t.kind == METHOD and arrange(t, entries) is not None]


def actions(transforms: Mapping[str, Transform], entries: Sequence[Entry]) -> list[str]:
    """What the Act form offers for ``entries``: :data:`MERGE` when some
    merge method takes them, then every operation whose inputs they fit
    (:data:`FIRST` first, then in registry order, :data:`LAST` last)."""
    ops = [n for n, t in transforms.items()
           if t.kind != METHOD and arrange(t, entries) is not None]
    ops.sort(key=lambda n: FIRST.index(n) if n in FIRST else
             len(FIRST) + 1 if n in LAST else len(FIRST))
    return ([MERGE] if merge_methods(transforms, entries) else []) + ops


def default_method(methods: Sequence[str], n: int) -> str:
    """A1111's usual method for ``n`` models, when offered."""
    for wanted in (("weighted_sum",) if n == 2 else ("add_difference",)):
        if wanted in methods:
            return wanted
    return methods[0]


def inputs_line(t: Transform, ordered: Sequence[Entry]) -> str:
    """Which file is which input: ``A: a  B: b`` for a merge, ``checkpoint:
    a  adapters: l1, l2`` for an operation."""
    if t.kind == METHOD:
        return safe_text("  ".join(f"{chr(ord('A') + i)}: {e.name}"
                                   for i, e in enumerate(ordered)))
    fixed = len(t.inputs) - 1 if t.variadic else len(t.inputs)
    parts = [f"{name}: {e.name}" for (name, _), e in zip(t.inputs, ordered[:fixed],
                                                          strict=False)]
    if t.variadic and ordered[fixed:]:
        parts.append(f"{t.inputs[-1][0]}: {', '.join(e.name for e in ordered[fixed:])}")
    return safe_text("  ".join(parts))


# --- form text to values -------------------------------------------------------------


# --- block weights: what the selected models' family names ---------------------------

# parameters that take a LoRA block-weight spec (LBW: the SD lists have
# presets of their own; a transformer family takes its merge block specs)
LORA_BLOCK_PARAMS = ("blocks",)


@dataclass(frozen=True)
class BlockHints:
    """What a block-wise field offers for the selected models' family
    (``arch``): its presets, groups and block names to complete (the merge
    fields' and the LoRA block-weight fields' lists) and a placeholder."""

    arch: str
    merge: tuple[str, ...]
    lora: tuple[str, ...]
    example: str
    lora_example: str


def block_arch(ordered: Sequence[Entry]) -> str | None:
    """The family whose block list the fields use: the first model (a
    bake's checkpoint, a merge's model A) with a block list, else None."""
    from modelkit.arch.blocks import block_names

    for e in ordered:
        if e.kind in ROLE_KINDS[CHECKPOINT]:
            try:
                block_names(e.arch)
            except (ModelkitError, KeyError):
                continue
            return e.arch
    return None


def block_hints(arch: str | None) -> BlockHints:
    """The presets, groups and block names of ``arch`` (the SD1 lists when
    None: no family with a block list is selected)."""
    from modelkit.arch.blocks import block_names, has_own_map, presets_of
    from modelkit.arch.lora_blocks import PRESET_NAMES

    use = arch or "sd1"
    names = block_names(use)
    presets = list(presets_of(use))
    merge = (*presets, *_groups(use), *names)
    lora = merge if has_own_map(use) else (*PRESET_NAMES, *names)
    spec = f"NAME=VALUE,... ({names[-2]}=0.5,default=1)"
    example = f"a number, a preset (e.g. {presets[3]}) or {spec}"
    lora_example = f"a preset (e.g. {lora[3]}), {spec}" + (
        "" if has_own_map(use) else " or one value per block")
    return BlockHints(use, tuple(dict.fromkeys(merge)), tuple(dict.fromkeys(lora)), example,
                      lora_example)


def _groups(arch: str) -> list[str]:
    from modelkit.arch import registry

    entry = registry.get(arch)
    table = getattr(entry.blocks, "table", None) if entry and entry.spec is None else None
    return [g for g, names in table.groups().items() if names] if table is not None else []


def field_text(p: Param) -> str:
    """What a parameter's text field starts with: its default, else its
    declared suggested value (A1111's alpha), else empty. The field's text
    becomes a value with the registry's one parser (``parse_text``)."""
    value = p.initial
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_output(action: str, paths: Sequence[str], params: Mapping[str, Any],
                   method: str = "") -> Path:
    """Beside the first input, a name saying what was done that no file
    has yet: ``a-b-weighted_sum``, ``a-pruned``, ``a-fp8_e4m3fn``,
    ``a-vae``, ``a-baked``..."""
    stems = [Path(p).stem[:STEM_CHARS] for p in paths]
    if action == MERGE:
        name = "-".join([*stems, method])
    else:
        suffix = {"prune": "pruned", "lora_bake": "baked"}.get(action) or \
            str(params.get("dtype") or params.get("component") or action)
        name = f"{stems[0]}-{suffix}"
    return free_path(Path(paths[0]).parent, name, ".safetensors")


def free_path(folder: Path, name: str, suffix: str) -> Path:
    """``folder/name+suffix``, or ``name-2``, ``name-3``... when taken."""
    out, i = folder / f"{name}{suffix}", 2
    while out.exists():
        out, i = folder / f"{name}-{i}{suffix}", i + 1
    return out


def output_path(text: str, first_input: str) -> Path:
    """The output field's path; a relative one is beside the first input."""
    text = text.strip()
    if not text:
        raise ModelkitError("output: give a file path for the new file")
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else Path(first_input).parent / p


def build_recipe(spec: ActSpec, verify: str = "off") -> Recipe:
    """The validated recipe of ``spec`` (errors name the parameter, as the
    CLI's do); ``verify`` (a :data:`VERIFY_SECTIONS` key) adds the run's
    verify phase."""
    output = output_path(spec.output, spec.paths[0])
    params = {k: v for k, v in spec.params.items() if v is not None}
    if spec.action == MERGE:
        recipe = Recipe.merge(*spec.paths, method=spec.method, output=output,
                              dtype=spec.dtype, source=COMMAND_LINE, **params)
    else:
        recipe = Recipe.op(spec.action, *spec.paths, output=output, source=COMMAND_LINE,
                           **params)
    recipe.verify = VERIFY_SECTIONS[verify]
    return validate(recipe)


# --- the plan and the result ---------------------------------------------------------


def _scalars(report: Any) -> list[tuple[str, Any]]:
    from modelkit.engine.report import jsonable

    d = jsonable(report)
    if not isinstance(d, dict):
        return []
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if key in SHOWN_ABOVE:
            continue
        if isinstance(value, dict | list):
            if value:  # what prune drops, int8 overflows...
                out.append((key, f"{len(value)} entries"))
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            out.append((key, f"{value:.4g}" if isinstance(value, float) else value))
    return out[:REPORT_FIELDS]


def _blocks(out: Text, title: str, weights: Mapping[str, float]) -> None:
    out.append(f"{safe_text(title)} ({weights_title(weights)})\n", style="bold")
    for row in block_rows(weights):
        out.append(row + "\n")


def _block_tables(out: Text, report: Any) -> None:
    for step in report.steps:
        for name, weights in (getattr(step.report, "block_weights", None) or {}).items():
            _blocks(out, f"block weights of {name}", weights)
        for a in getattr(step.report, "adapters", None) or []:
            if getattr(a, "blocks", None):
                _blocks(out, f"LoRA block weights of {a.file}", a.blocks)


def _verdict(out: Text, verify: Any, grid: Path | None) -> None:
    if verify is None:
        return
    style = {"pass": "green", "warn": "yellow", "reported": ""}.get(verify.outcome, "red")
    out.append(f"verify: {shown(verify.summary(), 300)}\n", style=f"bold {style}")
    if grid is not None:
        out.append(f"grid: {safe_text(grid)}\n")
    elif verify.renders is None:
        out.append("no grid: nothing was rendered\n", style="dim")


def plan_text(report: Any, grid: Path | None = None) -> Text:
    """A run report as the Act screen shows it: what is (or would be)
    written, tensor counts, size, memory, each step, block weights, the
    verify verdict and its ``grid`` image, warnings and notes."""
    out = Text()
    verb = "would write" if report.dry_run else "wrote"
    out.append(f"{verb} {safe_text(Path(str(report.output)).name)}", style="bold")
    out.append(f"  ({report.arch}, {report.format})\n")
    if any(step.kind == METHOD for step in report.steps):
        out.append(f"{report.n_tensors} tensors: {report.n_merged} merged, "
                   f"{report.n_copied} copied, {report.n_skipped} skipped")
        out.append(f"; {report.n_ignored} only in B/C ignored\n" if report.n_ignored
                   else "\n")
    else:
        out.append(f"{report.n_tensors} tensors\n")
    out.append(f"output size {human_bytes(report.output_bytes)}")
    memory = [f"{human_bytes(n)} {what}" for n, what in (
        (report.peak_estimate_bytes, "estimated"), (report.peak_measured_bytes, "measured"))
        if n]
    if memory:
        out.append(f"; peak memory {', '.join(memory)} (+ ~200 MB: Python, torch)")
    out.append("\n")
    if not report.dry_run:
        out.append(f"took {report.seconds:.1f}s\n")
    for step in report.steps:
        params = ", ".join(f"{k}={shown(v, 40)}" for k, v in step.params.items()
                           if v is not None and k != "adapters")
        name = step.transform if step.name == step.transform else \
            f"{safe_text(step.name)}: {step.transform}"
        out.append(f"step {name}", style="bold")
        out.append(f" ({params})\n" if params else "\n")
        for key, value in _scalars(step.report):
            out.append(f"  {key} {shown(value, 60)}\n", style="dim")
        for a in getattr(step.report, "adapters", None) or []:
            out.append(f"  adapter {shown(a.file, 60)} ({a.format}, {a.arch}): "
                       f"{lora_weights(a.weight, a.te_weight)}; {a.n_modules} modules, "
                       f"{len(a.unmatched)} unmatched keys\n", style="dim")
    _block_tables(out, report)
    _verdict(out, report.verify, grid)
    for w in report.warnings:
        out.append(f"warning: {shown(w, 300)}\n", style="yellow")
    for n in report.notes:
        out.append(f"note: {shown(n, 300)}\n", style="dim")
    return out
