"""The one write path: every output format, written atomically.

:func:`write` takes what to write and an :class:`OutputSpec` (path, format,
overwrite) and picks the writer:

* ``safetensors``: a :class:`~modelkit.io.source.Source`, streamed one tensor
  at a time into a temp file beside the target;
* ``diffusers``: a :class:`FolderPayload` (planned by
  :mod:`modelkit.convert.diffusers`), written into a temp folder;
* ``gguf``: a :class:`~modelkit.io.gguf.GGUFPayload` (planned by
  :mod:`modelkit.convert.gguf`).

Metadata that is only known once the data is written (input hashes computed
beside the write) is given as placeholders: ``finalize()`` runs after the last
tensor and returns ``{placeholder: value}`` pairs of equal length, patched into
the header before the output is committed. Cancel is checked before each
tensor. On any error, cancel or interrupt the temp file or folder is removed
and the target is untouched; the overwrite policy is enforced at the commit
itself (see :func:`modelkit.io.writer.commit_file`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import CancelFlag, ModelkitError, OutputError, check_cancel
from modelkit.io.formats import check_output_name, writer_of
from modelkit.io.formats import output_format as output_format
from modelkit.io.source import Source
from modelkit.progress import WRITE, Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    from modelkit.io.writer import SafetensorsWriter

Finalize = Callable[[], Mapping[str, str]]


@dataclass(frozen=True)
class OutputSpec:
    """Where and how to write: ``format`` is one of
    :data:`modelkit.vocab.OUTPUT_FORMATS`; without ``overwrite`` an existing
    target is refused (and never replaced, even if it appears meanwhile)."""

    path: Path
    format: str = "safetensors"
    overwrite: bool = False


@dataclass
class FolderFile:
    """One file of a folder output: tensors (a safetensors file) or JSON.
    ``holds_metadata``: this file's header receives the run's metadata."""

    relpath: str
    tensors: Source | None = None
    json: dict[str, Any] | None = None
    holds_metadata: bool = False


@dataclass
class FolderPayload:
    """A folder output (a diffusers pipeline): its files, in writing order."""

    files: list[FolderFile]
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for f in self.files if f.tensors is not None
                   for i in f.tensors.infos.values())


@dataclass
class WriteResult:
    """What :func:`write` wrote."""

    path: Path
    format: str
    n_tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def check_output(spec: OutputSpec, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """The overwrite policy, before anything is computed: never an input,
    an existing output only with ``overwrite``, the folder must exist, the
    name must fit the format.

    Raises:
        OutputError: the output is refused; the message says what to do.
    """
    from modelkit.io.diffusers import is_diffusers_folder
    from modelkit.io.writer import check_output_dir, check_output_path

    path, inputs = spec.path, list(inputs)
    if spec.format == "diffusers":
        if spec.overwrite and path.is_dir() and any(path.iterdir()) \
                and not is_diffusers_folder(path):
            raise OutputError(f"{path}: folder exists and is not a diffusers model; "
                              "--overwrite only replaces a diffusers folder")
        check_output_dir(path, inputs, spec.overwrite)
        return
    check_output_path(path, inputs)
    check_output_name(spec.format, path)
    if path.exists() and not spec.overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it or "
                          "choose another output path")


class _Bytes:
    """Byte progress over the whole output."""

    def __init__(self, step: str, total: int, progress: ProgressFn) -> None:
        self.step, self.total, self.progress, self.done = step, total, progress, 0

    def add(self, n: int, item: str) -> None:
        self.done += n
        self.progress(Progress(self.step, self.done, self.total, "bytes", item, WRITE))


def _stream(writer: SafetensorsWriter, source: Source, bar: _Bytes,
            cancel: CancelFlag | None) -> int:
    """Write every tensor of ``source`` in header order (through the
    source's ``stream`` route when it offers one); returns the count."""
    stream = getattr(source, "stream", None)
    for spec in writer.specs.values():
        check_cancel(cancel)
        name = spec.name
        if stream is None or not stream(name, writer.sink(name)):
            writer.write(name, source.get(name))
        bar.add(spec.nbytes, name)
    return len(writer.specs)


def _safetensors(source: Source, path: Path, metadata: dict[str, str] | None,
                 inputs: list[Path], overwrite: bool, bar: _Bytes, cancel: CancelFlag | None,
                 finalize: Finalize | None) -> tuple[int, int]:
    from modelkit.io.writer import SafetensorsWriter, TensorSpec

    specs = [TensorSpec(k, i.dtype, i.shape) for k, i in source.infos.items()]
    meta = source.metadata if metadata is None else metadata
    with SafetensorsWriter(path, specs, meta, inputs=inputs, overwrite=overwrite) as writer:
        n = _stream(writer, source, bar, cancel)
        for placeholder, value in (finalize() if finalize else {}).items():
            writer.patch_header(placeholder, value)
        check_cancel(cancel)
        return n, writer.total_bytes


def _folder(payload: FolderPayload, path: Path, metadata: dict[str, str] | None,
            inputs: list[Path], overwrite: bool, bar: _Bytes, cancel: CancelFlag | None,
            finalize: Finalize | None) -> tuple[int, int]:
    from modelkit.io.writer import SafetensorsWriter, TensorSpec, atomic_dir

    n_tensors = size = 0
    with atomic_dir(path, inputs, overwrite) as tmp:
        for f in payload.files:
            target = tmp / f.relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.tensors is None:
                data = json.dumps(f.json, indent=2, sort_keys=True).encode() + b"\n"
                target.write_bytes(data)
                size += len(data)
                continue
            src = f.tensors
            meta = (metadata if metadata is not None else src.metadata) \
                if f.holds_metadata else src.metadata
            specs = [TensorSpec(k, i.dtype, i.shape) for k, i in src.infos.items()]
            with SafetensorsWriter(target, specs, meta, inputs=inputs) as writer:
                n_tensors += _stream(writer, src, bar, cancel)
                if f.holds_metadata:
                    for placeholder, value in (finalize() if finalize else {}).items():
                        writer.patch_header(placeholder, value)
                size += writer.total_bytes
        check_cancel(cancel)
    return n_tensors, size


def _disk_error(path: Path, exc: OSError, needed: int) -> OutputError:
    where = path.parent if path.parent.is_dir() else path
    if exc.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        return OutputError(f"{path}: the disk is full ({free / 1e6:,.0f} MB free, about "
                           f"{needed / 1e6:,.0f} MB needed); free space or write elsewhere")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{path}: cannot write there ({exc.strerror}); choose a folder "
                           "you can write to")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc}); nothing was saved")


