"""``modelkit lora``: bake, extract, resize, merge, convert and info, thin
shells over :mod:`modelkit.lora`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import click

from modelkit.cli.common import (
    CommonOptions,
    common_option,
    common_options,
    execute,
    options_from,
    transform_options,
)
from modelkit.cli.progress import human_bytes
from modelkit.core.recipe import COMMAND_LINE, Recipe
from modelkit.textsafe import shown
from modelkit.vocab import GGUF_TYPES
from modelkit.wording import lora_weights, noun, plural

LIST_LIMIT = 15
NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def split_weights(spec: str, most: int) -> tuple[str, list[float]]:
    """``path[:w1[:w2]]`` -> (path, [w1, w2]); trailing parts are taken as
    weights only when they are numbers, so paths with ``:`` still work."""
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < most and NUMBER.match(parts[-1].strip()):
        weights.insert(0, float(parts.pop()))
    return ":".join(parts), weights


def _execute(recipe: Any, common: CommonOptions, lines: Callable[[Any], list[str]]) -> None:
    def render(report: Any) -> list[str]:
        return [f"wrote {shown(report.output)}: {plural(report.n_tensors, 'tensor')}, "
                f"{human_bytes(report.output_bytes)} in {report.seconds:.1f}s",
                *lines(report.report)]

    execute(recipe, common, render)


def _open(path: str, device: str = "cpu") -> Any:
    from modelkit.io.open import open_source

    return open_source(path, device)


def _listed(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" (first {LIST_LIMIT} of {len(items)})" if len(items) > LIST_LIMIT else ""
    return [f"{title}{more}:"] + [f"  {shown(x, 200)}" for x in items[:LIST_LIMIT]]


def _bake_lines(r: Any) -> list[str]:
    out = [f"{plural(r.keys_changed, 'checkpoint tensor')} changed ({r.arch}, "
           f"dtype {r.dtype or 'as the base'})"]
    for a in r.adapters:
        out.append(f"  {shown(a.file)} ({a.format}, {a.arch}): "
                   f"{lora_weights(a.weight, a.te_weight)}; {plural(a.n_modules, 'module')}, "
                   f"{plural(a.keys_touched, 'key')} touched; alpha from "
                   f"{a.alpha_source or 'no module'}")
        if a.no_target:
            kinds = ", ".join(f"{n} {kind}" for kind, n in a.no_target.items())
            out.append(f"  no target in the base: {kinds}")
        out += _listed("  unmatched keys (not applied)", a.unmatched)
    return out


def _svd_lines(r: Any) -> list[str]:
    ranks = sorted({x.rank for x in r.layers if not x.skipped})
    rank_text = (f"rank {ranks[0]}" if len(ranks) == 1 else
                 f"ranks {ranks[0]}..{ranks[-1]}") if ranks else "no layers"
    out = [f"{plural(r.n_modules, 'module')}, {rank_text}; relative error ||ΔW-BA||/||ΔW|| "
           f"overall {r.relative_error:.4g}"]
    worst = sorted((x for x in r.layers if not x.skipped), key=lambda x: -x.relative_error)
    out += _listed("worst layers", [f"{x.name}: rank {x.rank}, error {x.relative_error:.4g}"
                                    for x in worst[:5]])
    out += _listed("skipped (negligible difference)", r.skipped)
    out += _listed("left out (the output format has no module name for them)",
                   getattr(r, "left_out", []))
    return out


@click.group("lora")
def lora_group() -> None:
    """Bake, extract, resize, merge, convert and inspect LoRA/LyCORIS adapters."""


@lora_group.command("bake")
@click.argument("base", type=click.Path())
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:WEIGHT[:TE_WEIGHT]]...")
@common_options()
@click.option("--te-weight", type=float, default=None,
              help="Text-encoder strength for adapters that give none (default: their "
                   "weight).")
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES), default=None,
              help="GGUF type of a .gguf output (as export-gguf's --type; default "
                   "q8_0): BASE may be a GGUF file of any type, dequantized, baked and "
                   "quantized again in one pass.")
@transform_options("lora_bake", skip=("weights", "te_weights"))
def bake_cmd(base: str, loras: tuple[str, ...], te_weight: float | None, qtype: str | None,
             common: CommonOptions, params: dict[str, Any]) -> None:
    """Add adapters' ΔW into BASE (A1111's name:unet_weight:te_weight form)."""
    paths, weights, te_weights = [], [], []
    for spec in loras:
        path, ws = split_weights(spec, 2)
        paths.append(path)
        weights.append(ws[0] if ws else 1.0)
        te_weights.append(ws[1] if len(ws) > 1 else (te_weight if te_weight is not None
                                                       else weights[-1]))
    recipe = Recipe.op("lora_bake", base, *paths, output=common.output,
                       options=options_from(common), source=COMMAND_LINE, weights=weights,
                       te_weights=te_weights, **params)
    if qtype is not None:
        if common.output is None or not str(common.output).lower().endswith(".gguf"):
            raise click.UsageError("--type is the GGUF type of a .gguf output; name the "
                                   "output OUT.gguf or leave --type out")
        recipe = recipe.with_output(quant=qtype)
    _execute(recipe, common, _bake_lines)


@lora_group.command("extract")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@common_options()
@transform_options("lora_extract")
def extract_cmd(base: str, tuned: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """A LoRA approximating TUNED − BASE (kohya names, or --format), with its error
    per layer."""
    recipe = Recipe.op("lora_extract", base, tuned, output=common.output,
                       options=options_from(common), source=COMMAND_LINE, **params)
    _execute(recipe, common, _svd_lines)


@lora_group.command("resize")
@click.argument("lora", type=click.Path())
@common_options()
@transform_options("lora_resize")
def resize_cmd(lora: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Re-factorise an adapter at a new rank (exact SVD of its ΔW)."""
    recipe = Recipe.op("lora_resize", lora, output=common.output,
                       options=options_from(common), source=COMMAND_LINE, **params)
    _execute(recipe, common, _svd_lines)


