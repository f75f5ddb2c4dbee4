"""``modelkit merge`` and ``modelkit recipe``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from modelkit.cli.common import (
    DEFAULT_COMMON,
    CommaList,
    CommonOptions,
    common_options,
    execute,
    flat,
)
from modelkit.cli.progress import StderrProgress, human_bytes
from modelkit.textsafe import safe_text, shown
from modelkit.vocab import (
    AUTO_DTYPE,
    BLOCK_MAPS,
    COMPONENTS,
    MISSING_KEY_POLICIES,
    OUTPUT_FORMATS,
)
from modelkit.wording import plural

MERGE_EPILOG = """\b
Examples:
  modelkit merge a.safetensors b.safetensors -o ab.safetensors --alpha 0.3
  modelkit merge a.safetensors b.safetensors c.safetensors -o out.safetensors \\
      --method add_difference --alpha 1
  modelkit merge a.safetensors b.safetensors -o out.safetensors \\
      --blocks 0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1
  modelkit merge a.safetensors b.safetensors -o out.safetensors --blocks out_only
  modelkit merge flux_a.safetensors flux_b.safetensors -o out.safetensors \\
      --blocks "double_blocks.0-5=0.2,SINGLE=0.7,default=0.5"

alpha moves toward B (A1111 convention): alpha=0 gives A, alpha=1 gives B.
ComfyUI's ModelMergeSimple ratio runs the other way.
"""


def _merge_lines(report: Any) -> list[str]:
    verb = "would write" if report.dry_run else "wrote"
    out = [f"{verb} {shown(report.output)} ({report.arch}): {plural(report.n_tensors, 'tensor')}, "
           f"{report.n_merged} merged, {report.n_copied} copied, {report.n_skipped} skipped, "
           f"{human_bytes(report.output_bytes)}",
           f"estimated peak working memory: {human_bytes(report.peak_estimate_bytes)} "
           "plus the interpreter and torch (~200 MB)"]
    if not report.dry_run:
        out.append(f"took {report.seconds:.1f}s")
    if report.n_ignored:
        exist = "exists" if report.n_ignored == 1 else "exist"
        out.append(f"note: {plural(report.n_ignored, 'key')} {exist} only in B/C and "
                   f"{'was' if report.n_ignored == 1 else 'were'} ignored")
    if report.dry_run:
        out += _block_weight_lines(report)
    if report.verify is not None:
        out.append(f"verify: {shown(report.verify.summary())}")
    for w in report.warnings[:20]:
        click.echo(f"warning: {shown(w)}", err=True)
    return out


def _block_weight_lines(report: Any) -> list[str]:
    """The resolved per-block weights of every block-wise parameter."""
    from modelkit.arch.blocks import weights_title
    from modelkit.cli.info_cmd import block_table

    out = []
    for step in report.steps:
        for name, weights in (getattr(step.report, "block_weights", None) or {}).items():
            out.append(f"block weights of {name} ({weights_title(weights)}):")
            out += block_table(weights)
    return out


BLOCK_OPTIONS = {"alpha": "--blocks"}  # alpha's block-wise option (others: --NAME-blocks)
BLOCK_FORMS = ("26 (SD1/SD2) or 20 (SDXL) comma-separated numbers in the order BASE, "
               "IN00.., M00, OUT.. (27/21 with the optional VAE entry last), a preset "
               "name, or NAME=V,...,default=V with the family's block names and groups "
               "(Flux.1: img_in, double_blocks.0-18, SINGLE, ...; 'modelkit presets' "
               "lists every family's)")


def _shared_method_params() -> dict[str, list[tuple[str, Any]]]:
    """The parameters two or more merge methods declare, with (method,
    declaration) pairs: each gets its own option; any other goes through
    ``--param NAME=VALUE``."""
    from modelkit.core.registry import METHOD, all_transforms

    uses: dict[str, list[tuple[str, Any]]] = {}
    for t in all_transforms().values():
        if t.kind == METHOD:
            for p in t.params.values():
                uses.setdefault(p.name, []).append((t.name, p))
    return {name: found for name, found in uses.items() if len(found) > 1}


def method_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--NAME`` (and its block-wise variant) for each parameter several
    merge methods share, typed and explained by their declarations; the
    command receives the given values as ``method_params``."""
    shared = _shared_method_params()

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        values: dict[str, Any] = {}
        for name in shared:
            flat_value, blocks = kwargs.pop(name), kwargs.pop(f"{name}_blocks", None)
            if flat_value is not None and blocks:
                opt = BLOCK_OPTIONS.get(name, f"--{name}-blocks")
                raise click.UsageError(f"give --{name} or {opt}, not both: {opt} sets {name} "
                                       "per block (a single value is a flat list)")
            if blocks or flat_value is not None:
                values[name] = blocks or flat_value
        return fn(method_params=values, **kwargs)

    for name, found in reversed(shared.items()):
        declared = [p for _, p in found]
        first = next((p for p in declared if p.help), declared[0])
        suggested = next((p.suggested for p in declared if p.suggested is not None), None)
        default = f"; default {suggested:g} where a method needs it" if suggested is not None \
            else ""
        help_text = (f"{first.help.rstrip('.')} ({', '.join(m for m, _ in found)}"
                     f"{default}).")
        if all(p.blockwise for p in declared):
            opt = BLOCK_OPTIONS.get(name, f"--{name}-blocks")
            command = click.option(opt, f"{name}_blocks", default=None,
                                   help=f"Block-wise {name}: {BLOCK_FORMS}.")(command)
        kinds = {p.kind for p in declared}
        ptype = click.FLOAT if kinds <= {"float"} else click.INT if kinds == {"int"} else None
        command = click.option(f"--{name.replace('_', '-')}", name, type=ptype, default=None,
                               help=help_text)(command)
    return command


