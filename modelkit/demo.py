"""``modelkit demo``: a small synthetic model library in an A1111-like layout,
and the main job run over it (inspect and hash every file)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import OutputError
from modelkit.jsontypes import JSONDict
from modelkit.progress import HASH, Progress, ProgressFn, no_progress

MARKER = ".modelkit-demo"


def _library() -> list[tuple[str, Callable[[Path], object]]]:
    """(relative path, writer) for every demo file."""
    from modelkit import testing as t
    from modelkit.testing.lora import write_lora

    return [
        ("models/Stable-diffusion/tiny-sd15.safetensors",
         lambda p: t.write_checkpoint(p, "sd1", seed=1)),
        ("models/Stable-diffusion/tiny-sd15-anime.safetensors",
         lambda p: t.write_checkpoint(p, "sd1", seed=2)),
        ("models/Stable-diffusion/tiny-sd15-full-ema.safetensors",
         lambda p: t.write_checkpoint(p, "sd1", seed=3, ema=True, dtype="F32")),
        ("models/Stable-diffusion/tiny-sd15-inpainting.safetensors",
         lambda p: t.write_checkpoint(p, "sd1", seed=4, variant="inpaint")),
        ("models/Stable-diffusion/tiny-sd2-768-v.safetensors",
         lambda p: t.write_checkpoint(p, "sd2", seed=5,
                                      metadata={"modelspec.prediction_type": "v"})),
        ("models/Stable-diffusion/tiny-sdxl.safetensors",
         lambda p: t.write_checkpoint(p, "sdxl", seed=6)),
        ("models/Stable-diffusion/tiny-sdxl-vpred.safetensors",
         lambda p: t.write_checkpoint(p, "sdxl", seed=7, markers=("v_pred", "ztsnr"))),
        ("models/Stable-diffusion/tiny-sdxl-refiner.safetensors",
         lambda p: t.write_checkpoint(p, "sdxl_refiner", seed=8)),
        ("models/unet/tiny-sdxl-unet.safetensors",
         lambda p: t.write_unet(p, "sdxl", seed=6)),
        ("models/VAE/tiny-vae-ft-mse.safetensors", lambda p: t.write_vae(p, seed=9)),
        ("models/Lora/tiny-sd15-style.safetensors",
         lambda p: write_lora(p, "sd1", kind="lora", seed=10)),
        ("models/Lora/tiny-sd15-locon.safetensors",
         lambda p: write_lora(p, "sd1", kind="lora", conv=True, seed=11)),
        ("models/Lora/tiny-sdxl-detail.safetensors",
         lambda p: write_lora(p, "sdxl", kind="lora", seed=12)),
        ("models/Lora/tiny-sd15-loha.safetensors",
         lambda p: write_lora(p, "sd1", kind="loha", seed=13)),
        ("models/Lora/tiny-sd15-lokr.safetensors",
         lambda p: write_lora(p, "sd1", kind="lokr", seed=14)),
        ("embeddings/tiny-negative.safetensors",
         lambda p: t.write_embedding(p, "sd1", tiny=True, seed=15, name="tiny-negative")),
        ("embeddings/sdxl-negative.safetensors",
         lambda p: t.write_embedding(p, "sdxl", seed=16, name="sdxl-negative")),
    ]


DEMO_RECIPE = """\
version: 1
inputs:
  full: models/Stable-diffusion/tiny-sd15-full-ema.safetensors
  style: models/Stable-diffusion/tiny-sd15-anime.safetensors
  inpaint: models/Stable-diffusion/tiny-sd15-inpainting.safetensors
  style_lora: models/Lora/tiny-sd15-style.safetensors
steps:
  base:
    op: ema
    models: [full]
  mix:
    method: weighted_sum
    models: [base, style]
    params:
      alpha: {preset: gradient_in_to_out}
  inpainting:
    method: add_difference
    models: [inpaint, mix, base]
    params: {alpha: 1.0}
  styled:
    op: lora_bake
    models: [inpainting, style_lora]
    params: {weights: [0.7]}
  pruned:
    op: prune
    models: [styled]
output:
  path: models/Stable-diffusion/tiny-sd15-mix-inpainting.safetensors
  dtype: fp16
  step: pruned
options:
  vae: models/VAE/tiny-vae-ft-mse.safetensors
