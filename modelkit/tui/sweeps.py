"""What the Act form's sweep builds and the sweep screen shows, without any
widget: the sweep (a sweep file, or the form's recipe over axes typed in a
field), its folder, and the results table's cells and file lines as text.

Plain Python plus ``rich`` text (no textual import), tested directly; the
sweep itself is :mod:`modelkit.sweep`'s (validation, planning, running,
``sweep.jsonl``, tables, contact sheet).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.text import Text

from modelkit.core.registry import Transform
from modelkit.errors import ModelkitError
from modelkit.sweep.spec import SweepSpec
from modelkit.textsafe import safe_text, shown
from modelkit.tui.recipes import ActSpec, build_recipe, free_path

SWEEP_FILE_SUFFIXES = (".yaml", ".yml")
FORM_SOURCE = "act form"  # names the form's sweep in messages and titles
ERROR_CHARS = 24  # of an error in the table; the highlighted row shows it whole
JOB_CHOICES = (1, 2, 3, 4, 6, 8)  # 1: one cell after another, in the TUI's process
STATUS_STYLES = {"ok": "green", "failed": "bold red", "cancelled": "yellow",
                 "not run": "dim", "pending": "dim"}


def axes_placeholder(t: Transform | None) -> str:
    """The sweep field's hint for transform ``t``: its first numeric
    parameter swept over two values."""
    names = [p.name for p in (t.params.values() if t else ()) if p.kind in ("float", "int")
             or p.blockwise]
    example = f"{names[0]} = 0.3, 0.5" if names else "NAME = VALUE, VALUE"
    return f"axes, e.g. {example}; or a sweep .yaml file"


def _beside(text: str, first_input: str) -> Path:
    """A path from a form field; a relative one is beside the first input."""
    p = Path(os.path.expanduser(text.strip()))
    return p if p.is_absolute() else Path(first_input).parent / p


def is_sweep_file(text: str) -> bool:
    """Whether the sweep field names a sweep file rather than axes."""
    return text.strip().lower().endswith(SWEEP_FILE_SUFFIXES) and "=" not in text


def sweep_spec(act: ActSpec, text: str, verify: str = "off") -> SweepSpec:
    """The sweep the form asks for: the sweep file ``text`` names (relative
    to the first input's folder), or the form's recipe (with its ``verify``
    choice) over the axes in ``text`` (``alpha = 0.3, 0.5; b = x.safetensors,
    y.safetensors``: see :func:`modelkit.sweep.spec.parse_axes`).

    Raises:
        ModelkitError: the field is empty, the file or an axis is bad (the
            one line the CLI prints).
    """
    from modelkit.sweep.spec import load_sweep, parse_axes, sweep_from_recipe

    if not text.strip():
        raise ModelkitError("sweep: give axes, e.g. alpha = 0.3, 0.5 (or a sweep .yaml file)")
    folder = Path(act.paths[0]).parent
    if is_sweep_file(text):
        return load_sweep(_beside(text, act.paths[0]))
    if not act.output.strip():  # each cell names its own output
        act = replace(act, output="sweep.safetensors")
    recipe = build_recipe(act, verify)
    return sweep_from_recipe(recipe, parse_axes(text, recipe, FORM_SOURCE),
                             source=FORM_SOURCE, base_dir=folder)


def default_sweep_dir(act: ActSpec, root: str | None = None) -> Path:
    """A folder named after the inputs and the method
    (``a-b-weighted_sum-sweep``) that does not exist yet, in the library's
    ``sweeps/`` folder, where no UI looks for models: beside the A1111 or
    ComfyUI ``models`` folder the first input is in, or in the scanned
    folder ``root`` of a plain library (the first input's folder when
    None); see :meth:`modelkit.library.layout.Placement.sweeps_folder`."""
    from modelkit.library.layout import Placer

    first = Path(act.paths[0])
    stems = [Path(p).stem[:40] for p in act.paths]
    name = "-".join([*stems, act.method or act.action, "sweep"])
    folder = Placer().place(first, Path(root) if root else first.parent).sweeps_folder()
    return free_path(folder, name, "")


def sweep_dir(text: str, first_input: str) -> Path:
    """The sweep folder field's path; a relative one is beside the first input."""
    if not text.strip():
        raise ModelkitError("sweep folder: give a folder for the sweep's files")
    return _beside(text, first_input)


# --- the results table ---------------------------------------------------------------


def shown_columns(columns: list[str]) -> list[str]:
    """``table.md``'s columns as an 80-column screen reads them best: the
    error right after the values and metrics, then sha256; no output
    column (the highlighted row's line names its file)."""
    tail = [c for c in ("error", "sha256") if c in columns]
    return [c for c in columns if c not in tail and c != "output"] + tail


def cell_text(column: str, value: Any) -> Text:
    """A table value as the sweep screen shows it: ``table.md``'s text, the
    error cut to :data:`ERROR_CHARS`, the status and verdict coloured."""
    from modelkit.sweep.results import cell_text as md_text

    if column == "error":
        return Text(shown(value, ERROR_CHARS) if value else "-", style="red" if value else "")
    text = safe_text(md_text(column, value))
    if column == "status":
        return Text(text, style=STATUS_STYLES.get(str(value), ""))
    if column == "verdict" and value:
        styles = {"pass": "green", "warn": "yellow", "fail": "red"}  # "reported": plain
        return Text(text.upper(), style=styles.get(value, ""))
    return Text(text)


def row_detail(row: dict[str, Any], axes: list[str]) -> Text:
    """The highlighted row in full: its values, status, and its error whole
    or its output's file name."""
    values = ", ".join(f"{name}={row.get(name)}" for name in axes)
    out = Text(safe_text(f"cell {row['cell']} ({values}): "), style="bold")
    out.append(str(row.get("status", "")), style=STATUS_STYLES.get(str(row.get("status")), ""))
    if row.get("error"):
        out.append(": " + safe_text(row["error"]), style="red")
    elif row.get("output"):
        out.append(": " + safe_text(row["output"]))
    return out


def files_text(report: Any) -> Text:
    """The summary line and where the tables and the contact sheet are."""
    out = Text()
    out.append(safe_text(report.summary()) + "\n",
               style="bold yellow" if report.cancelled else
               "bold red" if report.exit_code else "bold green")
    files = report.files
    out.append(f"table: {safe_text(files.get('table_md'))} (and table.csv, sweep.jsonl)\n")
    sheet = files.get("contact_sheet")
    if sheet:
        out.append(f"contact sheet: {safe_text(sheet)}")
    else:
        out.append("no contact sheet: nothing was rendered (verify after: render and compare)",
                   style="dim")
    return out
