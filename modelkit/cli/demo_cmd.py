"""``modelkit demo``."""

from __future__ import annotations

from pathlib import Path

import click

from modelkit.cli.common import common_option
from modelkit.cli.progress import StderrProgress
from modelkit.textsafe import shown
from modelkit.wording import plural


@click.command("demo")
@click.argument("directory", required=False, default="modelkit-demo",
                type=click.Path(file_okay=False, path_type=Path))
@common_option("quiet")
@common_option("overwrite",
               help="Replace an earlier demo in DIRECTORY (only a folder 'modelkit demo' "
                    "made; its demo files are rewritten, other files are kept).")
def demo_cmd(directory: Path, quiet: bool, overwrite: bool) -> None:
    """Build a tiny demo model library and run modelkit on it.

    Writes seeded synthetic checkpoints, a VAE, LoRA/LoHa/LoKr adapters and
    embeddings in an A1111-like layout under DIRECTORY (default
    ./modelkit-demo), runs a merge recipe (DIRECTORY/sd15-mix-inpainting.yaml),
    then inspects and hashes every file and writes DIRECTORY/library.json. Last, it verifies
    the recipe's output against its inpainting parent (the library's negative
    embedding in the prompts) and writes
    DIRECTORY/verify/report.json and grid.png. A small tokenizer goes to
    DIRECTORY/models/tokenizers/clip, so 'modelkit verify' works offline on
    every checkpoint there.
    """
    from modelkit.demo import run_demo

    progress = StderrProgress(quiet)
    result = run_demo(directory, progress, overwrite=overwrite)
    progress.close()
    if result.replaced:
        click.echo(f"modelkit: replaced the earlier demo in {shown(result.root)} (its files "
                   "rewritten; other files kept)", err=True)
    rows = [[shown(c) for c in (
        str(Path(str(rep["path"])).relative_to(result.root)), str(rep["kind"]),
        str(rep["arch"]), str(rep["prediction"]["type"]),
        str(rep["variant"] or "-"), str(h["autov2"]))]
        for rep, h in zip(result.reports, result.hashes, strict=True)]
    header = ["file", "kind", "arch", "pred", "variant", "autov2"]
    # widths of the text as shown (escapes included), so long or odd names align
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"\n{plural(len(result.files), 'file')} in {result.root}; full report: "
               f"{result.summary_path}")
    click.echo(f"verify {Path(result.files[-1]).name} against its inpainting parent: "
               f"{result.verify_summary}")
    click.echo(f"verify report: {result.verify_report}")
    click.echo(f"verify grid: {result.verify_grid}")
