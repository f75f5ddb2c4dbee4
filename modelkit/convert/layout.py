"""``convert --layout``: a transformer between the original (BFL / Stability /
ComfyUI) and the diffusers key layout, both ways, bit for bit.

The plan comes from the family's one key map (:mod:`modelkit.arch.layouts`).
Each output tensor is written on its own: a renamed one is copied file to
file; a piece of a fused tensor (``qkv`` -> ``to_q``) is its row range read
straight from the file; a fused one is its pieces' row ranges one after the
other (from a safetensors input in 8 MiB reads into one buffer, from any
other source with ``get`` and a row slice). Nothing is computed: the bytes
are the input's, so the conversion is exact and the dtype stays.

Choices: a bare transformer file keeps bare keys; one under
``model.diffusion_model.`` keeps that prefix, and the other components of an
all-in-one file (VAE, text encoders) are copied unchanged under their own
prefixes. A transformer key outside the family's map is refused in one line
naming it (a converted file must load in the target layout), except the few
keys the model never reads that diffusers' converter drops too
(:data:`modelkit.arch.layouts.UNUSED`), which the diffusers file leaves out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelkit.arch import layouts, registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.convert.base import passthrough
from modelkit.core.step import KeyOrigin, PlannedStep
from modelkit.errors import ModelkitError
from modelkit.inspect.describe import describe, require_handled
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

    from modelkit.io.writer import TensorSink

CHUNK = 8 << 20  # bytes read at a time when a tensor is put together from row ranges


@dataclass
class LayoutReport:
    """What ``convert --layout`` did."""

    arch: str
    variant: str | None
    source_layout: str
    layout: str
    n_renamed: int = 0  # output tensors that are one input tensor under another name
    n_split: int = 0  # row slices of a fused input tensor
    n_joined: int = 0  # fused from several input tensors
    n_swapped: int = 0  # an adaLN weight whose halves change places
    n_kept: int = 0  # other components, unchanged
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def handled_families() -> tuple[str, ...]:
    """The families ``convert --layout`` converts (two layouts, handled by convert)."""
    return tuple(n for n in registry.handling("convert") if n in layouts.MAPS)


def _check(src: Source, to: str) -> tuple[str, str, str | None]:
    """The family and layout of ``src``; a one-line error unless it can go to ``to``."""
    name = source_label(src)
    rep = describe(src)
    if rep.kind not in ("checkpoint", "unet"):  # a LoRA, a VAE, a text encoder...
        raise ModelkitError(f"{name}: is {with_article(rep.kind)}, not a transformer or "
                            "checkpoint; --layout converts a model's transformer")
    arch = registry.get(rep.arch)
    if arch is not None and len(arch.layouts) == 1:
        raise ModelkitError(f"{name}: {arch.label} files have one layout "
                            f"({arch.layouts[0]} names); nothing to convert")
    if arch is None or rep.arch not in layouts.MAPS:
        what = f"{arch.label} {rep.kind}" if arch else rep.kind
        raise ModelkitError(
            f"{name}: is {with_article(what)}; --layout converts the transformers of "
            f"{registry.listed(handled_families())} (an SD checkpoint becomes a diffusers "
            "folder with 'modelkit convert MODEL -o FOLDER')")
    require_handled(rep, name, "convert")
    if rep.layout is None:
        raise ModelkitError(f"{name}: modelkit cannot tell which layout this {arch.label} "
                            "transformer is in; 'modelkit inspect' shows its keys")
    if rep.layout == to:
        raise ModelkitError(f"{name}: is already in the {to} layout; nothing to convert")
    return rep.arch, rep.layout, rep.variant


def convert_layout(src: Source, to: str) -> PlannedStep:
    """Plan ``src``'s transformer in layout ``to`` (``original`` or ``diffusers``).

    Raises:
        ModelkitError: not a family with two layouts, already in ``to``, a key
            outside the map, a missing key or a shape that does not fit.
    """
    if to not in layouts.LAYOUTS:
        raise ModelkitError(f"unknown layout {to!r}; choose one of "
                            f"{', '.join(layouts.LAYOUTS)}")
    family, layout, variant = _check(src, to)
    return plan_layout(src, family, layout, to, variant)


def plan_layout(src: Source, family: str, layout: str, to: str, variant: str | None = None
                ) -> PlannedStep:
    """Plan ``src``, a ``family`` transformer in ``layout``, in layout ``to``
    (what :func:`convert_layout` does once the file is recognised).

    Raises:
        ModelkitError: a key outside the map, a missing key or a shape that
            does not fit.
    """
    name = source_label(src)
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in src.infos) else ""
    inner = {k[len(prefix):]: tuple(i.shape) for k, i in src.infos.items()
             if k.startswith(prefix)}
    plan = layouts.plan(family, inner, layout, to, name)
    segments = {prefix + k: tuple(layouts.Segment(prefix + s.key, s.start, s.stop)
                                  for s in t.segments) for k, t in plan.items()}
    infos = {k: tensor_info(k, _dtype(src, segs, name), plan[k[len(prefix):]].shape)
             for k, segs in segments.items()}
    report = LayoutReport(family, variant, layout, to)
    origins = {k: _origin(src, segs, report) for k, segs in segments.items()}
    kept = [k for k in src.infos if not k.startswith(prefix)] if prefix else []
    infos.update({k: src.infos[k] for k in kept})
    origins.update({k: (0, k) for k in kept})
    report.n_kept = len(kept)
    read = {s.key for segs in segments.values() for s in segs}
    report.dropped = sorted(k for k in inner if prefix + k not in read)
    if report.dropped:
        report.notes.append(f"left out {', '.join(report.dropped)}: the model never reads "
                            "it (diffusers' converter drops it too)")
    out = DerivedSource(f"layout({name})", infos, dict(src.metadata),
                        lambda k: _produce(src, segments.get(k), k), src.input_paths,
                        stream=_stream(src, segments, kept))
    return PlannedStep(out, report, "layout", {"to": to}, origins)


def _dtype(src: Source, segs: tuple[layouts.Segment, ...], name: str) -> str:
    """The one dtype of an output tensor's pieces."""
    dtypes = sorted({src.infos[s.key].dtype for s in segs})
    if len(dtypes) > 1:
        raise ModelkitError(f"{name}: the pieces {', '.join(s.key for s in segs)} have "
                            f"different dtypes ({', '.join(dtypes)}); cast the file to one "
                            "dtype first")
    return dtypes[0]


