"""Sweep files: a base recipe and axes of values, expanded into cells.

See :mod:`modelkit.sweep` for the YAML form. Parsing checks the sweep file
itself (fields, axis paths, value lists, zip lengths) and the base recipe;
:mod:`modelkit.sweep.plan` then validates and plans every cell.

Each cell is the base recipe in its canonical form (``Recipe.to_dict()``)
with every path made absolute (a cell runs in another process, perhaps on
another node with the same shared folders) and its axis values set.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.core.recipe import (
    COMMAND_LINE,
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
    read_yaml_text,
    yaml_errors,
)
from modelkit.errors import ModelkitError
from modelkit.io.formats import FORMATS, MODEL_SUFFIXES
from modelkit.jsontypes import JSONDict

SWEEP_VERSION = 1
MODES = ("product", "zip")
TOP_FIELDS = ("version", "recipe", "axes", "mode", "verify")
AXIS_ROOTS = ("inputs", "steps", "output", "options")
FORBIDDEN_AXES = (("output", "path"), ("output", "format"))
MAX_VALUES = 1000
MAX_CELLS = 10_000
MAX_SWEEP_BYTES = 1_000_000
LABEL_CHARS = 40
VERIFY_PATH_FIELDS = ("tokenizer", "library")
# output format -> the suffix of a cell's file, from the format table
SUFFIXES = {name: f.suffix for name, f in FORMATS.items() if f.writer}


class SweepError(ModelkitError):
    """A sweep file, or one of its cells, that cannot run (exit code 2)."""


@dataclass(frozen=True)
class Axis:
    """One axis: a recipe field path and the values it takes."""

    path: tuple[str, ...]
    values: tuple[Any, ...]
    name: str  # the column name: the last path part, or the whole path when ambiguous

    @property
    def key(self) -> str:
        """The field path as written (``steps.mix.params.alpha``)."""
        return ".".join(self.path)

    @property
    def is_file(self) -> bool:
        """Whether the values are file paths (an input or the VAE)."""
        return self.path[0] == "inputs" or self.path == ("options", "vae")


@dataclass
class Cell:
    """One point of the grid: ``values`` by axis key, the cell's recipe in
    canonical dict form (absolute paths), and its file name stem."""

    index: int
    values: dict[str, Any]
    labels: dict[str, str]
    recipe: dict[str, Any]
    name: str

    def describe(self) -> str:
        """``alpha=0.4, b=anime``: the cell's values for messages."""
        return ", ".join(f"{k}={v}" for k, v in self.labels.items())


@dataclass
class SweepSpec:
    """A parsed sweep file (see the module docstring)."""

    source: str
    base: dict[str, Any]  # the base recipe, canonical, absolute paths, no output path
    axes: list[Axis]
    mode: str = "product"
    verify: dict[str, Any] | None = None  # applied to every cell's output
    base_dir: Path = field(default_factory=Path.cwd)
    suffix: str = ".safetensors"

    @property
    def n_cells(self) -> int:
        """How many cells the axes make."""
        if self.mode == "zip":
            return len(self.axes[0].values)
        n = 1
        for axis in self.axes:
            n *= len(axis.values)
        return n

    def cells(self) -> list[Cell]:
        """Every cell, in order (the last axis varies fastest)."""
        if self.mode == "zip":
            combos: Any = zip(*(a.values for a in self.axes), strict=True)
        else:
            combos = itertools.product(*(a.values for a in self.axes))
        cells = []
        width = max(2, len(str(self.n_cells - 1)))
        for i, combo in enumerate(combos):
            recipe = copy.deepcopy(self.base)
            values, labels = {}, {}
            for axis, value in zip(self.axes, combo, strict=True):
                set_field(recipe, axis, value, self.base_dir)
                values[axis.key] = value
                labels[axis.name] = value_label(axis, value)
            slug = "_".join(f"{k}-{v}" for k, v in labels.items())
            name = f"cell{i:0{width}d}_{_safe_name(slug)}"
            cells.append(Cell(i, values, labels, recipe, name))
        return cells

    def to_dict(self) -> JSONDict:
        """The sweep as plain data (for reports)."""
        return {"source": self.source, "mode": self.mode, "n_cells": self.n_cells,
                "axes": [{"path": a.key, "name": a.name, "values": list(a.values)}
                         for a in self.axes],
                "verify": self.verify}


