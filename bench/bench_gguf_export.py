"""``modelkit export-gguf`` of a Flux.1 transformer against ggml's reference
quantizers on the same tensors, one thread, and against ``cp``.

Usage: bench/ggml_ref/build.sh GGML_CHECKOUT, then
    PYTHONPATH=. python bench/bench_gguf_export.py [--type q4_k_m] [--double 1]
        [--single 2] [--rounds 1] [--busy] [--dir /dev/shm/modelkit-bench]

The input is a Flux.1-dev transformer at full width (3072, the real text
inputs) and reduced depth (``--double`` double and ``--single`` single
blocks), bf16, written once to ``--dir`` (a RAM disk). Three commands run,
each in a fresh process, timed wall to wall:

* ``cp`` of the input;
* ``modelkit export-gguf IN -o OUT --type T``;
* the reference: a child that reads every tensor of modelkit's output plan
  from the input (the same names, types and shapes, read from the GGUF
  modelkit wrote), quantizes it with ggml's ``quantize_<type>`` (bench/ggml_ref,
  what ``llama-quantize`` runs, no importance matrix) on one thread, casts
  the float ones, and writes the bytes; it reports its quantize time alone
  too, and how many blocks equal modelkit's.

The Done-when of issue 20: modelkit at or under 1.0x the reference's time in
the same run, quiet and (``--busy``) beside one busy process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import (  # noqa: E402  (bench_io puts the repo on sys.path)
    DEFAULT_DIR,
    REPO,
    busy_loop,
    log,
    machine_load,
    sample_process,
    table,
)

TARGET_RATIO = 1.0  # modelkit / ggml one thread


def make_input(path: Path, double: int, single: int) -> None:
    """The bf16 Flux.1-dev transformer at full width and the given depth."""
    if path.exists():
        return
    from modelkit import testing

    log(f"writing {path} (Flux.1-dev, width 3072, {double} double + {single} single blocks)")
    testing.write_flux(path, hidden=3072, depth=double, single=single, full_text=True,
                       dtype="BF16", seed=20)


def reference_child(src: str, planned: str, out: str) -> None:
    """The reference conversion (run in its own process): every tensor of the
    GGUF ``planned`` (modelkit's output: names, types, shapes) from ``src``,
    quantized by ggml on one thread, written to ``out``. Prints JSON."""
    start = time.perf_counter()
    import numpy as np
    import torch

    sys.path.insert(0, str(BENCH / "ggml_ref"))
    import ggml_ref
    from safetensors import safe_open

    from modelkit.io.gguf_header import read_gguf_header

    torch.set_num_threads(1)
    header = read_gguf_header(Path(planned))
    quant_s = 0.0
    same = blocks = 0
    by_type: dict[str, list[int]] = {}
    with safe_open(src, framework="pt") as f, open(planned, "rb") as mine, \
            open(out, "wb") as dst:
        for name, t in header.tensors.items():
            x = f.get_tensor(name).float().numpy()
            if t.ggml_type in ("F32", "F16", "BF16"):
                data = {"F32": x, "F16": x.astype(np.float16)}.get(t.ggml_type)
                if data is None:
                    data = torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
                dst.write(np.ascontiguousarray(data).tobytes())
                continue
            rows = x.reshape(-1, t.shape[-1])
            q0 = time.perf_counter()
            ref = ggml_ref.quantize(rows, t.ggml_type.lower())
            quant_s += time.perf_counter() - q0
            dst.write(ref.tobytes())
            mine.seek(header.data_start + t.offset)
            got = np.frombuffer(mine.read(t.nbytes), np.uint8)
            nbytes = ggml_ref.BLOCKS[t.ggml_type.lower()][1]
            eq = (got.reshape(-1, nbytes) == ref.reshape(-1, nbytes)).all(axis=1)
            same, blocks = same + int(eq.sum()), blocks + eq.size
            tally = by_type.setdefault(t.ggml_type, [0, 0])
            tally[0], tally[1] = tally[0] + int(eq.sum()), tally[1] + eq.size
    print(json.dumps({"wall_s": time.perf_counter() - start, "quantize_s": quant_s,
                      "same_blocks": same, "blocks": blocks, "by_type": by_type}))


def _run(cmd: list[str]) -> tuple[float, str]:
    run = sample_process(cmd)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... exited {run.returncode}\n"
                         f"{run.stderr[-2000:]}")
    return run.wall_s, run.stdout


def one_round(src: Path, out: Path, ref_out: Path, qtype: str) -> dict[str, Any]:
    """cp, modelkit and the reference once, in that order."""
    cp_s, _ = _run(["cp", str(src), str(ref_out)])
    ref_out.unlink()
    mk_s, text = _run([sys.executable, "-m", "modelkit", "export-gguf", str(src), "-o",
                       str(out), "--type", qtype, "--overwrite", "--json"])
    report = json.loads(text)
    ref_s, text = _run([sys.executable, str(Path(__file__).resolve()), "_reference",
                        str(src), str(out), str(ref_out)])
    ref = json.loads(text.strip().splitlines()[-1])
    ref_out.unlink()
    return {"cp": cp_s, "modelkit": mk_s, "modelkit_run": report["seconds"],
            "reference": ref_s, "reference_quantize": ref["quantize_s"],
            "same": ref["same_blocks"], "blocks": ref["blocks"], "by_type": ref["by_type"],
            "snr_db": report["output_details"]["quality"]["snr_db"],
            "out_bytes": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--busy", action="store_true", help="also run beside a busy process")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    sys.path.insert(0, str(BENCH / "ggml_ref"))
    import ggml_ref

    if not ggml_ref.available():
        raise SystemExit("build ggml's reference first: bench/ggml_ref/build.sh GGML_CHECKOUT")
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / f"flux-w3072-d{args.double}s{args.single}.safetensors"
    make_input(src, args.double, args.single)
    out, ref_out = args.dir / "bench-export.gguf", args.dir / "bench-reference.bin"
    os.environ.setdefault("PYTHONPATH", str(REPO))
    rows, verdicts = [], []
    for busy in ([False, True] if args.busy else [False]):
        with busy_loop(busy):
            runs = [one_round(src, out, ref_out, args.type) for _ in range(args.rounds)]
        best = {k: min(r[k] for r in runs) for k in ("cp", "modelkit", "modelkit_run",
                                                     "reference", "reference_quantize")}
        label = "busy" if busy else "quiet"
        r0 = runs[0]
        ratio = best["modelkit"] / best["reference"]
        rows.append([label, f"{best['cp']:.2f}", f"{best['modelkit']:.1f}",
                     f"{best['modelkit_run']:.1f}", f"{best['reference']:.1f}",
                     f"{best['reference_quantize']:.1f}", f"{ratio:.2f}x",
                     f"{best['modelkit'] / best['cp']:.0f}x",
                     f"{100 * r0['same'] / max(1, r0['blocks']):.3f}%", f"{r0['snr_db']:.1f}"])
        verdicts.append(f"{label}: modelkit {ratio:.2f}x the reference "
                        f"({'at or under' if ratio <= TARGET_RATIO else 'OVER'} "
                        f"{TARGET_RATIO:g}x); identical blocks per type "
                        + ", ".join(f"{t} {s}/{n}" for t, (s, n) in r0["by_type"].items()))
    size = src.stat().st_size
    print(table(f"export-gguf --type {args.type}: {src.name} ({size / 1e9:.2f} GB bf16), "
                f"best of {args.rounds}; {machine_load()[0]}",
                ["run", "cp s", "modelkit s", "(run s)", "ggml s", "(quantize s)",
                 "mk/ggml", "mk/cp", "same blocks", "SNR dB"], rows))
    for v in verdicts:
        print(f"- {v}")
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":
        reference_child(*sys.argv[2:5])
    else:
        main()
