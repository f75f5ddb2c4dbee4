"""One registry for every transform modelkit runs between sources and the
writer: merge methods, convert operations, LoRA bake and extraction.

A transform is a function registered with :func:`transform`. Its signature
*is* its declaration:

* positional parameters are its model inputs; ``*name`` makes the last one
  variadic. The annotation says what an input is: ``Tensor`` for a per-key
  **method** (called once per key, or per 1M-element chunk when
  ``elementwise``, with float32 tensors), or a model role for a model-level
  **op** (called once with the input sources, returning a
  :class:`~modelkit.core.step.PlannedStep`): :data:`Model` (a checkpoint or a
  standalone component), :data:`Checkpoint`, :data:`Adapter` (a LoRA or
  LyCORIS file).
* keyword-only parameters are its parameters, typed by annotation: ``float``,
  ``int``, ``bool``, ``str``, ``Literal[...]`` (a choice), ``tuple[X, ...]``
  (a list; ``Literal`` items are checked), :data:`BlockWise` (a number that
  may be given per merge block; every ``float`` of a method is block-wise),
  :data:`PerModel` (one value per variadic input). The default is the
  signature's default; no default means required.
* a keyword ``generator`` (a ``torch.Generator``) makes the transform
  seeded: the runner passes a generator seeded from the recipe's seed, the
  step name and the key, so one seed always gives one result. A keyword
  ``device`` receives the run's device (an op that computes, such as a LoRA
  extraction, uses it). A parameter annotated ``Any`` is passed as given and
  checked by the transform itself (a LoRA block-weight spec per adapter).
* each parameter's help (what ``--help``, the TUI's tooltips and
  ``modelkit methods`` show) comes from the decorator's ``help`` mapping or
  from an :class:`Info` in its annotation (one alias declares a parameter
  several methods share, such as ``alpha``). An ``Info`` may also give a
  ``suggested`` value: what a front end (the merge command, the TUI form)
  fills in when the user gives none, while a recipe must still give it
  (A1111's alpha 0.3).

Text typed by a person (a command-line option, a form field, a sweep axis
value) becomes a value with :func:`parse_text`, the one parser; the value is
then checked by :func:`check_params` (through the recipe validator).

The decorator also takes what the signature cannot say: a one-line summary,
a reference, the key relations the transform may produce (:data:`SAME`,
:data:`RENAMED`, :data:`NEW`, :data:`DROPPED`), exact ends (parameter values
at which the result *is* one of the inputs) and A1111's name for a method.
The contract tests run over everything registered here.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from modelkit.errors import ModelkitError

# key relations a transform may declare (see PlannedStep.origins)
SAME = "same"        # output key = input key
RENAMED = "renamed"  # output key comes from another input key
NEW = "new"          # output key the inputs do not have
DROPPED = "dropped"  # input key with no output
KEY_RELATIONS = (SAME, RENAMED, NEW, DROPPED)

# input roles
TENSOR = "tensor"
MODEL = "model"
CHECKPOINT = "checkpoint"
ADAPTER = "adapter"
ANY = "any"
ROLE_KINDS: dict[str, tuple[str, ...]] = {
    # inspect kinds each role accepts
    MODEL: ("checkpoint", "unet", "vae", "text_encoder"),
    CHECKPOINT: ("checkpoint", "unet"),
    ADAPTER: ("lora",),
    ANY: (),  # no check
}

METHOD = "method"
OP = "op"


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_BLOCKWISE = _Marker("blockwise")
_PER_MODEL = _Marker("per_model")
REQUIRED: Any = _Marker("required")

BlockWise = Annotated[float, _BLOCKWISE]
PerModel = Annotated[tuple[float, ...], _PER_MODEL]


class _Role:
    """The annotation of a model input of an op."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"<input {self.role}>"


Model = Annotated[Any, _Role(MODEL)]
Checkpoint = Annotated[Any, _Role(CHECKPOINT)]
Adapter = Annotated[Any, _Role(ADAPTER)]
Anything = Annotated[Any, _Role(ANY)]


