"""Q4_K/Q5_K/Q2_K (modelkit.io.ggml.k_qkx2) against ggml's reference on one
thread, and the same quantizers on several Python worker threads (one torch
intra-op thread each: the export may quantize two tensors at once).

Usage: bench/ggml_ref/build.sh GGML_CHECKOUT, then
    PYTHONPATH=. python bench/bench_k_qkx2_workers.py [--types q4_k,q5_k,q2_k]
        [--shapes 3072x3072,12288x3072] [--repeat 3] [--workers 2]

Each repeat times ggml, modelkit on one thread and modelkit on ``--workers``
threads back to back (wall clock), so a busy machine slows all three alike;
printed: the best of each, the median of the per-repeat ratios, and the
one-thread ratio in CPU time of the calling thread (``time.thread_time``:
steadier beside busy processes, which deschedule both alike).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).with_name("ggml_ref")))
import ggml_ref

from modelkit.io.ggml import quantize_blocks


def on_workers(x: torch.Tensor, name: str, workers: int) -> torch.Tensor:
    """``quantize_blocks(x, name)`` with the rows of ``x`` split over
    ``workers`` threads."""
    parts = torch.tensor_split(x, workers)
    out: list[torch.Tensor | None] = [None] * workers

    def work(i: int) -> None:
        out[i] = quantize_blocks(parts[i], name)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return torch.cat([o for o in out if o is not None])


def _seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter
             ) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def bench(qtype: str, rows: int, cols: int, repeat: int, workers: int) -> str:
    """One table row."""
    x = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    xt = torch.from_numpy(x)
    name = qtype.upper()
    ref_s, one_s, many_s, cpu = [], [], [], []
    for _ in range(repeat):
        t, ref = _seconds(lambda: ggml_ref.quantize(x, qtype))
        ref_s.append(t)
        t, one = _seconds(lambda: quantize_blocks(xt, name))
        one_s.append(t)
        ref_cpu, _ = _seconds(lambda: ggml_ref.quantize(x, qtype), time.thread_time)
        one_cpu, _ = _seconds(lambda: quantize_blocks(xt, name), time.thread_time)
        cpu.append(one_cpu / ref_cpu)
        t, many = _seconds(lambda: on_workers(xt, name, workers))
        many_s.append(t)
    ref_bytes = np.asarray(ref).reshape(-1)
    same = (np.asarray(one).reshape(-1) == ref_bytes).all() and (
        np.asarray(many).reshape(-1) == ref_bytes).all()
    r1 = statistics.median(o / r for o, r in zip(one_s, ref_s, strict=True))
    rn = statistics.median(m / r for m, r in zip(many_s, ref_s, strict=True))
    return (f"{qtype:5s} {rows}x{cols:<6d} {min(ref_s) * 1e3:8.0f} {min(one_s) * 1e3:8.0f} "
            f"{min(many_s) * 1e3:8.0f} {r1:7.2f}x {rn:7.2f}x {statistics.median(cpu):7.2f}x  "
            f"{'identical' if same else 'DIFFER'}")


def main() -> None:
    """Parse the options and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="q4_k,q5_k,q2_k")
    parser.add_argument("--shapes", default="3072x3072,12288x3072")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'type':5s} {'shape':11s} {'ggml ms':>8s} {'1 thr ms':>8s} "
          f"{args.workers} thr ms  ratio 1  ratio {args.workers}  cpu 1  bytes")
    for qtype in args.types.split(","):
        for shape in args.shapes.split(","):
            rows, cols = (int(v) for v in shape.split("x"))
            print(bench(qtype, rows, cols, args.repeat, args.workers), flush=True)


if __name__ == "__main__":
    main()