def _safe_name(text: str, limit: int = 60) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return safe[:limit] or "cell"


def value_label(axis: Axis, value: Any) -> str:
    """A short text for a value: a file's stem, a preset's name, a number."""
    if axis.is_file:
        path = value.get("path") if isinstance(value, dict) else value
        text = Path(str(path)).name
        for suffix in MODEL_SUFFIXES:
            text = text.removesuffix(suffix)
    elif isinstance(value, dict) and "preset" in value:
        text = str(value["preset"])
    elif isinstance(value, dict) and "blocks" in value:
        blocks = value["blocks"]
        text = "blocks:" + (",".join(f"{b:g}" if isinstance(b, float) else str(b)
                                     for b in blocks) if isinstance(blocks, list)
                            else str(blocks))
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."


def _absolute(path: Any, base_dir: Path) -> Any:
    if not isinstance(path, str):
        return path  # validation names the field
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else Path(os.path.normpath(base_dir / p)))


def set_field(recipe: dict[str, Any], axis: Axis, value: Any, base_dir: Path) -> None:
    """Set ``axis``'s field of a canonical recipe dict to ``value`` (file
    paths made absolute against ``base_dir``; a new input path drops the
    old pinned sha256)."""
    value = copy.deepcopy(value)
    path = axis.path
    if path[0] == "inputs" and len(path) == 2:
        value = ({"path": _absolute(value, base_dir)} if not isinstance(value, dict)
                 else {**value, "path": _absolute(value.get("path"), base_dir)})
    elif path[0] == "inputs" and path[2:] == ("path",):
        recipe["inputs"][path[1]].pop("sha256", None)
        value = _absolute(value, base_dir)
    elif path == ("options", "vae") and value is not None:
        value = _absolute(value, base_dir)
    node = recipe
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


# --- parsing ------------------------------------------------------------------------


def _fail(source: str, where: str, problem: str) -> SweepError:
    return SweepError(f"{source}: {where}: {problem}")


def _locate(text: str) -> dict[str, Any]:
    """The YAML nodes of the top-level fields (for line numbers and the
    inline recipe's text)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): v for k, v in node.value}


def _load_text(text: str, source: str) -> dict[str, Any]:
    import yaml

    if len(text) > MAX_SWEEP_BYTES:
        raise SweepError(f"{source}: {len(text)} bytes; a sweep file has at most "
                         f"{MAX_SWEEP_BYTES}")
    with yaml_errors(source, SweepError):
        raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: expected a mapping with recipe: and axes:")
    for key in raw:
        if key not in TOP_FIELDS:
            raise _fail(source, str(key)[:60], f"unknown field; allowed: "
                                               f"{', '.join(TOP_FIELDS)}")
    if raw.get("version", SWEEP_VERSION) != SWEEP_VERSION:
        raise _fail(source, "version", f"unsupported sweep version "
                                       f"{str(raw.get('version'))[:20]!r}; this modelkit "
                                       f"reads version {SWEEP_VERSION}")
    return raw


def _inline_text(text: str, node: Any) -> str:
    """The inline recipe's own lines, blanked around so that the recipe
    parser's line numbers are the sweep file's."""
    lines = text.splitlines()
    start, end = node.start_mark, node.end_mark
    out = [""] * start.line
    for i in range(start.line, min(end.line + 1, len(lines))):
        line = lines[i]
        if i == start.line:
            line = " " * start.column + line[start.column:]
        if i == end.line:
            line = line[:end.column]
        out.append(line)
    return "\n".join(out) + "\n"


def _base_recipe(raw: dict[str, Any], text: str, source: str, base_dir: Path) -> Recipe:
    value = raw.get("recipe")
    if isinstance(value, str):
        path = Path(_absolute(value, base_dir))
        return load_recipe(path)
    if isinstance(value, dict):
        node = _locate(text).get("recipe")
        inline = _inline_text(text, node) if node is not None else None
        if inline is None:
            import yaml

            inline = yaml.safe_dump(value, sort_keys=False)
        return parse_recipe(inline, f"{source} (recipe)", base_dir)
    raise _fail(source, "recipe", "give a recipe file path or an inline recipe mapping")


def _recipe_absolute(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a dict with absolute input paths and no output path."""
    d = recipe.to_dict()
    for name, spec in d["inputs"].items():
        spec["path"] = str(recipe.resolve(recipe.inputs[name].path))
    if recipe.options.vae:
        d["options"]["vae"] = str(recipe.resolve(recipe.options.vae))
    d["output"]["path"] = None
    return d