@dataclass(frozen=True)
class Info:
    """What a parameter's annotation may add to its declaration:
    ``Annotated[float, Info("help", suggested=0.3)]``."""

    help: str = ""
    suggested: Any = None


def declare(hint: Any, help: str = "", suggested: Any = None) -> Any:
    """``Annotated[hint, Info(help, suggested)]``: a parameter declared once
    for the methods that share it (``alpha: Alpha``)."""
    return Annotated[hint, Info(help, suggested)]


# for method modules, which import only from here, modelkit.errors and torch
# (Annotated too: shared parameters are Annotated[float, Info(...)])
TYPE_CHECKING = typing.TYPE_CHECKING


@dataclass(frozen=True)
class Param:
    """One parameter of a transform. ``suggested`` is the value a front end
    fills in when the user gives none (a recipe must still give a required
    parameter); ``help`` is its one-line meaning."""

    name: str
    kind: str  # float, int, bool, str, choice, list, any
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    blockwise: bool = False
    per_model: bool = False
    blend: bool = False  # a blend weight: 0..1 interpolates; outside is allowed, warned
    help: str = ""
    suggested: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def initial(self) -> Any:
        """What a front end starts with: the default, else the suggested
        value (None: nothing, the user must give it)."""
        return self.suggested if self.required else self.default

    def describe(self) -> str:
        """``alpha: float, block-wise (required)`` and the like."""
        kind = self.kind
        if self.choices:
            kind = f"{'list of' if self.kind == 'list' else 'one of'} {'|'.join(self.choices)}"
        extra = [x for x, on in (("block-wise", self.blockwise),
                                 ("one per model", self.per_model),
                                 ("blend weight 0..1", self.blend)) if on]
        default = "required" if self.required else f"default {self.default!r}"
        if self.required and self.suggested is not None:
            default = f"required in recipes; suggested {self.suggested!r}"
        return f"{self.name}: {', '.join([kind, *extra])} ({default})"


@dataclass(frozen=True)
class Transform:
    """A registered transform (see the module docstring)."""

    name: str
    kind: str  # METHOD or OP
    fn: Callable[..., Any]
    inputs: tuple[tuple[str, str], ...]  # (name, role), variadic last if any
    variadic: bool
    params: dict[str, Param]
    summary: str
    reference: str = ""
    seeded: bool = False
    elementwise: bool = False
    keys: frozenset[str] = frozenset({SAME})
    ends: tuple[tuple[tuple[tuple[str, Any], ...], int], ...] = ()
    a1111: str | None = None
    min_models: int = 1
    doc: str = field(default="", compare=False)
    uses_device: bool = False

    def accepts(self, n: int) -> bool:
        """Whether the transform takes ``n`` model inputs."""
        if self.variadic:
            return n >= self.min_models
        return n == len(self.inputs)

    def arity(self) -> str:
        """How many models it takes, in words."""
        if self.variadic:
            return f"{self.min_models} or more"
        return str(len(self.inputs))

    def role(self, index: int) -> str:
        """The role of input number ``index``."""
        return self.inputs[min(index, len(self.inputs) - 1)][1]

    @property
    def n_models(self) -> int:
        """The fixed number of model inputs, or -1 when variadic."""
        return -1 if self.variadic else len(self.inputs)

    @property
    def defaults(self) -> dict[str, Any]:
        """Each parameter's default (``None`` for a required one)."""
        return {n: (None if p.required else p.default) for n, p in self.params.items()}

    def apply(self, tensors: Sequence[Any], params: Mapping[str, Any],
              generator: Any = None) -> Any:
        """Call a per-key method on ``tensors`` after checking the arity and
        the parameters (scalars only)."""
        if self.kind != METHOD:
            raise ModelkitError(f"{self.name} is an operation on models, not a per-key "
                                "method")
        if not self.accepts(len(tensors)):
            raise ModelkitError(f"{self.name} takes {self.arity()} models, got {len(tensors)}")
        kwargs = check_params(self, params)
        if self.seeded:
            kwargs["generator"] = generator
        return self.fn(*tensors, **kwargs)


