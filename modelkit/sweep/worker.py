"""The worker entry point: one cell, run wherever an executor puts it (this
process, a pool process, a Ray task or actor on another node).

:func:`run_cell` takes and returns plain, JSON-safe data only: the cell's
recipe YAML (absolute paths), its output path and the verify settings go in;
the record for ``sweep.jsonl`` (hashes, run report, verify verdict and
metrics, image paths, timings, or the one-line error) comes back. Tensors
never travel. A :class:`~modelkit.errors.ModelkitError` (or any other
error) becomes the record's error, so the other cells go on; cancel and
interrupts propagate so the writer removes its temp file.

Verification runs here rather than as the recipe's ``verify:`` phase: the
outputs (and their hashes) then do not depend on how they were checked, the
render threads follow the worker's share of the machine, and one
:class:`~modelkit.verify.VerifySession` per worker process renders a shared
reference once.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelkit.errors import CancelFlag, Cancelled, ModelkitError
from modelkit.progress import VERIFY, Progress, ProgressFn, no_progress
from modelkit.wording import error_text

RECORD_SCHEMA = "modelkit.sweep.cell/1"
PROGRESS_INTERVAL = 0.2  # seconds between forwarded events of one cell
METRICS = ("psnr", "ssim", "latent")
ERROR_LIMIT = 500  # characters of a cell's error

_SESSION: Any = None  # the process's VerifySession (reference renders)
_THREADS: int | None = None  # the worker's torch thread count, when an executor set one


def setup_worker(threads: int | None, cuda_devices: str | None = None) -> None:
    """Give this worker process its thread count (and GPU): environment
    first, so libraries that read it at import see it, then torch."""
    global _THREADS
    if cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices
    if threads:
        _THREADS = threads
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)
        import torch

        torch.set_num_threads(threads)


class Throttle:
    """Forwards a cell's events at most every :data:`PROGRESS_INTERVAL`
    seconds, plus every phase change and the last event (what crosses a
    process or network boundary stays small)."""

    def __init__(self, send: ProgressFn, interval: float = PROGRESS_INTERVAL) -> None:
        self.send = send
        self.interval = interval
        self.last = 0.0
        self.phase: str | None = None
        self.lock = threading.Lock()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        with self.lock:
            if p.phase == self.phase and now - self.last < self.interval and p.fraction < 1.0:
                return
            self.last, self.phase = now, p.phase
        self.send(p)


def _cell_events(progress: ProgressFn, verify: bool) -> tuple[ProgressFn, ProgressFn]:
    """Callbacks for the run and the verify phase whose ``overall`` is the
    cell's fraction (the run is the first half when the cell is verified)."""
    share = 0.5 if verify else 1.0

    def run_event(p: Progress) -> None:
        progress(Progress(p.step, p.done, p.total, p.unit, p.item, p.phase,
                          share * min(1.0, p.fraction)))

    def verify_event(p: Progress) -> None:
        progress(Progress(p.step, p.done, p.total, p.unit, p.item, VERIFY,
                          0.5 + 0.5 * min(1.0, p.fraction)))

    return run_event, verify_event


def one_line(exc: BaseException) -> str:
    """An error as one line for a cell's record: the front ends' wording
    (:func:`modelkit.wording.error_text`; a bug names its type)."""
    return error_text(exc, ERROR_LIMIT)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _mean(values: list[float]) -> float | None:
    if not values:
        return None
    if any(math.isinf(v) for v in values):
        finite = [v for v in values if not math.isinf(v)]
        return math.inf if not finite else sum(finite) / len(finite)
    return sum(values) / len(values)


