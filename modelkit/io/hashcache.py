"""A cache of file hashes keyed by path, size and modification time, so input
hashes recorded in merge outputs are computed once per file version (the
A1111 ``cache.json`` idea). Location: ``$MODELKIT_CACHE_DIR`` or
``~/.cache/modelkit``."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from modelkit.errors import CancelFlag, defer_signals
from modelkit.io.hashing import FileHashes, hash_file
from modelkit.progress import ProgressFn, no_progress

_SAVE_LOCK = threading.Lock()


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
    # a small file: a signal waits for it (the run stops at its next check)
    # rather than leave a temp file in the cache folder
    with defer_signals():
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
    sha, addnet = str(entry["sha256"]), entry.get("addnet")
    return FileHashes(str(path), st.st_size, sha, sha[:10], str(entry["legacy"]),
                      addnet if isinstance(addnet, str) else None)


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


def find_by_sha256(sha256: str) -> Path | None:
    """A file modelkit hashed before whose content is ``sha256`` (its size
    and mtime unchanged since), or None: the hash cache doubles as an index
    of known files, so a recipe that names inputs by hash finds them."""
    for key, entry in _load().items():
        if entry.get("sha256") != sha256:
            continue
        p = Path(key)
        try:
            st = p.stat()
        except OSError:
            continue
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return p
    return None


def cached_hashes(path: str | os.PathLike[str], progress: ProgressFn = no_progress,
                  tensor_hash: bool = True, cancel: CancelFlag | None = None) -> FileHashes:
    """Hashes of ``path``, from the cache when size and mtime match; without
    ``tensor_hash`` the addnet digest may be missing (None)."""
    hit = lookup(path)
    if hit is not None and (hit.addnet or not tensor_hash):
        return hit
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    result = hash_file(p, progress, tensor_hash, cancel)
    entry: dict[str, object] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "sha256": result.sha256, "legacy": result.legacy,
                                "addnet": result.addnet}
    # InputHashes hashes on two threads: one read-modify-write at a time, or
    # one thread's entry is lost
    with _SAVE_LOCK:
        data = _load()
        data[key] = entry
        _save(data)
    result.path = str(path)
    return result


class InputHashes:
    """The sha256 of each input file, for provenance: from the cache when
    fresh, else computed on background threads while the output streams.

    ``values[path]`` is the digest, or for a file still being hashed a random
    64-hex placeholder of the same length; :meth:`patches` waits for the
    threads and maps each placeholder to its digest, so the writer can patch
    the finished header in place. Folders (diffusers inputs) are skipped:
    their files are listed one by one by the caller.
    """

    def __init__(self, paths: Iterable[Path], progress: ProgressFn = no_progress,
                 cancel: CancelFlag | None = None) -> None:
        import secrets

        self.values: dict[Path, str] = {}
        self.pending_bytes = 0
        self._pending: dict[str, tuple[Path, Future[str]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        for p in dict.fromkeys(Path(x) for x in paths):
            if not p.is_file():
                continue
            cached = lookup(p)
            if cached is not None:
                self.values[p] = cached.sha256
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="modelkit-hash")
            token = secrets.token_hex(32)
            self.values[p] = token
            self.pending_bytes += p.stat().st_size
            job = self._pool.submit(_sha256, p, progress, cancel)
            self._pending[token] = (p, job)

    def known(self) -> dict[Path, str]:
        """The digests known now (placeholders left out)."""
        pending = set(self._pending)
        return {p: v for p, v in self.values.items() if v not in pending}

    def patches(self) -> dict[str, str]:
        """Wait for the background hashes: ``{placeholder: digest}``."""
        out = {}
        for token, (path, job) in self._pending.items():
            out[token] = job.result()
            self.values[path] = out[token]
        self._pending.clear()
        self.close()
        return out

    def close(self) -> None:
        """Stop waiting for hashes still running (cancel sets them to stop)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _sha256(path: Path, progress: ProgressFn, cancel: CancelFlag | None) -> str:
    return cached_hashes(path, progress, tensor_hash=False, cancel=cancel).sha256
