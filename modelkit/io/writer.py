"""The one write path: a streaming safetensors writer.

The header is computed up front from the tensor specs, so tensors are written
one at a time and a state dict is never held in memory. Data goes to a hidden
temp file beside the target, which is renamed over the target only when every
tensor has been written; on any error (or Ctrl-C) the temp file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from modelkit.errors import ModelkitError, OutputError, defer_signals
from modelkit.io.header import DTYPE_SIZES


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype and shape of a tensor to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * DTYPE_SIZES[self.dtype])


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_path(target: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output that is one of the inputs, a directory, or in a
    missing folder."""
    for src in inputs:
        if _same_file(target, Path(src)):
            raise OutputError(f"{target}: output is also an input; choose another "
                              "output path (modelkit never writes over an input)")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file name")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder does not exist")


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[
        bytes, dict[str, int]]:
    """Header bytes (8-byte length + JSON padded to 8) and each tensor's
    offset into the data buffer. Tensors are laid out by descending element
    size (stable), so every tensor starts aligned to its element size."""
    ordered = sorted(specs, key=lambda s: -DTYPE_SIZES[s.dtype])
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise ModelkitError(f"metadata value for {bad[0]!r} is not a string")
        header["__metadata__"] = metadata
    offsets: dict[str, int] = {}
    pos = 0
    for s in ordered:
        if s.name in offsets:
            raise ModelkitError(f"tensor {s.name!r} is listed twice for the output")
        offsets[s.name] = pos
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def tensor_bytes(tensor: Any) -> memoryview:
    """A contiguous little-endian byte view of a torch tensor or numpy array
    (copied only when it is not contiguous or not on the CPU)."""
    if hasattr(tensor, "detach"):
        import torch

        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        return memoryview(t.view(torch.uint8).numpy()).cast("B")
    import numpy as np

    arr = np.ascontiguousarray(tensor)
    return arr.reshape(-1).view(np.uint8).data.cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


# temp files and folders of this process not yet committed or removed: a
# signal that lands between creating one and the ``try`` that would remove it
# cannot lose it (see remove_temp_files)
_LIVE_TEMPS: set[Path] = set()


def _owner_tag() -> str:
    """``HOST-PID`` of this process for temp names: the host as 6 hex digits
    of its name's sha256 (no host name on disk), so a run only ever judges
    temp files written on its own machine."""
    host = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
    return f"{host}-{os.getpid()}"


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_owner_tag()}."


