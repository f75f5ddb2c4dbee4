"""The bake's fast route (``modelkit.lora.bake_stream``) with two lanes: a
failing weight reports the error the in-order bake meets first, whichever
lane fails first, and leaves no file; the bytes match the general route
(tests/test_flux.py covers the bytes on Flux files)."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.cli import main
from modelkit.testing import write_checkpoint

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
LIN_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


def _lora(path: Path) -> None:
    """One rank-4 module on the 32x32 ``to_q`` (alpha 4: scale 1) whose ΔW
    rows 0-1 are 8e4 (beyond fp16, finite), rows 2-5 zero and rows 6-7 4e38
    (Inf in float32)."""
    up = torch.zeros(32, 4)
    up[0:2], up[6:8] = 2e4, 1e38
    save_file({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": torch.ones(4, 32),
               f"{LIN}.alpha": torch.tensor(4.0)}, path)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_first_chunks_error_is_raised_whichever_lane_fails_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        workers: int) -> None:
    """Chunks of two rows: chunk 0 overflows fp16, chunk 3 is Inf. Chunk 0
    is held back 0.2 s, so with two lanes the worker fails on chunk 3 first;
    the bake still reports chunk 0's error, as the one-lane bake does, exits
    2 and leaves no output."""
    stream_mod = importlib.import_module("modelkit.lora.bake_stream")
    monkeypatch.setattr(stream_mod, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(stream_mod, "WORKERS", workers)
    real, failed = stream_mod._Job.run, []

    def run(job: object, a: int, v: object) -> None:
        if a == 0:
            time.sleep(0.2)
        try:
            real(job, a, v)
        except Exception:
            failed.append(a)
            raise

    monkeypatch.setattr(stream_mod._Job, "run", run)
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("b", "l", "o"))
    write_checkpoint(base, "sd1", seed=1, dtype="F16")
    _lora(lora)
    assert main(["lora", "bake", str(base), str(lora), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{LIN_KEY}: baking l.safetensors: module {LIN} gives values beyond the F16 " \
           "range (±65504)" in err
    assert "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # one lane stops at chunk 0; with two, the worker met chunk 3 (rows 6-7) first
    assert failed == ([0] if workers == 0 else [6, 0])
