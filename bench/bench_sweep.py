"""Sweep benchmark: 8 full-size SD1.5 merges (``weighted_sum`` of two
synthetic fp16 checkpoints over 8 alphas, fp16 output, CPU), run

* one after another in one process with the plain runner (``run(recipe)``
  per alpha: the yardstick),
* by ``run_sweep`` on the serial executor (the same, plus planning, the
  output sha256 and the tables),
* by ``run_sweep`` on the local process pool (``--jobs`` workers, one torch
  thread each),
* by ``run_sweep`` on Ray (``RayExecutor("local")``: a fresh local cluster,
  started and stopped inside the timing),

each in a fresh process, figures printed side by side. Targets (issue 14):
the pool within 0.8x of the one-process loop, Ray within 1.3x of the pool.

Run::

    .venv/bin/python bench/bench_sweep.py [--dir /dev/shm/modelkit-bench] [--jobs 2]
        [--no-ray] [--keep] [--tiny]

The inputs are ``full-sd15-fp16.safetensors`` and
``full-sd15-fp16-seed1.safetensors`` in ``--dir`` (the names
``bench_merge.py`` uses; generated when absent), hard-linked under this
script's own names so another benchmark deleting them mid-run does no harm.
Eight 2.1 GB outputs do not fit beside them in RAM, so each mode deletes an
output once its cell is recorded (its sha256 taken first); at most ``jobs``
outputs exist at a time. The inputs' sha256 is put in a private hash cache
before the timed runs (every mode then finds it there). Every mode's output
hashes must agree cell by cell. ``--tiny`` smoke-tests the script on tiny
models (figures meaningless). See bench/README.md, "Sweep benchmark".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import (  # noqa: E402  (bench_io puts the repo on sys.path)
    DEFAULT_DIR,
    BenchError,
    child_env,
    log,
    machine_load,
    mem_available,
    sample_process,
    table,
    valid_model,
)

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PLAIN_NAMES = ("full-sd15-fp16.safetensors", "full-sd15-fp16-seed1.safetensors")
PRIVATE_PREFIX = "bench_sweep-"
TARGET_POOL = 0.8  # pool / one-process loop
TARGET_RAY = 1.3  # Ray / pool
MODES = ("loop", "serial", "pool", "ray")
MB = 1e6


# --------------------------------------------------------------------------
# children (each mode in a fresh process)


def _sweep_text(a: Path, b: Path) -> str:
    return f"""version: 1
recipe:
  version: 1
  inputs: {{a: {a}, b: {b}}}
  steps:
    mix: {{method: weighted_sum, models: [a, b], params: {{alpha: 0.5}}}}
  output: {{dtype: fp16}}
axes:
  steps.mix.params.alpha: [{', '.join(map(str, ALPHAS))}]
