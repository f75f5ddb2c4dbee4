"""Reading the library index: entries with filters, one file's details, and
finding a file by path, name or hash."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import ModelkitError
from modelkit.jsontypes import JSONDict
from modelkit.library import db as dbm

LIGHT_COLUMNS = tuple(c for c in dbm.COLUMNS
                      if c not in ("components", "metadata", "report", "civitai",
                                   "sidecars"))


@dataclass(frozen=True)
class Entry:
    """One indexed file, without its metadata (cheap to list by thousands)."""

    path: str
    name: str
    folder: str
    root: str
    size: int
    mtime_ns: int
    kind: str
    arch: str
    prediction: str | None
    variant: str | None
    dtype: str | None
    layout: str  # the UI folder layout: a1111, comfyui, plain
    role: str | None
    base: str
    n_tensors: int | None
    n_params: int | None
    has_ema: bool
    n_ema: int | None
    data_bytes: int | None
    error: str | None
    sha256: str | None
    legacy: str | None
    addnet: str | None
    previews: tuple[str, ...]
    scanned_at: float
    key_layout: str | None = None  # the key names: original, diffusers (inspect's layout)

    @property
    def short_hash(self) -> str | None:
        """AutoV2 (the first 10 hex digits of sha256), as Civitai shows it."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def to_dict(self) -> JSONDict:
        d = asdict(self)
        d["previews"] = list(self.previews)
        d["autov2"] = self.short_hash
        return d


@dataclass(frozen=True)
class Detail:
    """One file's entry plus what its header said."""

    entry: Entry
    metadata: dict[str, str] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    civitai: dict[str, Any] | None = None

    def to_dict(self) -> JSONDict:
        return {**self.entry.to_dict(), "metadata": self.metadata,
                "components": self.components, "report": self.report,
                "civitai": self.civitai}


@dataclass(frozen=True)
class Filters:
    """Which entries to list: every set field must match.

    ``name`` is a case-insensitive substring of the file name; ``under``
    keeps files at or below any of the folders."""

    kinds: Sequence[str] = ()
    archs: Sequence[str] = ()
    name: str | None = None
    under: Sequence[str] = ()
    prediction: str | None = None
    dtype: str | None = None
    layout: str | None = None
    has_ema: bool | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL WHERE clause and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, values in (("kind", self.kinds), ("arch", self.archs)):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                params += list(values)
        for column, value in (("prediction", self.prediction), ("dtype", self.dtype),
                              ("layout", self.layout)):
            if value is not None:
                clauses.append(f"{column} = ? COLLATE NOCASE")
                params.append(value)
        if self.has_ema is not None:
            clauses.append("has_ema = ?")
            params.append(int(self.has_ema))
        if self.name:
            clauses.append("instr(lower(name), ?) > 0")
            params.append(self.name.lower())
        if self.under:
            clause, under_params = dbm.under(
                [os.path.abspath(os.fspath(u)) for u in self.under])
            clauses.append(clause)
            params += under_params
        return (" AND ".join(clauses) or "1"), params


def entry_from_row(row: sqlite3.Row) -> Entry:
    """An :class:`Entry` from a ``files`` row with at least the light columns."""
    values = {c: row[c] for c in LIGHT_COLUMNS}
    values["has_ema"] = bool(values["has_ema"])
    values["previews"] = tuple(json.loads(values["previews"] or "[]"))
    return Entry(**values)


def list_entries(conn: sqlite3.Connection, filters: Filters | None = None) -> list[Entry]:
    """Entries matching ``filters``, by folder and name."""
    where, params = (filters or Filters()).where()
    rows = conn.execute(f"SELECT {', '.join(LIGHT_COLUMNS)} FROM files WHERE {where} "
                        "ORDER BY folder, name", params)
    return [entry_from_row(r) for r in rows]


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def get_detail(conn: sqlite3.Connection, path: str) -> Detail | None:
    """Everything indexed about ``path`` (None when it is not indexed)."""
    row = conn.execute("SELECT * FROM files WHERE path = ?", (path,)).fetchone()
    if row is None:
        return None
    return Detail(entry_from_row(row), _loads(row["metadata"], {}),
                  _loads(row["components"], {}), _loads(row["report"], {}),
                  _loads(row["civitai"], None))


def find_entry(conn: sqlite3.Connection, model: str) -> Entry:
    """The indexed file that ``model`` names: a path, a file name, a name
    without extension, or a sha256/AutoV2 prefix (at least 8 hex digits).

    Raises:
        ModelkitError: nothing or more than one file matches.
    """
    cols = ", ".join(LIGHT_COLUMNS)
    if os.path.exists(model):
        path = os.path.abspath(model)
        row = conn.execute(f"SELECT {cols} FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise ModelkitError(f"{model}: not in the library index; run "
                                "'modelkit library scan' on its folder first")
        return entry_from_row(row)
    rows = conn.execute(f"SELECT {cols} FROM files WHERE name = ? OR name LIKE ? ESCAPE '\\'",
                        (model, _like_stem(model))).fetchall()
    rows = [r for r in rows if r["name"] == model or Path(r["name"]).stem == model]
    if not rows and len(model) >= 8 and all(c in "0123456789abcdefABCDEF" for c in model):
        rows = conn.execute(f"SELECT {cols} FROM files WHERE substr(sha256, 1, ?) = ?",
                            (len(model), model.lower())).fetchall()
    if not rows:  # a unique part of a name will do
        rows = conn.execute(f"SELECT {cols} FROM files WHERE instr(lower(name), ?) > 0",
                            (model.lower(),)).fetchall()
    if not rows:
        raise ModelkitError(f"{model}: no file of that path, name or hash in the library; "
                            "see 'modelkit library list'")
    if len(rows) > 1:
        paths = ", ".join(r["path"] for r in rows[:3])
        raise ModelkitError(f"{model}: {len(rows)} library files match ({paths}"
                            f"{', ...' if len(rows) > 3 else ''}); pass the path")
    return entry_from_row(rows[0])


def _like_stem(stem: str) -> str:
    escaped = stem.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ".%"
