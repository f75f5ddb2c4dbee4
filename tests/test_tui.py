"""The TUI driven headless with Textual's Pilot over the fixture library,
and snapshots at fixed sizes."""

from __future__ import annotations

import io
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from library_fixture import EXPECTED, link
from textual.pilot import Pilot
from textual.widgets import Static, Tree
from tui_support import settle

from modelkit.errors import Cancelled
from modelkit.library.query import Entry
from modelkit.tui import jobs, rows
from modelkit.tui.app import make_app
from modelkit.tui.messages import JobFailed, JobFinished, LibraryChanged
from modelkit.tui.rows import hint_cell
from modelkit.tui.screens.compare import CompareScreen
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.screens.help import HelpScreen
from modelkit.tui.screens.library import LibraryScreen
from modelkit.tui.widgets import model_table
from modelkit.tui.widgets.detail import DetailPane
from modelkit.tui.widgets.model_table import ModelTable


@pytest.fixture(autouse=True)
def _cache(model_library: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(model_library["cache"]))


def _table(pilot: Pilot[Any]) -> ModelTable:
    return pilot.app.screen.query_one(ModelTable)


def _text(pilot: Pilot[Any], selector: str) -> str:
    return pilot.app.screen.query_one(selector, Static).content.plain  # type: ignore[union-attr]


async def _filter(pilot: Pilot[Any], text: str) -> None:
    """Set the filter box's text as if typed."""
    pilot.app.screen.query_one("#filter").value = text
    await settle(pilot)


