"""Every fault of issue 21 on every family: ``modelkit verify`` on the
clean tiny SD1, SDXL and Flux.1 fixtures and on each faulty file
(tests/fault_fixtures.py builds them), through the console script's entry
point. tests/test_verify_faults.py runs a part of this matrix (the suite's
time budget); this runs all of it and prints, per family and case, the exit
code, the failing checks, the layers the gates failed, and the time.

    .venv/bin/python bench/bench_verify_faults.py [--dir /dev/shm]

Exit code 1 when a clean file fails or a fault is not caught by the checks
it must trip.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from fault_fixtures import CASES, FAMILIES, build, verify_args  # noqa: E402

from modelkit.cli import main as cli_main  # noqa: E402

# the checks each case must fail (the clean cast: none)
MUST = {"clean": set(), "loose": {"static.zeroed", "static.nan_inf"},
        "broken": {"gate.f16", "vae.round_trip", "static.zeroed"}}


def short(key: str) -> str:
    """A layer name without its component prefix."""
    for prefix in ("model.diffusion_model.", "first_stage_model.", "vae."):
        key = key.removeprefix(prefix)
    return key.removesuffix(".weight")


def must_fail(fam: str, case: str) -> set[str]:
    if case == "loose":
        return MUST[case] | {"static.keys.transformer" if fam == "flux" else "static.keys.unet"}
    if case == "wrong_scale":
        return {"gate.fp8_e4m3_scaled" if fam == "flux" else "gate.int8_channel"}
    return MUST[case]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the fixtures go")
    args = ap.parse_args()
    bad = 0
    print("| family | case | exit | failing checks | failing layers | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fam in FAMILIES:
            (Path(tmp) / fam).mkdir()
            b = build(fam, Path(tmp) / fam)
            for case in CASES:
                out = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(out):
                    code = cli_main(verify_args(b, case))
                seconds = time.perf_counter() - start
                rep = json.loads(out.getvalue())
                failed = {c["name"] for c in rep["checks"] if c["verdict"] == "fail"}
                layers = [g["key"] for g in (rep.get("gates") or {}).get("layers", [])
                          if not g["passed"]]
                want = must_fail(fam, case)
                ok = (code == 0 and not failed) if case == "clean" else \
                    (code == 1 and want <= failed)
                bad += not ok
                print(f"| {fam} | {case} | {code} | {', '.join(sorted(failed)) or '-'} | "
                      f"{', '.join(short(k) for k in layers) or '-'} | "
                      f"{seconds:.2f} |" + ("" if ok else " **NOT AS EXPECTED**"))
    print(f"\n{len(FAMILIES) * len(CASES) - bad} of {len(FAMILIES) * len(CASES)} cases as "
          "expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
