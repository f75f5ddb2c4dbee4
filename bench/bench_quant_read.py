"""How fast modelkit reads quantized inputs, one Flux-size tensor per format.

Writes one file per storage (GGUF of each block type, ComfyUI fp8 with a
scale, bitsandbytes NF4, and the same tensor as plain BF16 safetensors as the
yardstick) holding one ``[3072, 12288]`` weight (Flux.1's ``linear2``, 37.7 M
values) of random codes with finite scales, then times ``open_source(f).get``
(read + dequantize to float32) on one torch thread, best of ``--rounds``. It is
a benchmark, not a test: it prints a table and never fails.

    .venv/bin/python bench/bench_quant_read.py [--dir /dev/shm/modelkit-bench] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROWS, COLS = 3072, 12288
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
# fp16 scale fields per block (ggml src/ggml-common.h), kept finite
FP16_FIELDS = {"Q8_0": (0,), "Q5_1": (0, 2), "Q5_0": (0,), "Q4_1": (0, 2), "Q4_0": (0,),
               "Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,),
               "Q2_K": (80, 82)}


def _gguf(path: Path, kind: str) -> None:
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    n = ROWS * COLS // block
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        data[:, at:at + 2] = rng.uniform(1e-3, 1e-2, n).astype(np.float16) \
            .view(np.uint8).reshape(n, 2)
    w = gguf.GGUFWriter(path, "flux")
    w.add_tensor("single_blocks.0.linear2.weight", data.reshape(ROWS, -1),
                 raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _safetensors(folder: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    key = "single_blocks.0.linear2.weight"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g)
    out = {"BF16 (plain)": folder / "bf16.safetensors", "comfy fp8": folder / "fp8.safetensors",
           "bnb nf4": folder / "nf4.safetensors"}
    save_file({key: w.to(torch.bfloat16)}, str(out["BF16 (plain)"]))
    meta = {"_quantization_metadata": json.dumps(
        {"layers": {key[:-7]: {"format": "float8_e4m3fn"}}})}
    save_file({key: (w * 100).to(torch.float8_e4m3fn), key + "_scale": torch.tensor(0.01)},
              str(out["comfy fp8"]), metadata=meta)
    n = ROWS * COLS
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [ROWS, COLS]}
    save_file({key: torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=g),
               key + ".absmax": torch.rand(n // 64, generator=g),
               key + ".quant_map": torch.linspace(-1, 1, 16),
               key + ".quant_state.bitsandbytes__nf4": torch.tensor(
                   list(json.dumps(state).encode()), dtype=torch.uint8)},
              str(out["bnb nf4"]))
    return out


def _time(path: Path, rounds: int) -> float:
    import torch

    from modelkit.io.open import open_source

    best = float("inf")
    for _ in range(rounds):
        src = open_source(path)
        start = time.perf_counter()
        for key in src.infos:  # float32 values in memory (a no-op when dequantized)
            src.get(key).to(torch.float32)
        best = min(best, time.perf_counter() - start)
        getattr(src, "close", lambda: None)()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/dev/shm/modelkit-bench")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    folder = Path(args.dir) / "bench_quant_read"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files = _safetensors(folder)
        for kind in GGUF_TYPES:
            files[f"GGUF {kind}"] = folder / f"{kind}.gguf"
            _gguf(files[f"GGUF {kind}"], kind)
        print(f"one [{ROWS}, {COLS}] tensor ({ROWS * COLS / 1e6:.1f} M values), read + "
              f"dequantized to float32, one torch thread, best of {args.rounds}")
        print(f"{'storage':<14} {'file MB':>8} {'seconds':>8} {'M values/s':>11}")
        for name, path in files.items():
            s = _time(path, args.rounds)
            print(f"{name:<14} {path.stat().st_size / 1e6:>8.1f} {s:>8.3f} "
                  f"{ROWS * COLS / s / 1e6:>11.0f}")
            sys.stdout.flush()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
