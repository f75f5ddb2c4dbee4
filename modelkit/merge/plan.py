"""Turn a merge group into a per-key plan, from headers alone.

Everything that can be wrong with a merge is found here, before any tensor is
read: unknown methods or parameters, block lists of the wrong length,
mismatched architectures, missing keys, shape mismatches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch.configs import UNET_PREFIX, VAE_PREFIX
from modelkit.arch.parts import OTHER, TE, UNET, VAE, part_of
from modelkit.arch.registry import get as get_arch
from modelkit.arch.registry import handles, handling, listed
from modelkit.core.keyregex import check_key_regex
from modelkit.core.recipe import BlockParam, Options, RecipeError, StepSpec, primary_of
from modelkit.errors import ModelkitError
from modelkit.io.header import TensorInfo
from modelkit.vocab import AUTO_DTYPE, CHUNK_ELEMENTS, KEEP, USER_DTYPES
from modelkit.wording import with_article

if TYPE_CHECKING:
    from modelkit.inspect.report import ModelReport
    from modelkit.io.source import Source

INPAINT_KEY = UNET_PREFIX + "input_blocks.0.0.weight"


@dataclass(frozen=True)
class InputFile:
    name: str
    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    arch: str
    variant: str | None
    prediction: str = "unknown"
    key_prefix: str = ""  # what a standalone UNet's bare keys lack: UNET_PREFIX
    layout: str | None = None  # original or diffusers key names

    @property
    def what(self) -> str:
        """``a.safetensors (wan i2v-14b)``: the file and what it is, for messages."""
        return f"{self.path.name} ({' '.join(x for x in (self.arch, self.variant) if x)})"


def _bare_prefix(kind: str, infos: dict[str, TensorInfo]) -> str:
    """UNET_PREFIX for a standalone UNet saved without it (ComfyUI's
    diffusion_models, diffusers-free exports), else ""."""
    if kind == "unet" and not any(k.startswith(UNET_PREFIX) for k in infos):
        return UNET_PREFIX
    return ""


@dataclass(frozen=True)
class MergeGroupSpec:
    """What the planner needs of one merge group (merge steps that feed each
    other), nothing else of the recipe.

    Args:
        name: the group's output step.
        inputs: the group's leaves, already open, by name: recipe inputs or
            earlier operations (their labels name them in messages).
        steps: the group's merge steps, by name.
        output_dtype: the output dtype choice (``keep``, ``fp16``...).
        options: the recipe's run options (components, excluded keys,
            missing-key policy, block map, seed).
        vae: the VAE to bake in, already open, or None.
        source: names the recipe in messages.
    """

    name: str
    inputs: dict[str, Source]
    steps: dict[str, StepSpec]
    output_dtype: str = "fp16"
    options: Options = field(default_factory=Options)
    vae: Source | None = None
    source: str = "<recipe>"

    @property
    def primary(self) -> str:
        """The leaf the output's keys come from (first models all the way)."""
        return primary_of(self.steps, self.name)


@dataclass(frozen=True)
class KeyPlan:
    """What happens to one output key: ``merge`` through the step DAG,
    ``copy`` from the primary input, ``vae`` from the baked VAE file,
    ``position_ids`` rebuilt as int64 arange."""

    key: str
    action: str
    dtype: str
    shape: tuple[int, ...]
    source_key: str | None = None


@dataclass
class Plan:
    group: MergeGroupSpec
    inputs: dict[str, InputFile]
    primary: str
    arch: str
    keys: list[KeyPlan]
    block_params: dict[tuple[str, str], dict[str, float]]
    vae: InputFile | None = None
    skipped: list[str] = field(default_factory=list)
    ignored: int = 0  # keys only in secondary inputs
    warnings: list[str] = field(default_factory=list)

    def full_key(self, key: str) -> str:
        """``key`` as a single-file checkpoint spells it (the primary input
        may be a standalone UNet without the prefix): what classifies a key
        and finds its block."""
        prefix = self.inputs[self.primary].key_prefix
        return prefix + key if prefix and part_of(key) == OTHER else key

    @property
    def output_bytes(self) -> int:
        from modelkit.io.writer import TensorSpec

        return sum(TensorSpec(k.key, k.dtype, k.shape).nbytes for k in self.keys)

    def peak_estimate(self) -> int:
        """Bytes held at once beyond the interpreter: the largest merged
        output tensor, plus a float32 buffer per input and step of the DAG,
        whole-tensor for non-element-wise methods, one chunk otherwise."""
        from modelkit.io.writer import TensorSpec
        from modelkit.merge.methods import get_method

        merged = [k for k in self.keys if k.action == "merge"]
        if not merged:
            return 0
        largest = max(merged, key=lambda k: math.prod(k.shape))
        out_bytes = TensorSpec(largest.key, largest.dtype, largest.shape).nbytes
        slots = len(self.group.inputs) + len(self.group.steps)
        elementwise = all(get_method(s.transform).elementwise
                          for s in self.group.steps.values())
        per_slot = min(math.prod(largest.shape), CHUNK_ELEMENTS) if elementwise else \
            math.prod(largest.shape)
        return out_bytes + per_slot * 4 * slots