@pytest.fixture
def _one_torch_thread() -> Any:
    """Tiny tensors compare far faster on one thread on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.asyncio
async def test_table_lists_every_file_and_the_detail_pane_shows_metadata_lineage_preview(
        model_library: dict[str, Path]) -> None:
    root = model_library["root"]
    async with make_app(db=str(model_library["db"]), images=False).run_test(
            size=(160, 45)) as pilot:
        await settle(pilot)
        table = _table(pilot)
        shown = {str(Path(e.path).relative_to(root)): (e.kind, e.arch) for e in table.shown}
        assert shown == {k: v[:2] for k, v in EXPECTED.items()}
        assert table.row_count == len(EXPECTED)
        row = [str(c) for c in table.get_row(str(root / "webui/models/Lora/SD1.5/"
                                                      "xl-detail.safetensors"))]
        assert row[1:5] == ["xl-detail", "lora", "sdxl", "-"]
        assert row[-1] == "arch-folder +1"
        assert len(row[7]) == 10  # AutoV2 (the 160-column table is wide enough)
        # the detail pane (the same app: one start-up)
        await _filter(pilot, "merged-pruned")
        info = _text(pilot, "#info-text")
        assert "merged-pruned.safetensors" in info and "checkpoint (pix2pix)" in info
        assert "Merge recipe (modelkit.recipe)" in _text(pilot, "#metadata-text")
        await pilot.press("3")
        assert pilot.app.screen.query_one(DetailPane).active == "lineage"
        tree = pilot.app.screen.query_one("#lineage-tree", Tree)
        labels = [n.label.plain for n in _walk(tree.root)]
        assert labels[0].startswith("merged-pruned.safetensors  prune")
        assert labels[1].startswith("merged.safetensors  weighted_sum") and \
            "(in library)" in labels[1]
        assert [lbl.split()[0] for lbl in labels[2:]] == ["sd15.safetensors",
                                                          "sd15-b.safetensors"]
        await _filter(pilot, "style")
        meta = _text(pilot, "#metadata-text")
        assert "1girl (30), solo (12), outdoors (5)" in meta
        assert "evil\\x1b]0;pwned\\x07" in meta and "\x1b" not in meta
        assert "title        Style [bold]LoRA[/bold]" in meta  # shown, not parsed
        info = _text(pilot, "#info-text")
        assert "trigger words mystyle" in info and "rank         4" in info
        preview = _text(pilot, "#preview-text")
        assert preview.startswith("style.preview.png  8x12 PNG")


@pytest.mark.asyncio
@pytest.mark.usefixtures("_one_torch_thread")
async def test_compare_runs_in_a_worker_then_filtering_and_sorting(
        model_library: dict[str, Path]) -> None:
    root = model_library["root"] / "webui/models/Stable-diffusion"
    async with make_app(db=str(model_library["db"]), images=False).run_test(
            size=(80, 24)) as pilot:
        await settle(pilot)
        await _filter(pilot, "sd15 k:ckpt")
        await pilot.press("m", "down", "m", "c")  # sd15, then sd15-b
        assert isinstance(pilot.app.screen, CompareScreen)
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, CompareScreen)
        report = screen.report  # the compare module's own tests check its figures
        assert (report.a, report.b) == (str(root / "sd15.safetensors"),
                                        str(root / "sd15-b.safetensors"))
        assert report.overall.n_tensors == 1142 and 0.5 < report.overall.relative_l2 < 2
        assert set(report.components) == {"unet", "vae", "te", "other"}
        assert "IN00" in report.blocks and "OUT11" in report.blocks
        summary = _text(pilot, "#compare-summary")
        assert f"overall relative L2 {report.overall.relative_l2:.4f}" in summary
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, LibraryScreen)
        # filtering and sorting (the same app: one start-up)
        await _filter(pilot, "")
        await pilot.press("slash", *"detail", "enter")  # the box filters as you type
        await settle(pilot)
        table = _table(pilot)
        assert sorted(e.name for e in table.shown) == ["sdxl-detail.safetensors",
                                                       "xl-detail.safetensors"]
        assert table.has_focus  # enter returns to the table
        await _filter(pilot, "kind:lora arch:sdxl,sd1")
        assert sorted(e.name for e in table.shown) == [
            "sdxl-detail.safetensors", "style.safetensors", "xl-detail.safetensors"]
        await _filter(pilot, "sd15 k:ckpt")
        assert [e.name for e in table.shown] == [  # a name before its longer extensions
            "sd15.safetensors", "sd15-b.safetensors", "sd15-copy.safetensors",
            "sd15-renamed.safetensors"]
        await _filter(pilot, "has:hint")
        assert len(table.shown) == 5
        await _filter(pilot, "")
        table.focus()
        await pilot.press("s")  # name -> kind
        assert table.sort_column == "kind"
        kinds = [e.kind for e in table.shown]
        assert kinds == sorted(kinds)
        await pilot.press("S")
        assert [e.kind for e in table.shown] == sorted(kinds, reverse=True)
        # the hints column: its longest cell whole where the width allows it
        cells = [hint_cell(table.hints.get(e.path, ())) for e in table.shown]
        longest = max(len(c) for c in cells)
        assert "wrong-folder" in cells and longest > rows.WIDTHS["hints"]

        def widths() -> dict[str, int]:
            return {str(c.key.value): c.width for c in table.ordered_columns}

        names = max(len(rows.display_name(e)) for e in table.shown) + 2  # and the arrow
        assert widths()["hints"] == longest and widths()["name"] == names  # 80 columns
        table.entries = [*table.entries, replace(table.entries[0], path="/x/" + "n" * 40,
                                                 name="n" * 40)]
        table.refresh_rows()  # a long name: the name column keeps room, hints cut
        assert widths()["hints"] == rows.WIDTHS["hints"] and widths()["name"] == 23
        await pilot.resize_terminal(160, 45)
        await settle(pilot)
        assert table.size.width == 96 and widths()["hints"] == longest  # and the hash column
        assert widths()["name"] == model_table.NAME_MIN  # the long name is cut at 24


def test_names_sort_stem_by_stem_naturally() -> None:
    names = ["tiny-sd15-mix-inpainting.safetensors", "tiny-sd15.safetensors",
             "Tiny-SD2.ckpt", "tiny-sd15-anime.safetensors", "tiny-sd15.ckpt",
             "a10.safetensors", "A9.pt", "x.v2.safetensors", "x.safetensors"]
    entries = [Entry(f"/m/{n}", n, "/m", "/m", len(n), 0, "checkpoint", "sd1", None, None,
                     None, "plain", None, "/m", None, None, False, None, None, None, None,
                     None, None, (), 0.0) for n in names]
    assert [e.name for e in sorted(entries, key=rows.sort_key("name", {}))] == [
        "A9.pt", "a10.safetensors", "Tiny-SD2.ckpt", "tiny-sd15.ckpt",
        "tiny-sd15.safetensors", "tiny-sd15-anime.safetensors",
        "tiny-sd15-mix-inpainting.safetensors", "x.safetensors", "x.v2.safetensors"]
    by_size = sorted(entries, key=rows.sort_key("size", {}))  # names break ties
    assert [e.name for e in by_size][:3] == ["A9.pt", "Tiny-SD2.ckpt", "x.safetensors"]


def _walk(node: Any) -> list[Any]:
    out = [node]
    for child in node.children:
        out += _walk(child)
    return out


@pytest.mark.asyncio
async def test_scan_job_errors_show_the_cli_wording(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    async with make_app([str(missing)], db=str(tmp_path / "i.sqlite"),
                        images=False).run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(pilot.app.screen, ErrorDialog)
        assert pilot.app.screen.message == (f"modelkit: error: {missing}: no such folder; "
                                            "pass a model folder to scan")
        await pilot.press("escape")
        await pilot.press("question_mark")
        assert isinstance(pilot.app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, LibraryScreen)


@pytest.mark.asyncio
async def test_new_files_are_indexed_when_the_library_changes(
        tmp_path: Path, model_library: dict[str, Path]) -> None:
    lib = model_library["root"] / "webui/models"
    root = tmp_path / "lib"
    link(lib / "Stable-diffusion/sd15.safetensors", root / "Stable-diffusion/a.safetensors")
    async with make_app([str(root)], db=str(tmp_path / "i.sqlite"),
                        images=False).run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert [e.name for e in _table(pilot).shown] == ["a.safetensors"]
        new = link(lib / "VAE/vae.safetensors", root / "VAE/new-vae.safetensors")
        pilot.app.screen.post_message(LibraryChanged([str(new)]))  # what Act will post
        await settle(pilot)
        assert [(e.name, e.kind) for e in _table(pilot).shown] == [
            ("a.safetensors", "checkpoint"), ("new-vae.safetensors", "vae")]


def test_help_keys_in_two_aligned_columns_wrapped_at_words() -> None:
    """The help box at 80 columns (70 for its text): every key in one
    column, its description beside it in a second one, aligned across
    screens, continued under itself and cut between words only."""
    from rich.console import Console

    from modelkit.tui.screens.help import KEYS, help_text

    console = Console(width=70, record=True, file=io.StringIO())
    console.print(help_text())
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    width = max(len(key) for _, keys in KEYS for key, _ in keys)
    at = 2 + width + 2  # where every description starts
    for title, keys in KEYS:
        start = lines.index(title)
        for key, what in keys:
            i = next(i for i, line in enumerate(lines) if i > start and line.startswith(
                f"  {key}  ") and line[at - 2:at] == "  " and line[at] != " ")
            text = [lines[i][at:]]
            while i + 1 < len(lines) and lines[i + 1].startswith(" " * at):
                i += 1
                text.append(lines[i][at:])
            assert " ".join(text) == what, key
            assert max(len(line) for line in lines) <= 70
    assert ("x", "cancel the running job (no file is left)") in dict(KEYS)["Act"]


class _Sink:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def post_message(self, message: Any) -> bool:
        self.messages.append(message)
        return True


def test_run_job_reports_cancel_and_errors_as_messages() -> None:
    sink, cancel = _Sink(), threading.Event()
    cancel.set()

    def cancelled(progress: Any, c: threading.Event) -> None:
        if c.is_set():
            raise Cancelled("scan cancelled; the files indexed so far are kept")

    assert jobs.run_job(sink, "scan", cancelled, cancel) is None  # type: ignore[arg-type]
    assert sink.messages == [JobFailed("scan", "scan cancelled; the files indexed so far "
                                       "are kept", cancelled=True)]
    jobs.run_job(sink, "x", lambda p, c: 1 / 0, cancel)  # type: ignore[arg-type]
    assert sink.messages[-1].error.startswith("modelkit: internal error: ZeroDivisionError")
    assert jobs.run_job(sink, "y", lambda p, c: 42, cancel) == 42  # type: ignore[arg-type]
    assert sink.messages[-1] == JobFinished("y", 42)


# --- snapshots -------------------------------------------------------------


def test_snapshot_main_80x24(snap_compare: Any, snapshot_library: Path) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("down", "down", "down")  # sd15-mix-inpainting
        await settle(pilot)

    assert snap_compare(make_app(db=str(snapshot_library), images=False),
                        terminal_size=(80, 24), run_before=run_before)


def test_snapshot_lineage_160x45(snap_compare: Any, snapshot_library: Path) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("down", "down", "down", "3")  # sd15-mix-inpainting's lineage
        await settle(pilot)

    assert snap_compare(make_app(db=str(snapshot_library), images=False),
                        terminal_size=(160, 45), run_before=run_before)