def _whole(src: Source, segs: tuple[layouts.Segment, ...]) -> bool:
    """One segment that is all of its input tensor."""
    return len(segs) == 1 and segs[0].start == 0 and \
        segs[0].stop == layouts.rows_of(tuple(src.infos[segs[0].key].shape))


def _origin(src: Source, segs: tuple[layouts.Segment, ...], report: LayoutReport
            ) -> KeyOrigin:
    """The output key's origin (a whole input tensor, else None), counted."""
    keys = {s.key for s in segs}
    if _whole(src, segs):
        report.n_renamed += 1
        return (0, segs[0].key)
    if len(keys) > 1:
        report.n_joined += 1
    elif len(segs) == 2 and segs[0].start > segs[1].start:
        report.n_swapped += 1
    else:
        report.n_split += 1
    return None


def _produce(src: Source, segs: tuple[layouts.Segment, ...] | None, key: str
             ) -> torch.Tensor:
    import torch

    if segs is None:  # another component, unchanged
        return src.get(key)
    if _whole(src, segs):
        return src.get(segs[0].key)
    parts = [src.get(s.key)[s.start:s.stop] for s in segs]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _plain(src: Source, key: str) -> bool:
    """Whether ``key``'s bytes in the file are its values as the header says
    (not a quantized storage that opens dequantized)."""
    info = src.infos[key]
    return key not in getattr(src, "quantized_layers", {}) and \
        tensor_info(key, info.dtype, info.shape).nbytes == info.nbytes


def _stream(src: Source, segments: dict[str, tuple[layouts.Segment, ...]],
            kept: list[str]) -> Callable[[str, TensorSink], bool] | None:
    """The writer's byte route from a safetensors input: whole tensors copied
    file to file, row ranges read into one reused buffer."""
    copies = passthrough({k: (src, k) for k in kept})
    if not getattr(src, "raw_readable", False):
        return copies
    buffer = bytearray()

    def stream(key: str, sink: TensorSink) -> bool:
        segs = segments.get(key)
        if segs is None:
            return copies(key, sink) if copies else False
        if not all(_plain(src, s.key) for s in segs):
            return False
        if _whole(src, segs):
            sink.copy_from(src, segs[0].key)
            return True
        ranges = []
        for s in segs:
            info = src.infos[s.key]
            row = info.nbytes // layouts.rows_of(tuple(info.shape))
            ranges.append((s.key, s.start * row, s.stop * row))
        total, offset = sum(b - a for _, a, b in ranges), 0
        if len(buffer) < min(CHUNK, total):
            buffer.extend(bytes(min(CHUNK, total) - len(buffer)))
        view = memoryview(buffer)
        for source_key, begin, end in ranges:
            for pos in range(begin, end, CHUNK):
                n = min(CHUNK, end - pos)
                src.read_into(source_key, pos, view[:n])  # type: ignore[attr-defined]
                sink.write(offset, view[:n], last=offset + n == total)
                offset += n
        return True

    return stream
