"""modelkit sweep: the grid, field paths, validation up front, results,
resume and cancel, on the serial executor (the pool and Ray runs have
their own modules)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sweep_fixture import ALPHAS, write_sweep

from modelkit.cli import main
from modelkit.sweep import SerialExecutor, SweepError, load_sweep, parse_sweep, run_sweep
from modelkit.sweep.results import read_records


class Counting(SerialExecutor):
    """The serial executor, counting the cells it was given."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def execute(self, tasks: list[dict[str, Any]], **kw: Any) -> None:
        self.ran += [t["name"] for t in tasks]
        super().execute(tasks, **kw)


def _inline(models: dict[str, Path], axes: str, mode: str = "") -> str:
    return f"""version: 1
recipe:
  version: 1
  inputs: {{a: {models['sd1']}, b: {models['sd1_b']}}}
  steps:
    mix: {{method: weighted_sum, models: [a, b], params: {{alpha: 0.5}}}}
axes:
{axes}
{mode}
"""


# --- the grid and field paths ---------------------------------------------------------


def test_product_grid_and_zip_pairs(models: dict[str, Path], tmp_path: Path) -> None:
    axes = ("  steps.mix.params.alpha: [0.1, 0.2, 0.3]\n"
            "  output.dtype: [fp16, bf16, fp32]")
    grid = parse_sweep(_inline(models, axes), "s.yaml", tmp_path)
    cells = grid.cells()
    assert grid.n_cells == 9 and len(cells) == 9
    assert [(c.values["steps.mix.params.alpha"], c.values["output.dtype"]) for c in cells[:4]] \
        == [(0.1, "fp16"), (0.1, "bf16"), (0.1, "fp32"), (0.2, "fp16")]
    assert cells[4].recipe["steps"]["mix"]["params"]["alpha"] == 0.2
    assert cells[4].recipe["output"]["dtype"] == "bf16"
    assert cells[4].name == "cell04_alpha-0.2_dtype-bf16"
    zipped = parse_sweep(_inline(models, axes, "mode: zip"), "s.yaml", tmp_path).cells()
    assert [(c.labels["alpha"], c.labels["dtype"]) for c in zipped] == [
        ("0.1", "fp16"), ("0.2", "bf16"), ("0.3", "fp32")]
    with pytest.raises(SweepError, match=r"mode: zip pairs .*alpha: 3, output.dtype: 2"):
        parse_sweep(_inline(models, axes.replace(", fp32]", "]"), "mode: zip"), "s.yaml",
                    tmp_path)


def test_field_paths_inputs_presets_and_options(models: dict[str, Path], tmp_path: Path
                                                ) -> None:
    (tmp_path / "sub").mkdir()
    axes = ("  inputs.b: [sub/other.safetensors]\n"
            "  steps.mix.params.alpha: [{preset: in_only}, {blocks: [0, 1]}]\n"
            "  options.seed: [7]")
    spec = parse_sweep(_inline(models, axes), "s.yaml", tmp_path)
    first, second = spec.cells()
    assert first.recipe["inputs"]["b"] == {"path": str(tmp_path / "sub/other.safetensors")}
    assert first.recipe["inputs"]["a"]["path"] == str(models["sd1"])
    assert first.recipe["steps"]["mix"]["params"]["alpha"] == {"preset": "in_only"}
    assert first.recipe["options"]["seed"] == 7 and first.recipe["output"]["path"] is None
    assert first.labels == {"b": "other", "alpha": "in_only", "seed": "7"}
    assert second.labels["alpha"] == "blocks:0,1"
    for bad, message in [
        ("  steps.nope.params.alpha: [1]",
         r"axes.steps.nope.params.alpha: the base recipe has no 'steps.nope' \(known there: mix"),
        ("  output.path: [x.safetensors]", r"axes.output.path: the sweep names each cell"),
        ("  colour: [red]", r"axes.colour: a field path starts with one of"),
        ("  steps.mix.params.alpha: []", r"axes.steps.mix.params.alpha: give a non-empty"),
    ]:
        with pytest.raises(SweepError, match=message):
            parse_sweep(_inline(models, bad), "s.yaml", tmp_path)


