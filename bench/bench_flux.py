"""Flux.1 benchmark: merge and LoRA bake on full-width Flux.1-dev files of
reduced depth in /dev/shm (deleted afterwards).

Inputs: two bf16 Flux.1-dev transformers (original/BFL layout, bare keys) at
the real width (hidden 3072, CLIP-L 768 and T5-XXL 4096 inputs) with
``--double`` double and ``--single`` single blocks (default 1 and 2: 1.3 GB
each; full depth is 19 and 38, 23.8 GB); a kohya LoRA and a diffusers/PEFT
LoRA of rank 32 on every Linear (fp32 factors, alpha 16).

(a) ``modelkit merge A B --blocks double=1,single=0.5,default=0.25`` (bf16
    stays bf16), (b) ``modelkit lora bake A kohya.safetensors`` (fused qkv and
    linear1 as one module) and (c) ``modelkit lora bake A peft.safetensors``
    (split q/k/v and proj_mlp into row slices), each run in a child process
    sampled every ~5 ms for its peak RssAnon and VmHWM (/proc/<pid>/status),
    beside ``cp`` of input A in the same run. The ``seconds`` column is the
    command's own (after imports); ``wall`` includes the interpreter start.

Run: ``.venv/bin/python bench/bench_flux.py [--double N] [--single N] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import REPO, child_env, log, machine_load, sample_process, table  # noqa: E402

RANK, ALPHA = 32, 16.0


def modelkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelkit", *args]


def make_inputs(work: Path, double: int, single: int) -> dict[str, Path]:
    from modelkit.testing import write_flux
    from modelkit.testing.lora import write_flux_lora

    work.mkdir(parents=True, exist_ok=True)
    paths = {n: work / f"{n}.safetensors" for n in ("a", "b", "kohya", "peft")}
    size = {"hidden": 3072, "depth": double, "single": single, "full_text": True}
    for seed, name in ((1, "a"), (2, "b")):
        log(f"generating {name}: Flux.1-dev bf16, width 3072, {double} double + {single} single "
            "blocks ...")
        write_flux(paths[name], seed=seed, **size)
    for seed, naming in ((3, "kohya"), (4, "peft")):
        log(f"generating a rank-{RANK} {naming} LoRA ...")
        write_flux_lora(paths[naming], naming, rank=RANK, alpha=ALPHA,
                        alpha_in_metadata=True, seed=seed, **size)
    return paths


def cp_seconds(src: Path, dst: Path) -> float:
    best = float("inf")
    for _ in range(2):
        s0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(dst)], check=True, cwd=REPO)
        best = min(best, time.perf_counter() - s0)
        dst.unlink()
    return best


def measure(label: str, cmd: list[str], out: Path, cp: float) -> list[str]:
    log(f"{label} ...")
    r = sample_process(cmd, child_env())
    if r.returncode != 0:
        raise RuntimeError(f"{label}: exited {r.returncode}: {r.stderr[-2000:]}")
    rep = json.loads(r.stdout)
    seconds = float(rep["seconds"])
    size = out.stat().st_size
    out.unlink()
    return [label, f"{size / 1e9:.2f}", f"{seconds:.2f}", f"{r.wall_s:.2f}", f"{cp:.2f}",
            f"{seconds / cp:.1f}x", f"{r.peak_anon_kb / 1024:.0f}", f"{r.hwm_kb / 1024:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit_bench_flux"))
    args = ap.parse_args()
    work = args.dir
    try:
        p = make_inputs(work, args.double, args.single)
        before = machine_load()
        out = work / "out.safetensors"
        cp = cp_seconds(p["a"], work / "copy.safetensors")
        common = ["-o", str(out), "-q", "--json", "--overwrite"]
        # warm-up: page cache and the input hash cache
        subprocess.run(modelkit("merge", str(p["a"]), str(p["b"]), *common), check=True,
                       env=child_env(), cwd=REPO, capture_output=True)
        rows = [
            measure("merge A B (block weights, bf16)", modelkit(
                "merge", str(p["a"]), str(p["b"]), "--blocks",
                "double=1,single=0.5,default=0.25", *common), out, cp),
            measure("lora bake A kohya (fused qkv, linear1)", modelkit(
                "lora", "bake", str(p["a"]), f"{p['kohya']}:0.8", *common), out, cp),
            measure("lora bake A peft (split q/k/v, proj_mlp)", modelkit(
                "lora", "bake", str(p["a"]), f"{p['peft']}:0.8", *common), out, cp),
        ]
        after = machine_load()
        largest = 21504 * 3072 * 2 / 2**20  # single_blocks.N.linear1, bf16, MiB
        print(f"machine before: {before[0]}; after: {after[0]}")
        print(f"input A: {p['a'].stat().st_size / 1e9:.2f} GB ({args.double} double + "
              f"{args.single} single blocks at width 3072); largest tensor "
              f"{largest:.0f} MiB (single_blocks.N.linear1, bf16)")
        print(table("Flux.1 merge and LoRA bake (seconds: the command's own; cp: of A)",
                    ["", "out GB", "seconds", "wall", "cp s", "vs cp", "peak RssAnon MiB",
                     "VmHWM MiB"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