"""


def child_loop(a: Path, b: Path, out: Path) -> dict[str, Any]:
    """The yardstick: the plain runner, one alpha after another (the sweep's
    own cell recipes, so the outputs are byte for byte the same)."""
    import yaml

    from modelkit.core.recipe import COMMAND_LINE, parse_recipe
    from modelkit.engine.runner import run
    from modelkit.io.hashing import hash_file
    from modelkit.sweep import parse_sweep

    out.mkdir(parents=True, exist_ok=True)
    cells = parse_sweep(_sweep_text(a, b), "bench-sweep.yaml", out.parent).cells()
    recipes = [parse_recipe(yaml.safe_dump(c.recipe), COMMAND_LINE, out) for c in cells]
    hashes, peaks, work, hashing = [], [], 0.0, 0.0
    start = time.perf_counter()
    for alpha, recipe in zip(ALPHAS, recipes, strict=True):
        path = out / f"alpha-{alpha}.safetensors"
        t = time.perf_counter()
        report = run(recipe, output=path)
        work += time.perf_counter() - t
        peaks.append(report.peak_measured_bytes or 0)
        t = time.perf_counter()
        hashes.append(hash_file(path, tensor_hash=False).sha256)
        hashing += time.perf_counter() - t
        path.unlink()
    return {"run_s": work, "hash_s": hashing, "total_s": time.perf_counter() - start,
            "hashes": hashes, "peak_bytes": max(peaks), "seconds": []}


def child_sweep(mode: str, a: Path, b: Path, out: Path, jobs: int) -> dict[str, Any]:
    """``run_sweep`` on one executor; each output deleted once recorded."""
    from modelkit.sweep import PoolExecutor, SerialExecutor, parse_sweep, run_sweep

    if mode == "ray":
        from modelkit.sweep.ray_executor import RayExecutor

        executor: Any = RayExecutor("local", jobs=jobs, threads=1)
    elif mode == "pool":
        executor = PoolExecutor(jobs=jobs, threads=1)
    else:
        executor = SerialExecutor()
    import modelkit.engine.runner  # noqa: F401  (imports outside the timing, as in the loop)

    spec = parse_sweep(_sweep_text(a, b), "bench-sweep.yaml", out.parent)
    start = time.perf_counter()

    def drop(record: dict[str, Any]) -> None:
        (out / str(record["output"])).unlink(missing_ok=True)

    report = run_sweep(spec, out, executor=executor, on_cell=drop)
    run_s = time.perf_counter() - start
    if report.exit_code:
        raise BenchError(f"{mode}: {report.summary()}: "
                         f"{[r.get('error') for r in report.records.values()]}")
    cells = [report.records[i] for i in range(len(ALPHAS))]
    return {"run_s": run_s, "total_s": run_s,
            "hashes": [c["hashes"]["sha256"] for c in cells],
            "peak_bytes": max((c["run"] or {}).get("peak_measured_bytes") or 0 for c in cells),
            "seconds": [c["timings"]["total"] for c in cells]}


def child_main(argv: list[str]) -> None:
    mode, a, b, out, jobs = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4])
    result = child_loop(a, b, out) if mode == "loop" else child_sweep(mode, a, b, out, jobs)
    print(json.dumps(result))


# --------------------------------------------------------------------------
# the parent


def inputs(d: Path, tiny: bool) -> tuple[list[Path], list[Path]]:
    """The two inputs under private names (hard links to the shared ones,
    generated when absent); returns them and the files this run created."""
    created = []
    private = []
    for seed, name in enumerate(PLAIN_NAMES):
        plain, mine = d / name, d / (PRIVATE_PREFIX + name)
        if tiny:
            from modelkit.testing import write_checkpoint

            write_checkpoint(mine, "sd1", seed=seed)
            created.append(mine)
        elif not valid_model(mine):
            if not valid_model(plain):
                log(f"generating {plain.name} (seed {seed}) ...")
                from modelkit.testing import write_checkpoint

                write_checkpoint(plain, "sd1", tiny=False, dtype="F16", seed=seed)
                created.append(plain)
            mine.unlink(missing_ok=True)
            os.link(plain, mine)
            created.append(mine)
        private.append(mine)
    return private, created


def warm_hashes(paths: list[Path], cache: Path) -> float:
    """sha256 of the inputs into the private hash cache (not timed per mode)."""
    os.environ["MODELKIT_CACHE_DIR"] = str(cache)
    from modelkit.io.hashcache import cached_hashes

    t = time.perf_counter()
    for p in paths:
        cached_hashes(p, tensor_hash=False)
    return time.perf_counter() - t


def run_mode(mode: str, a: Path, b: Path, scratch: Path, jobs: int, cache: Path
             ) -> dict[str, Any]:
    out = scratch / mode
    shutil.rmtree(out, ignore_errors=True)
    env = child_env()
    env.update(MODELKIT_CACHE_DIR=str(cache), RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env.pop("RAY_ADDRESS", None)
    log(f"{mode} ...")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", mode, str(a), str(b),
           str(out), str(jobs)]
    run = sample_process(cmd, env)
    if run.returncode != 0:
        raise BenchError(f"{mode}: exited {run.returncode}\n{run.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    result["wall_s"] = run.wall_s
    shutil.rmtree(out, ignore_errors=True)
    return result


def report(results: dict[str, dict[str, Any]], jobs: int) -> list[str]:
    loop = results["loop"]
    # the yardstick does the sweep's work: each merge, then its output's sha256
    results = {"merges": {**loop, "hashes": loop["hashes"]},
               "loop": {**loop, "run_s": loop["run_s"] + loop["hash_s"]},
               **{m: r for m, r in results.items() if m != "loop"}}
    base = results["loop"]["run_s"]
    pool = results.get("pool", {}).get("run_s")
    rows = []
    labels = {"merges": "one process, run() x8, merges only",
              "loop": "one process, run() x8 + output sha256 (yardstick)",
              "serial": "run_sweep, serial executor",
              "pool": f"run_sweep, process pool ({jobs} x 1 thread)",
              "ray": f"run_sweep, Ray local ({jobs} tasks x 1 CPU, start+stop inside)"}
    for mode, r in results.items():
        rows.append([labels[mode], f"{r['wall_s']:.2f}", f"{r['run_s']:.2f}",
                     f"{r['run_s'] / base:.2f}x",
                     f"{r['run_s'] / pool:.2f}x" if pool else "-",
                     f"{r['peak_bytes'] / MB:.0f}",
                     ", ".join(f"{s:.1f}" for s in r["seconds"]) or "-"])
    out = [table("8 SD1.5 merges (weighted_sum, alphas 0.1..0.8, fp16 out)",
                 ["mode", "wall s", "run s", "vs yardstick", "vs pool", "peak anon MB/cell",
                  "per-cell s"], rows)]
    hashes = {m: r["hashes"] for m, r in results.items()}
    same = all(h == hashes["loop"] for h in hashes.values())
    out.append(f"\noutput sha256 equal across modes, cell by cell: {same}")
    if pool:
        merges = results["merges"]["run_s"]
        out.append(f"target pool <= {TARGET_POOL}x the one-process loop: {pool / base:.2f}x "
                   f"({'holds' if pool / base <= TARGET_POOL else 'misses'}); against "
                   f"the merges alone (no output sha256): {pool / merges:.2f}x")
    if pool and "ray" in results:
        ray = results["ray"]["run_s"] / pool
        out.append(f"target ray <= {TARGET_RAY}x pool: {ray:.2f}x "
                   f"({'holds' if ray <= TARGET_RAY else 'misses'})")
    if not same:
        raise BenchError("\n".join(out) + "\noutputs differ between modes")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the hard-linked inputs")
    parser.add_argument("--tiny", action="store_true", help="smoke test on tiny models")
    args = parser.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="bench-sweep-")) if args.tiny else args.dir
    d.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=d))
    cache = Path(tempfile.mkdtemp(prefix="bench-sweep-cache-"))
    created: list[Path] = []
    try:
        (a, b), created = inputs(d, args.tiny)
        log(f"inputs sha256 into the private cache: {warm_hashes([a, b], cache):.1f} s; "
            f"MemAvailable {mem_available() / 2**30:.1f} GiB")
        load_before = machine_load()
        results = {}
        for mode in MODES:
            if mode == "ray" and args.no_ray:
                continue
            results[mode] = run_mode(mode, a, b, scratch, args.jobs, cache)
        load_after = machine_load()
        for line in report(results, args.jobs):
            print(line)
        print(f"load before: {load_before[0]}; after: {load_after[0]}")
    except BenchError as exc:
        print(f"bench_sweep: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        for p in created if not args.keep or args.tiny else []:
            p.unlink(missing_ok=True)
        if args.tiny:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