"""


DEMO_TOKENIZER = "models/tokenizers/clip"
DEMO_VERIFY_PROMPTS = """\
# modelkit verify prompts for the demo. The negative prompt uses the library's
# embedding embeddings/tiny-negative.safetensors by its name; an A1111 tag
# such as <lora:tiny-sd15-style:0.7> in a prompt would apply that LoRA from
# models/Lora at render time (left out here to keep the demo quick).
a lighthouse on a cliff at sunset
a red fox sitting in fresh snow, detailed fur
negative: tiny-negative, blurry, low quality
"""


@dataclass
class DemoResult:
    """What the demo built and found."""

    root: Path
    files: list[Path] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)  # ModelReport.to_dict()
    hashes: list[JSONDict] = field(default_factory=list)
    summary_path: Path | None = None
    verify_summary: str | None = None
    verify_report: Path | None = None
    verify_grid: Path | None = None
    replaced: bool = False  # an earlier demo in the folder was rewritten


def prepare_dir(root: Path, overwrite: bool = False) -> bool:
    """Create ``root`` or accept it if empty; a previous demo folder (its
    marker) only with ``overwrite`` (its demo files are rewritten, anything
    else in it is kept); refuse a folder with other content (nothing the user
    owns is overwritten). Returns whether an earlier demo is being replaced."""
    replacing = False
    if root.exists():
        if not root.is_dir():
            raise OutputError(f"{root}: exists and is not a folder; pick another path")
        if any(root.iterdir()):
            if not (root / MARKER).is_file():
                raise OutputError(f"{root}: folder is not empty and was not made by "
                                  "'modelkit demo'; pick an empty or new folder")
            if not overwrite:
                raise OutputError(f"{root}: holds an earlier modelkit demo; pass --overwrite "
                                  "to replace it, or pick another folder")
            replacing = True
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by modelkit demo; safe to delete\n")
    return replacing


def build_library(root: Path, progress: ProgressFn = no_progress) -> list[Path]:
    """Write (or rewrite) every demo model under ``root``."""
    entries = _library()
    paths = []
    for i, (rel, write) in enumerate(entries, 1):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        paths.append(path)
        progress(Progress("build library", i, len(entries), "files", rel, "build library"))
    return paths


def run_demo_recipe(root: Path, progress: ProgressFn = no_progress) -> Path:
    """Write the demo recipe (the EMA weights of a full training checkpoint,
    block-wise mixed with a style model, the mix turned into an inpainting
    model by add-difference with a VAE baked in, a style LoRA baked in at
    0.7, then pruned) and run it."""
    from modelkit.core.recipe import load_recipe
    from modelkit.engine.runner import run

    # at the library's top: a recipe file writes only inside its own folder
    path = root / "sd15-mix-inpainting.yaml"
    path.write_text(DEMO_RECIPE)
    report = run(load_recipe(path), progress=progress, overwrite=True)
    assert report.output is not None
    return report.output


def write_demo_tokenizer(root: Path) -> Path:
    """A small synthetic CLIP tokenizer where ``modelkit verify`` looks in a
    library (``models/tokenizers/clip``), as a user's library would hold the
    real one."""
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    return write_synthetic_tokenizer(root / DEMO_TOKENIZER)


def run_demo_verify(root: Path, output: Path, progress: ProgressFn = no_progress
                    ) -> tuple[str, Path, Path]:
    """Verify the recipe's output against its inpainting parent (a merge:
    metrics reported, not judged) with a negative prompt that uses the
    library's embedding; write the JSON report, the markdown table and the
    comparison grid under ``root/verify``. Returns the summary line and the
    report and grid paths."""
    from modelkit.core.verify_settings import load_prompts
    from modelkit.verify import VerifySettings, verify
    from modelkit.verify.outputs import write_grid, write_json, write_markdown

    folder = root / "verify"
    folder.mkdir(exist_ok=True)
    prompts_file = folder / "prompts.txt"
    prompts_file.write_text(DEMO_VERIFY_PROMPTS)
    prompts, negative = load_prompts(prompts_file)
    settings = VerifySettings(prompts=prompts, negative_prompt=negative or "", seeds=(1,))
    reference = root / "models/Stable-diffusion/tiny-sd15-inpainting.safetensors"
    report = verify(output, settings, reference, progress=progress)
    json_path = write_json(report, folder / "report.json", overwrite=True)
    write_markdown(report, folder / "report.md", overwrite=True)
    grid = write_grid(report, folder / "grid.png", overwrite=True)
    return report.summary(), json_path, grid


def run_demo(root: str | os.PathLike[str], progress: ProgressFn = no_progress,
             overwrite: bool = False) -> DemoResult:
    """Build the demo library under ``root`` (with a small tokenizer), run
    the demo merge recipe, inspect and hash every model (the combined report
    goes to ``root/library.json``), then verify the recipe's output against
    its inpainting parent (``root/verify/report.json`` and ``grid.png``).
    An earlier demo in ``root`` is replaced only with ``overwrite``."""
    from modelkit.inspect.report import inspect_model
    from modelkit.io.hashing import hash_file

    result = DemoResult(Path(root).absolute())
    result.replaced = prepare_dir(result.root, overwrite)
    result.files = build_library(result.root, progress)
    write_demo_tokenizer(result.root)
    output = run_demo_recipe(result.root, progress)
    result.files.append(output)
    for i, path in enumerate(result.files, 1):
        result.reports.append(inspect_model(path).to_dict())
        result.hashes.append(hash_file(path).to_dict())
        progress(Progress("inspect and hash", i, len(result.files), "files", path.name, HASH))
    summary = result.root / "library.json"
    summary.write_text(json.dumps({"reports": result.reports, "hashes": result.hashes},
                                  indent=2))
    result.summary_path = summary
    result.verify_summary, result.verify_report, result.verify_grid = run_demo_verify(
        result.root, output, progress)
    return result
