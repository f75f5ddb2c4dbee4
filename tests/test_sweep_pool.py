"""modelkit sweep on the local process pool: the same table as the serial
run, cell for cell (hashes equal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweep_fixture import stable_rows

from modelkit.sweep.results import read_records


def test_pool_gives_the_serial_table(pool_sweep: Any, serial_sweep: Any) -> None:
    assert pool_sweep.executor == "pool" and pool_sweep.exit_code == 1
    assert stable_rows(pool_sweep) == stable_rows(serial_sweep)
    assert [r["sha256"] for r in pool_sweep.rows()][::2] == \
        [r["sha256"] for r in serial_sweep.rows()][::2] != [None, None]
    records = read_records(pool_sweep.out_dir / "sweep.jsonl")
    assert sorted(r["status"] for r in records) == ["failed", "failed", "ok", "ok"]
    # each worker merged with one torch thread (two workers on this machine's cores)
    assert {r["executor"] for r in records} == {"pool"}


def _killed_after_writing(task: dict[str, Any], progress: Any, stop: Any) -> dict[str, Any]:
    """Cell 1's worker writes its output, then dies (SIGKILL) before it
    reports; the other cells run as usual."""
    import os
    import signal

    from modelkit.sweep.executors import pool_cell

    record = pool_cell(task, progress, stop)
    if task["index"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return record


def test_a_killed_worker_fails_only_its_cell_and_resume_reruns_it(
        models: dict[str, Path], tmp_path: Path) -> None:
    from sweep_fixture import write_sweep

    from modelkit.sweep import PoolExecutor, SerialExecutor, load_sweep, run_sweep

    class Killing(PoolExecutor):
        cell_fn = staticmethod(_killed_after_writing)

    spec = load_sweep(write_sweep(tmp_path, models, alphas=(0.25, 0.5, 0.75), with_bad=False))
    out = tmp_path / "out"
    report = run_sweep(spec, out, executor=Killing(jobs=2, threads=1))
    statuses = [r["status"] for r in report.rows()]
    assert statuses == ["ok", "failed", "ok"] and report.exit_code == 1
    assert "killed by SIGKILL" in report.records[1]["error"]
    outputs = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(outputs) == 2 and not any("partial" in p.name for p in out.iterdir())
    assert report.rows()[1]["output"] is None
    again = run_sweep(spec, out, executor=SerialExecutor(), resume=True)
    assert again.n_resumed == 2 and again.exit_code == 0
    assert [r["status"] for r in again.rows()] == ["ok", "ok", "ok"]
    assert len(list(out.glob("*.safetensors"))) == 3
