"""Flux.1 benchmark: merge and LoRA bake on full-width Flux.1-dev files of
reduced depth in /dev/shm (deleted afterwards unless ``--keep``).

Inputs: two bf16 Flux.1-dev transformers (original/BFL layout, bare keys) at
the real width (hidden 3072, CLIP-L 768 and T5-XXL 4096 inputs) with
``--double`` double and ``--single`` single blocks (default 2 and 4: 2.6 GB
each; full depth is 19 and 38, 23.8 GB; /dev/shm holds A, B and one output
or copy at a time, 7.9 GB); a kohya LoRA and a diffusers/PEFT
LoRA of rank 32 on every Linear (fp32 factors, alpha 16).

(a) ``modelkit merge A B --blocks double=1,single=0.5,default=0.25`` (bf16
    stays bf16), (b) ``modelkit lora bake A kohya.safetensors`` (fused qkv and
    linear1 as one module) and (c) ``modelkit lora bake A peft.safetensors``
    (split q/k/v and proj_mlp into row slices), each run ``--rounds`` times in
    a child process sampled every ~5 ms for its peak RssAnon and VmHWM
    (/proc/<pid>/status), beside ``cp`` of input A timed as often in the same
    condition; with ``--busy`` everything again beside one spinning
    pure-Python process (bench_io.busy_loop). The ``seconds`` column is the
    command's own (its ``--json``: from the start of ``run``, the torch import
    included), best of the rounds, with the spread; ``wall`` includes the
    interpreter start; ``import torch`` is timed in a child as the fixed part
    of every command; ``CPU s`` is the least user + system CPU time of a run
    (the whole process, all its threads: the figure other work on the machine
    disturbs least), beside ``cp``'s.

The default depth was 1 and 2 (1.37 GB): there the ~0.9 s torch import, a
fixed cost of every command, was 40 % of a bake and 1.5x ``cp`` on its own;
on a real 23.8 GB file it is 4 %. At 2 and 4 it weighs half as much, the
depth issue 19's figures were taken at; ``w/o import`` gives the ratio a
full-size file tends to.

Run: ``.venv/bin/python bench/bench_flux.py [--double N] [--single N] [--rounds N]
[--busy] [--bake-only] [--keep] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import (  # noqa: E402
    REPO,
    busy_loop,
    child_env,
    log,
    machine_load,
    sample_process,
    table,
)

RANK, ALPHA = 32, 16.0
# the children run as an installed modelkit does, from cached bytecode (a
# PYTHONDONTWRITEBYTECODE environment recompiled ~70 modules in every command)
ENV = {k: v for k, v in child_env().items() if k != "PYTHONDONTWRITEBYTECODE"}


def modelkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelkit", *args]


def make_inputs(work: Path, double: int, single: int, merge: bool = True) -> dict[str, Path]:
    """The inputs in ``work`` (B only for the merge); files a ``--keep`` run
    left there (their names hold the depth) are reused."""
    from modelkit.testing import write_flux
    from modelkit.testing.lora import write_flux_lora

    work.mkdir(parents=True, exist_ok=True)
    paths = {n: work / f"{n}_d{double}s{single}.safetensors" for n in ("a", "b", "kohya", "peft")}
    hidden, full_text = 3072, True
    for seed, name in ((1, "a"), (2, "b")):
        if not paths[name].exists() and (merge or name == "a"):
            log(f"generating {name}: Flux.1-dev bf16, width 3072, {double} double + {single} "
                "single blocks ...")
            write_flux(paths[name], seed=seed, hidden=hidden, depth=double, single=single,
                       full_text=full_text)
    for seed, naming in ((3, "kohya"), (4, "peft")):
        if not paths[naming].exists():
            log(f"generating a rank-{RANK} {naming} LoRA ...")
            write_flux_lora(paths[naming], naming, rank=RANK, alpha=ALPHA,
                            alpha_in_metadata=True, seed=seed, hidden=hidden, depth=double,
                            single=single, full_text=full_text)
    return paths


def child_cpu() -> float:
    """User + system CPU seconds of every child waited for so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cp_seconds(src: Path, dst: Path, rounds: int) -> tuple[list[float], float]:
    """Wall seconds of each ``cp`` and the least CPU seconds one took."""
    times, cpu = [], float("inf")
    for _ in range(rounds):
        s0, c0 = time.perf_counter(), child_cpu()
        subprocess.run(["cp", str(src), str(dst)], check=True, cwd=REPO)
        times.append(time.perf_counter() - s0)
        cpu = min(cpu, child_cpu() - c0)
        dst.unlink()
    return times, cpu


def import_seconds(rounds: int) -> float:
    """The best time of ``import torch`` in a fresh child (measured inside it)."""
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], check=True, text=True,
                                    capture_output=True, env=ENV, cwd=REPO).stdout)
               for _ in range(rounds))


