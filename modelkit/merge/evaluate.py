"""Merge steps as one lazy source: a group of merge steps that feed each other
is planned from headers (:mod:`modelkit.merge.plan`) and evaluated per key,
in float32, without rounding between the steps.

This is the general per-key evaluation. Element-wise step graphs (every
method ``elementwise``) run in 1M-element chunks so the float32 math stays in
cache; the runner may take a faster route for them (see
:mod:`modelkit.merge.fastpath`), which must give the same bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelkit.core.recipe import BlockParam
from modelkit.merge.plan import INPAINT_KEY, KeyPlan, MergeGroupSpec, Plan
from modelkit.vocab import CHUNK_ELEMENTS

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import DerivedSource, Source

CHUNK = CHUNK_ELEMENTS


@dataclass
class MergeReport:
    """What a group of merge steps does to the keys of its primary model."""

    arch: str
    n_keys: int
    n_merged: int
    n_copied: int
    n_skipped: int
    n_ignored: int
    peak_estimate_bytes: int
    warnings: list[str] = field(default_factory=list)
    block_weights: dict[str, dict[str, float]] = field(default_factory=dict)


class Evaluator:
    """Evaluates a group's step DAG for one key over (possibly chunked)
    inputs; ``sources`` are the group's leaves (inputs or earlier steps)."""

    def __init__(self, plan: Plan, sources: dict[str, Source], device: str) -> None:
        from modelkit.core.registry import check_params
        from modelkit.merge.methods import get_method

        self.plan, self.sources, self.device = plan, sources, device
        group = plan.group
        self.methods = {n: get_method(s.transform) for n, s in group.steps.items()}
        self.scalars = {  # block-wise values are looked up per key
            n: {k: (0.0 if isinstance(v, BlockParam) else v) for k, v in (
                s.checked if s.checked is not None else check_params(
                    self.methods[n], s.params, is_blockwise=lambda v: isinstance(
                        v, BlockParam))).items()}
            for n, s in group.steps.items()
        }
        self.order = step_order(group)
        self.elementwise = all(self.methods[n].elementwise for n in self.order)

    def params(self, step: str, key: str) -> dict[str, Any]:
        from modelkit.arch.blocks import block_of

        out = dict(self.scalars[step])
        for (s, pname), per_block in self.plan.block_params.items():
            if s == step:
                block = block_of(self.plan.full_key(key), self.plan.arch,
                                 self.plan.group.options.block_map, vae_slot="VAE" in per_block)
                out[pname] = per_block[block]
        return out

    def generator(self, step: str, key: str) -> torch.Generator:
        """The seeded generator of a seeded step for one key."""
        import torch

        seed = zlib.crc32(f"{self.plan.group.options.seed}:{step}:{key}".encode())
        return torch.Generator(self.device).manual_seed(seed)

    def run(self, key: str, leaf: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The output step's tensor for ``key``; ``leaf(name)`` reads an input.

        Steps run in topological order from a local dict that dies with the
        call (a self-referencing closure here kept every chunk alive until
        the cyclic garbage collector ran: hundreds of MB)."""

        group = self.plan.group
        values: dict[str, torch.Tensor] = {}
        for name in self.order:
            step = group.steps[name]
            args = []
            for ref in step.models:
                if ref not in values:
                    values[ref] = leaf(ref)
                args.append(values[ref])
            kwargs = self.params(name, key)
            if self.methods[name].seeded:
                kwargs["generator"] = self.generator(name, key)
            values[name] = self.methods[name].fn(*args, **kwargs)
        return values.pop(group.name)


def step_order(group: MergeGroupSpec) -> list[str]:
    """The group's steps its output depends on, each after the steps it uses."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in group.inputs or name in order:
            return
        for ref in group.steps[name].models:
            visit(ref)
        order.append(name)

    visit(group.name)
    return order


def merge_key(ev: Evaluator, kp: KeyPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """The merged tensor of one key, in ``out_dtype``."""
    import torch

    cd = torch.float32
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


def producer(plan: Plan, ev: Evaluator, vae: Source | None) -> Callable[[str], torch.Tensor]:
    """``produce(key)`` for every output key of the plan."""
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
        return merge_key(ev, kp, to_torch(kp.dtype)).cpu()

    return produce


def merge_report(plan: Plan) -> MergeReport:
    """The planned figures of a group (nothing is computed)."""
    actions = [k.action for k in plan.keys]
    weights = {f"{s}.{p}": dict(v) for (s, p), v in plan.block_params.items()}
    return MergeReport(plan.arch, len(plan.keys), actions.count("merge"),
                       len(actions) - actions.count("merge"), len(plan.skipped), plan.ignored,
                       plan.peak_estimate(), list(plan.warnings), weights)


def merge_source(plan: Plan, sources: dict[str, Source], vae: Source | None,
                 device: str, label: str) -> tuple[DerivedSource, Evaluator]:
    """The group's output as a lazy source."""
    from modelkit.io.source import DerivedSource, input_paths_of, tensor_info
    from modelkit.merge.fastpath import streamer

    ev = Evaluator(plan, sources, device)
    infos = {k.key: tensor_info(k.key, k.dtype, k.shape) for k in plan.keys}
    paths = input_paths_of([*sources.values(), *([vae] if vae else [])])
    source = DerivedSource(label, infos, {}, producer(plan, ev, vae), paths,
                           stream=streamer(plan, ev, vae))
    return source, ev
