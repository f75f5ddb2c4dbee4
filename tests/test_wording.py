"""Issue 17: wording of messages, tables and progress lines (one helper for
counts and articles, no mid-word cuts, no escaped layout in usage errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit.wording import a, article, fit_words, noun, plural, plural_of, wrap_words


def _console() -> list[str]:
    script = Path(sys.executable).with_name("modelkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


def _run_all(cases: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str]]:
    """Each case through the real ``modelkit`` console script, concurrently."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([*_console(), *args], cwd=cwd, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = (proc.returncode, stdout, stderr)
    return out


def test_plural_and_noun() -> None:
    assert [plural(n, "tensor") for n in (0, 1, 2)] == ["0 tensors", "1 tensor", "2 tensors"]
    assert plural(1, "hint") == "1 hint" and plural(2, "hint") == "2 hints"
    assert plural(3, "entry") == "3 entries" and plural(2, "key") == "2 keys"
    assert plural(2, "match") == "2 matches" and plural(2, "index") == "2 indexes"
    assert plural(2, "cell", "cells!") == "2 cells!"
    assert noun(1, "file") == "file" and noun(5, "file") == "files"
    assert plural_of("bias") == "biases"


@pytest.mark.parametrize(("word", "want"), [
    ("sdxl", "an"), ("sd1", "an"), ("sd2", "an"), ("sdxl_refiner", "an"), ("adapter", "an"),
    ("embedding", "an"), ("fp16", "an"), ("int8", "an"), ("8-bit", "an"), ("unet", "a"),
    ("lora", "a"), ("checkpoint", "a"), ("vae", "a"), ("bf16", "a"), ("gguf", "a"),
    ("text_encoder", "a"), ("unknown", "an"), ("hour", "a"), ("MSE", "an"), ("18", "an"),
    ("1", "a"), ("", "a"),
])
def test_article(word: str, want: str) -> None:
    assert article(word) == want


def test_a() -> None:
    assert a("sdxl") == "an sdxl" and a("lora") == "a lora"


def test_fit_words_cuts_at_a_word_boundary() -> None:
    text = "tensors 686, missing 0, wrong_shape 0"
    assert fit_words(text, 100) == text
    assert fit_words(text, 16) == "tensors 686..."
    assert len(fit_words(text, 16)) <= 16
    assert fit_words("abcdefghijklmnop", 8) == "abcde..."
    assert fit_words("abc", 2) == ".."


def test_wrap_words() -> None:
    assert wrap_words("tensors 686, missing 0, wrong_shape 0", 16) == [
        "tensors 686,", "missing 0,", "wrong_shape 0"]
    assert wrap_words("", 5) == [""]
    assert wrap_words("abcdefgh", 3) == ["abc", "def", "gh"]


def test_cli_wording_through_the_console_script(models: dict[str, Path], tmp_path: Path) -> None:
    """Item 6: a missing choice option lists its choices on one line, no
    literal ``\\n\\t``; item 4: a LoRA as a merge input names the registry's
    bake op; item 11: verify's table wraps long values at word boundaries."""
    from modelkit.core.registry import ADAPTER, CHECKPOINT, ops_taking
    from modelkit.testing.lora import write_lora

    lora = tmp_path / "style.safetensors"
    write_lora(lora, "sd1", seed=3)
    res = _run_all({
        "quantize": ["quantize", str(models["sd1"]), "-o", "q.safetensors"],
        "merge_lora": ["merge", str(models["sd1"]), str(lora), "-o", "m.safetensors",
                       "--alpha", "0.5", "-q"],
        "verify": ["verify", str(models["sd1"]), "--static-only", "-q"],
    }, tmp_path)
    code, out, err = res["quantize"]
    assert code == 2 and out == ""
    assert err == ("modelkit: error: Missing option '--dtype'. Choose from: fp16, bf16, fp32, "
                   "fp8_e4m3fn, fp8_e5m2, int8 (see 'modelkit quantize --help')\n")
    code, _, err = res["merge_lora"]
    assert ops_taking(CHECKPOINT, ADAPTER) == ["lora_bake"]
    assert code == 2 and err.count("\n") == 1
    assert "style.safetensors is a lora, not a checkpoint" in err
    assert "'modelkit lora bake' or an 'op: lora_bake' step" in err and "'op: bake'" not in err
    code, out, _ = res["verify"]
    assert code == 0
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.lstrip().startswith("static.keys.unet"))
    assert "tensors 686, missing 0, wrong_shape 0," in lines[row]
    assert lines[row + 1].strip() == "unexpected 0"
    assert not [line for line in lines if line.rstrip().endswith(", mis")]
    assert not list(tmp_path.glob("*.safetensors.*")) and not (tmp_path / "m.safetensors").exists()
