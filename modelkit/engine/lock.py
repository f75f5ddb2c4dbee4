"""Recipe lock, show and replay.

Outputs carry their recipe with input *file names* and sha256 (never
folders). Replay finds each input by name, then by hash: in the output's
folder, the recipe's folder and any ``search`` folders given, and checks the
pinned sha256 before running.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from modelkit.core.recipe import InputSpec, Recipe, load_recipe, parse_recipe
from modelkit.errors import ModelkitError
from modelkit.io.formats import MODEL_SUFFIXES
from modelkit.progress import ProgressFn, no_progress


def lock_recipe(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                progress: ProgressFn = no_progress, overwrite: bool = False) -> Path:
    """Write a copy of the recipe with every input's sha256 pinned (default
    ``<name>.lock.yaml`` beside it). A pinned hash that no longer matches is
    an error, so a lock never silently moves to a changed file. An existing
    output is refused unless ``overwrite``; the recipe and its inputs never."""
    from modelkit.errors import OutputError
    from modelkit.io.files import check_input_file
    from modelkit.io.hashcache import cached_hashes
    from modelkit.io.writer import atomic_path, check_output_path

    recipe = load_recipe(path)
    src = Path(path)
    target = Path(output) if output else src.with_name(src.stem + ".lock.yaml")
    inputs = [src, *(recipe.resolve(spec.path) for spec in recipe.inputs.values())]
    check_output_path(target, inputs)
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --overwrite to replace it or "
                          "choose another output path")
    hashes = {}
    for name, spec in recipe.inputs.items():
        file = recipe.resolve(spec.path)
        check_input_file(file, f"{recipe.source}: inputs.{name}")
        digest = cached_hashes(file, progress, tensor_hash=False).sha256
        if spec.sha256 and spec.sha256 != digest:
            raise ModelkitError(f"{recipe.source}: inputs.{name}: {file} has sha256 "
                                f"{digest[:12]}..., the recipe pins {spec.sha256[:12]}...")
        hashes[name] = digest
    with atomic_path(target, inputs, overwrite) as tmp:
        tmp.write_text(recipe.with_hashes(hashes).to_yaml())
    return target


def embedded_recipe(model: str | os.PathLike[str]) -> tuple[str, Recipe]:
    """The recipe text stored in a modelkit output, and the parsed recipe
    (paths relative to the output's folder)."""
    from modelkit.engine.provenance import RECIPE_KEY
    from modelkit.io.open import open_source

    source = open_source(model)
    text = source.metadata.get(RECIPE_KEY)
    if not text:
        raise ModelkitError(f"{model}: carries no modelkit recipe (not made by modelkit)")
    return text, parse_recipe(text, f"{model} (embedded recipe)", Path(model).parent)


def _sha256(path: Path) -> str:
    from modelkit.io.hashcache import cached_hashes

    return cached_hashes(path, tensor_hash=False).sha256


def _candidates(name: str, folders: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for folder in folders:
        direct = folder / name
        if direct.exists() and direct not in out:
            out.append(direct)
    return out


def _by_hash(sha: str, folders: Iterable[Path]) -> Path | None:
    from modelkit.io.hashcache import find_by_sha256, lookup

    known = find_by_sha256(sha)
    if known is not None:
        return known

    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*")
             if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()]
    # cached hashes first: a library that was hashed before costs nothing
    files.sort(key=lambda p: lookup(p) is None)
    for p in files:
        if _sha256(p) == sha:
            return p
    return None


def find_inputs(recipe: Recipe, search: Iterable[str | os.PathLike[str]] = (),
                vae_sha256: str | None = None) -> Recipe:
    """``recipe`` with each input resolved to an existing file: by name in
    the recipe's folder and the ``search`` folders, checked against its
    pinned sha256, else by sha256 in those folders.

    Raises:
        ModelkitError: an input that cannot be found, named with its hash.
    """
    folders = [recipe.base_dir, *(Path(s) for s in search)]
    inputs = {}
    for name, spec in recipe.inputs.items():
        found = None
        for cand in _candidates(Path(spec.path).name, folders):
            if cand.is_dir() or not spec.sha256 or _sha256(cand) == spec.sha256:
                found = cand
                break
        if found is None and spec.sha256:
            found = _by_hash(spec.sha256, folders)
        if found is None:
            pin = f" (sha256 {spec.sha256[:12]}...)" if spec.sha256 else ""
            where = ", ".join(str(f) for f in folders)
            raise ModelkitError(f"input {name!r}: cannot find {Path(spec.path).name}{pin} "
                                f"in {where}; pass --search DIR where it is")
        inputs[name] = InputSpec(name, str(found.absolute()), spec.sha256)
    vae = recipe.options.vae
    if vae:
        hits = _candidates(Path(vae).name, folders)
        sha = vae_sha256
        found = hits[0] if hits else (_by_hash(sha, folders) if sha else None)
        if found is None:
            raise ModelkitError(f"VAE {Path(vae).name}: not found in "
                                f"{', '.join(str(f) for f in folders)}; pass --search DIR")
        recipe = replace_options_vae(recipe, str(found.absolute()))
    out = Recipe(inputs, recipe.steps, recipe.output_path, recipe.output_dtype,
                 recipe.output_step, recipe.options, recipe.base_dir, recipe.source,
                 recipe.output_format, recipe.output_quant, recipe.output_keep_shapes)
    return out


def recorded_vae_sha256(model: str | os.PathLike[str]) -> str | None:
    """The baked VAE's sha256 as the output's ``modelkit.inputs`` records it."""
    import json

    from modelkit.engine.provenance import INPUTS_KEY
    from modelkit.io.open import open_source

    try:
        entry = json.loads(open_source(model).metadata.get(INPUTS_KEY, "{}")).get("vae")
    except (ValueError, AttributeError):
        return None
    return entry.get("sha256") if isinstance(entry, dict) else None


def replace_options_vae(recipe: Recipe, vae: str) -> Recipe:
    """``recipe`` with ``options.vae`` set."""
    import copy

    new = copy.copy(recipe)
    new.options = replace(recipe.options, vae=vae)
    return new


@dataclass
class ReplayResult:
    """What a replay produced and how it compares."""

    output: Path | None
    n_tensors: int
    n_different: int
    first_difference: str | None

    @property
    def identical(self) -> bool:
        return self.n_different == 0


def compare_tensors(a: str | os.PathLike[str], b: str | os.PathLike[str]
                    ) -> tuple[int, int, str | None]:
    """(tensors, different tensors, first difference) between two files,
    comparing names, dtypes, shapes and bytes."""
    import torch

    from modelkit.io.open import open_source

    x, y = open_source(a), open_source(b)
    names = list(dict.fromkeys([*x.infos, *y.infos]))
    diff = [k for k in names if k not in x.infos or k not in y.infos
            or x.infos[k].dtype != y.infos[k].dtype or x.infos[k].shape != y.infos[k].shape
            or not torch.equal(x.get(k).reshape(-1).view(torch.uint8),
                               y.get(k).reshape(-1).view(torch.uint8))]
    return len(names), len(diff), diff[0] if diff else None


def replay(model: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
           progress: ProgressFn = no_progress, search: Iterable[str | os.PathLike[str]] = (),
           overwrite: bool = False, device: str | None = None) -> ReplayResult:
    """Re-run a modelkit output's embedded recipe (inputs found by name and
    hash; on ``device`` when given, else where the recipe says) and compare
    the result with it."""
    from dataclasses import replace

    from modelkit.engine.runner import run

    _, recipe = embedded_recipe(model)
    recipe = find_inputs(recipe, search, recorded_vae_sha256(model))
    if device is not None:
        recipe.options = replace(recipe.options, device=device)
    model_path = Path(model)
    if output is not None:
        run(recipe, output=output, progress=progress, overwrite=overwrite)
        n, bad, first = compare_tensors(model_path, output)
        return ReplayResult(Path(output), n, bad, first)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".replay-") as tmp:
        out = Path(tmp) / model_path.name
        run(recipe, output=out, progress=progress)
        n, bad, first = compare_tensors(model_path, out)
    return ReplayResult(None, n, bad, first)
