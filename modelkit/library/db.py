"""The library index: one SQLite file (stdlib ``sqlite3``, WAL mode).

Every call opens its own connection, so threads and processes never share
one. WAL lets readers (the TUI) read while a scan writes; writers take the
write lock with ``BEGIN IMMEDIATE`` for short batches and wait for each other
(``busy_timeout``), so two scans at once serialise their batches instead of
failing or corrupting the file. The index is a cache of what the files say:
an index from another schema version is rebuilt, never migrated by hand.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from modelkit.errors import ModelkitError
from modelkit.textsafe import shown

SCHEMA_VERSION = 2  # 2: key_layout
BUSY_TIMEOUT_MS = 60_000
DB_NAME = "library.sqlite"

# columns of ``files``; the order is the INSERT order
COLUMNS = (
    "path", "name", "folder", "root", "size", "mtime_ns", "kind", "arch", "prediction",
    "variant", "dtype", "layout", "key_layout", "role", "base", "n_tensors", "n_params", "has_ema",
    "n_ema", "data_bytes", "components", "metadata", "report", "error", "sha256",
    "legacy", "addnet", "previews", "civitai", "sidecars", "scanned_at",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,      -- absolute path of the model file
    name TEXT NOT NULL,         -- file name
    folder TEXT NOT NULL,       -- its folder
    root TEXT NOT NULL,         -- the scanned folder it was found under
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,         -- checkpoint, unet, lora, vae, embedding, ..., broken
    arch TEXT NOT NULL,
    prediction TEXT,
    variant TEXT,
    dtype TEXT,                 -- the most common float dtype
    layout TEXT NOT NULL,       -- a1111, comfyui, plain
    key_layout TEXT,            -- key names of the model: original, diffusers
    role TEXT,                  -- what its folder is for
    base TEXT NOT NULL,         -- the UI's model root (see modelkit.library.layout)
    n_tensors INTEGER,
    n_params INTEGER,
    has_ema INTEGER,
    n_ema INTEGER,
    data_bytes INTEGER,         -- bytes after the safetensors header (dupe candidates)
    components TEXT,            -- JSON: name -> inspect component report
    metadata TEXT,              -- JSON: __metadata__
    report TEXT,                -- JSON: inspect report without metadata
    error TEXT,                 -- why the file could not be read
    sha256 TEXT,
    legacy TEXT,
    addnet TEXT,                -- sha256 of the tensor data
    previews TEXT,              -- JSON list of sidecar image paths
    civitai TEXT,               -- JSON of the .civitai.info sidecar, if any
    sidecars TEXT,              -- names and mtimes of the sidecars, to see changes
    scanned_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_kind ON files(kind, arch);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE INDEX IF NOT EXISTS files_addnet ON files(addnet);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def default_db_path() -> Path:
    """``library.sqlite`` beside the hash cache (``$MODELKIT_CACHE_DIR`` or
    ``~/.cache/modelkit``)."""
    from modelkit.io.hashcache import cache_path

    return cache_path().parent / DB_NAME


def _retry(fn: Callable[[], object], attempts: int = 50) -> None:
    """Run ``fn()`` again while another connection holds a lock it needs
    (switching to WAL takes an exclusive lock that busy_timeout may not cover)."""
    for i in range(attempts):
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


def _foreign(path: Path, problem: str) -> ModelkitError:
    return ModelkitError(f"{shown(path, 300)}: not a modelkit library index ({problem}); "
                         "pass --db with another path (modelkit leaves this file alone)")


def _check_own(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version, after checking (reading only) that the file
    is a modelkit index or an empty database: another program's database
    that happens to have a ``files`` table must never be rebuilt."""
    # one read transaction: two autocommit reads could see the version before
    # and the tables after another process's first schema write (a fresh
    # index then looked foreign)
    conn.execute("BEGIN")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.execute("COMMIT")
    if version == 0 and tables:
        raise _foreign(path, "it holds other tables: "
                             f"{', '.join(sorted(map(shown, tables))[:5])}")
    if version == SCHEMA_VERSION:
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(files)"))
        if columns != COLUMNS:
            raise _foreign(path, "its files table has other columns")
    return version


