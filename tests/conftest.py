"""Shared fixtures: seeded tiny synthetic models, built once per session."""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# An environment with PYTHONDONTWRITEBYTECODE=1 (this project's machines set it)
# made every xdist worker and every console-script child compile all of
# modelkit again, and pytest rewrite every test module again: write the caches
# (__pycache__/ is ignored by git); the children read what the workers wrote
sys.dont_write_bytecode = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one torch thread per test process: tiny tensors gain nothing from more, and
# on a busy machine (CI) idle intra-op threads spin for a core
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# the hash cache and library index of this test process, never the user's
os.environ.setdefault("MODELKIT_CACHE_DIR", tempfile.mkdtemp(prefix="modelkit-test-cache-"))
# The cyclic collector's full collections walk every object torch, diffusers,
# transformers and textual create: with the default thresholds (700, 10, 10)
# each xdist worker spent ~12 s of its ~110 s in ~50 of them. Collect less
# often; garbage is still collected. (No test depends on when the collector
# runs: the ones that check that something is freed call gc.collect() or
# turn the collector off.)
gc.set_threshold(20_000, 20, 50)


# The test files that take longest, longest first (seconds on the 2-core
# machine, December 2026). ``--dist loadfile`` hands a worker its next file
# in collection order (pyproject.toml turns off xdist's reordering by test
# count, which put several of these last): running them first leaves the
# short files to fill the end, so neither worker idles while the other
# finishes a long one. test_lora_diffusers needs no session models, so it
# runs while the other worker builds them. Files not listed follow in name
# order.
HEAVY_FIRST = (
    "test_verify.py",  # 13 s
    "test_lora_diffusers.py",  # 8 s, no session models
    "test_tui_act.py",  # 10 s
    "test_sweep_pool.py",  # 8 s
    "test_tui.py",  # 8 s
    "test_interrupts.py",  # 7 s
    "test_fuzz_long.py",  # 6 s
    "test_engine.py",  # 6 s
    "test_merge_engine.py",  # 6 s
    "test_hostile_io.py",  # 6 s
    "test_convert.py",  # 6 s
    "test_gguf.py",  # 6 s
    "test_lora_engine.py",  # 6 s
    "test_verify_probe.py",  # 5 s
    "test_cli_exit_codes.py",  # 5 s
    "test_convert_cli.py",  # 5 s
    "test_diffusers_convert.py",  # 5 s
    "test_sweep.py",  # 5 s
    "test_family_lora_ops.py",  # 4 s
    "test_cli.py",  # 4 s
    "test_comfy_quant.py",  # 4 s
    "test_verify_recipe.py",  # 3 s
    "test_gguf_export.py",  # 3 s
    "test_import_hygiene.py",  # 3 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the test files as :data:`HEAVY_FIRST` says (tests within a file
    keep their order)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], None]) -> Path:
    """A folder ``name`` that ``build`` fills once per test run.

    Under pytest-xdist the workers share it (the first one to get the lock
    builds it, the others wait and reuse it): the tests only read what is in
    it, and building it twice would only cost time. Without xdist it is a
    private folder of this session."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    # a worker's basetemp is <run's basetemp>/popen-gwN: share the run's
    shared = tmp_path_factory.getbasetemp().parent
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.done"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.write_text("built\n")
    return folder


def _model_builders() -> dict[str, Callable[[Path], object]]:
    from modelkit import testing as t

    return {
        "sd1": lambda p: t.write_checkpoint(p, "sd1", seed=1),
        "sd1_b": lambda p: t.write_checkpoint(p, "sd1", seed=2),
        "sd1_ema": lambda p: t.write_checkpoint(p, "sd1", seed=3, ema=True, dtype="F32"),
        "sd1_inpaint": lambda p: t.write_checkpoint(p, "sd1", seed=4, variant="inpaint"),
        "sd1_pix2pix": lambda p: t.write_checkpoint(p, "sd1", seed=4, variant="pix2pix"),
        "sd2": lambda p: t.write_checkpoint(p, "sd2", seed=5),
        "sd2_v_meta": lambda p: t.write_checkpoint(
            p, "sd2", seed=5, metadata={"modelspec.prediction_type": "v"}),
        "sdxl": lambda p: t.write_checkpoint(p, "sdxl", seed=6),
        "sdxl_vpred": lambda p: t.write_checkpoint(p, "sdxl", seed=7,
                                                   markers=("v_pred", "ztsnr")),
        "sdxl_refiner": lambda p: t.write_checkpoint(p, "sdxl_refiner", seed=8),
        "sdxl_unet": lambda p: t.write_unet(p, "sdxl", seed=6),
        "sd1_unet_prefixed": lambda p: t.write_checkpoint(p, "sd1", components=["unet"]),
        "vae": lambda p: t.write_vae(p, seed=9),
        "emb_sd1": lambda p: t.write_embedding(p, "sd1", seed=10),
        "emb_sd2": lambda p: t.write_embedding(p, "sd2", seed=10),
        "emb_sdxl": lambda p: t.write_embedding(p, "sdxl", seed=11),
        "emb_tiny": lambda p: t.write_embedding(p, "sd1", tiny=True, seed=12),
    }


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A library of tiny models of every fixture kind, by name (built once
    per run; tests only read them)."""
    builders = _model_builders()

    def build(root: Path) -> None:
        for name, write in builders.items():
            write(root / f"{name}.safetensors")

    # not "models": a folder holding models/ reads as a verify library root
    root = built_once(tmp_path_factory, "tiny-models", build)
    return {name: root / f"{name}.safetensors" for name in builders}


