"""modelkit sweep on Ray (``--address local``): the same table as the local
pool (hashes equal), progress through the relay actor. Skipped without
the optional extra ``ray`` (``pip install -e '.[ray]'``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sweep_fixture import stable_rows, write_sweep

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A fresh two-CPU local cluster for the session (address="local": a
    plain init would join whatever RAY_ADDRESS names), small object store,
    no dashboard, no logs on the driver, no token files."""
    temp = tempfile.mkdtemp(prefix="mkray")  # short: Ray's socket paths must fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 object_store_memory=80 << 20, log_to_driver=False, logging_level="ERROR",
                 _temp_dir=temp)
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_ray_gives_the_pool_table(ray_local: None, pool_sweep: Any,
                                  models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.sweep import load_sweep, run_sweep
    from modelkit.sweep.ray_executor import RayExecutor

    events: list[Any] = []
    spec = load_sweep(write_sweep(tmp_path, models))
    report = run_sweep(spec, tmp_path / "out", executor=RayExecutor("local", threads=1),
                       progress=events.append)
    assert report.executor == "ray" and report.exit_code == 1
    assert stable_rows(report) == stable_rows(pool_sweep)
    assert ray.is_initialized()  # the caller's session is left open
    phases = {e.phase for e in events}
    assert {"plan", "write"} <= phases and events[-1].done == 4
    ok = [report.records[i] for i in (0, 2)]
    assert all(r["status"] == "ok" and r["executor"] == "ray" for r in ok)
