"""``scan``: find model files under folders and index what their headers say.

A re-scan lists the folders and compares each file's size and mtime with the
index: only new and changed files are inspected again, files that are gone
leave the index, and sidecars (previews, ``.civitai.info``) are re-read when
they change. Hashing is opt-in; hashes already in the hash cache
(:mod:`modelkit.io.hashcache`) are picked up for free.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import INTERRUPTED, Cancelled, Interrupted, ModelkitError
from modelkit.io.formats import MODEL_SUFFIXES, SAFETENSORS
from modelkit.jsontypes import JSONDict
from modelkit.library import db as dbm
from modelkit.library.layout import Placer, is_sweep_folder
from modelkit.progress import HASH, Progress, ProgressFn, no_progress
from modelkit.textsafe import shown

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from modelkit.inspect.report import ModelReport
    from modelkit.io.hashing import FileHashes

logger = logging.getLogger(__name__)

PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".preview.jpg",
                    ".preview.jpeg", ".webp", ".preview.webp")
CIVITAI_SUFFIX = ".civitai.info"
BATCH = 100  # rows per write transaction
PARALLEL_MIN = 64  # files to read before worker processes pay for their start-up
CHUNK = 8  # files per task sent to a worker process (cancel waits for those running)
CIVITAI_MAX_BYTES = 4 << 20
LIST_LIMIT = 20  # entries kept of long lists in component reports


@dataclass
class Found:
    """A model file seen on disk, with its sidecars."""

    path: str
    root: str
    size: int
    mtime_ns: int
    sidecars: dict[str, int] = field(default_factory=dict)  # name -> mtime_ns

    @property
    def sidecar_sig(self) -> str:
        return json.dumps(sorted(self.sidecars.items()))


@dataclass
class ScanReport:
    """What a scan found and did."""

    roots: list[str]
    found: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    broken: int = 0
    sweeps_skipped: int = 0  # sweep output folders, never indexed
    hashed: int = 0
    sidecars_updated: int = 0
    seconds: float = 0.0
    db: str = ""
    kinds: dict[str, int] = field(default_factory=dict)
    # one line per file or folder that could not be indexed (the scan goes on)
    warnings: list[str] = field(default_factory=list)

    @property
    def inspected(self) -> int:
        return self.new + self.changed

    def to_dict(self) -> JSONDict:
        return {**asdict(self), "inspected": self.inspected}


def _cancelled(cancel: threading.Event | None) -> bool:
    """Whether ``cancel`` is set; raises :class:`Interrupted` when a signal
    was received but its handler could not raise (it landed in an import or
    a deferred block), so a SIGTERM is never lost between two files."""
    if INTERRUPTED.is_set() and threading.current_thread() is threading.main_thread():
        raise Interrupted
    return cancel is not None and cancel.is_set()


def _stop() -> Cancelled:
    return Cancelled("scan cancelled; the files indexed so far are kept")


# --- walking ----------------------------------------------------------------


def _is_model(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(MODEL_SUFFIXES)


def _sidecars_of(stem: str, names: dict[str, os.DirEntry[str]]) -> dict[str, int]:
    out = {}
    for suffix in (*PREVIEW_SUFFIXES, CIVITAI_SUFFIX):
        entry = names.get(stem + suffix)
        if entry is not None:
            try:
                out[entry.name] = entry.stat().st_mtime_ns
            except OSError:
                continue
    return out


def _storable(path: str) -> bool:
    """Whether ``path`` can be stored in the index (SQLite text is UTF-8; a
    name with undecodable bytes holds lone surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk(root: str, seen: set[tuple[int, int]], sweeps: list[str],
          warnings: list[str] | None = None) -> Iterator[Found]:
    """Model files under ``root``, in sorted depth-first order; hidden
    folders, diffusers pipeline folders (``model_index.json``) and sweep
    folders (their cells are no checkpoints of the user's; appended to
    ``sweeps``) are skipped, folder links followed once. The walk keeps its
    own stack, so a tree thousands of folders deep is walked like any other;
    a file whose name cannot be stored is left out with a line in
    ``warnings``."""
    warn = warnings if warnings is not None else []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = {e.name: e for e in it}
        except OSError as exc:
            warn.append(f"{shown(folder, 300)}: skipped: cannot list the folder "
                        f"({exc.strerror or type(exc).__name__})")
            continue
        if "model_index.json" in entries:
            continue
        if is_sweep_folder(entries):
            sweeps.append(folder)
            continue
        subfolders = []
        for name in sorted(entries):
            entry = entries[name]
            try:
                is_dir = entry.is_dir()
                is_model = not is_dir and _is_model(name) and entry.is_file()
            except OSError:
                continue
            if is_dir and not name.startswith("."):
                subfolders.append(entry.path)
            elif is_model:
                if not _storable(entry.path):
                    warn.append(f"{shown(entry.path, 300)}: skipped: the file name is not "
                                "valid UTF-8; rename it to index it")
                    continue
                try:
                    est = entry.stat()
                except OSError:
                    continue
                stem = name.rsplit(".", 1)[0]
                yield Found(entry.path, "", est.st_size, est.st_mtime_ns,
                            _sidecars_of(stem, entries))
        stack.extend(reversed(subfolders))


def find_files(roots: Sequence[str], warnings: list[str] | None = None, *,
               sweeps: list[str] | None = None) -> dict[str, Found]:
    """Every model file under ``roots`` (absolute folder paths), by path;
    the sweep folders skipped are appended to ``sweeps``, files left out
    are named in ``warnings``."""
    found: dict[str, Found] = {}
    seen: set[tuple[int, int]] = set()
    for root in roots:
        for f in _walk(root, seen, [] if sweeps is None else sweeps, warnings):
            f.root = root
            found.setdefault(f.path, f)
    return found


# --- reading one file ---------------------------------------------------------


def _data_bytes(path: str, size: int) -> int | None:
    """Bytes after a safetensors header (what the tensor-data hash covers)."""
    if not path.lower().endswith(SAFETENSORS.suffixes):
        return None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
    except OSError:
        return None
    return size - 8 - n if 0 <= n <= size - 8 else None  # else a broken file


def _main_dtype(dtypes: dict[str, int]) -> str | None:
    floats = {k: v for k, v in dtypes.items() if k.startswith(("F", "BF"))}
    pool = floats or dtypes
    return max(pool, key=lambda k: pool[k]) if pool else None


def _gguf_dtype(quant_types: dict[str, int]) -> str | None:
    """A GGUF file's dtype column: its most common quantized type (``Q8_0``),
    or its main float type when nothing is quantized."""
    quantized = {k: v for k, v in quant_types.items() if k.startswith(("Q", "IQ", "TQ",
                                                                      "MXFP", "NVFP"))}
    return _main_dtype(quant_types) if not quantized else max(
        quantized, key=lambda k: quantized[k])


def _short_component(comp: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[:LIST_LIMIT] if isinstance(v, list) else v) for k, v in comp.items()}