def component_of(key: str) -> str:
    """``unet``, ``vae``, ``te`` or ``other`` for a single-file checkpoint key."""
    part = part_of(key)
    return part if part in (UNET, VAE, TE) else "other"


def _source_input(name: str, source: Source) -> tuple[InputFile, ModelReport]:
    """An input that is already open (a file, a diffusers folder or the
    result of an earlier step), described from its infos."""
    from modelkit.inspect.describe import describe
    from modelkit.io.source import source_label

    rep = describe(source)
    path = Path(source_label(source))
    return InputFile(name, path, source.infos, source.metadata, rep.arch, rep.variant,
                     rep.prediction.type, _bare_prefix(rep.kind, source.infos),
                     rep.layout), rep


def _load_input(name: str, source: Source) -> InputFile:
    file, rep = _source_input(name, source)
    path = file.path
    if rep.kind not in ("checkpoint", "unet"):
        hint = ""
        if rep.kind == "lora":
            from modelkit.core.registry import ADAPTER, CHECKPOINT, ops_taking

            ops = " or ".join(f"'op: {op}'" for op in ops_taking(CHECKPOINT, ADAPTER))
            hint = f"; bake a LoRA into a checkpoint with 'modelkit lora bake' or an {ops} step"
        raise ModelkitError(f"input {name!r}: {path} is {with_article(rep.kind)}, not a "
                            "checkpoint; "
                            f"merges take checkpoints{hint}")
    return file


def _check_archs(inputs: dict[str, InputFile]) -> str:
    archs = {i.arch for i in inputs.values()}
    unknown = [i for i in inputs.values() if not handles(i.arch, "merge")]
    if unknown:
        raise ModelkitError(f"input {unknown[0].name!r}: {unknown[0].path} has architecture "
                            f"{unknown[0].arch}; modelkit merges {listed(handling('merge'))} "
                            "checkpoints")
    if len(archs) > 1:
        desc = ", ".join(f"{i.path.name} is {i.arch}" for i in inputs.values())
        raise ModelkitError(f"cannot merge different architectures: {desc}; pick inputs "
                            "of one architecture")
    arch = archs.pop()
    entry = get_arch(arch)
    layouts = {i.layout for i in inputs.values()}
    # a transformer saved with BFL/ComfyUI names and one with diffusers names
    # (an SD diffusers folder opens with the LDM names)
    if entry is not None and entry.spec is None and len(layouts) > 1:
        desc = ", ".join(f"{i.path.name} has the {i.layout} layout" for i in inputs.values())
        raise ModelkitError(f"cannot merge different key layouts of {arch}: {desc}; "
                            "save the inputs in one layout first")
    return arch


def variants_differ(plan: Plan) -> str:
    """``""``, or ``" (a.safetensors (wan i2v-14b), b.safetensors (wan t2v-14b))"``
    when the inputs are different variants of their family: what a report of
    keys only some inputs have names."""
    files = list(plan.inputs.values())
    if len({f.variant for f in files}) < 2:
        return ""
    return f" ({', '.join(f.what for f in files)})"


def _check_step(group: MergeGroupSpec, step: StepSpec, arch: str
                ) -> dict[tuple[str, str], dict[str, float]]:
    """Resolve the step's block-wise parameters against ``arch`` (the rest
    was checked when the recipe was validated)."""
    from modelkit.arch.blocks import parse_blocks

    where = f"{group.source}: steps.{step.name}"
    blocks: dict[tuple[str, str], dict[str, float]] = {}
    for pname, value in step.params.items():
        if isinstance(value, BlockParam):
            spec = value.preset if value.preset else value.blocks
            try:
                blocks[(step.name, pname)] = parse_blocks(spec, arch, vae_slot=True)
            except ModelkitError as exc:
                raise RecipeError(f"{where}.params.{pname}: {exc}") from None
    return blocks


