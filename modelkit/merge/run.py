"""Run a planned merge: one key at a time from memory-mapped inputs into the
streaming writer. Element-wise step graphs run in 1M-element chunks (the
float32 math stays in cache); others run on whole tensors."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import ModelkitError
from modelkit.merge.plan import CHUNK_ELEMENTS, INPAINT_KEY, KeyPlan, Plan, make_plan
from modelkit.merge.recipe import BlockParam, Recipe
from modelkit.progress import Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    import torch

    from modelkit.io.reader import ModelSource

CHUNK = CHUNK_ELEMENTS


@dataclass
class MergeReport:
    """What a merge did."""

    output: Path | None
    arch: str
    n_keys: int
    n_merged: int
    n_copied: int
    n_skipped: int
    n_ignored: int
    output_bytes: int
    peak_estimate_bytes: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    operations: list[dict[str, Any]] = field(default_factory=list)  # convert steps run


class _Evaluator:
    """Evaluates the step DAG for one key over (possibly chunked) inputs."""

    def __init__(self, plan: Plan, sources: dict[str, ModelSource], device: str) -> None:
        from modelkit.merge.methods import check_params, get_method

        self.plan, self.sources, self.device = plan, sources, device
        recipe = plan.recipe
        self.methods = {n: get_method(s.method) for n, s in recipe.steps.items()}
        self.scalars = {
            n: check_params(self.methods[n], {k: (0.0 if isinstance(v, BlockParam) else v)
                                              for k, v in s.params.items()})
            for n, s in recipe.steps.items()
        }
        self.order = _step_order(recipe)
        self.elementwise = all(self.methods[n].elementwise for n in self.order)

    def params(self, step: str, key: str) -> dict[str, Any]:
        from modelkit.arch.blocks import block_of

        out = dict(self.scalars[step])
        for (s, pname), per_block in self.plan.block_params.items():
            if s == step:
                block = block_of(key, self.plan.arch, self.plan.recipe.options.block_map,
                                 vae_slot="VAE" in per_block)
                out[pname] = per_block[block]
        return out

    def run(self, key: str, leaf: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The output step's tensor for ``key``; ``leaf(name)`` reads an input.

        Steps run in topological order from a local dict that dies with the
        call (a self-referencing closure here kept every chunk alive until
        the cyclic garbage collector ran: hundreds of MB)."""
        import torch

        recipe = self.plan.recipe
        values: dict[str, torch.Tensor] = {}
        for name in self.order:
            step = recipe.steps[name]
            args = []
            for ref in step.models:
                if ref not in values:
                    values[ref] = leaf(ref)
                args.append(values[ref])
            kwargs = self.params(name, key)
            if self.methods[name].seeded:
                seed = zlib.crc32(f"{recipe.options.seed}:{name}:{key}".encode())
                kwargs["generator"] = torch.Generator(self.device).manual_seed(seed)
            values[name] = self.methods[name].fn(*args, **kwargs)
        return values.pop(recipe.output_step)


