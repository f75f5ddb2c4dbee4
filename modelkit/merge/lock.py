"""Recipe lock, show and replay."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelkit.errors import ModelkitError
from modelkit.merge.recipe import Recipe, load_recipe, parse_recipe
from modelkit.progress import ProgressFn, no_progress


def lock_recipe(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                progress: ProgressFn = no_progress) -> Path:
    """Write a copy of the recipe with every input's sha256 pinned (default
    ``<name>.lock.yaml`` beside it). A pinned hash that no longer matches is
    an error, so a lock never silently moves to a changed file."""
    from modelkit.io.files import check_input_file
    from modelkit.io.hashcache import cached_hashes
    from modelkit.io.writer import atomic_path

    recipe = load_recipe(path)
    hashes = {}
    for name, spec in recipe.inputs.items():
        file = recipe.resolve(spec.path)
        check_input_file(file, f"{recipe.source}: inputs.{name}")
        digest = cached_hashes(file, progress, tensor_hash=False).sha256
        if spec.sha256 and spec.sha256 != digest:
            raise ModelkitError(f"{recipe.source}: inputs.{name}: {file} has sha256 "
                                f"{digest[:12]}..., the recipe pins {spec.sha256[:12]}...")
        hashes[name] = digest
    src = Path(path)
    target = Path(output) if output else src.with_name(src.stem + ".lock.yaml")
    with atomic_path(target) as tmp:
        tmp.write_text(recipe.with_hashes(hashes).to_yaml())
    return target


def embedded_recipe(model: str | os.PathLike[str]) -> tuple[str, Recipe]:
    """The recipe text stored in a merge output, and the parsed recipe."""
    from modelkit.io.header import read_header
    from modelkit.merge.provenance import RECIPE_KEY

    header = read_header(model)
    text = header.metadata.get(RECIPE_KEY)
    if not text:
        raise ModelkitError(f"{model}: carries no modelkit recipe (not made by "
                            "modelkit merge)")
    return text, parse_recipe(text, f"{model} (embedded recipe)", Path(model).parent)


@dataclass
class ReplayResult:
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

    from modelkit.io.reader import open_model

    with open_model(a) as x, open_model(b) as y:
        names = list(dict.fromkeys([*x.keys(), *y.keys()]))
        diff = [k for k in names if k not in x or k not in y
                or x.infos[k].dtype != y.infos[k].dtype or x.infos[k].shape != y.infos[k].shape
                or not torch.equal(x.get(k).reshape(-1).view(torch.uint8),
                                   y.get(k).reshape(-1).view(torch.uint8))]
    return len(names), len(diff), diff[0] if diff else None


def replay(model: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
           progress: ProgressFn = no_progress) -> ReplayResult:
    """Re-run a merge output's embedded recipe and compare the result with it."""
    from modelkit.merge.run import run_recipe

    _, recipe = embedded_recipe(model)
    model_path = Path(model)
    if output is not None:
        run_recipe(recipe, output, progress=progress)
        n, bad, first = compare_tensors(model_path, output)
        return ReplayResult(Path(output), n, bad, first)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".replay-") as tmp:
        out = Path(tmp) / model_path.name
        run_recipe(recipe, out, progress=progress)
        n, bad, first = compare_tensors(model_path, out)
    return ReplayResult(None, n, bad, first)
