"""The Act screen driven headless with Pilot: a merge written from the TUI,
cancel, fields generated from the registry, errors, and a snapshot; plus the
form's plain logic (modelkit.tui.recipes) directly."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from library_fixture import link, with_metadata
from textual.pilot import Pilot
from textual.widgets import Input, Select, Static, Switch
from tui_support import open_act, settle

from modelkit.core.registry import all_transforms
from modelkit.library.query import Entry
from modelkit.progress import WRITE, Progress
from modelkit.tui import jobs
from modelkit.tui.app import make_app
from modelkit.tui.recipes import (
    ActSpec,
    actions,
    arrange,
    build_recipe,
    default_output,
    inputs_line,
)
from modelkit.tui.screens.act import ActScreen
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.screens.library import LibraryScreen
from modelkit.tui.widgets.model_table import ModelTable
from modelkit.tui.widgets.param_form import ParamForm


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """Three SD1 checkpoints as in the fixture library (tests/library_fixture.py;
    built here from the session's models, not the whole hashed library) in a
    folder of their own (Act writes beside its inputs), indexed in
    ``../index.sqlite``."""
    from modelkit.library.scan import scan

    root = tmp_path_factory.mktemp("act") / "lib"
    folder = root / "Stable-diffusion"
    sd15 = link(models["sd1"], folder / "sd15.safetensors")
    link(models["sd1_b"], folder / "sd15-b.safetensors")
    with_metadata(sd15, folder / "sd15-renamed.safetensors", {"note": "same tensors"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELKIT_CACHE_DIR", str(root.parent / "cache"))
        scan([root], root.parent / "index.sqlite")
    return root


@pytest.fixture(autouse=True)
def _cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "library" in request.fixturenames:
        library = request.getfixturevalue("library")
        monkeypatch.setenv("MODELKIT_CACHE_DIR", str(library.parent / "cache"))


def _app(root: Path) -> Any:
    return make_app(db=str(root.parent / "index.sqlite"), images=False)


async def _open_act(pilot: Pilot[Any], *names: str) -> ActScreen:
    """Mark the files ``names`` in this order (A, B, C) and press a."""
    return await open_act(pilot, *names)


def _text(screen: Any, selector: str) -> str:
    return screen.query_one(selector, Static).content.plain  # type: ignore[no-any-return]


async def _choose(pilot: Pilot[Any], selector: str, value: str) -> None:
    pilot.app.screen.query_one(selector, Select).value = value
    await pilot.pause()  # the fields are recomposed; no worker starts


def _pause_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make an Act run wait in its first write progress event until the
    screen's cancel event is set, while the event returned is clear (it is
    set when a run waits: clear it to hold the next run)."""
    writing = threading.Event()
    forward_to = jobs.throttled

    def pausing(node: Any, job: str) -> Any:
        forward = forward_to(node, job)

        def progress(p: Progress) -> None:
            forward(p)
            if job == "act" and p.phase == WRITE and 0 < p.done < p.total \
                    and not writing.is_set():
                writing.set()
                node.cancel_event.wait(30)  # hold the run until the cancel key

        return progress

    monkeypatch.setattr(jobs, "throttled", pausing)
    return writing


@pytest.mark.asyncio
async def test_merge_from_the_tui_cancel_leaves_nothing_then_a_verified_run_writes_it(
        library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from modelkit.inspect.report import inspect_model

    folder = library / "Stable-diffusion"
    out = folder / "sd15-sd15-b-weighted_sum.safetensors"
    writing = _pause_writes(monkeypatch)
    async with _app(library).run_test(size=(80, 24)) as pilot:
        screen = await _open_act(pilot, "sd15.safetensors", "sd15-b.safetensors")
        assert screen.query_one(ParamForm).names == ["alpha"]
        assert screen.query_one("#act-output", Input).value == str(out)
        plan = _text(screen, "#act-plan")  # planned as soon as the form is ready
        assert plan.startswith(f"would write {out.name}  (sd1, safetensors)\n"
                               "1143 tensors: 1130 merged, 13 copied, 0 skipped\n")
        # cancel mid-run: no output, no temp file
        before = sorted(folder.iterdir())
        await pilot.press("ctrl+r")
        assert await asyncio.to_thread(writing.wait, 30)
        assert screen.job == "act"
        await pilot.press("escape")  # while running, escape cancels
        await settle(pilot)
        assert isinstance(pilot.app.screen, ActScreen) and screen.report is None
        assert sorted(folder.iterdir()) == before
        assert "cancelled: no file was written" in \
            str(screen.query_one("#act-bar #status", Static).content)
        # the whole run, with another alpha, verified by the static checks
        screen.query_one("#param-alpha", Input).value = "0.25"
        screen.query_one("#act-verify", Select).value = "static"
        await pilot.press("ctrl+r")
        await settle(pilot)
        report = screen.report
        assert report.output == out and not report.dry_run
        assert report.verify.verdict == "pass" and report.verify.renders is None
        shown = _text(screen, "#act-plan")
        assert f"wrote {out.name}  (sd1, safetensors)" in shown
        assert f"verify: {report.verify.summary()}\nno grid: nothing was rendered" in shown
        # the default name moved on; the written one is refused as the CLI does
        output = screen.query_one("#act-output", Input)
        assert output.value == str(out.with_stem(f"{out.stem}-2"))
        output.value = out.name
        await pilot.press("ctrl+r")
        await settle(pilot)
        dialog = pilot.app.screen
        assert isinstance(dialog, ErrorDialog)
        assert dialog.message.startswith(f"modelkit: error: {out}: already exists")
        await pilot.press("escape")
        # the refused file was there before: not "written, not verified"
        assert _text(screen, "#act-plan") == f"run failed: no file was written\n{dialog.message}"
        # x cancels too (as ? help says), and the pane drops the earlier "wrote ..."
        output.value = str(out.with_stem(f"{out.stem}-2"))
        writing.clear()
        await pilot.press("ctrl+r")
        assert await asyncio.to_thread(writing.wait, 30)
        await pilot.press("x")
        await settle(pilot)
        assert _text(screen, "#act-plan") == "run cancelled, nothing written"
        assert "cancelled: no file was written" in \
            str(screen.query_one("#act-bar #status", Static).content)
        assert not out.with_stem(f"{out.stem}-2").exists() and screen.job is None
        inspected = inspect_model(out)
        assert (inspected.kind, inspected.arch, inspected.n_tensors) == ("checkpoint", "sd1",
                                                                         1143)  # as planned
        assert report.n_merged == 1130
        key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        a, b, merged = (_tensor(folder / f"{n}.safetensors", key)
                        for n in ("sd15", "sd15-b", out.stem))
        assert torch.equal(merged, (0.75 * a.float() + 0.25 * b.float()).half())
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(pilot.app.screen, LibraryScreen)
        table = pilot.app.screen.query_one(ModelTable)
        assert table.selected is not None and table.selected.path == str(out)
        assert (table.selected.kind, table.selected.arch) == ("checkpoint", "sd1")


def _tensor(path: Path, key: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


def _choices(screen: Any, selector: str) -> list[str]:
    return [v for _, v in screen.query_one(selector, Select)._options]


@pytest.mark.asyncio
async def test_fields_come_from_the_registry_and_bad_values_show_the_cli_error(
        library: Path) -> None:
    registry = all_transforms()
    folder = library / "Stable-diffusion"
    before = sorted(folder.iterdir())
    async with _app(library).run_test(size=(80, 24)) as pilot:
        screen = await _open_act(pilot, "sd15.safetensors", "sd15-b.safetensors",
                                 "sd15-renamed.safetensors")
        form = screen.query_one(ParamForm)
        assert _choices(screen, "#act-method") == [
            n for n, t in registry.items() if t.kind == "method" and t.accepts(3)]
        assert screen.query_one("#act-method", Select).value == "add_difference"
        await _choose(pilot, "#act-method", "triple_sum")
        assert form.names == ["alpha", "beta"]
        await _choose(pilot, "#act-method", "ties")
        assert form.names == list(registry["ties"].params)
        assert isinstance(screen.query_one("#param-vote_sgn"), Switch)
        assert _choices(screen, "#param-trim") == list(registry["ties"].params["trim"].choices)
        await _choose(pilot, "#act-method", "triple_sum")
        screen.query_one("#param-beta", Input).value = "lots"
        await pilot.press("ctrl+r")
        dialog = pilot.app.screen
        assert isinstance(dialog, ErrorDialog)
        assert dialog.message == ("modelkit: error: unknown block preset 'lots'; see "
                                  "'modelkit presets'")
        await pilot.press("escape", "escape")  # the dialog, then back to the library
        # one checkpoint: prune, quantize (with fp8 and int8), extract...
        screen = await _open_act(pilot, "sd15-b.safetensors")
        assert _choices(screen, "#act-action")[:3] == ["prune", "quantize", "extract"]
        await _choose(pilot, "#act-action", "quantize")
        assert _choices(screen, "#param-dtype") == list(registry["quantize"].params[
            "dtype"].choices)
        assert {"fp8_e4m3fn", "int8"} <= set(_choices(screen, "#param-dtype"))
        await _choose(pilot, "#param-dtype", "fp8_e4m3fn")
        assert screen.query_one("#act-output", Input).value == str(
            folder / "sd15-b-fp8_e4m3fn.safetensors")
        output = screen.query_one("#act-output", Input)
        output.value = str(folder / ("a-long-file-name-" * 6 + "fp8.safetensors"))
        for size in ((80, 24), (160, 45)):  # long paths show their file name
            await pilot.resize_terminal(*size)
            await settle(pilot)
            for field in screen.query("#act-output, #act-sweep-dir").results(Input):
                assert field.region.right <= screen.query_one("#act-form").region.right - 1
                assert field.scroll_offset.x == field.max_scroll_x
            assert output.max_scroll_x > 0  # the value is longer than the field
        assert screen.query_one("#act-output").size.width == 54  # 45% of 160, less labels
    assert sorted(folder.iterdir()) == before


# --- the form's logic, without the app ------------------------------------------------


def _entry(path: str, kind: str) -> Entry:
    return Entry(path, Path(path).name, str(Path(path).parent), "/", 1, 0, kind, "sd1",
                 None, None, "F16", "plain", None, "", 1, 1, False, None, 1, None, None,
                 None, None, (), 0.0)


def test_a_bake_takes_the_checkpoint_first_whatever_was_marked_first(tmp_path: Path
                                                                     ) -> None:
    lora, ckpt = _entry("/m/style.safetensors", "lora"), _entry("/m/a.safetensors",
                                                                "checkpoint")
    registry = all_transforms()
    assert arrange(registry["lora_bake"], [lora, ckpt]) == [ckpt, lora]
    assert actions(registry, [lora, ckpt])[0] == "lora_bake"
    assert "merge" not in actions(registry, [lora, ckpt])
    assert actions(registry, [lora])[-1] == "convert"  # after the adapter operations
    assert inputs_line(registry["lora_bake"], [ckpt, lora]) == \
        "checkpoint: a.safetensors  adapters: style.safetensors"
    assert arrange(registry["weighted_sum"], [lora, ckpt]) is None
    recipe = build_recipe(ActSpec("lora_bake", (ckpt.path, lora.path), "baked.safetensors",
                                  {"weights": [0.5], "blocks": "INS"}))
    assert recipe.output_path == "/m/baked.safetensors"
    assert recipe.steps["lora_bake"].params["weights"] == [0.5]
    (tmp_path / "a-pruned.safetensors").touch()
    assert default_output("prune", [str(tmp_path / "a.safetensors")], {}) == \
        tmp_path / "a-pruned-2.safetensors"


# --- snapshot ----------------------------------------------------------------------


def test_snapshot_act_lora_bake_80x24(snap_compare: Any, snapshot_library: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(snapshot_library.parent / "cache"))

    async def run_before(pilot: Pilot[Any]) -> None:
        await _open_act(pilot, "detail.safetensors", "sd15-anime.safetensors")
        await pilot.press("tab", *"0.8")  # the LoRA's weight: a field of lora_bake's

    assert snap_compare(make_app(db=str(snapshot_library), images=False),
                        terminal_size=(80, 24), run_before=run_before)


# --- block weights per family ------------------------------------------------------


@pytest.mark.asyncio
async def test_block_fields_offer_the_selected_familys_presets_and_block_names(
        tmp_path: Path) -> None:
    from dataclasses import replace

    from textual.app import App

    from modelkit.arch import registry
    from modelkit.testing import write_sparse_wan
    from modelkit.tui.recipes import block_arch, block_hints

    paths = [write_sparse_wan(tmp_path / f"wan-{n}.safetensors", tiny=True) for n in "ab"]
    entries = [replace(_entry(str(p), "unet"), arch="wan") for p in paths]  # a transformer file
    names = registry.get("wan").blocks.names  # type: ignore[union-attr]

    class Host(App[None]):
        def on_mount(self) -> None:
            self.push_screen(ActScreen(entries))

    async with Host().run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, ActScreen)
        assert screen.query_one("#act-method", Select).value == "weighted_sum"
        form = screen.query_one(ParamForm)
        assert form.hints.arch == "wan"
        alpha = screen.query_one("#param-alpha", Input)
        assert f"{names[-2]}=0.5,default=1" in alpha.placeholder
        assert "gradient_v" not in alpha.placeholder  # an SD preset
        # completes Wan's presets and block names, not SD's
        alpha.focus()
        for typed, completed in (("blocks_o", "blocks_only"), ("time_p", "time_projection")):
            alpha.value = ""
            await pilot.press(*typed)
            await pilot.pause()
            await pilot.press("right")
            assert alpha.value == completed
        alpha.value = "in_o"  # SD's in_only is not offered
        await pilot.press("right")
        assert alpha.value == "in_o"
        # the completed preset plans: Wan's blocks_only takes the blocks at 1
        alpha.value = "blocks_only"
        await pilot.press("ctrl+p")
        await settle(pilot)
        plan = _text(screen, "#act-plan")
        assert plan.startswith("would write wan-a-wan-b-weighted_sum.safetensors  (wan,"), plan
    # the plain logic: a bake's checkpoint decides; no family with blocks: SD1's lists
    lora = replace(_entry("/m/l.safetensors", "lora"), arch="wan")
    assert block_arch([lora, entries[0]]) == "wan"
    assert block_hints(None).lora[:3] == ("NONE", "ALL", "INS")
    flux = block_hints("flux")
    assert "double_only" in flux.merge and "double_blocks.0" in flux.lora
    assert "gradient_v" not in flux.merge and "INS" not in flux.lora
