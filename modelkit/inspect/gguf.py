"""``inspect`` of a GGUF file (modelkit's ``export-gguf`` output, ComfyUI-GGUF
and stable-diffusion.cpp files) from its header alone.

Tensors are analysed at their real shapes: a tensor stored flattened to fit
the quant block has its shape in ``comfy.gguf.orig_shape.<name>``, so the
same architecture and completeness checks as for safetensors apply.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from modelkit.inspect.report import (
    ModelReport,
    build_report,
    diffusion_model_note,
    quantization_section,
)
from modelkit.io.gguf_header import (
    ORIG_SHAPE_PREFIX,
    ArraySummary,
    GGUFHeader,
    read_gguf_header,
    read_small_gguf_tensor,
)
from modelkit.io.header import TensorInfo
from modelkit.io.suffixes import GGUF_DIFFUSION_ARCHS

FORMAT = "gguf"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, ArraySummary):
        return str(value)
    return str(value)


def gguf_infos(header: GGUFHeader) -> dict[str, TensorInfo]:
    """Tensor infos at their real (original) shapes; ``dtype`` is the GGML
    type name (``Q8_0``, ``F16``...)."""
    infos = {}
    for name, t in header.tensors.items():
        shape = header.orig_shape(name) or t.shape
        infos[name] = TensorInfo(name, t.ggml_type, shape, t.offset, t.offset + t.nbytes)
    return infos


def gguf_summary(header: GGUFHeader) -> dict[str, Any]:
    """The ``gguf`` section of the inspect report."""
    records = [k for k in header.kv if k.startswith(ORIG_SHAPE_PREFIX)]
    valid = sum(1 for k in records if header.orig_shape(k[len(ORIG_SHAPE_PREFIX):]))
    types = Counter(t.ggml_type for t in header.tensors.values())
    file_type = header.kv.get("general.file_type")
    return {
        "version": header.version,
        "byte_order": header.byte_order,
        "architecture": header.architecture,
        "file_type": file_type if isinstance(file_type, int) else None,
        "n_tensors": len(header.tensors),
        "quant_types": dict(sorted(types.items())),
        "n_orig_shapes": len(records),
        "n_orig_shapes_invalid": len(records) - valid,
        "alignment": header.alignment,
    }


def inspect_gguf(path: Path) -> ModelReport:
    """Inspect a GGUF file from its header (and a few small float tensors).

    Raises:
        BadFileError: unreadable, truncated or corrupt GGUF.
    """
    header = read_gguf_header(path)
    meta = {k: _text(v) for k, v in header.kv.items() if not k.startswith(ORIG_SHAPE_PREFIX)}
    rep = build_report(path, gguf_infos(header), meta, FORMAT,
                       lambda key: read_small_gguf_tensor(header, key))
    rep.gguf = gguf_summary(header)
    rep.quantization = quantization_section(
        FORMAT, {k: t.ggml_type for k, t in header.tensors.items()})
    if header.architecture:
        rep.arch_evidence.append(f"general.architecture = {header.architecture}")
    if header.architecture in GGUF_DIFFUSION_ARCHS:
        # ComfyUI-GGUF loads it as a diffusion model whatever its keys say
        if rep.arch == "unknown":
            rep.arch = header.architecture
        if rep.kind == "unknown":
            rep.kind = "unet"
            rep.notes.append(diffusion_model_note(FORMAT))
    bad = rep.gguf["n_orig_shapes_invalid"]
    if bad:
        rep.notes.append(f"{bad} comfy.gguf.orig_shape records do not match their "
                         "tensor's element count (ignored)")
    return rep