TRANSFORMS: dict[str, Transform] = {}
# modules whose import registers the built-in transforms (loaded on first use)
BUILTIN_MODULES = ("modelkit.merge.methods", "modelkit.convert.transforms",
                   "modelkit.lora.transforms")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    _loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def get_transform(name: str, kind: str | None = None) -> Transform:
    """The transform registered as ``name`` (of ``kind``, METHOD or OP, when
    given); an unknown name raises a :class:`ModelkitError` with a
    suggestion and the known names."""
    _load_builtins()
    known = {n: t for n, t in TRANSFORMS.items() if kind is None or t.kind == kind}
    if name in known:
        return known[name]
    shown = name if len(name) <= 60 else name[:57] + "..."
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    what = {METHOD: "merge method", OP: "operation"}.get(kind or "", "method or operation")
    raise ModelkitError(f"unknown {what} '{shown}'{hint}; known: "
                        f"{', '.join(sorted(known))} (see 'modelkit methods')")


def all_transforms() -> dict[str, Transform]:
    """Every registered transform, by name."""
    _load_builtins()
    return dict(TRANSFORMS)


def ops_taking(*roles: str) -> list[str]:
    """The operations whose model inputs have these roles, in order (a
    variadic last input counts once): ``ops_taking(CHECKPOINT, ADAPTER)`` is
    the op that bakes adapters into a checkpoint. For messages that point
    to an op by name."""
    return sorted(n for n, t in all_transforms().items()
                  if t.kind == OP and tuple(r for _, r in t.inputs) == roles)


# --- signature parsing ---------------------------------------------------------


def _param_from(name: str, hint: Any, default: Any, method: bool) -> Param:
    extras: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *rest = typing.get_args(hint)
        extras = tuple(rest)
    info = next((x for x in extras if isinstance(x, Info)), None)
    if info is not None:
        others = tuple(x for x in extras if x is not info)
        # Annotated[(hint, *others)] rebuilt at run time (not a type annotation)
        args = (hint, *others)
        rebuilt = typing.cast(Any, Annotated)[args] if others else hint
        param = _param_from(name, rebuilt, default, method)
        return replace(param, help=info.help, suggested=info.suggested)
    if _PER_MODEL in extras:
        return Param(name, "float", default, per_model=True)
    if hint is Any:
        return Param(name, "any", default)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _param_from(name, non_none[0], default, method)
    if origin is typing.Literal:
        return Param(name, "choice", default, tuple(str(a) for a in args))
    if origin in (tuple, list):
        item = args[0] if args else str
        choices = tuple(str(a) for a in typing.get_args(item)) \
            if typing.get_origin(item) is typing.Literal else ()
        return Param(name, "list", default, choices)
    kinds = {float: "float", int: "int", bool: "bool", str: "str"}
    if hint not in kinds:
        raise TypeError(f"parameter {name!r}: unsupported annotation {hint!r}")
    blockwise = _BLOCKWISE in extras or (method and hint is float)
    return Param(name, kinds[hint], default, blockwise=blockwise)


def _role_of(name: str, hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        for extra in typing.get_args(hint)[1:]:
            if isinstance(extra, _Role):
                return extra.role
    if getattr(hint, "__name__", "") == "Tensor":
        return TENSOR
    raise TypeError(f"model input {name!r} needs a Tensor or a model-role annotation")


def _hint(fn: Callable[..., Any], annotation: Any) -> Any:
    """One annotation, evaluated on its own: a method module may import
    torch only under ``TYPE_CHECKING`` (``Tensor`` needs no torch here), so
    reading the declarations stays light (``modelkit --help``)."""
    if annotation is inspect.Parameter.empty or not isinstance(annotation, str):
        return None if annotation is inspect.Parameter.empty else annotation
    if annotation == "Tensor":
        return Annotated[Any, _Role(TENSOR)]
    return eval(annotation, getattr(fn, "__globals__", {}))  # the module's own source


def _parse_signature(fn: Callable[..., Any]) -> tuple[
        list[tuple[str, str]], bool, dict[str, Param], bool, bool]:
    inputs: list[tuple[str, str]] = []
    variadic = seeded = uses_device = False
    raw: list[tuple[str, Any, Any]] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL):
            inputs.append((p.name, _role_of(p.name, _hint(fn, p.annotation))))
            variadic = variadic or p.kind is p.VAR_POSITIONAL
        elif p.kind is p.KEYWORD_ONLY:
            if p.name == "generator":
                seeded = True
                continue
            if p.name == "device":
                uses_device = True
                continue
            default = REQUIRED if p.default is p.empty else p.default
            raw.append((p.name, _hint(fn, p.annotation), default))
    if not inputs:
        raise TypeError(f"{fn.__name__}: a transform takes at least one model input")
    method = inputs[0][1] == TENSOR
    params = {n: _param_from(n, h, d, method) for n, h, d in raw}
    return inputs, variadic, params, seeded, uses_device