def _leaves(group: MergeGroupSpec, name: str) -> list[str]:
    if name in group.inputs:
        return [name]
    out: list[str] = []
    for m in group.steps[name].models:
        out += [x for x in _leaves(group, m) if x not in out]
    return out


def _shape_problem(key: str, shapes: dict[str, tuple[int, ...]], primary: str) -> str | None:
    ref = shapes[primary]
    bad = {n: s for n, s in shapes.items() if s != ref}
    if not bad:
        return None
    if key == INPAINT_KEY and all(len(s) == 4 and s[0] == ref[0] and s[2:] == ref[2:]
                                  for s in bad.values()):
        if all(s[1] < ref[1] for s in bad.values()):
            return None  # A is the inpainting / pix2pix model: first channels merge
        bigger = max(shapes, key=lambda n: shapes[n][1])
        return (f"{key}: {bigger} has {shapes[bigger][1]} input channels, A ({primary}) has "
                f"{ref[1]}; put the inpainting/pix2pix model first (as model A)")
    desc = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    return f"{key}: shapes differ ({desc})"


def _out_dtype(group: MergeGroupSpec, info: TensorInfo, arch: str) -> str:
    if not info.is_float or group.output_dtype == KEEP:
        return info.dtype
    if group.output_dtype == AUTO_DTYPE:
        # bf16 stays bf16 (no fp16 overflow); otherwise the family's own
        # dtype (registry default_dtype: fp16 for SD, bf16 for Flux, Wan...),
        # an fp16 file of a bf16 family keeping its fp16
        if info.dtype == "BF16":
            return info.dtype
        entry = get_arch(arch)
        family = USER_DTYPES[entry.default_dtype] if entry is not None else "F16"
        return "F16" if family == "BF16" and info.dtype == "F16" else family
    return USER_DTYPES[group.output_dtype]


def _key_plans(plan: Plan) -> None:
    group = plan.group
    primary = plan.inputs[plan.primary]
    leaves = _leaves(group, group.name)
    opts = group.options
    excluded = [check_key_regex(rx) for rx in opts.exclude_keys]
    problems: list[str] = []
    entry = get_arch(plan.arch)
    # a transformer family's block list covers its transformer only: the VAE
    # and text encoders of an all-in-one file are A's (or the baked VAE)
    transformer_only = entry is not None and entry.spec is None
    for key, info in primary.infos.items():
        comp = component_of(plan.full_key(key))
        if transformer_only:
            comp = family_component(plan.arch, plan.full_key(key))
        if key.endswith("position_ids") and comp == "te":
            plan.keys.append(KeyPlan(key, "position_ids", "I64", info.shape))
            continue
        if plan.vae is not None and comp == "vae":
            plan.keys.append(_vae_plan(plan, key, info, group, _vae_prefix(plan.arch)))
            continue
        if transformer_only and comp != UNET:
            comp = "other"
        if (not info.is_float or comp not in opts.include or comp == "other"
                or any(rx.search(key) for rx in excluded)):
            plan.keys.append(KeyPlan(key, "copy", info.dtype, info.shape))
            continue
        missing = [n for n in leaves if key not in plan.inputs[n].infos]
        if missing:
            if opts.missing_keys == "error":
                problems.append(f"{key} is missing from {', '.join(missing)}")
                continue
            if opts.missing_keys == "skip":
                plan.skipped.append(key)
                continue
            plan.keys.append(KeyPlan(key, "copy", info.dtype, info.shape))
            plan.warnings.append(f"{key}: missing from {', '.join(missing)}; taken from A")
            continue
        shapes = {n: plan.inputs[n].infos[key].shape for n in leaves}
        problem = _shape_problem(key, shapes, plan.primary)
        if problem:
            problems.append(problem)
            continue
        plan.keys.append(KeyPlan(key, "merge", _out_dtype(group, info, plan.arch), info.shape))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        hint = (" (set options.missing_keys / --missing take-first or skip)"
                if "missing" in problems[0] else "")
        raise ModelkitError(f"cannot merge{variants_differ(plan)}: {problems[0]}{more}{hint}")
    names = set(primary.infos)
    only = [(n, k) for n in leaves[1:] for k in plan.inputs[n].infos if k not in names]
    plan.ignored = len(only)
    if only and variants_differ(plan):
        first = plan.inputs[only[0][0]]
        plan.warnings.append(f"{len(only)} keys only {first.what} has are left out (first: "
                             f"{only[0][1]}); the output has the keys of A, "
                             f"{primary.what}")


