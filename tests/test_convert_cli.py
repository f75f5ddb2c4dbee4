"""The convert commands through the CLI, and every convert operation as a
recipe step (with the GGUF and diffusers output formats)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_recipe

from modelkit import testing as t
from modelkit.cli import main
from modelkit.core.recipe import RecipeError, parse_recipe
from modelkit.io.header import read_header
from modelkit.io.reader import open_model


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args, "-q"] if args[0] != "recipe" else list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_model(path) as m:
        return {k: m.get(k).clone() for k in m.infos}


@pytest.fixture(scope="module")
def ema_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "ema.safetensors"
    t.write_checkpoint(path, "sd1", seed=31, ema=True, dtype="F32", markers=("v_pred",))
    return path


@pytest.mark.parametrize("args,expect", [
    (["prune", "--dtype", "fp16"], "dropped 700 (688 EMA weights, 12 schedule buffers)"),
    (["ema"], "686 UNet tensors now hold their EMA weights"),
    (["quantize", "--dtype", "fp8_e4m3fn"], "policy: unet=F8_E4M3"),
    (["quantize", "--dtype", "int8"], "int8 error: relative L2"),
    (["extract", "--component", "vae"], "wrote"),
])
def test_commands_write_and_report(capsys: pytest.CaptureFixture[str], ema_model: Path,
                                   tmp_path: Path, args: list[str], expect: str) -> None:
    out = tmp_path / "out.safetensors"
    code, stdout, err = _run(capsys, args[0], str(ema_model), "-o", str(out), *args[1:])
    assert code == 0, err
    assert expect in stdout
    assert out.is_file()
    assert read_header(out).tensors


def test_json_report_has_the_figures(capsys: pytest.CaptureFixture[str], ema_model: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "e.safetensors"
    code, stdout, _ = _run(capsys, "ema", str(ema_model), "-o", str(out), "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["report"]["n_swapped"] == 686
    assert 0 < data["report"]["overall_relative_l2"] < 0.02
    assert data["bytes_written"] == out.stat().st_size


@pytest.mark.parametrize("args,match", [
    (["ema"], "has no EMA weights"),
    (["swap", "--vae", "{lora}"], "is a lora with no vae"),
    (["quantize", "--dtype", "int8", "--components", "unet,clip"], "unknown component 'clip'"),
    (["export-gguf"], "is a LoRA, not a model"),
])
def test_bad_input_is_one_line_exit_2_no_output(capsys: pytest.CaptureFixture[str],
                                                models: dict[str, Path], tmp_path: Path,
                                                args: list[str], match: str) -> None:
    from modelkit.testing.lora import write_lora

    lora = tmp_path / "l.safetensors"
    write_lora(lora, "sd1")
    src = lora if args[0] == "export-gguf" else models["sd1"]
    args = [a.replace("{lora}", str(lora)) for a in args]
    out = tmp_path / ("o.gguf" if args[0] == "export-gguf" else "o.safetensors")
    code, _, err = _run(capsys, args[0], str(src), "-o", str(out), *args[1:])
    assert code == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                   models: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "quantize", str(models["sd1"]), "-o",
                        str(tmp_path / "o.safetensors"), "--dtype", "fp4")
    assert code == 2 and err.count("\n") == 1
    assert "'fp4' is not one of" in err and "see 'modelkit quantize --help'" in err
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(capsys: pytest.CaptureFixture[str],
                                         models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"the user's file")
    code, _, err = _run(capsys, "prune", str(models["sd1"]), "-o", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert out.read_bytes() == b"the user's file"
    code, _, err = _run(capsys, "prune", str(models["sd1"]), "-o", str(out), "--overwrite")
    assert code == 0, err
    assert read_header(out).tensors


def test_convert_refuses_a_ckpt_with_a_forbidden_class(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Evil()}, ckpt)
    code, _, err = _run(capsys, "convert", str(ckpt), "-o", str(tmp_path / "o.safetensors"))
    assert code == 2
    assert "evil.ckpt" in err and "system" in err and "pwned" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_to_diffusers_and_back(capsys: pytest.CaptureFixture[str],
                                       models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    code, stdout, err = _run(capsys, "convert", str(models["sdxl_vpred"]), "-o", str(folder))
    assert code == 0, err
    assert "(diffusers)" in stdout
    assert (folder / "unet" / "config.json").is_file()
    back = tmp_path / "back.safetensors"
    code, _, err = _run(capsys, "convert", str(folder), "-o", str(back))
    assert code == 0, err
    src, got = _tensors(models["sdxl_vpred"]), _tensors(back)
    assert set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) for k in src)


def test_export_gguf_command(capsys: pytest.CaptureFixture[str], models: dict[str, Path],
                             tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    out = tmp_path / "u.gguf"
    code, stdout, err = _run(capsys, "export-gguf", str(models["sd1"]), "-o", str(out))
    assert code == 0, err
    reader = GGUFReader(str(out))
    names = {x.name for x in reader.tensors}
    assert "input_blocks.0.0.weight" in names and len(names) == 686
    assert "note: sd1 checkpoint -> general.architecture sd1" in stdout


# --- recipes ------------------------------------------------------------------


RECIPE = """\
version: 1
inputs:
  a: {a}
  b: {b}
