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
* :class:`PoolExecutor`: a standard-library process pool (``spawn``), each
  worker with its own torch thread count (one per core share: two workers
  with two threads each took 76 s on 2 cores where one thread each took
  22 s) and, when GPUs exist, its own ``CUDA_VISIBLE_DEVICES``.
* :class:`modelkit.sweep.ray_executor.RayExecutor`: Ray tasks or GPU actors
  (the optional extra ``ray``: ``pip install -e '.[ray]'`` in the checkout;
  Ray is imported only there).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Protocol

from modelkit.progress import Progress

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
            index = task["index"]
            on_result(run_cell(task, lambda p, i=index: on_progress(i, p), cancel))


# --- the process pool ---------------------------------------------------------------

_POOL: dict[str, Any] = {}  # a pool worker's event queue and stop event


def _pool_init(threads: int, gpus: list[str], slots: Any, events: Any, stop: Any) -> None:
    """A pool worker's start: signals are the driver's business (it sets
    the stop event; a worker still busy after the grace period is killed),
    then threads and the GPU of its slot."""
    import signal

    from modelkit.sweep.worker import setup_worker

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    slot = slots.get()
    setup_worker(threads, gpus[slot % len(gpus)] if gpus else None)
    _POOL.update(events=events, stop=stop)


def _pool_run(task: dict[str, Any]) -> dict[str, Any]:
    from modelkit.sweep.worker import Throttle, run_cell

    events, index = _POOL["events"], task["index"]
    return run_cell(task, Throttle(lambda p: events.put((index, p))), _POOL["stop"])


def _pump(events: Any, on_progress: CellProgressFn) -> None:
    while (item := events.get()) is not None:
        on_progress(*item)


def failed_record(task: dict[str, Any], error: str, status: str = "failed") -> dict[str, Any]:
    """The record of a cell whose worker did not return one."""
    from modelkit.sweep.worker import new_record

    record = new_record(task)
    record["status"], record["error"] = status, error
    return record


class PoolExecutor:
    """A ``spawn`` process pool of ``jobs`` workers (see the module
    docstring). ``jobs`` and ``threads`` default from the machine and the
    cells' planned memory; ``gpus`` (ids) default to the visible GPUs when
    the cells run on CUDA (``device``)."""

    name = "pool"

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
        from concurrent.futures import ProcessPoolExecutor

        if not tasks:
            return
        jobs, threads, gpus = self._sizes(tasks)
        ctx = multiprocessing.get_context("spawn")
        events, stop, slots = ctx.Queue(), ctx.Event(), ctx.Queue()
        for slot in range(jobs):
            slots.put(slot)
        pump = threading.Thread(target=_pump, args=(events, on_progress), daemon=True,
                                name="sweep-progress")
        pump.start()
        pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_init,
                                   initargs=(threads, gpus, slots, events, stop))
        futures = {pool.submit(_pool_run, t): t for t in tasks}
        interrupted: BaseException | None = None
        try:
            try:
                self._collect(futures, on_result, cancel)
            except BaseException as exc:  # Ctrl-C in the driver: stop like a cancel
                interrupted = exc
                cancel.set()
            if cancel.is_set():
                stop.set()
                self._drain(futures, on_result)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._stop_stragglers(pool)
            events.put(None)
            pump.join(timeout=2)
        if interrupted is not None:
            raise interrupted

    def _collect(self, futures: dict[Future[Any], dict[str, Any]], on_result: ResultFn,
                 cancel: threading.Event) -> None:
        pending = set(futures)
        while pending and not cancel.is_set():
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: futures[f]["index"]):
                on_result(self._record(future, futures[future]))
                futures.pop(future)

    def _drain(self, futures: dict[Future[Any], dict[str, Any]], on_result: ResultFn) -> None:
        """After a cancel: pending cells never start; running ones stop at
        their next tensor or render step (waited for up to ``grace``)."""
        running = [f for f in futures if not f.cancel()]
        done, _ = wait(running, timeout=self.grace)
        for future in sorted(done, key=lambda f: futures[f]["index"]):
            on_result(self._record(future, futures[future], cancelled=True))

    @staticmethod
    def _record(future: Future[Any], task: dict[str, Any], cancelled: bool = False
                ) -> dict[str, Any]:
        try:
            record: dict[str, Any] = future.result()
            return record
        except Exception as exc:  # the worker process died (killed, out of memory)
            from modelkit.sweep.worker import one_line

            if cancelled:
                return failed_record(task, "cancelled; its worker stopped", "cancelled")
            return failed_record(task, f"worker process failed: {one_line(exc)}")

    @staticmethod
    def _stop_stragglers(pool: Any) -> None:
        # a worker still busy after the grace period (a long call that does
        # not check the stop event) is terminated; the sweep removes its
        # temp files. ProcessPoolExecutor has no public way to do this.
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.is_alive():
                process.kill()


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
