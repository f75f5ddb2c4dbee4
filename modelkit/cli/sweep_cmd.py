"""``modelkit sweep``: a grid of recipes merged, verified and compared in one
table and one contact sheet, in a local process pool or on Ray."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from modelkit.cli.common import common_option
from modelkit.cli.progress import StderrProgress, human_bytes
from modelkit.textsafe import safe_text, shown
from modelkit.wording import plural


class _Stderr:
    """Progress and per-cell lines on stderr, one writer at a time (events
    come from the pool's progress thread too)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = StderrProgress(quiet)
        self.lock = threading.Lock()

    def __call__(self, p: Any) -> None:
        with self.lock:
            self.progress(p)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        with self.lock:
            self.progress.close()
            click.echo(text, err=True)

    def cell(self, record: dict[str, Any], total: int) -> None:
        verify = record.get("verify") or {}
        metrics = verify.get("metrics") or {}
        seconds = (record.get("timings") or {}).get("total")
        parts = [str(record.get("status"))]
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        if verify:
            parts.append(str(verify.get("outcome") or verify.get("verdict", "")).upper())
            if metrics.get("psnr") is not None:
                psnr = metrics["psnr"]
                parts.append(f"PSNR {psnr if isinstance(psnr, str) else format(psnr, '.2f')}")
        if record.get("resumed"):
            parts.append("(earlier run)")
        if record.get("error"):
            parts.append(shown(record["error"], 200))
        self.line(f"cell {record['index'] + 1}/{total} {shown(record['name'], 80)}: "
                  + ", ".join(parts))


@contextlib.contextmanager
def _cancel_on_signals(cancel: threading.Event, out: _Stderr) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM, SIGHUP) cancels the sweep without
    force; a second one stops at once (the main handler's interrupt)."""
    from modelkit.errors import INTERRUPTED, Interrupted, signals_deferred

    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names}

    def handle(_signum: int, frame: Any) -> None:
        if cancel.is_set():
            from modelkit.cli import _importing

            INTERRUPTED.set()
            if not _importing(frame) and not signals_deferred():  # see modelkit.cli._Signals
                raise Interrupted
            return
        cancel.set()
        out.quiet = False
        out.line("modelkit: cancelling the sweep: pending cells will not start; waiting for "
                 "running ones to stop (again to quit at once)")

    for n in names:
        signal.signal(getattr(signal, n), handle)
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)


def _dry_run(spec: Any, output: str, device: str | None, as_json: bool, resume: bool,
            overwrite: bool) -> None:
    import tempfile
    from pathlib import Path

    from modelkit.sweep import plan_sweep
    from modelkit.sweep.run import check_folder

    check_folder(Path(output).absolute(), resume, overwrite)  # refused as the run would be

    with tempfile.TemporaryDirectory() as tmp:  # DIR need not exist yet
        plans = plan_sweep(spec, output if Path(output).is_dir() else tmp, device=device)
    rows = [{"cell": p.cell.index, "name": p.cell.name, "values": p.cell.labels,
             "output": p.output.name, "output_bytes": p.output_bytes,
             "memory_bytes": p.memory_bytes, "error": p.error} for p in plans]
    if as_json:
        click.echo(json.dumps({"n_cells": len(plans), "cells": rows}, indent=2))
        return
    for p in plans:
        state = f"FAILS: {shown(p.error, 200)}" if p.error else (
            f"{human_bytes(p.output_bytes)}, memory {human_bytes(p.memory_bytes)}")
        click.echo(f"{p.cell.name}: {state}")
    failing = sum(1 for r in rows if r["error"])
    click.echo(f"{plural(len(rows), 'cell')} planned"
               + (f", {failing} will fail" if failing else ""))


@click.command("sweep")
@click.argument("sweep", type=click.Path(dir_okay=False))
@common_option("output", type=click.Path(file_okay=False), metavar="DIR",
               help="The sweep folder (new, empty, or an earlier sweep's with --resume or "
                    "--overwrite).")
@click.option("-j", "--jobs", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Cells at once (default: one per GPU; on CPUs one per core, at most 4, "
                   "as memory allows). 1 runs them in this process.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, metavar="N",
              help="Torch threads per worker (default: the cores shared out, at least 1).")
@click.option("--address", default=None, metavar="ADDR|auto|local",
              help="Run on Ray (pip install -e '.[ray]' in the checkout): a cluster address, "
                   "auto (the cluster 'ray start' made), or local (a fresh one on this machine). "
                   "Default: RAY_ADDRESS if set, else a local process pool.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted sweep: cells whose output already carries the "
                   "same recipe are not run again.")
@common_option("overwrite", help="Run every cell again, replacing outputs.")
@common_option("device", default=None, show_default=False,
               help="Where every cell merges and renders (default: the recipe's).")
@click.option("--retries", type=click.IntRange(0, 10), default=1, show_default=True,
              metavar="N",
              help="Ray: retries of a cell whose worker died or hit an OS error.")
@click.option("--dry-run", is_flag=True, help="Plan every cell and list them; run nothing.")
@common_option("as_json")
@common_option("quiet")
def sweep_cmd(sweep: str, output: str, jobs: int | None, threads: int | None,
              address: str | None, resume: bool, overwrite: bool, device: str | None,
              retries: int, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Merge (and verify) every cell of the SWEEP grid into DIR; write
    sweep.jsonl, table.md, table.csv and contact_sheet.png.

    Exit codes: 0 every cell passed, 1 a cell failed or failed
    verification, 2 a bad sweep (one line naming the axis and value),
    130 cancelled (partial table written)."""
    from modelkit.sweep import load_sweep, make_executor, run_sweep

    spec = load_sweep(sweep)
    if dry_run:
        _dry_run(spec, output, device, as_json, resume, overwrite)
        return
    executor = make_executor(jobs, address, threads, retries)
    out = _Stderr(quiet)
    cancel = threading.Event()
    total = spec.n_cells
    from modelkit.errors import Interrupted

    try:
        with _cancel_on_signals(cancel, out):
            report = run_sweep(spec, output, executor=executor, progress=out, cancel=cancel,
                               resume=resume, overwrite=overwrite, device=device,
                               on_cell=lambda r: out.cell(r, total))
    except (KeyboardInterrupt, Interrupted):
        from modelkit.cli import _remove_temp_files

        _remove_temp_files()
        out.progress.close()
        click.echo(f"modelkit: sweep interrupted; finished cells are kept, the partial table "
                   f"is in {shown(output)}; --resume continues it", err=True)
        raise click.exceptions.Exit(130) from None
    out.progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from modelkit.sweep.results import markdown

        # labels and errors hold file names: escaped before they reach the terminal
        sys.stdout.write(safe_text(markdown(report.summary(), report.columns, report.rows()),
                                   keep_newlines=True))
        for key in ("table_md", "table_csv", "contact_sheet"):
            if report.files.get(key):
                click.echo(f"wrote {shown(report.files[key])}")
    if report.cancelled:
        click.echo(f"modelkit: sweep cancelled; partial table in {shown(report.files['table_md'])}"
                   "; --resume continues it", err=True)
    if report.exit_code:
        raise click.exceptions.Exit(report.exit_code)