def write(payload: Any, spec: OutputSpec, *, metadata: dict[str, str] | None = None,
          inputs: Iterable[str | os.PathLike[str]] = (), progress: ProgressFn = no_progress,
          cancel: CancelFlag | None = None, finalize: Finalize | None = None) -> WriteResult:
    """Write ``payload`` as ``spec`` says (see the module docstring).

    Args:
        payload: a Source (safetensors), a FolderPayload (diffusers) or a
            GGUFPayload (gguf).
        metadata: the output metadata (default: the source's own).
        inputs: files the payload reads; never written over.
        progress: byte progress of the write (phase ``write``).
        cancel: a ``threading.Event``; when set, :class:`~modelkit.errors.Cancelled`
            is raised before the next tensor and nothing is left behind.
        finalize: returns header patches once the data is written.

    Raises:
        OutputError: the output is refused, or the disk failed (full, read-only).
        Cancelled: ``cancel`` was set.
    """
    start = time.perf_counter()
    path, fmt = Path(spec.path), spec.format
    paths = [Path(p) for p in inputs]
    total = _payload_bytes(payload, fmt)
    bar = _Bytes(path.name, total, progress)
    writer = writer_of(fmt)
    try:
        n, size, notes = writer(payload, path, metadata, paths, spec.overwrite, bar, cancel,
                                finalize)
    except OSError as exc:
        raise _disk_error(path, exc, total) from None
    return WriteResult(path, fmt, n, size, time.perf_counter() - start, notes)


# The writers of the format table (modelkit.io.formats): one signature,
# returning (tensors, bytes, notes).


def write_safetensors(payload: Any, path: Path, metadata: dict[str, str] | None,
                      inputs: list[Path], overwrite: bool, bar: _Bytes,
                      cancel: CancelFlag | None, finalize: Finalize | None
                      ) -> tuple[int, int, list[str]]:
    """Write a source as one safetensors file."""
    n, size = _safetensors(_as_source(payload, "safetensors"), path, metadata, inputs,
                           overwrite, bar, cancel, finalize)
    return n, size, []


def write_folder(payload: Any, path: Path, metadata: dict[str, str] | None,
                 inputs: list[Path], overwrite: bool, bar: _Bytes,
                 cancel: CancelFlag | None, finalize: Finalize | None
                 ) -> tuple[int, int, list[str]]:
    """Write a :class:`FolderPayload` (a diffusers folder)."""
    n, size = _folder(payload, path, metadata, inputs, overwrite, bar, cancel, finalize)
    return n, size, list(payload.notes)


def write_gguf_file(payload: Any, path: Path, metadata: dict[str, str] | None,
                    inputs: list[Path], overwrite: bool, bar: _Bytes,
                    cancel: CancelFlag | None, finalize: Finalize | None
                    ) -> tuple[int, int, list[str]]:
    """Write a :class:`~modelkit.io.gguf.GGUFPayload`."""
    from modelkit.io.gguf import write_gguf_payload

    n, size = write_gguf_payload(payload, path, metadata, inputs, overwrite, bar.add, cancel,
                                 finalize)
    return n, size, list(payload.notes)


def _as_source(payload: Any, fmt: str) -> Source:
    if not hasattr(payload, "infos"):
        raise ModelkitError(f"a {fmt} output is written from a model source")
    return payload


def _payload_bytes(payload: Any, fmt: str) -> int:
    if fmt == "safetensors":
        return sum(i.nbytes for i in _as_source(payload, fmt).infos.values())
    return int(payload.nbytes)
