"""Run a sweep: plan every cell, run the rest on an executor, record each
cell as it finishes, then write the tables and the contact sheet.

The output folder holds one sweep (a ``.modelkit-sweep`` marker says so):
the cells' outputs (``cellNN_<values>.safetensors``), ``sweep.jsonl``,
``table.md``, ``table.csv``, ``contact_sheet.png`` and the renders under
``images/``. A folder with anything else in it is refused; a previous sweep
is continued with ``resume`` (cells whose output already carries the same
recipe, by its provenance, are not run again; with verification, their
earlier record must hold the verify result too) or started again with
``overwrite``.

Cancel (the ``cancel`` event, or Ctrl-C through the command line) stops
pending cells, lets running ones stop at their next tensor (without force,
for up to the executor's grace period), removes this sweep's temp files,
writes the partial table and returns a report with ``cancelled`` set.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import OutputError
from modelkit.jsontypes import JSONDict
from modelkit.library.layout import SWEEP_MARKER
from modelkit.progress import Progress, ProgressFn, no_progress
from modelkit.sweep import results
from modelkit.sweep.executors import Executor, SerialExecutor
from modelkit.sweep.plan import CellPlan, plan_sweep
from modelkit.sweep.spec import Axis, SweepSpec
from modelkit.wording import plural

MARKER = SWEEP_MARKER  # the library's scan skips folders holding it
SCHEMA = "modelkit.sweep/1"
OWN_FILES = (results.JSONL, results.TABLE_MD, results.TABLE_CSV, results.CONTACT_SHEET)
CellFn = Callable[[dict[str, Any]], object]


@dataclass
class SweepReport:
    """What a sweep did: one record per cell (as in ``sweep.jsonl``; cells
    that never ran have none), the table rows and the files written."""

    source: str
    out_dir: Path
    axes: list[Axis]
    mode: str
    cells: list[tuple[int, str, dict[str, str]]]  # index, name, labels
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    executor: str = "serial"
    cancelled: bool = False
    seconds: float = 0.0
    n_resumed: int = 0
    files: dict[str, str | None] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """Whether the cells were verified (the table has metric columns)."""
        return results.has_verify(self.records.values())

    @property
    def columns(self) -> list[str]:
        """The table's columns (see :func:`modelkit.sweep.results.columns`)."""
        return results.columns(self.axes, self.verified)

    def rows(self) -> list[dict[str, Any]]:
        """One row per cell, in order, with plain values (what ``table.csv``
        holds; a front end can draw them)."""
        return [results.row(self.axes, index, labels, self.records.get(index))
                for index, _, labels in self.cells]

    def _count(self, status: str) -> int:
        return sum(1 for r in self.records.values() if r.get("status") == status)

    @property
    def n_ok(self) -> int:
        return self._count("ok")

    @property
    def n_failed(self) -> int:
        """Cells that failed (an unreadable input, a write error)."""
        return self._count("failed")

    @property
    def n_verify_failed(self) -> int:
        """Cells written whose verification failed."""
        return sum(1 for r in self.records.values() if r.get("status") == "ok"
                   and r.get("verify") and not r["verify"].get("passed"))

    @property
    def n_not_run(self) -> int:
        """Cells cancelled or never started."""
        return len(self.cells) - self.n_ok - self.n_failed

    @property
    def exit_code(self) -> int:
        """130 when cancelled, 1 when a cell failed or failed verification,
        else 0."""
        if self.cancelled:
            return 130
        return 1 if self.n_failed or self.n_verify_failed else 0

    def summary(self) -> str:
        """One line: the counts and the time."""
        parts = [f"{self.n_ok} ok"]
        if self.n_failed:
            parts.append(f"{self.n_failed} failed")
        if self.n_verify_failed:
            parts.append(f"{self.n_verify_failed} failed verification")
        if self.n_not_run:
            parts.append(f"{self.n_not_run} not run")
        resumed = f", {self.n_resumed} from an earlier run" if self.n_resumed else ""
        state = "CANCELLED: " if self.cancelled else ""
        return (f"{state}{plural(len(self.cells), 'cell')}: {', '.join(parts)}{resumed} "
                f"({self.executor}, {self.seconds:.1f} s)")

    def to_dict(self) -> JSONDict:
        """Plain JSON: the counts, the table and every cell's record."""
        return {
            "schema": SCHEMA, "source": self.source, "out_dir": str(self.out_dir),
            "mode": self.mode, "executor": self.executor,
            "axes": [{"path": a.key, "name": a.name, "values": list(a.values)}
                     for a in self.axes],
            "n_cells": len(self.cells), "n_ok": self.n_ok, "n_failed": self.n_failed,
            "n_verify_failed": self.n_verify_failed, "n_not_run": self.n_not_run,
            "n_resumed": self.n_resumed, "cancelled": self.cancelled,
            "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
            "summary": self.summary(), "files": dict(self.files),
            "columns": self.columns, "rows": self.rows(),
            "cells": [self.records.get(index) for index, _, _ in self.cells],
        }


