"""The one read path: open a model file and read its tensors one at a time.

``.safetensors`` files are memory-mapped through ``safe_open`` (pages are read
on first touch and count as page cache, not process memory). Legacy pickles go
through :mod:`modelkit.io.pickle`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import INTERRUPTED, BadFileError, Interrupted, ModelkitError
from modelkit.io.dtypes import check_loadable
from modelkit.io.formats import Format, input_format, is_format
from modelkit.io.header import Header, TensorInfo, read_header
from modelkit.io.source import KeyAccess

if TYPE_CHECKING:
    import torch

CAST_CHUNK = 1 << 20  # elements per chunk when casting (see cast())


_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                            errno.EBADF, errno.EPERM})


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
    return is_format(path, "pickle")


def read_infos(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo],
                                                       dict[str, str]]:
    """Tensor infos and metadata of any supported file, by the format table.
    For safetensors and GGUF only the header is read; pickles are unpickled
    (safely, memory-mapped)."""
    return input_format(path).read_header(path)


def read_st_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A safetensors file's tensor infos and metadata, from its header."""
    header = read_header(path)
    return header.tensors, header.metadata


def read_opened_infos(path: Path, fmt: Format) -> tuple[dict[str, TensorInfo],
                                                        dict[str, str]]:
    """Infos and metadata of a format without a header reader, by opening it."""
    src = fmt.open(path)
    try:
        return dict(src.infos), dict(src.metadata)
    finally:
        close = getattr(src, "close", None)
        if close is not None:
            close()


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
    data_start: int | None = None  # where tensor data begins (safetensors files)
    _fd: int | None = None
    _map: Any = None  # the file's private memory map (view()), made on first use
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                     compare=False)  # lanes read at once

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
            if INTERRUPTED.is_set():  # a signal surfacing inside the extension
                raise Interrupted from None
            raise BadFileError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None

    @property
    def raw_readable(self) -> bool:
        """Whether tensor bytes can be read straight from the file
        (:meth:`read_into`): a safetensors file."""
        return self.data_start is not None

    def _pos(self, key: str, byte_offset: int) -> int:
        """Where byte ``byte_offset`` of tensor ``key`` lies in the file."""
        assert self.data_start is not None, "not a safetensors file"
        return self.data_start + self.infos[key].begin + byte_offset

    def _raw_fd(self) -> int:
        with self._opening:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read_into(self, key: str, byte_offset: int, out: memoryview) -> None:
        """Read ``len(out)`` bytes of tensor ``key``, starting ``byte_offset``
        bytes into it, into ``out`` (``pread`` into a buffer the caller
        reuses: no page faults on a mapping, no new memory per chunk).

        Raises:
            BadFileError: the file is shorter than its header says.
        """
        pos = self._pos(key, byte_offset)
        fd, done = self._raw_fd(), 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], pos + done)
            if n <= 0:
                raise BadFileError(f"{self.path}: truncated inside tensor {key!r}")
            done += n

    def view(self, key: str, byte_offset: int, nbytes: int) -> memoryview:
        """``nbytes`` bytes of tensor ``key`` from ``byte_offset`` on, as a
        view on the file's memory map: read without a copy (a bake converts
        them straight from the page cache), pages faulted in on first touch
        after a read-ahead hint. The map is private and copy-on-write, so a
        tensor made on the view may be writable without the file changing.

        Raises:
            BadFileError: the file is shorter than its header says.
        """
        import mmap

        pos = self._pos(key, byte_offset)
        fd = self._raw_fd()
        # the file's length now, not the map's: touching a page past the end
        # of a file cut short after it was mapped would kill the process (SIGBUS)
        if pos + nbytes > os.fstat(fd).st_size:
            raise BadFileError(f"{self.path}: truncated inside tensor {key!r}")
        with self._opening:
            if self._map is None or pos + nbytes > len(self._map):
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            mapped = self._map
        page = pos - pos % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_WILLNEED, page, pos + nbytes - page)
        return memoryview(mapped)[pos:pos + nbytes]

    def unmap(self, key: str, byte_offset: int, nbytes: int) -> None:
        """Done with that range of a :meth:`view`: its whole pages leave the
        process's mapping (they stay in the page cache, and a later view
        maps them again), so a pass over a 24 GB file does not show 24 GB
        of resident memory, and unmapping is spread over the pass."""
        import mmap

        if self._map is None:
            return
        pos = self._pos(key, byte_offset)
        first = -(-pos // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (pos + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if first < last <= len(self._map):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def copy_into(self, key: str, fd: int, offset: int) -> None:
        """Copy tensor ``key``'s bytes unchanged into the file ``fd`` at
        ``offset`` (in the kernel: ``copy_file_range``, else ``pread``)."""
        src, pos, left = self._raw_fd(), self._pos(key, 0), self.infos[key].nbytes
        while left > 0:
            try:
                n = os.copy_file_range(src, fd, left, pos, offset)
            except OSError as exc:  # not supported between these files: copy below
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                n = 0
            if n <= 0:  # unsupported between these files: copy through memory
                data = os.pread(src, min(left, 1 << 24), pos)
                if not data:
                    raise BadFileError(f"{self.path}: truncated inside tensor {key!r}")
                n = os.pwrite(fd, data, offset)
            pos, offset, left = pos + n, offset + n, left - n

    def close(self) -> None:
        self._handle = None
        self._tensors = None
        if self._map is not None:
            # a view still held keeps the map: it is unmapped when freed
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
    return ModelSource(p, header.tensors, header.metadata, device, _handle=handle,
                       data_start=header.data_start)


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
