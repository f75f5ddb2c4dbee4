"""``modelkit library``: index model folders and ask questions about them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from modelkit.arch import registry
from modelkit.cli.common import CommaList, common_option
from modelkit.cli.progress import StderrProgress, human_bytes
from modelkit.textsafe import safe_text
from modelkit.wording import plural

EPILOG = """\b
Examples:
  modelkit library scan ~/stable-diffusion-webui ~/ComfyUI/models --hash
  modelkit library list --kind lora --arch sdxl
  modelkit library dupes
  modelkit library lineage my-merge.safetensors
  modelkit library check
"""
KINDS = ("checkpoint", "unet", "lora", "vae", "embedding", "controlnet", "text_encoder",
         "unknown", "broken")
ARCHS = (*registry.names(), registry.UNKNOWN)


def _db_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", type=click.Path(dir_okay=False, path_type=str),
                        help="Index file [default: library.sqlite in $MODELKIT_CACHE_DIR "
                             "or ~/.cache/modelkit].")(fn)


def _json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return common_option("as_json", help="Print JSON.")(fn)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group("library", epilog=EPILOG)
def library_group() -> None:
    """Index model folders (A1111/Forge, ComfyUI or plain) and query the index.

    The index is an SQLite file; scans re-read only files whose size or
    modification time changed.
    """


@library_group.command("scan")
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=str))
@click.option("--hash", "do_hash", is_flag=True,
              help="Also hash every file not hashed yet (sha256, AutoV2, legacy, tensor "
                   "data); hashes are cached and shared with 'modelkit merge'.")
@click.option("-j", "--jobs", type=click.IntRange(min=1),
              help="Processes reading headers in a big scan [default: one per CPU].")
@_db_option
@common_option("quiet")
@_json_option
def scan_cmd(dirs: tuple[str, ...], do_hash: bool, jobs: int | None, db: str | None,
             quiet: bool, as_json: bool) -> None:
    """Find model files under DIRS and index what their headers say.

    Re-scans read only new and changed files (size or modification time)
    and drop files that are gone.
    """
    from modelkit.library.scan import scan

    report = scan(dirs, db, hash=do_hash, progress=StderrProgress(quiet), workers=jobs)
    for line in report.warnings:
        click.echo(f"modelkit: warning: {safe_text(line)}", err=True)
    if as_json:
        _echo_json(report.to_dict())
        return
    kinds = ", ".join(f"{n} {k}" for k, n in report.kinds.items()) or "no model files"
    click.echo(f"{plural(report.found, 'file')} under "
               f"{', '.join(safe_text(r) for r in report.roots)}: "
               f"{report.new} new, {report.changed} changed, {report.unchanged} unchanged, "
               f"{report.removed} removed, {report.broken} broken"
               + (f", {report.hashed} hashed" if do_hash else "")
               + (f", {report.sidecars_updated} with new sidecars"
                  if report.sidecars_updated else "")
               + (f", {report.sweeps_skipped} sweep folder"
                  f"{'s' if report.sweeps_skipped > 1 else ''} skipped"
                  if report.sweeps_skipped else "")
               + f" ({report.seconds:.2f} s)")
    click.echo(f"  {kinds}")
    click.echo(f"  index: {safe_text(report.db)}")


def _rel(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _list_rows(entries: list[Any]) -> list[tuple[str, ...]]:
    return [(safe_text(_rel(e.path, e.root)), e.kind, e.arch, e.variant or "-",
             e.key_layout or "-", e.prediction or "-", human_bytes(e.size, 1),
             (e.dtype or "-").lower(), e.short_hash or "-")
            for e in entries]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def _filters(kind: tuple[list[str], ...], arch: tuple[list[str], ...], name: str | None,
             under: tuple[str, ...], prediction: str | None) -> Any:
    from modelkit.cli.common import flat
    from modelkit.library.query import Filters

    return Filters(kinds=flat(kind), archs=flat(arch), name=name, under=under,
                   prediction=prediction)


def _filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--kind", multiple=True, type=CommaList(KINDS, "kind"),
                     help="Only these kinds (comma list or repeated)."),
        click.option("--arch", multiple=True, type=CommaList(ARCHS, "arch"),
                     help="Only these architectures (comma list or repeated)."),
        click.option("--name", help="Only names containing this (any case)."),
        click.option("--under", multiple=True, type=click.Path(file_okay=False),
                     help="Only files under this folder (repeatable)."),
        click.option("--prediction", type=click.Choice(("eps", "v")),
                     help="Only this prediction type."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@library_group.command("list")
@_filter_options
@_db_option
@_json_option
def list_cmd(kind: tuple[list[str], ...], arch: tuple[list[str], ...], name: str | None,
             under: tuple[str, ...], prediction: str | None, db: str | None,
             as_json: bool) -> None:
    """List indexed files; exit code 1 when none matches."""
    from modelkit.library import db as dbm
    from modelkit.library.query import list_entries

    with dbm.opened(db) as conn:
        entries = list_entries(conn, _filters(kind, arch, name, under, prediction))
    if as_json:
        _echo_json([e.to_dict() for e in entries])
    elif entries:
        click.echo(_table(("FILE", "KIND", "ARCH", "VARIANT", "LAYOUT", "PRED", "SIZE",
                           "DTYPE", "AUTOV2"),
                          _list_rows(entries)))
    if not entries:
        click.echo("modelkit: no indexed file matches; run 'modelkit library scan DIR' "
                   "first, or loosen the filters", err=True)
        raise click.exceptions.Exit(1)


@library_group.command("dupes")
@click.option("--no-hash", is_flag=True,
              help="Compare only files already hashed; hash nothing now.")
@_filter_options
@_db_option
@common_option("quiet")
@_json_option
def dupes_cmd(no_hash: bool, kind: tuple[list[str], ...], arch: tuple[list[str], ...],
              name: str | None, under: tuple[str, ...], prediction: str | None,
              db: str | None, quiet: bool, as_json: bool) -> None:
    """Files with the same tensor data, whatever their names or metadata.

    Files that could be copies (same tensor-data length) are hashed first
    unless --no-hash; hashes are cached.
    """
    from modelkit.library import db as dbm
    from modelkit.library.dupes import dupes

    with dbm.opened(db) as conn:
        report = dupes(conn, _filters(kind, arch, name, under, prediction),
                       hash_candidates=not no_hash, progress=StderrProgress(quiet))
    if as_json:
        _echo_json(report.to_dict())
        return
    for g in report.groups:
        what = ("hard links (no space lost)" if g.linked else
                "identical files" if g.same_file else "same tensors, other metadata")
        click.echo(f"{g.hash[:12]}  {what}, {human_bytes(g.wasted_bytes, 1)} to free")
        for e in g.entries:
            click.echo(f"  {safe_text(e.path)}")
    tail = (f"; {plural(report.n_unhashed, 'candidate')} not hashed" if report.n_unhashed
            else "")
    click.echo(f"{plural(len(report.groups), 'duplicate group')}, "
               f"{human_bytes(report.wasted_bytes, 1)} to free{tail}")


def render_tree(node: Any, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    """Text lines of a lineage tree (strings from files escaped)."""
    bits = [safe_text(node.label)]
    if node.how:
        bits.append(f"[{safe_text(node.how)}]")
    if node.match and node.match != "self":
        bits.append("(in library" + (", matched by name only)" if node.match == "name"
                                     else ")"))
    elif node.sha256 and node.match is None:
        bits.append(f"(not in library, sha256 {node.sha256[:10]})")
    if node.note:
        bits.append(f"- {safe_text(node.note)}")
    line = " ".join(bits)
    lines = [line if top else prefix + ("└─ " if last else "├─ ") + line]
    child_prefix = "" if top else prefix + ("   " if last else "│  ")
    for i, child in enumerate(node.children):
        lines += render_tree(child, child_prefix, i == len(node.children) - 1, False)
    return lines


@library_group.command("lineage")
@click.argument("model")
@_db_option
@_json_option
def lineage_cmd(model: str, db: str | None, as_json: bool) -> None:
    """Where MODEL came from: merges and conversions, as a tree.

    MODEL is a path, a file name (with or without extension) or a sha256
    prefix. Parents are found in the library by hash (run 'library scan
    --hash' for exact matches), else by name.
    """
    from modelkit.library import db as dbm
    from modelkit.library.lineage import lineage
    from modelkit.library.query import find_entry

    with dbm.opened(db) as conn:
        tree = lineage(conn, find_entry(conn, model))
    if as_json:
        _echo_json(tree.to_dict())
    else:
        click.echo("\n".join(render_tree(tree)))
        if not tree.children:
            click.echo("  no merge, conversion or training record in its metadata")


@library_group.command("check")
@_filter_options
@_db_option
@_json_option
def check_cmd(kind: tuple[list[str], ...], arch: tuple[list[str], ...], name: str | None,
              under: tuple[str, ...], prediction: str | None, db: str | None,
              as_json: bool) -> None:
    """Misplaced, broken and unusable files, with where each belongs.

    Exit code 1 when there is any hint.
    """
    from modelkit.library import db as dbm
    from modelkit.library.check import check

    with dbm.opened(db) as conn:
        report = check(conn, _filters(kind, arch, name, under, prediction))
    if as_json:
        _echo_json(report.to_dict())
    else:
        for path, hints in report.by_path().items():
            click.echo(safe_text(path))
            for h in hints:
                click.echo(f"  {h.severity}: {safe_text(h.message)}")
                if h.expected:
                    click.echo(f"  move to: {safe_text(h.expected)}")
        click.echo(f"{plural(len(report.hints), 'hint')} for {plural(report.n_files, 'file')}")
    if report.hints:
        raise click.exceptions.Exit(1)

