"""Convert benchmark: ``prune``, ``ema`` and ``quantize`` of a full-size
synthetic SD1.5 checkpoint with EMA, stored in fp32 (7.70 GB, the size of the
original ``v1-5-pruned.ckpt`` content), timed and memory-sampled against
``cp`` of each output in the same run; then ``quantize --dtype int8`` (and,
with ``--gguf``, ``export-gguf``) of SD1.5 fp16.

Run::

    .venv/bin/python bench/bench_convert.py [--dir /dev/shm/modelkit-bench] \
        [--rounds 2] [--keep] [--gguf]

Each command runs as ``modelkit <cmd> ... -q --json`` in a fresh process whose
``/proc/<pid>/status`` is sampled every ~5 ms for peak ``RssAnon`` (process
memory proper; mapped file pages are page cache and show in ``VmHWM``).
``cp`` of that command's output runs right after it, so the ratio compares
like with like on a noisy machine. The first round runs with an empty hash
cache (inputs are hashed on a thread while the output streams); later rounds
with the cache warm. Targets (the Convert issue): peak RssAnon under 500 MB
and time within 3x ``cp`` of the output, for prune, ema and quantize.
Put ``--dir`` on a RAM disk: on a real disk the figures measure the disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import busy_loop, child_env, log, machine_load, mem_available, sample_process

MB = 1e6
TARGET_ANON_MB = 500.0
TARGET_CP_RATIO = 3.0
TARGET_QUANT_CP_RATIO = 4.0  # quantize int8 and export-gguf (the Engine issue)
TARGET_Q8_SPEEDUP = 3.0  # modelkit's Q8_0 encoder vs gguf-py's, same tensors
TARGET_BUSY_RATIO = 1.5
MEM_GUARD = 600 * (1 << 20)
EMA_INPUT = ("full-sd15-fp32-ema.safetensors", "sd1", "F32", True)
FP16_INPUT = ("full-sd15-fp16.safetensors", "sd1", "F16", False)
JOBS = {  # label -> (input, command arguments after the input, output name)
    "prune (fp32 kept)": (EMA_INPUT, ["prune"], "out-prune.safetensors"),
    "prune --dtype fp16": (EMA_INPUT, ["prune", "--dtype", "fp16"],
                           "out-prune16.safetensors"),
    "ema": (EMA_INPUT, ["ema"], "out-ema.safetensors"),
    "quantize fp16": (EMA_INPUT, ["quantize", "--dtype", "fp16"], "out-q16.safetensors"),
    "quantize fp8_e4m3fn": (EMA_INPUT, ["quantize", "--dtype", "fp8_e4m3fn"],
                            "out-q8.safetensors"),
}
EXTRA_JOBS = {
    "quantize int8 (SD1.5 fp16)": (FP16_INPUT, ["quantize", "--dtype", "int8"],
                                   "out-int8.safetensors"),
    "quantize bf16 (SD1.5 fp16)": (FP16_INPUT, ["quantize", "--dtype", "bf16"],
                                   "out-bf16.safetensors"),
    "quantize fp8_e4m3fn (SD1.5 fp16)": (FP16_INPUT, ["quantize", "--dtype", "fp8_e4m3fn"],
                                         "out-fp8.safetensors"),
    "quantize fp8_e4m3fn --format comfy (SD1.5 fp16)": (
        FP16_INPUT, ["quantize", "--dtype", "fp8_e4m3fn", "--format", "comfy"],
        "out-comfy-fp8.safetensors"),
    "quantize fp8_e4m3fn --format comfy-legacy (SD1.5 fp16)": (
        FP16_INPUT, ["quantize", "--dtype", "fp8_e4m3fn", "--format", "comfy-legacy"],
        "out-comfy-legacy.safetensors"),
    "quantize int8 --format comfy (SD1.5 fp16)": (
        FP16_INPUT, ["quantize", "--dtype", "int8", "--format", "comfy"],
        "out-comfy-int8.safetensors"),
}
GGUF_JOB = {"export-gguf q8_0 (SD1.5 fp16)": (FP16_INPUT, ["export-gguf"], "out.gguf")}


@dataclass
class Result:
    label: str
    wall_s: float
    peak_anon_mb: float
    hwm_mb: float
    cp_s: float
    out_bytes: int
    report: dict[str, object]

    @property
    def ratio(self) -> float:
        return self.wall_s / self.cp_s if self.cp_s else float("inf")


def modelkit_cmd() -> list[str]:
    script = Path(sys.executable).parent / "modelkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


def ensure_input(d: Path, spec: tuple[str, str, str, bool]) -> Path:
    """The synthetic input, generated (seeded, streamed) when missing."""
    name, arch, dtype, ema = spec
    path = d / name
    if path.exists():
        return path
    from modelkit.testing import write_checkpoint

    log(f"generating {path} ...")
    t = time.perf_counter()
    write_checkpoint(path, arch, tiny=False, ema=ema, dtype=dtype)
    log(f"generated in {time.perf_counter() - t:.0f}s")
    return path


def time_cp(src: Path) -> float:
    dst = src.with_name(src.name + ".cp")
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t = time.perf_counter() - t
    dst.unlink()
    return t


def run_job(label: str, src: Path, args: list[str], out: Path, env: dict[str, str]) -> Result:
    cmd = [*modelkit_cmd(), args[0], str(src), "-o", str(out), *args[1:], "-q", "--json"]
    log(f"{label} ...")
    run = sample_process(cmd, env, min_available=MEM_GUARD)
    if run.killed or run.returncode != 0:
        raise SystemExit(f"{label}: failed (rc {run.returncode}, killed {run.killed})\n"
                         f"{run.stderr[-2000:]}")
    report = json.loads(run.stdout)
    size = out.stat().st_size
    cp = time_cp(out)
    out.unlink()
    return Result(label, run.wall_s, run.peak_anon_kb * 1024 / MB, run.hwm_kb * 1024 / MB,
                  cp, size, report)


def run_round(d: Path, jobs: dict[str, tuple], cold: bool) -> list[Result]:
    env = child_env()
    results = []
    for label, (spec, args, out_name) in jobs.items():
        src = ensure_input(d, spec)
        with tempfile.TemporaryDirectory() as cache:
            if cold:
                env["MODELKIT_CACHE_DIR"] = cache
            results.append(run_job(label, src, args, d / out_name, env))
    return results


def table(results: list[Result], title: str) -> list[str]:
    lines = [f"## {title}", "",
             "| command | time | cp of output | ratio | peak RssAnon | VmHWM | output |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.label} | {r.wall_s:.2f} s | {r.cp_s:.2f} s | {r.ratio:.2f}x | "
                     f"{r.peak_anon_mb:.0f} MB | {r.hwm_mb:.0f} MB | "
                     f"{r.out_bytes / 1e9:.2f} GB |")
    return [*lines, ""]


def verdicts(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        mem_ok = r.peak_anon_mb < TARGET_ANON_MB
        speed_ok = r.ratio <= TARGET_CP_RATIO
        out.append(f"- {r.label}: peak RssAnon {r.peak_anon_mb:.0f} MB "
                   f"({'under' if mem_ok else 'OVER'} {TARGET_ANON_MB:.0f}), "
                   f"{r.ratio:.2f}x cp ({'within' if speed_ok else 'OVER'} "
                   f"{TARGET_CP_RATIO:.0f}x)")
    return out


def quant_verdicts(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        ok = "within" if r.ratio <= TARGET_QUANT_CP_RATIO else "OVER"
        out.append(f"- {r.label}: {r.ratio:.2f}x cp ({ok} {TARGET_QUANT_CP_RATIO:.0f}x)")
    return out


def busy_verdicts(quiet: list[Result], busy: list[Result]) -> list[str]:
    out = []
    for q, b in zip(quiet, busy, strict=True):
        ratio = b.wall_s / q.wall_s
        out.append(f"- {q.label}: {b.wall_s:.2f} s beside a busy process vs {q.wall_s:.2f} s "
                   f"quiet: {ratio:.2f}x ({'within' if ratio <= TARGET_BUSY_RATIO else 'OVER'} "
                   f"{TARGET_BUSY_RATIO}x)")
    return out


def q8_encoders(src: Path) -> list[str]:
    """modelkit's Q8_0 encoder and gguf-py's on the same UNet tensors, in
    this process, one thread: time and byte equality."""
    import gguf
    import numpy as np
    import torch

    from modelkit.convert.gguf import tensor_plan, unet_source
    from modelkit.io.gguf import CHUNK, Q80Encoder
    from modelkit.io.reader import open_model

    torch.set_num_threads(1)
    enc = Q80Encoder()
    ours = theirs = 0.0
    same, n_elems = True, 0
    with open_model(src) as model:
        unet = unet_source(model)
        for key, info in unet.infos.items():
            if tensor_plan(key, info, "Q8_0").ggml_type != "Q8_0":
                continue
            flat = unet.get(key).reshape(-1)
            for i in range(0, flat.numel(), CHUNK):
                chunk = flat[i:i + CHUNK]
                t0 = time.perf_counter()
                a = enc.encode(chunk).numpy().reshape(-1)
                t1 = time.perf_counter()
                b = gguf.quants.quantize(chunk.float().numpy().reshape(1, -1),
                                         gguf.GGMLQuantizationType.Q8_0).reshape(-1)
                t2 = time.perf_counter()
                ours, theirs = ours + t1 - t0, theirs + t2 - t1
                same = same and bool(np.array_equal(a, b))
                n_elems += chunk.numel()
    speedup = theirs / ours if ours else 0.0
    return [f"- Q8_0 over {n_elems / 1e6:.0f} M UNet elements of {src.name}: modelkit "
            f"{ours:.2f} s, gguf-py {theirs:.2f} s: {speedup:.1f}x "
            f"({'at least' if speedup >= TARGET_Q8_SPEEDUP else 'UNDER'} "
            f"{TARGET_Q8_SPEEDUP:g}x); bytes {'identical' if same else 'DIFFERENT'}"]


def int8_figures(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        rep = r.report.get("report") or {}
        if not isinstance(rep, dict) or rep.get("relative_l2") is None:
            continue
        saved = 1 - rep["bytes_out"] / rep["bytes_in"]
        n = rep.get("n_int8") or rep.get("n_scaled") or len(rep.get("errors") or ())
        out.append(f"- {r.label}: {n} measured tensors, relative L2 "
                   f"{rep['relative_l2']:.4g}, SNR {rep['snr_db']:.1f} dB, "
                   f"{rep['bytes_in'] / 1e9:.2f} GB -> {rep['bytes_out'] / 1e9:.2f} GB "
                   f"({100 * saved:.1f}% saved)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit-bench"))
    ap.add_argument("--rounds", type=int, default=2, help="1 cold + N-1 warm rounds")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--gguf", action="store_true", help="also time export-gguf")
    ap.add_argument("--busy", action="store_true",
                    help="one more warm round beside a competing busy process")
    ap.add_argument("--only", default="",
                    help="run only the jobs whose label contains this text (e.g. 'SD1.5 fp16')")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    existed = {p.name for p in args.dir.iterdir()}
    log(f"machine: {machine_load()[0]}; MemAvailable {mem_available() / 1e9:.1f} GB")
    plain = {k: v for k, v in JOBS.items() if args.only in k}
    jobs = {k: v for k, v in {**JOBS, **EXTRA_JOBS, **(GGUF_JOB if args.gguf else {})}.items()
            if args.only in k}
    rounds = [run_round(args.dir, jobs, cold=(i == 0)) for i in range(max(1, args.rounds))]
    lines = table(rounds[0], "cold (inputs hashed while writing)")
    for i, res in enumerate(rounds[1:], 1):
        lines += table(res, f"warm round {i} (hash cache)")
    best = [min((r[i] for r in rounds), key=lambda x: x.ratio) for i in range(len(jobs))]
    lines += ["## verdicts (best round)", "", *verdicts(best[:len(plain)]),
              *quant_verdicts(best[len(plain):]), "",
              "## int8 and fp8 error", "", *int8_figures(best), ""]
    if args.busy:
        with busy_loop():
            busy = run_round(args.dir, jobs, cold=False)
        lines += table(busy, "warm, beside a busy process")
        warm = rounds[-1] if len(rounds) > 1 else rounds[0]
        lines += ["## beside a busy process vs quiet (same commands)", "",
                  *busy_verdicts(warm, busy), ""]
    if args.gguf:
        lines += ["## Q8_0 encoder side by side", "",
                  *q8_encoders(ensure_input(args.dir, FP16_INPUT)), ""]
    lines.append(f"machine after: {machine_load()[0]}")
    print("\n".join(lines))
    if not args.keep:
        for p in args.dir.iterdir():
            if p.name not in existed:
                p.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