# --- the output folder ----------------------------------------------------------------


def prepare_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the sweep folder, or accept a previous sweep's with
    ``resume``/``overwrite``; refuse a folder holding anything else."""
    check_folder(out_dir, resume, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a modelkit sweep folder; see sweep.jsonl\n")
    if overwrite and not resume:
        for name in OWN_FILES:
            (out_dir / name).unlink(missing_ok=True)


def check_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise the :class:`OutputError` :func:`prepare_folder` would (the
    dry run refuses what the run refuses); writes nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; pick another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise OutputError(f"{out_dir}: folder is not empty and holds no sweep; pick an "
                              "empty or new folder")
        if not (resume or overwrite):
            raise OutputError(f"{out_dir}: holds a sweep already; pass --resume to continue "
                              "it or --overwrite to run every cell again")


def remove_partials(out_dir: Path, plans: list[CellPlan]) -> list[Path]:
    """Remove the temp files (and folders) this sweep's writers left: only
    ``.<cell output or table name>.*.partial`` beside them and in the
    cells' image folders."""
    removed = []
    names = [p.output.name for p in plans] + list(OWN_FILES)
    folders = [(out_dir, names)] + [(out_dir / "images" / p.cell.name, ["*"]) for p in plans]
    for folder, stems in folders:
        if not folder.is_dir():
            continue
        for stem in stems:
            for path in folder.glob(f".{stem}.*.partial"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_output(path: Path) -> None:
    """Remove a cell's output that did not end ``ok`` (a worker killed
    while verifying, a write that failed at its end): the sweep's own file,
    named by the cell, in the sweep folder; ``--resume`` runs the cell again."""
    with contextlib.suppress(OSError):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


# --- a disk that cannot be written ---------------------------------------------------

DISK_ERRORS = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def _discard(out: Path, plans: list[CellPlan], created: bool) -> None:
    """Remove what this run put in a folder that was empty (so a rerun is
    not refused): its outputs, tables, renders, temp files and marker."""
    remove_partials(out, plans)
    for plan in plans:
        remove_output(plan.output)
        shutil.rmtree(out / "images" / plan.cell.name, ignore_errors=True)
    for name in (*OWN_FILES, MARKER):
        with contextlib.suppress(OSError):
            (out / name).unlink(missing_ok=True)
    for folder in ([out / "images", out] if created else [out / "images"]):
        with contextlib.suppress(OSError):
            folder.rmdir()


def cannot_write(exc: OSError, out: Path, discarded: bool) -> OutputError:
    """The one-line error for a disk that refused a write."""
    from modelkit.textsafe import shown

    then = ("nothing was kept; free space or pick another -o and run it again" if discarded
            else "finished cells are kept; free space and --resume continues it")
    reason = DISK_ERRORS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return OutputError(f"cannot write to {shown(out)}: {reason}; {then}")


# --- resume ---------------------------------------------------------------------------


def expected_recipe(plan: CellPlan, base_dir: Path) -> dict[str, Any]:
    """The recipe the cell's output carries once written, as provenance
    writes it: file names, every input's sha256 pinned, no output path."""
    import yaml

    from modelkit.core.recipe import COMMAND_LINE, parse_recipe
    from modelkit.io.hashcache import cached_hashes

    recipe = parse_recipe(plan.recipe_yaml, COMMAND_LINE, base_dir)
    hashes = {}
    for name, spec in recipe.inputs.items():
        path = recipe.resolve(spec.path)
        if path.is_file():
            hashes[name] = cached_hashes(path, tensor_hash=False).sha256
    pinned = recipe.with_hashes(hashes, names_only=True)
    pinned.output_path = None
    loaded: dict[str, Any] = yaml.safe_load(pinned.to_yaml())
    return loaded


def finished_record(plan: CellPlan, spec: SweepSpec, previous: list[dict[str, Any]]
                    ) -> dict[str, Any] | None:
    """The record of a cell an earlier run finished, or None when it must
    run: its output must carry the cell's recipe (and, when the sweep
    verifies, an earlier record must hold the verify result with the same
    settings)."""
    import yaml

    from modelkit.sweep.worker import embedded_recipe_text, new_record, output_hashes, text_sha256

    text = embedded_recipe_text(plan.output)
    if text is None:
        return None
    try:
        if yaml.safe_load(text) != expected_recipe(plan, spec.base_dir):
            return None
    except (yaml.YAMLError, OSError):
        return None
    fingerprint = text_sha256(text)
    earlier = [r for r in previous if r.get("name") == plan.cell.name
               and r.get("status") == "ok" and r.get("recipe_sha256") == fingerprint]
    record = earlier[-1] if earlier else None
    if spec.verify is not None and (record is None or not record.get("verify")
                                    or record["verify"].get("settings") != spec.verify):
        return None
    if record is None:
        record = new_record(_task(plan, spec, Path(plan.output).parent, False, "resume"))
        record.update(status="ok", hashes=output_hashes(plan.output),
                      recipe_sha256=fingerprint)
    return {**record, "resumed": True}


# --- running --------------------------------------------------------------------------


def _task(plan: CellPlan, spec: SweepSpec, out_dir: Path, overwrite: bool, executor: str
          ) -> dict[str, Any]:
    """What a worker gets for one cell (plain data)."""
    import yaml

    cell = plan.cell
    device = (yaml.safe_load(plan.recipe_yaml).get("options") or {}).get("device", "cpu")
    return {"index": cell.index, "name": cell.name, "values": cell.values,
            "labels": cell.labels, "recipe": plan.recipe_yaml, "base_dir": str(spec.base_dir),
            "output": str(plan.output), "out_dir": str(out_dir), "overwrite": overwrite,
            "verify": spec.verify, "device": device, "memory_bytes": plan.memory_bytes,
            "executor": executor}


class _Progress:
    """The sweep's events: done/total in cells, ``overall`` counting the
    running cells' fractions; at most ten a second (plus every finished
    cell). Called from the executor's threads and this one."""

    INTERVAL = 0.1

    def __init__(self, progress: ProgressFn, total: int, names: dict[int, str]) -> None:
        self.progress = progress
        self.total = max(1, total)
        self.names = names
        self.finished = 0
        self.fractions: dict[int, float] = {}
        self.lock = threading.Lock()
        self.last = 0.0

    def cell(self, index: int, p: Progress) -> None:
        with self.lock:
            self.fractions[index] = min(1.0, max(0.0, p.fraction))
            now = time.monotonic()
            if now - self.last < self.INTERVAL:
                return
            self.last = now
            self._emit(p.phase, self.names.get(index))

    def done(self, index: int, count: bool = True) -> None:
        with self.lock:
            self.fractions.pop(index, None)
            self.finished += 1 if count else 0
            self._emit("write", self.names.get(index))

    def _emit(self, phase: str, item: str | None) -> None:
        # rounded: a first event at 1e-6 would make an ETA of weeks
        overall = round(min(1.0, (self.finished + sum(self.fractions.values())) / self.total),
                        3)
        self.progress(Progress("sweep", self.finished, self.total, "cells", item, phase,
                               overall))


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, executor: Executor | None = None,
              progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
              resume: bool = False, overwrite: bool = False, device: str | None = None,
              on_cell: CellFn | None = None) -> SweepReport:
    """Run a sweep (see the module docstring) and return its report.

    Args:
        spec: from :func:`~modelkit.sweep.spec.load_sweep`/``parse_sweep``.
        out_dir: the sweep folder (new, empty, or a previous sweep's).
        executor: where cells run (default :class:`SerialExecutor`).
        progress: sweep events (``unit="cells"``, ``overall`` 0..1),
            possibly from other threads.
        cancel: a ``threading.Event``; set it to stop (see above).
        resume: skip cells an earlier run of this folder finished.
        overwrite: run every cell again, replacing earlier outputs.
        device: ``cpu``, ``cuda`` or ``auto`` for every cell (default: the
            recipe's ``options.device``).
        on_cell: called with each cell's record as it finishes, in this
            thread (resumed and planned failures included).

    Raises:
        SweepError: a bad value, naming its axis and value (before any cell
            runs; a folder this call made is removed again).
        OutputError: the folder holds something else, or a sweep without
            ``resume``/``overwrite``; or the disk refused a write (read-only,
            full): a folder that was empty is left as it was.
        KeyboardInterrupt: re-raised after the same clean-up as a cancel.
    """
    start = time.perf_counter()
    cancel = cancel if cancel is not None else threading.Event()
    executor = executor or SerialExecutor()
    out = Path(out_dir).absolute()
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    made = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    created = not out.exists()
    try:
        prepare_folder(out, resume, overwrite)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        if fresh:
            _discard(out, [], created)
        raise cannot_write(exc, out, fresh) from None
    try:
        plans = plan_sweep(spec, out, device=device, progress=progress, cancel=cancel)
    except BaseException:
        if fresh:  # a bad value leaves nothing behind, not even the folder
            (out / MARKER).unlink(missing_ok=True)
            for folder in made:  # the sweep folder and the parents made for it
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    report = SweepReport(spec.source, out, spec.axes, spec.mode,
                         [(p.cell.index, p.cell.name, p.cell.labels) for p in plans],
                         executor=executor.name)
    jsonl = out / results.JSONL
    previous = results.read_records(jsonl) if resume else []
    events = _Progress(progress, len(plans), {p.cell.index: p.cell.name for p in plans})

    outputs = {p.cell.index: p.output for p in plans}

    def finish(record: dict[str, Any], append: bool = True) -> None:
        if record.get("status") in ("failed", "cancelled"):
            remove_output(outputs[record["index"]])  # its row says so: no file
        report.records[record["index"]] = record
        if append:
            results.append_record(jsonl, record)
        events.done(record["index"], record.get("status") in ("ok", "failed"))
        if on_cell is not None:
            on_cell(record)

    try:
        tasks = _tasks(plans, spec, out, resume, overwrite, executor.name, previous, finish,
                       report)
        try:
            executor.execute(tasks, on_progress=events.cell, on_result=finish,
                             cancel=cancel)
        except OSError:
            raise
        except BaseException:
            cancel.set()
            report.cancelled = True
            _close(report, spec, plans, start)
            raise
        report.cancelled = cancel.is_set() and report.n_not_run > 0
        _close(report, spec, plans, start)
    except OSError as exc:  # the disk refused sweep.jsonl or a table
        if exc.errno not in DISK_ERRORS:
            raise
        cancel.set()
        remove_partials(out, plans)
        discard = fresh and report.n_ok == 0  # nothing worth a --resume
        if discard:
            _discard(out, plans, created)
        raise cannot_write(exc, out, discard) from None
    return report


