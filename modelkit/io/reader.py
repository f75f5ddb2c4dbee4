"""The one read path: open a model file and read its tensors one at a time.

``.safetensors`` files are memory-mapped through ``safe_open`` (pages are read
on first touch and count as page cache, not process memory). Legacy pickles go
through :mod:`modelkit.io.pickle`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import BadFileError, ModelkitError
from modelkit.io.dtypes import check_loadable
from modelkit.io.header import Header, TensorInfo, read_header
from modelkit.io.source import KeyAccess

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CAST_CHUNK = 1 << 20  # elements per chunk when casting (see cast())


def resolve_device(device: str) -> str:
    """Resolve ``auto`` to ``cuda`` when available, else ``cpu``; check that a
    requested ``cuda`` device exists."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelkitError("--device cuda: no CUDA device is available; use "
                            "--device cpu or auto")
    return device


def is_pickle_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a legacy pickle checkpoint by its suffix."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def read_infos(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo],
                                                       dict[str, str]]:
    """Tensor infos and metadata of any supported file. For safetensors only
    the header is read; pickles are unpickled (safely, memory-mapped)."""
    if is_pickle_path(path):
        with open_model(path) as src:
            return dict(src.infos), {}
    header = read_header(path)
    return header.tensors, header.metadata


@dataclass
class ModelSource(KeyAccess):
    """An open model file: tensor infos in file order, metadata and
    one-at-a-time tensor access on ``device``."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    device: str
    _handle: Any = None
    _tensors: dict[str, Any] | None = None

    @property
    def input_paths(self) -> tuple[Path, ...]:
        return (self.path,)

    @property
    def label(self) -> str:
        return str(self.path)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a view on the mapped file where possible)."""
        if key not in self.infos:
            raise ModelkitError(f"{self.path}: has no tensor {key!r}")
        if self._tensors is not None:
            t = self._tensors[key]
            return t if self.device == "cpu" else t.to(self.device)
        check_loadable(self.path, key, self.infos[key].dtype)
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise BadFileError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _pickle_source(p: Path, device: str) -> ModelSource:
    from modelkit.io.dtypes import from_torch
    from modelkit.io.pickle import load_pickle_state_dict

    tensors = load_pickle_state_dict(p)
    infos: dict[str, TensorInfo] = {}
    pos = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        infos[k] = TensorInfo(k, from_torch(t.dtype), tuple(t.shape), pos, pos + n)
        pos += n
    return ModelSource(p, infos, {}, device, _tensors=tensors)


def open_model(path: str | os.PathLike[str], device: str = "cpu") -> ModelSource:
    """Open a ``.safetensors`` or legacy pickle model for reading.

    Raises:
        BadFileError: unreadable, truncated or unsafe file.
    """
    p = Path(path)
    device = resolve_device(device)
    if is_pickle_path(p):
        return _pickle_source(p, device)
    header: Header = read_header(p)
    from safetensors import safe_open

    try:
        handle = safe_open(str(p), framework="pt", device=device)
    except Exception as exc:
        raise BadFileError(f"{p}: safetensors could not open it ({exc})") from None
    return ModelSource(p, header.tensors, header.metadata, device, _handle=handle)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float tensor to ``dtype`` in 1M-element chunks. The developers'
    guide measured one 1 GB conversion call far slower than chunks; on a quiet
    run of bench/bench_io.py both took about the same time, so chunking is a
    guard, not a speed-up here. Integer and bool tensors are returned
    unchanged: position ids and step counters are never cast."""
    if t.dtype == dtype or not t.is_floating_point():
        return t
    import torch

    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    if t.numel() <= CAST_CHUNK:
        out.copy_(t)
        return out
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), CAST_CHUNK):
        dst[i:i + CAST_CHUNK].copy_(src[i:i + CAST_CHUNK])
    return out