def _step_order(recipe: Recipe) -> list[str]:
    """Steps the output depends on, each after the steps it uses."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in recipe.inputs or name in order:
            return
        for ref in recipe.steps[name].models:
            visit(ref)
        order.append(name)

    visit(recipe.output_step)
    return order


def _compute_dtype() -> torch.dtype:
    import torch

    return torch.float32


def _merge_key(ev: _Evaluator, kp: KeyPlan, out_dtype: torch.dtype) -> torch.Tensor:
    import torch

    cd = _compute_dtype()
    tensors = {n: s.get(kp.key) for n, s in ev.sources.items()}
    primary = tensors[ev.plan.primary]
    if kp.key == INPAINT_KEY:
        n = min(t.shape[1] for t in tensors.values())
        if n != primary.shape[1]:  # inpainting/pix2pix A: merge the first n channels
            out = primary.to(device=ev.device, dtype=cd).clone()
            out[:, :n] = ev.run(kp.key, lambda name: tensors[name][:, :n].to(
                device=ev.device, dtype=cd))
            return out.to(out_dtype)
    numel = primary.numel()
    if not ev.elementwise or numel <= CHUNK:
        return ev.run(kp.key, lambda name: tensors[name].to(device=ev.device, dtype=cd)
                      ).to(out_dtype)
    flat = {n: t.reshape(-1) for n, t in tensors.items()}
    result = torch.empty(numel, dtype=out_dtype, device=ev.device)
    for i in range(0, numel, CHUNK):
        j = min(i + CHUNK, numel)
        result[i:j] = ev.run(kp.key, lambda name: flat[name][i:j].to(  # noqa: B023
            device=ev.device, dtype=cd))
    return result.reshape(primary.shape)


def _produce(plan: Plan, ev: _Evaluator, vae: ModelSource | None
             ) -> Callable[[str], torch.Tensor]:
    import torch

    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    by_key = {k.key: k for k in plan.keys}
    primary = ev.sources[plan.primary]

    def produce(key: str) -> torch.Tensor:
        kp = by_key[key]
        if kp.action == "copy":
            return primary.get(key)
        if kp.action == "position_ids":
            return torch.arange(kp.shape[-1], dtype=torch.int64).reshape(kp.shape)
        if kp.action == "vae":
            assert vae is not None and kp.source_key is not None
            return cast(vae.get(kp.source_key), to_torch(kp.dtype))
        return _merge_key(ev, kp, to_torch(kp.dtype)).cpu()

    return produce


def _report(plan: Plan, out: Path | None, dry_run: bool) -> MergeReport:
    actions = [k.action for k in plan.keys]
    return MergeReport(
        out, plan.arch, len(plan.keys), actions.count("merge"),
        len(actions) - actions.count("merge"), len(plan.skipped), plan.ignored,
        plan.output_bytes, plan.peak_estimate(), warnings=list(plan.warnings),
        dry_run=dry_run)


def _needs_graph(recipe: Recipe, out: Path) -> bool:
    """Convert steps, a diffusers-folder input or a non-safetensors output
    take the general path (:mod:`modelkit.merge.graph`)."""
    from modelkit.convert.pipeline import output_format

    if recipe.has_ops or output_format(out, recipe.output_format) != "safetensors":
        return True
    return any(recipe.resolve(s.path).is_dir() for s in recipe.inputs.values())


def run_recipe(recipe: Recipe, output: str | os.PathLike[str] | None = None, *,
               dry_run: bool = False, progress: ProgressFn = no_progress) -> MergeReport:
    """Plan and run a recipe; with ``dry_run`` only plan (no tensor is read).

    Raises:
        ModelkitError: bad recipe, inputs or output, before anything is written.
    """
    from modelkit.io.reader import open_model, resolve_device
    from modelkit.io.stream import stream_pass
    from modelkit.io.writer import TensorSpec, check_output_path
    from modelkit.merge.provenance import merge_metadata

    start = time.perf_counter()
    out = Path(output) if output else (recipe.resolve(recipe.output_path)
                                       if recipe.output_path else None)
    if out is None:
        raise ModelkitError(f"{recipe.source}: no output path; set output.path or pass -o")
    if _needs_graph(recipe, out):
        from modelkit.merge.graph import run_graph

        return run_graph(recipe, out, dry_run=dry_run, progress=progress)
    plan = make_plan(recipe)
    inputs = [f.path for f in plan.inputs.values()] + ([plan.vae.path] if plan.vae else [])
    check_output_path(out, inputs)
    report = _report(plan, out, dry_run)
    if dry_run:
        return report
    device = resolve_device(recipe.options.device)
    metadata = merge_metadata(plan, progress)
    specs = [TensorSpec(k.key, k.dtype, k.shape) for k in plan.keys]
    with ExitStack() as stack:
        sources = {n: stack.enter_context(open_model(f.path, device))
                   for n, f in plan.inputs.items()}
        vae = stack.enter_context(open_model(plan.vae.path, device)) if plan.vae else None
        ev = _Evaluator(plan, sources, device)
        result = stream_pass(out, specs, _produce(plan, ev, vae), metadata=metadata,
                             inputs=inputs, progress=progress, task="merge")
    report.seconds = time.perf_counter() - start
    report.output_bytes = result.bytes_written
    progress(Progress("merge", 1, 1, "files", str(out)))
    return report
