"""modelkit's torch GGML quantizers against ggml's C reference, one thread each.

Usage: bench/ggml_ref/build.sh GGML_CHECKOUT, then
    PYTHONPATH=. python bench/bench_ggml_quants.py [--types q6_k,q8_0] [--shapes 3072x3072]
        [--repeat 3] [--cases]

Prints per type and shape: ggml ms, modelkit ms (best of ``--repeat`` paired
runs), the ratio of the bests, the median ratio of the pairs and the ratio of
the best process CPU times (both robust beside other work), and the share of
blocks identical to ggml's; ``--cases`` also counts
identical blocks on every seeded case of ``modelkit.testing.ggml_cases``.
Table-driven over ``ggml_ref.BLOCKS``: a type modelkit does not implement
yet is reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).with_name("ggml_ref")))
import ggml_ref

from modelkit.io.ggml import quantize_blocks
from modelkit.testing.ggml_cases import CASES, make_case


def _ms(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall-clock and process CPU milliseconds of ``fn()`` (CPU time leaves
    out the time other processes hold the core), and its result."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000, result


def _identical(ref: np.ndarray, mine: np.ndarray, qtype: str) -> float:
    nbytes = ggml_ref.BLOCKS[qtype][1]
    same = (ref.reshape(-1, nbytes) == mine.reshape(-1, nbytes)).all(axis=1)
    return 100.0 * float(same.mean())


def _implemented(qtype: str) -> bool:
    try:
        quantize_blocks(torch.zeros(256), qtype.upper())
    except (ImportError, AttributeError):
        return False
    return True


def bench_shape(qtype: str, rows: int, cols: int, repeat: int) -> str:
    """One table row: ggml ms and modelkit ms (best of ``repeat`` paired runs,
    one right after the other so both see the same load), the ratio of the
    bests, the median of the paired ratios, and the identical-block %."""
    x = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    xt = torch.from_numpy(x)
    refs, mines, pairs, cpu_refs, cpu_mines = [], [], [], [], []
    ref: object = None
    mine: object = None
    for _ in range(repeat):
        ref_ms, ref_cpu, ref = _ms(lambda: ggml_ref.quantize(x, qtype))
        mine_ms, mine_cpu, mine = _ms(lambda: quantize_blocks(xt, qtype.upper()))
        refs.append(ref_ms)
        mines.append(mine_ms)
        pairs.append(mine_ms / ref_ms)
        cpu_refs.append(ref_cpu)
        cpu_mines.append(mine_cpu)
    same = _identical(np.asarray(ref), np.asarray(mine), qtype)
    return (f"{qtype:5s} {rows}x{cols:<6d} {min(refs):9.1f} {min(mines):11.1f} "
            f"{min(mines) / min(refs):6.2f}x {statistics.median(pairs):6.2f}x "
            f"{min(cpu_mines) / min(cpu_refs):6.2f}x {same:9.4f}%")


def bench_cases(qtype: str, rows: int) -> str:
    """Identical blocks over every seeded case (two seeds each)."""
    total = same = 0.0
    worst = []
    for name in CASES:
        for seed in range(2):
            x = make_case(name, rows, 1024, seed)
            ref = ggml_ref.quantize(x, qtype)
            mine = quantize_blocks(torch.from_numpy(x), qtype.upper()).numpy()
            pct = _identical(ref, mine, qtype)
            n = ref.size // ggml_ref.BLOCKS[qtype][1]
            total += n
            same += pct * n / 100
            if pct < 100:
                worst.append(f"{name}/{seed}: {pct:.3f}%")
    tail = ("; differ: " + ", ".join(worst)) if worst else ""
    return f"{qtype:5s} cases: {int(same)}/{int(total)} blocks identical{tail}"


def main() -> None:
    """Parse the options and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(ggml_ref.BLOCKS))
    parser.add_argument("--shapes", default="3072x3072,12288x3072")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", action="store_true")
    parser.add_argument("--case-rows", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    print(f"{'type':5s} {'shape':11s} {'ggml ms':>9s} {'modelkit ms':>11s} {'ratio':>7s} "
          f"{'paired':>7s} {'cpu':>7s} {'identical':>10s}")
    for qtype in args.types.split(","):
        if not _implemented(qtype):
            print(f"{qtype:5s} not implemented in modelkit.io.ggml")
            continue
        for rows, cols in shapes:
            if cols % ggml_ref.BLOCKS[qtype][0]:
                print(f"{qtype:5s} {rows}x{cols:<6d} rows are not a multiple of the block")
                continue
            print(bench_shape(qtype, rows, cols, args.repeat), flush=True)
        if args.cases:
            print(bench_cases(qtype, args.case_rows), flush=True)


if __name__ == "__main__":
    main()