def _civitai(path: Path) -> dict[str, Any] | None:
    """The useful part of a Civitai Helper ``.civitai.info`` file."""
    try:
        if path.stat().st_size > CIVITAI_MAX_BYTES:
            return {"error": "file too large to read"}
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except RecursionError:
        return {"error": "JSON nested too deeply"}
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable ({type(exc).__name__})"}
    if not isinstance(data, dict):
        return {"error": "not a JSON object"}
    model = got if isinstance(got := data.get("model"), dict) else {}
    words = data.get("trainedWords")
    return {
        "model": model.get("name"), "type": model.get("type"), "version": data.get("name"),
        "base_model": data.get("baseModel"), "model_id": data.get("modelId"),
        "version_id": data.get("id"),
        "trained_words": [str(w) for w in words][:50] if isinstance(words, list) else [],
    }


def _sidecar_columns(f: Found) -> dict[str, Any]:
    folder = Path(f.path).parent
    previews = [str(folder / n) for n in f.sidecars if not n.endswith(CIVITAI_SUFFIX)]
    civitai = next((n for n in f.sidecars if n.endswith(CIVITAI_SUFFIX)), None)
    info = _civitai(folder / civitai) if civitai else None
    return {"previews": json.dumps(previews), "civitai": json.dumps(info) if info else None,
            "sidecars": f.sidecar_sig}


