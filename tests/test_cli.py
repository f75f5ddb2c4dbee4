"""The command line end to end: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelkit.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json(capsys: pytest.CaptureFixture[str], models: dict[str, Path]) -> None:
    code, out, _ = _run(capsys, "inspect", str(models["sdxl"]), "--json")
    assert code == 0
    d = json.loads(out)
    assert (d["kind"], d["arch"], d["prediction"]["type"]) == ("checkpoint", "sdxl", "eps")


def test_inspect_human(capsys: pytest.CaptureFixture[str], models: dict[str, Path]) -> None:
    code, out, _ = _run(capsys, "inspect", str(models["sd1_ema"]))
    assert code == 0
    assert "checkpoint" in out and "sd1" in out
    assert "EMA         yes, 686 tensors" in out
    assert "unet" in out and "complete" in out


def test_hash_json(capsys: pytest.CaptureFixture[str], models: dict[str, Path]) -> None:
    code, out, _ = _run(capsys, "hash", str(models["vae"]), str(models["sd1"]), "--json",
                        "-q")
    assert code == 0
    rows = json.loads(out)
    assert [Path(r["path"]).name for r in rows] == ["vae.safetensors", "sd1.safetensors"]
    assert all(len(r["autov2"]) == 10 and len(r["legacy"]) == 8 for r in rows)


def _bad_files(tmp_path: Path, models: dict[str, Path]) -> dict[str, Path]:
    data = models["sd1"].read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not a model\n" * 10)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, ("true",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, evil)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    return {"truncated": trunc, "header": text, "allow-list": evil,
            "not a readable checkpoint": garbage,
            "no such file": tmp_path / "missing.safetensors"}


@pytest.mark.parametrize("command", ["inspect", "hash"])
def test_bad_input_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   models: dict[str, Path], command: str) -> None:
    for problem, path in _bad_files(tmp_path, models).items():
        if command == "hash" and path.suffix == ".ckpt":
            continue  # hashing reads bytes only; a pickle is never unpickled there
        code, out, err = _run(capsys, command, str(path))
        assert code == 2, (problem, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert path.name in lines[0] and problem in lines[0], lines[0]
        assert "Traceback" not in err


def test_real_process_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    proc = subprocess.run([sys.executable, "-m", "modelkit", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and "bad.safetensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sub", ["inspect", "hash", "demo"])
def test_help(capsys: pytest.CaptureFixture[str], sub: str) -> None:
    code, out, _ = _run(capsys, sub, "--help")
    assert code == 0 and "Usage: modelkit " + sub in out


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect")
    assert code == 2 and "Missing argument" in err


def test_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "lib"
    code, out, _ = _run(capsys, "demo", str(root), "-q")
    assert code == 0
    data = json.loads((root / "library.json").read_text())
    kinds = {Path(r["path"]).name: (r["kind"], r["arch"]) for r in data["reports"]}
    assert kinds["tiny-sd15.safetensors"] == ("checkpoint", "sd1")
    assert kinds["tiny-sdxl-refiner.safetensors"] == ("checkpoint", "sdxl_refiner")
    assert kinds["tiny-sdxl-unet.safetensors"] == ("unet", "sdxl")
    assert kinds["tiny-vae-ft-mse.safetensors"][0] == "vae"
    assert kinds["tiny-sd15-style.safetensors"] == ("lora", "sd1")
    assert kinds["tiny-sdxl-detail.safetensors"] == ("lora", "sdxl")
    assert kinds["tiny-negative.safetensors"][0] == "embedding"
    preds = {Path(r["path"]).name: r["prediction"]["type"] for r in data["reports"]}
    assert preds["tiny-sdxl-vpred.safetensors"] == "v"
    assert preds["tiny-sd2-768-v.safetensors"] == "v"
    assert kinds["tiny-sd15-mix-inpainting.safetensors"] == ("checkpoint", "sd1")
    mix = next(r for r in data["reports"] if "mix-inpainting" in r["path"])
    assert mix["variant"] == "inpaint"
    assert "modelkit.recipe" in mix["metadata"]
    assert len(data["hashes"]) == len(data["reports"]) == 18
    assert "tiny-sd15-inpainting.safetensors" in out
    table = out.split("\n\n")[0].splitlines()  # the closing table: columns aligned
    kind_col = table[0].index("kind")
    assert all(row[kind_col - 2:kind_col] == "  " and row[kind_col] != " " for row in table)
    assert "verify grid:" in out and (root / "verify" / "grid.png").is_file()
    # a second run over its own folder (the marker it left) is refused unless
    # --overwrite, which keeps files the user added; a foreign non-empty
    # folder is refused
    from modelkit.demo import prepare_dir

    (root / "notes.txt").write_text("mine")
    capsys.readouterr()
    code, out, err = _run(capsys, "demo", str(root), "-q")
    assert code == 2 and out == "" and err == (
        f"modelkit: error: {root}: holds an earlier modelkit demo; pass --overwrite to "
        "replace it, or pick another folder\n")
    assert prepare_dir(root, overwrite=True) is True
    assert (root / "notes.txt").read_text() == "mine"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    capsys.readouterr()
    code, _, err = _run(capsys, "demo", str(other), "-q")
    assert code == 2 and "not empty" in err
    assert (other / "keep.txt").read_text() == "user data"
