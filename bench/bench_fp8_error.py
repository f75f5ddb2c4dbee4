"""What fp8's error report costs: the UNet weights of a full-size SD1.5 fp16
file rounded to fp8_e4m3fn three ways, in this process, one thread,
interleaved per round:

* ``cast``: the conversion alone (chunks to float32, saturate, to fp8), no
  error measured;
* ``before``: the cast, then the error as modelkit measured it until
  issue 20 (``numeric.l2_sums`` on the fp8 chunk and its source: torch's
  fp8 -> float32 cast, 5x slower than the fp8 cast itself on a CPU);
* ``now``: ``quantize``'s path (``comfy_quant.Fp8Buffers``: the error on
  the same chunk in reused buffers, the stored codes decoded by a 256-entry
  table) and ComfyUI's per-tensor scaled fp8 (``comfy_quant.fp8_scaled``:
  one more pass for the tensor's amax).

The error sums of ``before`` and ``now`` are compared (they measure the
same thing). Run::

    .venv/bin/python bench/bench_fp8_error.py [--dir /dev/shm/modelkit-bench] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import FP16_INPUT, ensure_input
from bench_io import log, machine_load

if TYPE_CHECKING:
    import torch

LIMIT = 448.0
CHUNK = 1 << 20


def _cast(flat: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    import torch

    for i in range(0, flat.numel(), CHUNK):
        x = flat[i:i + CHUNK].to(torch.float32)
        out[i:i + CHUNK].copy_(x.clamp_(-LIMIT, LIMIT))
    return 0.0, 0.0


def _before(flat: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    import torch

    from modelkit.numeric import l2_sums

    err = ref = 0.0
    for i in range(0, flat.numel(), CHUNK):
        x = flat[i:i + CHUNK].to(torch.float32)
        q = x.clamp(-LIMIT, LIMIT).to(torch.float8_e4m3fn)
        out[i:i + CHUNK].copy_(q)
        e, r = l2_sums([(q, x)])
        err, ref = err + e, ref + r
    return err, ref


def _now(flat: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    import torch

    from modelkit.convert.comfy_quant import Fp8Buffers

    bufs = Fp8Buffers(torch.float8_e4m3fn)
    err = ref = 0.0
    for i in range(0, flat.numel(), CHUNK):
        e, r, _ = bufs.round(flat[i:i + CHUNK], out[i:i + CHUNK], None, 1.0, LIMIT)
        err, ref = err + e, ref + r
    return err, ref


def _scaled(flat: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    import torch

    from modelkit.convert.comfy_quant import fp8_scaled

    q, _, err, ref = fp8_scaled(flat, torch.float8_e4m3fn, "w")
    out.copy_(q)
    return err, ref


WAYS = {"cast (no error)": _cast, "before (cast + l2_sums)": _before,
        "now (fused, table decode)": _now, "comfy scaled (amax + fused)": _scaled}


def main(argv: list[str] | None = None) -> int:
    import torch

    from modelkit.io.reader import open_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    src = ensure_input(args.dir, FP16_INPUT)
    log(f"machine: {machine_load()[0]}")
    with open_model(src) as m:
        keys = [k for k, i in m.infos.items() if k.startswith("model.diffusion_model.")
                and i.dtype == "F16" and len(i.shape) >= 2]
        weights = [m.get(k).reshape(-1).clone() for k in keys]
    n = sum(w.numel() for w in weights)
    outs = [torch.empty(w.shape, dtype=torch.float8_e4m3fn) for w in weights]
    times: dict[str, list[float]] = {k: [] for k in WAYS}
    cpu: dict[str, list[float]] = {k: [] for k in WAYS}
    sums: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, fn in WAYS.items():
            t0, c0 = time.perf_counter(), time.process_time()
            err = ref = 0.0
            for w, o in zip(weights, outs, strict=True):
                e, r = fn(w, o)
                err, ref = err + e, ref + r
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            sums[name] = (err, ref)
    cast, cast_cpu = min(times["cast (no error)"]), min(cpu["cast (no error)"])
    print(f"{len(weights)} UNet tensors, {n / 1e6:.0f} M values of {src.name}, one thread, "
          f"{args.rounds} interleaved rounds; machine after: {machine_load()[0]}\n")
    print("| way | wall best | wall worst | CPU best | CPU best / cast | error cost (CPU) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, ts in times.items():
        c = min(cpu[name])
        print(f"| {name} | {min(ts):.2f} s | {max(ts):.2f} s | {c:.2f} s | "
              f"{c / cast_cpu:.2f}x | {c - cast_cpu:+.2f} s |")
    print("\n(wall best / cast: " + ", ".join(f"{k} {min(v) / cast:.2f}x"
                                                for k, v in times.items()) + ")")
    (e0, r0), (e1, r1) = sums["before (cast + l2_sums)"], sums["now (fused, table decode)"]
    print(f"\nerror sums: before {e0:.6g} / {r0:.6g}, now {e1:.6g} / {r1:.6g} "
          f"(relative difference {abs(e1 - e0) / e0:.1e}, {abs(r1 - r0) / r0:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
