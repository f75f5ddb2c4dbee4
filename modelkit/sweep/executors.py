"""Where cells run: in this process, in a local process pool, or on Ray.

Every executor has the same shape::

    executor.execute(tasks, on_progress=fn(index, Progress), on_result=fn(record),
                     cancel=threading.Event())

It runs :func:`modelkit.sweep.worker.run_cell` on each task, calls
``on_result`` in the calling thread as cells finish (``on_progress`` may be
called from another thread) and returns when every cell is done or, once
``cancel`` is set, when the running cells have stopped (cancelled without
force: each removes its temp file) or ``grace`` seconds have passed.
Pending cells never start.

* :class:`SerialExecutor`: one cell after another in this process (tests,
  debugging, and ``--jobs 1``).
* :class:`PoolExecutor`: ``spawn`` worker processes, each with its own pipe
  (a worker that dies fails only its own cell; a fresh one takes its
  place), each with its own torch thread count (one per core share: two workers
  with two threads each took 76 s on 2 cores where one thread each took
  22 s) and, when GPUs exist, its own ``CUDA_VISIBLE_DEVICES``.
* :class:`modelkit.sweep.ray_executor.RayExecutor`: Ray tasks or GPU actors
  (the optional extra ``ray``: ``pip install -e '.[ray]'`` in the checkout;
  Ray is imported only there).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from modelkit.errors import CancelFlag
from modelkit.progress import Progress, ProgressFn

CellProgressFn = Callable[[int, Progress], None]
ResultFn = Callable[[dict[str, Any]], None]
GRACE_SECONDS = 10.0
MAX_DEFAULT_JOBS = 4


class Executor(Protocol):
    """Runs cells (see the module docstring)."""

    name: str

    def execute(self, tasks: list[dict[str, Any]], *, on_progress: CellProgressFn,
                on_result: ResultFn, cancel: threading.Event) -> None: ...


def available_cpus() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def mem_available() -> int | None:
    """MemAvailable in bytes, when the platform says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_jobs(tasks: list[dict[str, Any]], gpus: list[str]) -> int:
    """One worker per GPU; on CPUs one per core, at most four, and no more
    than the memory the cells' plans say fits."""
    if gpus:
        return len(gpus)
    jobs = min(available_cpus(), MAX_DEFAULT_JOBS)
    need = max((int(t.get("memory_bytes", 0)) for t in tasks), default=0)
    free = mem_available()
    if need and free:
        jobs = min(jobs, max(1, free // need))
    return max(1, min(jobs, len(tasks) or 1))


def threads_per_worker(jobs: int) -> int:
    """Torch threads per worker: the cores shared out, at least one."""
    return max(1, available_cpus() // max(1, jobs))


def visible_gpus() -> list[str]:
    """The GPUs this process may give to workers (ids for
    ``CUDA_VISIBLE_DEVICES``)."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if mask is not None and mask.strip():
        ids = [x.strip() for x in mask.split(",") if x.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


class SerialExecutor:
    """One cell after another, in this process."""

    name = "serial"

    def execute(self, tasks: list[dict[str, Any]], *, on_progress: CellProgressFn,
                on_result: ResultFn, cancel: threading.Event) -> None:
        from modelkit.sweep.worker import run_cell

        for task in tasks:
            if cancel.is_set():
                return
            on_result(run_cell(task, partial(on_progress, task["index"]), cancel))


# --- the process pool ---------------------------------------------------------------


def failed_record(task: dict[str, Any], error: str, status: str = "failed") -> dict[str, Any]:
    """The record of a cell whose worker did not return one."""
    from modelkit.sweep.worker import new_record

    record = new_record(task)
    record["status"], record["error"] = status, error
    return record


def pool_cell(task: dict[str, Any], progress: ProgressFn, stop: CancelFlag | None
              ) -> dict[str, Any]:
    """What a pool worker runs for one cell (a module-level function: the
    worker imports it by name)."""
    from modelkit.sweep.worker import run_cell

    return run_cell(task, progress, stop)


def _worker_main(conn: Any, threads: int, gpu: str | None, stop: Any,
                 cell_fn: Callable[..., dict[str, Any]]) -> None:
    """A pool worker: signals are the driver's business (it sets the stop
    event; a worker still busy after the grace period is killed); then it
    runs the cells the driver sends on its own pipe, one at a time, and
    sends back their progress and records on the same pipe."""
    import signal

    from modelkit.sweep.worker import Throttle, setup_worker

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    setup_worker(threads, gpu)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:  # progress comes from the hash and write threads too
            conn.send(message)

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index = task["index"]

        def relay(p: Progress, i: int = index) -> None:
            send(("progress", i, p))

        record = cell_fn(task, Throttle(relay), stop)
        send(("result", index, record))


def death_note(exitcode: int | None) -> str:
    """Why a worker process ended, for a cell's error."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"worker process was killed by {name}{hint}; the other cells went on"
    return f"worker process exited (code {exitcode}) before the cell finished"


class _Worker:
    """One pool process, its pipe, its GPU slot and the cell it runs."""

    def __init__(self, ctx: Any, slot: int, threads: int, gpus: list[str], stop: Any,
                 cell_fn: Callable[..., dict[str, Any]]) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, name=f"modelkit-sweep-{slot}",
            args=(child, threads, gpus[slot % len(gpus)] if gpus else None, stop, cell_fn))
        self.process.start()
        child.close()
        self.task: dict[str, Any] | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.conn.close()


class PoolExecutor:
    """A pool of ``jobs`` ``spawn`` worker processes (see the module
    docstring), each with its own pipe: the driver knows which cell each
    worker runs, so a worker that dies (killed, out of memory) fails only
    its own cell and a fresh worker takes its place. ``jobs`` and
    ``threads`` default from the machine and the cells' planned memory;
    ``gpus`` (ids) default to the visible GPUs when the cells run on CUDA
    (``device``)."""

    name = "pool"
    cell_fn: Callable[..., dict[str, Any]] = staticmethod(pool_cell)

    def __init__(self, jobs: int | None = None, threads: int | None = None,
                 gpus: list[str] | None = None, grace: float = GRACE_SECONDS) -> None:
        self.jobs = jobs
        self.threads = threads
        self.gpus = gpus
        self.grace = grace

    def _sizes(self, tasks: list[dict[str, Any]]) -> tuple[int, int, list[str]]:
        gpus = self.gpus
        if gpus is None:
            on_gpu = any(t.get("device") in ("cuda", "auto") for t in tasks)
            gpus = visible_gpus() if on_gpu else []
        jobs = self.jobs or default_jobs(tasks, gpus)
        return jobs, self.threads or threads_per_worker(jobs), gpus

    def execute(self, tasks: list[dict[str, Any]], *, on_progress: CellProgressFn,
                on_result: ResultFn, cancel: threading.Event) -> None:
        import multiprocessing

        if not tasks:
            return
        jobs, threads, gpus = self._sizes(tasks)
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        pending = deque(tasks)
        workers: list[_Worker] = []

        def start(slot: int) -> _Worker:
            return _Worker(ctx, slot, threads, gpus, stop, type(self).cell_fn)

        interrupted: BaseException | None = None
        try:
            workers = [start(slot) for slot in range(min(jobs, len(tasks)))]
            try:
                while not cancel.is_set() and (pending or any(w.task for w in workers)):
                    self._assign(workers, pending, start)
                    self._step(workers, on_progress, on_result, 0.2)
            except BaseException as exc:  # Ctrl-C in the driver: stop like a cancel
                interrupted = exc
                cancel.set()
            if cancel.is_set():  # pending cells never start; running ones stop
                stop.set()
                deadline = time.monotonic() + self.grace
                while any(w.task for w in workers) and time.monotonic() < deadline:
                    self._step(workers, on_progress, on_result, 0.2, cancelled=True)
        finally:
            stop.set()
            for w in workers:
                w.close()
            for w in workers:
                w.process.join(timeout=1)
                if w.process.is_alive():  # busy after the grace period: the sweep
                    w.process.kill()      # removes its temp files
                    w.process.join(timeout=5)
        if interrupted is not None:
            raise interrupted

    @staticmethod
    def _assign(workers: list[_Worker], pending: deque[dict[str, Any]],
                start: Callable[[int], _Worker]) -> None:
        """Give each idle worker the next cell (a dead worker is replaced
        first, so one death costs one cell)."""
        for i, w in enumerate(workers):
            if w.task is not None or not pending:
                continue
            if not w.process.is_alive():
                w.conn.close()
                w = workers[i] = start(w.slot)
            task = pending.popleft()
            try:
                w.conn.send(task)
            except OSError:  # it died just now: the cell goes back, the next round
                pending.appendleft(task)  # replaces the worker
                continue
            w.task = task

    def _step(self, workers: list[_Worker], on_progress: CellProgressFn,
              on_result: ResultFn, timeout: float, cancelled: bool = False) -> None:
        """Wait for messages or a worker's end; hand them on. A worker that
        ended without a record fails its cell (only its cell)."""
        from multiprocessing.connection import wait as wait_any

        busy = [w for w in workers if w.task is not None]
        if not busy:
            time.sleep(min(timeout, 0.05))
            return
        ready = set(wait_any([w.conn for w in busy] + [w.process.sentinel for w in busy],
                             timeout))
        for w in busy:
            if w.conn in ready or w.process.sentinel in ready:
                self._receive(w, on_progress, on_result)
            if w.task is not None and not w.process.is_alive():
                self._receive(w, on_progress, on_result)  # what it sent before it ended
                if w.task is None:
                    continue
                task, w.task = w.task, None
                w.process.join(timeout=1)
                on_result(failed_record(task, "cancelled; its worker stopped", "cancelled")
                          if cancelled else failed_record(task,
                                                          death_note(w.process.exitcode)))

    @staticmethod
    def _receive(w: _Worker, on_progress: CellProgressFn, on_result: ResultFn) -> None:
        try:
            while w.task is not None and w.conn.poll():
                kind, index, payload = w.conn.recv()
                if kind == "progress":
                    on_progress(index, payload)
                else:
                    w.task = None
                    on_result(payload)
        except Exception:  # the worker died mid-message (EOF, a cut pickle)
            pass


def make_executor(jobs: int | None = None, address: str | None = None,
                  threads: int | None = None, retries: int = 1) -> Executor:
    """The executor the command line asks for: Ray with ``address`` (or
    ``RAY_ADDRESS``), the serial one for ``jobs == 1``, else the pool."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        from modelkit.sweep.ray_executor import RayExecutor

        return RayExecutor(address, jobs=jobs, threads=threads, retries=retries)
    if jobs == 1:
        return SerialExecutor()
    return PoolExecutor(jobs, threads)