def run_chain(inputs: list, steps: list[tuple[str, dict]], out: Path,
              fmt: str | None = None) -> tuple[list, object]:
    """Run operations one after another on ``inputs`` through the one runner
    (the first step takes every input, later ones the previous result) and
    return (the steps' reports, the run report)."""
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run

    first, *rest = steps or [("convert", {})]
    recipe = Recipe.op(first[0], *inputs, output=out, **first[1])
    for op, params in rest:
        recipe = recipe.then(op, **params)
    if fmt:
        recipe = recipe.with_output(format=fmt)
    report = run(recipe)
    return (list(report.steps) if steps else []), report


def run_recipe(recipe: object, output: object = None, **kwargs: object) -> object:
    """Run a recipe through the one runner (what ``modelkit recipe run`` does)."""
    from modelkit.engine.runner import run

    return run(recipe, output=output, **kwargs)  # type: ignore[arg-type]


def write_diffusers(source: object, out: Path) -> object:
    """Plan a diffusers folder for ``source`` and write it (the one write path)."""
    from modelkit.convert.diffusers import plan_folder
    from modelkit.io.write import OutputSpec, write

    return write(plan_folder(source), OutputSpec(Path(out), "diffusers"),  # type: ignore[arg-type]
                 inputs=source.input_paths)  # type: ignore[attr-defined]


# a few LoRA modules of each part (UNet attention and ResBlocks, text encoder):
# diffusers/peft wrap every module a LoRA names, which is most of a runtime
# LoRA's load time
LORA_SUBSET = ("lora_unet_down_blocks_1_", "lora_unet_mid_block_",
               "lora_te_text_model_encoder_layers_0_")


def keep_lora_modules(path: Path, prefixes: tuple[str, ...] = LORA_SUBSET) -> Path:
    """Rewrite the LoRA file ``path`` with only the modules under ``prefixes``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    keep = {k: t for k, t in load_file(str(path)).items() if k.startswith(prefixes)}
    assert keep, f"no LoRA module under {prefixes}"
    save_file(keep, str(path), metadata=metadata)
    return path


def write_source(source: object, out: Path) -> object:
    """Write ``source`` to a safetensors file (the one write path)."""
    from modelkit.io.write import OutputSpec, write

    return write(source, OutputSpec(Path(out), "safetensors"),
                 inputs=source.input_paths)  # type: ignore[attr-defined]


def write_converted(planned: object, out: Path) -> object:
    """Run a planned step's ``prepare`` and write its output (what the runner
    does for one step, without provenance): for tests of one transform."""
    from modelkit.io.write import OutputSpec, write
    from modelkit.progress import no_progress

    if planned.prepare is not None:  # type: ignore[attr-defined]
        planned.prepare(no_progress, None)  # type: ignore[attr-defined]
    source = planned.source  # type: ignore[attr-defined]
    return write(source, OutputSpec(Path(out), "safetensors", overwrite=True),
                 inputs=source.input_paths)


@pytest.fixture(scope="session")
def model_library(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
                  ) -> dict[str, Path]:
    """A small A1111 + ComfyUI library (tests/library_fixture.py), scanned
    and hashed once: ``root``, ``db`` (the index) and ``cache`` (the hash
    cache folder used for it)."""
    from library_fixture import build_library

    from modelkit.library.scan import scan

    base = tmp_path_factory.mktemp("library")
    root = build_library(base / "lib", models)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELKIT_CACHE_DIR", str(base / "cache"))
        scan([root], base / "index.sqlite", hash=True)
    return {"root": root, "db": base / "index.sqlite", "cache": base / "cache"}


@pytest.fixture(scope="session")
def snapshot_library(models: dict[str, Path]) -> Path:
    """The TUI snapshots' library at a fixed path (tests/tui_support.py)."""
    from tui_support import build_snapshot_library

    return build_snapshot_library(models)


@pytest.fixture(scope="session")
def serial_sweep(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> object:
    """tests/sweep_fixture.py's sweep run in this process (the reference
    table the pool and Ray runs must reproduce)."""
    from sweep_fixture import run_fixture_sweep

    from modelkit.sweep import SerialExecutor

    return run_fixture_sweep(tmp_path_factory.mktemp("sweep-serial"), models, SerialExecutor())


@pytest.fixture(scope="session")
def pool_sweep(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> object:
    """The same sweep on a two-worker process pool."""
    from sweep_fixture import run_fixture_sweep

    from modelkit.sweep import PoolExecutor

    return run_fixture_sweep(tmp_path_factory.mktemp("sweep-pool"), models,
                             PoolExecutor(jobs=2, threads=1))
