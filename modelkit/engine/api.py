"""Shortcuts over :func:`modelkit.engine.runner.run` for programs that want one
call: each builds the recipe the matching command builds."""

from __future__ import annotations

import os
from pathlib import Path

from modelkit.io.gguf import GGUFResult
from modelkit.progress import ProgressFn, no_progress


def export_gguf(
    src_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    qtype: str = "q8_0",
    flatten: bool = True,
    progress: ProgressFn = no_progress,
    overwrite: bool = False,
) -> GGUFResult:
    """Export the UNet of the SD1/SD2/SDXL checkpoint or UNet-only file
    ``src_path`` to the GGUF file ``out`` (``q8_0``, ``f16`` or ``bf16``);
    an existing ``out`` is refused unless ``overwrite`` (the one overwrite
    policy of every entry point); runs ``modelkit export-gguf``'s recipe
    through :func:`modelkit.engine.runner.run` (provenance included).

    Raises:
        ModelkitError: the file is not an exportable model (LoRA, VAE, unknown
            architecture, no UNet).
        OutputError: the output path is refused (it exists and ``overwrite``
            is False, it is an input, its folder is missing).
    """
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run

    recipe = Recipe.op("convert", Path(src_path).absolute(), output=Path(out).absolute(),
                       source="export_gguf").with_output(
        format="gguf", quant=qtype, keep_shapes=not flatten)
    report = run(recipe, progress=progress, overwrite=overwrite)
    details = report.output_details
    return GGUFResult(Path(out), report.n_tensors, int(details.get("n_quantized", 0)),
                      report.output_bytes, report.seconds, list(report.notes))
