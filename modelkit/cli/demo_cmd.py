"""``modelkit demo``."""

from __future__ import annotations

from pathlib import Path

import click

from modelkit.cli.progress import StderrProgress


@click.command("demo")
@click.argument("directory", required=False, default="modelkit-demo",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def demo_cmd(directory: Path, quiet: bool) -> None:
    """Build a tiny demo model library and run modelkit on it.

    Writes seeded synthetic checkpoints, a VAE, LoRA/LoHa/LoKr adapters and
    embeddings in an A1111-like layout under DIRECTORY (default
    ./modelkit-demo), runs a merge recipe (DIRECTORY/recipes/), then inspects
    and hashes every file and writes DIRECTORY/library.json. Last, it verifies
    the recipe's output against its inpainting parent (the library's negative
    embedding in the prompts) and writes
    DIRECTORY/verify/report.json and grid.png. A small tokenizer goes to
    DIRECTORY/models/tokenizers/clip, so 'modelkit verify' works offline on
    every checkpoint there.
    """
    from modelkit.demo import run_demo

    result = run_demo(directory, StderrProgress(quiet))
    click.echo(f"{'file':<58} {'kind':<12} {'arch':<13} {'pred':<8} {'variant':<8} "
               f"{'autov2':<10}")
    for rep, h in zip(result.reports, result.hashes, strict=True):
        rel = str(Path(str(rep["path"])).relative_to(result.root))
        click.echo(f"{rel:<58} {rep['kind']!s:<12} {rep['arch']!s:<13} "
                   f"{rep['prediction']['type']!s:<8} {rep['variant'] or '-':<8} "  # type: ignore[index]
                   f"{h['autov2']!s:<10}")
    click.echo(f"\n{len(result.files)} files in {result.root}; full report: "
               f"{result.summary_path}")
    click.echo(f"verify {Path(result.files[-1]).name} against its inpainting parent: "
               f"{result.verify_summary}")
    click.echo(f"verify report: {result.verify_report}")
    click.echo(f"verify grid: {result.verify_grid}")