_TEMP_OWNER = re.compile(r"([0-9a-f]{6})-([0-9]+)\.[A-Za-z0-9_]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a number we cannot judge)
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the hidden ``.NAME.HOST-PID.*.partial`` temp files and folders
    of ``target`` left by runs that died without cleaning up (SIGKILL, a
    power cut): only those written on this host by a process that no longer
    exists; never this process's, never another live run's, never a name
    without a writer pid. Returns what was removed."""
    prefix, own_host = f".{target.name}.", _owner_tag().split("-")[0]
    removed: list[Path] = []
    try:
        with os.scandir(target.parent) as it:
            names = [e.name for e in it
                     if e.name.startswith(prefix) and e.name.endswith(".partial")]
    except OSError:
        return removed
    for name in names:
        m = _TEMP_OWNER.fullmatch(name[len(prefix):-len(".partial")])
        if m is None or m.group(1) != own_host:
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = target.parent / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _temp_beside(target: Path) -> tuple[int, Path]:
    """A new hidden ``.NAME.HOST-PID.*.partial`` file in the target's folder
    (same filesystem, so the final rename is atomic), recorded as live;
    stale temp files of the same target left by dead runs are removed first."""
    remove_stale_partials(target)
    with defer_signals():
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".partial",
                                   dir=target.parent)
        path = Path(tmp)
        _LIVE_TEMPS.add(path)
    return fd, path


def _drop_temp(temp: Path) -> None:
    temp.unlink(missing_ok=True)
    _LIVE_TEMPS.discard(temp)


def remove_temp_files() -> list[Path]:
    """Remove every temp file or folder this process created and has not yet
    committed or removed (a front end calls it when a signal stopped the
    program); returns what was removed."""
    removed = []
    for temp in list(_LIVE_TEMPS):
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        _LIVE_TEMPS.discard(temp)
        removed.append(temp)
    return removed


def commit_file(temp: Path, target: Path, overwrite: bool = True) -> None:
    """Move the finished ``temp`` to ``target`` in one atomic step; the temp
    file is gone afterwards whatever happens (an interrupt included).

    Without ``overwrite`` the move never replaces a file: it hard-links
    (which fails when ``target`` exists, even if another process created it
    a moment ago) and then drops the temp name, so the check and the move
    are one decision.

    Raises:
        OutputError: ``target`` exists and ``overwrite`` is false.
    """
    try:
        os.chmod(temp, 0o644)
        if overwrite:
            os.replace(temp, target)
            return
        try:
            os.link(temp, target)
        except FileExistsError:
            raise OutputError(f"{target}: already exists (another run may have written "
                              "it meanwhile); pass --overwrite to replace it") from None
        except OSError:
            # a filesystem without hard links: check, then rename
            if target.exists():
                raise OutputError(f"{target}: already exists; pass --overwrite to "
                                  "replace it") from None
            os.replace(temp, target)
    finally:
        _drop_temp(temp)


@contextmanager
def atomic_path(target: Path, inputs: Iterable[str | os.PathLike[str]] = (),
                overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target``; move it to ``target`` when the
    block succeeds (see :func:`commit_file`), remove it when it fails."""
    check_output_path(target, inputs)
    fd, temp = _temp_beside(target)
    os.close(fd)
    try:
        yield temp
        commit_file(temp, target, overwrite)
    finally:
        _drop_temp(temp)


class SafetensorsWriter:
    """Write tensors one at a time into ``target`` (a context manager).

    Args:
        target: output ``.safetensors`` path.
        specs: every tensor the file will hold (name, dtype, shape).
        metadata: string-to-string ``__metadata__``.
        inputs: paths the operation reads; the writer refuses to write onto any.
        overwrite: whether the commit may replace an existing ``target``
            (without it, a target that appears meanwhile is not replaced).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        metadata: dict[str, str] | None = None,
        inputs: Iterable[str | os.PathLike[str]] = (),
        overwrite: bool = True,
    ) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        check_output_path(self.target, inputs)
        self.specs = {s.name: s for s in specs}
        self._header, self._offsets = build_header(list(self.specs.values()), metadata)
        self._written: set[str] = set()
        fd, self.temp_path = _temp_beside(self.target)
        self._fd: int | None = fd
        try:
            _pwrite_all(fd, memoryview(self._header), 0)
        except BaseException:
            self.abort()
            raise

    @property
    def data_start(self) -> int:
        return len(self._header)

    @property
    def total_bytes(self) -> int:
        return len(self._header) + sum(s.nbytes for s in self.specs.values())

    def write(self, name: str, tensor: Any) -> None:
        """Write one tensor; its dtype and shape must match its spec."""
        spec = self.specs.get(name)
        if spec is None:
            raise ModelkitError(f"tensor {name!r} was not declared for the output")
        if name in self._written:
            raise ModelkitError(f"tensor {name!r} written twice")
        shape = tuple(int(d) for d in tensor.shape)
        if shape != spec.shape:
            raise ModelkitError(f"tensor {name!r} has shape {list(shape)}, "
                                f"declared {list(spec.shape)}")
        data = tensor_bytes(tensor)
        if len(data) != spec.nbytes:
            raise ModelkitError(f"tensor {name!r} has {len(data)} bytes, its declared "
                                f"dtype {spec.dtype} needs {spec.nbytes}")
        assert self._fd is not None, "writer is closed"
        _pwrite_all(self._fd, data, self.data_start + self._offsets[name])
        self._written.add(name)

    def write_part(self, name: str, byte_offset: int, data: memoryview,
                   last: bool = False) -> None:
        """Write bytes of tensor ``name`` starting ``byte_offset`` bytes into
        it (for tensors computed chunk by chunk); ``last`` marks it complete.
        The caller keeps to the declared dtype and size."""
        spec = self.specs.get(name)
        if spec is None:
            raise ModelkitError(f"tensor {name!r} was not declared for the output")
        if byte_offset + len(data) > spec.nbytes:
            raise ModelkitError(f"tensor {name!r}: write past its {spec.nbytes} bytes")
        assert self._fd is not None, "writer is closed"
        _pwrite_all(self._fd, data, self.data_start + self._offsets[name] + byte_offset)
        if last:
            self._written.add(name)

    def sink(self, name: str) -> TensorSink:
        """Where tensor ``name``'s bytes go, in pieces or copied from a file."""
        if name not in self.specs:
            raise ModelkitError(f"tensor {name!r} was not declared for the output")
        return TensorSink(self, name)

    def copy_from(self, name: str, source: Any, key: str) -> None:
        """Copy tensor ``key`` of an open safetensors ``source`` unchanged
        into tensor ``name`` (same dtype and size), file to file."""
        spec = self.specs[name]
        if source.infos[key].nbytes != spec.nbytes or source.infos[key].dtype != spec.dtype:
            raise ModelkitError(f"tensor {name!r}: {key!r} has another dtype or size")
        assert self._fd is not None, "writer is closed"
        source.copy_into(key, self._fd, self.data_start + self._offsets[name])
        self._written.add(name)

    def patch_header(self, placeholder: str, value: str) -> None:
        """Replace every occurrence of ``placeholder`` in the header with
        ``value`` (same length, no JSON escaping needed): metadata that is
        only known after the data is written, such as the sha256 of an input
        hashed while the output was streaming."""
        old, new = placeholder.encode(), value.encode()
        if len(old) != len(new) or not new.isascii() or b'"' in new or b"\\" in new:
            raise ModelkitError("header patch must be plain ASCII of the same length")
        assert self._fd is not None, "writer is closed"
        pos = self._header.find(old)
        if pos < 0:
            raise ModelkitError(f"header has no placeholder {placeholder!r}")
        while pos >= 0:
            _pwrite_all(self._fd, memoryview(new), pos)
            pos = self._header.find(old, pos + len(old))

    def commit(self) -> Path:
        """Check every tensor was written, then rename the temp file over the
        target. Returns the target path."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            self.abort()
            raise ModelkitError(f"{len(missing)} tensors were never written "
                                f"(first: {missing[0]!r}); nothing was saved")
        assert self._fd is not None, "writer is closed"
        try:
            os.fsync(self._fd)
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)
        commit_file(self.temp_path, self.target, self.overwrite)
        return self.target

    def abort(self) -> None:
        """Drop the temp file; the target is left untouched."""
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
        finally:
            _drop_temp(self.temp_path)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


class TensorSink:
    """The bytes of one output tensor, written in pieces (``write``) or
    copied whole from an open safetensors file (``copy_from``)."""

    def __init__(self, writer: SafetensorsWriter, name: str) -> None:
        self.writer, self.name = writer, name

    def write(self, byte_offset: int, data: memoryview, last: bool = False) -> None:
        self.writer.write_part(self.name, byte_offset, data, last)

    def copy_from(self, source: Any, key: str) -> None:
        self.writer.copy_from(self.name, source, key)


def write_sparse(target: str | os.PathLike[str], specs: Iterable[TensorSpec],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a valid safetensors file whose tensors are all zero, as a sparse
    file: a full-size SDXL layout costs a few KB of disk. For header-level
    tests and benchmarks of full-size key structures."""
    path = Path(target)
    spec_list = list(specs)
    header, _ = build_header(spec_list, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in spec_list))
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _refuse_input_folder(target: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    for src in inputs:
        if _same_file(target, Path(src)) or _inside(Path(src), target):
            raise OutputError(f"{target}: output folder is or holds an input; choose "
                              "another output path (modelkit never writes over an input)")


def check_output_dir(target: Path, inputs: Iterable[str | os.PathLike[str]],
                     overwrite: bool = False) -> None:
    """Refuse an output folder that is a file, holds or is an input, whose
    parent is missing, or that is not empty (unless ``overwrite``: the
    caller may replace it)."""
    _refuse_input_folder(target, inputs)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose a new folder name")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"{target}: folder exists and is not empty; choose a new "
                          "folder name or empty it first")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder's parent does not exist")


