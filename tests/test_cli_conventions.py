"""Issue 9's conventions and reports, in process (fast): every writing command
refuses an existing output and its inputs, multi-valued options take comma
lists and repetition, a dry run's size is the file's, a merge of eps and v
records the type it keeps, replay finds inputs by hash, progress in logs is
a few lines."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import click
import pytest

from modelkit import testing as t
from modelkit.cli import cli, main
from modelkit.io.header import read_header


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(folder: Path, a: Path, b: Path, extra: str = "") -> Path:
    path = folder / "r.yaml"
    path.write_text(f"version: 1\ninputs: {{a: {a}, b: {b}}}\nsteps:\n"
                    "  m: {method: weighted_sum, models: [a, b], params: {alpha: 0.5}}\n"
                    f"output: {{path: out.safetensors}}\n{extra}")
    return path


def test_recipe_lock_never_replaces_a_file_without_overwrite(
        tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, models["sd1"], models["sd1_b"])
    mine = tmp_path / "mine.txt"
    mine.write_text("user notes")
    code, _, err = _run(capsys, "recipe", "lock", str(recipe), "-o", str(mine), "-q")
    assert code == 2 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert mine.read_text() == "user notes"
    text = recipe.read_text()
    for target in (recipe, models["sd1"]):  # the recipe and its inputs, even with --overwrite
        code, _, err = _run(capsys, "recipe", "lock", str(recipe), "-o", str(target), "-q",
                            "--overwrite")
        assert code == 2 and "output is also an input" in err
    assert recipe.read_text() == text
    assert _run(capsys, "recipe", "lock", str(recipe), "-q")[0] == 0
    assert _run(capsys, "recipe", "lock", str(recipe), "-q")[0] == 2  # the lock exists now
    code, out, _ = _run(capsys, "recipe", "lock", str(recipe), "-q", "--overwrite", "--json")
    assert code == 0 and json.loads(out)["locked"] == str(tmp_path / "r.lock.yaml")
    assert json.loads(out)["inputs"] == {"a": sha256_of(models["sd1"]),
                                         "b": sha256_of(models["sd1_b"])}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "r.lock.yaml", "r.yaml"]


def test_recipe_run_device_overrides_the_recipe(tmp_path: Path, models: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    recipe = _recipe(tmp_path, models["sd1"], models["sd1_b"], "options: {device: cuda}\n")
    code, _, err = _run(capsys, "recipe", "run", str(recipe), "--dry-run", "-q")
    if not torch.cuda.is_available():
        assert code == 2 and "no CUDA device is available" in err
    code, out, err = _run(capsys, "recipe", "run", str(recipe), "--dry-run", "-q",
                          "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["dry_run"] is True


def test_replay_finds_a_moved_input_by_hash_and_names_a_missing_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "in").mkdir(), (tmp_path / "out").mkdir(), (tmp_path / "moved").mkdir()
    a, b = tmp_path / "in" / "a.safetensors", tmp_path / "in" / "b.safetensors"
    t.write_checkpoint(a, "sd1", seed=41)
    t.write_checkpoint(b, "sd1", seed=42)
    out = tmp_path / "out" / "m.safetensors"
    assert _run(capsys, "merge", str(a), str(b), "-o", str(out), "--alpha", "0.4", "-q")[0] == 0
    assert str(tmp_path) not in json.dumps(read_header(out).metadata)  # names, not folders
    shutil.move(b, tmp_path / "moved" / "renamed.safetensors")
    code, _, err = _run(capsys, "recipe", "replay", "--check", str(out), "-q")
    assert code == 2 and "input 'b': cannot find b.safetensors (sha256 " in err
    assert "pass --search DIR" in err and err.count("\n") == 1
    code, stdout, err = _run(capsys, "recipe", "replay", "--check", str(out), "-q",
                             "--search", str(tmp_path / "moved"), "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(stdout) == {"model": str(out), "identical": True, "n_tensors": 1143,
                                  "n_different": 0, "first_difference": None, "output": None}


def test_multi_valued_options_take_comma_lists_and_repetition(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = click.Context(cli)
    library = cli.get_command(ctx, "library")
    for name in ("list", "dupes", "check"):
        cmd = library.get_command(ctx, name)  # type: ignore[union-attr]
        params = cmd.make_context(name, ["--kind", "lora,vae", "--kind", "unet",
                                         "--arch", "sd1,sdxl"]).params
        from modelkit.cli.library_cmd import _filters

        filters = _filters(params["kind"], params["arch"], None, (), None)
        assert tuple(filters.kinds) == ("lora", "vae", "unet"), name
        assert tuple(filters.archs) == ("sd1", "sdxl"), name
    code, _, err = _run(capsys, "library", "list", "--kind", "lora,nope")
    assert code == 2 and "unknown kind 'nope'" in err
    plans = []
    for include in (["--include", "unet,te"], ["--include", "unet", "--include", "te"]):
        code, out, err = _run(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                              str(tmp_path / "m.safetensors"), "--dry-run", "--json", "-q",
                              *include)
        assert code == 0, err
        plans.append({k: json.loads(out)[k] for k in ("n_merged", "n_copied")})
    assert plans[0] == plans[1] and plans[0]["n_copied"] > 0  # the VAE is copied from A


def test_several_paths_ema_dtype_and_help_texts(models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "inspect", "--json", str(models["sd1"]), str(models["vae"]),
                        str(models["emb_sd1"]))
    assert code == 0 and [d["kind"] for d in json.loads(out)] == ["checkpoint", "vae",
                                                                  "embedding"]
    out_ema = tmp_path / "ema.safetensors"  # an fp32 training checkpoint's EMA, at fp16
    assert _run(capsys, "ema", str(models["sd1_ema"]), "-o", str(out_ema), "--dtype", "fp16",
                "-q")[0] == 0
    dtypes = {i.dtype for i in read_header(out_ema).tensors.values()}
    assert dtypes == {"F16", "I64"}
    _, text, _ = _run(capsys, "quantize", "--help")
    assert "the UNet only for fp8 and int8" in " ".join(text.split())
    code, stdout, _ = _run(capsys, "export-gguf", str(models["sd1"]), "-o",
                           str(tmp_path / "u.gguf"), "-q")
    assert code == 0 and "(use --keep-shapes for it)" in stdout and "flatten=" not in stdout


def test_lora_into_gguf_names_a_command_that_exists(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.testing.lora import write_lora

    lora = tmp_path / "l.safetensors"
    write_lora(lora, "sd1")
    code, _, err = _run(capsys, "export-gguf", str(lora), "-o", str(tmp_path / "l.gguf"))
    assert code == 2 and "'modelkit lora bake'" in err
    assert _run(capsys, "lora", "bake", "--help")[0] == 0


def test_dry_run_size_is_the_written_size(models: dict[str, Path], tmp_path: Path) -> None:
    """The header is known before anything is read: placeholder hashes have
    the real length and YAML quoting, and one per file."""
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run

    for i, recipe in enumerate((
            Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5),
            Recipe.merge(models["sd1"], models["sd1_b"], models["sd1_ema"],
                         method="add_difference", alpha=1.0).then("prune"))):
        out = tmp_path / f"o{i}.safetensors"
        planned = run(recipe, output=out, dry_run=True).output_bytes
        written = run(recipe, output=out).output_bytes
        assert planned == written == out.stat().st_size, i


def test_eps_and_v_merge_warns_and_records_the_type(models: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev.safetensors"
    code, _, err = _run(capsys, "merge", str(models["sdxl"]), str(models["sdxl_vpred"]), "-o",
                        str(out), "--alpha", "0.5", "-q")
    assert code == 0
    assert ("warning: prediction types differ (sdxl.safetensors is eps-prediction, "
            "sdxl_vpred.safetensors is v-prediction)") in err
    assert read_header(out).metadata["modelkit.prediction"] == "eps"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_logs_is_a_few_lines_and_on_a_terminal_has_rate_and_eta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.cli import progress as cli_progress
    from modelkit.cli.progress import StderrProgress
    from modelkit.progress import READ, WRITE, Progress

    monkeypatch.setattr(cli_progress.time, "monotonic", _Clock())
    total = 1000 * 4096

    def events() -> list[Progress]:
        out = [Progress("hash a.safetensors", n * 4096, total, "bytes", None, READ, n / 2000)
               for n in range(0, 1001, 5)]
        out += [Progress("merge", n * 4096, total, "bytes", "k", WRITE, 0.5 + n / 2000)
                for n in range(0, 1001, 5)]
        return out

    log = io.StringIO()
    bar = StderrProgress(stream=log)
    for p in events():
        bar(p)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 3 <= len(lines) <= 5, lines  # start, each quarter, end: not one per event
    assert lines[-1].startswith("write merge: 100.0%") and "\r" not in log.getvalue()
    tty = _Tty()
    bar = StderrProgress(stream=tty)
    for p in events():
        bar(p)
    bar.close()
    drawn = tty.getvalue().split("\r\x1b[2K")
    assert any("/s " in d and " ETA " in d for d in drawn)  # rate and ETA
    # no ETA from the first block's noise (it once said "0.0% ... ETA 32m02s"):
    # the run's share is the line's ``overall``, or its own percentage
    def run_share(d: str) -> float:
        found = re.search(r"overall (\d+)%", d) or re.search(r": ([\d.]+)% ", d)
        return float(found.group(1)) if found else 100.0
    early = [d for d in drawn if d and run_share(d) < 1]
    assert all(" ETA " not in d for d in early)
    assert tty.getvalue().endswith("\n") and drawn[-1].startswith("write merge: 100.0%")


def test_methods_presets_and_the_dry_run_block_table(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.core.registry import all_transforms

    code, out, _ = _run(capsys, "methods")
    assert code == 0
    for name, tr in all_transforms().items():  # every method and op, with its parameters
        assert f"  {name}(" in out, name
        for param in tr.params:
            assert f"      {param}: " in out, (name, param)
    assert "trim: one of round|mecha (default 'round')" in out
    code, out, _ = _run(capsys, "methods", "--json")
    assert code == 0 and set(json.loads(out)) == set(all_transforms())
    code, out, _ = _run(capsys, "presets")
    assert code == 0 and "  sd1:" in out and "  sdxl:" in out and "OUT11" in out
    code, out, _ = _run(capsys, "merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                        str(tmp_path / "m.safetensors"), "--blocks", "out_only", "--dry-run",
                        "-q")
    table = out[out.index("block weights of merge.alpha (26 blocks + the VAE entry):"):].split()
    assert table[table.index("BASE") + 1] == "0" and table[table.index("M00") + 1] == "0"
    assert table[table.index("OUT00") + 1] == "1" and table[table.index("OUT11") + 1] == "1"


def test_every_step_example_in_docs_recipes_parses() -> None:
    """docs/recipes.md has a worked example for each kind of step, and each
    one is a valid recipe (steps-only blocks get their inputs declared)."""
    import re

    import yaml

    from modelkit.core.recipe import parse_recipe
    from modelkit.core.registry import all_transforms

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    used = set()
    for block in blocks:  # a hash shortened with "..." stands for a whole one
        doc = yaml.safe_load(re.sub(r"sha256: [0-9a-f]+\.\.\.", "sha256: " + "a" * 64, block))
        names = {m for s in doc["steps"].values() for m in s["models"]} - set(doc["steps"])
        doc.setdefault("version", 1)
        doc.setdefault("inputs", {n: f"{n}.safetensors" for n in names})
        recipe = parse_recipe(yaml.safe_dump(doc), "docs/recipes.md")
        used |= {s.transform for s in recipe.steps.values()}
    documented = {n for n in all_transforms() if n not in ("lora_resize", "lora_merge",
                                                           "lora_convert")}
    assert documented <= used, documented - used  # those three are named in the text
    assert all(f"`{n}`" in text for n in ("lora_resize", "lora_merge", "lora_convert"))
