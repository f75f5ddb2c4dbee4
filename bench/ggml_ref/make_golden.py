"""Regenerate the golden files ``tests/data/ggml/<type>.npz`` from ggml's
reference quantizers (``build.sh`` first): for every type of ``ggml_ref.BLOCKS``
(or ``--types``) and every seeded case of ``modelkit.testing.ggml_cases``, the
bytes ``quantize_<type>(src, dst, nrows, n_per_row, NULL)`` writes.

Usage: PYTHONPATH=. python bench/ggml_ref/make_golden.py [--types q6_k,q3_k]
    [--ggml-commit SHA] [--out tests/data/ggml]

Each file holds ``case_<name>``: uint8 ``[rows, row_bytes]`` per case and
``meta``: a JSON string with the generator's parameters (rows, cols, seed),
each input's sha256 (so a test tells a changed input from a changed
quantizer), the ggml commit, and the cases skipped because the reference
aborts on them (its ``nearest_int`` asserts ``|x| <= 4194303`` in a build
with assertions, e.g. Q4_K on subnormal inputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import ggml_ref

from modelkit.testing.ggml_cases import CASES, make_case

ROWS, COLS, SEED = 2, 1024, 0
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "ggml"


def _reference_survives(x: np.ndarray, qtype: str) -> bool:
    """Whether ggml's reference quantizes ``x`` without aborting (run in a
    forked child: an assertion kills the process)."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        ggml_ref.quantize(x, qtype)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def golden(qtype: str, commit: str) -> dict[str, np.ndarray]:
    """The arrays of one type's golden file."""
    arrays: dict[str, np.ndarray] = {}
    inputs: dict[str, str] = {}
    skipped: list[str] = []
    for name in sorted(CASES):
        x = make_case(name, ROWS, COLS, SEED)
        if not _reference_survives(x, qtype):
            skipped.append(name)
            continue
        arrays[f"case_{name}"] = ggml_ref.quantize(x, qtype)
        inputs[name] = hashlib.sha256(x.tobytes()).hexdigest()
    meta = {"type": qtype, "rows": ROWS, "cols": COLS, "seed": SEED, "ggml_commit": commit,
            "input_sha256": inputs, "skipped_reference_aborts": skipped}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def main() -> None:
    """Write one ``.npz`` per type."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(ggml_ref.BLOCKS))
    parser.add_argument("--ggml-commit", default="d99724f2b141fed9e1a9f402213506c081433465")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for qtype in args.types.split(","):
        arrays = golden(qtype, args.ggml_commit)
        path = args.out / f"{qtype}.npz"
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        skipped = json.loads(str(arrays["meta"]))["skipped_reference_aborts"]
        note = f" (skipped, reference aborts: {', '.join(skipped)})" if skipped else ""
        print(f"{path.name}: {path.stat().st_size} bytes{note}")


if __name__ == "__main__":
    main()
