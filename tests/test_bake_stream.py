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
from modelkit.errors import BadFileError
from modelkit.io.open import open_source
from modelkit.io.reader import open_model
from modelkit.lora.adapter import open_adapter
from modelkit.lora.bake import _Patch
from modelkit.lora.bake_stream import range_safe
from modelkit.lora.delta import ModuleDelta
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


def _delta(path: Path, up: torch.Tensor, down: torch.Tensor, alpha: float) -> ModuleDelta:
    save_file({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down,
               f"{LIN}.alpha": torch.tensor(alpha)}, path)
    ad = open_adapter(open_source(path), "sd1")
    return ModuleDelta(ad, ad.modules[LIN])


def test_the_bound_is_the_scaled_row_sum_times_the_largest_down_value(tmp_path: Path) -> None:
    """Rank 2, alpha 1 (scale 0.5): the largest row of |up| sums to 3.5 and
    the largest |down| is 4, so the bound is 0.5·3.5·4 = 7; it covers every
    element of ΔW (here 0.5·(3·-4 + 0.5·-1) = -6.25 at most)."""
    up = torch.zeros(32, 2)
    up[0], up[1] = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    down = torch.zeros(2, 32)
    down[0, :2], down[1, :2] = torch.tensor([1.0, -4.0]), torch.tensor([2.0, -1.0])
    delta = _delta(tmp_path / "l.safetensors", up, down, alpha=1.0)
    assert delta.bound() == 7.0
    dw = delta.full()
    assert float(dw.abs().amax()) == 6.25 <= delta.bound()


def test_the_range_check_is_skipped_only_where_it_cannot_fail(tmp_path: Path) -> None:
    """bf16 and fp32 outputs of small modules skip the check; fp16 outputs,
    and modules whose bound reaches 1e30, keep it (their sum counts |k|)."""
    delta = _delta(tmp_path / "l.safetensors", torch.full((32, 2), 0.5),
                   torch.full((2, 32), 2.0), alpha=2.0)  # bound 1·1·2 = 2
    assert delta.bound() == 2.0
    small = [_Patch(delta, 0, 0.8)]
    assert range_safe(small, torch.bfloat16) and range_safe(small, torch.float32)
    assert not range_safe(small, torch.float16)
    assert not range_safe([_Patch(delta, 0, -5e29)], torch.bfloat16)  # 2·5e29 = 1e30
    assert not range_safe([_Patch(delta, 0, 4e29), _Patch(delta, 0, 2e29)], torch.float32)


def test_a_bf16_bake_beyond_the_range_is_still_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bf16 base with a module whose ΔW reaches 1e38·4 (Inf in float32):
    the bound is far above 1e30, the check runs and refuses it, exit 2, no
    file."""
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("b", "l", "o"))
    write_checkpoint(base, "sd1", seed=1, dtype="BF16")
    _lora(lora)
    assert main(["lora", "bake", str(base), str(lora), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{LIN_KEY}: baking l.safetensors: module {LIN} gives NaN/Inf" in err
    assert not out.exists()


def test_a_file_cut_short_after_it_was_opened_is_refused_not_a_crash(tmp_path: Path) -> None:
    """The memory-mapped view checks the file's length when it reads: a file
    truncated after its header was read gives a one-line error, not SIGBUS."""
    path = tmp_path / "b.safetensors"
    save_file({"a": torch.arange(4096, dtype=torch.float32)}, path)
    with open_model(path) as src:
        assert torch.equal(torch.frombuffer(bytearray(src.view("a", 4, 8)), dtype=torch.float32),
                           torch.tensor([1.0, 2.0]))
        assert src.data_start is not None
        with open(path, "r+b") as f:
            f.truncate(src.data_start + 4000)
        with pytest.raises(BadFileError, match="truncated inside tensor 'a'"):
            src.view("a", 8000, 100)


def test_lanes_take_one_cpu_each_only_when_they_fill_the_machine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lanes on a process allowed two CPUs run one per CPU, and a
    lane's thread gets its CPUs back afterwards; with more CPUs the
    scheduler places them."""
    import os

    stream_mod = importlib.import_module("modelkit.lora.bake_stream")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1})
    assert stream_mod._lane_cpus(2) == [1, 3]
    assert stream_mod._lane_cpus(1) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert stream_mod._lane_cpus(2) is None
    calls: list[set[int]] = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: calls.append(set(cpus)))
    with stream_mod._on_cpu(2):
        assert calls == [{2}]
    assert calls == [{2}, {0, 1, 2, 3}]