@contextmanager
def atomic_dir(target: Path, inputs: Iterable[str | os.PathLike[str]] = (),
               overwrite: bool = False) -> Iterator[Path]:
    """Yield a new hidden ``.NAME.HOST-PID.*.partial`` folder beside ``target``; move
    it to ``target`` when the block succeeds, remove it with everything in
    it when it fails. The caller checked the output before writing
    (:func:`check_output_dir`); the move itself never replaces a folder
    with files in it unless ``overwrite``: then the existing folder is moved
    aside, replaced, and deleted only once the new one is in place.

    Raises:
        OutputError: ``target`` is or holds an input, is a file, or (without
            ``overwrite``) holds files.
    """
    target = Path(target)
    _refuse_input_folder(target, inputs)
    remove_stale_partials(target)
    with defer_signals():
        temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".partial",
                                     dir=target.parent))
        _LIVE_TEMPS.add(temp)
    old: Path | None = None
    try:
        yield temp
        os.chmod(temp, 0o755)
        if overwrite and target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                        dir=target.parent))
            os.rename(target, old / "previous")
        try:
            os.rename(temp, target)  # POSIX: replaces an empty folder atomically, no other
        except OSError as exc:  # the no-replace commit
            if exc.errno in (errno.ENOTDIR, errno.EISDIR):
                raise OutputError(f"{target}: exists and is not a folder; choose a new "
                                  "folder name") from None
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputError(f"{target}: folder exists and is not empty; choose a new "
                              "folder name or pass --overwrite to replace it") from None
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old / "previous", target)  # put the user's folder back
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        _LIVE_TEMPS.discard(temp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
