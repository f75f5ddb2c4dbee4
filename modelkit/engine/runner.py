"""The one runner: every command and every recipe goes through :func:`run`.

A run goes through its phases in order (see :mod:`modelkit.progress`):

1. **plan** — the recipe is validated, inputs are opened (headers only), each
   step's transform is applied lazily (:class:`~modelkit.engine.graph.Graph`),
   the output format's layout is planned and the output path is checked
   against the overwrite policy. Every error of a recipe, input or output
   path is raised here, before any tensor is read. ``dry_run`` stops here.
2. **hash** — input files not in the hash cache are hashed on two background
   threads for the provenance, beside the write.
3. **read** — steps that must compute before the output header is known
   (LoRA extraction) do so.
4. **write** — the output is streamed, one tensor at a time, into a temp
   file beside the target; the input hashes are patched into the header
   and the file is committed (renamed) only when everything succeeded.

Cancel (a ``threading.Event``) is checked before every tensor and every 8 MB
of hashing; it raises :class:`~modelkit.errors.Cancelled` and leaves no file.
Torch runs single-threaded during a CPU run: torch's intra-op threads spin on
the 1M-element chunks when another process holds a core (a merge measured
40 s instead of 9 s beside one busy process), while one thread per core for
the work and the hashing keeps both cores useful.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.core.recipe import Recipe, validate
from modelkit.engine.report import RunReport, StepReport
from modelkit.errors import CancelFlag, ModelkitError
from modelkit.progress import (
    HASH,
    PLAN,
    READ,
    VERIFY,
    WRITE,
    Progress,
    ProgressFn,
    no_progress,
)
from modelkit.textsafe import shown


class _Stop:
    """The caller's cancel event, or the run's own stop on any failure (so
    hash threads end promptly when the write fails or is interrupted)."""

    def __init__(self, cancel: CancelFlag | None) -> None:
        self.cancel = cancel
        self.failed = threading.Event()

    def is_set(self) -> bool:
        return self.failed.is_set() or (self.cancel is not None and self.cancel.is_set())


class _Events:
    """Forwards events to the caller's callback, one at a time (events come
    from the hash threads and the writing thread), with the overall fraction:
    hashing and writing share the run by bytes; a run with a ``read`` phase
    (computing before the header) gives it the first half."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.done = {HASH: 0, WRITE: 0}
        self.totals = {HASH: 0, WRITE: 0}
        self.has_read = False
        self.read_fraction = 0.0
        self.step = ""
        self.hash_seen: dict[str, int] = {}
        self.peak = _PeakMemory()

    def _overall(self) -> float:
        total = sum(self.totals.values())
        rest = sum(self.done.values()) / total if total else 0.0
        if self.has_read:
            return 0.5 * self.read_fraction + 0.5 * rest
        return rest

    def plan(self, p: Progress) -> None:
        with self.lock:
            self.progress(Progress(p.step, p.done, p.total, p.unit, p.item, PLAN, 0.0))

    def read(self, p: Progress) -> None:
        with self.lock:
            self.read_fraction = p.fraction if p.overall is None else p.overall
            self.progress(Progress(p.step, p.done, p.total, p.unit, p.item, READ,
                                   self._overall()))

    def hash(self, p: Progress) -> None:
        self._count(HASH, p)

    def verify(self, p: Progress) -> None:
        with self.lock:
            self.progress(Progress(p.step, p.done, p.total, p.unit, p.item, VERIFY,
                                   p.fraction if p.overall is None else p.overall))

    def write(self, p: Progress) -> None:
        self.peak.sample()
        self._count(WRITE, p, self.step)

    def _count(self, phase: str, p: Progress, step: str | None = None) -> None:
        with self.lock:
            if phase == HASH:
                # per-file events: keep a running total across files
                self.done[HASH] += p.done - self.hash_seen.get(p.step, 0)
                self.hash_seen[p.step] = p.done
            else:
                self.done[WRITE] = p.done
            self.progress(Progress(step or p.step, p.done, p.total, p.unit, p.item, phase,
                                   min(1.0, self._overall())))


