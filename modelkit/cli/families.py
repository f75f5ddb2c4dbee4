"""The model families each command handles, as the last paragraph of its
``--help``: taken from the architecture registry
(:func:`modelkit.arch.registry.handling`), so no list is restated here."""

from __future__ import annotations

import click

from modelkit.arch import layouts, registry

# commands that read any model file and name its family, variant and layout
NAMING = frozenset({"inspect", "library", "tui"})
# commands that touch no model file of their own
NO_MODEL = frozenset({"demo", "methods", "presets"})
# commands whose work is a merge: the families merge handles
RUNS = {"recipe": "merge", "sweep": "merge"}
# commands that work on any model file's bytes or tensors, whatever its family
ANY_FILE = {"hash": "the hashes are of its bytes and tensors",
            "dequantize": "tensor by tensor"}
_DONE = "_modelkit_families"  # marks a command whose help already has the paragraph


def families_text(path: str) -> str | None:
    """The families paragraph for the command ``path`` (``merge``,
    ``lora bake``), or None for a command that handles no model file."""
    top = path.split()[0]
    if top in NO_MODEL:
        return None
    every = registry.names()
    if top in NAMING:
        return f"Families: {registry.listed(every)} (named with their variant and layout)."
    if top in ANY_FILE:
        return f"Families: any model file ({ANY_FILE[top]})."
    handled = registry.handling(RUNS.get(top, path))
    if top == "convert":  # a pickle becomes safetensors whatever it holds
        folders = tuple(n for n in handled if getattr(registry.get(n), "spec", None))
        two = tuple(n for n in handled if n in layouts.MAPS)
        return (f"Families: any model file from .ckpt/.pt to .safetensors; a diffusers "
                f"folder to a single file and back: {registry.listed(folders)}; a "
                f"transformer between the original and the diffusers layout (--layout): "
                f"{registry.listed(two)}.")
    rest = tuple(n for n in every if n not in handled)
    text = f"Families: {registry.listed(handled)}."
    if rest:
        text += f" Refused in one line: {registry.listed(rest)} (modelkit inspect names them)."
    return text


def overview() -> str:
    """The families paragraph of ``modelkit --help``: who handles what."""
    full = registry.names(support=registry.FULL)
    parts = [f"{registry.listed(full)} in every command"] if full else []
    by_commands: dict[tuple[str, ...], list[str]] = {}
    for name in registry.names():
        arch = registry.get(name)
        if arch is None or arch.support == registry.FULL:
            continue
        by_commands.setdefault(registry.commands_of(name), []).append(name)
    for commands, names in by_commands.items():
        where = "named by inspect" if commands == ("inspect",) else (
            f"in {registry.listed(commands)}")
        parts.append(f"{registry.listed(tuple(names))} {where}")
    return "Families: " + "; ".join(parts) + ". Each command's help says which it handles."


def _group_text(path: str, group: click.Group) -> str | None:
    """A group's paragraph: the families all its subcommands handle, and
    what some handle beside them (``lora``: bake also handles flux)."""
    top = path.split()[0]
    if top in NAMING or top in RUNS or top in NO_MODEL:
        return families_text(path)
    subs = {name: registry.handling(f"{path} {name}") for name in sorted(group.commands)}
    if not subs:
        return None
    common = tuple(n for n in registry.names() if all(n in h for h in subs.values()))
    extra = [f"{name} also {registry.listed(tuple(n for n in h if n not in common))}"
             for name, h in subs.items() if set(h) - set(common)]
    return f"Families: {registry.listed(common)}" + (f"; {'; '.join(extra)}." if extra else ".")


def add_families(cmd: click.Command, path: str) -> None:
    """Append the families paragraph to ``cmd``'s help (and its
    subcommands', for a group), once."""
    if getattr(cmd, _DONE, False):
        return
    setattr(cmd, _DONE, True)
    text = _group_text(path, cmd) if isinstance(cmd, click.Group) else families_text(path)
    if text:
        cmd.epilog = f"{cmd.epilog.rstrip()}\n\n{text}" if cmd.epilog else text
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            add_families(sub, f"{path} {name}")


__all__ = ["add_families", "families_text", "overview"]