def family_component(arch: str, key: str) -> str:
    """``unet``, ``vae``, ``te`` or ``other`` for a key of a transformer
    family's file, by its registry components' prefixes (a Flux.1
    all-in-one file's ``vae.`` and ``text_encoders.``)."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    roles = {registry.DENOISER: UNET, registry.VAE: VAE, registry.TEXT_ENCODER: TE}
    for comp in sorted(entry.components if entry else (), key=lambda c: -len(c.prefix)):
        if key.startswith(comp.prefix):
            return roles.get(comp.role, "other")
    return "other"


def _vae_prefix(arch: str) -> str:
    """Where ``arch``'s checkpoint keeps its VAE (``first_stage_model.``,
    Flux.1's ``vae.``)."""
    from modelkit.arch import registry

    entry = registry.get(arch)
    if entry is None or entry.spec is not None:
        return VAE_PREFIX
    return next((c.prefix for c in entry.components if c.role == registry.VAE), VAE_PREFIX)


def _vae_plan(plan: Plan, key: str, info: TensorInfo, group: MergeGroupSpec,
              prefix: str = VAE_PREFIX) -> KeyPlan:
    assert plan.vae is not None
    short = key[len(prefix):]
    src = key if key in plan.vae.infos else short
    vinfo = plan.vae.infos.get(src)
    if vinfo is None:
        raise ModelkitError(f"VAE {plan.vae.path}: has no {short!r}; it does not fit "
                            f"this {plan.arch} checkpoint")
    if vinfo.shape != info.shape:
        raise ModelkitError(f"VAE {plan.vae.path}: {short} is {list(vinfo.shape)}, the "
                            f"checkpoint needs {list(info.shape)}; wrong VAE for {plan.arch}")
    return KeyPlan(key, "vae", _out_dtype(group, vinfo, plan.arch), info.shape, src)


def _load_vae(source: Source | None) -> InputFile | None:
    if source is None:
        return None
    file, rep = _source_input("vae", source)
    if "vae" not in rep.components:
        raise ModelkitError(f"VAE {file.path}: is {with_article(rep.kind)} with no VAE in it")
    return file


def make_plan(group: MergeGroupSpec) -> Plan:
    """Check a merge group against its inputs' headers and plan every
    output key.

    Raises:
        ModelkitError: anything that would stop the merge, with the file, key
            or recipe field named.
    """
    files = {n: _load_input(n, src) for n, src in group.inputs.items()}
    arch = _check_archs(files)
    blocks: dict[tuple[str, str], dict[str, float]] = {}
    for step in group.steps.values():
        blocks.update(_check_step(group, step, arch))
    plan = Plan(group, files, group.primary, arch, [], blocks, _load_vae(group.vae))
    plan.warnings += _param_warnings(group, blocks)
    _key_plans(plan)
    entry = get_arch(arch)
    if (plan.vae is not None and entry is not None and entry.spec is None
            and not any(k.action == "vae" for k in plan.keys)):
        raise ModelkitError(f"VAE {plan.vae.path}: {plan.inputs[plan.primary].path.name} has "
                            f"no VAE (no {_vae_prefix(arch)}* keys) to bake it into; a bare "
                            f"{plan.arch} transformer takes no VAE")
    _prediction_warning(plan)
    return plan


def _param_warnings(group: MergeGroupSpec, blocks: dict[tuple[str, str], dict[str, float]]
                    ) -> list[str]:
    """The transforms' own warnings on parameter values (a blend weight
    outside 0..1), block-wise values resolved."""
    from modelkit.core.registry import get_transform, param_warnings

    out = []
    for step in group.steps.values():
        if not step.is_method:
            continue
        params = {n: blocks.get((step.name, n), v) for n, v in step.params.items()}
        out += param_warnings(get_transform(step.method), params,
                              f"steps.{step.name} ({step.method})")
    return out


def _prediction_warning(plan: Plan) -> None:
    """Warn when the inputs' prediction types (eps, v) disagree: the output
    keeps A's markers and metadata, so it predicts like A."""
    known = {n: f for n, f in plan.inputs.items() if f.prediction in ("eps", "v")}
    if len({f.prediction for f in known.values()}) < 2:
        return
    desc = ", ".join(f"{f.path.name} is {f.prediction}-prediction" for f in known.values())
    primary = plan.inputs[plan.primary]
    plan.warnings.append(f"prediction types differ ({desc}); the output keeps A's markers "
                         f"and predicts like A ({primary.prediction}): check it renders, or "
                         "merge models of one prediction type")
