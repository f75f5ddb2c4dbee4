"""``modelkit merge`` and ``modelkit recipe``."""

from __future__ import annotations

import sys
from typing import Any

import click

from modelkit.cli.common import CommaList, execute, flat
from modelkit.cli.progress import StderrProgress, human_bytes
from modelkit.textsafe import safe_text, shown
from modelkit.vocab import (
    BLOCK_MAPS,
    COMPONENTS,
    DEVICES,
    MERGE_OUTPUT_DTYPES,
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


@click.command("merge", epilog=MERGE_EPILOG)
@click.argument("models", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors file (never one of the inputs).")
@click.option("--method", default="weighted_sum", show_default=True,
              help="Merge method (see 'modelkit methods').")
@click.option("--alpha", type=float, default=None,
              help=f"alpha, toward B (default {0.3}, A1111's, for methods that need it).")
@click.option("--beta", type=float, default=None, help="beta, for methods that take it.")
@click.option("--blocks", default=None,
              help="Block-wise alpha: 26 (SD1/SD2) or 20 (SDXL) comma-separated numbers "
                   "in the order BASE, IN00.., M00, OUT.. (27/21 with the optional VAE "
                   "entry last), or a preset name.")
@click.option("--beta-blocks", default=None, help="Block-wise beta, same forms as --blocks.")
@click.option("--param", "extra", multiple=True, metavar="NAME=VALUE",
              help="Other method parameters, e.g. --param k=0.2.")
@click.option("--dtype", type=click.Choice(MERGE_OUTPUT_DTYPES),
              default="fp16", show_default=True, help="Output dtype for float tensors.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None,
              help="Output format (default: from the output name: .safetensors, .gguf "
                   "for the UNet as GGUF, anything else a diffusers folder).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu",
              show_default=True)
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT if it exists (never allowed for an input).")
def merge_cmd(models: tuple[str, ...], output: str, method: str, alpha: float | None,
              beta: float | None, blocks: str | None, beta_blocks: str | None,
              extra: tuple[str, ...], dtype: str, fmt: str | None, device: str, block_map: str,
              missing: str, include: tuple[list[str], ...],
              exclude_keys: tuple[list[str], ...],
              vae: str | None, seed: int, dry_run: bool, as_json: bool, quiet: bool,
              overwrite: bool) -> None:
    """Merge two or three checkpoints in one step (builds a recipe and runs it)."""
    from modelkit.core.recipe import COMMAND_LINE, Options, Recipe

    for flat_value, block_value, name in ((alpha, blocks, "alpha"), (beta, beta_blocks, "beta")):
        if flat_value is not None and block_value:
            opt = "--blocks" if name == "alpha" else "--beta-blocks"
            raise click.UsageError(f"give --{name} or {opt}, not both: {opt} sets {name} "
                                   "per block (a single value is a flat list)")
    params: dict[str, object] = {}
    if alpha is not None or blocks:
        params["alpha"] = blocks or alpha
    if beta is not None or beta_blocks:
        params["beta"] = beta_blocks or beta
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        params[name] = _number(value)
    _default_alpha(method, params)
    options = Options(device, block_map, missing, flat(include) or COMPONENTS,
                      flat(exclude_keys), vae, seed)
    recipe = Recipe.merge(*models, method=method, output=output, dtype=dtype,
                          options=options, source=COMMAND_LINE, **params)
    if fmt:
        recipe = recipe.with_output(format=fmt)
    execute(recipe, {"quiet": quiet, "as_json": as_json, "overwrite": overwrite},
            _merge_lines, dry_run=dry_run)


DEFAULT_ALPHA = 0.3  # A1111's checkpoint merger default multiplier


def _default_alpha(method: str, params: dict[str, object]) -> None:
    """A1111's default alpha for a method that needs one when none is given."""
    from modelkit.core.registry import all_transforms

    t = all_transforms().get(method)
    if t is not None and "alpha" in t.params and t.params["alpha"].required \
            and "alpha" not in params:
        params["alpha"] = DEFAULT_ALPHA


def _number(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


@click.group("recipe")
def recipe_group() -> None:
    """Run, lock, show and replay merge recipes (versioned YAML)."""


@recipe_group.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output path (overrides output.path).")
@click.option("--dry-run", is_flag=True, help="Plan only; read no tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--overwrite", is_flag=True,
              help="Replace the output if it exists (never allowed for an input).")
@click.option("--verify", "verify", is_flag=True,
              help="Render and check the output after writing (the recipe's verify: "
                   "section, or the defaults); exit 1 when a check fails.")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="Where tensors are read and computed (overrides options.device).")
def recipe_run(recipe: str, output: str | None, dry_run: bool, as_json: bool,
               quiet: bool, overwrite: bool, verify: bool, device: str | None) -> None:
    """Run a recipe file (exit 1 when its verification fails)."""
    from dataclasses import replace

    from modelkit.core.recipe import load_recipe

    loaded = load_recipe(recipe)
    if device is not None:
        loaded.options = replace(loaded.options, device=device)
    report = execute(loaded, {"quiet": quiet, "as_json": as_json, "overwrite": overwrite},
                     _merge_lines, output=output, dry_run=dry_run, verify=verify)
    if report.verify is not None and not report.verify.passed:
        raise click.exceptions.Exit(1)


@recipe_group.command("lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the locked recipe (default RECIPE.lock.yaml).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--overwrite", is_flag=True,
              help="Replace the output if it exists (never the recipe or an input).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the locked file and the pinned sha256 of every input as JSON.")
def recipe_lock(recipe: str, output: str | None, quiet: bool, overwrite: bool,
                as_json: bool) -> None:
    """Write a copy of the recipe with every input's sha256 pinned."""
    import json

    from modelkit.core.lock import lock_recipe
    from modelkit.core.recipe import load_recipe

    path = lock_recipe(recipe, output, StderrProgress(quiet), overwrite=overwrite)
    if as_json:
        pins = {n: i.sha256 for n, i in load_recipe(path).inputs.items()}
        click.echo(json.dumps({"recipe": str(recipe), "locked": str(path), "inputs": pins},
                              indent=2))
    else:
        click.echo(f"locked {shown(path)}")


@recipe_group.command("show")
@click.argument("model", type=click.Path(dir_okay=False))
def recipe_show(model: str) -> None:
    """Print the recipe embedded in a merge output."""
    from modelkit.core.lock import embedded_recipe

    sys.stdout.write(safe_text(embedded_recipe(model)[0], keep_newlines=True))


@recipe_group.command("replay")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Compare with MODEL and report bit-exactness.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Keep the replayed file here (default: a temp file, removed).")
@click.option("--search", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folders to look for the inputs in (by file name, then by sha256); "
                   "MODEL's folder is always searched.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="Where tensors are read and computed (overrides the recipe's device).")
def recipe_replay(model: str, check: bool, output: str | None, search: tuple[str, ...],
                  overwrite: bool, as_json: bool, quiet: bool, device: str | None) -> None:
    """Re-run the recipe embedded in MODEL; with --check, compare tensors."""
    import json

    from modelkit.core.lock import replay

    progress = StderrProgress(quiet)
    result = replay(model, output, progress=progress, search=search, overwrite=overwrite,
                    device=device)
    progress.close()
    if as_json:
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
