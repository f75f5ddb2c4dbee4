"""What a new user meets on verify's first run with real files: the real
CLIP tokenizer wins over the demo's synthetic one, renders report progress
per denoising step and per image, only one pipeline is in memory at a time,
and install hints point at the checkout (PyPI's ``modelkit`` is another
project)."""

from __future__ import annotations

import gc
import gzip
import io
import os
import weakref
from pathlib import Path

import pytest

from modelkit.core.verify_library import Library
from modelkit.progress import VERIFY, Progress
from modelkit.verify import tokenizer as tk


def _real_dir(folder: Path) -> Path:
    """A tokenizer folder that is not the synthetic one (one merge more)."""
    merges = [("c", "a")]
    tk._clip_tokenizer(tk._vocab(merges), merges).save_pretrained(str(folder))
    return folder


@pytest.fixture
def no_real_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face cache hit and no open-clip wheel, whatever is installed."""
    monkeypatch.setattr(tk, "_from_hf_cache", lambda: None)
    monkeypatch.setattr(tk, "open_clip_bpe", lambda: None)


@pytest.mark.usefixtures("no_real_elsewhere")
def test_real_tokenizer_wins_over_the_synthetic_one_for_full_size_models(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lib"
    syn = tk.write_synthetic_tokenizer(root / "models" / "tokenizers" / "clip")
    real = _real_dir(root / "models" / "tokenizers" / "real")
    assert (syn / tk.SYNTHETIC_MARKER).is_file()
    assert tk.is_synthetic_dir(syn) and not tk.is_synthetic_dir(real)
    lib = Library(root, tokenizer_dirs=[syn, real])
    assert tk.find_tokenizer(lib).location == real  # a real library folder
    assert tk.find_tokenizer(lib, tiny=True).location == syn  # tiny models: as listed
    only_syn = Library(root, tokenizer_dirs=[syn])
    bpe = tmp_path / tk.BPE_FILE
    bpe.write_bytes(gzip.compress(b"#version: 0.2\n"))
    monkeypatch.setattr(tk, "open_clip_bpe", lambda: bpe)
    hit = tk.find_tokenizer(only_syn)
    assert (hit.kind, hit.location) == ("open_clip", bpe)  # an installed wheel
    assert tk.find_tokenizer(only_syn, tiny=True).location == syn
    assert tk.find_tokenizer(only_syn, explicit=syn).kind == "path"  # --tokenizer wins
    # a demo library written before the marker is still recognised by its vocabulary
    (syn / tk.SYNTHETIC_MARKER).unlink()
    assert tk.is_synthetic_dir(syn)
    assert tk.find_tokenizer(only_syn).kind == "open_clip"


@pytest.mark.usefixtures("no_real_elsewhere")
def test_synthetic_tokenizer_is_the_last_resort_and_its_check_says_so(tmp_path: Path) -> None:
    syn = tk.write_synthetic_tokenizer(tmp_path / "models" / "tokenizers" / "clip")
    hit = tk.find_tokenizer(Library(tmp_path, tokenizer_dirs=[syn]))
    assert hit.location == syn and "synthetic test tokenizer" in hit.description
    check = tk.tokenizer_check(tk.load_tokenizer(hit), hit, tiny=False, text_vocab=49408)
    assert check.verdict == "fail"
    assert check.message.startswith("no real CLIP tokenizer found, only the synthetic")
    assert "open-clip-torch" in check.message and "--tokenizer" in check.message
    with pytest.raises(Exception, match="no CLIP tokenizer found offline"):
        tk.find_tokenizer(Library(None))


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """The shared tiny SD1 in a library with the synthetic tokenizer."""
    root = tmp_path_factory.mktemp("first-run-lib")
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    tk.write_synthetic_tokenizer(root / "models" / "tokenizers" / "clip")
    model = ckpts / "good.safetensors"
    os.link(models["sd1"], model)
    return model


def test_renders_report_each_step_and_image_and_free_each_pipeline(
        lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 steps, 1 seed, 2 prompts: the reference renders 2 images, the
    candidate 2 plus the determinism re-render. The reference pipeline is
    gone before the candidate's is built."""
    from modelkit.verify import VerifySettings, render, verify

    built: list[weakref.ref] = []
    alive_at_build: list[bool] = []
    real_load = render.load_pipeline

    def load(*args: object, **kw: object) -> render.LoadedPipeline:
        alive_at_build.append(any(ref() is not None for ref in built))
        loaded = real_load(*args, **kw)  # type: ignore[arg-type]
        built.append(weakref.ref(loaded.pipe))
        return loaded

    monkeypatch.setattr(render, "load_pipeline", load)
    events: list[Progress] = []
    report = verify(lib, VerifySettings(seeds=(1,), steps=2), reference=lib,
                    progress=events.append)
    assert report.passed, report.to_dict()["checks"]
    assert alive_at_build == [False, False]  # one pipeline at a time
    gc.collect()
    assert all(ref() is None for ref in built)
    renders = [(e.step, e.done, e.total, e.unit, e.item) for e in events
               if e.step.startswith("render ")]
    assert all(e.phase == VERIFY for e in events if e.step.startswith("render "))
    ref, cand = "render reference", "render candidate"
    assert renders == [
        (ref, 1, 4, "steps", "p1-s1 step 1/2"), (ref, 2, 4, "steps", "p1-s1 step 2/2"),
        (ref, 1, 2, "images", "p1-s1"),
        (ref, 3, 4, "steps", "p2-s1 step 1/2"), (ref, 4, 4, "steps", "p2-s1 step 2/2"),
        (ref, 2, 2, "images", "p2-s1"),
        (cand, 1, 6, "steps", "p1-s1 step 1/2"), (cand, 2, 6, "steps", "p1-s1 step 2/2"),
        (cand, 1, 3, "images", "p1-s1"),
        (cand, 3, 6, "steps", "p2-s1 step 1/2"), (cand, 4, 6, "steps", "p2-s1 step 2/2"),
        (cand, 2, 3, "images", "p2-s1"),
        (cand, 5, 6, "steps", "p1-s1 step 1/2"), (cand, 6, 6, "steps", "p1-s1 step 2/2"),
        (cand, 3, 3, "images", "p1-s1"),  # the determinism re-render
    ]
    checks = {c.name: c.verdict for c in report.checks}
    assert checks["render.deterministic"] == "pass"


