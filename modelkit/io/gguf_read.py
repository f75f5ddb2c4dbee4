"""The GGUF read path: a ``.gguf`` file (as modelkit's ``export-gguf`` and
ComfyUI-GGUF's tools write it) as a source whose quantized tensors are
dequantized one at a time on ``get``.

Shapes follow ComfyUI-GGUF's loader rule: ``comfy.gguf.orig_shape.<name>``
when the writer flattened a conv kernel, else the GGUF shape reversed (GGUF
lists dimensions innermost first). Quantized tensors come back as float32;
F16/F32 tensors keep their type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import BadFileError
from modelkit.io.gguf import ORIG_SHAPE_KEY
from modelkit.io.source import DerivedSource, tensor_info

if TYPE_CHECKING:
    import torch

FLOAT_TYPES = {"F32": "F32", "F16": "F16"}


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.get_field(key)
    return None if f is None else bytes(f.parts[f.data[-1]]).decode()


def _shape(reader: Any, tensor: Any) -> tuple[int, ...]:
    f = reader.get_field(ORIG_SHAPE_KEY + tensor.name)
    if f is not None:
        return tuple(int(f.parts[i][0]) for i in f.data)
    return tuple(int(d) for d in reversed(tensor.shape))


def open_gguf(path: str | os.PathLike[str]) -> DerivedSource:
    """Open a GGUF model file; ``metadata`` holds its string key/values
    (``general.architecture``, ``modelkit.source_arch``...).

    Raises:
        BadFileError: not a readable GGUF file.
    """
    import gguf

    p = Path(path)
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # gguf raises ValueError/struct errors of its own
        raise BadFileError(f"{p}: not a readable GGUF file ({exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    infos = {}
    for name, t in tensors.items():
        kind = FLOAT_TYPES.get(t.tensor_type.name, "F32")
        infos[name] = tensor_info(name, kind, _shape(reader, t))
    meta = {}
    for key in reader.fields:
        if key.startswith(("general.", "modelkit.")):
            value = _string_field(gguf, reader, key)
            if value is not None:
                meta[key] = value

    def produce(name: str) -> torch.Tensor:
        import numpy as np
        import torch

        t = tensors[name]
        shape = infos[name].shape
        if t.tensor_type.name in FLOAT_TYPES:
            arr = np.array(t.data).reshape(shape)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        return torch.from_numpy(np.ascontiguousarray(arr))

    return DerivedSource(f"gguf({p})", infos, meta, produce, (p,))


def _string_field(gguf: Any, reader: Any, key: str) -> str | None:
    """A string key/value's text; None for numbers, arrays and bad UTF-8."""
    f = reader.get_field(key)
    if f is None or list(f.types) != [gguf.GGUFValueType.STRING]:
        return None
    try:
        return _field_str(reader, key)
    except UnicodeDecodeError:
        return None
