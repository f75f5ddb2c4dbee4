"""``modelkit verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelkit.cli.common import common_option
from modelkit.cli.progress import StderrProgress
from modelkit.core.verify_settings import PROBE_MAX_ERROR, PROBE_MAX_ERROR_FP8

if TYPE_CHECKING:
    from modelkit.core.verify_settings import VerifySettings

EPILOG = """\b
Examples:
  modelkit verify models/Stable-diffusion/model.safetensors
  modelkit verify model-fp16.safetensors --reference model.safetensors
  modelkit verify baked.safetensors --reference base.safetensors --lora style.safetensors:0.8
  modelkit verify model.safetensors --preset smoke --grid grid.png --junit verify.xml
  modelkit verify unet-Q4_K.gguf --reference model.safetensors --static-only
  modelkit verify flux-q8.safetensors --reference flux-dev.safetensors --probe --report v.json
\b
With --reference, every stored layer is restored and gated by its storage
format (GGUF type, fp8, int8, fp16...): SNR and cosine per layer, the worst
named (checks gate.<format>). The file's own VAE encodes and decodes a test
picture (vae.round_trip). Flux.1 files and standalone VAEs get these and the
static checks (no render).
\b
Exit codes: 0 every check passed (warnings allowed), 1 a check failed,
2 usage or load error (bad option, unreadable file, no tokenizer found).
\b
Presets: tiny (64x64, 2 steps; seeded test models), smoke (256x256, 4 steps;
real files on a CPU: an SD1.5 image takes 15 s to minutes on 2 cores, by
load, and 5 GB), standard (the model's own resolution, 20 steps; for a GPU).
Default: tiny for test models, smoke otherwise.
\b
The library (LoRAs for <lora:name:w> prompt tags, embeddings used by name,
a CLIP tokenizer in models/tokenizers/clip) is the folder above the model
holding models/ (A1111 or ComfyUI layout), or --library DIR. Real files need
the real CLIP tokenizer: --tokenizer DIR, a real one in the library, the
Hugging Face cache, or 'pip install --no-deps open-clip-torch'; the demo's
synthetic one is for its tiny models.
"""


def _render_table(report: object) -> str:
    from itertools import zip_longest

    from modelkit.textsafe import shown
    from modelkit.verify.report import VerifyReport, fmt_value
    from modelkit.wording import wrap_words

    assert isinstance(report, VerifyReport)
    d = report
    lines = [f"modelkit verify: {d.model} ({d.arch}"
             + (f", {d.variant}" if d.variant else "")
             + (", tiny test model" if d.tiny else "") + ")"]
    loras = ", ".join(f"{x['file']}:{x['weight']:g}" for x in d.loras)
    rows = [("reference", d.reference or "-")]
    if loras:
        rows.append(("LoRAs", loras + (" (on the reference at render time: the bake's "
                                       "oracle)" if d.reference else " (at render time)")))
    if d.operation:
        rows.append(("operation", f"{d.operation} ({d.operation_reason})"))
    if d.plan:
        p = d.plan
        rows.append(("settings", f"{p['width']}x{p['height']}, {p['steps']} steps, "
                                 f"{p['scheduler']}, CFG {p['guidance_scale']:g}, seeds "
                                 f"{','.join(str(s) for s in p['seeds'])}, {p['threads']} "
                                 f"thread(s), {p['device']} (preset {p['preset']})"))
    if d.tokenizer:
        rows.append(("tokenizer", d.tokenizer["description"]))
    lines += [f"  {k:<10} {v}" for k, v in rows]
    lines.append(f"  {'check':<28} {'case':<10} {'value':<16} {'threshold':<24} verdict")
    for c in d.checks:
        # long values and thresholds wrap at word boundaries onto lines of
        # their own; a value with no threshold may use the threshold's column
        value, limit = shown(fmt_value(c.value)), shown(c.threshold or "")
        if limit:
            cells = [f"{v:<16} {t:<24}" for v, t in zip_longest(
                wrap_words(value, 16), wrap_words(limit, 24), fillvalue="")]
        else:
            cells = [f"{v:<41}" for v in wrap_words(value, 41)]
        lines.append(f"  {c.name:<28} {c.case or '':<10} {cells[0]} {c.verdict.upper()}"
                     + (f"  {c.message}" if c.message and c.verdict != "pass" else ""))
        lines += [f"  {'':<28} {'':<10} {cell}".rstrip() for cell in cells[1:]]
    for note in d.notes:
        lines.append(f"  note: {note}")
    lines.append(d.summary())
    return "\n".join(lines)


def _settings(prompts: Path | None, seeds: str | None, steps: int | None, size: str | None,
              preset: str, device: str, threads: int | None, scheduler: str,
              guidance: float, operation: str, thresholds: tuple[str, ...],
              tokenizer: Path | None, library: Path | None, allow_download: bool,
              static_only: bool) -> VerifySettings:
    from modelkit.core.verify_settings import (
        VerifySettings,
        load_prompts,
        parse_seeds,
        parse_size,
        parse_threshold,
    )

    s = VerifySettings(preset=preset, steps=steps, device=device, threads=threads,
                       scheduler=scheduler, guidance_scale=guidance, operation=operation,
                       thresholds=dict(parse_threshold(t) for t in thresholds),
                       tokenizer=tokenizer, library=library, allow_download=allow_download,
                       render=not static_only)
    if prompts is not None:
        s.prompts, negative = load_prompts(prompts)
        if negative is not None:
            s.negative_prompt = negative
    if seeds is not None:
        s.seeds = parse_seeds(seeds)
    if size is not None:
        s.size = parse_size(size)
    s.validate()
    return s


def _refuse_bad_input(report: object) -> None:
    """A LoRA (or a VAE...) as MODEL, an architecture verify does not know,
    or a reference of another architecture is bad input: one line, exit 2,
    nothing written."""
    from modelkit.errors import ModelkitError

    failed = getattr(report, "failed", [])
    bad = next((c for c in failed if c.name == "static.architecture"), None)
    if bad is None:
        return
    from modelkit.arch import registry

    probed = [a.label for a in registry.REGISTRY.values()
              if a.probe and a.verify == registry.PROBE]
    hint = ("give a reference of the same architecture" if ", the reference " in bad.message
            else "verify renders SD1, SD2 and SDXL checkpoints (a LoRA: its base with "
            f"--lora); a transformer of {', '.join(probed[:-1])} or {probed[-1]} is checked "
            "block by block against its reference with --reference REF --probe")
    raise ModelkitError(f"{bad.message}; {hint}")


@click.command("verify", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path),
              help="Compare with this model (the operation's input).")
@click.option("--lora", "loras", multiple=True, metavar="FILE:W",
              help="Apply a LoRA at render time (repeatable). With --reference: the oracle "
                   "of a LoRA bake (reference + LoRA vs MODEL).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path),
              help="Prompts file: one per line; 'negative: ...' sets the negative prompt.")
@click.option("--seeds", help="Seeds, comma-separated (default 1,2).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps (default: preset).")
@click.option("--size", help="WIDTHxHEIGHT, multiples of 8 (default: preset).")
@click.option("--preset", type=click.Choice(["auto", "tiny", "smoke", "standard"]),
              default="auto", show_default=True, help="Render size and steps.")
@common_option("device")
@click.option("--threads", type=click.IntRange(1, 256),
              help="CPU threads (default: 1 for tiny models, else up to 4).")
@click.option("--scheduler", type=click.Choice(["euler", "ddim"]), default="euler",
              show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True,
              help="Classifier-free guidance scale.")
@click.option("--op", "operation", default="auto", show_default=True,
              type=click.Choice(["auto", "lossless", "fp16", "bf16", "fp8", "int8",
                                 "lora_bake", "merge"]),
              help="What made MODEL from the reference (picks the thresholds).")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a limit: psnr, ssim, latent, max_abs or lora_effect.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a markdown table here.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the comparison grid PNG here.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JUnit XML here.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path),
              help="Write one PNG per image (settings in PNG text chunks) into this folder.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="CLIP tokenizer folder (tokenizer.json or vocab.json + merges.txt) or "
                   "bpe_simple_vocab_16e6.txt.gz.")
@click.option("--library", type=click.Path(file_okay=False, path_type=Path),
              help="Model library root (default: found above MODEL).")
@click.option("--allow-download", is_flag=True,
              help="Let the tokenizer come from the Hugging Face Hub if not found offline.")
@click.option("--static-only", is_flag=True, help="Static checks only; no render.")
@click.option("--probe", is_flag=True,
              help="Instead of rendering, run every block of MODEL and --reference on the "
                   "same seeded inputs, one block at a time (any family, full size, little "
                   "memory); report each block's relative error and cosine.")
@click.option("--probe-max-error", type=click.FloatRange(min=0, min_open=True),
              help="With --probe: the most a block's output may differ from the "
                   f"reference's (relative L2; default {PROBE_MAX_ERROR:g}, "
                   f"{PROBE_MAX_ERROR_FP8:g} for an fp8 candidate).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="With --probe: write the error-per-block plot (PNG) here (default: "
                   "beside the first report, as NAME-probe.png).")
@common_option("as_json", help="Print the JSON report on stdout.")
@common_option("overwrite", help="Replace existing output files.")
@common_option("quiet")
def verify_cmd(model: Path, reference: Path | None, loras: tuple[str, ...],
               prompts: Path | None, seeds: str | None, steps: int | None, size: str | None,
               preset: str, device: str, threads: int | None, scheduler: str,
               guidance: float, operation: str, thresholds: tuple[str, ...],
               report_path: Path | None, markdown: Path | None, grid: Path | None,
               junit: Path | None, images: Path | None, tokenizer: Path | None,
               library: Path | None, allow_download: bool, static_only: bool,
               probe: bool, probe_max_error: float | None, plot: Path | None,
               as_json: bool, overwrite: bool, quiet: bool) -> None:
    """Check a checkpoint: static checks, an offline render, and a comparison
    against --reference or a runtime-LoRA oracle.

    Static checks (architecture, completeness, dtypes, NaN/Inf, CLIP
    position ids, change per component against the reference) run first;
    then MODEL is loaded with diffusers offline and rendered with fixed
    prompts, seeds, scheduler, steps and threads (finite, not black, not
    flat, prompt sensitivity, determinism); with a reference, every image is
    compared (latent distance, PSNR, SSIM) under the thresholds of the
    operation class. Exit code 1 names the failing checks.
    """
    from modelkit.core.verify_settings import parse_lora_arg
    from modelkit.verify import outputs
    from modelkit.verify.run import verify

    settings = _settings(prompts, seeds, steps, size, preset, device, threads, scheduler,
                         guidance, operation, thresholds, tokenizer, library, allow_download,
                         static_only)
    settings.probe, settings.probe_max_error = probe, probe_max_error
    if probe and plot is None:
        from modelkit.verify.probe_run import plot_path_beside

        plot = plot_path_beside([report_path, markdown, junit])
    inputs = [p for p in (model, reference) if p is not None]
    outputs.check_outputs([report_path, markdown, grid, junit, plot if probe else None],
                          overwrite, inputs)
    lora_uses = tuple(parse_lora_arg(text) for text in loras)
    report = verify(model, settings, reference, lora_uses,
                    progress=StderrProgress(quiet))
    _refuse_bad_input(report)
    written = []
    for path, write in ((report_path, outputs.write_json), (markdown, outputs.write_markdown),
                        (junit, outputs.write_junit)):
        if path is not None:
            written.append(write(report, path, overwrite))
    if probe and plot is not None and report.probe:
        from modelkit.verify.probe_run import write_plot

        written.append(write_plot(report, plot, overwrite))
    rendered = report.renders is not None and bool(report.renders.candidate)
    for path, write_files in ((grid, outputs.write_grid), (images, outputs.write_images)):
        if path is None:
            continue
        if rendered:
            result = write_files(report, path, overwrite)
            written.append(path if isinstance(result, list) else result)
        else:
            click.echo(f"modelkit: {path}: not written (nothing was rendered)", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(_render_table(report))
        for path in written:
            click.echo(f"wrote {path}")
    if not report.passed:
        raise click.exceptions.Exit(1)
