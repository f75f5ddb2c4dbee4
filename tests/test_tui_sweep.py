"""A sweep started from the Act form, driven headless with Pilot on two tiny
UNet-only checkpoints (one cell after another in the test process): cancel, the whole
table checked against sweep.jsonl and the merged tensors, and bad values
shown as the CLI's one line; plus the form's sweep logic directly."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static
from tui_support import open_act, settle

from modelkit.cli import main
from modelkit.core.recipe import Recipe
from modelkit.sweep import SweepError, run_sweep
from modelkit.sweep.results import read_records
from modelkit.sweep.spec import parse_axes
from modelkit.textsafe import shown
from modelkit.tui.app import make_app
from modelkit.tui.recipes import ActSpec
from modelkit.tui.screens.act import ActScreen
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.screens.sweep import SweepScreen
from modelkit.tui.sweeps import default_sweep_dir, is_sweep_file, sweep_spec
from modelkit.tui.widgets.model_table import ModelTable

UNETS = ("u1.safetensors", "u2.safetensors")
SWEEP_DIR = "u1-u2-weighted_sum-sweep"
KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny SD1 checkpoints holding only their UNet (the cheapest files
    a merge takes), indexed in ``../index.sqlite``."""
    from modelkit.library.scan import scan
    from modelkit.testing import write_checkpoint

    root = tmp_path_factory.mktemp("tui-sweep") / "lib"
    (root / "unet").mkdir(parents=True)
    for seed, name in enumerate(UNETS, 1):
        write_checkpoint(root / "unet" / name, "sd1", seed=seed, components=["unet"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELKIT_CACHE_DIR", str(root.parent / "cache"))
        scan([root], root.parent / "index.sqlite")
    return root


@pytest.fixture(autouse=True)
def _cache(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(library.parent / "cache"))


async def _open_act(pilot: Pilot[Any]) -> ActScreen:
    """Mark both UNets (A, B) and press a: a weighted_sum merge."""
    return await open_act(pilot, *UNETS)


def _shown_rows(screen: SweepScreen) -> list[list[str]]:
    table = screen.query_one(DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def _pause_cell_2(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold cell 2 in its write phase until ``proceed`` is set; returns
    (writing, proceed)."""
    import modelkit.engine.runner as runner

    real_run = runner.run
    writing, proceed = threading.Event(), threading.Event()

    def run(recipe: Any, **kw: Any) -> Any:
        outer = kw.get("progress")  # None when a cell is planned

        def progress(p: Any) -> None:
            if outer is not None:
                outer(p)
            if p.phase == "write" and "cell02" in str(kw.get("output")) \
                    and 0 < p.done < p.total and not writing.is_set():
                writing.set()
                proceed.wait(30)
        return real_run(recipe, **{**kw, "progress": progress})

    monkeypatch.setattr(runner, "run", run)
    return writing, proceed


def _bad_sweep_file(folder: Path, tmp_path: Path) -> Path:
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(f"""version: 1
recipe:
  version: 1
  inputs: {{a: {folder / UNETS[0]}, b: {folder / UNETS[1]}}}
  steps: {{mix: {{method: weighted_sum, models: [a, b], params: {{alpha: 0.5}}}}}}
axes: {{steps.mix.params.alpha: [0.5, lots]}}
""")
    return sweep_file


@pytest.mark.asyncio
async def test_sweep_from_the_act_form_a_bad_value_then_the_table_and_cancel(
        library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value: the CLI's line, nothing written. Then three alphas:
    cells 0 and 1 are written and shown as sweep.jsonl has them, cancel
    while cell 2 writes leaves no temp file and the partial table."""
    from safetensors.torch import load_file

    folder = library / "unet"
    sweep_file = _bad_sweep_file(folder, tmp_path)
    assert main(["sweep", str(sweep_file), "-o", str(tmp_path / "cli")]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert cli_line.startswith(f"modelkit: error: {sweep_file}: axes.steps.mix.params.alpha: "
                               "value 'lots' (cell 1): unknown block preset 'lots'")
    writing, proceed = _pause_cell_2(monkeypatch)
    async with make_app(db=str(library.parent / "index.sqlite"),
                        images=False).run_test(size=(80, 24)) as pilot:
        act = await _open_act(pilot)
        out = library / "sweeps" / SWEEP_DIR  # beside unet/, never inside a model folder
        assert act.query_one("#act-sweep-dir", Input).value == str(out)
        sweep = act.query_one("#act-sweep", Input)
        assert sweep.placeholder == "axes, e.g. alpha = 0.3, 0.5; or a sweep .yaml file"
        sweep.value = str(sweep_file)
        await pilot.press("ctrl+s")
        await settle(pilot)
        dialog = pilot.app.screen
        assert isinstance(dialog, ErrorDialog) and dialog.message == cli_line
        await pilot.press("escape")
        assert pilot.app.screen is act
        assert sorted(p.name for p in folder.iterdir()) == list(UNETS)
        assert not out.parent.exists()  # not even the folder
        sweep.value = "alpha = 0.25, 0.75, 0.5"
        await pilot.press("ctrl+s")
        assert await asyncio.to_thread(writing.wait, 30)
        screen = pilot.app.screen
        assert isinstance(screen, SweepScreen)
        assert "(x or escape cancels)" in str(screen.query_one("#sweep-bar #status",
                                                                 Static).content)
        await pilot.press("x")  # while it runs, x (or escape) cancels
        proceed.set()
        await settle(pilot)
        assert screen.report.cancelled and pilot.app.screen is screen
        records = read_records(out / "sweep.jsonl")
        assert [str(c.label) for c in screen.query_one(DataTable).ordered_columns] == [
            "cell", "alpha", "status", "seconds", "error", "sha256"]
        assert _shown_rows(screen) == [
            [str(r["index"]), r["labels"]["alpha"], r["status"],
             f"{r['timings']['total']:.1f}", shown(r["error"], 24) if r["error"] else "-",
             r["hashes"]["sha256"][:12] if r["hashes"] else "-"] for r in records]
        assert records[2]["error"].startswith("cancelled") and not records[2]["hashes"]
        assert [(r["values"]["steps.merge.params.alpha"], r["status"]) for r in records] == [
            (0.25, "ok"), (0.75, "ok"), (0.5, "cancelled")]
        assert screen.query_one("#sweep-cell", Static).content.plain == \
            f"cell 0 (alpha=0.25): ok: {records[0]['output']}"
        files = screen.query_one("#sweep-files", Static).content.plain
        assert files.startswith("CANCELLED: 3 cells: 2 ok, 1 not run (serial, ")
        assert f"table: {out / 'table.md'}" in files
        assert "no contact sheet: nothing was rendered" in files
        assert sorted(p.name for p in out.iterdir()) == [  # no temp file
            ".modelkit-sweep", records[0]["output"], records[1]["output"], "sweep.jsonl",
            "table.csv", "table.md"]
        assert "| 2 | 0.5 | cancelled |" in (out / "table.md").read_text()
        await pilot.press("escape")  # back to the form: the folder moved on
        assert pilot.app.screen is act
        assert act.query_one("#act-sweep-dir", Input).value == str(out.with_name(
            f"{SWEEP_DIR}-2"))
        await pilot.press("escape")  # the library: a re-scan does not list the cells
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        table = pilot.app.screen.query_one(ModelTable)
        assert sorted(e.name for e in table.entries) == list(UNETS)
        assert pilot.app.screen.last_result == ("scanned 2: 0 new, 0 changed, 0 removed, 0 "
                                                "broken, 1 sweep folder skipped")
    a, b = (load_file(folder / n)[KEY].float() for n in UNETS)
    for r in records[:2]:
        alpha = r["values"]["steps.merge.params.alpha"]
        assert load_file(out / r["output"])[KEY].equal(((1 - alpha) * a + alpha * b).half())


def test_axes_in_a_field_and_the_form_sweep(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    recipe = Recipe.merge(a, b, method="weighted_sum", output="x.safetensors", alpha=0.3)
    assert parse_axes("alpha = 0.3, 1e-1, in_only; b = c.safetensors\n"
                      "dtype = fp16, bf16; steps.merge.params.alpha_blocks = {preset: x}, "
                      "[0, 1]", recipe) == {
        "steps.merge.params.alpha": [0.3, 0.1, "in_only"], "inputs.b": ["c.safetensors"],
        "output.dtype": ["fp16", "bf16"],
        "steps.merge.params.alpha_blocks": [{"preset": "x"}, [0, 1]]}
    for bad, problem in [("alpha = ", "write NAME = VALUE"), ("alpha = [", "not readable"),
                         (" ; ", "give the axes"), ("a = x; a = y", "given twice")]:
        with pytest.raises(SweepError, match=problem):
            parse_axes(bad, recipe)
    act = ActSpec("merge", (a, b), "", {"alpha": 0.3}, "weighted_sum")
    assert default_sweep_dir(act) == tmp_path / "sweeps/a-b-weighted_sum-sweep"
    (tmp_path / "sweeps/a-b-weighted_sum-sweep").mkdir(parents=True)
    assert default_sweep_dir(act) == tmp_path / "sweeps/a-b-weighted_sum-sweep-2"
    webui = ActSpec("merge", ("/w/webui/models/Stable-diffusion/x/a.safetensors", b), "",
                    {}, "add_difference")
    assert default_sweep_dir(webui, "/w") == Path("/w/webui/sweeps/a-b-add_difference-sweep")
    assert is_sweep_file("s.yaml") and not is_sweep_file("b = x.yaml")
    with pytest.raises(SweepError, match="no such sweep file"):
        sweep_spec(act, "missing.yaml")
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").touch()
    spec = sweep_spec(act, "alpha = 0.25, 0.75", verify="static")
    assert spec.source == "act form" and spec.verify == {"render": False}
    assert [c.recipe["steps"]["merge"]["params"]["alpha"] for c in spec.cells()] == [0.25,
                                                                                     0.75]
    assert spec.cells()[0].recipe["inputs"]["b"]["path"] == b
    with pytest.raises(SweepError) as info:
        sweep_spec(act, "alpha 0.5")
    assert str(info.value) == "act form: 'alpha 0.5': write NAME = VALUE, VALUE (e.g. alpha " \
                              "= 0.3, 0.5)"


def test_a_bad_value_typed_in_the_form_names_its_axis(library: Path, tmp_path: Path) -> None:
    folder = library / "unet"
    act = ActSpec("merge", tuple(str(folder / n) for n in UNETS), "", {"alpha": 0.3},
                  "weighted_sum")
    with pytest.raises(SweepError) as info:
        run_sweep(sweep_spec(act, "alpha = 0.5, lots"), tmp_path / "sweeps/out")
    assert str(info.value) == ("act form: axes.steps.merge.params.alpha: value 'lots' (cell 1): "
                               "unknown block preset 'lots'; see 'modelkit presets'")
    assert not (tmp_path / "sweeps").exists()  # nor the parent made for it