def _canonical(recipe: Recipe) -> dict[str, Any]:
    """The base recipe of a sweep: :func:`_recipe_absolute`, without its verify:
    section (a sweep's own applies to every cell)."""
    d = _recipe_absolute(recipe)
    d.pop("verify", None)
    return d


def _check_axis_path(source: str, key: Any, base: dict[str, Any]) -> tuple[str, ...]:
    where = f"axes.{str(key)[:80]}"
    if not isinstance(key, str) or not key:
        raise _fail(source, "axes", f"{str(key)[:60]!r} is not a field path such as "
                                    "steps.mix.params.alpha")
    path = tuple(key.split("."))
    if path[0] not in AXIS_ROOTS:
        raise _fail(source, where, f"a field path starts with one of "
                                   f"{', '.join(AXIS_ROOTS)}")
    if path in FORBIDDEN_AXES or len(path) < 2:
        raise _fail(source, where, "the sweep names each cell's output; sweep another field"
                    if path in FORBIDDEN_AXES else "name a field inside it, e.g. inputs.b")
    node: Any = base
    for depth, part in enumerate(path[:-1]):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none"
            at = ".".join(path[:depth + 1])
            raise _fail(source, where, f"the base recipe has no {at!r} (known there: "
                                       f"{known})")
        node = node[part]
    if not isinstance(node, dict):
        raise _fail(source, where, f"{'.'.join(path[:-1])!r} is not a mapping")
    if path[0] in ("inputs", "steps") and path[1] not in base[path[0]]:
        kind = "input" if path[0] == "inputs" else "step"
        raise _fail(source, where, f"the base recipe has no {kind} {path[1]!r}; known: "
                                   f"{', '.join(base[path[0]])}")
    return path


def _axes(source: str, raw: Any, base: dict[str, Any], mode: str) -> list[Axis]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(source, "axes", "a mapping from recipe field paths to lists of values, "
                                    "e.g. steps.mix.params.alpha: [0.25, 0.5]")
    parsed = []
    for key, values in raw.items():
        path = _check_axis_path(source, key, base)
        if not isinstance(values, list) or not values:
            raise _fail(source, f"axes.{key}", "give a non-empty list of values")
        if len(values) > MAX_VALUES:
            raise _fail(source, f"axes.{key}", f"{len(values)} values; at most {MAX_VALUES}")
        parsed.append((path, tuple(values)))
    lasts = [p[-1] for p, _ in parsed]
    axes = [Axis(p, v, p[-1] if lasts.count(p[-1]) == 1 else ".".join(p)) for p, v in parsed]
    if mode == "zip" and len({len(a.values) for a in axes}) > 1:
        lengths = ", ".join(f"{a.key}: {len(a.values)}" for a in axes)
        raise _fail(source, "mode", f"zip pairs the axes' values, so every axis needs as "
                                    f"many values ({lengths})")
    return axes


