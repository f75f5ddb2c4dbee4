"""modelkit sweep on the local process pool: the same table as the serial
run, cell for cell (hashes equal)."""

from __future__ import annotations

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
