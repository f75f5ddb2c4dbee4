"""Provenance for converted files: what was done, to which input.

Every convert command keeps the source ``__metadata__`` (``ss_*``,
``modelspec.*``, ``sd_merge_*``, ``modelkit.*``) and appends one entry to
``modelkit.history``, a JSON list of ``{op, params, inputs, version}``; each
input carries its file name and sha256.

Hashing a 7 GB input takes seconds, so inputs missing from the hash cache are
hashed on a thread *while* the output streams: the header first holds a
random 64-hex placeholder, patched in place with the digest before the file is
committed (both are 64 ASCII characters, so the header length is unchanged).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelkit import __version__
from modelkit.io.hashcache import lookup
from modelkit.io.writer import SafetensorsWriter

HISTORY_KEY = "modelkit.history"


class InputHashes:
    """sha256 of each input file: from the cache when fresh, else computed
    in the background and patched into the header by :meth:`patch`."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.values: dict[Path, str] = {}
        self._pending: dict[str, Future[str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        for p in dict.fromkeys(Path(x) for x in paths):
            if not p.is_file():
                continue  # a diffusers folder: its parts are hashed by name only
            cached = lookup(p)
            if cached is not None:
                self.values[p] = cached.sha256
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="modelkit-hash")
            token = secrets.token_hex(32)
            self.values[p] = token
            self._pending[token] = self._pool.submit(_sha256, p)

    def patch(self, writer: SafetensorsWriter) -> None:
        """Wait for background hashes and write them into the header."""
        for token, job in self._pending.items():
            writer.patch_header(token, job.result())
        self.close()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def fill(self, metadata: dict[str, str]) -> dict[str, str]:
        """``metadata`` with every placeholder replaced by its digest (waits
        for the hashes): for outputs whose header cannot be patched later."""
        out = dict(metadata)
        for token, job in self._pending.items():
            digest = job.result()
            out = {k: v.replace(token, digest) for k, v in out.items()}
            self.values = {p: (digest if v == token else v) for p, v in self.values.items()}
        self._pending.clear()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _sha256(path: Path) -> str:
    from modelkit.io.hashcache import cached_hashes

    return cached_hashes(path, tensor_hash=False).sha256


def history_entry(op: str, params: dict[str, Any], hashes: InputHashes,
                  paths: Iterable[Path]) -> dict[str, Any]:
    """One ``modelkit.history`` entry for an operation that read ``paths``."""
    inputs = [{"file": p.name, "sha256": hashes.values.get(Path(p))} for p in paths]
    return {"op": op, "params": params, "inputs": inputs, "version": __version__}


def with_history(metadata: dict[str, str], entries: list[dict[str, Any]]) -> dict[str, str]:
    """``metadata`` with ``entries`` appended to its ``modelkit.history``."""
    try:
        history = json.loads(metadata.get(HISTORY_KEY, "[]"))
        if not isinstance(history, list):
            history = []
    except ValueError:
        history = []
    out = dict(metadata)
    out[HISTORY_KEY] = json.dumps([*history, *entries])
    out["modelkit.version"] = __version__
    return out
