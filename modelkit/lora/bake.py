"""``bake``: add adapters' ΔW into a checkpoint, one checkpoint tensor at a time.

The output streams from the base: untouched tensors pass through as they
are, every patched weight is computed in float32 row chunks of about
:data:`modelkit.numeric.CHUNK_ELEMENTS` elements (``acc = W[rows]``, then
``acc += k·s·up[rows] @ down`` per module) and stored in the base's dtype
(or ``dtype``). Several adapters bake in one pass, each with its own UNet
weight, text-encoder weight and block weights; every adapter's ΔW is taken
against the original base weight, so the order does not matter.

Before any math: an adapter made for another architecture is refused,
every adapter tensor must land on a checkpoint weight (or the bake fails
listing the keys that do not; ``allow_unmatched`` reports them instead) and
every ΔW shape is checked against the weight it patches.

A transformer base in the diffusers layout takes every module: one on a
weight diffusers renames lands on it whole, one on a fused weight diffusers
splits or reorders (a kohya ``qkv``, Flux.1's ``linear1``, an adaLN
modulation) lands row by row (:mod:`modelkit.lora.bake_split`; those weights
take the general route, not the streaming one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch import registry
from modelkit.arch.blocks import block_of
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.lora_blocks import parse_lora_blocks
from modelkit.arch.lora_modules import (
    diffusers_paths,
    module_kind,
    shares_names,
    unmatched_reason,
)
from modelkit.convert.base import passthrough
from modelkit.core.step import PlannedStep, same_origins
from modelkit.errors import CancelFlag, ModelkitError, check_cancel
from modelkit.inspect.describe import describe, require_checkpoint, require_original_layout
from modelkit.io.source import DerivedSource, Source, input_paths_of, source_label, tensor_info
from modelkit.jsontypes import JSONDict
from modelkit.lora.adapter import LORA_ARCHS, Adapter, AdapterModule, open_adapter
from modelkit.lora.bake_split import Part, RowsDelta, runs_of, split_index
from modelkit.lora.bake_stream import check_range, chunkable, streamer
from modelkit.lora.delta import ModuleDelta, check_fit, target_view
from modelkit.lora.output import LORA_THREADS, storage_dtype, torch_threads
from modelkit.numeric import CHUNK_ELEMENTS
from modelkit.wording import agree, plural, with_article

if TYPE_CHECKING:
    import torch

LIST_LIMIT = 20


@dataclass
class AdapterUse:
    """One adapter to bake: its strength on the UNet (``weight``) and on the
    text encoders (``te_weight``, default ``weight``), and optional block
    weights (anything :func:`modelkit.arch.lora_blocks.parse_lora_blocks`
    accepts)."""

    source: Source
    weight: float = 1.0
    te_weight: float | None = None
    blocks: object | None = None


@dataclass
class AdapterBakeReport:
    """What one adapter did."""

    file: str
    arch: str
    format: str
    weight: float
    te_weight: float
    blocks: dict[str, float] | None
    n_modules: int = 0
    keys_touched: int = 0
    unmatched: list[str] = field(default_factory=list)
    # modules whose target weight the base lacks, grouped by kind
    # ("cross_attn.k_img": 40), and where the module scales came from
    no_target: dict[str, int] = field(default_factory=dict)
    n_modules_total: int = 0
    alpha_source: str = ""


@dataclass
class BakeReport:
    """What :func:`bake` did, per adapter."""

    base: str
    arch: str
    dtype: str | None
    adapters: list[AdapterBakeReport] = field(default_factory=list)
    keys_changed: int = 0

    def to_dict(self) -> JSONDict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class _Patch:
    delta: ModuleDelta
    row0: int  # first row of the checkpoint weight this module patches
    k: float
    bias: bool = False


def _as_use(item: Source | AdapterUse | tuple[Any, ...]) -> AdapterUse:
    if isinstance(item, AdapterUse):
        return item
    if isinstance(item, tuple):
        return AdapterUse(*item)
    return AdapterUse(item)


def _open(use: AdapterUse, arch: str, base: str, device: str) -> Adapter:
    ad = open_adapter(use.source)
    if ad.arch == arch:
        return ad
    if ad.arch == "unknown" or shares_names(ad.arch, arch):
        return open_adapter(use.source, arch)  # the base decides what matches
    as_base = open_adapter(use.source, arch) if registry.handles(ad.arch, "lora bake") \
        else None
    if as_base is not None and as_base.modules and not as_base.unmatched:
        return as_base  # every module is also a name of the base's family
    raise ModelkitError(f"{ad.label}: is {with_article(ad.arch)} adapter but {base} is "
                        f"{with_article(arch)} checkpoint; bake an adapter made for {arch}")


def _diffusers_remap(rep: Any, own: registry.Architecture | None
                     ) -> dict[tuple[str, tuple[int, int] | None], str] | None:
    """For a transformer family's base in the diffusers layout: where each
    original-layout target lands there (:func:`diffusers_paths`); None for
    any other base."""
    if (own is None or own.lora is None or own.lora.modules is None
            or rep.layout != registry.DIFFUSERS or registry.ORIGINAL not in own.layouts):
        return None
    return diffusers_paths(own.name)


def _to_diffusers_layout(ad: Adapter, remap: dict[tuple[str, tuple[int, int] | None], str],
                         index: Callable[[], dict[str, list[Part]]]
                         ) -> tuple[Adapter, dict[str, list[Part]]]:
    """``ad`` with every module's target renamed to the diffusers weight it
    patches whole, and the modules on a fused weight that diffusers splits
    or reorders (a kohya ``qkv``), each with the diffusers weights holding
    its rows (``index``: :func:`split_index` of the base). A module on
    neither keeps its target, which the base lacks: it is reported as
    having no target there (a block the base does not have)."""
    modules, parts = {}, {}
    for name, mod in ad.modules.items():
        t = mod.target
        assert t is not None
        modules[name] = mod
        # the base's own map first: which block's modulation diffusers swaps
        # depends on the depth (SD3's last context block), not the table's
        found = index().get(f"{t.path}.weight") if t.rows is None else None
        path = remap.get((t.path, t.rows))
        if found:
            parts[name] = found
        elif path is not None:
            key = f"{UNET_PREFIX}{path}"
            modules[name] = replace(mod, target=replace(
                t, path=path, key=f"{key}.weight", bias_key=f"{key}.bias", rows=None,
                of=None))
    return replace(ad, modules=modules), parts


def _plan_split(delta: ModuleDelta, parts: list[Part], ckpt: Source, base: str, k: float,
                patches: dict[str, list[_Patch]], rep: AdapterBakeReport) -> set[str]:
    """Patch each diffusers weight holding rows of the fused weight a module
    patches with those rows of its ΔW (and Δb); the keys touched."""
    mod = delta.mod
    if delta.needs_base:
        raise ModelkitError(f"{delta.ad.label}: module {mod.name} ({mod.algo}"
                            f"{', DoRA' if delta.has_dora else ''}) reads the whole fused "
                            f"weight {mod.target.path if mod.target else '?'}, which "
                            f"{base} stores split (diffusers layout); run `modelkit convert "
                            "--layout original` first")
    found = [(p, _ckpt_key(f"{UNET_PREFIX}{p.key}", ckpt.infos)) for p in parts]
    if any(key not in ckpt.infos for _, key in found):
        rep.unmatched += mod.keys.values()
        kind = module_kind(mod.target.path if mod.target else mod.name)
        rep.no_target[kind] = rep.no_target.get(kind, 0) + 1
        return set()
    shapes = [tuple(ckpt.infos[key].shape) for _, key in found]
    fused = (sum(s[0] for s in shapes), *shapes[0][1:])
    if _patches_weight(mod):
        check_fit(delta, base, fused, fused[0], math.prod(fused[1:]))
    bias_suffixes = [s for s in ("diff_b", "b_norm") if s in mod.keys]
    bias_keys = [_ckpt_key(f"{UNET_PREFIX}{p.key.removesuffix('.weight')}.bias", ckpt.infos)
                 for p in parts]
    if bias_suffixes:
        size = tuple(delta.ad.source.infos[mod.keys[bias_suffixes[0]]].shape)
        if size != (fused[0],) or any(b not in ckpt.infos for b in bias_keys):
            rep.unmatched += [mod.keys[s] for s in bias_suffixes]
            bias_suffixes = []
    touched: set[str] = set()
    for (part, key), bias_key in zip(found, bias_keys, strict=True):
        rows = RowsDelta(delta, runs_of(part.piece, fused[0]))
        if _patches_weight(mod):
            patches.setdefault(key, []).append(_Patch(rows, 0, k))  # type: ignore[arg-type]
            touched.add(key)
        if bias_suffixes:
            patches.setdefault(bias_key, []).append(
                _Patch(rows, 0, k, bias=True))  # type: ignore[arg-type]
            touched.add(bias_key)
    return touched


def _strength(mod: AdapterModule, use: AdapterUse, blocks: dict[str, float] | None,
              arch: str, te_default: float | None) -> float:
    te = use.te_weight if use.te_weight is not None else te_default
    k = (use.weight if te is None else te) if mod.is_text else use.weight
    if blocks is not None and mod.target is not None:
        k *= blocks[block_of(mod.target.key, arch)]
    return k


def _plan_adapter(ad: Adapter, use: AdapterUse, ckpt: Source, arch: str, te_weight: float | None,
                  default_blocks: object | None, device: str,
                  patches: dict[str, list[_Patch]], split: dict[str, list[Part]]
                  ) -> AdapterBakeReport:
    spec = use.blocks if use.blocks is not None else default_blocks
    blocks = parse_lora_blocks(spec, arch) if spec is not None else None
    te = use.te_weight if use.te_weight is not None else te_weight
    rep = AdapterBakeReport(ad.label, ad.arch, ad.format, use.weight,
                            use.weight if te is None else te, blocks,
                            unmatched=list(ad.unmatched))
    base = Path(source_label(ckpt)).name
    touched: set[str] = set()
    rep.n_modules_total = len(ad.modules)
    rep.alpha_source = ", ".join(sorted({ad.alpha_source(m) for m in ad.modules.values()}))
    for mod in ad.modules.values():
        t = mod.target
        assert t is not None
        if mod.name in split:
            delta = ModuleDelta(ad, mod, device)
            k = _strength(mod, use, blocks, arch, te_weight)
            touched |= _plan_split(delta, split[mod.name], ckpt, base, k, patches, rep)
            rep.n_modules += 1
            continue
        key = _ckpt_key(t.key, ckpt.infos)
        if key not in ckpt.infos:
            rep.unmatched += mod.keys.values()
            kind = module_kind(t.path)
            rep.no_target[kind] = rep.no_target.get(kind, 0) + 1
            continue
        shape = tuple(ckpt.infos[key].shape)
        row0, out, cols = target_view(shape, t.rows, t.of)
        delta = ModuleDelta(ad, mod, device)
        has_weight = _patches_weight(mod)
        if has_weight:
            check_fit(delta, base, shape, out, cols)
        if delta.has_dora:
            delta.dora_axis((out, *shape[1:]))  # an unusable magnitude fails here, not mid-write
        k = _strength(mod, use, blocks, arch, te_weight)
        rep.n_modules += 1
        if has_weight:
            patches.setdefault(key, []).append(_Patch(delta, row0, k))
            touched.add(key)
        bias_keys = [mod.keys[s] for s in ("diff_b", "b_norm") if s in mod.keys]
        if not bias_keys:
            continue
        bias_key = _ckpt_key(t.bias_key, ckpt.infos) if t.bias_key else None
        if bias_key is None or bias_key not in ckpt.infos:
            rep.unmatched += bias_keys
            continue
        n_bias = out if t.rows else ckpt.infos[bias_key].shape[0]
        size = ad.source.infos[bias_keys[0]].shape
        if tuple(size) != (n_bias,):
            raise ModelkitError(f"{ad.label}: {bias_keys[0]}: Δb has shape {list(size)} but "
                                f"{base}: {bias_key} needs [{n_bias}]")
        patches.setdefault(bias_key, []).append(_Patch(delta, row0, k, bias=True))
        touched.add(bias_key)
    rep.keys_touched = len(touched)
    rep.unmatched.sort()
    return rep


def _ckpt_key(key: str, infos: dict[str, Any]) -> str:
    """``key`` as the checkpoint spells it: a transformer file saved without
    ``model.diffusion_model.`` (a bare Flux.1 transformer) has it bare."""
    if key not in infos and key.startswith(UNET_PREFIX):
        bare = key[len(UNET_PREFIX):]
        if bare in infos:
            return bare
    return key


def _patches_weight(mod: AdapterModule) -> bool:
    if mod.algo == "full":
        return "diff" in mod.keys
    if mod.algo == "norm":
        return "w_norm" in mod.keys
    return True


def _no_target_line(r: AdapterBakeReport, base: str, arch: str) -> str:
    """``160 of 240 modules match base.safetensors; 40 cross_attn.k_img, ...
    modules have no target there`` (with the family's reason, if known)."""
    n_missing = sum(r.no_target.values())
    kinds = sorted(r.no_target.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{n} {kind}" for kind, n in kinds[:LIST_LIMIT])
    more = f" and {len(kinds) - LIST_LIMIT} more kinds" if len(kinds) > LIST_LIMIT else ""
    why = unmatched_reason(arch, r.no_target)
    return (f"{r.file}: {r.n_modules_total - n_missing} of "
            f"{plural(r.n_modules_total, 'module')} match {base}; {shown}{more} "
            f"{'module has' if n_missing == 1 else 'modules have'} no target there"
            + (f" ({why})" if why else ""))


def _unmatched_error(reports: list[AdapterBakeReport], base: str, arch: str
                     ) -> ModelkitError:
    parts = []
    for r in reports:
        if r.no_target:
            parts.append(_no_target_line(r, base, arch))
        elif r.unmatched:
            shown = ", ".join(r.unmatched[:LIST_LIMIT])
            more = f" and {len(r.unmatched) - LIST_LIMIT} more" if len(
                r.unmatched) > LIST_LIMIT else ""
            n = len(r.unmatched)
            parts.append(f"{r.file}: {agree(n, 'key', 'matches', 'match')} no weight of the "
                         f"checkpoint or {'is' if n == 1 else 'are'} not applied (LyCORIS "
                         f"sparse bias) ({shown}{more})")
    return ModelkitError("; ".join(parts) + "; pass --allow-unmatched (allow_unmatched=True) "
                         "to bake the matching part and list the rest in the report")


def bake(checkpoint: Source, adapters: Sequence[Source | AdapterUse | tuple[Any, ...]], *,
         te_weight: float | None = None, blocks: object | None = None,
         dtype: str | None = None, allow_unmatched: bool = False, device: str = "cpu",
         cancel: CancelFlag | None = None) -> PlannedStep:
    """Plan ``checkpoint`` with every adapter's weighted ΔW added.

    Args:
        adapters: sources, ``(source, weight[, te_weight[, blocks]])`` tuples
            or :class:`AdapterUse`.
        te_weight: default text-encoder strength for adapters that give none
            (default: each adapter's own ``weight``).
        blocks: default block weights for adapters that give none.
        dtype: safetensors dtype of the float output tensors (default: the
            base's own).
        allow_unmatched: report adapter keys that patch nothing instead of
            failing.

    Raises:
        ModelkitError: not a checkpoint, an adapter for another architecture,
            unmatched keys (without ``allow_unmatched``), a shape mismatch.
    """
    own = registry.get(describe(checkpoint).arch)
    # a family with its own LoRA table (Flux.1) also comes as a bare transformer file
    kinds = ("checkpoint", "unet") if own and own.lora and own.lora.modules else ("checkpoint",)
    rep_ck = require_checkpoint(checkpoint, "lora bake", kinds)
    arch, base = rep_ck.arch, Path(source_label(checkpoint)).name
    remap = _diffusers_remap(rep_ck, own)
    if remap is None:
        require_original_layout(rep_ck, base, "lora bake")
    if arch not in LORA_ARCHS and not registry.handles(arch, "lora bake"):
        raise ModelkitError(f"{base}: is {with_article(arch)} checkpoint; lora bake supports "
                            f"{', '.join(registry.handling('lora bake'))}")
    if dtype is not None:
        dtype = storage_dtype(dtype)
    uses = [_as_use(a) for a in adapters]
    if not uses:
        raise ModelkitError("lora bake needs at least one adapter")
    opened = [_open(u, arch, base, device) for u in uses]
    patches: dict[str, list[_Patch]] = {}
    splits: list[dict[str, list[Part]]] = [{} for _ in opened]
    if remap is not None:
        assert own is not None
        index = lru_cache(maxsize=1)(partial(split_index, own.family, checkpoint.infos, base))
        pairs = [_to_diffusers_layout(ad, remap, index) for ad in opened]
        opened, splits = [a for a, _ in pairs], [p for _, p in pairs]
    reports = [_plan_adapter(ad, u, checkpoint, arch, te_weight, blocks, device, patches, sp)
               for ad, u, sp in zip(opened, uses, splits, strict=True)]
    if any(r.unmatched for r in reports) and not allow_unmatched:
        raise _unmatched_error(reports, base, arch)
    report = BakeReport(base, arch, dtype, reports, len(patches))
    infos = {k: tensor_info(k, dtype if (dtype and i.is_float) else i.dtype, i.shape)
             for k, i in checkpoint.infos.items()}

    def produce(key: str) -> torch.Tensor:
        check_cancel(cancel)
        try:
            with torch_threads(LORA_THREADS):
                return _produce(checkpoint, key, infos[key].dtype, patches.get(key), device)
        finally:
            for p in patches.get(key, ()):
                p.delta.release()

    label = f"bake({source_label(checkpoint)})"
    sources = [checkpoint, *(u.source for u in uses)]
    unchanged = {k: (checkpoint, k) for k, i in infos.items()
                 if k not in patches and i.dtype == checkpoint.infos[k].dtype}
    # weights patched through a row map take the general route (_produce)
    streamed = {k: v for k, v in patches.items()
                if not any(isinstance(p.delta, RowsDelta) for p in v)}
    stream = streamer(checkpoint, streamed, infos, device, cancel, passthrough(unchanged))
    out = DerivedSource(label, infos, dict(checkpoint.metadata), produce,
                        input_paths_of(sources), stream=stream)
    params = {"adapters": [{"file": r.file, "weight": r.weight, "te_weight": r.te_weight,
                            "blocks": _blocks_param(u.blocks if u.blocks is not None
                                                    else blocks)}
                           for r, u in zip(reports, uses, strict=True)],
              "dtype": dtype, "allow_unmatched": allow_unmatched}
    return PlannedStep(out, report, "lora_bake", json.loads(json.dumps(params, default=str)),
                       same_origins(infos))


def _blocks_param(spec: object | None) -> object | None:
    if spec is None or isinstance(spec, str | int | float | list | tuple | dict):
        return spec
    return str(spec)


def _produce(ckpt: Source, key: str, dtype: str, todo: list[_Patch] | None,
             device: str) -> torch.Tensor:
    from modelkit.io.dtypes import to_torch
    from modelkit.io.reader import cast

    t = ckpt.get(key)
    out_dtype = to_torch(dtype)
    if not todo:
        return cast(t, out_dtype)
    shape = tuple(t.shape)
    if not chunkable(todo, shape):
        return _produce_whole(key, t, shape, todo, out_dtype, device)
    return _produce_chunked(key, t, shape, todo, out_dtype, device)


def _produce_chunked(key: str, t: torch.Tensor, shape: tuple[int, ...], todo: list[_Patch],
                     out_dtype: torch.dtype, device: str) -> torch.Tensor:
    import torch

    n, cols = shape[0], math.prod(shape[1:])
    w2 = t.reshape(n, cols)
    out = torch.empty(shape, dtype=out_dtype)
    o2 = out.view(n, cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    for a in range(0, n, step):
        b = min(n, a + step)
        acc = w2[a:b].to(device, torch.float32, copy=True)
        for p in todo:
            lo, hi = max(a, p.row0), min(b, p.row0 + p.delta.out)
            if lo < hi:
                p.delta.add_rows_(acc[lo - a:hi - a], lo - p.row0, hi - p.row0, p.k)
        check_range(key, acc, w2[a:b], todo, out_dtype)
        o2[a:b].copy_(acc)
    return out


def _produce_whole(key: str, t: torch.Tensor, shape: tuple[int, ...], todo: list[_Patch],
                   out_dtype: torch.dtype, device: str) -> torch.Tensor:
    import torch

    n = shape[0]
    w0 = t.reshape(n, -1).to(device, torch.float32, copy=True)
    acc = w0.clone()
    for p in todo:
        rows = slice(p.row0, p.row0 + p.delta.out)
        if p.bias:
            bias = p.delta.bias()
            assert bias is not None
            acc[rows].add_(bias.reshape(-1, 1), alpha=p.k)
        elif p.delta.needs_base:
            view = (p.delta.out, *shape[1:])
            acc[rows].add_(p.delta.base_update(w0[rows], p.k, view))
        else:
            p.delta.add_rows_(acc[rows], 0, p.delta.out, p.k)
    check_range(key, acc, w0, todo, out_dtype)
    return acc.reshape(shape).to("cpu", out_dtype)


__all__ = ["AdapterBakeReport", "AdapterUse", "BakeReport", "bake"]
