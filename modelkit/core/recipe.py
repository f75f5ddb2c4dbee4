"""Recipes: what to run, as YAML or as objects built in code, validated the
same way before any tensor is read.

A recipe names its inputs, a DAG of steps (each a registered transform: a
merge method or an operation) and one output::

    version: 1
    inputs:
      base: {path: models/a.safetensors, sha256: 0f1e...}   # sha256 optional (lock pins it)
      style: models/b.safetensors                          # short form
    steps:
      mix:
        method: weighted_sum           # a per-key merge method ('modelkit methods')
        models: [base, style]          # input or step names; order matters (A, B, C)
        params:
          alpha: 0.3                   # a number, or block-wise:
          # alpha: {blocks: "0,0.1,...,1"}  |  {blocks: {IN00-IN05: 0.3, default: 0.5}}
          # alpha: {preset: gradient_in_to_out}
      small:
        op: quantize                   # an operation on whole models: prune, ema,
        models: [mix]                  #   quantize, dequantize, swap, extract, convert
        params: {dtype: fp8_e4m3fn}
    output:
      path: merged.safetensors
      dtype: fp16                      # what merge steps write: fp16 (default), bf16, fp32, keep
      step: small                      # default: the last step
      format: safetensors              # or diffusers (a folder), gguf (UNet); default from the path
      quant: q8_0                      # gguf: q8_0, f16 or bf16
      keep_shapes: false               # gguf: keep conv kernels in their own shape
    verify:                            # optional: render and check the output
      reference: base                  # an input to compare with (default: the
                                       #   primary input; a LoRA bake compares with
                                       #   the base plus the LoRAs applied at render
                                       #   time); none: no reference
      seeds: [1, 2]                    # also prompts, negative_prompt, preset
      steps: 4                         #   (tiny, smoke, standard), size: 256x256,
                                       #   operation, thresholds: {psnr: 30}
    options:
      device: cpu                      # cpu, cuda, auto
      block_map: supermerger           # or mecha
      missing_keys: error              # error, take-first, skip
      include: [unet, vae, te]         # components merged; others copied from A
      exclude_keys: []                 # regexes of keys copied from A unmerged
      vae: null                        # a VAE file to bake in
      seed: 0                          # for seeded methods (DARE)

Inputs may be ``.safetensors`` files, legacy pickles or diffusers folders.
Steps chain key by key: no intermediate file is written.

In code: ``Recipe.merge("a.safetensors", "b.safetensors", alpha=0.3,
output="ab.safetensors").then("prune")``; :func:`validate` checks an object
exactly as :func:`parse_recipe` checks YAML (which adds line numbers).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelkit.errors import ModelkitError
from modelkit.vocab import (
    AUTO_DTYPE,
    BLOCK_MAPS,
    COMPONENTS,
    DEFAULT_BLOCK_MAP,
    DEVICES,
    GGUF_TYPES,
    MERGE_OUTPUT_DTYPES,
    MISSING_KEY_POLICIES,
    OUTPUT_FORMATS,
)
from modelkit.wording import with_article

RECIPE_VERSION = 1
COMMAND_LINE = "command line"  # the source of recipes the CLI builds from options
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
STEP_KEYS = ("method", "op")  # YAML keys naming a step's transform


class RecipeError(ModelkitError):
    """A recipe that cannot run; raised before any tensor is read. ``path``
    is the field it is about (``("steps", "mix", "params", "alpha")``)."""

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class InputSpec:
    """A named input: a path (relative to the recipe's folder) and an
    optional pinned sha256."""

    name: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class BlockParam:
    """A block-wise parameter: ``blocks`` (a list, a comma string or a
    mapping of block names) or a ``preset`` name, resolved against the
    architecture when the recipe is planned."""

    blocks: Any = None
    preset: str | None = None

    def to_yaml(self) -> dict[str, Any]:
        return {"preset": self.preset} if self.preset else {"blocks": self.blocks}


@dataclass(frozen=True)
class StepSpec:
    """A step: ``transform`` (a registered method or operation) applied to
    ``models`` (input or step names) with ``params``. ``kind`` is the YAML
    key that named it (``method`` or ``op``), None when built in code."""

    name: str
    transform: str
    models: tuple[str, ...]
    params: dict[str, Any]
    kind: str | None = None
    # the parameters as the validator checked them (defaults in, values
    # converted): what the planner and the methods use, checked once
    checked: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # a front end's step (the merge command): a required parameter it was not
    # given takes its declared suggested value (A1111's alpha); a recipe file
    # must give every required parameter
    suggest: bool = field(default=False, compare=False, repr=False)

    @property
    def is_method(self) -> bool:
        """Whether the step is a per-key merge method."""
        from modelkit.core.registry import METHOD, get_transform

        return get_transform(self.transform).kind == METHOD

    @property
    def op(self) -> str | None:
        """The operation's name, or None for a merge method."""
        return None if self.is_method else self.transform

    @property
    def method(self) -> str:
        """The merge method's name, or "" for an operation."""
        return self.transform if self.is_method else ""


@dataclass(frozen=True)
class Options:
    """Run options (see the module docstring)."""

    device: str = "cpu"
    block_map: str = DEFAULT_BLOCK_MAP
    missing_keys: str = "error"
    include: tuple[str, ...] = COMPONENTS
    exclude_keys: tuple[str, ...] = ()
    vae: str | None = None
    seed: int = 0


@dataclass
class Recipe:
    """A recipe. Paths are as written, relative to ``base_dir``; ``source``
    names the recipe in messages (its file, or "command line")."""

    inputs: dict[str, InputSpec]
    steps: dict[str, StepSpec]
    output_path: str | None
    output_dtype: str = "fp16"
    output_step: str = ""
    options: Options = field(default_factory=Options)
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<recipe>"
    output_format: str | None = None
    output_quant: str = "q8_0"
    output_keep_shapes: bool = False
    from_yaml: bool = False  # errors then name the recipe file and the step
    verify: dict[str, Any] | None = None  # render and check the output (see above)
    # a recipe read from a file writes only inside this folder (its own),
    # unless the caller names the output (-o); recipes built in code: None
    output_root: Path | None = None

    # --- building in code --------------------------------------------------------

    @classmethod
    def merge(cls, *models: str | os.PathLike[str], method: str = "weighted_sum",
              output: str | os.PathLike[str] | None = None, dtype: str = AUTO_DTYPE,
              options: Options | None = None, source: str = "<recipe>",
              suggest: bool = False, **params: Any) -> Recipe:
        """A one-step merge of ``models`` (A, B, C...) with ``method``; the
        inputs are named ``a``, ``b``, ``c``... ``suggest``: required
        parameters not given take their declared suggested values (what the
        merge command does: A1111's alpha 0.3)."""
        names = [chr(ord("a") + i) for i in range(len(models))]
        inputs = {n: InputSpec(n, str(m)) for n, m in zip(names, models, strict=True)}
        step = StepSpec("merge", method, tuple(names), dict(params), suggest=suggest)
        return cls(inputs, {"merge": step}, _path(output), dtype, "merge",
                   options or Options(), Path.cwd(), source)

    @classmethod
    def op(cls, name: str, *models: str | os.PathLike[str],
           output: str | os.PathLike[str] | None = None, options: Options | None = None,
           source: str = "<recipe>", **params: Any) -> Recipe:
        """A one-step recipe running operation ``name`` on ``models``; the
        inputs take the operation's input names (``model``, ``donor``...)."""
        names = _input_names(name, len(models))
        inputs = {n: InputSpec(n, str(m)) for n, m in zip(names, models, strict=True)}
        step = StepSpec(name, name, tuple(names), dict(params))
        return cls(inputs, {name: step}, _path(output), "keep", name, options or Options(),
                   Path.cwd(), source)

    def then(self, transform: str, *extra_models: str | os.PathLike[str],
             name: str | None = None, **params: Any) -> Recipe:
        """A copy with one more step, ``transform`` applied to the current
        output step (and ``extra_models``, added as inputs), as the output."""
        new = copy.deepcopy(self)
        step_name = name or _free_name(transform, new)
        models = [new.output_step]
        for i, m in enumerate(extra_models, 1):
            input_name = _free_name(f"{step_name}_in{i}", new)
            new.inputs[input_name] = InputSpec(input_name, str(m))
            models.append(input_name)
        new.steps[step_name] = StepSpec(step_name, transform, tuple(models), dict(params))
        new.output_step = step_name
        return new

    def with_output(self, path: str | os.PathLike[str] | None = None, **fields: Any) -> Recipe:
        """A copy with the output path and other ``output_*`` fields set
        (``dtype=``, ``format=``, ``quant=``, ``keep_shapes=``, ``step=``)."""
        new = copy.deepcopy(self)
        if path is not None:
            new.output_path = str(path)
        for key, value in fields.items():
            if not hasattr(new, f"output_{key}"):
                raise TypeError(f"unknown output field {key!r}")
            setattr(new, f"output_{key}", value)
        return new

    # --- paths and forms -----------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """A recipe path made absolute against the recipe's folder."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))

    def to_dict(self) -> dict[str, Any]:
        """The canonical form (what ``modelkit recipe show`` prints)."""
        inputs: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            entry: dict[str, Any] = {"path": spec.path}
            if spec.sha256:
                entry["sha256"] = spec.sha256
            inputs[name] = entry
        o = self.options
        options = {"device": o.device, "block_map": o.block_map,
                   "missing_keys": o.missing_keys, "include": list(o.include),
                   "exclude_keys": list(o.exclude_keys), "vae": o.vae, "seed": o.seed}
        output: dict[str, Any] = {"path": self.output_path, "dtype": self.output_dtype,
                                  "step": self.output_step}
        if self.output_format:
            output["format"] = self.output_format
        if self.output_format == "gguf":
            output["quant"] = self.output_quant
            output["keep_shapes"] = self.output_keep_shapes
        out = {"version": RECIPE_VERSION, "inputs": inputs,
               "steps": {n: _step_dict(s) for n, s in self.steps.items()},
               "output": output, "options": options}
        if self.verify is not None:
            out["verify"] = dict(self.verify)
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def with_hashes(self, hashes: Mapping[str, str], names_only: bool = False) -> Recipe:
        """A copy with input sha256 values pinned; with ``names_only`` every
        input and VAE path becomes its file name (for recipes embedded in
        shared outputs: no folders, user or host names)."""
        new = copy.copy(self)
        new.inputs = {n: InputSpec(n, Path(s.path).name if names_only else s.path,
                                   hashes.get(n, s.sha256))
                      for n, s in self.inputs.items()}
        new.output_path = Path(self.output_path).name if (
            names_only and self.output_path) else self.output_path
        if names_only and self.options.vae:
            new.options = replace(self.options, vae=Path(self.options.vae).name)
        return new

    def primary_input(self, name: str | None = None) -> str:
        """The input that ``name`` (default: the output step) comes from
        through each step's first model: the model an output is compared
        with, A1111's primary model (see :func:`primary_of`)."""
        return primary_of(self.steps, name or self.output_step)

    @property
    def has_ops(self) -> bool:
        """Whether any step is an operation (not a merge method)."""
        return any(not s.is_method for s in self.steps.values())


def primary_of(steps: Mapping[str, StepSpec], name: str) -> str:
    """Where ``name`` comes from through each step's first model, walking
    ``steps`` only (a recipe's, or a merge group's): its primary input."""
    while name in steps:
        name = steps[name].models[0]
    return name


def _path(p: str | os.PathLike[str] | None) -> str | None:
    return None if p is None else str(p)


def _input_names(transform: str, n: int) -> list[str]:
    from modelkit.core.registry import get_transform

    t = get_transform(transform)
    names = [name for name, _ in t.inputs]
    if not t.variadic:
        return names[:n] if n <= len(names) else names + [f"model{i}" for i in
                                                           range(len(names) + 1, n + 1)]
    fixed, var = names[:-1], names[-1]
    return fixed + [f"{var}{i}" for i in range(1, n - len(fixed) + 1)]


def _free_name(base: str, recipe: Recipe) -> str:
    name, i = base, 2
    while name in recipe.steps or name in recipe.inputs:
        name, i = f"{base}{i}", i + 1
    return name


def yaml_value(v: Any) -> Any:
    """A parameter value as plain YAML/JSON (a block-wise one as its
    mapping, a tuple as a list): the one form recipes, histories and
    A1111's lineage write parameters in."""
    if isinstance(v, BlockParam):
        return v.to_yaml()
    return list(v) if isinstance(v, tuple) else v


def yaml_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as plain YAML/JSON values (see :func:`yaml_value`)."""
    return {k: yaml_value(v) for k, v in params.items()}


def _step_dict(s: StepSpec) -> dict[str, Any]:
    key = "method" if s.is_method else "op"
    return {key: s.transform, "models": list(s.models), "params": yaml_params(s.params)}


# --- validation -------------------------------------------------------------------


class _Checker:
    """Raises RecipeErrors that name the recipe, the field and, when a
    locator is given, the YAML line."""

    def __init__(self, source: str, locate: Callable[[tuple[str, ...]], int | None] | None
                 ) -> None:
        self.source = source
        self.locate = locate

    def fail(self, path: tuple[str, ...], problem: str) -> RecipeError:
        if self.source == COMMAND_LINE:  # options, not recipe fields, were given
            return RecipeError(problem, path)
        where = ".".join(p if len(p) <= 60 else p[:57] + "..." for p in path) or "top level"
        line = self.locate(path) if self.locate else None
        at = f" (line {line})" if line else ""
        return RecipeError(f"{self.source}: {where}{at}: {problem}", path)

    def name(self, value: Any, path: tuple[str, ...]) -> None:
        if not isinstance(value, str) or not _NAME.match(value):
            shown = repr(value)[:60]
            raise self.fail(path, f"{shown} is not a valid name (letters, digits, _ -)")

    def choice(self, value: Any, allowed: tuple[str, ...], path: tuple[str, ...]) -> None:
        if value not in allowed:
            raise self.fail(path, f"{str(value)[:60]!r} is not one of {', '.join(allowed)}")


def _check_inputs(c: _Checker, inputs: dict[str, InputSpec]) -> None:
    if not inputs:
        raise c.fail(("inputs",), "at least one input is needed")
    if len(inputs) > MAX_INPUTS:
        raise c.fail(("inputs",), f"{len(inputs)} inputs; a recipe has at most {MAX_INPUTS}")
    for name, spec in inputs.items():
        path = ("inputs", str(name))
        c.name(name, path)
        if not isinstance(spec.path, str) or not spec.path:
            raise c.fail((*path, "path"), "a file path is required")
        sha = spec.sha256
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}",
                                                                           sha)):
            raise c.fail((*path, "sha256"), "must be 64 lowercase hex digits")


def _transform_for(c: _Checker, step: StepSpec, path: tuple[str, ...]) -> Any:
    from modelkit.core.registry import METHOD, OP, all_transforms, get_transform

    where = (*path, step.kind or "method")
    if not isinstance(step.transform, str) or not step.transform:
        raise c.fail(where, "a method or operation name is required")
    kind = {"method": METHOD, "op": OP}.get(step.kind or "")
    t = all_transforms().get(step.transform)
    if t is None:
        try:
            t = get_transform(step.transform, kind)
        except ModelkitError as exc:
            raise c.fail(where, str(exc)) from None
    if kind == OP and t.kind == METHOD:
        raise c.fail(where, f"{t.name} is a merge method; write 'method: {t.name}'")
    if kind == METHOD and t.kind == OP:
        raise c.fail(where, f"{t.name} is an operation; write 'op: {t.name}'")
    return t


def _as_block_param(value: Any) -> BlockParam | None:
    """``value`` as a block-wise spec, or None when it is a plain scalar."""
    if isinstance(value, BlockParam):
        return value
    if isinstance(value, str):
        # a list or one NAME=VALUE item ("default=0.3") is a spec; a bare word a preset
        spec = "," in value or "=" in value or ":" in value
        return BlockParam(blocks=value) if spec else BlockParam(preset=value)
    if isinstance(value, list | tuple):
        return BlockParam(blocks=list(value))
    if isinstance(value, dict):
        if set(value) == {"preset"}:
            return BlockParam(preset=str(value["preset"]))
        if set(value) == {"blocks"}:
            return BlockParam(blocks=value["blocks"])
        raise ModelkitError("give exactly one of 'blocks' or 'preset'")
    return None


def _normal_params(c: _Checker, t: Any, step: StepSpec, path: tuple[str, ...]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    from modelkit.arch.blocks import any_preset
    from modelkit.core.registry import Typed, check_params, parse_text

    params: dict[str, Any] = {}
    for key, value in step.params.items():
        p = t.params.get(key)
        if isinstance(value, Typed):  # text a person typed: a value by its declaration
            value = parse_text(p, str(value))
            if value is None:
                continue
        if p is not None and p.blockwise and not isinstance(value, bool | int | float):
            try:
                value = _as_block_param(value)
            except ModelkitError as exc:
                raise c.fail((*path, "params", str(key)), str(exc)) from None
            if value is not None and value.preset and not any_preset(value.preset):
                raise c.fail((*path, "params", str(key)),
                             f"unknown block preset {value.preset[:60]!r}; see "
                             "'modelkit presets'")
        params[str(key)] = value
    if step.suggest:
        for key, p in t.params.items():
            if p.required and params.get(key) is None and p.suggested is not None:
                params[key] = p.suggested
    try:
        checked = check_params(t, params, len(step.models),
                               is_blockwise=lambda v: isinstance(v, BlockParam))
    except ModelkitError as exc:
        raise c.fail((*path, "params"), str(exc)) from None
    return params, checked


MAX_STEPS = 200
MAX_INPUTS = 64


def _check_steps(c: _Checker, recipe: Recipe) -> dict[str, StepSpec]:
    if not recipe.steps:
        raise c.fail(("steps",), "at least one step is needed")
    if len(recipe.steps) > MAX_STEPS:
        raise c.fail(("steps",), f"{len(recipe.steps)} steps; a recipe has at most "
                                 f"{MAX_STEPS}")
    steps: dict[str, StepSpec] = {}
    for name, step in recipe.steps.items():
        path = ("steps", str(name))
        c.name(name, path)
        if name in recipe.inputs:
            raise c.fail(path, f"step name {name!r} is also an input name")
        t = _transform_for(c, step, path)
        if not step.models or not all(isinstance(m, str) for m in step.models):
            raise c.fail((*path, "models"), "a list of input or step names is required")
        if len(step.models) > MAX_INPUTS:
            raise c.fail((*path, "models"), f"{len(step.models)} models; a step takes at "
                                            f"most {MAX_INPUTS}")
        for i, ref in enumerate(step.models):
            if ref not in recipe.inputs and ref not in recipe.steps:
                known = ", ".join([*recipe.inputs, *recipe.steps])
                raise c.fail((*path, "models", str(i)),
                             f"unknown input or step {ref[:60]!r}; known: {known}")
        if not t.accepts(len(step.models)):
            raise c.fail((*path, "models"), f"{t.name} takes {t.arity()} models, got "
                                            f"{len(step.models)}")
        params, checked = _normal_params(c, t, step, path)
        steps[name] = replace(step, params=params, checked=checked)
    _check_cycles(c, recipe)
    return steps


def _check_cycles(c: _Checker, recipe: Recipe) -> None:
    state: dict[str, int] = {}

    def visit(start: str) -> None:
        # iterative depth-first walk: a 2,000-step chain must not hit the
        # interpreter's recursion limit
        stack: list[tuple[str, int]] = [(start, 0)]
        trail: list[str] = []
        while stack:
            name, i = stack.pop()
            if i == 0:
                if state.get(name) == 2 or name in recipe.inputs:
                    continue
                if state.get(name) == 1:
                    cycle = " -> ".join([*trail[trail.index(name):], name])
                    raise c.fail(("steps", name, "models"), f"steps form a cycle: {cycle}")
                state[name] = 1
                trail.append(name)
            models = recipe.steps[name].models
            if i < len(models):
                stack.append((name, i + 1))
                stack.append((models[i], 0))
            else:
                state[name] = 2
                trail.pop()

    for name in recipe.steps:
        visit(name)


def _check_output(c: _Checker, recipe: Recipe) -> None:
    for name in ("dtype", "format", "quant"):
        value = getattr(recipe, f"output_{name}")
        if value is not None and not isinstance(value, str):
            raise c.fail(("output", name), f"must be a name, not {type(value).__name__}")
    c.choice(recipe.output_dtype, (*MERGE_OUTPUT_DTYPES, AUTO_DTYPE), ("output", "dtype"))
    if recipe.output_format is not None:
        c.choice(recipe.output_format, OUTPUT_FORMATS, ("output", "format"))
    if recipe.output_quant not in GGUF_TYPES:
        raise c.fail(("output", "quant"), f"unknown GGUF type {str(recipe.output_quant)[:20]!r}; "
                                          f"choose one of {', '.join(GGUF_TYPES)}")
    if not isinstance(recipe.output_keep_shapes, bool):
        raise c.fail(("output", "keep_shapes"), "must be true or false")
    if not isinstance(recipe.output_step, str) or recipe.output_step not in recipe.steps:
        raise c.fail(("output", "step"), f"unknown step {str(recipe.output_step)[:60]!r}")
    if recipe.output_path is not None and not isinstance(recipe.output_path, str):
        raise c.fail(("output", "path"), "must be a file path")


def _check_options(c: _Checker, o: Options) -> None:
    for name in ("device", "block_map", "missing_keys"):
        if not isinstance(getattr(o, name), str):
            raise c.fail(("options", name), f"must be a name, not "
                                            f"{type(getattr(o, name)).__name__}")
    c.choice(o.device, DEVICES, ("options", "device"))
    c.choice(o.block_map, BLOCK_MAPS, ("options", "block_map"))
    c.choice(o.missing_keys, MISSING_KEY_POLICIES, ("options", "missing_keys"))
    if not isinstance(o.include, list | tuple) or any(x not in COMPONENTS for x in o.include):
        raise c.fail(("options", "include"), f"a list of components from "
                                             f"{', '.join(COMPONENTS)}")
    if not isinstance(o.exclude_keys, list | tuple):
        raise c.fail(("options", "exclude_keys"), "a list of regular expressions")
    from modelkit.core.keyregex import check_key_regex

    for i, rx in enumerate(o.exclude_keys):
        try:
            check_key_regex(rx)
        except ModelkitError as exc:
            raise c.fail(("options", "exclude_keys", str(i)), str(exc)) from None
    if not isinstance(o.seed, int) or isinstance(o.seed, bool):
        raise c.fail(("options", "seed"), "must be an integer")
    if o.vae is not None and not isinstance(o.vae, str):
        raise c.fail(("options", "vae"), "must be a file path")


def verify_fields() -> dict[str, tuple[type, ...]]:
    """The fields of a recipe's ``verify:`` section and their YAML types:
    ``reference`` and the :class:`~modelkit.core.verify_settings.VerifySettings`
    fields declared settable from a recipe (declared there, once)."""
    from modelkit.core.verify_settings import RECIPE_FIELDS

    return {"reference": (str,), **RECIPE_FIELDS}


def _check_verify(c: _Checker, recipe: Recipe) -> None:
    v = recipe.verify
    if v is None:
        return
    if not isinstance(v, dict):
        raise c.fail(("verify",), "a mapping of verify settings (or true)")
    allowed = verify_fields()
    for key, value in v.items():
        types = allowed.get(key)
        if types is None:
            raise c.fail(("verify", str(key)), f"unknown field; allowed: "
                                               f"{', '.join(allowed)}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise c.fail(("verify", key), f"must be {with_article(names)}")
    ref = v.get("reference")
    if ref is not None and ref != "none" and ref not in recipe.inputs:
        raise c.fail(("verify", "reference"), f"{ref[:60]!r} is not an input name; known: "
                                              f"{', '.join(recipe.inputs)}, or none")


def validate(recipe: Recipe, locate: Callable[[tuple[str, ...]], int | None] | None = None
             ) -> Recipe:
    """Check a recipe before any file is read and return it normalised
    (block-wise parameters as :class:`BlockParam`).

    ``locate(field_path)`` may give the YAML line of a field for messages.

    Raises:
        RecipeError: the first problem, naming the recipe and the field.
    """
    c = _Checker(recipe.source, locate)
    _check_inputs(c, recipe.inputs)
    steps = _check_steps(c, recipe)
    _check_output(c, recipe)
    _check_options(c, recipe.options)
    _check_verify(c, recipe)
    out = copy.copy(recipe)
    out.steps = steps
    out.options = replace(recipe.options, include=tuple(recipe.options.include),
                          exclude_keys=tuple(recipe.options.exclude_keys))
    return out


# --- YAML ----------------------------------------------------------------------------

MAX_RECIPE_BYTES = 1_000_000
MAX_NODES = 100_000  # YAML nodes after alias expansion ("billion laughs" stops here)
MAX_DEPTH = 50
MAX_INT_CHARS = 100  # an integer field (seed, steps) this long is a mistake, or an attack
INT_TAG = "tag:yaml.org,2002:int"


def _yaml_lines(c: _Checker, node: Any) -> dict[tuple[str, ...], int]:
    """Line numbers of every field by path, walking the node graph without
    recursion; refuses recursive aliases, deep nesting and alias bombs."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[Any, tuple[str, ...], frozenset[int]]] = [(node, (), frozenset())]
    seen = 0
    while stack:
        n, path, above = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise c.fail((), f"recipe expands to more than {MAX_NODES} YAML nodes "
                             "(aliases?); write it out plainly")
        if id(n) in above:
            raise c.fail(path, "a YAML alias refers to itself")
        if len(path) > MAX_DEPTH:
            raise c.fail(path[:3], f"nested more than {MAX_DEPTH} levels deep")
        lines.setdefault(path, n.start_mark.line + 1)
        inner = above | {id(n)}
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = str(k.value)[:200]
                lines.setdefault((*path, key), k.start_mark.line + 1)
                stack.append((v, (*path, key), inner))
        elif isinstance(n, yaml.SequenceNode):
            stack += [(v, (*path, str(i)), inner) for i, v in enumerate(n.value)]
        elif n.tag == INT_TAG and len(n.value) > MAX_INT_CHARS:
            raise c.fail(path, f"an integer of {len(n.value)} digits is too large")
    return lines


def _locator(lines: dict[tuple[str, ...], int]) -> Callable[[tuple[str, ...]], int | None]:
    def locate(path: tuple[str, ...]) -> int | None:
        while path and path not in lines:
            path = path[:-1]
        return lines.get(path)

    return locate


def _load_yaml(text: str, source: str) -> tuple[Any, Callable[[tuple[str, ...]], int | None]]:
    import yaml

    c = _Checker(source, None)
    if len(text) > MAX_RECIPE_BYTES:
        raise c.fail((), f"recipe is {len(text)} bytes; the limit is {MAX_RECIPE_BYTES}")
    with yaml_errors(source, RecipeError):
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        locate = _locator(_yaml_lines(c, node) if node is not None else {})
        raw = yaml.safe_load(text)
    return raw, locate


@contextmanager
def yaml_errors(source: str, error: type[ModelkitError]) -> Iterator[None]:
    """Turn the YAML parser's failures inside the block into one-line
    ``error``s naming ``source`` and, where known, the line."""
    import yaml

    try:
        yield
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise error(f"{source}{line}: not valid YAML: "
                    f"{getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise error(f"{source}: YAML nested too deeply") from None
    except ValueError as exc:  # int("1" * 5000): Python's digit limit
        if "digits" not in str(exc):
            raise
        raise error(f"{source}: an integer in it has too many digits") from None


def _mapping(c: _Checker, value: Any, path: tuple[str, ...],
             allowed: tuple[str, ...] | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise c.fail(path, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise c.fail(path, f"field names must be strings, not {str(key)[:60]!r}")
        if allowed is not None and key not in allowed:
            raise c.fail((*path, key), f"unknown field; allowed: {', '.join(allowed)}")
    return value


def _inputs_from(c: _Checker, raw: Any) -> dict[str, InputSpec]:
    out = {}
    for name, value in _mapping(c, raw if raw is not None else {}, ("inputs",), None).items():
        path = ("inputs", name)
        spec = _mapping(c, {"path": value} if isinstance(value, str) else value, path,
                        ("path", "sha256"))
        out[name] = InputSpec(name, spec.get("path"), spec.get("sha256"))  # type: ignore[arg-type]
    return out


def _steps_from(c: _Checker, raw: Any) -> dict[str, StepSpec]:
    steps = {}
    for name, value in _mapping(c, raw if raw is not None else {}, ("steps",), None).items():
        path = ("steps", name)
        spec = _mapping(c, value, path, ("method", "op", "models", "params"))
        kinds = [k for k in STEP_KEYS if k in spec]
        if len(kinds) != 1:
            raise c.fail(path, "give exactly one of 'method' (a merge) or 'op' (prune, "
                               "ema, quantize, dequantize, swap, extract, convert)")
        models = spec.get("models")
        if not isinstance(models, list):
            raise c.fail((*path, "models"), "a list of input or step names is required")
        params = _mapping(c, spec.get("params") or {}, (*path, "params"), None)
        steps[name] = StepSpec(name, spec[kinds[0]], tuple(models), dict(params), kinds[0])
    return steps


def _options_from(c: _Checker, raw: Any) -> Options:
    spec = _mapping(c, raw or {}, ("options",), ("device", "block_map", "missing_keys",
                                                  "include", "exclude_keys", "vae", "seed"))
    d = Options()
    return Options(spec.get("device", d.device), spec.get("block_map", d.block_map),
                   spec.get("missing_keys", d.missing_keys),
                   spec.get("include", list(d.include)),
                   spec.get("exclude_keys") or (), spec.get("vae"), spec.get("seed", 0))


def parse_recipe(text: str, source: str = "<recipe>", base_dir: Path | None = None
                 ) -> Recipe:
    """Parse recipe YAML and :func:`validate` it; errors name the field and
    its line."""
    raw, locate = _load_yaml(text, source)
    c = _Checker(source, locate)
    top = _mapping(c, raw, (), ("version", "inputs", "steps", "output", "options", "verify"))
    if top.get("version") != RECIPE_VERSION:
        raise c.fail(("version",), f"unsupported recipe version "
                                   f"{str(top.get('version'))[:20]!r}; this modelkit reads "
                                   f"version {RECIPE_VERSION}")
    inputs = _inputs_from(c, top.get("inputs"))
    steps = _steps_from(c, top.get("steps"))
    out = _mapping(c, top.get("output") or {}, ("output",),
                   ("path", "dtype", "step", "format", "quant", "keep_shapes"))
    recipe = Recipe(inputs, steps, out.get("path"), out.get("dtype", AUTO_DTYPE),
                    out.get("step", list(steps)[-1] if steps else ""),
                    _options_from(c, top.get("options")), base_dir or Path.cwd(), source,
                    out.get("format"), out.get("quant", "q8_0"),
                    out.get("keep_shapes", False), from_yaml=True)
    section = top.get("verify")
    recipe.verify = {} if section is True else (None if section is False else section)
    return validate(recipe, locate)


def read_yaml_text(p: Path, what: str, max_bytes: int,
                   error: type[ModelkitError] = RecipeError) -> str:
    """The text of a small YAML file (a recipe, a sweep): at most
    ``max_bytes + 1`` bytes are read, so the parser can refuse a bigger one;
    a missing, unreadable or non-UTF-8 file raises ``error`` naming it."""
    try:
        if p.exists() and not p.is_file():
            raise error(f"{p}: is not a regular file; give a {what} .yaml file")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
        kind = model_file_kind(data[:16])
        if kind is not None:
            raise error(f"{p}: is a model file ({kind}), not a {what} file; give a {what} "
                        ".yaml file")
        return data.decode()
    except FileNotFoundError:
        raise error(f"{p}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{p}: cannot read the {what} file ({exc})") from None


def model_file_kind(head: bytes) -> str | None:
    """What model format a file's first bytes say it is, if any: a YAML
    reader names it instead of failing to decode it."""
    if head.startswith(b"GGUF"):
        return "GGUF"
    if head.startswith(b"PK\x03\x04"):
        return "a zip, such as a PyTorch .ckpt/.pt"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle, such as a .ckpt/.pt"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32:
        return "safetensors"
    return None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path)
    text = read_yaml_text(p, "recipe", MAX_RECIPE_BYTES)
    recipe = parse_recipe(text, str(p), p.resolve().parent)
    recipe.output_root = recipe.base_dir
    return recipe


def confined_output(recipe: Recipe, path: Path) -> Path:
    """``path`` (the recipe's ``output.path`` resolved) when it lies inside
    the recipe's :attr:`Recipe.output_root` after symlinks are followed;
    else a :class:`RecipeError` naming ``output.path`` (a downloaded recipe
    must not write ``/etc/...``)."""
    root = recipe.output_root
    if root is None:
        return path
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != real_root and real_root in real.parents:
        return path
    from modelkit.textsafe import quoted

    raise RecipeError(f"{recipe.source}: output.path: {quoted(recipe.output_path)} is outside "
                      "the recipe's folder; a recipe file writes only inside its own folder: "
                      "give a relative path there, or pass -o to write elsewhere",
                      ("output", "path"))
