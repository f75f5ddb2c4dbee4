"""What every writing command shares: its options, running a recipe through
the one runner with progress on stderr, and printing the report (JSON with
``--json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from modelkit.cli.progress import StderrProgress
from modelkit.vocab import DEVICES


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-o``, ``--overwrite``, ``--json``, ``-q`` and ``--device``."""
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace OUTPUT if it exists (never allowed for an input).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(fn)
    fn = click.option("--device", type=click.Choice(DEVICES), default="cpu",
                      show_default=True, help="Where tensors are read and computed.")(fn)
    return click.option("-o", "--output", required=True, type=click.Path(),
                        help="Output path (never one of the inputs).")(fn)


def execute(recipe: Any, common: dict[str, Any], render: Callable[[Any], list[str]],
            *, output: str | None = None, dry_run: bool = False) -> Any:
    """Run ``recipe`` and print its report: JSON with ``--json``, else the
    lines ``render(report)`` returns. Returns the report."""
    from modelkit.core.runner import run

    progress = StderrProgress(common.get("quiet", False))
    try:
        report = run(recipe, output=output, progress=progress,
                     overwrite=common.get("overwrite", False), dry_run=dry_run)
    finally:
        progress.close()
    if common.get("as_json"):
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in render(report):
            click.echo(line)
    return report


def options_from(common: dict[str, Any], **fields: Any) -> Any:
    """Recipe options with ``--device`` and the given fields."""
    from modelkit.core.recipe import Options

    return Options(device=common.get("device", "cpu"), **fields)