def _prepare(conn: sqlite3.Connection, path: Path, version: int) -> None:
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ModelkitError(f"{path}: library index written by a newer modelkit (schema "
                            f"{version}); upgrade modelkit or pass --db with another file")
    with write(conn):
        # re-read under the write lock: another process may have done it
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            conn.execute("DROP TABLE IF EXISTS files")
            # executescript() would commit the open transaction: one at a time
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)


def connect(db: str | os.PathLike[str] | None = None) -> sqlite3.Connection:
    """Open (creating when needed) the index at ``db`` (default
    :func:`default_db_path`), in WAL mode with the current schema.

    Raises:
        ModelkitError: the file is not an SQLite database, or its folder
            cannot be created.
    """
    path = Path(db) if db is not None else default_db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ModelkitError(f"{shown(path, 300)}: cannot open the library index "
                            f"({shown(exc, 200)}); pass --db with a writable path") from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = _check_own(conn, path)
        _retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        conn.execute("PRAGMA synchronous = NORMAL")
        _prepare(conn, path, version)
    except sqlite3.Error as exc:
        conn.close()
        raise (index_error(path, exc) or ModelkitError(
            f"{shown(path, 300)}: the library index failed ({shown(exc, 200)}); pass "
            "--db with another path")) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _disk_full(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem of ``path``'s folder has no space left (SQLite
    reports a failed WAL write as an I/O error)."""
    try:
        st = os.statvfs(Path(path).parent)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < 64 << 10


def index_error(path: str | os.PathLike[str], exc: sqlite3.Error) -> ModelkitError | None:
    """The one-line error for an SQLite failure on the index at ``path``: a
    read-only or full disk says so; only a file that is not an SQLite
    database (or a damaged one) is called "not a modelkit library index";
    None for any other failure."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    where = shown(os.fspath(path), 300)
    text = shown(exc, 200)
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or (
            "readonly" in text):
        return ModelkitError(f"{where}: cannot write the library index: the file or its "
                             f"folder is read-only ({text}); pass --db with a writable "
                             "path")
    if name == "SQLITE_FULL" or "disk is full" in text or (
            name.startswith("SQLITE_IOERR") and _disk_full(path)):
        return ModelkitError(f"{where}: cannot write the library index: the disk is full "
                             f"({text}); free some space or pass --db with a path on "
                             "another disk")
    if name.startswith("SQLITE_IOERR"):
        return ModelkitError(f"{where}: cannot read or write the library index ({text}: "
                             "a full disk or a failing device?); free some space or pass "
                             "--db with another path")
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text:
        return ModelkitError(f"{where}: not a modelkit library index ({text}); pass --db "
                             "with another path, or delete the file to rebuild it")
    return None  # another failure (a bug): not the disk's or the file's fault


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction: takes the write lock at once (waiting for other
    writers), commits on success, rolls back on any error."""
    _retry(lambda: conn.execute("BEGIN IMMEDIATE"))
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # keep the error that stopped it
            conn.execute("ROLLBACK")  # (a full disk may have ended the transaction)
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def opened(db: str | os.PathLike[str] | None = None) -> Iterator[sqlite3.Connection]:
    """:func:`connect`, closed on exit."""
    conn = connect(db)
    path = Path(db) if db is not None else default_db_path()
    try:
        yield conn
    except sqlite3.Error as exc:
        error = index_error(path, exc)
        if error is None:
            raise
        raise error from None
    finally:
        conn.close()


def under(folders: Iterable[str]) -> tuple[str, list[str]]:
    """A WHERE clause (and its parameters) for paths at or below any of
    ``folders``; compares prefixes, so ``%`` and ``_`` in names need no
    escaping."""
    clauses, params = [], []
    for folder in folders:
        prefix = folder.rstrip(os.sep) + os.sep
        clauses.append("substr(path, 1, length(?)) = ?")
        params += [prefix, prefix]
    return ("(" + " OR ".join(clauses) + ")" if clauses else "1"), params
