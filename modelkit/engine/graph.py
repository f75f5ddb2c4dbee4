"""Compile a recipe into lazy sources, from headers alone.

Every input is opened (:func:`modelkit.io.open.open_source`); every step is
its transform applied to the sources of its models. An operation (``op``)
returns a :class:`~modelkit.core.step.PlannedStep`; merge methods that feed
each other form a *merge group*, planned like one merge (leaves are inputs or
earlier operations) and evaluated per key in float32 with no rounding between
its steps. The output step's source is what the writer streams: each input
tensor is read when the output needs it, and no intermediate file exists.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.core.recipe import InputSpec, Recipe, yaml_params
from modelkit.core.registry import METHOD, ROLE_KINDS, Transform, get_transform
from modelkit.errors import ModelkitError
from modelkit.progress import PLAN, READ, Progress, ProgressFn, no_progress
from modelkit.wording import with_article

if TYPE_CHECKING:
    from modelkit.core.step import PlannedStep
    from modelkit.io.source import Source
    from modelkit.merge.evaluate import Evaluator, MergeReport
    from modelkit.merge.plan import Plan


@dataclass
class StepRecord:
    """One step as planned: what ran, with which parameters, on which files.
    ``report`` fills in while the output is written."""

    name: str
    transform: str
    kind: str  # method or op
    params: dict[str, Any]
    report: Any
    files: tuple[Path, ...]
    planned: PlannedStep | None = None


@dataclass
class MergeGroup:
    """Merge steps evaluated together per key."""

    name: str  # the group's output step
    steps: list[str]
    plan: Plan
    evaluator: Evaluator
    report: MergeReport
    leaves: dict[str, Source] = field(default_factory=dict)


class Graph:
    """The recipe's steps as lazy sources (see the module docstring).

    Args:
        recipe: a validated recipe.
        stack: closes every opened file when the run ends.
        device: where tensors are read and computed.
        progress: receives ``plan`` and ``read`` events.
    """

    def __init__(self, recipe: Recipe, stack: ExitStack, device: str,
                 progress: ProgressFn = no_progress) -> None:
        self.recipe, self.stack, self.device, self.progress = recipe, stack, device, progress
        self.built: dict[str, Source] = {}
        self.inputs: dict[str, Source] = {}
        self.records: list[StepRecord] = []
        self.groups: list[MergeGroup] = []
        self.vae: Source | None = None

    @property
    def files(self) -> list[Path]:
        """Every file the run reads, once each, inputs first."""
        from modelkit.io.source import input_paths_of

        extra = [self.vae] if self.vae is not None else []
        return list(input_paths_of([*self.inputs.values(), *extra]))

    def open_inputs(self) -> None:
        """Open every file the run reads (headers only), once per graph: the
        inputs, one ``open inputs`` event each however often it is asked,
        and the VAE a merge bakes in."""
        names = list(self.recipe.inputs)
        for i, name in enumerate(names, 1):
            if name in self.built:
                continue
            self.node(name)
            self.progress(Progress("open inputs", i, len(names), "files", name, PLAN))
        if any(s.is_method for s in self.recipe.steps.values()):
            self._open_vae()

    def build(self) -> Source:
        """Open the inputs and plan every step the output needs."""
        self.open_inputs()
        return self.node(self.recipe.output_step)

    def node(self, name: str) -> Source:
        """The source of an input or step, planned once."""
        if name not in self.built:
            self.built[name] = self._build(name)
        return self.built[name]

    def _build(self, name: str) -> Source:
        recipe = self.recipe
        if name in recipe.inputs:
            return self._open(name, recipe.inputs[name])
        step = recipe.steps[name]
        t = get_transform(step.transform)
        if t.kind == METHOD:
            return self._merge(name)
        return self._op(name, t)

    def _open(self, name: str, spec: InputSpec) -> Source:
        from modelkit.io.files import check_input_file
        from modelkit.io.formats import by_suffix
        from modelkit.io.open import open_source

        path = self.recipe.resolve(spec.path)
        if not path.is_dir():
            check_input_file(path, f"input {name!r}")
        fmt = by_suffix(path)
        if fmt is not None and fmt.slow_open:
            self.progress(Progress(path.name, 0, 1, "files", path.name, READ))
        src = open_source(path, self.device)
        close = getattr(src, "close", None)
        if close is not None:
            self.stack.callback(close)
        self.inputs[name] = src
        return src

    def _op(self, name: str, t: Transform) -> Source:
        from modelkit.core.registry import check_params

        step = self.recipe.steps[name]
        models = [self.node(m) for m in step.models]
        try:
            for i, src in enumerate(models):
                check_role(t, i, src)
            params = dict(step.checked) if step.checked is not None else \
                check_params(t, step.params, len(models))
            if t.uses_device:
                params["device"] = self.device
            planned: PlannedStep = t.fn(*models, **params)
        except ModelkitError as exc:
            if not self.recipe.from_yaml:
                raise
            raise type(exc)(f"{self.recipe.source}: steps.{name}: {exc}") from None
        self.records.append(StepRecord(name, t.name, t.kind, yaml_params(planned.params),
                                       planned.report, planned.source.input_paths, planned))
        return planned.source

    def _merge_group(self, name: str) -> list[str]:
        group: list[str] = []

        def visit(n: str) -> None:
            step = self.recipe.steps.get(n)
            if step is None or n in group or get_transform(step.transform).kind != METHOD:
                return
            for m in step.models:
                visit(m)
            group.append(n)

        visit(name)
        return group

    def _merge(self, name: str) -> Source:
        from modelkit.merge.evaluate import merge_report, merge_source
        from modelkit.merge.plan import MergeGroupSpec, make_plan

        recipe = self.recipe
        group = self._merge_group(name)
        leaves = list(dict.fromkeys(m for g in group for m in recipe.steps[g].models
                                    if m not in group))
        sources = {leaf: self.node(leaf) for leaf in leaves}
        vae = self._open_vae()
        plan = make_plan(MergeGroupSpec(
            name, sources, {g: recipe.steps[g] for g in group}, recipe.output_dtype,
            recipe.options, vae, recipe.source))
        source, ev = merge_source(plan, sources, vae, self.device, f"merge:{name}")
        report = merge_report(plan)
        self.groups.append(MergeGroup(name, group, plan, ev, report, sources))
        for g in group:
            step = recipe.steps[g]
            self.records.append(StepRecord(g, step.transform, METHOD, yaml_params(step.params),
                                           report if g == name else None,
                                           self._files_of(g, sources)))
        return source

    def _files_of(self, step: str, leaves: dict[str, Source]) -> tuple[Path, ...]:
        """The files a step of a merge group reads, through its group."""
        files: list[Path] = []
        todo = [step]
        while todo:
            name = todo.pop()
            if name in leaves:
                files += [p for p in leaves[name].input_paths if p not in files]
            else:
                todo += reversed(self.recipe.steps[name].models)
        return tuple(files)

    def _open_vae(self) -> Source | None:
        """The recipe's VAE to bake in (options.vae), opened once."""
        if not self.recipe.options.vae:
            return None
        if self.vae is None:
            from modelkit.io.files import check_input_file
            from modelkit.io.open import open_source

            path = check_input_file(self.recipe.resolve(self.recipe.options.vae), "VAE")
            self.vae = open_source(path, self.device)
            close = getattr(self.vae, "close", None)
            if close is not None:
                self.stack.callback(close)
        return self.vae

    @property
    def planned_steps(self) -> list[PlannedStep]:
        """The operations' planned steps, in planning order."""
        return [r.planned for r in self.records if r.planned is not None]


def check_role(t: Transform, index: int, source: Source) -> None:
    """Refuse an input whose kind does not fit the transform's declared role
    (a LoRA given to prune, an embedding given as a VAE donor)."""
    kinds = ROLE_KINDS.get(t.role(index), ())
    if not kinds:
        return
    from modelkit.inspect.describe import describe
    from modelkit.io.source import source_label

    kind = describe(source).kind
    if kind not in kinds:
        role = t.role(index)
        raise ModelkitError(f"{source_label(source)}: is {with_article(kind)}, not "
                            f"{with_article(role)}; {t.name} "
                            f"takes {' or '.join(kinds)} files as its "
                            f"{t.inputs[min(index, len(t.inputs) - 1)][0]}")
