"""Dtype names: safetensors strings, user-facing names and torch dtypes.

Importing this module does not import torch; the torch helpers do, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkit.errors import BadFileError, ModelkitError
from modelkit.textsafe import quoted, shown
from modelkit.vocab import USER_DTYPES

if TYPE_CHECKING:
    import torch

_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
}


def parse_user_dtype(name: str) -> str:
    """Map a user dtype name (``fp16``, ``bf16``...) to a safetensors dtype."""
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        choices = ", ".join(sorted({k for k in USER_DTYPES if "_" in k or len(k) <= 5}))
        raise ModelkitError(f"unknown dtype {name!r}; choose one of: {choices}") from None


def to_torch(st_dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string."""
    import torch

    try:
        return getattr(torch, _TORCH_NAMES[st_dtype])
    except (KeyError, AttributeError):
        raise ModelkitError(f"dtype {st_dtype} is not supported by this torch") from None


def check_loadable(path: object, key: str, st_dtype: str) -> None:
    """Refuse, naming the file and tensor, a tensor whose dtype this torch
    cannot hold (sub-byte F4/F6 formats, or dtypes newer than the torch)."""
    import torch

    name = _TORCH_NAMES.get(st_dtype)
    if name is None or not hasattr(torch, name):
        raise BadFileError(f"{shown(path, 300)}: tensor {quoted(key)} has dtype {st_dtype}, "
                           f"which torch {torch.__version__} cannot load; modelkit can "
                           "inspect and hash this file but not process that tensor")


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for st, tn in _TORCH_NAMES.items():
        if tn == name:
            return st
    raise ModelkitError(f"torch dtype {dtype} cannot be stored in safetensors")
