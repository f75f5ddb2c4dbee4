"""Open the models verify checks: a candidate and an optional reference, as
sources in the original single-file layout.

* ``.safetensors`` and legacy pickles open as they are; a diffusers folder
  is seen as one original-layout model.
* modelkit int8 files (``modelkit.quantization`` metadata) are checked as
  stored and rendered *dequantized* into the file's own float type.
* A GGUF file (a UNet, as ``export-gguf`` writes it) or any UNet-only file
  is dequantized and completed with the reference's VAE and text encoders:
  the composite is what is rendered and compared.

A model that is not a plain single safetensors file is written to a
temporary file for diffusers' single-file loader (:func:`render_path`).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch import registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.errors import ModelkitError
from modelkit.io.source import DerivedSource, Source, tensor_info

if TYPE_CHECKING:
    import torch

    from modelkit.inspect.report import ModelReport
    from modelkit.io.header import Header

RENDER_ARCHS = registry.names(where=lambda a: a.verify == registry.RENDER)


@dataclass
class ModelUnderTest:
    """One opened model.

    Args:
        path: the file or folder the user named.
        stored: the model as stored (static checks run on it).
        report: the inspect report of ``render_source``.
        render_source: what is rendered and compared: ``stored``, its
            dequantized form, or a UNet completed from the reference.
        file_format: ``safetensors``, ``pickle``, ``diffusers`` or ``gguf``.
        kind: what the stored file is (``checkpoint``, ``unet``, ``lora``...).
        int8: stored with modelkit's int8 scheme.
    """

    path: Path
    stored: Source
    report: ModelReport
    render_source: Source
    file_format: str
    kind: str = "unknown"
    int8: bool = False
    unet_only: bool = False
    completed: bool = False  # a UNet-only file completed from the reference
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_plain_file(self) -> bool:
        """Whether diffusers can load the file itself (no temp copy needed)."""
        return (self.file_format == "safetensors" and self.render_source is self.stored)


def _inspect(path: Path, source: Source, file_format: str) -> ModelReport:
    from modelkit.inspect.report import build_report

    def read(key: str) -> list[float]:
        return [float(x) for x in source.get(key).float().flatten().tolist()]

    return build_report(path, source.infos, source.metadata, file_format, read)


def _lazy_safetensors(path: Path, header: Header) -> tuple[Source, ModelReport]:
    """A safetensors file known from its ``header`` alone (no torch import
    until a tensor is read) and its inspect report, as ``modelkit inspect``
    makes it."""
    from modelkit.inspect.report import build_report
    from modelkit.io.header import read_small_tensor

    opened: list[Source] = []

    def produce(key: str) -> torch.Tensor:
        if not opened:
            from modelkit.io.reader import open_model

            opened.append(open_model(path))
        return opened[0].get(key)

    source = DerivedSource(str(path), header.tensors, header.metadata, produce, (path,))
    report = build_report(path, header.tensors, header.metadata, "safetensors",
                          lambda key: read_small_tensor(header, key))
    return source, report


def _open_stored(path: Path) -> tuple[Source, str, ModelReport]:
    """The stored model at ``path`` (format from io's one table), with its
    inspect report; a plain safetensors file is known from its header until a
    tensor is read."""
    from modelkit.io.formats import SAFETENSORS, input_format
    from modelkit.io.open import open_source

    fmt = input_format(path)
    if fmt is SAFETENSORS and path.is_file():
        from modelkit.io.header import read_header
        from modelkit.io.quantized import quant_view

        header = read_header(path)
        # a ComfyUI or bitsandbytes file is checked as the float model it
        # stands for (dequantized on read), not as its stored codes and scales
        if quant_view(header) is None:
            source, report = _lazy_safetensors(path, header)
            return source, fmt.name, report
    source = open_source(path)
    return source, fmt.name, _inspect(path, source, fmt.name)


def _main_float_dtype(source: Source) -> str:
    counts = Counter(i.dtype for i in source.infos.values()
                     if i.dtype in ("F32", "F16", "BF16"))
    return counts.most_common(1)[0][0] if counts else "F32"


def _dequantized(source: Source) -> Source:
    from modelkit.convert.quantize import dequantize

    target = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[_main_float_dtype(source)]
    return dequantize(source, target).source


def with_unet(base: Source, unet: Source, label: str) -> DerivedSource:
    """``base`` with its UNet replaced by ``unet``'s (unprefixed or prefixed
    keys); the other components come from ``base``."""
    prefixed = any(k.startswith(UNET_PREFIX) for k in unet.infos)
    names = {(k if prefixed else UNET_PREFIX + k): k for k in unet.infos}
    names = {k: v for k, v in names.items() if k.startswith(UNET_PREFIX)}
    # a bare (unprefixed) base is a denoiser alone: it lends no other component
    lends = any(k.startswith(UNET_PREFIX) for k in base.infos)
    infos = {k: i for k, i in base.infos.items() if lends and not k.startswith(UNET_PREFIX)}
    for full, own in names.items():
        info = unet.infos[own]
        infos[full] = tensor_info(full, info.dtype, info.shape)

    def produce(key: str) -> torch.Tensor:
        own = names.get(key)
        return unet.get(own) if own is not None else base.get(key)

    inputs = tuple(dict.fromkeys((*unet.input_paths, *base.input_paths)))
    return DerivedSource(label, infos, dict(base.metadata), produce, inputs)


def open_model_under_test(path: str | os.PathLike[str],
                          reference: ModelUnderTest | None = None) -> ModelUnderTest:
    """Open ``path`` for verification; a UNet-only file is completed from
    ``reference`` (when given) for rendering.

    Raises:
        BadFileError: missing or unreadable file.
    """
    from modelkit.convert.quantize import QUANT_KEY

    p = Path(path)
    stored, fmt, report = _open_stored(p)
    model = ModelUnderTest(p, stored, report, stored, fmt, kind=report.kind)
    model.int8 = QUANT_KEY in stored.metadata
    render: Source = _dequantized(stored) if model.int8 else stored
    if model.int8:
        model.notes.append("int8 weights dequantized for the render")
    else:
        from modelkit.io.quantized import dequantized_on_read

        on_read = dequantized_on_read(stored)
        if on_read:  # diffusers must not load the stored codes and scales itself
            render = _dequantized(stored)
            model.notes.append(f"{on_read}: rendered from the dequantized weights")
    if report.kind == "unet":
        model.unet_only = True
        if reference is not None:
            render = with_unet(reference.render_source, render,
                               f"{p.name} + VAE/text encoders of {reference.name}")
            model.completed = True
            model.notes.append(f"UNet-only file: rendered with the VAE and text encoders "
                               f"of {reference.name}")
    if render is not stored:
        # completeness is judged on what is rendered (int8 scales and a
        # UNet-only layout are storage details)
        model.report = _inspect(p, render, fmt)
    model.render_source = render
    return model


def float32_view(source: Source) -> DerivedSource:
    """``source`` with every float tensor read as float32 (integer tensors
    unchanged): two models stored in different precisions compare key by key."""
    from modelkit.io.reader import cast

    infos = {k: tensor_info(k, "F32", i.shape) if i.is_float else i
             for k, i in source.infos.items()}

    def produce(key: str) -> torch.Tensor:
        import torch

        t = source.get(key)
        return cast(t, torch.float32) if t.is_floating_point() else t

    label = getattr(source, "label", None) or str(getattr(source, "path", "model"))
    return DerivedSource(label, infos, dict(source.metadata), produce, source.input_paths)


def render_path(model: ModelUnderTest, folder: Path) -> Path:
    """A single safetensors file diffusers can load for ``model``: the file
    itself, or a copy of its render source written into ``folder``."""
    if model.is_plain_file:
        return model.path
    from modelkit.io.write import OutputSpec, write

    if model.unet_only and not model.completed:
        raise ModelkitError(f"{model.path}: a UNet-only file has no VAE or text encoders to "
                            "render with; pass --reference with the checkpoint it belongs to")
    out = folder / f"{model.path.stem}.render.safetensors"
    src = model.render_source
    write(src, OutputSpec(out, "safetensors", overwrite=True), metadata={},
          inputs=src.input_paths)
    return out