@click.command("merge", epilog=MERGE_EPILOG)
@click.argument("models", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=str))
@common_options(*DEFAULT_COMMON, "dtype", "format", output={
    "type": click.Path(dir_okay=False),
    "help": "Output .safetensors file (never one of the inputs)."}, dtype={
    "default": None, "help": "Output dtype for float tensors (default: fp16, but bf16 "
                             "tensors stay bf16: Flux.1 overflows in fp16; a bf16 "
                             "family's fp32 tensors are written bf16)."}, format={
    "type": click.Choice(OUTPUT_FORMATS),
    "help": "Output format (default: from the output name: .safetensors, .gguf for the "
            "UNet as GGUF, anything else a diffusers folder)."})
@click.option("--method", default="weighted_sum", show_default=True,
              help="Merge method (see 'modelkit methods').")
@method_options
@click.option("--param", "extra", multiple=True, metavar="NAME=VALUE",
              help="Other method parameters, e.g. --param k=0.2.")
@click.option("--block-map", type=click.Choice(BLOCK_MAPS),
              default="supermerger", show_default=True, help="Key-to-block map.")
@click.option("--missing", type=click.Choice(MISSING_KEY_POLICIES),
              default="error", show_default=True, help="Policy for keys missing from B/C.")
@click.option("--include", multiple=True, type=CommaList(COMPONENTS, "component"),
              help="Components to merge (default all); others are copied from A.")
@click.option("--exclude-key", "exclude_keys", multiple=True, type=CommaList(),
              metavar="REGEX",
              help="Keys matching REGEX are copied from A unmerged.")
@click.option("--vae", type=click.Path(dir_okay=False), default=None,
              help="Bake this VAE into the output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for DARE.")
@click.option("--dry-run", is_flag=True, help="Print the plan, size and memory estimate; "
              "read no tensor.")
def merge_cmd(models: tuple[str, ...], common: CommonOptions, method: str,
              method_params: dict[str, Any], extra: tuple[str, ...], block_map: str,
              missing: str, include: tuple[list[str], ...],
              exclude_keys: tuple[list[str], ...],
              vae: str | None, seed: int, dry_run: bool) -> None:
    """Merge two or three checkpoints in one step (builds a recipe and runs it)."""
    from modelkit.core.recipe import COMMAND_LINE, Options, Recipe
    from modelkit.core.registry import Typed

    # the values as given (typed by click, or text for --param): the recipe
    # validator reads the method's declaration once, parses the text, fills
    # the suggested alpha and checks every value
    params = {k: v for k, v in method_params.items() if v is not None}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        params[name] = Typed(value)
    options = Options(common.device or "cpu", block_map, missing,
                      flat(include) or COMPONENTS, flat(exclude_keys), vae, seed)
    recipe = Recipe.merge(*models, method=method, output=common.output,
                          dtype=common.dtype or AUTO_DTYPE, options=options,
                          source=COMMAND_LINE, suggest=True, **params)
    if common.format:
        recipe = recipe.with_output(format=common.format)
    execute(recipe, common, _merge_lines, dry_run=dry_run)