steps:
{steps}
output: {{path: {out}{fmt}}}
"""


def _recipe(tmp_path: Path, a: Path, b: Path, steps: str, out: str, fmt: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(a=a, b=b, steps=steps, out=out, fmt=fmt))
    return path


@pytest.mark.parametrize("steps,check", [
    ("  p: {op: prune, models: [a]}", "prune"),
    ("  e: {op: ema, models: [a]}", "ema"),
    ("  q: {op: quantize, models: [a], params: {dtype: int8}}\n"
     "  d: {op: dequantize, models: [q], params: {dtype: fp32}}", "dequantize"),
    ("  s: {op: swap, models: [b, a], params: {component: vae}}", "swap"),
    ("  x: {op: extract, models: [a], params: {component: unet}}", "extract"),
])
def test_every_operation_is_a_recipe_step(ema_model: Path, models: dict[str, Path],
                                          tmp_path: Path, steps: str, check: str) -> None:
    from conftest import run_chain

    from modelkit.core.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, ema_model, models["sd1"], steps, "out.safetensors"))
    report = run_recipe(recipe)
    out = tmp_path / "out.safetensors"
    assert [s.transform for s in report.steps][-1] == check
    # the same operations through the command path give the same tensors
    chain = [(s.op, dict(s.params)) for s in recipe.steps.values()]
    inputs = [models["sd1"], ema_model] if check == "swap" else [ema_model]
    run_chain(inputs, chain[:1], tmp_path / "direct.safetensors")
    if len(chain) == 1:
        direct = _tensors(tmp_path / "direct.safetensors")
        got = _tensors(out)
        assert set(got) == set(direct)
        assert all(torch.equal(got[k], direct[k]) for k in got)
    history = json.loads(read_header(out).metadata["modelkit.history"])
    assert [h["op"] for h in history] == [s.op for s in recipe.steps.values()]
    assert "modelkit.recipe" in read_header(out).metadata


def test_recipe_merges_ema_inputs_and_writes_gguf_and_diffusers(
        ema_model: Path, models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    steps = ("  ae: {op: ema, models: [a]}\n"
             "  mix: {method: weighted_sum, models: [ae, b], params: {alpha: 0.5}}\n"
             "  small: {op: prune, models: [mix]}")
    gguf_recipe = _recipe(tmp_path, ema_model, models["sd1"], steps, "u.gguf")
    from modelkit.core.recipe import load_recipe

    report = run_recipe(load_recipe(gguf_recipe))
    assert (tmp_path / "u.gguf").is_file() and report.n_merged > 0
    folder_recipe = _recipe(tmp_path, ema_model, models["sd1"], steps, "pipe",
                            ", format: diffusers")
    run_recipe(load_recipe(folder_recipe))
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    # the merge saw the EMA weights: compare one UNet key by hand
    key = "model.diffusion_model.out.2.weight"
    ema = _tensors(ema_model)[t.ema_keys_for("sd1")[key]]
    b = _tensors(models["sd1"])[key]
    back = tmp_path / "back.safetensors"
    from conftest import run_chain

    run_chain([tmp_path / "pipe"], [], back)
    want = (0.5 * ema.float() + 0.5 * b.float()).half()
    assert torch.equal(_tensors(back)[key], want)


@pytest.mark.parametrize("step,match", [
    ("{op: shrink, models: [a]}", r"steps\.s\.op \(line 6\): unknown operation 'shrink'"),
    ("{op: quantize, models: [a]}", r"steps\.s\.params .*missing parameter 'dtype'"),
    ("{op: prune, models: [a], params: {keep_ema: 2}}", r"'keep_ema' must be true or false"),
    ("{op: swap, models: [a]}", r"steps\.s\.models .*swap takes 2 model"),
    ("{op: ema, method: weighted_sum, models: [a]}", "exactly one of 'method'"),
])
def test_bad_op_steps_fail_before_reading(step: str, match: str) -> None:
    text = ("version: 1\ninputs:\n  a: missing.safetensors\n  b: b.safetensors\n"
            f"steps:\n  s: {step}\n")
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text, "r.yaml")


def test_diffusers_folder_without_text_encoder_warns_and_outside_links_are_refused(
        capsys: pytest.CaptureFixture[str], models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from conftest import write_diffusers

    folder = tmp_path / "pipe"
    with open_model(models["sd1"]) as src:
        write_diffusers(src, folder)
    shutil.rmtree(folder / "text_encoder")
    back = tmp_path / "back.safetensors"
    code, stdout, err = _run(capsys, "convert", str(folder), "-o", str(back), "-q")
    assert code == 0 and "wrote" in stdout
    assert err == (f"warning: {folder}: no text_encoder/; the result lacks that text "
                   "encoder\n")
    assert not any(k.startswith("cond_stage_model.") for k in read_header(back).tensors)
    os.symlink(models["sd1_b"], folder / "unet" / "extra.safetensors")
    os.symlink("../vae", folder / "unet" / "inside")  # inside the folder: fine
    code, stdout, err = _run(capsys, "convert", str(folder), "-o",
                             str(tmp_path / "x.safetensors"), "-q")
    assert code == 2 and stdout == "" and err == (
        f"modelkit: error: {folder / 'unet' / 'extra.safetensors'}: a symlink pointing "
        f"outside the diffusers folder {folder}; copy the file in instead\n")
    assert not (tmp_path / "x.safetensors").exists()