def _report_columns(rep: ModelReport) -> dict[str, Any]:
    d = rep.to_dict()
    meta = d.pop("metadata")
    pred = d["prediction"]["type"]
    return {
        "kind": rep.kind, "arch": rep.arch,
        "prediction": pred if pred != "unknown" else None, "variant": rep.variant,
        "key_layout": rep.layout,
        "dtype": (_gguf_dtype(rep.gguf["quant_types"]) if rep.gguf else
                  _main_dtype(rep.dtypes)), "n_tensors": rep.n_tensors,
        "n_params": rep.n_params, "has_ema": int(rep.has_ema), "n_ema": rep.n_ema_tensors,
        "components": json.dumps({k: _short_component(c) for k, c in d["components"].items()}),
        "metadata": json.dumps(meta), "report": json.dumps(d), "error": None,
    }


def read_file(f: Found, placer: Placer) -> dict[str, Any]:
    """The index row of ``f``: inspect its header (a broken file gets kind
    ``broken`` and the one-line reason), place it, read its sidecars."""
    from modelkit.inspect.report import inspect_model

    p = Path(f.path)
    place = placer.place(p, Path(f.root))
    row: dict[str, Any] = dict.fromkeys(dbm.COLUMNS)
    row.update(path=f.path, name=p.name, folder=str(p.parent), root=f.root, size=f.size,
               mtime_ns=f.mtime_ns, layout=place.layout, role=place.role,
               base=str(place.base), data_bytes=_data_bytes(f.path, f.size),
               scanned_at=time.time())
    try:
        row.update(_report_columns(inspect_model(p)))
    except ModelkitError as exc:
        row.update(kind="broken", arch="unknown", error=str(exc))
    except Exception as exc:  # one odd file must not stop a scan of thousands
        row.update(kind="broken", arch="unknown",
                   error=f"{p}: could not be inspected ({type(exc).__name__}: {exc})")
    row.update(_sidecar_columns(f))
    return row


# --- writing ------------------------------------------------------------------

_INSERT = (f"INSERT OR REPLACE INTO files ({', '.join(dbm.COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(dbm.COLUMNS))})")


# what binding a row's values can raise (a number over 64 bits, a string
# with lone surrogates): that row, not its batch, is left out
_UNSTORABLE = (OverflowError, UnicodeEncodeError, ValueError, sqlite3.InterfaceError)


def _put(conn: sqlite3.Connection, rows: list[dict[str, Any]],
         warnings: list[str] | None = None) -> None:
    """Store ``rows`` in one transaction; when a row cannot be stored, the
    others are stored one by one and that row is named in ``warnings``."""
    if not rows:
        return
    values = [tuple(r[c] for c in dbm.COLUMNS) for r in rows]
    try:
        with dbm.write(conn):
            conn.executemany(_INSERT, values)
    except _UNSTORABLE:
        for row, value in zip(rows, values, strict=True):
            try:
                with dbm.write(conn):
                    conn.execute(_INSERT, value)
            except _UNSTORABLE as exc:
                if warnings is not None:
                    warnings.append(f"{shown(row['path'], 300)}: could not be indexed "
                                    f"({type(exc).__name__}: {shown(exc, 120)})")
    rows.clear()


def _apply_hashes(row: dict[str, Any], h: FileHashes | None) -> None:
    if h is not None:
        row.update(sha256=h.sha256, legacy=h.legacy, addnet=h.addnet)


def _known(conn: sqlite3.Connection, roots: Sequence[str]) -> dict[str, sqlite3.Row]:
    where, params = dbm.under(roots)
    return {r["path"]: r for r in conn.execute(
        f"SELECT path, size, mtime_ns, sidecars FROM files WHERE {where}", params)}


def _read_batch(files: list[Found]) -> list[dict[str, Any]]:
    """Index rows of ``files`` (runs in a worker process)."""
    placer = Placer()
    return [read_file(f, placer) for f in files]