@click.group("recipe")
def recipe_group() -> None:
    """Run, lock, show and replay merge recipes (versioned YAML)."""


@recipe_group.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@common_options(*DEFAULT_COMMON, output={
    "required": False, "default": None, "help": "Output path (overrides output.path)."},
    overwrite={"help": "Replace the output if it exists (never allowed for an input)."},
    device={"default": None, "show_default": False,
            "help": "Where tensors are read and computed (overrides options.device)."})
@click.option("--dry-run", is_flag=True, help="Plan only; read no tensor.")
@click.option("--verify", "verify", is_flag=True,
              help="Render and check the output after writing (the recipe's verify: "
                   "section, or the defaults); exit 1 when a check fails.")
def recipe_run(recipe: str, common: CommonOptions, dry_run: bool, verify: bool) -> None:
    """Run a recipe file (exit 1 when its verification fails)."""
    from dataclasses import replace

    from modelkit.core.recipe import load_recipe

    loaded = load_recipe(recipe)
    if common.device is not None:
        loaded.options = replace(loaded.options, device=common.device)
    report = execute(loaded, common, _merge_lines, output=common.output, dry_run=dry_run,
                     verify=verify)
    if report.verify is not None and not report.verify.passed:
        raise click.exceptions.Exit(1)


@recipe_group.command("lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@common_options("output", "quiet", "overwrite", "as_json", output={
    "required": False, "default": None, "type": click.Path(dir_okay=False),
    "help": "Where to write the locked recipe (default RECIPE.lock.yaml)."},
    overwrite={"help": "Replace the output if it exists (never the recipe or an input)."},
    as_json={"help": "Print the locked file and the pinned sha256 of every input as JSON."})
def recipe_lock(recipe: str, common: CommonOptions) -> None:
    """Write a copy of the recipe with every input's sha256 pinned."""
    import json

    from modelkit.core.recipe import load_recipe
    from modelkit.engine.lock import lock_recipe

    path = lock_recipe(recipe, common.output, StderrProgress(common.quiet),
                       overwrite=common.overwrite)
    if common.as_json:
        pins = {n: i.sha256 for n, i in load_recipe(path).inputs.items()}
        click.echo(json.dumps({"recipe": str(recipe), "locked": str(path), "inputs": pins},
                              indent=2))
    else:
        click.echo(f"locked {shown(path)}")


@recipe_group.command("show")
@click.argument("model", type=click.Path(dir_okay=False))
def recipe_show(model: str) -> None:
    """Print the recipe embedded in a merge output."""
    from modelkit.engine.lock import embedded_recipe

    sys.stdout.write(safe_text(embedded_recipe(model)[0], keep_newlines=True))


@recipe_group.command("replay")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Compare with MODEL and report bit-exactness.")
@common_options(*DEFAULT_COMMON, output={
    "required": False, "default": None, "type": click.Path(dir_okay=False),
    "help": "Keep the replayed file here (default: a temp file, removed)."},
    overwrite={"help": "Replace --output if it exists."},
    as_json={"help": "Print the comparison as JSON."},
    device={"default": None, "show_default": False,
            "help": "Where tensors are read and computed (overrides the recipe's device)."})
@click.option("--search", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folders to look for the inputs in (by file name, then by sha256); "
                   "MODEL's folder is always searched.")
def recipe_replay(model: str, check: bool, common: CommonOptions, search: tuple[str, ...]
                  ) -> None:
    """Re-run the recipe embedded in MODEL; with --check, compare tensors."""
    import json

    from modelkit.engine.lock import replay

    progress = StderrProgress(common.quiet)
    result = replay(model, common.output, progress=progress, search=search,
                    overwrite=common.overwrite, device=common.device)
    progress.close()
    if common.as_json:
        click.echo(json.dumps({"model": str(model), "identical": result.identical,
                               "n_tensors": result.n_tensors,
                               "n_different": result.n_different,
                               "first_difference": result.first_difference,
                               "output": str(result.output) if result.output else None},
                              indent=2))
    elif result.identical:
        click.echo(f"replay of {shown(model)}: bit-exact ({plural(result.n_tensors, 'tensor')})")
    else:
        verb = "differs" if result.n_different == 1 else "differ"
        click.echo(f"replay of {shown(model)}: DIFFERENT: {result.n_different} of "
                   f"{plural(result.n_tensors, 'tensor')} {verb} "
                   f"(first: {shown(result.first_difference, 200)})")
    if check and not result.identical:
        raise click.exceptions.Exit(1)
