"""``modelkit hash``."""

from __future__ import annotations

import json

import click

from modelkit.cli.common import common_option
from modelkit.cli.progress import StderrProgress
from modelkit.errors import ModelkitError
from modelkit.io.hashing import hash_file
from modelkit.textsafe import safe_text, shown

MISMATCH_LIMIT = 200


@click.command("hash")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=str))
@common_option("as_json", help="Print a JSON list of results.")
@common_option("quiet")
def hash_cmd(paths: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Compute sha256, AutoV2, legacy and tensor-data hashes.

    sha256 is the whole file (A1111 checkpoint hash); autov2 its first 10 hex
    digits (Civitai); legacy the old 8-digit A1111 model hash; addnet the
    sha256 of the tensor bytes only (kohya sshs_model_hash, A1111 LoRA hash),
    which metadata edits do not change. Hashes embedded in the metadata that
    disagree with the computed ones are reported and make the exit code 1; a
    path that cannot be hashed is reported, the others are hashed, and the
    exit code is 2.
    """
    progress = StderrProgress(quiet)
    results, failed = [], 0
    for p in paths:  # one bad path is reported; the others are still hashed
        try:
            results.append(hash_file(p, progress))
        except ModelkitError as exc:
            click.echo(f"modelkit: error: {safe_text(exc)}", err=True)
            failed += 1
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"{shown(r.path)}\n  sha256  {r.sha256}\n  autov2  {r.autov2}\n"
                       f"  legacy  {r.legacy}\n  addnet  {r.addnet or '-'}")
            for m in r.mismatches:  # they quote metadata values: escaped and cut
                click.echo(f"  MISMATCH {shown(m, MISMATCH_LIMIT)}")
    if failed:
        raise click.exceptions.Exit(2)
    if any(r.mismatches for r in results):
        raise click.exceptions.Exit(1)