class _PeakMemory:
    """The growth of the process's anonymous memory (RssAnon: heap and
    buffers, not the page cache of mapped files) while writing."""

    INTERVAL = 0.1  # seconds between samples (reading /proc costs ~0.1 ms)

    def __init__(self) -> None:
        self.base = self._rss_anon()
        self.peak = self.base
        self.last = 0.0

    @staticmethod
    def _rss_anon() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def sample(self, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last < self.INTERVAL:
            return
        self.last = t
        now = self._rss_anon()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def growth(self) -> int | None:
        if self.base is None or self.peak is None:
            return None
        return self.peak - self.base


@contextlib.contextmanager
def compute_threads(device: str) -> Iterator[None]:
    """Torch intra-op threads set to 1 for a CPU run (see the module
    docstring), restored afterwards."""
    if device != "cpu":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def output_path(recipe: Recipe, output: str | os.PathLike[str] | None) -> Path:
    """The output: given, else the recipe's ``output.path``."""
    if output is not None:
        return Path(output)
    if recipe.output_path:
        from modelkit.core.recipe import confined_output

        return confined_output(recipe, recipe.resolve(recipe.output_path))
    raise ModelkitError(f"{recipe.source}: no output path; set output.path or pass -o")


def _planned_report(recipe: Recipe, graph: Graph, final: Source, payload: Any,
                    spec: OutputSpec, details: dict[str, Any], dry_run: bool) -> RunReport:
    from modelkit.inspect.describe import describe

    merged = sum(g.report.n_merged for g in graph.groups)
    infos = final.infos
    report = RunReport(
        spec.path, spec.format, describe(final).arch, dry_run, len(infos), merged,
        len(infos) - merged, sum(g.report.n_skipped for g in graph.groups),
        sum(g.report.n_ignored for g in graph.groups),
        sum(i.nbytes for i in infos.values()) if spec.format == "safetensors"
        else int(payload.nbytes),
        max((g.report.peak_estimate_bytes for g in graph.groups), default=0))
    report.steps = [StepReport(r.name, r.transform, r.kind, r.params, r.report)
                    for r in graph.records]
    report.warnings = [w for g in graph.groups for w in g.report.warnings]
    report.warnings += [w for src in graph.inputs.values()  # an input's own (diffusers)
                        for w in getattr(src, "warnings", None) or []]
    report.notes = list(getattr(final, "notes", []) or [])
    report.output_details = details
    return report


def _exact_size(report: RunReport, recipe: Recipe, graph: Graph, final: Source,
                spec: OutputSpec) -> None:
    """A dry run's output size with the real header (metadata planned with
    placeholder hashes of the same length): exact for safetensors."""
    if spec.format != "safetensors":
        report.notes.append("the output size is an estimate (tensor data; the "
                            f"{spec.format} headers add a little)")
        return
    from modelkit.engine.provenance import PlannedHashes, output_metadata
    from modelkit.io.writer import TensorSpec, build_header

    meta = output_metadata(recipe, graph, final, PlannedHashes(graph.files),
                           legacy=lambda _: "0" * 8)
    specs = [TensorSpec(k, i.dtype, i.shape) for k, i in final.infos.items()]
    report.output_bytes = len(build_header(specs, meta)[0]) + report.output_bytes


if TYPE_CHECKING:
    from modelkit.engine.graph import Graph
    from modelkit.io.source import Source
    from modelkit.io.write import OutputSpec


def _verify_written(recipe: Recipe, graph: Graph, out: Path, device: str,
                    events: _Events, stop: _Stop) -> Any:
    """The verify phase. The output is already complete, so an error or a
    cancel here says so instead of claiming nothing was written."""
    from modelkit.engine.verification import verify_output
    from modelkit.errors import Cancelled, ModelkitError

    try:
        return verify_output(recipe, graph, out, recipe.verify or {}, device,
                             events.verify, stop)
    except Cancelled:
        raise Cancelled(f"cancelled while verifying; {shown(out)} was written, "
                        "not verified") from None
    except ModelkitError as exc:
        raise type(exc)(f"{exc}; {shown(out)} was written, not verified") from None


def run(recipe: Recipe, *, output: str | os.PathLike[str] | None = None,
        progress: ProgressFn = no_progress, cancel: CancelFlag | None = None,
        overwrite: bool = False, dry_run: bool = False, verify: bool = False) -> RunReport:
    """Run ``recipe`` (see the module docstring) and return what it did.

    Args:
        recipe: a recipe from YAML (:func:`~modelkit.core.recipe.load_recipe`)
            or built in code; it is validated here either way.
        output: the output path (default: the recipe's ``output.path``).
        progress: receives typed :class:`~modelkit.progress.Progress` events,
            **possibly from other threads** (never two at once).
        cancel: a ``threading.Event``; setting it stops the run before the
            next tensor or hash chunk with :class:`~modelkit.errors.Cancelled`
            and leaves no output or temp file.
        overwrite: replace an existing output (an input never is).
        dry_run: plan only; no tensor is read and nothing is written.
        verify: render and check the output after writing (as the recipe's
            ``verify:`` section does; see :mod:`modelkit.engine.verification`);
            the :class:`~modelkit.verify.VerifyReport` is ``report.verify``.

    Raises:
        ModelkitError: a bad recipe, input or output (before anything is
            read), a failed write (nothing is left), or ``Cancelled``.
    """
    from modelkit.convert.formats import prepare_output
    from modelkit.engine.graph import Graph
    from modelkit.engine.provenance import check_pins, output_metadata
    from modelkit.io.hashcache import InputHashes
    from modelkit.io.reader import resolve_device
    from modelkit.io.write import OutputSpec, check_output, output_format, write

    start = time.perf_counter()
    recipe = validate(recipe)
    events = _Events(progress)
    out = output_path(recipe, output)
    spec = OutputSpec(out, output_format(out, recipe.output_format), overwrite)
    stop = _Stop(cancel)
    with ExitStack() as stack:
        device = resolve_device(recipe.options.device)
        graph = Graph(recipe, stack, device, events.plan)
        graph.open_inputs()  # every file the run reads (headers only)
        check_output(spec, graph.files)  # the one output check, before any step is planned
        final = graph.build()
        events.step = recipe.output_step
        payload, details = prepare_output(final, spec.format, quant=recipe.output_quant,
                                          keep_shapes=recipe.output_keep_shapes)
        report = _planned_report(recipe, graph, final, payload, spec, details, dry_run)
        if dry_run:
            _exact_size(report, recipe, graph, final, spec)
            report.seconds = time.perf_counter() - start
            return report
        stack.enter_context(compute_threads(device))
        hashes = InputHashes(graph.files, events.hash, stop)
        stack.callback(hashes.close)
        check_pins(recipe, graph, hashes.known())
        try:
            prepared = [p for p in graph.planned_steps if p.prepare is not None]
            events.has_read = bool(prepared)
            for planned in prepared:
                assert planned.prepare is not None
                planned.prepare(events.read, stop)
            if prepared:
                payload, details = prepare_output(final, spec.format,
                                                  quant=recipe.output_quant,
                                                  keep_shapes=recipe.output_keep_shapes)
            events.totals = {HASH: hashes.pending_bytes, WRITE: int(
                sum(i.nbytes for i in final.infos.values()) if spec.format == "safetensors"
                else payload.nbytes)}
            metadata = output_metadata(recipe, graph, final, hashes)

            def finalize() -> dict[str, str]:
                patches = hashes.patches()
                check_pins(recipe, graph, hashes.known())
                return patches

            result = write(payload, spec, metadata=metadata, inputs=graph.files,
                           progress=events.write, cancel=stop, finalize=finalize)
        except BaseException:
            stop.failed.set()
            if cancel is not None and cancel.is_set():
                from modelkit.errors import Cancelled

                raise Cancelled("cancelled; no output was written") from None
            raise
        if verify or recipe.verify is not None:
            report.verify = _verify_written(recipe, graph, out, device, events, stop)
    report.output_bytes = result.bytes_written
    report.n_tensors = result.n_tensors
    report.notes += result.notes
    report.output_details = details
    events.peak.sample(force=True)
    report.peak_measured_bytes = events.peak.growth
    report.seconds = time.perf_counter() - start
    return report
