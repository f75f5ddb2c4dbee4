"""Cells on a Ray cluster (the optional extra ``ray``); Ray is
imported only by this module's functions.

* **Where**: ``address="local"`` starts a fresh cluster on this machine
  (``ray.init(address="local")``: a plain ``ray.init()`` silently joins
  whatever ``RAY_ADDRESS`` or the last ``ray start`` names); ``"auto"`` or
  ``HOST:PORT`` attaches to a running cluster, without ``num_cpus`` or
  ``num_gpus`` (Ray refuses them when attaching). A Ray session the caller
  already opened is used as it is and left open.
* **CPU cells** run as tasks with ``num_cpus`` (the torch threads; Ray sets
  ``OMP_NUM_THREADS`` from it) and a ``memory`` request from the dry run's
  peak estimate; an ``OSError`` (a flaky shared disk) is retried.
  **GPU cells** (``--device cuda|auto`` on a cluster with GPUs) run on one
  actor per GPU, which merges on ``cuda``, renders and returns paths (GPU
  tasks would get a fresh process per call: torch and CUDA start-up each
  time).
* **Only paths and small reports travel**: a task gets the cell's recipe
  YAML and returns its record; tensors never leave the worker.
* **Progress** comes back through a ``num_cpus=0`` actor that workers push
  throttled events to and the driver drains; **cancel** is a flag on that
  actor (checked at most twice a second), so running cells stop at their
  next tensor and remove their temp files; pending ones never start.
* Ray replaces the SIGTERM handler in ``ray.init``: the caller's signal
  handlers are put back. ``local_mode`` no longer exists in Ray; the tests
  use a local cluster.

Task functions live here, in an installed module: Ray workers import them
by name (a function only on the driver's ``sys.path`` fails there).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from modelkit.errors import ModelkitError
from modelkit.progress import Progress
from modelkit.sweep.executors import (
    GRACE_SECONDS,
    CellProgressFn,
    ResultFn,
    available_cpus,
    failed_record,
)

LOCAL_OBJECT_STORE = 128 << 20  # bytes: only paths and reports go through it
DRAIN_INTERVAL = 0.2  # seconds between progress drains on the driver
CANCEL_POLL = 0.5  # seconds between a worker's looks at the cancel flag
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class ProgressRelay:
    """A small actor: workers push events, the driver drains them; it
    also holds the sweep's cancel flag."""

    MAX_EVENTS = 10_000

    def __init__(self) -> None:
        self.events: list[tuple[int, Progress]] = []
        self.cancelled = False

    def push(self, index: int, event: Progress) -> None:
        if len(self.events) < self.MAX_EVENTS:
            self.events.append((index, event))

    def drain(self) -> list[tuple[int, Progress]]:
        out, self.events = self.events, []
        return out

    def cancel(self) -> None:
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled


class RemoteCancel:
    """A cancel event for a worker: ``is_set()`` asks the relay at most
    every :data:`CANCEL_POLL` seconds (the runner asks per tensor)."""

    def __init__(self, relay: Any, interval: float = CANCEL_POLL) -> None:
        self.relay = relay
        self.interval = interval
        self.flag = False
        self.last = 0.0
        self.lock = threading.Lock()

    def is_set(self) -> bool:
        import ray

        with self.lock:
            now = time.monotonic()
            if self.flag or now - self.last < self.interval:
                return self.flag
            self.last = now
        try:
            flag = bool(ray.get(self.relay.is_cancelled.remote(), timeout=5))
        except Exception:  # the driver is gone: stop as if cancelled
            flag = True
        with self.lock:
            self.flag = self.flag or flag
            return self.flag


def ray_run_cell(task: dict[str, Any], relay: Any) -> dict[str, Any]:
    """A Ray task (or actor call): one cell, progress through ``relay``."""
    from modelkit.sweep.worker import Throttle, run_cell, setup_worker

    setup_worker(task.get("threads"), None)
    index = task["index"]
    return run_cell(task, Throttle(lambda p: relay.push.remote(index, p)), RemoteCancel(relay))


