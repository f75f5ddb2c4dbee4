"""Count the blocks modelkit's Q4_K/Q5_K/Q2_K quantizers write identically to
ggml's reference, on many seeded distributions.

    bench/ggml_ref/build.sh GGML_CHECKOUT
    PYTHONPATH=. python bench/ggml_ref/compare_qkx2.py [--rows 64] [--types q4_k,q5_k,q2_k]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import ggml_ref


def distributions(rows: int, n: int) -> dict[str, np.ndarray]:
    """Seeded float32 ``[rows, n]`` arrays, one per case."""
    rng = np.random.default_rng(20)
    g = rng.standard_normal((rows, n)).astype(np.float32)
    out: dict[str, np.ndarray] = {"gaussian": g, "std 0.02": g * np.float32(0.02)}
    out["student-t df=2"] = rng.standard_t(2, (rows, n)).astype(np.float32)
    spikes = g.copy()
    hit = rng.random((rows, n)) < 0.001
    spikes[hit] *= 50
    out["0.1% outliers x50"] = spikes
    zero_blocks = g.copy().reshape(-1, 256)
    zero_blocks[::3] = 0
    out["zero blocks"] = zero_blocks.reshape(rows, n)
    const = np.repeat(rng.standard_normal(rows * n // 16).astype(np.float32), 16)
    out["constant sub-blocks"] = const.reshape(rows, n)
    out["constant blocks"] = np.repeat(rng.standard_normal(rows * n // 256).astype(np.float32),
                                       256).reshape(rows, n)
    out["tiny 1e-30"] = g * np.float32(1e-30)
    out["subnormal"] = g * np.float32(1e-39)
    out["huge 6e4"] = np.clip(g * np.float32(3e4), -6e4, 6e4).astype(np.float32)
    out["all positive"] = np.abs(g)
    out["all negative"] = -np.abs(g)
    one = np.zeros((rows * n // 256, 256), dtype=np.float32)
    one[np.arange(one.shape[0]), rng.integers(0, 256, one.shape[0])] = rng.standard_normal(
        one.shape[0])
    out["one non-zero per block"] = one.reshape(rows, n)
    bf = (g.view(np.uint32) + 0x8000) & 0xFFFF0000
    out["bf16-rounded"] = bf.view(np.float32)
    out["fp16-rounded std 0.02"] = (g * np.float32(0.02)).astype(np.float16).astype(np.float32)
    out["uniform"] = rng.uniform(-1, 1, (rows, n)).astype(np.float32)
    out["few levels"] = rng.integers(-2, 3, (rows, n)).astype(np.float32)
    return out


def main() -> None:
    """Print identical / total blocks per type and case."""
    import torch

    from modelkit.io.ggml import k_qkx2

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--types", default="q4_k,q5_k,q2_k")
    parser.add_argument("--lib", help="another build of libggmlq.so, e.g. one with -DNDEBUG "
                        "(llama.cpp's release builds: no assert on subnormal inputs)")
    args = parser.parse_args()
    if args.lib:
        ggml_ref.LIB_PATH = Path(args.lib)
    torch.set_num_threads(1)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "q4_k": k_qkx2.quantize_q4_k, "q5_k": k_qkx2.quantize_q5_k,
        "q2_k": k_qkx2.quantize_q2_k}
    bad = 0
    for qtype in args.types.split(","):
        nbytes = ggml_ref.BLOCKS[qtype][1]
        for name, x in distributions(args.rows, args.n).items():
            ref = ggml_ref.quantize(x, qtype).reshape(-1, nbytes)
            mine = fns[qtype](torch.from_numpy(x)).numpy()
            same = (ref == mine).all(axis=1)
            bad += int((~same).sum())
            print(f"{qtype} {name:24s} {int(same.sum())}/{same.size}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