def _verify_section(source: str, raw: Any, base: Recipe, base_dir: Path
                    ) -> dict[str, Any] | None:
    """The base recipe's verify: section updated by the sweep's (paths
    absolute), or None when neither asks for verification."""
    section: dict[str, Any] | None = None
    if base.verify is not None:
        section = {k: (_absolute(v, base.base_dir) if k in VERIFY_PATH_FIELDS else v)
                   for k, v in base.verify.items()}
    if raw is None or raw is False:
        return section
    if raw is True:
        return section or {}
    if not isinstance(raw, dict):
        raise _fail(source, "verify", "a mapping of verify settings (or true)")
    own = {k: (_absolute(v, base_dir) if k in VERIFY_PATH_FIELDS else v)
           for k, v in raw.items()}
    section = {**(section or {}), **own}
    # the recipe checker knows the verify fields: reuse it on a stand-in recipe
    probe = copy.copy(base)
    probe.verify = section
    probe.source = COMMAND_LINE
    from modelkit.core.recipe import validate

    try:
        validate(probe)
    except RecipeError as exc:
        where = ".".join(exc.path) or "verify"
        raise _fail(source, where, str(exc)) from None
    from modelkit.engine.verification import settings_from

    try:  # values the recipe checker does not look into (size, preset, thresholds...)
        settings_from(section, "cpu")
    except (ModelkitError, TypeError) as exc:
        raise _fail(source, "verify", " ".join(str(exc).split())) from None
    return section