def transform(name: str, *, summary: str, reference: str = "",
              keys: Sequence[str] = (SAME,), elementwise: bool = False,
              ends: Sequence[tuple[Mapping[str, Any], int]] = (),
              a1111: str | None = None, min_models: int | None = None,
              choices: Mapping[str, Sequence[str]] | None = None,
              blend: Sequence[str] = (),
              help: Mapping[str, str] | None = None,
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as transform ``name`` (see the module
    docstring). ``choices`` gives the allowed values of ``str`` parameters (or
    of the items of list parameters) from the vocabulary; ``blend`` names the
    parameters that are blend weights (0..1; a value outside is allowed and
    warned about, see :func:`param_warnings`); ``help`` each parameter's
    one-line meaning (unless its annotation's :class:`Info` gives it). The
    function is
    returned unchanged. Registering a name twice or an unreadable signature
    raises ``ValueError``/``TypeError`` (a programming error, not a user
    one)."""
    bad = [k for k in keys if k not in KEY_RELATIONS]
    if bad:
        raise ValueError(f"{name}: unknown key relation {bad[0]!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in TRANSFORMS:
            raise ValueError(f"transform '{name}' is already registered")
        inputs, variadic, params, seeded, uses_device = _parse_signature(fn)
        for pname, allowed in (choices or {}).items():
            p = params[pname]
            kind = "list" if p.kind == "list" else "choice"
            params[pname] = replace(p, kind=kind, choices=tuple(allowed))
        for pname, text in (help or {}).items():
            params[pname] = replace(params[pname], help=text)
        for pname in blend:
            params[pname] = replace(params[pname], blend=True)
        kind = METHOD if inputs[0][1] == TENSOR else OP
        fixed = len(inputs) - 1 if variadic else len(inputs)
        lowest = min_models if min_models is not None else max(1, fixed + int(variadic))
        TRANSFORMS[name] = Transform(
            name, kind, fn, tuple(inputs), variadic, params, summary, reference, seeded,
            elementwise, frozenset(keys),
            tuple((tuple(sorted(p.items())), i) for p, i in ends), a1111, lowest,
            inspect.getdoc(fn) or "", uses_device)
        return fn

    return register


# --- parameter values ---------------------------------------------------------

BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True,
              "off": False}


def _maybe_number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Typed(str):
    """Text a person typed for a parameter (``--param k=0.2``), carried as is
    into the recipe: the validator turns it into a value with the
    parameter's declaration (:func:`parse_text`), in its one pass over the
    parameters, so a front end needs no lookup of its own."""


def parse_text(p: Param | None, text: str) -> Any:
    """Text a person typed for parameter ``p`` (a command-line option, a
    form field, a sweep axis value) as a value: None when empty (the default
    applies); a number for a numeric parameter (a comma list of numbers for
    a per-model one); true/false (yes/no, on/off) for a bool. Anything else
    stays text for :func:`check_params` or the recipe checker to name (a
    block preset, a comma list of block values, a bad number). ``p`` None (a
    name the transform does not declare): a number when it reads as one."""
    text = text.strip()
    if not text:
        return None
    if p is not None and p.per_model:
        return [_maybe_number(x.strip()) for x in text.split(",")]
    if p is None or p.kind in ("float", "int"):
        return _maybe_number(text)
    if p.kind == "bool":
        return BOOL_WORDS.get(text.lower(), text)
    return text


def _number(t: Transform, p: Param, value: Any) -> float | int:
    where = f"{t.name}: parameter '{p.name}'"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelkitError(f"{where} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ModelkitError(f"{where} must be finite, not {value}")
    if p.kind == "int":
        if value != int(value):
            raise ModelkitError(f"{where} must be a whole number, not {value}")
        return int(value)
    return float(value)


def coerce(t: Transform, p: Param, value: Any) -> Any:
    """``value`` checked and converted for parameter ``p`` of ``t`` (scalars
    only: block-wise specs are resolved per architecture by the planner)."""
    where = f"{t.name}: parameter '{p.name}'"
    if p.kind == "any":
        return value
    if p.kind in ("float", "int"):
        return _number(t, p, value)
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise ModelkitError(f"{where} must be true or false, not {value!r}")
        return value
    if p.kind == "list":
        items = [x.strip() for x in value.split(",") if x.strip()] \
            if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
            raise ModelkitError(f"{where} must be a list of names, not {value!r}")
        for x in items:
            if p.choices and x not in p.choices:
                what = p.name[:-1] if p.name.endswith("s") else p.name
                raise ModelkitError(f"{t.name}: unknown {what} {x[:60]!r}; choose from "
                                    f"{', '.join(p.choices)}")
        return tuple(items)
    if not isinstance(value, str):
        raise ModelkitError(f"{where} must be a string, not {value!r}")
    if p.kind == "choice" and value not in p.choices:
        raise ModelkitError(f"{where}: {value!r} is not one of {', '.join(p.choices)}")
    return value


def check_params(t: Transform, params: Mapping[str, Any], n_models: int | None = None,
                 is_blockwise: Callable[[Any], bool] = lambda _: False) -> dict[str, Any]:
    """``params`` completed with defaults and checked. A value for which
    ``is_blockwise`` is true passes through for block-wise parameters (the
    planner resolves it against the architecture). Per-model values must
    number ``n_models`` minus the fixed inputs when ``n_models`` is given.

    Raises:
        ModelkitError: an unknown, missing or mistyped parameter, named.
    """
    for name in params:
        if name not in t.params:
            known = ", ".join(t.params) or "none"
            raise ModelkitError(f"{t.name}: unknown parameter '{name}' (parameters: {known})")
    out: dict[str, Any] = {}
    for name, p in t.params.items():
        value = params.get(name, p.default)
        if value is REQUIRED:
            raise ModelkitError(f"{t.name}: missing parameter '{name}'")
        if value is None or (p.blockwise and is_blockwise(value)):
            out[name] = value
        elif p.per_model:
            out[name] = _per_model(t, p, value, n_models)
        else:
            if is_blockwise(value):
                raise ModelkitError(f"{t.name}: parameter '{name}' cannot be given per "
                                    "block")
            out[name] = coerce(t, p, value)
    return out


def param_warnings(t: Transform, params: Mapping[str, Any], where: str = "") -> list[str]:
    """Warnings for checked parameter values: a blend weight outside 0..1
    (allowed: it extrapolates past the models, which is rarely meant). A
    value may be a number, per-model numbers or ``{block: weight}``."""
    out = []
    for name, p in t.params.items():
        value = params.get(name)
        if not p.blend or value is None:
            continue
        if isinstance(value, Mapping):
            values = list(value.values())
        else:
            values = list(value) if isinstance(value, list | tuple) else [value]
        bad = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)
               and not 0 <= v <= 1]
        if bad:
            worst = max(bad, key=lambda v: abs(v - 0.5))
            out.append(f"{where or t.name}: {name} {worst:g} is outside 0..1, the range of a "
                       "blend weight: the result extrapolates past the models")
    return out


def _per_model(t: Transform, p: Param, value: Any, n_models: int | None) -> tuple[float, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    out = tuple(float(_number(t, p, v)) for v in values)
    fixed = len(t.inputs) - 1
    if n_models is not None and len(out) not in (1, n_models - fixed):
        raise ModelkitError(f"{t.name}: parameter '{p.name}' needs one value per model "
                            f"({n_models - fixed}), got {len(out)}")
    if n_models is not None and len(out) == 1:
        out = out * (n_models - fixed)
    return out
