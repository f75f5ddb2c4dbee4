"""A cache of file hashes keyed by path, size and modification time, so input
hashes recorded in merge outputs are computed once per file version (the
A1111 ``cache.json`` idea). Location: ``$MODELKIT_CACHE_DIR`` or
``~/.cache/modelkit``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from modelkit.io.hashing import FileHashes, hash_file
from modelkit.progress import ProgressFn, no_progress


def cache_path() -> Path:
    """Where the hash cache lives."""
    root = os.environ.get("MODELKIT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "modelkit"
    return base / "hashes.json"


def _load() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(data: dict[str, dict[str, object]]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def _entry_hashes(path: str | os.PathLike[str], entry: dict[str, object] | None,
                  st: os.stat_result) -> FileHashes | None:
    if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = str(entry["sha256"])
    return FileHashes(str(path), st.st_size, sha, sha[:10], str(entry["legacy"]),
                      entry.get("addnet"))  # type: ignore[arg-type]


def lookup(path: str | os.PathLike[str]) -> FileHashes | None:
    """The cached hashes of ``path`` when its size and mtime still match
    (the addnet digest may be None); ``None`` when not cached or stale."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return None
    return _entry_hashes(path, _load().get(str(p)), st)


def lookup_many(paths: Iterable[str | os.PathLike[str]]) -> dict[str, FileHashes]:
    """:func:`lookup` for many files with one read of the cache: path (as
    given) -> hashes, for the files whose cached size and mtime still match."""
    data = _load()
    found: dict[str, FileHashes] = {}
    for path in paths if data else ():
        p = Path(path).resolve()
        try:
            hit = _entry_hashes(path, data.get(str(p)), p.stat())
        except OSError:
            continue
        if hit is not None:
            found[str(path)] = hit
    return found


def cached_hashes(path: str | os.PathLike[str], progress: ProgressFn = no_progress,
                  tensor_hash: bool = True) -> FileHashes:
    """Hashes of ``path``, from the cache when size and mtime match; without
    ``tensor_hash`` the addnet digest may be missing (None)."""
    hit = lookup(path)
    if hit is not None and (hit.addnet or not tensor_hash):
        return hit
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    result = hash_file(p, progress, tensor_hash)
    data = _load()
    data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": result.sha256,
                 "legacy": result.legacy, "addnet": result.addnet}
    _save(data)
    result.path = str(path)
    return result
