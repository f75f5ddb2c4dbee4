"""File hashes used by the SD ecosystem, computed in one streamed pass.

- ``sha256``: the whole file (A1111 checkpoint hash); ``autov2`` is its first
  10 hex digits (Civitai AutoV2).
- ``legacy``: sha256 of 0x10000 bytes at offset 0x100000, 8 hex digits (old
  A1111 "model hash", Civitai AutoV1), computed on the bytes that exist there,
  as A1111 does (files under 1 MiB hash the empty string).
- ``addnet``: sha256 of the tensor bytes after the safetensors header (kohya
  ``sshs_model_hash``, A1111 LoRA hash, ``modelspec.hash_sha256`` without
  ``0x``); unchanged by metadata edits.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelkit.errors import CancelFlag, check_cancel
from modelkit.io.files import check_input_file, input_error
from modelkit.io.header import read_header
from modelkit.jsontypes import JSONDict
from modelkit.progress import HASH, Progress, ProgressFn, no_progress

CHUNK = 8 << 20
LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000


@dataclass
class FileHashes:
    """Hashes of one file and any embedded hash metadata that disagrees."""

    path: str
    size_bytes: int
    sha256: str
    autov2: str
    legacy: str
    addnet: str | None
    mismatches: list[str] = field(default_factory=list)

    def to_dict(self) -> JSONDict:
        return asdict(self)


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's old 8-digit model hash (see the module docstring)."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]


def _stream_hashes(path: Path, data_start: int | None, size: int,
                   progress: ProgressFn, cancel: CancelFlag | None = None
                   ) -> tuple[str, str | None]:
    full = hashlib.sha256()
    tensors = hashlib.sha256() if data_start is not None else None
    done = 0
    # hashlib releases the GIL on large buffers: the two digests run on two cores
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(2) as pool:
        while chunk := f.read(CHUNK):
            check_cancel(cancel)
            view = memoryview(chunk)
            jobs = [pool.submit(full.update, view)]
            if tensors is not None and data_start is not None:
                skip = max(0, data_start - done)
                if skip < len(view):
                    jobs.append(pool.submit(tensors.update, view[skip:]))
            for job in jobs:
                job.result()
            done += len(chunk)
            progress(Progress(path.name, done, size, "bytes", path.name, HASH))
    return full.hexdigest(), tensors.hexdigest() if tensors is not None else None


def _embedded_mismatches(meta: dict[str, str], h: FileHashes) -> list[str]:
    out = []
    checks = {
        "sshs_model_hash": h.addnet,
        "modelspec.hash_sha256": "0x" + h.addnet if h.addnet else None,
        "sshs_legacy_hash": h.legacy,
    }
    for key, computed in checks.items():
        stored = meta.get(key)
        if stored and computed and stored.lower() != computed:
            out.append(f"{key} in metadata is {stored}, computed {computed}")
    return out


def hash_file(path: str | os.PathLike[str], progress: ProgressFn = no_progress,
              tensor_hash: bool = True, cancel: CancelFlag | None = None) -> FileHashes:
    """Compute every hash of ``path`` in one read of the file; without
    ``tensor_hash`` the addnet digest is skipped (half the CPU work).
    ``cancel`` (a ``threading.Event``) is checked before each 8 MB chunk."""
    p = check_input_file(path)
    size = p.stat().st_size
    meta: dict[str, str] = {}
    data_start = None
    if p.suffix.lower() == ".safetensors" and tensor_hash:
        header = read_header(p)
        data_start, meta = header.data_start, header.metadata
    try:
        sha, addnet = _stream_hashes(p, data_start, size, progress, cancel)
        legacy = legacy_hash(p)
    except OSError as exc:  # EIO (/proc/self/mem, a failing disk), a vanished file
        raise input_error(p, f"cannot read it ({exc.strerror or type(exc).__name__})"
                          ) from None
    result = FileHashes(str(p), size, sha, sha[:10], legacy, addnet)
    result.mismatches = _embedded_mismatches(meta, result)
    return result
