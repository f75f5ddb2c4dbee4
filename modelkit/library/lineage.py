"""``lineage``: where a model came from, as a tree, from its metadata.

Sources, in the order they are trusted for a file's direct parents:

- ``modelkit.history`` (convert operations): an entry whose inputs are not
  part of the file's recipe is an operation applied to the finished file,
  so its inputs are the file's parents; the rest of the history describes
  those parents.
- ``modelkit.recipe`` (YAML): the recipe's steps from the output step down
  to its inputs (file names and sha256 pinned in the recipe or in
  ``modelkit.inputs``).
- ``sd_merge_recipe`` + ``sd_merge_models`` (A1111's checkpoint merger, also
  written by modelkit): primary/secondary/tertiary model sha256, with names
  and the parents' own recipes.
- ``modelkit.inputs`` alone, and kohya's ``ss_sd_model_name`` (a LoRA's
  training base).

Each parent is resolved to a library file by sha256, then by the legacy
hash, then by file name (marked as such: unverified); a resolved file's own
metadata continues the tree.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.io.formats import MODEL_SUFFIXES
from modelkit.io.header import metadata_json
from modelkit.jsontypes import JSONDict
from modelkit.library.query import Entry, get_detail, list_entries

MAX_DEPTH = 12
PARAMS_WIDTH = 60


@dataclass
class LineageNode:
    """One model (or recipe step) in a lineage tree."""

    label: str  # file name, or the recipe step's name
    how: str | None = None  # how it was made from its children
    sha256: str | None = None
    path: str | None = None  # the library file it resolved to
    match: str | None = None  # sha256, legacy or name
    source: str | None = None  # the metadata field this came from
    note: str | None = None
    children: list[LineageNode] = field(default_factory=list)

    def to_dict(self) -> JSONDict:
        return {"label": self.label, "how": self.how, "sha256": self.sha256,
                "path": self.path, "match": self.match, "source": self.source,
                "note": self.note, "children": [c.to_dict() for c in self.children]}

    def walk(self) -> list[LineageNode]:
        """This node and every node below it, depth first."""
        out = [self]
        for c in self.children:
            out += c.walk()
        return out


def _yaml(meta: dict[str, str], key: str) -> Any:
    raw = meta.get(key)
    if not raw:
        return None
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _compact(params: Any) -> str:
    if not params:
        return ""
    text = json.dumps(params, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= PARAMS_WIDTH else text[:PARAMS_WIDTH - 3] + "..."


class _Resolver:
    """Finds library files by sha256, legacy hash or name."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        entries = list_entries(conn)
        self.by_sha = {e.sha256: e for e in entries if e.sha256}
        self.by_legacy = {e.legacy: e for e in entries if e.legacy}
        self.by_stem: dict[str, list[Entry]] = {}
        for e in entries:
            self.by_stem.setdefault(e.stem.lower(), []).append(e)

    def resolve(self, sha256: str | None, name: str | None,
                legacy: str | None = None) -> tuple[Entry | None, str | None]:
        sha = sha256.lower().removeprefix("0x") if sha256 else None
        if sha and sha in self.by_sha:
            return self.by_sha[sha], "sha256"
        if legacy and legacy.lower() in self.by_legacy:
            return self.by_legacy[legacy.lower()], "legacy"
        if name:
            stem = Path(name.replace("\\", "/")).name
            stem = stem.rsplit(".", 1)[0] if stem.lower().endswith(MODEL_SUFFIXES) else stem
            found = self.by_stem.get(stem.lower(), [])
            # a hash that names another file is a mismatch, not a match
            found = [e for e in found if not (sha and e.sha256 and e.sha256 != sha)]
            if len(found) == 1:
                return found[0], "name"
        return None, None