def _tasks(plans: list[CellPlan], spec: SweepSpec, out: Path, resume: bool, overwrite: bool,
           executor: str, previous: list[dict[str, Any]], finish: Callable[..., None],
           report: SweepReport) -> list[dict[str, Any]]:
    """The cells to run; planned failures and (with resume) finished cells
    are recorded here instead."""
    from modelkit.sweep.executors import failed_record

    tasks = []
    for plan in plans:
        task = _task(plan, spec, out, resume or overwrite, executor)
        if plan.error is not None:
            finish(failed_record(task, plan.error))
            continue
        done = finished_record(plan, spec, previous) if resume else None
        if done is not None:
            report.n_resumed += 1
            finish(done, append=False)
            continue
        tasks.append(task)
    return tasks


def _close(report: SweepReport, spec: SweepSpec, plans: list[CellPlan], start: float) -> None:
    """Remove temp files after a cancel, write the tables and the sheet."""
    out = report.out_dir
    report.seconds = time.perf_counter() - start
    remove_partials(out, plans)  # a cancelled or killed worker's, if any
    title = f"modelkit sweep {Path(spec.source).name}: {report.summary()}"
    rows = report.rows()
    report.files["jsonl"] = str(out / results.JSONL)
    report.files["table_md"] = str(results.write_text(
        out / results.TABLE_MD, results.markdown(title, report.columns, rows)))
    report.files["table_csv"] = str(results.write_text(
        out / results.TABLE_CSV, results.csv_text(report.columns, rows)))
    sheet = results.contact_sheet(title, spec.axes, spec.mode,
                                  [(i, labels) for i, _, labels in report.cells],
                                  report.records, out)
    report.files["contact_sheet"] = (str(results.write_png(sheet, out / results.CONTACT_SHEET))
                                     if sheet is not None else None)
