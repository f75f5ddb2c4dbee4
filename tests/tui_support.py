"""Helpers shared by the TUI tests: waiting for workers, and a library at a
fixed path for snapshots."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from library_fixture import EVIL, link, merge_metadata, with_metadata
from textual.pilot import Pilot
from textual.worker import WorkerError

SNAPSHOT_ROOT = Path("/tmp/modelkit-tui-snapshot")  # fixed: paths show on screen


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


def build_snapshot_library(models: dict[str, Path]) -> Path:
    """A library at :data:`SNAPSHOT_ROOT` (the screens show folders),
    scanned without hashes into its own index; returns the index."""
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
