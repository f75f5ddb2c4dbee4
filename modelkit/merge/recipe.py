"""Merge recipes: versioned YAML, validated before any tensor is read.

A recipe names its inputs, a DAG of steps and one output::

    version: 1
    inputs:
      base: {path: models/a.safetensors, sha256: 0f1e...}   # sha256 optional (lock pins it)
      style: models/b.safetensors                          # short form
    steps:
      mix:
        method: weighted_sum
        models: [base, style]          # input or step names; order matters (A, B, C)
        params:
          alpha: 0.3                   # a number, or block-wise:
          # alpha: {blocks: "0,0.1,...,1"}  |  {blocks: {IN00-IN05: 0.3, default: 0.5}}
          # alpha: {preset: gradient_in_to_out}
      small:
        op: quantize                   # a convert step: prune, ema, quantize,
        models: [mix]                  #   dequantize, swap (2 models), extract
        params: {dtype: fp8_e4m3fn}
    output:
      path: merged.safetensors
      dtype: fp16                      # what merge steps write: fp16 (default), bf16, fp32, keep
      step: small                      # default: the last step
      format: safetensors              # or diffusers (a folder), gguf (UNet, q8_0);
                                       #   default from the path
    options:
      device: cpu                      # cpu, cuda, auto
      block_map: supermerger           # or mecha
      missing_keys: error              # error, take-first, skip
      include: [unet, vae, te]         # components merged; others copied from A
      exclude_keys: []                 # regexes of keys copied from A unmerged
      vae: null                        # a VAE file to bake in
      seed: 0                          # for seeded methods (DARE)

Inputs may be ``.safetensors`` files, legacy pickles or diffusers folders.
Steps chain key by key: no intermediate file is written. Errors name the
recipe file, the field path and its line.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from modelkit.errors import ModelkitError

RECIPE_VERSION = 1
OUTPUT_DTYPES = ("fp16", "bf16", "fp32", "keep")
OUTPUT_FORMATS = ("safetensors", "diffusers", "gguf")
MISSING_POLICIES = ("error", "take-first", "skip")
COMPONENTS = ("unet", "vae", "te")
DEVICES = ("cpu", "cuda", "auto")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class RecipeError(ModelkitError):
    """A recipe that cannot run; raised before any tensor is read."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class BlockParam:
    """A block-wise parameter: ``values`` per block name, or a ``preset``
    name, resolved against the architecture when the recipe runs."""

    blocks: Any = None
    preset: str | None = None

    def to_yaml(self) -> dict[str, Any]:
        return {"preset": self.preset} if self.preset else {"blocks": self.blocks}


ParamValue = float | int | bool | BlockParam


@dataclass(frozen=True)
class StepSpec:
    """A merge step (``method``) or a convert step (``op``: prune, ema,
    quantize, dequantize, swap, extract, with plain ``params``)."""

    name: str
    method: str
    models: tuple[str, ...]
    params: dict[str, Any]
    op: str | None = None


@dataclass(frozen=True)
class Options:
    device: str = "cpu"
    block_map: str = "supermerger"
    missing_keys: str = "error"
    include: tuple[str, ...] = COMPONENTS
    exclude_keys: tuple[str, ...] = ()
    vae: str | None = None
    seed: int = 0


@dataclass
class Recipe:
    """A validated recipe. Paths are as written (relative to ``base_dir``)."""

    inputs: dict[str, InputSpec]
    steps: dict[str, StepSpec]
    output_path: str | None
    output_dtype: str = "fp16"
    output_step: str = ""
    options: Options = field(default_factory=Options)
    base_dir: Path = field(default_factory=Path)
    source: str = "<recipe>"
    output_format: str | None = None

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
        steps = {name: _step_dict(s) for name, s in self.steps.items()}
        o = self.options
        options = {"device": o.device, "block_map": o.block_map,
                   "missing_keys": o.missing_keys, "include": list(o.include),
                   "exclude_keys": list(o.exclude_keys), "vae": o.vae, "seed": o.seed}
        output = {"path": self.output_path, "dtype": self.output_dtype,
                  "step": self.output_step}
        if self.output_format:
            output["format"] = self.output_format
        return {"version": RECIPE_VERSION, "inputs": inputs, "steps": steps,
                "output": output, "options": options}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def with_hashes(self, hashes: dict[str, str], absolute: bool = False) -> Recipe:
        """A copy with input sha256 values pinned; with ``absolute`` the
        input and VAE paths are resolved (for recipes embedded in outputs)."""
        new = copy.copy(self)
        new.inputs = {n: InputSpec(n, str(self.resolve(s.path)) if absolute else s.path,
                                   hashes.get(n, s.sha256))
                      for n, s in self.inputs.items()}
        if absolute and self.options.vae:
            new.options = replace(self.options, vae=str(self.resolve(self.options.vae)))
        return new

    @property
    def has_ops(self) -> bool:
        """Whether any step is a convert operation."""
        return any(s.op for s in self.steps.values())


