"""Every ``export-gguf --type`` on an SDXL checkpoint and a Flux.1
transformer (seeded values, real key names, reduced sizes), each quantized
tensor compared block by block with ggml's reference quantizer on the same
float32 rows (bench/ggml_ref, built by build.sh), and every file read by
gguf-py's GGUFReader.

    PYTHONPATH=. python bench/check_gguf_types.py [--dir /dev/shm] [--flux-hidden 512]

Prints, per model and type, the tensors by stored type, the quantized blocks
compared and how many are identical; exit 1 if any block differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH / "ggml_ref"), str(BENCH.parent)]

import ggml_ref  # noqa: E402

TYPES = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m",
         "q3_k_s", "q2_k", "q5_1", "q5_0", "q4_1", "q4_0"]


def _inputs(work: Path, flux_hidden: int) -> dict[str, Path]:
    from modelkit import testing

    sdxl = work / "sdxl.safetensors"
    testing.write_checkpoint(sdxl, "sdxl", tiny=True, seed=1)
    flux = work / "flux.safetensors"
    testing.write_flux(flux, "dev", hidden=flux_hidden, depth=1, single=1, seed=2)
    return {"sdxl": sdxl, "flux": flux}


def _float_rows(source: object, key: str, shape: tuple[int, ...]) -> np.ndarray:
    t = source.get(key).float().reshape(-1, shape[-1])  # type: ignore[attr-defined]
    return np.ascontiguousarray(t.numpy())


def check(model: str, path: Path, qtype: str, out: Path) -> tuple[Counter[str], int, int]:
    from gguf import GGUFReader

    from modelkit.cli import main as cli_main
    from modelkit.io.open import open_source

    code = cli_main(["export-gguf", str(path), "-o", str(out), "--type", qtype, "-q"])
    if code:
        raise SystemExit(f"export-gguf {model} --type {qtype}: exit {code}")
    reader = GGUFReader(out)  # gguf-py reads the whole file
    src = open_source(path)
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.")
                                             for k in src.infos) else ""
    types: Counter[str] = Counter()
    compared = same = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        types[name] += 1
        if name.lower() not in ggml_ref.BLOCKS:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order
        key = prefix + t.name
        rows = _float_rows(src, key, shape)
        ref = ggml_ref.quantize(rows, name.lower()).reshape(-1)
        mine = np.asarray(t.data).reshape(-1).view(np.uint8)
        _, nbytes = ggml_ref.BLOCKS[name.lower()]
        a, b = mine.reshape(-1, nbytes), ref.reshape(-1, nbytes)
        compared += a.shape[0]
        same += int((a == b).all(axis=1).sum())
    return types, compared, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--flux-hidden", type=int, default=512)
    args = ap.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        for model, path in _inputs(work, args.flux_hidden).items():
            for qtype in TYPES:
                types, compared, same = check(model, path, qtype, work / f"{model}-{qtype}.gguf")
                bad += compared - same
                kinds = ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
                print(f"{model:5} {qtype:7} blocks {same}/{compared} identical  ({kinds})")
    print("every block identical to ggml's reference" if not bad else f"{bad} blocks differ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