def parse_sweep(text: str, source: str = "<sweep>", base_dir: Path | None = None
                ) -> SweepSpec:
    """Parse and check a sweep file's text (see :mod:`modelkit.sweep`).

    Raises:
        SweepError: a bad field, axis path, value list or zip length.
        RecipeError: the base recipe is invalid (its own file and line).
    """
    base_dir = (base_dir or Path.cwd()).absolute()
    raw = _load_text(text, source)
    mode = raw.get("mode", "product")
    if mode not in MODES:
        raise _fail(source, "mode", f"{str(mode)[:20]!r} is not one of {', '.join(MODES)}")
    recipe = _base_recipe(raw, text, source, base_dir)
    base = _canonical(recipe)
    axes = _axes(source, raw.get("axes"), base, mode)
    verify = _verify_section(source, raw.get("verify"), recipe, base_dir)
    spec = SweepSpec(source, base, axes, mode, verify, base_dir)
    if spec.n_cells > MAX_CELLS:
        raise _fail(source, "axes", f"{spec.n_cells} cells; a sweep has at most {MAX_CELLS}")
    fmt = recipe.output_format or (Path(recipe.output_path).suffix.lstrip(".").lower()
                                   if recipe.output_path else "safetensors")
    spec.suffix = SUFFIXES.get(fmt, ".safetensors")
    return spec


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep file; relative paths in it (the base recipe,
    input files in axes) are relative to its folder."""
    p = Path(path)
    text = read_yaml_text(p, "sweep", MAX_SWEEP_BYTES, SweepError)
    return parse_sweep(text, str(p), p.absolute().parent)


# --- sweeps built in code (the TUI's Act form) ----------------------------------------

AXIS_SEPARATOR = re.compile(r"[;\n]")
OUTPUT_SHORT_NAMES = ("dtype",)  # bare names meaning output.<name>


def _axis_key(name: str, recipe: Recipe, source: str) -> str:
    """A bare name's field path: an input (``b`` -> ``inputs.b``), an
    output field (``dtype``), else a parameter of the recipe's only step
    (``alpha`` -> ``steps.merge.params.alpha``). A dotted path is kept."""
    if "." in name:
        return name
    if name in recipe.inputs:
        return f"inputs.{name}"
    if name in OUTPUT_SHORT_NAMES:
        return f"output.{name}"
    if len(recipe.steps) == 1:
        return f"steps.{next(iter(recipe.steps))}.params.{name}"
    raise SweepError(f"{source}: {name[:60]!r}: the recipe has several steps; write the "
                     f"field path, e.g. steps.{next(iter(recipe.steps))}.params.{name[:60]}")


def _param_of(key: str, recipe: Recipe) -> Any:
    """The declaration of the parameter field ``key`` names
    (``steps.NAME.params.PARAM``), or None for another field."""
    from modelkit.core.registry import all_transforms

    path = key.split(".")
    if len(path) != 4 or path[0] != "steps" or path[2] != "params" \
            or path[1] not in recipe.steps:
        return None
    t = all_transforms().get(recipe.steps[path[1]].transform)
    return t.params.get(path[3]) if t is not None else None


def _value(item: Any, param: Any) -> Any:
    """A value YAML left as text (``1e-3``, ``on`` quoted...) read by the
    registry's one parser for ``param``'s text (None: a number when it reads
    as one)."""
    from modelkit.core.registry import parse_text

    if isinstance(item, str) and item.strip():
        return parse_text(param, item)
    return item


def parse_axes(text: str, recipe: Recipe, source: str = "axes") -> dict[str, list[Any]]:
    """Axes written as a form takes them: ``NAME = V1, V2`` parts separated
    by ``;`` or new lines, e.g. ``alpha = 0.3, 0.5; b = x.safetensors,
    y.safetensors``. NAME is a field path or a bare name (see
    :func:`_axis_key`); the values are a YAML flow list without its
    brackets (``{preset: in_only}, [0, 0.5, 1], 0.3`` holds three).

    Raises:
        SweepError: a part that is not ``NAME = values``, naming it.
    """
    import yaml

    axes: dict[str, list[Any]] = {}
    for part in (p.strip() for p in AXIS_SEPARATOR.split(text)):
        if not part:
            continue
        name, eq, values = (s.strip() for s in part.partition("="))
        if not eq or not name or not values:
            raise SweepError(f"{source}: {part[:60]!r}: write NAME = VALUE, VALUE "
                             "(e.g. alpha = 0.3, 0.5)")
        try:
            parsed = yaml.safe_load(f"[{values}]")
        except yaml.YAMLError as exc:
            raise SweepError(f"{source}: {name[:60]}: values not readable "
                             f"({getattr(exc, 'problem', None) or 'YAML'}); separate them "
                             "with commas") from None
        except ValueError:  # an integer past Python's digit limit
            raise SweepError(f"{source}: {name[:60]}: a value has too many digits") from None
        if not isinstance(parsed, list) or not parsed:  # "[]" or a stray bracket
            raise SweepError(f"{source}: {name[:60]}: give one or more values")
        key = _axis_key(name, recipe, source)
        if key in axes:
            raise SweepError(f"{source}: {name[:60]}: given twice")
        param = _param_of(key, recipe)
        axes[key] = [_value(v, param) for v in parsed]
    if not axes:
        raise SweepError(f"{source}: give the axes to sweep, e.g. alpha = 0.3, 0.5")
    return axes


def sweep_from_recipe(recipe: Recipe, axes: dict[str, list[Any]], *, mode: str = "product",
                      source: str = "sweep", base_dir: Path | None = None) -> SweepSpec:
    """A sweep over a recipe built in code (its ``verify:`` section applies
    to every cell), checked as a sweep file is; relative file values in
    ``axes`` are relative to ``base_dir`` (default: the recipe's folder).

    Raises:
        SweepError: a bad axis path, value list or zip length.
    """
    import yaml

    text = yaml.safe_dump({"version": SWEEP_VERSION, "recipe": _recipe_absolute(recipe),
                           "axes": axes, "mode": mode}, sort_keys=False)
    return parse_sweep(text, source, base_dir or recipe.base_dir)
