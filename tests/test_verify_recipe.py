"""Verification as the last phase of a run: a recipe's verify: section,
recipe run --verify, and the LoRA-bake oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkit.cli import main
from modelkit.core.recipe import Recipe, RecipeError, parse_recipe
from modelkit.engine.runner import run


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    return write_synthetic_tokenizer(tmp_path_factory.mktemp("tok") / "clip")


def test_recipe_verify_section_fails_the_run(models: dict[str, Path], tmp_path: Path,
                                             tokenizer: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""version: 1
inputs: {{a: {models['sd1']}}}
steps:
  small: {{op: quantize, models: [a], params: {{dtype: fp8_e4m3fn}}}}
output: {{path: out.safetensors}}
verify: {{seeds: [1], tokenizer: {tokenizer}, thresholds: {{psnr: 500}}}}
""")
    assert main(["recipe", "run", str(recipe), "-q", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verify"]["passed"] is False
    failed = {c["name"] for c in data["verify"]["checks"] if c["verdict"] == "fail"}
    assert any("psnr" in name for name in failed)
    assert (tmp_path / "out.safetensors").is_file()  # written, then judged


def test_lora_bake_is_verified_against_the_runtime_oracle(
        models: dict[str, Path], tmp_path: Path, tokenizer: Path) -> None:
    from conftest import keep_lora_modules

    from modelkit.testing.lora import write_lora

    lora = tmp_path / "style.safetensors"
    write_lora(lora, "sd1", kind="lora", seed=10)
    keep_lora_modules(lora)
    recipe = Recipe.op("lora_bake", models["sd1"], lora, output=tmp_path / "b.safetensors",
                       weights=[0.7])
    recipe.verify = {"seeds": [1], "tokenizer": str(tokenizer)}
    report = run(recipe)
    assert report.verify is not None and report.verify.passed, report.verify.summary()
    d = report.to_dict()["verify"]
    assert d["reference"] and any(lu["weight"] == 0.7 for lu in d["loras"])


def test_verify_section_is_validated() -> None:
    text = ("version: 1\ninputs: {a: a.safetensors}\nsteps:\n  p: {op: prune, models: [a]}\n"
            "verify: {reference: b}\n")
    with pytest.raises(RecipeError, match=r"verify\.reference \(line 5\): 'b' is not an input"):
        parse_recipe(text, "r.yaml")
    with pytest.raises(RecipeError, match=r"verify\.colour .*unknown field"):
        parse_recipe(text.replace("reference: b", "colour: red"), "r.yaml")


def test_cancel_while_verifying_says_the_output_was_written(
        models: dict[str, Path], tmp_path: Path) -> None:
    import threading

    from modelkit.errors import Cancelled
    from modelkit.progress import VERIFY, Progress

    out = tmp_path / "p.safetensors"
    recipe = Recipe.op("prune", models["sd1"], output=out)
    recipe.verify = {"render": False}
    stop = threading.Event()

    def cancel_in_verify(p: Progress) -> None:
        if p.phase == VERIFY:
            stop.set()

    with pytest.raises(Cancelled, match=r"while verifying; \S*p\.safetensors was written, "
                                         r"not verified"):
        run(recipe, progress=cancel_in_verify, cancel=stop)
    assert out.is_file()  # complete: the write had committed before verify began