class _Clock:
    """A monotonic clock that moves ``step`` seconds per reading."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 100.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _verify_events() -> list[Progress]:
    """A NaN scan, then the renders of 3 images x 4 steps (one event per
    step, one per image), as a full-size smoke verify sends them."""
    total = 100 * 2**20
    out = [Progress("NaN/Inf scan", n * 2**20, total, "bytes", "k", VERIFY)
           for n in range(0, 101, 10)]
    task = "render candidate"
    for i in range(3):
        out += [Progress(task, 4 * i + k, 12, "steps", f"p{i + 1}-s1 step {k}/4", VERIFY)
                for k in range(1, 5)]
        out.append(Progress(task, i + 1, 3, "images", f"p{i + 1}-s1", VERIFY))
    return out


def test_cli_draws_each_render_step_after_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """In logs, the renders get their own few lines after the finished scan
    (they once printed nothing for ~7 minutes); on a terminal every step
    redraws the line, with an ETA from the renders' own pace."""
    from modelkit.cli import progress as cli_progress
    from modelkit.cli.progress import StderrProgress

    monkeypatch.setattr(cli_progress.time, "monotonic", _Clock(5.0))
    log = io.StringIO()
    bar = StderrProgress(stream=log)
    for p in _verify_events():
        bar(p)
    lines = log.getvalue().splitlines()
    renders = [line for line in lines if "render candidate" in line]
    assert 3 <= len(renders) <= 5, lines  # start, quarters, end: a few lines
    assert renders[0].startswith("verify render candidate: 8.3% 1/12 steps")
    assert renders[-1].startswith("verify render candidate: 100.0%")
    tty = _Tty()
    bar = StderrProgress(stream=tty)
    for p in _verify_events():
        bar(p)
    drawn = [d for d in tty.getvalue().split("\r\x1b[2K") if "render candidate" in d]
    assert len(drawn) == 15  # each of the 12 steps and 3 images
    # 5 s per event: step 6 comes 30 s after step 1, so 6 steps are left
    # at 6 s each (36 s); the whole run's pace, scan included, said 1m25s
    assert "verify render candidate: 50.0% 6/12 steps 1m25s ETA 36s" in drawn, drawn
