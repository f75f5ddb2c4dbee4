"""Recipe and sweep files read from disk (issue 17): a recipe file writes only
inside its own folder unless -o says where, a replay never writes where its
embedded recipe says, a model file given as a recipe is named as such, and an
integer with thousands of digits is one line naming its field. The cases
run in this process through ``modelkit.cli.main``, the console script's
function (its exit code; tests/test_cli_exit_codes.py runs the console
script itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_support import run_here

from modelkit import testing as t


def _recipe(folder: Path, models: dict[str, Path], output: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "r.yaml"
    path.write_text(f"version: 1\ninputs: {{a: {models['sd1']}, b: {models['sd1_b']}}}\n"
                    "steps:\n  m: {method: weighted_sum, models: [a, b], "
                    f"params: {{alpha: 0.5}}}}\noutput: {{path: '{output}'}}\n{extra}")
    return path


def test_recipe_files_write_only_in_their_folder_and_bad_files_are_one_line(
        models: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "r" / "inside").mkdir(parents=True)
    os.symlink(outside, tmp_path / "r" / "link")
    cases = {
        "absolute": _recipe(tmp_path / "abs", models, str(outside / "pwn.safetensors")),
        "dotdot": _recipe(tmp_path / "dd", models, "../outside/pwn.safetensors"),
        "symlink": _recipe(tmp_path / "r", models, "link/pwn.safetensors"),
    }
    runs = {name: ["recipe", "run", str(path), "-q"] for name, path in cases.items()}
    inside = _recipe(tmp_path / "ok", models, str(tmp_path / "ok" / "x.safetensors"))
    runs["inside"] = ["recipe", "run", str(inside), "--dry-run", "-q"]
    runs["dash_o"] = ["recipe", "run", str(cases["absolute"]), "-q", "-o",
                      str(outside / "mine.safetensors")]
    model = tmp_path / "model.safetensors"
    t.write_tensors(model, {"w": (2, 2)})
    runs["model_as_recipe"] = ["recipe", "run", str(model), "--dry-run"]
    digits = "1" + "0" * 5000
    seed = _recipe(tmp_path / "seed", models, "x.safetensors", f"options: {{seed: {digits}}}\n")
    runs["huge_seed"] = ["recipe", "run", str(seed), "--dry-run", "-q"]
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"version: 1\nrecipe: {inside}\naxes:\n  options.seed: [{digits}]\n")
    runs["huge_sweep"] = ["sweep", str(sweep), "-o", str(tmp_path / "sw"), "--dry-run"]
    runs["huge_cli_seed"] = ["merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                             str(tmp_path / "never.safetensors"), "--seed", digits, "--dry-run"]
    res = run_here(runs, tmp_path)
    for name in cases:
        code, _, err = res[name]
        assert code == 2 and err.count("\n") == 1, (name, err)
        assert "output.path: " in err and "outside the recipe's folder" in err, err
        assert "pass -o to write elsewhere" in err
    assert not list(outside.glob("pwn*")) and not list(outside.glob(".pwn*"))
    assert res["inside"][0] == 0, res["inside"]
    assert res["dash_o"][0] == 0 and (outside / "mine.safetensors").is_file(), res["dash_o"]
    assert res["model_as_recipe"][:1] == (2,) and res["model_as_recipe"][2] == (
        f"modelkit: error: {model}: is a model file (safetensors), not a recipe file; give a "
        "recipe .yaml file\n")
    assert res["huge_seed"][0] == 2 and res["huge_seed"][2] == (
        f"modelkit: error: {seed}: options.seed: an integer of 5001 digits is too large\n")
    assert res["huge_sweep"][0] == 2 and res["huge_sweep"][2].count("\n") == 1
    assert "too many digits" in res["huge_sweep"][2]
    code, _, err = res["huge_cli_seed"]
    assert code == 2 and err.count("\n") == 1 and "'--seed'" in err and "Traceback" not in err


def test_replay_never_writes_where_the_embedded_recipe_says(
        models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from modelkit.core.recipe import Recipe
    from modelkit.engine.lock import replay
    from modelkit.engine.provenance import RECIPE_KEY
    from modelkit.engine.runner import run
    from modelkit.io.header import read_header

    merged = tmp_path / "dl" / "merged.safetensors"
    merged.parent.mkdir()
    run(Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5), output=merged)
    meta = read_header(merged).metadata
    target = tmp_path / "elsewhere" / "pwn.safetensors"
    target.parent.mkdir()
    meta[RECIPE_KEY] = meta[RECIPE_KEY].replace("path: null", f"path: {target}")
    assert str(target) in meta[RECIPE_KEY]
    save_file(load_file(merged), merged, metadata=meta)
    result = replay(merged, search=[models["sd1"].parent])
    assert result.identical and result.output is None
    assert not target.exists() and sorted(p.name for p in merged.parent.iterdir()) == [
        "merged.safetensors"]


def test_recipes_built_in_code_write_anywhere(models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.core.recipe import Recipe, RecipeError, load_recipe
    from modelkit.engine.runner import output_path

    far = tmp_path / "far" / "x.safetensors"
    recipe = Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5).with_output(str(far))
    assert output_path(recipe, None) == far
    loaded = load_recipe(_recipe(tmp_path / "r", models, str(far)))
    with pytest.raises(RecipeError, match=r"output\.path: .* is outside the recipe's folder"):
        output_path(loaded, None)
    assert output_path(loaded, far) == far
