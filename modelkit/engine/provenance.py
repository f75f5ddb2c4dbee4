"""Provenance written into every output, in every format.

* ``modelkit.recipe``: the canonical recipe YAML with every input's sha256
  pinned and paths cut to file names (an output shared on a model site
  carries no folder, user or host name); ``modelkit recipe replay`` finds the
  inputs again by name and hash.
* ``modelkit.version``; ``modelkit.inputs``: JSON ``{name: {file, sha256}}``.
* ``modelkit.history``: a JSON list with one entry per step,
  ``{op, params, inputs: [{file, sha256}], version}``, appended to the
  history the output's primary input already carried.
* Whenever a merge step ran: ``modelkit.arch``, ``modelkit.block_map`` and
  A1111's ``sd_merge_recipe`` (with A1111's method names where one exists,
  e.g. "Weighted sum") and ``sd_merge_models`` (every merged file by sha256,
  with its name as A1111 writes it, its legacy hash, its own recipe, and the
  parents' ``sd_merge_models`` inherited), so A1111 and Civitai-style tools
  show the lineage.

Input hashes not in the hash cache are computed while the output streams:
their values here are placeholders until the writer patches the header.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from modelkit import __version__
from modelkit.core.recipe import Recipe, yaml_value
from modelkit.errors import ModelkitError
from modelkit.io.header import metadata_json

if TYPE_CHECKING:
    from modelkit.engine.graph import Graph, StepRecord
    from modelkit.io.source import Source

RECIPE_KEY = "modelkit.recipe"
HISTORY_KEY = "modelkit.history"
INPUTS_KEY = "modelkit.inputs"
VERSION_KEY = "modelkit.version"


class KnownHashes(Protocol):
    """The sha256 of input files (:class:`~modelkit.io.hashcache.InputHashes`,
    or a dry run's :class:`PlannedHashes`)."""

    @property
    def values(self) -> Mapping[Path, str]: ...


def input_path(recipe: Recipe, graph: Graph, name: str) -> Path:
    """The file (or folder) an input name stands for."""
    return recipe.resolve(recipe.inputs[name].path)


def _input_hashes(recipe: Recipe, graph: Graph, hashes: KnownHashes) -> dict[str, str | None]:
    return {n: hashes.values.get(input_path(recipe, graph, n)) for n in recipe.inputs}


def history(meta: dict[str, str]) -> list[Any]:
    """The ``modelkit.history`` list of a file's metadata (empty if broken)."""
    try:
        entries = json.loads(meta.get(HISTORY_KEY, "[]"))
    except ValueError:
        return []
    return entries if isinstance(entries, list) else []


def history_entry(record: StepRecord, hashes: KnownHashes) -> dict[str, Any]:
    """The ``modelkit.history`` entry of one step."""
    inputs = [{"file": p.name, "sha256": hashes.values.get(p)} for p in record.files]
    return {"op": record.transform, "params": record.params, "inputs": inputs,
            "version": __version__}


def output_metadata(recipe: Recipe, graph: Graph, final: Source, hashes: KnownHashes,
                    legacy: Callable[[Path], str] | None = None) -> dict[str, str]:
    """The output's ``__metadata__`` (see the module docstring). ``legacy``
    gives a file's legacy hash (default: read it)."""
    meta = {k: v for k, v in final.metadata.items() if k not in (RECIPE_KEY, INPUTS_KEY)}
    sha = _input_hashes(recipe, graph, hashes)
    pinned = recipe.with_hashes({n: h for n, h in sha.items() if h}, names_only=True)
    pinned.output_path = None  # the file itself; a replay writes elsewhere
    meta[RECIPE_KEY] = pinned.to_yaml()
    meta[VERSION_KEY] = __version__
    inputs: dict[str, Any] = {n: {"file": input_path(recipe, graph, n).name, "sha256": sha[n]}
                              for n in recipe.inputs}
    if graph.vae is not None and recipe.options.vae:
        vae = recipe.resolve(recipe.options.vae)
        inputs["vae"] = {"file": vae.name, "sha256": hashes.values.get(vae)}
    meta[INPUTS_KEY] = json.dumps(inputs)
    entries = [history_entry(r, hashes) for r in graph.records]
    meta[HISTORY_KEY] = json.dumps([*history(final.metadata), *entries])
    if graph.groups:
        meta.update(merge_lineage(recipe, graph, hashes, legacy))
    return meta


# --- A1111 lineage ------------------------------------------------------------------


def _primary_file(recipe: Recipe, graph: Graph, name: str) -> Path | None:
    paths = graph.node(recipe.primary_input(name)).input_paths
    return paths[0] if paths else None


def _a1111_recipe(recipe: Recipe, graph: Graph, hashes: KnownHashes) -> dict[str, Any]:
    from modelkit.core.registry import get_transform

    group = graph.groups[-1]
    step = recipe.steps[group.name]
    t = get_transform(step.transform)
    out: dict[str, Any] = {"type": "modelkit", "modelkit_version": __version__,
                           "interp_method": t.a1111 or t.name}
    for role, ref in zip(("primary", "secondary", "tertiary"), step.models, strict=False):
        path = _primary_file(recipe, graph, ref)
        out[f"{role}_model_hash"] = hashes.values.get(path) if path else None
    alpha = step.params.get("alpha")
    if alpha is not None:
        out["multiplier"] = yaml_value(alpha)
    out["save_as_half"] = recipe.output_dtype in ("fp16", "auto")  # auto: bf16 stays bf16
    out["custom_name"] = Path(recipe.output_path).stem if recipe.output_path else None
    out["bake_in_vae"] = Path(recipe.options.vae).name if recipe.options.vae else None
    out["discard_weights"] = "|".join(recipe.options.exclude_keys)
    variant = group.plan.inputs[group.plan.primary].variant
    out["is_inpainting"] = variant == "inpaint"
    out["is_instruct_pix2pix"] = variant == "pix2pix"
    return out


def _merged_files(graph: Graph) -> list[Path]:
    """Every file a merge group reads, once each."""
    files: list[Path] = []
    for group in graph.groups:
        for src in group.leaves.values():
            files += [p for p in src.input_paths if p not in files]
    return files


def _file_metadata(graph: Graph, path: Path) -> dict[str, str]:
    for src in graph.inputs.values():
        if path in src.input_paths and len(src.input_paths) == 1:
            return dict(src.metadata)
    return {}


def merge_lineage(recipe: Recipe, graph: Graph, hashes: KnownHashes,
                  legacy: Callable[[Path], str] | None = None) -> dict[str, str]:
    """``sd_merge_recipe``, ``sd_merge_models`` and the merge keys."""
    from modelkit.io.hashing import legacy_hash

    legacy = legacy or legacy_hash
    models: dict[str, Any] = {}
    for path in _merged_files(graph):
        sha = hashes.values.get(path)
        if not sha or not path.is_file():
            continue
        meta = _file_metadata(graph, path)
        models[sha] = {"name": path.name, "legacy_hash": legacy(path),
                       "sd_merge_recipe": metadata_json(meta, "sd_merge_recipe")}
        parent = meta.get("sd_merge_models")
        if parent:
            # a parent with broken lineage metadata keeps what it has
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                models.update(json.loads(parent))
    plan = graph.groups[-1].plan
    return {
        "modelkit.arch": plan.arch,
        "modelkit.prediction": plan.inputs[plan.primary].prediction,
        "modelkit.block_map": recipe.options.block_map,
        "sd_merge_recipe": json.dumps(_a1111_recipe(recipe, graph, hashes)),
        "sd_merge_models": json.dumps(models),
        "format": "pt",
    }


class PlannedHashes:
    """Stand-in hashes for a dry run: 64-character placeholders, so the
    planned metadata (and the header size) is exact without reading a file.
    They differ per file (lineage is keyed by hash) and hold letters (a
    digits-only one would be quoted in the recipe's YAML, a real hash is not)."""

    def __init__(self, files: list[Path]) -> None:
        self.values = {p: f"{i:x}".rjust(64, "f") for i, p in enumerate(files)}


def check_pins(recipe: Recipe, graph: Graph, digests: dict[Path, str]) -> None:
    """Refuse inputs whose sha256 differs from the one the recipe pins;
    ``digests`` holds the sha256 known so far (not placeholders)."""
    for name, spec in recipe.inputs.items():
        path = input_path(recipe, graph, name)
        got = digests.get(path)
        if spec.sha256 and got and got != spec.sha256:
            raise ModelkitError(
                f"input {name!r}: {path} has sha256 {got[:12]}..., the recipe pins "
                f"{spec.sha256[:12]}...; the file changed since the recipe was locked")
