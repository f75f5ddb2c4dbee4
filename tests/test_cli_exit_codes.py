"""Issue-9 defects: exit codes and the first line of output for each failing
(or fixed) case. Commands that import no torch run through the real
``modelkit`` console script, concurrently; the ones that load torch run
in-process through ``main`` (a child would spend seconds importing it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit import testing as t


def _console() -> list[str]:
    script = Path(sys.executable).with_name("modelkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


def _run_all(cases: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([*_console(), *args], cwd=cwd, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def files(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from modelkit.core.api import export_gguf
    from modelkit.core.recipe import Recipe
    from modelkit.core.runner import run

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


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from modelkit.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_codes_of_commands_that_load_torch(files: dict[str, Path], models: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same mapping of outcomes to exit codes and first lines, in this
    process (``main`` returns what the console script exits with; the
    console script's own exit path is checked above)."""
    root = files["root"]
    monkeypatch.chdir(root)
    code, out, err = _main(capsys, "recipe", "replay", "--check", str(files["tampered"]), "-q",
                           "--search", str(models["sd1"].parent))
    assert code == 1 and "DIFFERENT: 1 of" in out, err
    code, _, err = _main(capsys, "export-gguf", str(models["sd1"]), "-o",
                         str(root / "x.safetensors"), "-q")
    assert code == 2 and "needs a .gguf name" in err and err.count("\n") == 1
    assert not (root / "x.safetensors").exists()
    code, out, err = _main(capsys, "quantize", str(models["sd1"]), "--dtype", "fp8_e4m3fn",
                           "-o", str(root / "fp8.safetensors"), "--json", "-q")
    report = json.loads(out)["report"]
    assert code == 0 and 0 < report["relative_l2"] < 0.2 and report["snr_db"] > 10, err
    code, _, err = _main(capsys, "recipe", "run", str(files["recipe"]), "--dry-run", "-q")
    assert code == 2 and "output folder does not exist" in err
    code, _, err = _main(capsys, "merge", str(models["sdxl"]), str(models["sdxl_vpred"]), "-o",
                         str(root / "v.safetensors"), "--alpha", "0.5", "--dry-run", "-q")
    assert code == 0 and "prediction types differ" in err
    assert "sdxl.safetensors is eps-prediction, sdxl_vpred.safetensors is v-prediction" in err