class CellActor:
    """One per GPU: keeps torch, CUDA and the verify session warm between
    cells (Ray gives GPU tasks a fresh process each)."""

    def __init__(self, threads: int | None) -> None:
        from modelkit.sweep.worker import setup_worker

        setup_worker(threads, None)

    def run(self, task: dict[str, Any], relay: Any) -> dict[str, Any]:
        return ray_run_cell(task, relay)


class _Handlers:
    """The process's signal handlers, put back after Ray changed them."""

    def __init__(self) -> None:
        self.saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self.saved[num] = signal.getsignal(num)

    def restore(self) -> None:
        for num, handler in self.saved.items():
            if handler is not None:
                signal.signal(num, handler)


class RayExecutor:
    """Runs cells on Ray (see the module docstring).

    Args:
        address: ``local``, ``auto``, ``HOST:PORT`` or ``ray://...``.
        jobs: the most cells in flight at once (default: the cluster's
            CPUs over ``threads``, or its GPUs).
        threads: CPUs (torch threads) per CPU cell, default 1.
        retries: retries of a cell that hit an ``OSError`` or whose worker
            died.
        grace: seconds to wait for running cells after a cancel.
    """

    name = "ray"

    def __init__(self, address: str = "local", jobs: int | None = None,
                 threads: int | None = None, retries: int = 1,
                 grace: float = GRACE_SECONDS) -> None:
        self.address = address
        self.jobs = jobs
        self.threads = threads or 1
        self.retries = retries
        self.grace = grace

    def _connect(self) -> bool:
        """Start or attach to a cluster; False when a session was open."""
        try:
            import ray
        except ImportError:
            raise ModelkitError("running on Ray (--address or RAY_ADDRESS) needs Ray: pip "
                                "install -e '.[ray]' in the modelkit checkout; without "
                                "either, the local process pool runs the sweep") from None
        if ray.is_initialized():
            return False
        handlers = _Handlers()
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if self.address == "local":
                ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False,
                         object_store_memory=LOCAL_OBJECT_STORE, **options)
            else:
                ray.init(address=self.address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ModelkitError(f"--address {self.address}: cannot connect to a Ray cluster "
                                f"({' '.join(str(exc).split())[:200]})") from None
        finally:
            handlers.restore()
        return True

    def execute(self, tasks: list[dict[str, Any]], *, on_progress: CellProgressFn,
                on_result: ResultFn, cancel: threading.Event) -> None:
        import ray

        if not tasks:
            return
        started = self._connect()
        handlers = _Handlers()
        try:
            relay = ray.remote(num_cpus=0)(ProgressRelay).remote()
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            wants_gpu = any(t.get("device") in ("cuda", "auto") for t in tasks)
            if wants_gpu and gpus:
                submit, window = self._actors(tasks, gpus, relay)
            elif any(t.get("device") == "cuda" for t in tasks):
                raise ModelkitError("--device cuda: the Ray cluster has no GPU; use "
                                    "--device cpu or auto")
            else:
                submit, window = self._tasks(tasks, resources, relay)
            self._loop(tasks, submit, window, relay, on_progress, on_result, cancel)
        finally:
            if started:
                ray.shutdown()
            handlers.restore()

    def _memory(self, tasks: list[dict[str, Any]], resources: dict[str, float]) -> int:
        """The largest cell's memory request, capped at the largest node's
        (a request no node can meet would wait forever)."""
        import ray

        need = max(int(t.get("memory_bytes", 0)) for t in tasks)
        nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        cap = int(max(nodes, default=resources.get("memory", need)))
        return max(1, min(need, cap))

    def _tasks(self, tasks: list[dict[str, Any]], resources: dict[str, float], relay: Any
               ) -> tuple[Any, int]:
        import ray

        memory = self._memory(tasks, resources)
        remote = ray.remote(ray_run_cell).options(
            num_cpus=self.threads, memory=memory, max_retries=self.retries,
            retry_exceptions=[OSError])
        window = self.jobs or max(1, int(resources.get("CPU", 1) // self.threads))

        def submit(task: dict[str, Any]) -> tuple[Any, Any]:
            task = {**task, "threads": self.threads, "raise_os_errors": True,
                    "device": task.get("device")}
            return remote.remote(task, relay), None

        return submit, window

    def _actors(self, tasks: list[dict[str, Any]], gpus: int, relay: Any) -> tuple[Any, int]:
        import ray

        n = min(gpus, self.jobs or gpus, len(tasks))
        memory = self._memory(tasks, ray.cluster_resources())
        actor_class = ray.remote(CellActor).options(num_gpus=1, num_cpus=self.threads,
                                                    memory=memory)
        idle = [actor_class.remote(self.threads) for _ in range(n)]

        def submit(task: dict[str, Any]) -> tuple[Any, Any]:
            actor = idle.pop()
            return actor.run.remote({**task, "threads": self.threads}, relay), actor

        submit.idle = idle  # type: ignore[attr-defined]
        return submit, n

    def _loop(self, tasks: list[dict[str, Any]], submit: Any, window: int, relay: Any,
              on_progress: CellProgressFn, on_result: ResultFn, cancel: threading.Event
              ) -> None:
        import ray

        queue = list(tasks)
        in_flight: dict[Any, tuple[dict[str, Any], Any]] = {}
        idle = getattr(submit, "idle", None)
        last_drain = 0.0
        try:
            while (queue or in_flight) and not cancel.is_set():
                while queue and len(in_flight) < window and (idle is None or idle):
                    task = queue.pop(0)
                    ref, actor = submit(task)
                    in_flight[ref] = (task, actor)
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=DRAIN_INTERVAL)
                if time.monotonic() - last_drain >= DRAIN_INTERVAL:
                    last_drain = time.monotonic()
                    self._drain(relay, on_progress)
                for ref in ready:
                    task, actor = in_flight.pop(ref)
                    if idle is not None:
                        idle.append(actor)
                    on_result(self._record(ref, task))
        except BaseException:  # Ctrl-C in the driver: stop like a cancel
            cancel.set()
            self._stop(in_flight, relay, on_result)
            raise
        if cancel.is_set():
            self._stop(in_flight, relay, on_result)
        self._drain(relay, on_progress)

    def _stop(self, in_flight: dict[Any, tuple[dict[str, Any], Any]], relay: Any,
              on_result: ResultFn) -> None:
        """Cancel without force: the flag stops running cells at their next
        tensor; after ``grace`` seconds the rest get ``ray.cancel``."""
        import ray

        relay.cancel.remote()
        refs = list(in_flight)
        ready, rest = ray.wait(refs, num_returns=len(refs), timeout=self.grace) if refs \
            else ([], [])
        for ref in ready:
            on_result(self._record(ref, in_flight[ref][0]))
        for ref in rest:
            ray.cancel(ref, force=False)

    @staticmethod
    def _drain(relay: Any, on_progress: CellProgressFn) -> None:
        import ray

        try:
            events = ray.get(relay.drain.remote(), timeout=5)
        except Exception:  # progress is best effort
            return
        for index, event in events:
            on_progress(index, event)

    @staticmethod
    def _record(ref: Any, task: dict[str, Any]) -> dict[str, Any]:
        import ray

        from modelkit.sweep.worker import one_line

        try:
            record: dict[str, Any] = ray.get(ref)
            return record
        except ray.exceptions.TaskCancelledError:
            return failed_record(task, "cancelled", "cancelled")
        except ray.exceptions.RayTaskError as exc:
            return failed_record(task, one_line(getattr(exc, "cause", None) or exc))
        except ray.exceptions.RayError as exc:  # a worker or node died
            return failed_record(task, f"Ray worker failed: {one_line(exc)}")