class _Builder:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.resolver = _Resolver(conn)
        self.conn = conn

    def file_node(self, label: str, sha256: str | None, legacy: str | None,
                  source: str, depth: int, seen: frozenset[str],
                  embedded: dict[str, str] | None = None,
                  a1111: dict[str, Any] | None = None,
                  a1111_models: dict[str, Any] | None = None) -> LineageNode:
        """A parent file: resolved in the library (its own metadata goes on),
        else described by what the child embedded about it."""
        entry, match = self.resolver.resolve(sha256, label, legacy)
        node = LineageNode(entry.name if entry else Path(label).name, sha256=sha256,
                           path=entry.path if entry else None, match=match, source=source)
        if entry is not None:
            node.sha256 = node.sha256 or entry.sha256
            if entry.path in seen:
                node.note = "cycle: already above in this tree"
                return node
            detail = get_detail(self.conn, entry.path)
            meta = detail.metadata if detail else {}
            self.expand(node, meta, depth + 1, seen | {entry.path})
        elif embedded:
            self.expand(node, embedded, depth + 1, seen)
        elif a1111:
            self.expand_a1111(node, a1111, a1111_models or {}, depth + 1, seen)
        return node

    def expand(self, node: LineageNode, meta: dict[str, str], depth: int,
               seen: frozenset[str]) -> None:
        """Add ``node``'s parents, as ``meta`` (its metadata) tells."""
        if depth > MAX_DEPTH:
            node.note = "lineage deeper than this is not shown"
            return
        recipe = _yaml(meta, "modelkit.recipe")
        inputs = metadata_json(meta, "modelkit.inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        history = metadata_json(meta, "modelkit.history")
        history = history if isinstance(history, list) else []
        lineage_models = metadata_json(meta, "sd_merge_models")
        lineage_models = lineage_models if isinstance(lineage_models, dict) else {}
        if history and not _within_recipe(history[-1], recipe, inputs):
            self.expand_history(node, meta, history, depth, seen)
        elif recipe and isinstance(recipe.get("steps"), dict):
            self.expand_recipe(node, recipe, inputs, lineage_models, depth, seen)
        elif isinstance(metadata_json(meta, "sd_merge_recipe"), dict):
            self.expand_a1111(node, metadata_json(meta, "sd_merge_recipe"), lineage_models, depth,
                              seen)
        elif inputs:
            node.how = node.how or "made from"
            for name, spec in inputs.items():
                spec = spec if isinstance(spec, dict) else {}
                node.children.append(self.file_node(
                    str(spec.get("file") or name), spec.get("sha256"), None,
                    "modelkit.inputs", depth, seen))
        elif meta.get("ss_sd_model_name"):
            node.how = node.how or "trained on"
            node.children.append(self.file_node(
                meta["ss_sd_model_name"], meta.get("ss_new_sd_model_hash"),
                meta.get("ss_sd_model_hash"), "ss_sd_model_name", depth, seen))

    def expand_history(self, node: LineageNode, meta: dict[str, str],
                       history: list[Any], depth: int, seen: frozenset[str]) -> None:
        last = history[-1] if isinstance(history[-1], dict) else {}
        params = _compact(last.get("params"))
        node.how = f"{last.get('op', '?')} {params}".strip()
        earlier = dict(meta)
        earlier["modelkit.history"] = json.dumps(history[:-1])
        if len(history) == 1:
            earlier.pop("modelkit.history")
        inputs = [i for i in last.get("inputs") or [] if isinstance(i, dict)]
        for i, spec in enumerate(inputs):
            # the earlier metadata describes the operation's (first) input
            embedded = earlier if i == 0 else None
            node.children.append(self.file_node(
                str(spec.get("file") or "?"), spec.get("sha256"), None,
                "modelkit.history", depth, seen, embedded))

    def expand_recipe(self, node: LineageNode, recipe: dict[str, Any],
                      inputs: dict[str, Any], lineage_models: dict[str, Any],
                      depth: int, seen: frozenset[str]) -> None:
        steps = recipe["steps"]
        output = got if isinstance(got := recipe.get("output"), dict) else {}
        out_step = output.get("step") or (list(steps)[-1] if steps else None)
        specs = got if isinstance(got := recipe.get("inputs"), dict) else {}

        def step_node(name: str, trail: frozenset[str]) -> LineageNode:
            if name in steps and name not in trail:
                step = steps[name] if isinstance(steps[name], dict) else {}
                what = f"op {step['op']}" if step.get("op") else step.get("method", "?")
                child = LineageNode(name, how=f"{what} {_compact(step.get('params'))}".strip(),
                                    source="modelkit.recipe")
                for m in step.get("models") or []:
                    child.children.append(step_node(str(m), trail | {name}))
                return child
            spec = specs.get(name)
            path = spec.get("path") if isinstance(spec, dict) else spec
            pinned = spec.get("sha256") if isinstance(spec, dict) else None
            known = got if isinstance(got := inputs.get(name), dict) else {}
            sha = pinned or known.get("sha256")
            label = known.get("file") or (Path(str(path)).name if path else name)
            a1111 = lineage_models.get(sha, {}) if sha else {}
            parent = a1111.get("sd_merge_recipe") if isinstance(a1111, dict) else None
            leaf = self.file_node(str(label), sha, None, "modelkit.recipe", depth, seen,
                                  a1111=parent if isinstance(parent, dict) else None,
                                  a1111_models=lineage_models)
            leaf.note = leaf.note or f"input {name}"
            return leaf

        if out_step is None:
            return
        top = step_node(str(out_step), frozenset())
        node.how, node.source = top.how, "modelkit.recipe"
        node.children = top.children if top.children else [top]

    def expand_a1111(self, node: LineageNode, recipe: dict[str, Any],
                     lineage_models: dict[str, Any], depth: int,
                     seen: frozenset[str]) -> None:
        method = recipe.get("interp_method") or "merge"
        mult = recipe.get("multiplier")
        node.how = f"{method}" + (f" multiplier={_compact(mult)}" if mult is not None else "")
        node.source = node.source or "sd_merge_recipe"
        for role in ("primary", "secondary", "tertiary"):
            sha = recipe.get(f"{role}_model_hash")
            if not sha:
                continue
            info = got if isinstance(got := lineage_models.get(sha), dict) else {}
            parent_recipe = info.get("sd_merge_recipe")
            child = self.file_node(str(info.get("name") or sha[:10]), sha,
                                   info.get("legacy_hash"), "sd_merge_models", depth, seen,
                                   a1111=parent_recipe if isinstance(parent_recipe, dict)
                                   else None, a1111_models=lineage_models)
            child.note = child.note or role
            node.children.append(child)


def _within_recipe(entry: Any, recipe: dict[str, Any] | None,
                   inputs: dict[str, Any]) -> bool:
    """Whether a history entry was written by the recipe run itself (its
    inputs are recipe inputs), not by a later operation on the output."""
    if not recipe or not isinstance(entry, dict):
        return False
    hashes = {v.get("sha256") for v in inputs.values() if isinstance(v, dict)}
    names = {v.get("file") for v in inputs.values() if isinstance(v, dict)}
    specs = got if isinstance(got := recipe.get("inputs"), dict) else {}
    for spec in specs.values():
        path = spec.get("path") if isinstance(spec, dict) else spec
        if isinstance(spec, dict):
            hashes.add(spec.get("sha256"))
        if path:
            names.add(Path(str(path)).name)
    options = got if isinstance(got := recipe.get("options"), dict) else {}
    if options.get("vae"):
        names.add(Path(str(options["vae"])).name)
    used = [i for i in entry.get("inputs") or [] if isinstance(i, dict)]
    return bool(used) and all(i.get("sha256") in hashes or i.get("file") in names
                              for i in used)


def lineage(conn: sqlite3.Connection, entry: Entry) -> LineageNode:
    """The lineage tree of ``entry``: itself at the root, its parents below."""
    builder = _Builder(conn)
    root = LineageNode(entry.name, sha256=entry.sha256, path=entry.path, match="self")
    detail = get_detail(conn, entry.path)
    builder.expand(root, detail.metadata if detail else {}, 0, frozenset({entry.path}))
    return root
