"""Issue-9 defects: exit codes and the first line of output for each failing
(or fixed) case. Commands that import no torch run through the real
``modelkit`` console script, concurrently; the ones that load torch run
through the console script's function (``modelkit.cli:run``) in one child
process, so torch is imported once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import run_all as _run_all
from cli_support import run_entry as _console_entry

from modelkit import testing as t


@pytest.fixture(scope="module")
def files(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from modelkit.core.recipe import Recipe
    from modelkit.engine.api import export_gguf
    from modelkit.engine.runner import run

    root = tmp_path_factory.mktemp("exit-codes")
    out = {"root": root}
    out["mismatch"] = root / "mismatch.safetensors"
    t.write_tensors(out["mismatch"], {"w": (4, 4)}, metadata={"sshs_model_hash": "0" * 64})
    out["gguf"] = root / "unet.gguf"
    export_gguf(models["sd1"], out["gguf"])
    merged = root / "merged.safetensors"
    run(Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5), output=merged)
    # a copy whose one tensor changed but whose recipe did not: replay must differ
    from safetensors.torch import load_file, save_file

    from modelkit.io.header import read_header

    tensors = load_file(merged)
    key = next(k for k in tensors if k.endswith("out.2.weight"))
    tensors[key] = tensors[key] + 1
    out["tampered"] = root / "tampered.safetensors"
    save_file(tensors, out["tampered"], metadata=read_header(merged).metadata)
    out["recipe"] = root / "r.yaml"
    out["recipe"].write_text(f"version: 1\ninputs: {{a: {models['sd1']}, b: {models['sd1_b']}}}\n"
                             "steps:\n  m: {method: weighted_sum, models: [a, b], "
                             "params: {alpha: 0.5}}\n"
                             "output: {path: missing-folder/out.safetensors}\n")
    return out


def test_console_script_exit_codes(files: dict[str, Path], models: dict[str, Path]) -> None:
    """Exit codes 0, 1 and 2 through the console script, on commands that
    need no torch (each child would spend seconds importing it)."""
    root = files["root"]
    res = _run_all({
        "hash": ["hash", str(files["mismatch"]), "-q"],
        "inspect_unet": ["inspect", str(models["sdxl_unet"])],
        "inspect_gguf": ["inspect", str(files["gguf"])],
        "alpha_blocks": ["merge", "a", "b", "-o", "c.safetensors", "--alpha", "0.3",
                         "--blocks", "in_only"],
        "helps": ["merge", "--help"],
    }, root)
    code, out, err = res["hash"]
    assert code == 1 and "MISMATCH sshs_model_hash" in out
    code, out, _ = res["inspect_unet"]
    assert code == 0 and "unknown" not in out
    code, out, err = res["inspect_gguf"]
    assert code == 0 and "general.architecture sd1" in out, err
    code, _, err = res["alpha_blocks"]
    assert code == 2 and "give --alpha or --blocks, not both" in err
    code, out, _ = res["helps"]
    assert code == 0 and "modelkit methods" in out and "recipe methods" not in out






def test_every_command_exit_codes_through_the_console_entry_point(
        files: dict[str, Path], models: dict[str, Path]) -> None:
    """The failing (or warning) case of every command that loads torch, through
    the console script's own function in a child process: the exit code and
    its one line. (Before the fix, ``replay --check`` printed DIFFERENT and
    exited 0.)"""
    from modelkit.testing.lora import write_lora

    root = files["root"]
    lora = root / "lora_sd1.safetensors"
    write_lora(lora, "sd1", seed=3)
    nan = root / "nan.safetensors"
    t.write_checkpoint(nan, "sd1", seed=1)
    _poison(nan)
    sweep = root / "s.yaml"
    sweep.write_text(f"version: 1\nrecipe: {files['recipe']}\n"
                     "axes:\n  steps.m.params.alpha: [0.5, many]\n")
    sd1, sdxl = str(models["sd1"]), str(models["sdxl"])
    o = str(root / "never.safetensors")
    # a transformer family beside an SD one: one merge refuses both in one line
    flux = str(t.write_sparse_flux(root / "flux-aio.safetensors", all_in_one=True, tiny=True))
    # the transformer families' refusals: one layout; a LoRA of another family
    qwen = str(t.write_sparse_qwen_image(root / "qwen.safetensors", tiny=True))
    from modelkit.testing.lora import write_flux_lora

    flux_lora = root / "flux_lora.safetensors"
    write_flux_lora(flux_lora, "kohya")
    shards = root / "FLUX.1" / "transformer"  # an index naming a file outside the folder
    shards.mkdir(parents=True)
    (shards / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"img_in.weight": "../x.safetensors"}}')
    res = _console_entry({
        "replay": ["recipe", "replay", "--check", str(files["tampered"]), "-q",
                   "--search", str(models["sd1"].parent)],
        "gguf_name": ["export-gguf", sd1, "-o", str(root / "x.safetensors"), "-q"],
        "fp8": ["quantize", sd1, "--dtype", "fp8_e4m3fn", "-o", str(root / "fp8.safetensors"),
                "--json", "-q"],
        "dry_run": ["recipe", "run", str(files["recipe"]), "--dry-run", "-q"],
        "vpred": ["merge", sdxl, str(models["sdxl_vpred"]), "-o", str(root / "v.safetensors"),
                  "--alpha", "0.5", "--dry-run", "-q"],
        "verify_nan": ["verify", str(nan), "--static-only", "-q"],
        "verify_missing": ["verify", str(root / "missing.safetensors"), "-q"],
        "sweep": ["sweep", str(sweep), "-o", str(root / "sweep-out"), "-q"],
        "bake_arch": ["lora", "bake", sdxl, str(lora), "-o", o, "-q"],
        "lora_info": ["lora", "info", sd1],
        "swap": ["swap", sd1, "--vae", str(lora), "-o", o, "-q"],
        "extract": ["extract", str(lora), "--component", "vae", "-o", o, "-q"],
        "ema": ["ema", sd1, "-o", o, "-q"],
        "dequantize": ["dequantize", sd1, "-o", o, "-q"],
        "prune": ["prune", str(lora), "-o", o, "-q"],
        "convert": ["convert", str(root / "missing.ckpt"), "-o", o, "-q"],
        "merge_families": ["merge", flux, sd1, "-o", o, "-q"],
        "layout_one": ["convert", qwen, "-o", o, "--layout", "diffusers", "-q"],
        "bake_family": ["lora", "bake", sd1, str(flux_lora), "-o", o, "-q"],
        "shard_index": ["convert", str(shards.parent), "-o", o, "-q"],
    }, root)
    expected = {"replay": 1, "fp8": 0, "vpred": 0, "verify_nan": 1}
    for name, (code, out, err) in res.items():
        want = expected.get(name, 2)
        assert code == want, (name, code, out, err)
        if want == 2:  # one line naming the file or field, no traceback
            assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert "DIFFERENT: 1 of" in res["replay"][1]
    assert "needs a .gguf name" in res["gguf_name"][2]
    report = json.loads(res["fp8"][1])["report"]
    assert 0 < report["relative_l2"] < 0.2 and report["snr_db"] > 10
    assert "output folder does not exist" in res["dry_run"][2]
    assert "sdxl.safetensors is eps-prediction, sdxl_vpred.safetensors is v-prediction" \
        in res["vpred"][2]
    assert "static.nan_inf" in res["verify_nan"][1]
    assert "is an sd1 adapter but" in res["bake_arch"][2]
    assert ("cannot merge different architectures: flux-aio.safetensors is flux, "
            "sd1.safetensors is sd1") in res["merge_families"][2]
    assert "Qwen-Image files have one layout" in res["layout_one"][2]
    assert "flux" in res["bake_family"][2] and "sd1" in res["bake_family"][2]
    assert "weight_map names '../x.safetensors', not a file of this folder" \
        in res["shard_index"][2]
    assert not list(root.glob("never*")) and not list(root.glob(".never*"))
    assert not (root / "x.safetensors").exists() and not (root / "sweep-out").exists()


def _poison(path: Path) -> None:
    """One NaN in the first float tensor of ``path`` (rewritten in place)."""
    from safetensors.torch import load_file, save_file

    from modelkit.io.header import read_header

    tensors = load_file(path)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata=read_header(path).metadata)
