"""``prune``, ``ema``, ``quantize``, ``dequantize``, ``export-gguf``,
``convert``, ``swap`` and ``extract``: each builds a one-step recipe and runs
it through :func:`modelkit.engine.runner.run`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from modelkit.arch.layouts import LAYOUTS
from modelkit.cli.common import (
    DEFAULT_COMMON,
    CommonOptions,
    common_options,
    execute,
    options_from,
    transform_options,
)
from modelkit.cli.progress import human_bytes
from modelkit.textsafe import shown
from modelkit.vocab import GGUF_FLOAT_DTYPES, GGUF_TYPES, KEEP
from modelkit.wording import plural

LIST_LIMIT = 15


def _run_op(op: str, models: list[str], common: CommonOptions,
            lines: Callable[[Any], list[str]], output_fields: dict[str, Any] | None = None,
            run_lines: Callable[[Any], list[str]] | None = None, **params: Any) -> None:
    """Run operation ``op``; a common ``--dtype`` (not one of the operation's
    own parameters) casts its output's float tensors (a quantize step added
    after it); ``run_lines`` adds lines drawn from the whole run report."""
    from modelkit.core.recipe import COMMAND_LINE, Recipe

    recipe = Recipe.op(op, *models, output=common.output, options=options_from(common),
                       source=COMMAND_LINE, **params)
    if common.dtype not in (None, KEEP):
        recipe = recipe.then("quantize", dtype=common.dtype)
    if output_fields:
        recipe = recipe.with_output(**output_fields)

    def render(report: Any) -> list[str]:
        out = [f"wrote {shown(report.output)} ({report.format}): "
               f"{plural(report.n_tensors, 'tensor')}, {human_bytes(report.output_bytes)} "
               f"on disk in {report.seconds:.1f}s"]
        out += lines(report.report)
        if run_lines is not None:
            out += run_lines(report)
        for w in report.warnings:
            click.echo(f"warning: {shown(w)}", err=True)
        return out + [f"note: {shown(n)}" for n in report.notes]

    execute(recipe, common, render)


def _listed(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" (first {LIST_LIMIT} of {len(items)})" if len(items) > LIST_LIMIT else ""
    return [f"{title}{more}:"] + [f"  {shown(x, 200)}" for x in items[:LIST_LIMIT]]


def _prune_lines(r: Any) -> list[str]:
    # tensor data only: the file written adds its header and metadata
    counts = ", ".join(plural(n, reason) for reason, n in r.dropped_by_reason().items())
    out = [f"kept {plural(r.n_kept, 'tensor')}; dropped {len(r.dropped)} "
           f"({counts or 'nothing'}), {human_bytes(r.dropped_bytes)}; tensor data "
           f"{human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)}"]
    if r.markers:
        out.append(f"kept prediction markers: {', '.join(r.markers)}")
    non_ema = [f"{k} ({why})" for k, why in r.dropped.items() if why != "EMA weights"]
    out += _listed("dropped", non_ema)
    out += _listed("renamed (NovelAI CLIP names)", [f"{a} -> {b}" for a, b in r.renamed.items()])
    out += _listed("repaired position_ids (int64 0..n-1)", r.repaired)
    return out


def _ema_lines(r: Any) -> list[str]:
    from modelkit.arch import registry

    out = [f"{r.n_swapped} UNet tensors now hold their EMA weights; "
           f"{r.n_ema_dropped} model_ema.* keys dropped"]
    if r.online_only:
        out.append(f"warning: {len(r.online_only)} UNet tensors have no EMA copy and "
                   "keep their online weights")
    out.append(f"EMA vs online, relative L2 ||ema-online||/||online||: overall "
               f"{r.overall_relative_l2:.4g}")
    arch = registry.get(r.arch)
    order = {b: i for i, b in enumerate(arch.blocks.names)} if arch and arch.blocks else {}
    for name in sorted(r.blocks, key=lambda b: order.get(b, 99)):
        out.append(f"  {name:<6} {r.blocks[name].relative_l2:.4g}")
    return out


def _quantize_lines(r: Any) -> list[str]:
    shown = {"max16": "fp16 where fp32", "keep": "unchanged"}
    policy = ", ".join(f"{c}={shown.get(d, d)}" for c, d in r.policy.items())
    out = [f"policy: {policy}; {plural(r.n_cast, 'tensor')} cast, {r.n_int8} int8; "
           f"tensor data {human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)} "
           f"({100 * (1 - r.bytes_out / r.bytes_in):.1f}% saved)" if r.bytes_in else ""]
    if getattr(r, "format", "modelkit") != "modelkit":
        kept = ", ".join(f"{why} {n}" for why, n in r.kept.items()) or "none"
        out.append(f"{r.format}: {plural(r.n_scaled, 'Linear weight')} stored with a ComfyUI "
                   f"scale; denoiser weights kept at 16 bits or more: {kept}")
    if r.overflow:
        total = sum(r.overflow.values())
        out.append(f"warning: {plural(total, 'value')} in {plural(len(r.overflow), 'tensor')} "
                   f"exceeded the "
                   f"{r.target} range and were saturated to its largest finite value")
        out += _listed("saturated", [f"{k}: {n}" for k, n in r.overflow.items()])
    if r.measured:
        what = "int8" if r.n_int8 else r.target
        out.append(f"{what} error: relative L2 {r.relative_l2:.4g}, SNR {r.snr_db:.1f} dB "
                   f"(over all {what} tensors)")
        out += _listed("worst tensors", [f"{e.key}: rel L2 {e.relative_l2:.4g}, "
                                         f"SNR {e.snr_db:.1f} dB" for e in r.worst()])
    return out


def _plain_lines(r: Any) -> list[str]:
    if r is None:
        return []
    out = []
    for name in ("n_int8", "n_tensors", "cast"):
        if getattr(r, name, None):
            out.append(f"{name.replace('n_', '').replace('_', ' ')}: {getattr(r, name)}")
    return out + [f"note: {shown(n)}" for n in getattr(r, "notes", [])]


@click.command("prune")
@click.argument("model", type=click.Path())
@common_options()
@transform_options("prune")
def prune_cmd(model: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Keep the UNet, VAE, text encoders and prediction markers; drop EMA,
    schedule buffers and training leftovers; repair CLIP position ids."""
    _run_op("prune", [model], common, _prune_lines, **params)


