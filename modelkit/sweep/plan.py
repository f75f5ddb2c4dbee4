"""Plan every cell before any worker starts.

Each cell's recipe is validated and planned from headers with
``run(..., dry_run=True)`` (on the CPU: planning reads no tensor). A bad
value (a field the recipe checker refuses, a missing file, mismatched
architectures) stops the whole sweep with one line naming its axis and
value. An input that exists but cannot be read (truncated, not a model)
fails only the cells that use it: they become rows with their error and
the other cells run.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelkit.errors import BadFileError, CancelFlag, ModelkitError, check_cancel
from modelkit.progress import PLAN, Progress, ProgressFn, no_progress
from modelkit.sweep.spec import Axis, Cell, SweepError, SweepSpec

MIB = 1 << 20
WORKER_OVERHEAD = 512 * MIB  # a worker process with torch imported, beside the plan's peak


@dataclass
class CellPlan:
    """A planned cell: its recipe (YAML with absolute paths, as workers
    parse it), output path, the dry run's memory and size figures, and the
    error that fails it before it runs (an unreadable input), if any."""

    cell: Cell
    recipe_yaml: str
    output: Path
    peak_estimate_bytes: int = 0
    output_bytes: int = 0
    error: str | None = None

    @property
    def memory_bytes(self) -> int:
        """What a worker needs for this cell (a scheduler's memory request):
        the planned peak plus a worker's own footprint."""
        return self.peak_estimate_bytes + WORKER_OVERHEAD


def _recipe_yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def _problem(exc: ModelkitError, axis: Axis | None) -> str:
    path = getattr(exc, "path", ())
    text = str(exc)
    if path and (axis is None or tuple(path) != axis.path):
        text = f"{'.'.join(path)}: {text}"
    return text


def _blame(spec: SweepSpec, cell: Cell, exc: ModelkitError) -> Axis | None:
    """The axis whose value the error is about, when it can be told."""
    path = tuple(getattr(exc, "path", ()) or ())
    for axis in spec.axes:
        n = min(len(path), len(axis.path))
        if len(path) >= 2 and path[:n] == axis.path[:n]:
            return axis
    text = str(exc)
    for axis in spec.axes:
        value = cell.values[axis.key]
        if axis.is_file:
            file = value.get("path") if isinstance(value, dict) else value
            if isinstance(file, str) and Path(file).name in text:
                return axis
    return spec.axes[0] if len(spec.axes) == 1 else None


def cell_error(spec: SweepSpec, cell: Cell, exc: ModelkitError) -> SweepError:
    """One line naming the axis and value (or the cell) and the problem."""
    axis = _blame(spec, cell, exc)
    if axis is not None:
        where = f"axes.{axis.key}: value {cell.labels[axis.name]!r} (cell {cell.index})"
    else:
        where = f"cell {cell.index} ({cell.describe()})"
    return SweepError(f"{spec.source}: {where}: {_problem(exc, axis)}")


def _check_files(spec: SweepSpec, cell: Cell) -> None:
    """Missing input files are bad values (the whole sweep stops); files
    that exist but are broken fail their cells only (see the module doc)."""
    files = [(("inputs", name), entry.get("path")) for name, entry in
             cell.recipe["inputs"].items()]
    if cell.recipe["options"].get("vae"):
        files.append((("options", "vae"), cell.recipe["options"]["vae"]))
    for path, file in files:
        if isinstance(file, str) and not os.path.exists(file):
            from modelkit.core.recipe import RecipeError

            raise cell_error(spec, cell, RecipeError(f"{file}: no such file", path))


def plan_cell(spec: SweepSpec, cell: Cell, out_dir: Path, device: str | None = None
              ) -> CellPlan:
    """Validate and dry-run one cell (see the module docstring)."""
    from modelkit.core.recipe import COMMAND_LINE, RecipeError, parse_recipe
    from modelkit.engine.runner import run

    recipe_dict = copy.deepcopy(cell.recipe)
    if device is not None:
        recipe_dict["options"]["device"] = device
    text = _recipe_yaml(recipe_dict)
    output = out_dir / f"{cell.name}{spec.suffix}"
    plan = CellPlan(cell, text, output)
    _check_files(spec, cell)
    try:
        recipe = parse_recipe(text, COMMAND_LINE, spec.base_dir)
    except RecipeError as exc:
        raise cell_error(spec, cell, exc) from None
    # planning reads headers only: the driver need not have the cells' GPU
    on_cpu = copy.copy(recipe)
    on_cpu.options = replace(recipe.options, device="cpu")
    try:
        report = run(on_cpu, output=output, dry_run=True, overwrite=True)
    except BadFileError as exc:
        plan.error = " ".join(str(exc).split())
        return plan
    except ModelkitError as exc:
        raise cell_error(spec, cell, exc) from None
    plan.peak_estimate_bytes = report.peak_estimate_bytes
    plan.output_bytes = report.output_bytes
    return plan


def plan_sweep(spec: SweepSpec, out_dir: str | os.PathLike[str], *, device: str | None = None,
               progress: ProgressFn = no_progress, cancel: CancelFlag | None = None
               ) -> list[CellPlan]:
    """Plan every cell of ``spec`` (outputs under ``out_dir``).

    Raises:
        SweepError: the first bad value, naming its axis and value.
        Cancelled: ``cancel`` was set.
    """
    cells = spec.cells()
    plans = []
    for i, cell in enumerate(cells, 1):
        check_cancel(cancel)
        plans.append(plan_cell(spec, cell, Path(out_dir), device))
        progress(Progress("plan cells", i, len(cells), "cells", cell.name, PLAN,
                          i / len(cells)))
    return plans
