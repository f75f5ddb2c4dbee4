"""Calibrate verify's per-layer quantization gates (issue 21).

For every format class of :data:`modelkit.core.verify_thresholds.GATES`,
quantize seeded weight matrices of three distributions, dequantize them and
measure the per-layer SNR (dB) and cosine that ``verify --reference``
computes:

* ``gauss``: N(0, 1/fan_in), how trained linear layers look in scale;
* ``student3``: Student-t with 3 degrees of freedom (heavy tails), scaled
  to the same standard deviation;
* ``outliers``: Gaussian with 0.1 % of the weights multiplied by 30 (the
  few huge weights real checkpoints have in some channels).

GGUF types go through ggml's own reference quantizers
(``bench/ggml_ref/build.sh`` builds them from ggml-org/ggml
``src/ggml-quants.c``; without an importance matrix, as ``llama-quantize``
without ``--imatrix``) and back through gguf-py's ``gguf.quants.dequantize``.
fp8 and int8 follow the storage formats: plain fp8 (a cast), ComfyUI's
scaled fp8 (one scale per tensor, amax / the format's largest value),
modelkit's ``modelkit.int8.per_channel`` (``convert.quantize.int8_quantize``),
int8 per tensor and per 128x128 block (ComfyUI ``int8_tensorwise`` /
``int8_blockwise``, comfyanonymous/ComfyUI ``comfy/quant_ops.py``).

The suggested fail level of a class is the worst SNR measured minus
:data:`MARGIN_DB` (a real layer may be a little worse than these three
distributions; a broken one is tens of dB worse), rounded down; its cosine
level is the cosine of that SNR. Prints a markdown table to paste into
docs/verify.md and the threshold lines for core/verify_thresholds.py.

    .venv/bin/python bench/calibrate_gates.py [--rows 256] [--cols 1024] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "ggml_ref"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARGIN_DB = 3.0
GGUF_TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_1", "q5_0", "q4_1", "q4_0")


def weights(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A seeded weight matrix of one distribution."""
    gen = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(cols)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=gen) * std
    if kind == "student3":
        t = torch.distributions.StudentT(3.0).sample((rows, cols))  # uses the global RNG
        return t / t.std() * std
    w = torch.randn(rows, cols, generator=gen) * std
    hit = torch.rand(rows, cols, generator=gen) < 1e-3
    return torch.where(hit, w * 30, w)


def gguf_roundtrip(qtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import ggml_ref
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    def run(w: torch.Tensor) -> torch.Tensor:
        blocks = ggml_ref.quantize(w.numpy(), qtype)
        back = dequantize(blocks, GGMLQuantizationType[qtype.upper()])
        return torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(w.shape))
    return run


def fp8(dtype: torch.dtype, scaled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    top = torch.finfo(dtype).max

    def run(w: torch.Tensor) -> torch.Tensor:
        s = float(w.abs().max()) / top if scaled else 1.0
        return (w / s).clamp(-top, top).to(dtype).float() * s
    return run


def int8_channel(w: torch.Tensor) -> torch.Tensor:
    from modelkit.convert.quantize import int8_dequantize, int8_quantize

    q, s, _, _ = int8_quantize(w)
    return int8_dequantize(q, s, torch.float32)


def int8_tensor(w: torch.Tensor) -> torch.Tensor:
    s = float(w.abs().max()) / 127
    return (w / s).round().clamp(-127, 127) * s


def int8_block(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    r, c = w.shape
    b = w.reshape(r // block, block, c // block, block)
    s = b.abs().amax(dim=(1, 3), keepdim=True) / 127
    return ((b / s).round().clamp(-127, 127) * s).reshape(r, c)


def cast(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w.to(dtype).float()


def classes() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Format class -> quantize-and-restore function (float32 in, float32 out)."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        t: gguf_roundtrip(t) for t in GGUF_TYPES}
    out.update({
        "fp8_e4m3_scaled": fp8(torch.float8_e4m3fn, True),
        "fp8_e4m3": fp8(torch.float8_e4m3fn, False),
        "fp8_e5m2_scaled": fp8(torch.float8_e5m2, True),
        "fp8_e5m2": fp8(torch.float8_e5m2, False),
        "int8_channel": int8_channel, "int8_block": int8_block, "int8_tensor": int8_tensor,
        "f16": cast(torch.float16), "bf16": cast(torch.bfloat16),
    })
    return out


def measure(w: torch.Tensor, back: torch.Tensor) -> tuple[float, float]:
    """SNR dB and cosine of ``back`` against ``w`` (float64 sums)."""
    a, b = w.double().reshape(-1), back.double().reshape(-1)
    d = a - b
    snr = 10 * math.log10(float(a @ a) / float(d @ d)) if float(d @ d) else math.inf
    cos = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
    return snr, cos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    kinds = ("gauss", "student3", "outliers")
    table = classes()
    print(f"rows x cols {args.rows}x{args.cols}, seeds 0..{args.seeds - 1}, margin "
          f"{MARGIN_DB:g} dB\n")
    print("| class | " + " | ".join(f"{k} SNR dB (min)" for k in kinds)
          + " | worst cosine | fail below SNR dB | fail below cosine |")
    print("| --- " * (len(kinds) + 4) + "|")
    lines = []
    for name, fn in table.items():
        worst: dict[str, float] = {}
        min_cos = 1.0
        for kind in kinds:
            for seed in range(args.seeds):
                w = weights(kind, args.rows, args.cols, 1000 * seed + kinds.index(kind))
                snr, cos = measure(w, fn(w))
                worst[kind] = min(worst.get(kind, math.inf), snr)
                min_cos = min(min_cos, cos)
        fail = math.floor(min(worst.values()) - MARGIN_DB)
        fail_cos = 1 / math.sqrt(1 + 10 ** (-fail / 10))
        print(f"| {name} | " + " | ".join(f"{worst[k]:.1f}" for k in kinds)
              + f" | {min_cos:.6f} | {fail} | {fail_cos:.6f} |")
        lines.append(f'    "{name}": Gate({fail}, {fail_cos:.6f}, {min(worst.values()):.1f}),')
    print("\nfor core/verify_thresholds.py GATES:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
