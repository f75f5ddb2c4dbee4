"""What every writing command shares: its options, running a recipe through
the one runner with progress on stderr, and printing the report (JSON with
``--json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
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


_LAST_OUTPUT: list[Path] = []


def last_output() -> Path | None:
    """The output the command in progress writes (for an honest message
    when it is interrupted)."""
    return _LAST_OUTPUT[-1] if _LAST_OUTPUT else None


def execute(recipe: Any, common: dict[str, Any], render: Callable[[Any], list[str]],
            *, output: str | None = None, dry_run: bool = False, verify: bool = False
            ) -> Any:
    """Run ``recipe`` and print its report: JSON with ``--json``, else the
    lines ``render(report)`` returns. Returns the report."""
    from modelkit.engine.runner import output_path, run

    if not dry_run:
        _LAST_OUTPUT.append(output_path(recipe, output))

    progress = StderrProgress(common.get("quiet", False))
    try:
        report = run(recipe, output=output, progress=progress,
                     overwrite=common.get("overwrite", False), dry_run=dry_run,
                     verify=verify)
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


def split_list(text: str) -> list[str]:
    """A comma list, split at top-level commas only (a regex's ``{2,3}`` or
    ``[a,b]`` stays whole)."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [x.strip() for x in items if x.strip()]


class CommaList(click.ParamType):
    """An option value that is a comma list; with ``multiple=True`` the
    option also repeats (``--include unet,te`` = ``--include unet
    --include te``). ``choices`` are checked per item."""

    name = "list"

    def __init__(self, choices: tuple[str, ...] = (), item: str = "value") -> None:
        self.choices = choices
        self.item = item

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + ",".join(self.choices) + "]" if self.choices else "LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> list[str]:
        items = value if isinstance(value, list) else split_list(str(value))
        for item in items:
            if self.choices and item not in self.choices:
                self.fail(f"unknown {self.item} {item!r}; choose from "
                          f"{', '.join(self.choices)}", param, ctx)
        return items


def flat(values: tuple[list[str], ...] | None) -> tuple[str, ...]:
    """The items of a repeated CommaList option, in order."""
    return tuple(x for group in values or () for x in group)
