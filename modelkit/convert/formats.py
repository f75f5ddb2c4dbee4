"""Turn the output source into what the writer of its format takes: the
source itself (safetensors), a planned diffusers folder, or a planned GGUF
UNet. Layout decisions live here, above :mod:`modelkit.io`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelkit.io.source import Source


def prepare_output(source: Source, fmt: str, *, quant: str = "q8_0",
                   keep_shapes: bool = False) -> tuple[Any, dict[str, Any]]:
    """(payload for :func:`modelkit.io.write.write`, details for the report).

    Raises:
        ModelkitError: the source cannot be written in ``fmt`` (a LoRA as
            GGUF, a UNet-only file as a diffusers folder...).
    """
    if fmt == "diffusers":
        from modelkit.convert.diffusers import plan_folder

        folder = plan_folder(source)
        return folder, {"files": [f.relpath for f in folder.files]}
    if fmt == "gguf":
        from modelkit.convert.gguf import plan_gguf

        payload = plan_gguf(source, qtype=quant, flatten=not keep_shapes)
        # quality is filled while the file is written (per-tensor error)
        return payload, {"quant": quant, "n_quantized": sum(p.quantized for p in payload.plans),
                         "general.architecture": payload.arch, "quality": payload.quality}
    return source, {}