@click.command("ema")
@click.argument("model", type=click.Path())
@common_options()
@transform_options("ema")
def ema_cmd(model: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Put the EMA weights in place of the UNet weights (and drop model_ema.*);
    report per block how far EMA and online weights differ."""
    _run_op("ema", [model], common, _ema_lines, **params)


@click.command("quantize")
@click.argument("model", type=click.Path())
@common_options()
@transform_options("quantize")
def quantize_cmd(model: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Store components at a lower precision; int8 is per-channel symmetric
    (modelkit.int8.per_channel v1, see 'modelkit dequantize'); --format comfy
    writes ComfyUI's scaled fp8 / int8_blockwise checkpoints, comfy-legacy
    the older scaled_fp8 spelling."""
    _run_op("quantize", [model], common, _quantize_lines, **params)


@click.command("dequantize")
@click.argument("model", type=click.Path())
@common_options()
@transform_options("dequantize")
def dequantize_cmd(model: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Restore a normal checkpoint from an int8 (or fp8) one."""
    _run_op("dequantize", [model], common, _plain_lines, **params)


def _gguf_quality_lines(run: Any) -> list[str]:
    q = run.output_details.get("quality")
    if q is None or not q.tensors:
        return []
    out = [f"error: relative L2 {q.relative_l2:.4g}, SNR {q.snr_db:.1f} dB over "
           f"{plural(len(q.tensors), 'lossy tensor')} (against the float input)"]
    return out + _listed("worst tensors", [f"{t.key} ({t.ggml_type}): rel L2 "
                                           f"{t.relative_l2:.4g}, SNR {t.snr_db:.1f} dB"
                                           for t in q.worst()])


@click.command("export-gguf")
@click.argument("model", type=click.Path())
@common_options()
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES), default="q8_0",
              show_default=True,
              help="GGUF type of the weights: llama.cpp's file types (k-quants q2_k..q6_k "
                   "with the _S/_M mixes, legacy q4_0..q8_0) or f16/bf16.")
@click.option("--dtype", type=click.Choice(GGUF_FLOAT_DTYPES), default=None,
              help="Store the weights unquantized at this precision instead of --type.")
@click.option("--keep-shapes", is_flag=True,
              help="Keep every tensor in its own shape (conv kernels stay F16): for "
                   "stable-diffusion.cpp, which ignores comfy.gguf.orig_shape records. "
                   "Default: ComfyUI-GGUF layout, conv kernels quantized too (smaller).")
def export_gguf_cmd(model: str, qtype: str, dtype: str | None, keep_shapes: bool,
                    common: CommonOptions) -> None:
    """Write the UNet as GGUF for ComfyUI-GGUF (models/diffusion_models) or, with
    --keep-shapes, stable-diffusion.cpp."""
    quant = {"fp16": "f16", "bf16": "bf16"}[dtype] if dtype else qtype
    _run_op("convert", [model], common, _plain_lines,
            {"format": "gguf", "quant": quant, "keep_shapes": keep_shapes},
            run_lines=_gguf_quality_lines)


@click.command("convert")
@click.argument("model", type=click.Path())
@common_options(*DEFAULT_COMMON, "format", "dtype", format={
    "type": click.Choice(["safetensors", "diffusers"]),
    "help": "Output format (default: from the output name; a name without .safetensors "
            "is a diffusers folder)."})
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="Write the transformer in this key layout (one .safetensors file, "
                   "tensors bit for bit): original (BFL/Stability/ComfyUI names, fused "
                   "qkv/linear1) or diffusers (split to_q/to_k/to_v).")
def convert_cmd(model: str, layout: str | None, common: CommonOptions) -> None:
    """Convert .ckpt/.pt to .safetensors (safe loader), a diffusers folder
    to a single original-layout file and back (a transformer family's
    transformer/ folder, sharded or not, to one file), or (--layout) a
    transformer file between the original and the diffusers layout."""
    if layout is None:
        _run_op("convert", [model], common, _plain_lines,
                {"format": common.format} if common.format else None)
        return
    if common.format not in (None, "safetensors"):
        raise click.UsageError("--layout writes a .safetensors file; leave out --format "
                               "or give --format safetensors")
    if common.output and not common.output.lower().endswith(".safetensors"):
        raise click.UsageError(f"--layout writes a .safetensors file; name the output "
                               f"{shown(common.output)}.safetensors")
    _run_op("layout", [model], common, _layout_lines, {"format": "safetensors"}, to=layout)


def _layout_lines(r: Any) -> list[str]:
    variant = f" ({r.variant})" if r.variant else ""
    out = [f"{r.arch}{variant} transformer: {r.source_layout} -> {r.layout} layout; "
           f"{plural(r.n_renamed, 'tensor')} renamed, {r.n_split} split from fused ones, "
           f"{r.n_joined} joined, {r.n_swapped} with shift/scale halves swapped"]
    if r.n_kept:
        out.append(f"other components kept unchanged: {plural(r.n_kept, 'tensor')}")
    return out + [f"note: {shown(n)}" for n in r.notes]


@click.command("swap")
@click.argument("model", type=click.Path())
@common_options(*DEFAULT_COMMON, "dtype")
@click.option("--vae", "vae", type=click.Path(), default=None, help="VAE to put in.")
@click.option("--unet", "unet", type=click.Path(), default=None, help="UNet to put in.")
@click.option("--te", "te", type=click.Path(), default=None, help="Text encoder(s) to put in.")
def swap_cmd(model: str, vae: str | None, unet: str | None, te: str | None,
             common: CommonOptions) -> None:
    """Replace one component with another file's (shapes are checked)."""
    given = {k: v for k, v in (("vae", vae), ("unet", unet), ("te", te)) if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --vae, --unet, --te")
    (component, donor), = given.items()
    _run_op("swap", [model, donor], common, _plain_lines, component=component)


@click.command("extract")
@click.argument("model", type=click.Path())
@common_options(*DEFAULT_COMMON, "dtype")
@transform_options("extract")
def extract_cmd(model: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Write one component of a checkpoint to its own file."""
    _run_op("extract", [model], common, _plain_lines, **params)