def default_workers() -> int:
    """Worker processes for a big first scan: the CPUs this process may use."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, 8))


def _read_rows(todo: list[Found], workers: int, cancel: threading.Event | None
               ) -> Iterator[tuple[Found, dict[str, Any]]]:
    """(file, row) for every file in ``todo``: in this process for a few
    files, else in ``workers`` spawned processes (header parsing is pure
    Python: threads would share one core)."""
    if workers <= 1 or len(todo) < PARALLEL_MIN:
        placer = Placer()
        for f in todo:
            if _cancelled(cancel):
                raise _stop()
            yield f, read_file(f, placer)
        return
    pool = _start_pool(workers)
    if pool is None:
        yield from _read_rows(todo, 1, cancel)
        return
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    try:
        for chunk, rows in zip(chunks, pool.map(_read_batch, chunks), strict=True):
            if _cancelled(cancel):
                raise _stop()
            yield from zip(chunk, rows, strict=True)
    except BaseException:
        # a signal, a cancel or an error: the workers' chunks are not waited
        # for (a big pickle can take a while); they are stopped now
        _terminate(pool)
        raise
    pool.shutdown(wait=True)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` at once: pending chunks are dropped and the worker
    processes terminated (then killed if they linger)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    # terminate first: a shutdown first let an idle worker take the stop
    # sentinel and exit on its own (0) before the signal, a race the
    # interrupt test lost now and then
    for proc in procs:
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(1)


def _worker_init() -> None:
    """Workers leave Ctrl-C (sent to the whole terminal process group) to the
    parent, which stops them; no traceback from each worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_pool(workers: int) -> ProcessPoolExecutor | None:
    """A pool of spawned processes (never forked: the caller may be a
    threaded app), or None where processes cannot be started here (e.g. a
    host that replaced ``sys.stderr`` with an object without a file)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    try:
        pool.submit(os.getpid).result()
    except (OSError, ValueError, RuntimeError) as exc:
        logger.info("reading headers in this process: worker processes failed (%s)", exc)
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    return pool


def _index(conn: sqlite3.Connection, todo: list[Found], report: ScanReport,
           progress: ProgressFn, cancel: threading.Event | None, workers: int) -> None:
    from modelkit.io.hashcache import lookup_many

    cached = lookup_many(f.path for f in todo)
    rows: list[dict[str, Any]] = []
    try:
        for i, (f, row) in enumerate(_read_rows(todo, workers, cancel), 1):
            _apply_hashes(row, cached.get(f.path))
            report.broken += row["kind"] == "broken"
            rows.append(row)
            if len(rows) >= BATCH:
                _put(conn, rows, report.warnings)
            progress(Progress("scan", i, len(todo), "files", Path(f.path).name, "scan"))
    finally:
        _put(conn, rows, report.warnings)  # what was read so far is kept, even on cancel


def _update_sidecars(conn: sqlite3.Connection, files: list[Found]) -> None:
    if not files:
        return
    updates = []
    for f in files:
        cols = _sidecar_columns(f)
        updates.append((cols["previews"], cols["civitai"], cols["sidecars"], f.path))
    with dbm.write(conn):
        conn.executemany("UPDATE files SET previews = ?, civitai = ?, sidecars = ? "
                         "WHERE path = ?", updates)


def _remove(conn: sqlite3.Connection, paths: Iterable[str], sweeps: Sequence[str] = ()
            ) -> int:
    """Drop ``paths`` that are gone, and those in the sweep folders ``sweeps``."""
    inside = tuple(os.path.join(d, "") for d in sweeps)
    # another scan may have seen the file come back: check the disk again
    gone = [(p,) for p in paths if p.startswith(inside) or not os.path.exists(p)]
    if gone:
        with dbm.write(conn):
            conn.executemany("DELETE FROM files WHERE path = ?", gone)
    return len(gone)


def hash_missing(conn: sqlite3.Connection, paths: Sequence[str],
                 progress: ProgressFn = no_progress,
                 cancel: threading.Event | None = None) -> int:
    """Hash ``paths`` (through the shared hash cache) and store the hashes;
    returns how many were hashed. Hashes are stored file by file, so a
    cancel keeps those already done."""
    from modelkit.io.hashcache import cached_hashes

    sizes = {p: os.path.getsize(p) for p in paths if os.path.isfile(p)}
    total, done, n = sum(sizes.values()), 0, 0
    for path, size in sizes.items():
        if _cancelled(cancel):
            raise _stop()
        base = done

        def step(p: Progress, base: int = base) -> None:
            progress(Progress("hash", base + p.done, total, "bytes", p.item, HASH))

        tensor = path.lower().endswith(SAFETENSORS.suffixes)
        try:
            h = cached_hashes(path, step, tensor_hash=tensor)
        except (ModelkitError, OSError):
            continue  # broken or vanished: the scan reports it
        with dbm.write(conn):
            conn.execute("UPDATE files SET sha256 = ?, legacy = ?, addnet = ? WHERE path = ?",
                         (h.sha256, h.legacy, h.addnet, path))
        done += size
        n += 1
    return n


def _roots(dirs: Iterable[str | os.PathLike[str]]) -> list[str]:
    roots = []
    for d in dirs:
        p = os.path.abspath(os.fspath(d))
        if not os.path.isdir(p):
            raise ModelkitError(f"{d}: no such folder; pass a model folder to scan")
        roots.append(p)
    if not roots:
        raise ModelkitError("no folder to scan; pass one or more model folders")
    return roots


def scan(dirs: Iterable[str | os.PathLike[str]], db: str | os.PathLike[str] | None = None,
         *, hash: bool = False, progress: ProgressFn = no_progress,
         cancel: threading.Event | None = None, workers: int | None = None) -> ScanReport:
    """Index the model files under ``dirs`` into the library at ``db``.

    New and changed files (size or mtime differ) are inspected from their
    headers; unchanged ones are skipped; indexed files under ``dirs`` that
    are gone are removed. Sweep folders (a ``.modelkit-sweep`` marker or a
    ``sweep.jsonl``) are skipped, and their files dropped from the index:
    sweep cells are no library content. With ``hash`` every file without hashes is hashed
    (sha256, legacy and tensor-data hash, shared with the hash cache).
    Headers are read in ``workers`` processes when there are many (default:
    one per usable CPU); ``workers=1`` reads them in this process.

    Raises:
        ModelkitError: a folder does not exist, or the index cannot be opened.
        Cancelled: ``cancel`` was set; what was indexed so far is kept.
    """
    start = time.monotonic()
    roots = _roots(dirs)
    report = ScanReport(roots)
    with dbm.opened(db) as conn:
        report.db = str(conn.execute("PRAGMA database_list").fetchone()["file"])
        sweeps: list[str] = []
        found = find_files(roots, report.warnings, sweeps=sweeps)
        report.sweeps_skipped = len(sweeps)
        known = _known(conn, roots)
        todo, sidecars_only = [], []
        for path, f in found.items():
            old = known.get(path)
            if old is None or old["size"] != f.size or old["mtime_ns"] != f.mtime_ns:
                todo.append(f)
                report.new += old is None
                report.changed += old is not None
            else:
                report.unchanged += 1
                if old["sidecars"] != f.sidecar_sig:
                    sidecars_only.append(f)
        report.found = len(found)
        _index(conn, todo, report, progress, cancel,
               default_workers() if workers is None else workers)
        _update_sidecars(conn, sidecars_only)
        report.sidecars_updated = len(sidecars_only)
        report.removed = _remove(conn, (p for p in known if p not in found), sweeps)
        if hash:
            report.hashed = hash_missing(conn, _unhashed(conn, roots), progress, cancel)
        report.kinds = _kinds(conn, roots)
    report.seconds = time.monotonic() - start
    return report


def _unhashed(conn: sqlite3.Connection, roots: Sequence[str]) -> list[str]:
    where, params = dbm.under(roots)
    return [r["path"] for r in conn.execute(
        f"SELECT path FROM files WHERE {where} AND kind != 'broken' AND (sha256 IS NULL "
        "OR (addnet IS NULL AND data_bytes IS NOT NULL)) ORDER BY path", params)]


def _kinds(conn: sqlite3.Connection, roots: Sequence[str]) -> dict[str, int]:
    where, params = dbm.under(roots)
    return {r["kind"]: r["n"] for r in conn.execute(
        f"SELECT kind, COUNT(*) AS n FROM files WHERE {where} GROUP BY kind ORDER BY kind",
        params)}
