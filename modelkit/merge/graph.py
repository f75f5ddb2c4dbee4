"""Recipes with convert steps: every step becomes a key-by-key source.

Inputs are opened (files, pickles or diffusers folders); an ``op`` step is
its convert operation over the sources of its models; a group of merge steps
that feed each other is planned like a plain merge, its leaves being inputs
or op steps, and evaluated per key. The output step's source is then written
once, in the output format, so ``ema -> merge -> prune -> quantize`` reads
each input tensor when the output needs it and writes no intermediate file.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit import __version__
from modelkit.errors import ModelkitError
from modelkit.merge.recipe import InputSpec, Recipe
from modelkit.progress import Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    from modelkit.convert.base import Converted
    from modelkit.convert.provenance import InputHashes
    from modelkit.io.source import DerivedSource, Source
    from modelkit.merge.plan import Plan
    from modelkit.merge.run import MergeReport


class _Graph:
    def __init__(self, recipe: Recipe, stack: ExitStack, device: str) -> None:
        self.recipe, self.stack, self.device = recipe, stack, device
        self.built: dict[str, Source] = {}
        self.converted: list[Converted] = []
        self.plans: list[Plan] = []

    def node(self, name: str) -> Source:
        if name not in self.built:
            self.built[name] = self._build(name)
        return self.built[name]

    def _build(self, name: str) -> Source:
        from modelkit.convert.ops import apply_op
        from modelkit.convert.pipeline import open_input

        recipe = self.recipe
        if name in recipe.inputs:
            path = recipe.resolve(recipe.inputs[name].path)
            src = open_input(path, self.device)
            if hasattr(src, "close"):
                self.stack.callback(src.close)
            return src
        step = recipe.steps[name]
        if step.op:
            models = [self.node(m) for m in step.models]
            try:
                conv = apply_op(step.op, models, step.params)
            except ModelkitError as exc:
                raise ModelkitError(f"{recipe.source}: steps.{name}: {exc}") from None
            self.converted.append(conv)
            return conv.source
        return self._merge(name)

    def _merge_group(self, name: str) -> list[str]:
        group: list[str] = []

        def visit(n: str) -> None:
            step = self.recipe.steps.get(n)
            if step is None or step.op or n in group:
                return
            for m in step.models:
                visit(m)
            group.append(n)

        visit(name)
        return group

    def _merge(self, name: str) -> DerivedSource:
        from modelkit.io.reader import open_model
        from modelkit.io.source import DerivedSource, input_paths_of, tensor_info
        from modelkit.merge.plan import make_plan
        from modelkit.merge.run import _Evaluator, _produce

        recipe = self.recipe
        group = self._merge_group(name)
        leaves = [m for g in group for m in recipe.steps[g].models if m not in group]
        leaves = list(dict.fromkeys(leaves))
        sources = {leaf: self.node(leaf) for leaf in leaves}
        sub = Recipe({leaf: InputSpec(leaf, str(getattr(sources[leaf], "label", leaf)))
                      for leaf in leaves},
                     {g: recipe.steps[g] for g in group}, None, recipe.output_dtype, name,
                     recipe.options, recipe.base_dir, recipe.source)
        plan = make_plan(sub, sources)
        self.plans.append(plan)
        vae = self.stack.enter_context(open_model(plan.vae.path, self.device)) \
            if plan.vae else None
        ev = _Evaluator(plan, sources, self.device)
        infos = {k.key: tensor_info(k.key, k.dtype, k.shape) for k in plan.keys}
        paths = input_paths_of([*sources.values(), *([vae] if vae else [])])
        return DerivedSource(f"merge:{name}", infos, {}, _produce(plan, ev, vae), paths)


def _jsonable(report: Any) -> Any:
    return asdict(report) if is_dataclass(report) else report  # type: ignore[arg-type]


def _provenance(recipe: Recipe, graph: _Graph, hashes: InputHashes) -> dict[str, str]:
    from modelkit.merge.provenance import RECIPE_KEY

    by_input = {}
    for name, spec in recipe.inputs.items():
        path = recipe.resolve(spec.path)
        by_input[name] = hashes.values.get(path)
    pinned = recipe.with_hashes({n: h for n, h in by_input.items() if h}, absolute=True)
    inputs = {n: {"file": recipe.resolve(s.path).name, "sha256": by_input[n]}
              for n, s in recipe.inputs.items()}
    meta = {RECIPE_KEY: pinned.to_yaml(), "modelkit.version": __version__,
            "modelkit.inputs": json.dumps(inputs)}
    if graph.plans:
        meta["modelkit.arch"] = graph.plans[0].arch
        meta["modelkit.block_map"] = recipe.options.block_map
    return meta


def _check_pins(recipe: Recipe) -> None:
    from modelkit.io.hashcache import cached_hashes

    for name, spec in recipe.inputs.items():
        path = recipe.resolve(spec.path)
        if spec.sha256 and path.is_file():
            got = cached_hashes(path, tensor_hash=False).sha256
            if got != spec.sha256:
                raise ModelkitError(f"input {name!r}: {path} has sha256 {got[:12]}..., the "
                                    f"recipe pins {spec.sha256[:12]}...; the file changed "
                                    "since the recipe was locked")


def run_graph(recipe: Recipe, out: Path, *, dry_run: bool = False,
              progress: ProgressFn = no_progress) -> MergeReport:
    """Run a recipe that has convert steps or a non-safetensors output."""
    from modelkit.convert.base import describe
    from modelkit.convert.pipeline import write_output
    from modelkit.io.reader import resolve_device
    from modelkit.merge.run import MergeReport

    start = time.perf_counter()
    with ExitStack() as stack:
        graph = _Graph(recipe, stack, resolve_device(recipe.options.device))
        final = graph.node(recipe.output_step)
        rep = describe(final)
        merged = sum(1 for p in graph.plans for k in p.keys if k.action == "merge")
        report = MergeReport(out, rep.arch, len(final.infos), merged,
                             len(final.infos) - merged, 0, 0,
                             sum(i.nbytes for i in final.infos.values()),
                             max((p.peak_estimate() for p in graph.plans), default=0),
                             dry_run=dry_run)
        for plan in graph.plans:
            report.warnings += plan.warnings
        if dry_run:
            report.operations = [{"op": c.op, "params": c.params} for c in graph.converted]
            return report
        _check_pins(recipe)
        for conv in graph.converted:
            if conv.prepare is not None:
                conv.prepare(progress)
        result = write_output(final, out, fmt=recipe.output_format,
                              history=[(c.op, c.params, c.source.input_paths)
                                       for c in graph.converted],
                              metadata_for=lambda h: _provenance(recipe, graph, h),
                              progress=progress, task="recipe")
    report.output_bytes = result.bytes_written
    report.seconds = time.perf_counter() - start
    report.operations = [{"op": c.op, "params": c.params, "report": _jsonable(c.report)}
                         for c in graph.converted]
    report.warnings += result.notes
    progress(Progress("recipe", 1, 1, "files", str(out)))
    return report