def _step_dict(s: StepSpec) -> dict[str, Any]:
    if s.op:
        return {"op": s.op, "models": list(s.models), "params": dict(s.params)}
    return {"method": s.method, "models": list(s.models),
            "params": {k: v.to_yaml() if isinstance(v, BlockParam) else v
                       for k, v in s.params.items()}}


# --- parsing ------------------------------------------------------------------


class _Lines:
    """Line numbers of YAML fields, by path tuple."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            return
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                self._walk(v, (*path, str(k.value)))
                self.lines.setdefault((*path, str(k.value)), k.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, (*path, str(i)))

    def at(self, path: tuple[str, ...]) -> int | None:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


class _Parser:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = _Lines(text)

    def fail(self, path: tuple[str, ...], problem: str) -> RecipeError:
        where = ".".join(path) or "top level"
        line = self.lines.at(path)
        at = f" (line {line})" if line else ""
        return RecipeError(f"{self.source}: {where}{at}: {problem}")

    def mapping(self, value: Any, path: tuple[str, ...], allowed: tuple[str, ...] | None
                ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise self.fail((*path, str(key)), f"unknown field; allowed: "
                                    f"{', '.join(allowed)}")
        return value

    def name(self, value: Any, path: tuple[str, ...]) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(path, f"{value!r} is not a valid name (letters, digits, _ -)")
        return value


def _parse_inputs(p: _Parser, raw: Any) -> dict[str, InputSpec]:
    entries = p.mapping(raw, ("inputs",), None)
    if not entries:
        raise p.fail(("inputs",), "at least one input is needed")
    out = {}
    for name, value in entries.items():
        path = ("inputs", str(name))
        p.name(name, path)
        if isinstance(value, str):
            value = {"path": value}
        spec = p.mapping(value, path, ("path", "sha256"))
        if not isinstance(spec.get("path"), str) or not spec["path"]:
            raise p.fail((*path, "path"), "a file path is required")
        sha = spec.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}",
                                                                           sha)):
            raise p.fail((*path, "sha256"), "must be 64 lowercase hex digits")
        out[name] = InputSpec(name, spec["path"], sha)
    return out


def _parse_param(p: _Parser, value: Any, path: tuple[str, ...]) -> ParamValue:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):  # a preset name or a comma list
        if "," in value:
            return BlockParam(blocks=value)
        return BlockParam(preset=value)
    if isinstance(value, list):
        return BlockParam(blocks=value)
    spec = p.mapping(value, path, ("blocks", "preset"))
    if ("blocks" in spec) == ("preset" in spec):
        raise p.fail(path, "give exactly one of 'blocks' or 'preset'")
    if "preset" in spec:
        return BlockParam(preset=str(spec["preset"]))
    return BlockParam(blocks=spec["blocks"])


def _parse_steps(p: _Parser, raw: Any, inputs: dict[str, InputSpec]) -> dict[str, StepSpec]:
    entries = p.mapping(raw, ("steps",), None)
    if not entries:
        raise p.fail(("steps",), "at least one step is needed")
    steps: dict[str, StepSpec] = {}
    for name, value in entries.items():
        path = ("steps", str(name))
        p.name(name, path)
        if name in inputs:
            raise p.fail(path, f"step name {name!r} is also an input name")
        spec = p.mapping(value, path, ("method", "op", "models", "params"))
        if ("method" in spec) == ("op" in spec):
            raise p.fail(path, "give exactly one of 'method' (a merge) or 'op' (prune, "
                               "ema, quantize, dequantize, swap, extract)")
        models = spec.get("models")
        if not isinstance(models, list) or not models or not all(
                isinstance(m, str) for m in models):
            raise p.fail((*path, "models"), "a list of input or step names is required")
        params_raw = p.mapping(spec.get("params") or {}, (*path, "params"), None)
        if "op" in spec:
            steps[name] = _parse_op_step(p, path, str(name), spec["op"], models, params_raw)
            continue
        method = spec.get("method")
        if not isinstance(method, str):
            raise p.fail((*path, "method"), "a method name is required")
        params = {str(k): _parse_param(p, v, (*path, "params", str(k)))
                  for k, v in params_raw.items()}
        steps[name] = StepSpec(name, method, tuple(models), params)
    return steps


def _parse_op_step(p: _Parser, path: tuple[str, ...], name: str, op: Any, models: list[str],
                   params: dict[str, Any]) -> StepSpec:
    from modelkit.convert.ops import check_op_params, get_op

    try:
        spec = get_op(str(op))
    except ModelkitError as exc:
        raise p.fail((*path, "op"), str(exc)) from None
    if len(models) != spec.n_models:
        raise p.fail((*path, "models"), f"{spec.name} takes {spec.n_models} model(s), "
                                        f"got {len(models)}")
    try:
        check_op_params(spec, params)
    except ModelkitError as exc:
        raise p.fail((*path, "params"), str(exc)) from None
    return StepSpec(name, "", tuple(models), {str(k): v for k, v in params.items()},
                    op=spec.name)


def _check_graph(p: _Parser, inputs: dict[str, InputSpec], steps: dict[str, StepSpec]
                 ) -> None:
    for step in steps.values():
        for i, ref in enumerate(step.models):
            if ref not in inputs and ref not in steps:
                known = ", ".join([*inputs, *steps])
                raise p.fail(("steps", step.name, "models", str(i)),
                             f"unknown input or step {ref!r}; known: {known}")
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2 or name in inputs:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*trail[trail.index(name):], name])
            raise p.fail(("steps", name, "models"), f"steps form a cycle: {cycle}")
        state[name] = 1
        for ref in steps[name].models:
            visit(ref, [*trail, name])
        state[name] = 2

    for name in steps:
        visit(name, [])


def _parse_options(p: _Parser, raw: Any) -> Options:
    spec = p.mapping(raw or {}, ("options",), ("device", "block_map", "missing_keys",
                                                "include", "exclude_keys", "vae", "seed"))
    choices = {"device": DEVICES, "block_map": ("supermerger", "mecha"),
               "missing_keys": MISSING_POLICIES}
    for key, allowed in choices.items():
        if key in spec and spec[key] not in allowed:
            raise p.fail(("options", key), f"{spec[key]!r} is not one of "
                                           f"{', '.join(allowed)}")
    include = spec.get("include", list(COMPONENTS))
    if not isinstance(include, list) or any(c not in COMPONENTS for c in include):
        raise p.fail(("options", "include"), f"a list of components from "
                                             f"{', '.join(COMPONENTS)}")
    exclude = spec.get("exclude_keys", []) or []
    for i, rx in enumerate(exclude):
        try:
            re.compile(rx)
        except (re.error, TypeError) as exc:
            raise p.fail(("options", "exclude_keys", str(i)), f"bad regex: {exc}") from None
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise p.fail(("options", "seed"), "must be an integer")
    vae = spec.get("vae")
    if vae is not None and not isinstance(vae, str):
        raise p.fail(("options", "vae"), "must be a file path")
    return Options(spec.get("device", "cpu"), spec.get("block_map", "supermerger"),
                   spec.get("missing_keys", "error"), tuple(include), tuple(exclude),
                   vae, seed)


def parse_recipe(text: str, source: str = "<recipe>", base_dir: Path | None = None
                 ) -> Recipe:
    """Parse and validate recipe YAML (structure, names, graph); method and
    block names are checked by :func:`modelkit.merge.plan.check_recipe`."""
    p = _Parser(source, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{source}{line}: not valid YAML: "
                          f"{getattr(exc, 'problem', exc)}") from None
    top = p.mapping(raw, (), ("version", "inputs", "steps", "output", "options"))
    if top.get("version") != RECIPE_VERSION:
        raise p.fail(("version",), f"unsupported recipe version {top.get('version')!r}; "
                                   f"this modelkit reads version {RECIPE_VERSION}")
    inputs = _parse_inputs(p, top.get("inputs"))
    steps = _parse_steps(p, top.get("steps"), inputs)
    _check_graph(p, inputs, steps)
    out = p.mapping(top.get("output") or {}, ("output",), ("path", "dtype", "step", "format"))
    fmt = out.get("format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise p.fail(("output", "format"), f"{fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    dtype = out.get("dtype", "fp16")
    if dtype not in OUTPUT_DTYPES:
        raise p.fail(("output", "dtype"), f"{dtype!r} is not one of "
                                          f"{', '.join(OUTPUT_DTYPES)}")
    step = out.get("step", list(steps)[-1])
    if step not in steps:
        raise p.fail(("output", "step"), f"unknown step {step!r}")
    path = out.get("path")
    if path is not None and not isinstance(path, str):
        raise p.fail(("output", "path"), "must be a file path")
    return Recipe(inputs, steps, path, dtype, step, _parse_options(p, top.get("options")),
                  base_dir or Path.cwd(), source, fmt)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read recipe ({exc})") from None
    return parse_recipe(text, str(p), p.resolve().parent)
