"""The README's command table and the CLI's help agree: every command and
option in one is in the other (common options are documented once)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from modelkit.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
COMMON = {"--output", "--overwrite", "--json", "--quiet", "--device"}
SHORT = {"-o": "--output", "-q": "--quiet", "-j": "--jobs"}


def _help_commands() -> dict[str, set[str]]:
    """Command path -> its options, from the CLI itself."""
    ctx = click.Context(cli)
    found: dict[str, set[str]] = {}

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])
            return
        found[" ".join(path)] = {o for p in cmd.params if isinstance(p, click.Option)
                                 for o in (*p.opts, *p.secondary_opts)
                                 if o.startswith("--") and o != "--help"}

    walk(cli, [])
    return found


def _readme_commands() -> dict[str, set[str]]:
    """Command path -> the options its usage in the README table shows."""
    text = README.read_text()
    table = text[text.index("| command | what it does |"):]
    table = table[:table.index("\n\n")]
    found: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        usage_cell = row.split(" | ")[0]
        for usage in re.findall(r"`(modelkit [^`]+)`", usage_cell):
            words = usage.split()[1:]
            path = []
            for w in words:
                if not re.fullmatch(r"[a-z][a-z-]*", w):
                    break
                path.append(w)
            opts = {SHORT.get(o, o) for o in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", usage)}
            found[" ".join(path)] = found.get(" ".join(path), set()) | opts
    return found


def test_every_command_is_in_the_readme_and_the_other_way_round() -> None:
    helps, readme = _help_commands(), _readme_commands()
    assert set(helps) == set(readme), (set(helps) ^ set(readme))


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    helps, readme = _help_commands(), _readme_commands()
    for path, options in helps.items():
        shown = readme.get(path, set())
        missing = options - COMMON - shown
        assert not missing, f"{path}: {sorted(missing)} not in the README"
        unknown = shown - options
        assert not unknown, f"{path}: README shows {sorted(unknown)}, the command has no such"


def test_the_common_options_are_documented() -> None:
    text = README.read_text()
    for option in ("-o/--output", "--overwrite", "--json", "-q/--quiet", "--device"):
        assert f"`{option}" in text, option


def readme_method_problems(methods: dict[str, str]) -> list[str]:
    """What the README's ``merge`` row gets wrong about ``methods`` (name ->
    summary, the registry's merge methods): a method it does not name, or a
    name it gives that is not registered."""
    row = next(r for r in README.read_text().splitlines() if r.startswith("| `modelkit merge "))
    listed = row[row.index("Methods: "):]
    listed = listed[:listed.index(". ")]
    named = re.findall(r"`([a-z][a-z0-9_]*)`", listed)
    return ([f"{m} ({methods[m]}) is not in the README's merge row" for m in methods
             if m not in named] +
            [f"the README's merge row names {n}, which is not registered" for n in named
             if n not in methods])


def test_the_readme_names_every_merge_method_and_no_other() -> None:
    from modelkit.core.registry import METHOD, all_transforms

    methods = {n: t.summary for n, t in all_transforms().items() if t.kind == METHOD}
    assert readme_method_problems(methods) == []
    assert readme_method_problems({**methods, "extra": "x"}) == [
        "extra (x) is not in the README's merge row"]
    del methods["slerp"]
    assert readme_method_problems(methods) == [
        "the README's merge row names slerp, which is not registered"]