def test_inline_recipe_errors_name_the_sweep_file_line(models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from modelkit.core.recipe import RecipeError

    text = _inline(models, "  steps.mix.params.alpha: [1]").replace("weighted_sum", "blend")
    with pytest.raises(RecipeError, match=r"s.yaml \(recipe\): steps.mix.method \(line 6\)"):
        parse_sweep(text, "s.yaml", tmp_path)


def test_bad_values_fail_up_front_naming_axis_and_value(models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    cases = [
        ("  steps.mix.params.alpha: [0.5, fast]",
         r"s.yaml: axes.steps.mix.params.alpha: value 'fast' \(cell 1\): unknown block preset "
         r"'fast'"),
        ("  output.dtype: [fp16, fp99]",
         r"s.yaml: axes.output.dtype: value 'fp99' \(cell 1\): 'fp99' is not one of"),
        ("  inputs.b: [nothere.safetensors]",
         r"s.yaml: axes.inputs.b: value 'nothere' \(cell 0\): .*nothere.safetensors: "
         r"no such file"),
        ("  inputs.b: [" + str(models["sdxl"]) + "]",
         r"s.yaml: axes.inputs.b: value 'sdxl' \(cell 0\): .*"),
    ]
    for axes, message in cases:
        out = tmp_path / f"out{len(message)}"
        spec = parse_sweep(_inline(models, axes), "s.yaml", tmp_path)
        executor = Counting()
        with pytest.raises(SweepError, match=message) as info:
            run_sweep(spec, out, executor=executor)
        assert "\n" not in str(info.value)
        assert executor.ran == [] and not out.exists()  # not even the folder


def test_exit_code_2_through_the_console_script(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("version: 1\nrecipe: base.yaml\naxes: {output.dtype: [fp16]}\n"
                     "mode: diagonal\n")
    script = Path(sys.executable).with_name("modelkit")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]
    proc = subprocess.run([*cmd, "sweep", str(sweep), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"modelkit: error: {sweep}: mode: 'diagonal' is not one of product, zip"]


# --- results --------------------------------------------------------------------------


def test_results_jsonl_tables_and_the_failed_cells(serial_sweep: Any,
                                                   models: dict[str, Path]) -> None:
    import torch
    from safetensors import safe_open

    from modelkit.io.hashing import hash_file

    report, out = serial_sweep, serial_sweep.out_dir
    assert report.exit_code == 1 and (report.n_ok, report.n_failed) == (2, 2)
    records = {r["index"]: r for r in read_records(out / "sweep.jsonl")}
    assert sorted(records) == [0, 1, 2, 3]
    key = "model.diffusion_model.out.2.weight"
    for index, alpha in ((0, ALPHAS[0]), (2, ALPHAS[1])):
        r = records[index]
        path = out / r["output"]
        assert r["status"] == "ok" and r["error"] is None
        assert r["values"]["steps.mix.params.alpha"] == alpha
        assert r["hashes"]["sha256"] == hash_file(path, tensor_hash=False).sha256
        assert r["run"]["n_merged"] > 0 and r["run"]["steps"][0]["params"]["alpha"] == alpha
        with safe_open(str(path), "pt") as f, safe_open(str(models["sd1"]), "pt") as a, \
                safe_open(str(models["sd1_b"]), "pt") as b:
            want = ((1 - alpha) * a.get_tensor(key).float()
                    + alpha * b.get_tensor(key).float()).half()
            assert torch.equal(f.get_tensor(key), want)
    for index in (1, 3):
        r = records[index]
        assert r["status"] == "failed" and not (out / r["output"]).exists()
        assert "bad.safetensors: truncated" in r["error"] and "\n" not in r["error"]
    md = (out / "table.md").read_text().splitlines()
    assert md[2] == "| cell | alpha | b | status | seconds | sha256 | output | error |"
    assert md[4].startswith("| 0 | 0.25 | sd1_b | ok | ")
    assert f"| {records[0]['hashes']['sha256'][:12]} | cell00_alpha-0.25_b-sd1_b" in md[4]
    assert md[5].startswith("| 1 | 0.25 | bad | failed | - | - | - | ")
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    assert rows[2]["sha256"] == records[2]["hashes"]["sha256"]
    assert "truncated" in rows[3]["error"] and rows[3]["sha256"] == ""
    assert not (out / "contact_sheet.png").exists()  # nothing rendered


def test_resume_redoes_nothing_that_finished(serial_sweep: Any, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(serial_sweep.out_dir.parent, root)
    spec = load_sweep(root / "sweep.yaml")
    first = Counting()
    again = run_sweep(spec, root / "out", executor=first, resume=True)
    assert first.ran == [] and again.n_resumed == 2 and again.exit_code == 1
    assert [r["sha256"] for r in again.rows()] == [r["sha256"] for r in serial_sweep.rows()]
    # an output that is not this cell's (it carries another alpha) is redone
    shutil.copyfile(root / "out" / "cell00_alpha-0.25_b-sd1_b.safetensors",
                    root / "out" / "cell02_alpha-0.75_b-sd1_b.safetensors")
    second = Counting()
    resumed = run_sweep(spec, root / "out", executor=second, resume=True)
    assert second.ran == ["cell02_alpha-0.75_b-sd1_b"] and resumed.n_resumed == 1
    assert [r["sha256"] for r in resumed.rows()] == [r["sha256"] for r in serial_sweep.rows()]
    with pytest.raises(Exception, match="holds a sweep already; pass --resume"):
        run_sweep(spec, root / "out")


# --- verify and the contact sheet -----------------------------------------------------


def test_verified_sweep_and_its_contact_sheet(models: dict[str, Path], tmp_path: Path
                                              ) -> None:
    import numpy as np
    from PIL import Image

    from modelkit.sweep import results
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    tok = write_synthetic_tokenizer(tmp_path / "tok")
    spec = parse_sweep(_inline(models, "  steps.mix.params.alpha: [0.0]\n"
                                       "  output.dtype: [fp16]")
                       + f"verify: {{seeds: [1], tokenizer: {tok}}}\n", "s.yaml", tmp_path)
    report = run_sweep(spec, tmp_path / "out")
    assert report.exit_code == 0 and report.verified
    verify = report.records[0]["verify"]
    # alpha 0 writes A itself (fp16 in, fp16 out): renders identical to the reference
    assert verify["metrics"] == {"psnr": "inf", "ssim": 1.0, "latent": 0.0}
    assert verify["passed"] and verify["reference"] == "sd1.safetensors"
    assert len(verify["cases"]) == 2 and verify["settings"]["seeds"] == [1]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| cell | alpha | dtype | status | verdict | psnr | ssim | latent |" in md
    assert "| 0 | 0 | fp16 | ok | pass | inf | 1.0000 | 0 |" in md
    out = tmp_path / "out"
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    ref = np.asarray(Image.open(out / verify["images"]["reference"][0]).convert("RGB"))
    cand = np.asarray(Image.open(out / verify["images"]["candidate"][0]).convert("RGB"))
    assert np.array_equal(ref, cand)
    scale = results.TILE_MIN // ref.shape[0]
    tile = ref.repeat(scale, 0).repeat(scale, 1)
    y0, x_ref = 2 * results.LINE_H + results.PAD, results.LABEL_W + results.PAD
    x_cell = x_ref + tile.shape[1] + results.PAD
    h, w = tile.shape[:2]
    # one row (alpha), the reference column, then one column (dtype)
    assert sheet.shape[:2] == (y0 + h + results.TILE_LINES * results.LINE_H
                               + 3 * results.PAD, x_cell + w + results.PAD)
    assert np.array_equal(sheet[y0:y0 + h, x_ref:x_ref + w], tile)
    assert np.array_equal(sheet[y0:y0 + h, x_cell:x_cell + w], tile)


def test_contact_sheet_layout_from_records(tmp_path: Path) -> None:
    """Rows from the first axis, columns from the second, failed cells as
    their error; images taken from the records' render paths."""
    import numpy as np
    from PIL import Image

    from modelkit.sweep import results
    from modelkit.sweep.spec import Axis

    axes = [Axis(("steps", "m", "params", "alpha"), (0.1, 0.2), "alpha"),
            Axis(("inputs", "b"), ("x", "y"), "b")]
    cells, records = [], {}
    for i, (alpha, b) in enumerate([("0.1", "x"), ("0.1", "y"), ("0.2", "x"), ("0.2", "y")]):
        labels = {"alpha": alpha, "b": b}
        cells.append((i, labels))
        (tmp_path / f"c{i}.png").parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (40 * i, 200, 10)).save(tmp_path / f"c{i}.png")
        images = {"candidate": [f"c{i}.png"], "reference": []}
        records[i] = {"index": i, "labels": labels, "status": "ok",
                      "verify": {"verdict": "pass", "images": images,
                                 "metrics": {"psnr": 20.0, "ssim": 0.5, "latent": 0.1}}}
    records[3] = {"index": 3, "labels": cells[3][1], "status": "failed",
                  "error": "b.safetensors: truncated"}
    sheet = np.asarray(results.contact_sheet("t", axes, "product", cells, records, tmp_path))
    tile, pad, y0, x0 = results.TILE_MIN, results.PAD, 2 * results.LINE_H + results.PAD, \
        results.LABEL_W + results.PAD
    row_h = tile + results.TILE_LINES * results.LINE_H + 2 * pad
    assert sheet.shape[:2] == (y0 + 2 * row_h + pad, x0 + 2 * (tile + pad))
    for i, (row, col) in enumerate([(0, 0), (0, 1), (1, 0)]):
        y, x = y0 + row * row_h, x0 + col * (tile + pad)
        assert (sheet[y + 5, x + 5] == (40 * i, 200, 10)).all()
    y, x = y0 + row_h, x0 + tile + pad  # the failed cell: dark red with its error
    assert (sheet[y + tile - 3, x + tile - 3] == results.FAILED).all()


# --- cancel ---------------------------------------------------------------------------


def test_ctrl_c_cancels_through_the_cli(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the second cell writes: it stops at its next tensor and
    leaves no temp file, later cells never start, the finished cell and the
    partial table stay, exit code 130."""
    import modelkit.engine.runner as runner

    sweep = write_sweep(tmp_path, models, alphas=(0.25, 0.5, 0.75), with_bad=False)
    real_run = runner.run
    sent = threading.Event()

    def run(recipe: Any, **kw: Any) -> Any:
        outer = kw.get("progress")

        def progress(p: Any) -> None:
            if p.phase == "write" and "alpha-0.5" in str(kw.get("output")) \
                    and not sent.is_set():
                sent.set()
                os.kill(os.getpid(), signal.SIGINT)
            if outer is not None:
                outer(p)
        return real_run(recipe, **{**kw, "progress": progress})

    monkeypatch.setattr(runner, "run", run)
    out = tmp_path / "out"
    code = main(["sweep", str(sweep), "-o", str(out), "--jobs", "1", "--json", "-q"])
    assert code == 130 and sent.is_set()
    data = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in data["rows"]] == ["ok", "cancelled", "not run"]
    assert data["cancelled"] is True and data["n_ok"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        ".modelkit-sweep", "cell00_alpha-0.25_b-sd1_b.safetensors", "sweep.jsonl",
        "table.csv", "table.md"]
    assert "| 2 | 0.75 | sd1_b | not run |" in (out / "table.md").read_text()
    assert [r["status"] for r in read_records(out / "sweep.jsonl")] == ["ok", "cancelled"]


def test_cancel_while_verifying_removes_the_unverified_output(models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A cancel that lands after the cell's file is written but before it is
    verified: the file is this sweep's partial output, so it goes, and the
    row says so (no hash of a file that is not there)."""
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    tok = write_synthetic_tokenizer(tmp_path / "tok")
    spec = parse_sweep(_inline(models, "  steps.mix.params.alpha: [0.5]")
                       + f"verify: {{seeds: [1], tokenizer: {tok}}}\n", "s.yaml", tmp_path)
    cancel = threading.Event()
    phases: list[str] = []

    def progress(p: Any) -> None:
        phases.append(p.phase)
        if p.phase == "verify":
            cancel.set()

    report = run_sweep(spec, tmp_path / "out", progress=progress, cancel=cancel)
    assert "write" in phases and report.exit_code == 130
    (record,) = report.records.values()
    assert record["status"] == "cancelled" and record["hashes"] is None
    assert record["error"] == "cancelled while verifying; its unverified output was removed"
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_the_printed_table_escapes_file_names(models: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An axis value's file name with a terminal escape reaches the table
    (its label) but the terminal only sees it escaped."""
    odd = tmp_path / "=b|\x1b]0;owned\x07.safetensors"
    os.link(models["sd1_b"], odd)
    sweep = tmp_path / "s.yaml"
    quoted = str(odd).replace("\x1b", "\\x1b").replace("\x07", "\\x07")  # YAML escapes
    sweep.write_text(_inline(models, f'  inputs.b: ["{quoted}"]'))
    code = main(["sweep", str(sweep), "-o", str(tmp_path / "out"), "--jobs", "1", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "| ok |" in out
    assert "\x1b" not in out and "\\x1b]0;owned\\x07" in out
    # the files too: markdown escapes | as well, CSV keeps a formula from running
    table = (tmp_path / "out" / "table.md").read_text()
    assert "\x1b" not in table and "| =b\\|\\x1b]0;owned\\x07 |" in table
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["b"] == "'=b|\\x1b]0;owned\\x07" and rows[0]["status"] == "ok"


def test_ray_is_imported_only_on_the_ray_path() -> None:
    code = ("import sys\nfrom modelkit.cli import main\nassert main(['sweep', '--help']) == 0\n"
            "from modelkit.sweep import make_executor\n"
            "assert make_executor(2).name == 'pool' and make_executor(1).name == 'serial'\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- a disk that refuses writes -------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing_that_blocks_the_rerun(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from modelkit.errors import OutputError
    from modelkit.sweep import results

    sweep = write_sweep(tmp_path, models, alphas=(0.5,))  # its bad cell is recorded first
    out = tmp_path / "out"
    real_append = results.append_record
    calls: list[int] = []

    def full_after(n: int) -> Any:
        def append(*args: Any) -> None:
            calls.append(1)
            if len(calls) > n:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_append(*args)
        return append

    monkeypatch.setattr(results, "append_record", full_after(0))
    with pytest.raises(OutputError, match=r"cannot write to .*out: no space left on device; "
                                          r"nothing was kept"):
        run_sweep(load_sweep(sweep), out, executor=SerialExecutor())
    assert not out.exists()  # no marker, no output: the rerun is not refused
    # a cell that finished before the disk filled up is kept for --resume
    good = load_sweep(write_sweep(tmp_path, models, alphas=(0.25, 0.75), with_bad=False))
    calls.clear()
    monkeypatch.setattr(results, "append_record", full_after(1))
    with pytest.raises(OutputError, match="finished cells are kept; free space and --resume"):
        run_sweep(good, out, executor=SerialExecutor())
    monkeypatch.undo()
    again = run_sweep(good, out, executor=SerialExecutor(), resume=True)
    # both outputs were complete (the second one's record was what failed)
    assert again.n_resumed == 2 and again.exit_code == 0
    shutil.rmtree(out)

    real_write_text = Path.write_text

    def read_only(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == ".modelkit-sweep":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    out.mkdir()
    code = main(["sweep", str(sweep), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"modelkit: error: cannot write to {out}: read-only file "
                                 "system; nothing was kept; free space or pick another -o "
                                 "and run it again"]
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    assert run_sweep(load_sweep(sweep), out, executor=SerialExecutor()).exit_code == 0


def test_the_dry_run_refuses_the_folder_the_run_refuses(models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, models, alphas=(0.5,), with_bad=False)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    from test_cli_exit_codes import _console_entry  # the console script's function

    runs = _console_entry({"dry": ["sweep", str(sweep), "-o", str(out), "--dry-run"],
                           "run": ["sweep", str(sweep), "-o", str(out)]}, tmp_path)
    for code, stdout, stderr in runs.values():
        assert code == 2 and stdout == ""
        assert stderr == (f"modelkit: error: {out}: folder is not empty and holds no sweep; "
                          "pick an empty or new folder\n")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
