"""``dupes``: files with the same tensor data (the ``addnet`` hash, which
metadata edits do not change), whatever their names.

Only files whose tensor data has the same length can be duplicates, so by
default just those candidates are hashed (through the shared hash cache)
before grouping; the rest of the library is never read.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from modelkit.jsontypes import JSONDict
from modelkit.library.query import Entry, Filters, list_entries
from modelkit.library.scan import hash_missing
from modelkit.progress import ProgressFn, no_progress


@dataclass
class DupeGroup:
    """Files with the same tensor data."""

    hash: str  # addnet (tensor data) or, for pickles, sha256
    entries: list[Entry]
    same_file: bool  # every file is byte-identical (same sha256)
    linked: bool  # every file is a hard link of the first: no space lost
    wasted_bytes: int  # what deleting all copies but one would free

    @property
    def renamed(self) -> bool:
        """The copies go by different names."""
        return len({e.name for e in self.entries}) > 1

    def to_dict(self) -> JSONDict:
        return {"hash": self.hash, "same_file": self.same_file, "linked": self.linked,
                "renamed": self.renamed, "wasted_bytes": self.wasted_bytes,
                "files": [e.path for e in self.entries]}


@dataclass
class DupesReport:
    """Duplicate groups, and how many files could not be compared."""

    groups: list[DupeGroup] = field(default_factory=list)
    n_hashed_now: int = 0
    n_unhashed: int = 0  # candidates left without a hash

    @property
    def wasted_bytes(self) -> int:
        return sum(g.wasted_bytes for g in self.groups)

    def to_dict(self) -> JSONDict:
        return {"groups": [g.to_dict() for g in self.groups],
                "wasted_bytes": self.wasted_bytes, "n_hashed_now": self.n_hashed_now,
                "n_unhashed": self.n_unhashed}


def _content_key(e: Entry) -> str | None:
    return e.addnet or (f"sha256:{e.sha256}" if e.sha256 and e.data_bytes is None else None)


def _length_key(e: Entry) -> tuple[str, int]:
    """Files that can only be equal when this is equal."""
    return ("data", e.data_bytes) if e.data_bytes is not None else ("file", e.size)


def candidates(entries: list[Entry]) -> list[Entry]:
    """Entries that share their tensor-data length with another entry."""
    by_len: dict[tuple[str, int], list[Entry]] = defaultdict(list)
    for e in entries:
        if e.kind != "broken":
            by_len[_length_key(e)].append(e)
    return [e for group in by_len.values() if len(group) > 1 for e in group]


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _group(key: str, members: list[Entry]) -> DupeGroup:
    inodes = {_inode(e.path) for e in members}
    distinct: dict[tuple[int, int] | None, Entry] = {}
    for e in members:
        distinct.setdefault(_inode(e.path), e)
    wasted = sum(e.size for e in distinct.values()) - max(e.size for e in members)
    return DupeGroup(key.removeprefix("sha256:"), sorted(members, key=lambda e: e.path),
                     len({e.sha256 for e in members}) == 1 and members[0].sha256 is not None,
                     len(inodes) == 1 and None not in inodes, max(wasted, 0))


def dupes(conn: sqlite3.Connection, filters: Filters | None = None, *,
          hash_candidates: bool = True, progress: ProgressFn = no_progress,
          cancel: threading.Event | None = None) -> DupesReport:
    """Groups of indexed files with the same tensor data. With
    ``hash_candidates``, files that could be duplicates (same tensor-data
    length) and have no hash yet are hashed first."""
    report = DupesReport()
    entries = candidates(list_entries(conn, filters))
    missing = [e.path for e in entries if _content_key(e) is None]
    if hash_candidates and missing:
        report.n_hashed_now = hash_missing(conn, missing, progress, cancel)
        entries = candidates(list_entries(conn, filters))
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        key = _content_key(e)
        if key is None:
            report.n_unhashed += 1
        else:
            groups[key].append(e)
    report.groups = sorted((_group(k, m) for k, m in groups.items() if len(m) > 1),
                           key=lambda g: (-g.wasted_bytes, g.entries[0].path))
    return report