@lora_group.command("merge")
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:WEIGHT]...")
@common_options()
@transform_options("lora_merge", skip=("weights",))
def merge_cmd(loras: tuple[str, ...], common: CommonOptions, params: dict[str, Any]) -> None:
    """Merge adapters exactly: sum their weighted ΔW, then re-factorise."""
    paths, weights = [], []
    for spec in loras:
        path, ws = split_weights(spec, 1)
        paths.append(path)
        weights.append(ws[0] if ws else 1.0)
    recipe = Recipe.op("lora_merge", *paths, output=common.output,
                       options=options_from(common), source=COMMAND_LINE, weights=weights,
                       **params)
    _execute(recipe, common, _svd_lines)


@lora_group.command("convert")
@click.argument("lora", type=click.Path())
@common_options()
@transform_options("lora_convert")
def convert_cmd(lora: str, common: CommonOptions, params: dict[str, Any]) -> None:
    """Rename an adapter's keys (kohya, PEFT/diffusers, ComfyUI), alpha kept."""
    recipe = Recipe.op("lora_convert", lora, output=common.output,
                       options=options_from(common), source=COMMAND_LINE, **params)
    _execute(recipe, common, _convert_lines)


def _convert_lines(r: Any) -> list[str]:
    out = [f"{plural(r['n_modules'], 'module')}: {r['from']} -> {r['to']} ({r['arch']})",
           f"read by: {r['read_by']}"]
    changes = r.get("rank_changes") or {}
    out += _listed("ranks changed (split modules fused, exact)",
                   [f"{name}: {text}" for name, text in changes.items()])
    return out


def _info_lines(r: Any) -> list[str]:
    out = [f"{shown(r.file)}: {r.format} for {r.arch} ({r.naming} names), "
           f"{plural(len(r.layers), 'module')}, "
           f"{plural(len(r.keys_touched), 'checkpoint key')} touched; alpha from "
           f"{r.alpha_source or 'no module'}"]
    head = "relative to base" if r.base else "‖ΔW‖"
    out.append(f"per block ({head}):")
    width = max([6, *(len(n) for n, b in r.blocks.items() if b.n_modules)])
    for name, b in r.blocks.items():
        if b.n_modules:
            value = b.relative if r.base and b.relative is not None else b.delta_norm
            out.append(f"  {name:<{width}} {value:10.4g}  {b.n_modules:4d} "
                       f"{noun(b.n_modules, 'module')}")
    ranks = [x.effective_rank for x in r.layers if x.effective_rank is not None]
    if ranks:
        out.append(f"effective rank at {r.energy:g} energy: min {min(ranks)}, median "
                   f"{sorted(ranks)[len(ranks) // 2]}, max {max(ranks)}")
    out += _listed("unmatched keys", r.unmatched)
    return out


@lora_group.command("info")
@click.argument("lora", type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="Checkpoint to measure the strength against.")
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="Energy share for the effective rank.")
@common_option("as_json")
@click.option("--keys", "show_keys", is_flag=True, help="List the checkpoint keys touched.")
def info_cmd(lora: str, base: str | None, energy: float, as_json: bool,
             show_keys: bool) -> None:
    """Where an adapter acts: strength per block, effective rank per layer, keys."""
    from modelkit.lora.info import info

    report = info(_open(lora), _open(base) if base else None, energy=energy)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    for line in _info_lines(report):
        click.echo(line)
    if show_keys:
        for key in report.keys_touched:
            click.echo(f"  {shown(key, 200)}")