@dataclass
class Case:
    """One command of the table."""

    label: str
    cmd: list[str]


def measure(case: Case, out: Path, cp: tuple[list[float], float], torch_s: float,
            rounds: int, tag: str) -> list[str]:
    secs, walls, peak, hwm, size, cpu = [], [], 0, 0, 0, float("inf")
    for i in range(rounds):
        log(f"{case.label}{tag} ({i + 1}/{rounds}) ...")
        c0 = child_cpu()
        r = sample_process(case.cmd, ENV)
        cpu = min(cpu, child_cpu() - c0)
        if r.returncode != 0:
            raise RuntimeError(f"{case.label}: exited {r.returncode}: {r.stderr[-2000:]}")
        secs.append(float(json.loads(r.stdout)["seconds"]))
        walls.append(r.wall_s)
        peak, hwm = max(peak, r.peak_anon_kb), max(hwm, r.hwm_kb)
        size = out.stat().st_size
        out.unlink()
    best, cp_best = min(secs), min(cp[0])
    return [case.label + tag, f"{size / 1e9:.2f}", f"{best:.2f}",
            f"{min(secs):.2f}-{max(secs):.2f}", f"{min(walls):.2f}", f"{cp_best:.2f}",
            f"{best / cp_best:.1f}x", f"{(best - torch_s) / cp_best:.1f}x",
            f"{cpu:.2f}", f"{cp[1]:.2f}", f"{peak / 1024:.0f}", f"{hwm / 1024:.0f}"]


def run_cases(cases: list[Case], p: dict[str, Path], out: Path, rounds: int, torch_s: float,
              tag: str) -> tuple[list[str], list[list[str]]]:
    cp = cp_seconds(p["a"], p["a"].with_name("copy.safetensors"), rounds)
    rows = [measure(c, out, cp, torch_s, rounds, tag) for c in cases]
    return [f"cp{tag}: " + ", ".join(f"{t:.2f}" for t in cp[0]) + " s"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each command (best shown)")
    ap.add_argument("--busy", action="store_true",
                    help="also run everything beside a busy process")
    ap.add_argument("--keep", action="store_true",
                    help="keep (and reuse) the inputs in --dir")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit_bench_flux"))
    ap.add_argument("--bake-only", action="store_true",
                    help="only the bakes (no B, no merge): /dev/shm then holds A, an output "
                         "and a LoRA, so the depth can be about twice the merge's")
    args = ap.parse_args()
    work, rounds = args.dir, max(1, args.rounds)
    ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        p = make_inputs(work, args.double, args.single, merge=not args.bake_only)
        out = work / "out.safetensors"
        common = ["-o", str(out), "-q", "--json", "--overwrite"]
        cases = [
            Case("merge A B (block weights, bf16)", modelkit(
                "merge", str(p["a"]), str(p["b"]), "--blocks",
                "double=1,single=0.5,default=0.25", *common)),
            Case("lora bake A kohya (fused qkv, linear1)", modelkit(
                "lora", "bake", str(p["a"]), f"{p['kohya']}:0.8", *common)),
            Case("lora bake A peft (split q/k/v, proj_mlp)", modelkit(
                "lora", "bake", str(p["a"]), f"{p['peft']}:0.8", *common)),
        ]
        if args.bake_only:
            cases = cases[1:]
        for c in cases:  # warm-up: page cache and the input hash cache
            subprocess.run(c.cmd, check=True, env=ENV, cwd=REPO, capture_output=True)
        before = machine_load()
        torch_s = import_seconds(rounds)
        notes, rows = run_cases(cases, p, out, rounds, torch_s, "")
        if args.busy:
            with busy_loop():
                busy_notes, busy_rows = run_cases(cases, p, out, rounds, torch_s, ", BUSY")
            notes, rows = notes + busy_notes, rows + busy_rows
        after = machine_load()
        largest = 21504 * 3072 * 2 / 2**20  # single_blocks.N.linear1, bf16, MiB
        print(f"machine before: {before[0]}; after: {after[0]}")
        print(f"input A: {p['a'].stat().st_size / 1e9:.2f} GB ({args.double} double + "
              f"{args.single} single blocks at width 3072); largest tensor "
              f"{largest:.0f} MiB (single_blocks.N.linear1, bf16)")
        print(f"import torch (fixed part of every command, best of {rounds}): {torch_s:.2f} s")
        print("\n".join(notes))
        print(table(f"Flux.1 merge and LoRA bake (seconds: the command's own, best of {rounds}; "
                    "cp: of A, best)",
                    ["", "out GB", "seconds", "spread", "wall", "cp s", "vs cp",
                     "w/o import", "CPU s", "cp CPU s", "peak RssAnon MiB", "VmHWM MiB"],
                    rows))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
