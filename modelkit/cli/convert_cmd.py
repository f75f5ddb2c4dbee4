"""``prune``, ``ema``, ``quantize``, ``dequantize``, ``export-gguf``,
``convert``, ``swap`` and ``extract``: thin shells over
:mod:`modelkit.convert`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import click

from modelkit.cli.progress import StderrProgress, human_bytes

LIST_LIMIT = 15


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace OUTPUT if it exists (never allowed for an input).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(fn)
    fn = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                      show_default=True, help="Where tensors are read and computed.")(fn)
    return click.option("-o", "--output", required=True, type=click.Path(),
                        help="Output path (never one of the inputs).")(fn)


def _run(inputs: list[str], steps: list[tuple[str, dict[str, Any]]], output: str,
         common: dict[str, Any], lines: Callable[[Any], list[str]],
         fmt: str | None = None, gguf_type: str = "q8_0", gguf_flatten: bool = True) -> None:
    from modelkit.convert.pipeline import run_chain

    device, quiet, as_json = common["device"], common["quiet"], common["as_json"]
    target = Path(output)
    if target.exists() and not common["overwrite"]:
        from modelkit.errors import OutputError

        raise OutputError(f"{target}: already exists; pass --overwrite to replace it or "
                          "choose another output path")
    done, result = run_chain(inputs, steps, output, fmt=fmt, device=device,
                             gguf_type=gguf_type, gguf_flatten=gguf_flatten,
                             progress=StderrProgress(quiet))
    report = done[-1].report if done else None
    if as_json:
        click.echo(json.dumps({"output": str(result.path), "format": result.format,
                               "n_tensors": result.n_tensors,
                               "bytes_written": result.bytes_written,
                               "seconds": round(result.seconds, 3), "notes": result.notes,
                               "report": _jsonable(report)}, indent=2, default=str))
        return
    click.echo(f"wrote {result.path} ({result.format}): {result.n_tensors} tensors, "
               f"{human_bytes(result.bytes_written)} in {result.seconds:.1f}s")
    for line in lines(report):
        click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}")


def _jsonable(report: Any) -> Any:
    if report is None or not is_dataclass(report):
        return report
    d = asdict(report)  # type: ignore[arg-type]
    for prop in ("relative_l2", "snr_db", "overall_relative_l2"):
        if hasattr(report, prop):
            value = getattr(report, prop)
            d[prop] = None if value == float("inf") else value
    if "blocks" in d:
        d["blocks"] = {k: {**v, "relative_l2": report.blocks[k].relative_l2}
                       for k, v in d["blocks"].items()}
    return d


def _listed(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" (first {LIST_LIMIT} of {len(items)})" if len(items) > LIST_LIMIT else ""
    return [f"{title}{more}:"] + [f"  {x}" for x in items[:LIST_LIMIT]]


def _prune_lines(r: Any) -> list[str]:
    counts = ", ".join(f"{n} {reason}" for reason, n in r.dropped_by_reason().items())
    out = [f"kept {r.n_kept} tensors; dropped {len(r.dropped)} "
           f"({counts or 'nothing'}), {human_bytes(r.dropped_bytes)}; "
           f"{human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)}"]
    if r.markers:
        out.append(f"kept prediction markers: {', '.join(r.markers)}")
    non_ema = [f"{k} ({why})" for k, why in r.dropped.items() if why != "EMA weights"]
    out += _listed("dropped", non_ema)
    out += _listed("renamed (NovelAI CLIP names)", [f"{a} -> {b}" for a, b in r.renamed.items()])
    out += _listed("repaired position_ids (int64 0..n-1)", r.repaired)
    return out


def _ema_lines(r: Any) -> list[str]:
    from modelkit.arch.blocks import block_names

    out = [f"{r.n_swapped} UNet tensors now hold their EMA weights; "
           f"{r.n_ema_dropped} model_ema.* keys dropped"]
    if r.online_only:
        out.append(f"warning: {len(r.online_only)} UNet tensors have no EMA copy and "
                   "keep their online weights")
    out.append(f"EMA vs online, relative L2 ||ema-online||/||online||: overall "
               f"{r.overall_relative_l2:.4g}")
    order = {b: i for i, b in enumerate(block_names(r.arch))} if r.arch in (
        "sd1", "sd2", "sdxl", "sdxl_refiner") else {}
    for name in sorted(r.blocks, key=lambda b: order.get(b, 99)):
        out.append(f"  {name:<6} {r.blocks[name].relative_l2:.4g}")
    return out


def _quantize_lines(r: Any) -> list[str]:
    shown = {"max16": "fp16 where fp32", "keep": "unchanged"}
    policy = ", ".join(f"{c}={shown.get(d, d)}" for c, d in r.policy.items())
    out = [f"policy: {policy}; {r.n_cast} tensors cast, {r.n_int8} int8; "
           f"{human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)} "
           f"({100 * (1 - r.bytes_out / r.bytes_in):.1f}% saved)" if r.bytes_in else ""]
    if r.overflow:
        total = sum(r.overflow.values())
        out.append(f"warning: {total} values in {len(r.overflow)} tensors exceeded the "
                   f"{r.target} range and were saturated to its largest finite value")
        out += _listed("saturated", [f"{k}: {n}" for k, n in r.overflow.items()])
    if r.n_int8:
        out.append(f"int8 error: relative L2 {r.relative_l2:.4g}, SNR {r.snr_db:.1f} dB "
                   "(over all int8 tensors)")
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
    return out + [f"note: {n}" for n in getattr(r, "notes", [])]


@click.command("prune")
@click.argument("model", type=click.Path())
@_common
@click.option("--keep-ema", is_flag=True, help="Keep the model_ema.* weights.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32", "keep"]), default="keep",
              show_default=True, help="Float dtype of the kept tensors.")
def prune_cmd(model: str, output: str, keep_ema: bool, dtype: str, **common: Any) -> None:
    """Keep the UNet, VAE, text encoders and prediction markers; drop EMA,
    schedule buffers and training leftovers; repair CLIP position ids."""
    _run([model], [("prune", {"keep_ema": keep_ema, "dtype": dtype})], output, common, _prune_lines)


@click.command("ema")
@click.argument("model", type=click.Path())
@_common
def ema_cmd(model: str, output: str, **common: Any) -> None:
    """Put the EMA weights in place of the UNet weights (and drop model_ema.*);
    report per block how far EMA and online weights differ."""
    _run([model], [("ema", {})], output, common, _ema_lines)


@click.command("quantize")
@click.argument("model", type=click.Path())
@_common
@click.option("--dtype", required=True,
              type=click.Choice(["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "int8"]),
              help="Storage type for the chosen components.")
@click.option("--components", default=None, metavar="LIST",
              help="Comma list of unet,te,vae (default all, with the VAE kept at fp16 "
                   "or better).")
def quantize_cmd(model: str, output: str, dtype: str, components: str | None,
                 **common: Any) -> None:
    """Store components at a lower precision; int8 is per-channel symmetric
    (modelkit.int8.per_channel v1, see 'modelkit dequantize')."""
    _run([model], [("quantize", {"dtype": dtype, "components": components})], output,
         common, _quantize_lines)


@click.command("dequantize")
@click.argument("model", type=click.Path())
@_common
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16",
              show_default=True)
def dequantize_cmd(model: str, output: str, dtype: str, **common: Any) -> None:
    """Restore a normal checkpoint from an int8 (or fp8) one."""
    _run([model], [("dequantize", {"dtype": dtype})], output, common,
         _plain_lines)


@click.command("export-gguf")
@click.argument("model", type=click.Path())
@_common
@click.option("--type", "qtype", type=click.Choice(["q8_0", "f16", "bf16"]), default="q8_0",
              show_default=True, help="GGUF tensor type for the quantized weights.")
@click.option("--keep-shapes", is_flag=True,
              help="Keep every tensor in its own shape (conv kernels stay F16): for "
                   "stable-diffusion.cpp, which ignores comfy.gguf.orig_shape records. "
                   "Default: ComfyUI-GGUF layout, conv kernels quantized too (smaller).")
def export_gguf_cmd(model: str, output: str, qtype: str, keep_shapes: bool, **common: Any) -> None:
    """Write the UNet as GGUF for ComfyUI-GGUF (models/unet) or, with
    --keep-shapes, stable-diffusion.cpp."""
    _run([model], [], output, common, _plain_lines, fmt="gguf",
         gguf_type=qtype, gguf_flatten=not keep_shapes)


@click.command("convert")
@click.argument("model", type=click.Path())
@_common
@click.option("--to", "fmt", type=click.Choice(["safetensors", "diffusers"]), default=None,
              help="Output format (default: from the output name; a name without "
                   ".safetensors is a diffusers folder).")
def convert_cmd(model: str, output: str, fmt: str | None, **common: Any) -> None:
    """Convert .ckpt/.pt to .safetensors (safe loader), or a diffusers folder
    to a single original-layout file and back."""
    _run([model], [], output, common, _plain_lines, fmt=fmt)


@click.command("swap")
@click.argument("model", type=click.Path())
@_common
@click.option("--vae", "vae", type=click.Path(), default=None, help="VAE to put in.")
@click.option("--unet", "unet", type=click.Path(), default=None, help="UNet to put in.")
@click.option("--te", "te", type=click.Path(), default=None, help="Text encoder(s) to put in.")
def swap_cmd(model: str, output: str, vae: str | None, unet: str | None, te: str | None,
             **common: Any) -> None:
    """Replace one component with another file's (shapes are checked)."""
    given = {k: v for k, v in (("vae", vae), ("unet", unet), ("te", te)) if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --vae, --unet, --te")
    (component, donor), = given.items()
    _run([model, donor], [("swap", {"component": component})], output, common, _plain_lines)


@click.command("extract")
@click.argument("model", type=click.Path())
@_common
@click.option("--component", required=True,
              type=click.Choice(["vae", "unet", "te", "te1", "te2"]))
def extract_cmd(model: str, output: str, component: str, **common: Any) -> None:
    """Write one component of a checkpoint to its own file."""
    _run([model], [("extract", {"component": component})], output, common, _plain_lines)
