"""verify's streamed functional probe: run every block of a candidate and
its reference on the same seeded activations, one block at a time, and
report per block the output's relative error and cosine against the
reference, and where the candidate goes non-finite.

The blocks of each architecture come from the registry
(:attr:`modelkit.arch.registry.Architecture.probe`), their math from
:mod:`modelkit.verify.probe_blocks`. Each weight is read from its file
when the block math needs it (``source.get(key)``) and dropped after use,
so the memory is one weight of one file plus the activations, whatever the
model's size: a full-size Flux.1 probes in well under 2 GB (bench/README.md).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelkit.arch.registry import Architecture
from modelkit.errors import ModelkitError
from modelkit.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    import torch

    from modelkit.arch.probes import ProbeGroup
    from modelkit.errors import CancelFlag
    from modelkit.io.source import Source


@dataclass(frozen=True)
class PlannedBlock:
    """One block to probe: its name in the report, its key prefix in the
    file and its group (kind, tokens)."""

    component: str
    name: str
    prefix: str  # in the reference
    group: ProbeGroup
    roots: tuple[str, ...] = ()  # the component's possible roots (all-in-one, standalone)

    def prefix_in(self, keys: Collection[str]) -> str | None:
        """The block's prefix in a file with ``keys`` (its component may sit
        under another root than in the reference: a transformer-only file
        against an all-in-one one); None when the file has no key under it."""
        for root in (self.prefix[:-len(self.name) - 1], *self.roots):
            head = root + self.name + "."
            if any(k.startswith(head) for k in keys):
                return head
        return None


@dataclass
class BlockResult:
    """The probe of one block: the candidate's output against the reference's."""

    component: str
    block: str
    kind: str
    params: int
    rel_error: float
    cosine: float
    finite: bool  # the candidate's output
    reference_finite: bool
    missing: tuple[str, ...] = ()  # block keys the candidate lacks or has in another shape
    seconds: float = 0.0
    absent: bool = False  # the candidate has no key of this block (e.g. no VAE at all)

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["missing"] = list(self.missing)
        return d


def _roots(arch: Architecture, component: str) -> tuple[str, ...]:
    comp = next((c for c in arch.components if c.name == component), None)
    if comp is None:
        return ()
    return tuple(dict.fromkeys((comp.prefix, comp.standalone)))


def plan_blocks(arch: Architecture, keys: Collection[str]
                ) -> list[PlannedBlock]:
    """The blocks of ``arch`` present in ``keys`` (the reference's), in the
    registry's order and by number within a group."""
    out = []
    for group in arch.probe:
        for root in _roots(arch, group.component):
            found = _expand(root, group, keys)
            if found:
                out += [PlannedBlock(group.component, name, root + name + ".", group,
                                     _roots(arch, group.component)) for name in found]
                break
    return out


def _expand(root: str, group: ProbeGroup, keys: Collection[str]) -> list[str]:
    if "{n}" not in group.pattern:
        head = root + group.pattern + "."
        return [group.pattern] if any(k.startswith(head) for k in keys) else []
    before, after = group.pattern.split("{n}")
    rx = re.compile(re.escape(root + before) + r"(\d+)" + re.escape(after + "."))
    numbers = sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})
    return [f"{before}{n}{after}" for n in numbers]


def _block_shapes(source: Source, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(i.shape) for k, i in source.infos.items()
            if k.startswith(prefix)}


def _compare(cand: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool, bool]:
    import torch

    cand, ref = cand.double(), ref.double()
    finite, ref_finite = bool(torch.isfinite(cand).all()), bool(torch.isfinite(ref).all())
    if not finite or not ref_finite:
        return math.inf, math.nan, finite, ref_finite
    norm = float(ref.norm())
    rel = float((cand - ref).norm()) / norm if norm > 0 else float((cand - ref).norm())
    denom = norm * float(cand.norm())
    cos = float(cand @ ref) / denom if denom > 0 else (1.0 if rel == 0 else 0.0)
    return rel, cos, finite, ref_finite


def probe_block(block: PlannedBlock, candidate: Source, reference: Source, seed: int = 0
                ) -> BlockResult:
    """Run one block with the reference's and the candidate's weights on the
    same seeded inputs."""
    import torch

    from modelkit.verify.probe_blocks import BLOCKS, Weights, make_inputs

    start = time.perf_counter()
    ref_shapes = _block_shapes(reference, block.prefix)
    cand_prefix = block.prefix_in(candidate.infos)
    params = sum(math.prod(s) for s in ref_shapes.values())
    if cand_prefix is None:
        return BlockResult(block.component, block.name, block.group.kind, params, math.nan,
                           math.nan, True, True, absent=True)
    cand_shapes = _block_shapes(candidate, cand_prefix)
    missing = tuple(sorted(k if k not in cand_shapes else
                           f"{k} ({'x'.join(map(str, cand_shapes[k]))}, the reference "
                           f"{'x'.join(map(str, s))})"
                           for k, s in ref_shapes.items() if cand_shapes.get(k) != s))
    fn = BLOCKS[block.group.kind]
    ref_w = Weights(reference, block.prefix, ref_shapes)
    with torch.no_grad():
        inputs = make_inputs(block.group, ref_w, seed)
        ref_out = fn(ref_w, inputs, block.group)
        if missing:
            rel, cos, finite, ref_finite = math.inf, math.nan, False, True
        else:
            cand_out = fn(Weights(candidate, cand_prefix, cand_shapes), inputs, block.group)
            rel, cos, finite, ref_finite = _compare(cand_out, ref_out)
    return BlockResult(block.component, block.name, block.group.kind, params, rel, cos,
                       finite, ref_finite, missing, round(time.perf_counter() - start, 4))


def probe(candidate: Source, reference: Source, arch: Architecture, *, seed: int = 0,
          progress: ProgressFn = no_progress, cancel: CancelFlag | None = None,
          only: tuple[str, ...] = ()) -> list[BlockResult]:
    """Probe every block of ``arch`` found in ``reference`` (``only``: the
    components to probe, default all), one at a time.

    Raises:
        ModelkitError: no block of ``arch`` is in the reference.
        Cancelled: ``cancel`` was set (checked between blocks).
    """
    from modelkit.errors import check_cancel
    from modelkit.progress import VERIFY, Progress

    blocks = [b for b in plan_blocks(arch, reference.infos)
              if not only or b.component in only]
    if not blocks:
        raise ModelkitError(f"the reference has no {arch.label} block the probe knows; "
                            "give the file the candidate was made from")
    results = []
    for i, block in enumerate(blocks):
        check_cancel(cancel)
        try:
            results.append(probe_block(block, candidate, reference, seed))
        except RuntimeError as exc:  # the file's tensors do not fit the block's math
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelkitError(f"{block.component} block {block.name}: its tensors do not "
                                f"fit together ({reason}); is the file complete and of one "
                                f"{arch.label} size?") from None
        progress(Progress("probe", i + 1, len(blocks), "blocks", block.name, VERIFY))
    return results
