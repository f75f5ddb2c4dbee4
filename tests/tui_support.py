"""Helpers shared by the TUI tests: waiting for workers, and a library at a
fixed path for snapshots."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from library_fixture import EVIL, link, merge_metadata, with_metadata
from textual.pilot import Pilot
from textual.worker import WorkerError

SNAPSHOT_ROOT = Path("/tmp/modelkit-tui-snapshot")  # fixed: paths show on screen
_SESSION_ID = uuid.uuid4().hex


async def settle(pilot: Pilot[Any]) -> None:
    """Wait until every worker finished and its messages were handled."""
    app = pilot.app
    for _ in range(50):
        for worker in list(app.workers):
            # cancelled by a newer exclusive worker, or still pending
            with contextlib.suppress(WorkerError):
                await worker.wait()
        await pilot.pause()
        if not any(w.is_running for w in app.workers):
            await pilot.pause()
            if not any(w.is_running for w in app.workers):
                return


async def open_act(pilot: Pilot[Any], *names: str) -> Any:
    """Mark the files ``names`` in this order (A, B, C), press a, and
    return the Act screen."""
    from modelkit.tui.screens.act import ActScreen
    from modelkit.tui.widgets.model_table import ModelTable

    await settle(pilot)
    table = pilot.app.screen.query_one(ModelTable)
    table.marked = []
    for name in names:  # what m does on each (the compare test presses it)
        assert table.select_path(next(e.path for e in table.shown if e.name == name))
        table.toggle_mark()
    await pilot.press("a")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ActScreen)
    return screen


def build_snapshot_library(models: dict[str, Path]) -> Path:
    """A library at :data:`SNAPSHOT_ROOT` (the screens show folders),
    scanned without hashes into its own index; returns the index.

    Built once per test run: xdist workers share it (the tests only read
    it), so the first one builds it under a lock and marks it with the
    run's id."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or _SESSION_ID
    marker = SNAPSHOT_ROOT.with_name(SNAPSHOT_ROOT.name + ".built")
    with open(SNAPSHOT_ROOT.with_name(SNAPSHOT_ROOT.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == run_id:
            return SNAPSHOT_ROOT / "index.sqlite"
        marker.unlink(missing_ok=True)
        index = _build(models)
        marker.write_text(run_id)
        return index


def _build(models: dict[str, Path]) -> Path:
    from modelkit.library.scan import scan
    from modelkit.testing.lora import write_lora

    shutil.rmtree(SNAPSHOT_ROOT, ignore_errors=True)
    sd = SNAPSHOT_ROOT / "webui/models/Stable-diffusion"
    a = link(models["sd1"], sd / "sd15.safetensors")
    b = link(models["sd1_b"], sd / "sd15-anime.safetensors")
    with_metadata(models["sd1_inpaint"], sd / "sd15-mix-inpainting.safetensors",
                  merge_metadata(a, b))
    link(models["sdxl_unet"], sd / "sdxl-unet.safetensors")
    (SNAPSHOT_ROOT / "webui/models/Lora").mkdir(parents=True)
    write_lora(SNAPSHOT_ROOT / "webui/models/Lora/detail.safetensors", "sd1", seed=3,
               metadata={"ss_output_name": EVIL, "ss_num_epochs": "4"})
    link(models["vae"], SNAPSHOT_ROOT / "webui/models/VAE/vae-ft-mse.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELKIT_CACHE_DIR", str(SNAPSHOT_ROOT / "cache"))
        scan([SNAPSHOT_ROOT / "webui"], SNAPSHOT_ROOT / "index.sqlite")
    return SNAPSHOT_ROOT / "index.sqlite"