def metric_summary(images: list[Any]) -> dict[str, float | None]:
    """Mean PSNR, SSIM and latent distance over a verify report's images
    (PSNR ``inf`` when every image is identical to its reference)."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        values = [float(v) for m in images if (v := m.metric(name)) is not None
                  and not math.isnan(float(v))]
        out[name] = _mean(values)
    return out


def output_hashes(path: Path) -> dict[str, Any]:
    """sha256 and AutoV2 of a file output (None for a folder)."""
    if not path.is_file():
        return {"sha256": None, "autov2": None}
    from modelkit.io.hashing import hash_file

    h = hash_file(path, tensor_hash=False)
    return {"sha256": h.sha256, "autov2": h.autov2}


def embedded_recipe_text(path: Path) -> str | None:
    """The ``modelkit.recipe`` an output carries, or None."""
    from modelkit.engine.provenance import RECIPE_KEY
    from modelkit.io.formats import is_format

    try:
        if path.is_file() and is_format(path, "safetensors"):
            from modelkit.io.header import read_header

            return read_header(path).metadata.get(RECIPE_KEY)
        from modelkit.engine.lock import embedded_recipe

        return embedded_recipe(path)[0]
    except (ModelkitError, OSError):
        return None


def text_sha256(text: str | None) -> str | None:
    """sha256 of a text (the embedded recipe's fingerprint in records)."""
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _verify(recipe: Any, output: Path, section: dict[str, Any], task: dict[str, Any],
            progress: ProgressFn, cancel: CancelFlag | None) -> tuple[Any, dict[str, Any]]:
    """Render and check the written output as the recipe's verify phase
    would (same reference rules), with the worker's threads and session."""
    from contextlib import ExitStack

    from modelkit.engine.graph import Graph
    from modelkit.engine.verification import reference_and_loras, settings_from
    from modelkit.io.reader import resolve_device
    from modelkit.verify import VerifySession, verify

    global _SESSION
    if _SESSION is None:
        _SESSION = VerifySession()
    device = resolve_device(recipe.options.device)
    settings = settings_from(section, device)
    if settings.threads is None and _THREADS:
        settings.threads = _THREADS
    with ExitStack() as stack:
        graph = Graph(recipe, stack, device)
        graph.build()
        reference, loras = reference_and_loras(recipe, graph, section)
    report = verify(output, settings, reference, loras, progress=progress, cancel=cancel,
                    session=_SESSION)
    images = _write_images(report, task)
    return report, images


def _write_images(report: Any, task: dict[str, Any]) -> dict[str, list[str]]:
    """The renders as PNGs under the sweep's images folder (paths relative
    to the sweep folder), for the contact sheet."""
    if report.renders is None or not report.renders.candidate:
        return {"candidate": [], "reference": []}
    from modelkit.verify.outputs import write_images

    out_dir = Path(task["out_dir"])
    folder = out_dir / "images" / task["name"]
    paths = write_images(report, folder, overwrite=True)
    rel = [str(p.relative_to(out_dir)) for p in paths]
    n = len(report.renders.candidate)
    return {"candidate": rel[:n], "reference": rel[n:]}


def _verify_record(report: Any, images: dict[str, list[str]], section: dict[str, Any]
                   ) -> dict[str, Any]:
    from modelkit.verify.report import json_safe

    return json_safe({
        "verdict": report.verdict, "outcome": report.outcome, "passed": report.passed,
        "summary": report.summary(),
        "reference": report.reference, "operation": report.operation,
        "metrics": metric_summary(report.images), "images": images,
        "cases": [{"case": m.case, "seed": m.seed, "prompt": m.prompt,
                   **{k: m.metric(k) for k in METRICS}} for m in report.images],
        "settings": section, "report": report.to_dict()})


def new_record(task: dict[str, Any]) -> dict[str, Any]:
    """A cell's record before it runs (what every record shares)."""
    return {"schema": RECORD_SCHEMA, "index": task["index"], "name": task["name"],
            "values": task["values"], "labels": task["labels"], "status": "pending",
            "error": None, "output": Path(task["output"]).name, "hashes": None,
            "recipe_sha256": None, "run": None, "verify": None, "timings": {},
            "executor": task.get("executor"), "resumed": False}


def run_cell(task: dict[str, Any], progress: ProgressFn = no_progress,
             cancel: CancelFlag | None = None) -> dict[str, Any]:
    """Run one cell (see the module docstring) and return its record.

    ``task`` holds ``index``, ``name``, ``values``, ``labels``, ``recipe``
    (YAML, absolute paths), ``base_dir``, ``output``, ``out_dir``,
    ``overwrite`` and ``verify`` (a verify: section or None). ``progress``
    gets the cell's events (``overall`` is the cell's fraction); ``cancel``
    is anything with ``is_set()``.

    Raises:
        KeyboardInterrupt: an interrupt (e.g. ``ray.cancel``), after the
            writer removed its temp file.
        OSError: only when ``task["raise_os_errors"]`` (Ray retries those).
    """
    from modelkit.core.recipe import COMMAND_LINE, parse_recipe
    from modelkit.engine.runner import run

    record = new_record(task)
    section = task.get("verify")
    run_events, verify_events = _cell_events(progress, section is not None)
    timings: dict[str, Any] = {"started": _now()}
    start = time.perf_counter()
    output = Path(task["output"])
    written = False
    if cancel is not None and cancel.is_set():
        record["status"], record["error"] = "cancelled", "cancelled before it started"
        return record
    try:
        recipe = parse_recipe(task["recipe"], COMMAND_LINE, Path(task["base_dir"]))
        report = run(recipe, output=output, progress=run_events, cancel=cancel,
                     overwrite=bool(task.get("overwrite")))
        written = True
        record["run"] = report.to_dict()
        timings["run"] = round(time.perf_counter() - start, 3)
        mark = time.perf_counter()
        record["hashes"] = output_hashes(output)
        record["recipe_sha256"] = text_sha256(embedded_recipe_text(output))
        timings["hash"] = round(time.perf_counter() - mark, 3)
        if section is not None:
            mark = time.perf_counter()
            verified, images = _verify(recipe, output, section, task, verify_events, cancel)
            record["verify"] = _verify_record(verified, images, section)
            timings["verify"] = round(time.perf_counter() - mark, 3)
        record["status"] = "ok"
    except Cancelled as exc:
        record["status"], record["error"] = "cancelled", one_line(exc)
        if written:  # an unverified output is this sweep's partial file: --resume redoes it
            output.unlink(missing_ok=True)
            record["hashes"] = record["recipe_sha256"] = None
            record["error"] = "cancelled while verifying; its unverified output was removed"
    except OSError as exc:
        if task.get("raise_os_errors"):
            raise
        record["status"], record["error"] = "failed", one_line(exc)
    except Exception as exc:  # a bad input, or a bug: this cell's row, not the sweep's end
        record["status"], record["error"] = "failed", one_line(exc)
    timings["total"] = round(time.perf_counter() - start, 3)
    timings["finished"] = _now()
    record["timings"] = timings
    return record
