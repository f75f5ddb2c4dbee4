"""What every writing command shares: its options, running a recipe through
the one runner with progress on stderr, and printing the report (JSON with
``--json``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from modelkit.cli.progress import StderrProgress
from modelkit.vocab import DEVICES, KEEP, MERGE_OUTPUT_DTYPES, OUTPUT_FORMATS


@dataclass(frozen=True)
class CommonOptions:
    """The options writing commands share, declared once (see
    :func:`common_options`): what a command's ``common`` argument holds."""

    output: str | None = None
    overwrite: bool = False
    as_json: bool = False
    quiet: bool = False
    device: str | None = "cpu"
    dtype: str | None = None
    format: str | None = None


# each common option, declared once: (flags, click settings); a command may
# override a setting (a help text, a default, its dtype choices)
COMMON_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "output": (("-o", "--output"), {"required": True, "type": click.Path(),
                                    "help": "Output path (never one of the inputs)."}),
    "overwrite": (("--overwrite",), {
        "is_flag": True, "help": "Replace OUTPUT if it exists (never allowed for an input)."}),
    "as_json": (("--json", "as_json"), {"is_flag": True, "help": "Print the report as JSON."}),
    "quiet": (("-q", "--quiet"), {"is_flag": True, "help": "No progress on stderr."}),
    "device": (("--device",), {"type": click.Choice(DEVICES), "default": "cpu",
                               "show_default": True,
                               "help": "Where tensors are read and computed."}),
    "dtype": (("--dtype",), {"type": click.Choice(MERGE_OUTPUT_DTYPES), "default": KEEP,
                             "show_default": True,
                             "help": "Float dtype of the output tensors."}),
    "format": (("--format", "format"), {"type": click.Choice(OUTPUT_FORMATS), "default": None,
                                        "help": "Output format (default: from the output "
                                                "name)."}),
}
DEFAULT_COMMON = ("output", "device", "as_json", "quiet", "overwrite")


def common_option(name: str, **overrides: Any) -> Callable[[Callable[..., Any]], Any]:
    """One common option as declared in :data:`COMMON_OPTIONS` (``overrides``
    change its click settings), for a command that takes it as a plain
    argument of the same name (``as_json`` for ``--json``)."""
    flags, settings = COMMON_OPTIONS[name]
    return click.option(*flags, **{**settings, **overrides})


def common_options(*names: str, **overrides: dict[str, Any]
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the common options ``names`` (default: ``-o``, ``--device``,
    ``--json``, ``-q``, ``--overwrite``; ``overrides`` change one's click
    settings) to a command, which receives them as one :class:`CommonOptions`
    in its ``common`` argument."""
    chosen = names or DEFAULT_COMMON

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in chosen}
            return fn(common=CommonOptions(**given), **kwargs)

        for name in reversed(chosen):
            command = common_option(name, **overrides.get(name, {}))(command)
        return command

    return decorate


def _option_for(p: Any, flag: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Click flags and settings for parameter ``p`` (its declaration: type,
    choices, default, help)."""
    settings: dict[str, Any] = {"help": p.help or None}
    dest = p.name
    if p.kind == "bool":
        if not p.required and p.default:
            return (f"{flag}/--no-{flag[2:]}", dest), {**settings, "default": True,
                                                       "show_default": True}
        return (flag, dest), {**settings, "is_flag": True, "default": False}
    if p.kind == "list":
        what = p.name[:-1] if p.name.endswith("s") else p.name
        return (flag, dest), {**settings, "multiple": True, "type": CommaList(p.choices, what)}
    types = {"int": click.INT, "float": click.FLOAT}
    if p.kind == "choice":
        settings["type"] = click.Choice(p.choices)
    elif p.kind in types:
        settings["type"] = types[p.kind]
    elif p.kind == "any":
        settings["metavar"] = "SPEC"
    if p.required:
        settings["required"] = True
    else:
        settings["default"] = p.default
        settings["show_default"] = p.default is not None
    return (flag, dest), settings


def transform_options(name: str, *, skip: tuple[str, ...] = ()
                      ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One option per parameter of transform ``name`` (but ``skip``), with
    the type, choices, default and help its declaration gives; the command
    receives the given values as a dict in its ``params`` argument."""
    from modelkit.core.registry import get_transform

    declared = [p for p in get_transform(name).params.values() if p.name not in skip]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            params = {p.name: kwargs.pop(p.name) for p in declared}
            for p in declared:
                if p.kind == "list":
                    params[p.name] = flat(params[p.name]) or None
            return fn(params=params, **kwargs)

        for p in reversed(declared):
            flags, settings = _option_for(p, "--" + p.name.replace("_", "-"))
            command = click.option(*flags, **settings)(command)
        return command

    return decorate


_LAST_OUTPUT: list[Path] = []


def last_output() -> Path | None:
    """The output the command in progress writes (for an honest message
    when it is interrupted)."""
    return _LAST_OUTPUT[-1] if _LAST_OUTPUT else None


def execute(recipe: Any, common: CommonOptions, render: Callable[[Any], list[str]],
            *, output: str | None = None, dry_run: bool = False, verify: bool = False
            ) -> Any:
    """Run ``recipe`` and print its report: JSON with ``--json``, else the
    lines ``render(report)`` returns. Returns the report."""
    from modelkit.engine.runner import output_path, run

    if not dry_run:
        _LAST_OUTPUT.append(output_path(recipe, output))

    progress = StderrProgress(common.quiet)
    try:
        report = run(recipe, output=output, progress=progress, overwrite=common.overwrite,
                     dry_run=dry_run, verify=verify)
    finally:
        progress.close()
    if common.as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in render(report):
            click.echo(line)
    return report


def options_from(common: CommonOptions, **fields: Any) -> Any:
    """Recipe options with ``--device`` and the given fields."""
    from modelkit.core.recipe import Options

    return Options(device=common.device or "cpu", **fields)


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
