"""Issue 18, parameters: the registry's declarations are the one source of
parameter policy (types, defaults, the suggested alpha, text -> value,
validation, help). A merge method added by one decorated function reaches
the CLI, the TUI form, ``modelkit methods``, recipes, sweeps and the README
check; the op commands' options are generated from the declarations; the
overwrite policy has one name and one check before writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from cli_support import console as _console
from test_readme_commands import readme_method_problems

from modelkit.core.registry import (
    METHOD,
    TRANSFORMS,
    Param,
    Transform,
    all_transforms,
    declare,
    parse_text,
    transform,
)

UNET = "model.diffusion_model."
Gain = declare(float, "How far toward B.", suggested=0.4)


@pytest.fixture
def throwaway() -> Iterator[Transform]:
    """A merge method registered for one test, removed afterwards."""
    from modelkit.merge.methods import MERGE_KEYS

    all_transforms()  # the built-ins first

    def throwaway(a: Tensor, b: Tensor, *, gain: Gain, steps: int = 1,  # noqa: F821
                  flip: bool = False) -> Tensor:  # noqa: F821
        out = a + (b - a) * (gain * steps)
        return -out if flip else out

    transform("throwaway", summary="A + gain*steps*(B - A), a method for one test",
              elementwise=True, keys=MERGE_KEYS,
              help={"steps": "Times gain is applied.", "flip": "Negate the result."}
              )(throwaway)
    try:
        yield TRANSFORMS["throwaway"]
    finally:
        TRANSFORMS.pop("throwaway", None)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from modelkit.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- one decorated function reaches every front end -------------------------------


def test_a_new_method_is_declared_once(throwaway: Transform) -> None:
    assert throwaway.kind == METHOD
    assert throwaway.params == {
        "gain": Param("gain", "float", blockwise=True, help="How far toward B.",
                      suggested=0.4),
        "steps": Param("steps", "int", 1, help="Times gain is applied."),
        "flip": Param("flip", "bool", False, help="Negate the result.")}


def test_a_new_method_on_the_command_line(throwaway: Transform, models: dict[str, Path],
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "t.safetensors"
    code, stdout, err = _main(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]),
                              "-o", str(out), "--method", "throwaway", "--param", "steps=2",
                              "--param", "flip=true", "-q", "--json")
    assert code == 0, err
    # gain: its declared suggestion; steps and flip: text read by the declaration
    assert json.loads(stdout)["steps"][0]["params"] == {"gain": 0.4, "steps": 2,
                                                        "flip": True}
    key = UNET + "out.2.weight"
    a, b = (load_file(models[n])[key].float() for n in ("sd1", "sd1_b"))
    assert load_file(out)[key].equal((-(a + (b - a) * (0.4 * 2))).half())
    code, _, err = _main(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                         str(tmp_path / "u.safetensors"), "--method", "throwaway",
                         "--param", "steps=2.5")
    assert code == 2 and err == ("modelkit: error: throwaway: parameter 'steps' must be a "
                                 "whole number, not 2.5\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


@pytest.mark.asyncio
async def test_a_new_method_in_the_tui_form(throwaway: Transform) -> None:
    from textual.app import App, ComposeResult
    from textual.widgets import Input, Switch

    from modelkit.tui.recipes import ActSpec, build_recipe
    from modelkit.tui.widgets.param_form import ParamForm

    class FormApp(App[None]):
        def compose(self) -> ComposeResult:
            yield ParamForm()

    async with FormApp().run_test() as pilot:
        form = pilot.app.query_one(ParamForm)
        await form.show(throwaway, 2, [])
        await pilot.pause()
        assert form.names == ["gain", "steps", "flip"]
        assert pilot.app.query_one("#param-gain", Input).value == "0.4"
        assert pilot.app.query_one("#param-steps", Input).value == "1"
        pilot.app.query_one("#param-steps", Input).value = " 3 "
        pilot.app.query_one("#param-flip", Switch).value = True
        await pilot.pause()
        values = form.values()
    assert values == {"gain": 0.4, "steps": 3, "flip": True}
    recipe = build_recipe(ActSpec("merge", ("/m/a.safetensors", "/m/b.safetensors"),
                                  "t.safetensors", values, method="throwaway"))
    assert recipe.steps["merge"].params == {"gain": 0.4, "steps": 3, "flip": True}


def test_a_new_method_in_methods_recipes_sweeps_and_the_readme_check(
        throwaway: Transform, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from modelkit.core.recipe import Recipe, RecipeError, parse_recipe
    from modelkit.sweep.spec import parse_axes, sweep_from_recipe

    code, out, _ = _main(capsys, "methods", "--json")
    assert code == 0 and json.loads(out)["throwaway"]["params"]["gain"] == {
        "kind": "float", "default": None, "required": True, "choices": [],
        "blockwise": True, "per_model": False, "suggested": 0.4,
        "help": "How far toward B."}
    code, out, _ = _main(capsys, "methods")
    assert "  throwaway(a, b): A + gain*steps*(B - A)" in out
    assert "      gain: float, block-wise (required in recipes; suggested 0.4)\n" \
           "          How far toward B.\n" in out

    text = ("version: 1\ninputs: {a: a.safetensors, b: b.safetensors}\nsteps:\n"
            "  m: {method: throwaway, models: [a, b], params: %s}\n"
            "output: {path: o.safetensors}\n")
    recipe = parse_recipe(text % "{gain: 0.5, steps: 3}", "r.yaml", tmp_path)
    assert recipe.steps["m"].params == {"gain": 0.5, "steps": 3}
    with pytest.raises(RecipeError, match="throwaway: missing parameter 'gain'"):
        parse_recipe(text % "{steps: 3}", "r.yaml", tmp_path)  # a recipe gives it
    with pytest.raises(RecipeError, match="'flip' must be true or false"):
        parse_recipe(text % "{gain: 0.5, flip: 2}", "r.yaml", tmp_path)

    base = Recipe.merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                        method="throwaway", output=tmp_path / "o.safetensors", gain=0.5)
    axes = parse_axes("gain = 0.25, 1e-1; steps = 2, 3", base)
    assert axes == {"steps.merge.params.gain": [0.25, 0.1],
                    "steps.merge.params.steps": [2, 3]}
    cells = sweep_from_recipe(base, axes).cells()
    assert [c.recipe["steps"]["merge"]["params"] for c in cells] == [
        {"gain": g, "steps": s} for g in (0.25, 0.1) for s in (2, 3)]

    methods = {n: t.summary for n, t in all_transforms().items() if t.kind == METHOD}
    assert readme_method_problems(methods) == [
        "throwaway (A + gain*steps*(B - A), a method for one test) is not in the "
        "README's merge row"]


def test_the_throwaway_method_is_gone_afterwards() -> None:
    assert "throwaway" not in all_transforms()


# --- one behaviour for alpha and beta ----------------------------------------------




def test_beta_is_required_on_the_command_line_and_empty_in_the_form(tmp_path: Path) -> None:
    """triple_sum's beta has no A1111 default: the merge command says it is
    missing (the console script, no torch loaded for it), the form starts
    it empty; alpha is A1111's 0.3 in both, and a recipe must give both."""
    from modelkit.tui.recipes import field_text

    files = [str(tmp_path / f"{n}.safetensors") for n in "abc"]
    proc = subprocess.run([*_console(), "merge", *files, "-o", str(tmp_path / "o"),
                           "--method", "triple_sum", "--alpha", "0.2"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "modelkit: error: triple_sum: missing parameter 'beta'\n"
    assert list(tmp_path.iterdir()) == []
    triple = all_transforms()["triple_sum"].params
    assert (field_text(triple["alpha"]), field_text(triple["beta"])) == ("0.3", "")
    ties = all_transforms()["ties"].params
    assert (field_text(ties["alpha"]), field_text(ties["k"])) == ("1", "0.2")


def test_one_text_parser() -> None:
    params = {**all_transforms()["ties"].params, **all_transforms()["lora_bake"].params}
    cases = [("alpha", " 0.5 ", 0.5), ("alpha", "1e-3", 0.001), ("alpha", "2", 2),
             ("alpha", "gradient_v", "gradient_v"), ("alpha", "0,0.5,1", "0,0.5,1"),
             ("alpha", "", None), ("vote_sgn", "True", True), ("vote_sgn", "no", False),
             ("vote_sgn", "1", "1"), ("trim", " mecha", "mecha"),
             ("weights", "0.5, 1", [0.5, 1]), ("weights", "0.5", [0.5]),
             ("blocks", "INS", "INS")]
    assert [parse_text(params[n], text) for n, text, _ in cases] == [v for *_, v in cases]
    assert parse_text(None, "3") == 3 and parse_text(None, "x") == "x"


# --- the command line's options come from the declarations ---------------------------


def _command(*path: str) -> click.Command:
    from modelkit.cli import cli

    ctx = click.Context(cli)
    cmd: Any = cli
    for name in path:
        cmd = cmd.get_command(ctx, name)
    return cmd


@pytest.mark.parametrize(("path", "name", "skip"), [
    (("prune",), "prune", ()), (("ema",), "ema", ()), (("quantize",), "quantize", ()),
    (("dequantize",), "dequantize", ()), (("extract",), "extract", ()),
    (("lora", "bake"), "lora_bake", ("weights", "te_weights")),
    (("lora", "extract"), "lora_extract", ()), (("lora", "resize"), "lora_resize", ()),
    (("lora", "merge"), "lora_merge", ("weights",)),
    (("lora", "convert"), "lora_convert", ())])
def test_op_options_are_generated_from_the_registry(path: tuple[str, ...], name: str,
                                                    skip: tuple[str, ...]) -> None:
    options = {p.name: p for p in _command(*path).params if isinstance(p, click.Option)}
    declared = [p for p in all_transforms()[name].params.values() if p.name not in skip]
    assert declared and all(p.help for p in declared), name
    for p in declared:
        opt = options[p.name]
        assert opt.opts[0] == "--" + p.name.replace("_", "-")
        assert (opt.help, opt.required) == (p.help, p.required)
        assert tuple(getattr(opt.type, "choices", ())) == p.choices
        if not p.required and p.kind != "list":
            assert opt.default == p.default, (name, p.name)


def test_merge_options_come_from_the_shared_method_declarations() -> None:
    options = {p.name: p for p in _command("merge").params if isinstance(p, click.Option)}
    alpha = all_transforms()["weighted_sum"].params["alpha"]
    assert options["alpha"].type == click.FLOAT and alpha.help.rstrip(".") in \
        str(options["alpha"].help)
    assert "default 0.3 where a method needs it" in str(options["alpha"].help)
    assert options["alpha_blocks"].opts == ["--blocks"]
    assert options["beta_blocks"].opts == ["--beta-blocks"]
    assert "(triple_sum, sum_twice)" in str(options["beta"].help)


# --- overwrite: one name, one check before writing, the no-replace commit -----------


def test_the_one_output_check_sees_the_vae_and_the_folder_commit_never_replaces(
        models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.core.recipe import Options, Recipe
    from modelkit.engine.runner import run
    from modelkit.errors import OutputError
    from modelkit.io.writer import atomic_dir

    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(models["vae"].read_bytes())
    recipe = Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5,
                          options=Options(vae=str(vae)))
    with pytest.raises(OutputError, match="output is also an input"):
        run(recipe, output=vae, overwrite=True)
    assert vae.read_bytes() == models["vae"].read_bytes()
    target = tmp_path / "folder"
    with pytest.raises(OutputError, match="folder exists and is not empty"), \
            atomic_dir(target, (), overwrite=False) as tmp:
        (tmp / "new.json").write_text("{}")
        target.mkdir()  # another run fills the folder meanwhile
        (target / "theirs.txt").write_text("x")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "vae.safetensors"]


def test_alpha_is_validated_once_from_the_command_line_to_the_math(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe validator checks the parameters once; the planner and the
    methods use what it checked."""
    import torch
    from safetensors.torch import load_file

    import modelkit.core.registry as registry

    calls: list[str] = []
    check = registry.check_params

    def counted(t: Transform, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(t.name)
        return check(t, *args, **kwargs)

    monkeypatch.setattr(registry, "check_params", counted)
    out = tmp_path / "m.safetensors"
    code, _, err = _main(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                         str(out), "--alpha", "0.25", "-q")
    assert code == 0, err
    assert calls == ["weighted_sum"]
    key = UNET + "out.2.weight"
    a, b = (load_file(models[n])[key].float() for n in ("sd1", "sd1_b"))
    assert load_file(out)[key].equal(torch.lerp(a, b, 0.25).half())
    # text typed for a parameter is parsed by the validator, in the same one
    # pass over the declaration: the command line looks nothing up itself
    parsed: list[str] = []
    parse = registry.parse_text
    monkeypatch.setattr(registry, "parse_text",
                        lambda p, text: parsed.append(text) or parse(p, text))
    calls.clear()
    out2 = tmp_path / "m2.safetensors"
    code, _, err = _main(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                         str(out2), "--param", "alpha=0.25", "-q")
    assert code == 0 and calls == ["weighted_sum"] and parsed == ["0.25"], err
    assert load_file(out2)[key].equal(load_file(out)[key])
    calls.clear()
    code, _, err = _main(capsys, "prune", str(models["sd1"]), "-o",
                         str(tmp_path / "p.safetensors"), "--dtype", "fp16", "-q")
    assert code == 0 and calls == ["prune"], err


def test_reading_the_declarations_imports_no_torch() -> None:
    """The merge command's options and 'modelkit methods' come from the
    declarations, which method modules give without importing torch."""
    code = ("import sys\nfrom modelkit.cli import main\n"
            "assert main(['merge', '--help']) == 0 and main(['methods', '--json']) == 0\n"
            "assert main(['lora', 'extract', '--help']) == 0\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.rstrip().endswith("TORCH False")


def test_the_common_options_are_declared_once() -> None:
    """``-o``, ``--overwrite``, ``--json``, ``-q``, ``--device`` and
    ``--format`` are declared in cli/common.py only; commands take them from
    there (``common_options`` hands them over as one ``CommonOptions``)."""
    import re

    import modelkit.cli

    pattern = re.compile(r'click\.option\(\s*"(-o|--output|--overwrite|--json|-q|--quiet|'
                         r'--device|--format)"')
    folder = Path(modelkit.cli.__file__).parent
    found = [f"{p.name}: {m.group(1)}" for p in sorted(folder.glob("*.py"))
             if p.name != "common.py" for m in pattern.finditer(p.read_text())]
    assert found == []
    overwrite = {o.help for o in _command("prune").params if o.name == "overwrite"}
    assert overwrite == {"Replace OUTPUT if it exists (never allowed for an input)."}
