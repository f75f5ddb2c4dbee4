"""Merge benchmark for modelkit: a two-model ``weighted_sum`` (alpha 0.5, fp16
output, fp32 math, CPU) of two full-size synthetic checkpoints, timed and
memory-sampled against ``cp`` of one input, a naive load-everything script
and sd-mecha.

Run::

    .venv/bin/python bench/bench_merge.py [--dir /dev/shm/modelkit-bench] \
        [--arch sd1|sdxl] [--keep]

Each tool runs in a fresh process whose ``/proc/<pid>/status`` the parent
samples every ~5 ms: peak ``RssAnon`` (process memory proper) and ``VmHWM``
(which also counts the pages of memory-mapped inputs, for contrast). Every
figure of one run is printed side by side; ``cp`` runs before each tool and
ratios use the median ``cp`` time of the same run. modelkit runs once with an
empty hash cache (``MODELKIT_CACHE_DIR`` a fresh folder: the inputs' sha256
is computed) and then ``--rounds`` times warm (best time, worst memory
reported). Put ``--dir`` on a RAM disk (tmpfs): on a real disk the figures
measure the disk.

Model A is ``full-<sd15|sdxl>-fp16.safetensors`` (seed 0, the name
``bench_io.py`` uses, so a model it kept is reused), model B the same with
``-seed1``. Without ``--keep`` only the models this run generated are
deleted. For SDXL (2 x 6.9 GB plus a 6.9 GB output) the SD1.5 models in
``--dir`` are deleted first when space or RAM is short.

sd-mecha runs from its own virtual environment (``--mecha-python``, default
``/tmp/mecha-venv/bin/python``), made so that it cannot change the project's::

    python3 -m venv /tmp/mecha-venv
    /tmp/mecha-venv/bin/pip install torch==2.13.0 sd-mecha==1.1.8

It is skipped when that interpreter cannot import ``sd_mecha`` or RAM is
short (always for SDXL on a 24 GB machine). The naive baseline holds the
whole merged state dict in memory and is skipped when RAM is short (always
for SDXL on a 24 GB machine). A child is killed if MemAvailable falls under
600 MiB. See ``bench/README.md`` (section "Merge") for results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import (  # noqa: E402  (bench_io puts the repo on sys.path)
    DEFAULT_DIR,
    REPO,
    BenchError,
    busy_loop,
    child_env,
    log,
    mem_available,
    sample_process,
    table,
    valid_model,
)

from modelkit.io.header import Header, read_header  # noqa: E402

if TYPE_CHECKING:
    import torch

ALPHA = 0.5
SEEDS = (0, 1)  # seed 0 under bench_io's name: a model bench_io kept is reused
# arch -> (file tag, modelkit.testing arch name)
ARCHS = {"sd1": ("sd15", "sd1"), "sdxl": ("sdxl", "sdxl")}
MECHA_PYTHON = Path("/tmp/mecha-venv/bin/python")
MB = 1e6
N_CHECK_KEYS = 8
# targets (issue): modelkit within 5x cp, >= 6x faster than sd-mecha, < 400 MB anon
TARGET_CP_RATIO = 5.0
TARGET_COLD_RATIO = 1.3  # cold (inputs hashed beside the write) vs warm
TARGET_MECHA_SPEEDUP = 6.0
TARGET_ANON_MB = 400.0
# sd-mecha's peak RssAnon per byte of one input, measured on SD1.5 (3.7 GB for 2.1 GB)
MECHA_ANON_RATIO = 2.0
# kill a child when MemAvailable falls below this (the inputs sit in RAM)
MEM_GUARD = 600 * (1 << 20)

NAIVE_CODE = """\
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors.torch import load_file, save_file
t1 = time.perf_counter()
a_path, b_path, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b = load_file(a_path), load_file(b_path)
merged = {}
for key, ta in a.items():
    tb = b.get(key)
    if ta.dtype == torch.float16 and tb is not None and tb.shape == ta.shape:
        merged[key] = ((1 - alpha) * ta.float() + alpha * tb.float()).half()
    else:
        merged[key] = ta
save_file(merged, out)
print(json.dumps({"import_s": t1 - t0, "work_s": time.perf_counter() - t1}))
"""

# the yardstick: single-threaded, pread into reused buffers, lerp in
# fp32 chunks, pwrite fp16 from a reused buffer; output laid out like A
REFERENCE_CODE = """\
import json, os, struct, sys, time
t0 = time.perf_counter()
import numpy as np, torch
t1 = time.perf_counter()
torch.set_num_threads(1)
a_path, b_path, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n
ha, sa = header(a_path)
hb, sb = header(b_path)
fa, fb = os.open(a_path, os.O_RDONLY), os.open(b_path, os.O_RDONLY)
fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.pwrite(fo, open(a_path, "rb").read(sa), 0)
CH = 1 << 20
ra, rb = np.empty(CH * 2, np.uint8), np.empty(CH * 2, np.uint8)
xa, xb, xo = torch.empty(CH), torch.empty(CH), torch.empty(CH)
o16 = torch.empty(CH, dtype=torch.float16)
for key, ia in ha.items():
    if key == "__metadata__":
        continue
    ib = hb.get(key)
    begin, end = ia["data_offsets"]
    if ia["dtype"] != "F16" or ib is None or ib["shape"] != ia["shape"]:
        os.pwrite(fo, os.pread(fa, end - begin, sa + begin), sa + begin)
        continue
    for i in range(0, end - begin, CH * 2):
        n = min(CH * 2, end - begin - i)
        os.preadv(fa, [memoryview(ra)[:n]], sa + begin + i)
        os.preadv(fb, [memoryview(rb)[:n]], sb + ib["data_offsets"][0] + i)
        k = n // 2
        xa[:k].copy_(torch.from_numpy(ra[:n]).view(torch.float16))
        xb[:k].copy_(torch.from_numpy(rb[:n]).view(torch.float16))
        torch.lerp(xa[:k], xb[:k], alpha, out=xo[:k])
        o16[:k].copy_(xo[:k])
        os.pwrite(fo, o16[:k].view(torch.uint8).numpy(), sa + begin + i)
os.close(fo)
print(json.dumps({"import_s": t1 - t0, "work_s": time.perf_counter() - t1}))
"""

MECHA_CODE = """\
import json, sys, time
t0 = time.perf_counter()
import torch
import sd_mecha
t1 = time.perf_counter()
a_path, b_path, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
recipe = sd_mecha.weighted_sum(sd_mecha.model(a_path), sd_mecha.model(b_path), alpha=alpha)
# threads left at its default (None: min(max(open files, 2), cpu_count, 4))
sd_mecha.merge(recipe, output=out, merge_device="cpu", merge_dtype=torch.float32,
               output_device="cpu", output_dtype=torch.float16)
from importlib.metadata import version
print(json.dumps({"import_s": t1 - t0, "work_s": time.perf_counter() - t1,
                  "version": version("sd-mecha"), "torch": torch.__version__}))
"""


# --------------------------------------------------------------------------
# sampled child processes


@dataclass
class Run:
    """One tool run in a fresh, sampled process."""

    label: str
    wall_s: float
    peak_anon_kb: int
    hwm_kb: int
    samples: int
    stdout: str
    inner_s: float | None = None  # the tool's own timing, imports excluded
    note: str = ""
    killed: bool = False


def measure(label: str, cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd``, sampling its RssAnon and VmHWM every ~5 ms; kill it if the
    machine runs short of memory (the inputs themselves sit in RAM)."""
    log(f"{label} ...")
    run = sample_process(cmd, env, min_available=MEM_GUARD)
    if run.killed:
        log(f"{label}: killed, MemAvailable under {MEM_GUARD / MB:.0f} MB")
        return Run(label, run.wall_s, run.peak_anon_kb, run.hwm_kb, run.samples, run.stdout,
                   note="killed: low memory", killed=True)
    if run.returncode != 0:
        raise BenchError(f"{label}: exited {run.returncode}\n{run.stderr[-3000:]}")
    return Run(label, run.wall_s, run.peak_anon_kb, run.hwm_kb, run.samples, run.stdout)


def last_json(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def modelkit_cmd() -> list[str]:
    script = Path(sys.executable).parent / "modelkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


# --------------------------------------------------------------------------
# inputs


def expected_header(arch: str, where: Path) -> Header:
    """The layout ``write_checkpoint(arch, tiny=False, dtype='F16')`` writes,
    from a sparse file of the same layout (no data written)."""
    from modelkit.testing import write_sparse_checkpoint

    tmp = where / f".layout-{arch}.safetensors"
    try:
        write_sparse_checkpoint(tmp, arch, tiny=False, dtype="F16")
        return read_header(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def same_layout(path: Path, want: Header) -> bool:
    if not valid_model(path):
        return False
    have = read_header(path)
    return have.file_size == want.file_size and {
        k: (t.dtype, t.shape) for k, t in have.tensors.items()
    } == {k: (t.dtype, t.shape) for k, t in want.tensors.items()}


def input_paths(d: Path, arch: str) -> list[Path]:
    tag = ARCHS[arch][0]
    return [d / f"full-{tag}-fp16{'' if s == 0 else f'-seed{s}'}.safetensors" for s in SEEDS]


def generate(path: Path, arch: str, seed: int) -> float:
    log(f"generating {path.name} (seed {seed}) ...")
    code = ("import sys; from modelkit.testing import write_checkpoint; "
            "write_checkpoint(sys.argv[1], sys.argv[2], tiny=False, dtype='F16', "
            "seed=int(sys.argv[3]))")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path), arch, str(seed)], check=True,
                   env=child_env(), cwd=REPO)
    return time.perf_counter() - t


# --------------------------------------------------------------------------
# verification


@dataclass
class OutputCheck:
    """What one output holds: its key set and the check keys' values."""

    n_keys: int
    missing: int  # keys of A absent from the output
    extra: int
    dtype_changed: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def check_keys(header: Header) -> list[str]:
    """A handful of fp16 keys spread over the file, the largest included."""
    keys = sorted(k for k, t in header.tensors.items() if t.dtype == "F16" and t.numel > 1)
    picked = {keys[round(i * (len(keys) - 1) / (N_CHECK_KEYS - 2))]
              for i in range(N_CHECK_KEYS - 1)}
    picked.add(max(keys, key=lambda k: header.tensors[k].nbytes))
    return sorted(picked)


def read_output(path: Path, a: Header, keys: list[str]) -> OutputCheck:
    from safetensors import safe_open

    out = read_header(path)
    have, want = set(out.tensors), set(a.tensors)
    changed = sum(out.tensors[k].dtype != a.tensors[k].dtype for k in have & want)
    values = {}
    with safe_open(str(path), framework="pt") as f:
        for k in keys:
            if k in have:
                values[k] = f.get_tensor(k).clone()
    return OutputCheck(len(have), len(want - have), len(have - want), changed, values)


def reference(a_path: Path, b_path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The naive formula, (1-a)*A.float() + a*B.float() -> half, per check key."""
    from safetensors import safe_open

    ref = {}
    with safe_open(str(a_path), framework="pt") as fa, \
            safe_open(str(b_path), framework="pt") as fb:
        for k in keys:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            ref[k] = ((1 - ALPHA) * ta.float() + ALPHA * tb.float()).half()
    return ref


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(max abs diff, 'bit-identical' or how many elements differ) over the keys."""
    import torch

    worst, differ, total, absent = 0.0, 0, 0, 0
    for k, w in want.items():
        g = got.get(k)
        if g is None or g.shape != w.shape:
            absent += 1
            continue
        d = (g.float() - w.float()).abs()
        worst = max(worst, float(d.max()))
        differ += int((g.view(torch.int16) != w.view(torch.int16)).sum())
        total += w.numel()
    if absent == len(want):
        return "-", "no check key"
    verdict = "bit-identical" if differ == 0 else f"{differ} of {total} elements differ"
    if absent:
        verdict += f", {absent} keys absent"
    return f"{worst:.3g}", verdict


# --------------------------------------------------------------------------
# formatting


def mb(kb: float) -> str:
    return f"{kb * 1024 / MB:,.0f}"


def secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


# --------------------------------------------------------------------------
# the benchmark


@dataclass
class Bench:
    """State of one run."""

    dir: Path
    arch: str
    a: Path
    b: Path
    mecha_python: Path
    header: Header | None = None
    cp_times: list[float] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    outputs: dict[str, OutputCheck] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mecha_info: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.dir / f"merge-out-{self.arch}.safetensors"

    def cp(self) -> None:
        dst = self.dir / "cp-out.safetensors"
        try:
            run = measure("cp", ["cp", str(self.a), str(dst)])
        finally:
            dst.unlink(missing_ok=True)
        self.cp_times.append(run.wall_s)
        if len(self.cp_times) == 1:
            self.runs.append(run)

    def tool(self, label: str, cmd: list[str], env: dict[str, str] | None = None,
             keys: list[str] | None = None, record: bool = True) -> Run:
        """cp, then the tool; its output is read for the check keys and removed.
        With ``record`` the run is a row of the table."""
        self.cp()
        try:
            run = measure(label, cmd, env)
            if not run.killed and keys is not None:
                assert self.header is not None
                self.outputs[label] = read_output(self.out, self.header, keys)
        finally:
            self.out.unlink(missing_ok=True)
            for tmp in self.dir.glob(f".{self.out.name}.*"):
                tmp.unlink()
        if record:
            self.runs.append(run)
        return run

    def mecha_available(self) -> str | None:
        """Why sd-mecha cannot run, or None."""
        if not self.mecha_python.exists():
            return f"{self.mecha_python} not found"
        probe = subprocess.run(
            [str(self.mecha_python), "-c",
             "from importlib.metadata import version; import sd_mecha; "
             "print(version('sd-mecha'))"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            return (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        self.mecha_info["version"] = probe.stdout.strip()
        return None


def took(run: Run) -> Run:
    """Fill ``inner_s`` from modelkit's ``took N.Ns`` line."""
    found = re.search(r"took ([\d.]+)s", run.stdout)
    run.inner_s = float(found.group(1)) if found else None
    return run


def best_of(label: str, runs: list[Run]) -> Run:
    """One row for repeated runs: the best time, the worst memory."""
    best = min(runs, key=lambda r: r.wall_s)
    times = ", ".join(f"{r.wall_s:.2f}" for r in runs)
    return Run(label, best.wall_s, max(r.peak_anon_kb for r in runs),
               max(r.hwm_kb for r in runs), sum(r.samples for r in runs), best.stdout,
               best.inner_s, f"wall s of the {len(runs)}: {times}" if len(runs) > 1 else "")


def busy_runs(bench: Bench, keys: list[str], rounds: int) -> None:
    """modelkit warm and the reference again, beside one busy process."""
    a, b, out = str(bench.a), str(bench.b), str(bench.out)
    mk = [*modelkit_cmd(), "merge", a, b, "-o", out, "--alpha", str(ALPHA), "-q"]
    ref = [sys.executable, "-c", REFERENCE_CODE, a, b, out, str(ALPHA)]
    with busy_loop():
        label = f"modelkit warm, BUSY{f', best of {rounds}' if rounds > 1 else ''}"
        runs = [took(bench.tool(label, mk, None, keys, record=False)) for _ in range(rounds)]
        bench.runs.append(best_of(label, runs))
        label = f"reference pread/lerp/pwrite, BUSY{f', best of {rounds}' if rounds > 1 else ''}"
        runs = [bench.tool(label, ref, None, None, record=False) for _ in range(rounds)]
        bench.runs.append(best_of(label, runs))


def run_all(bench: Bench, naive: bool, mecha: bool, rounds: int, busy: bool = False
            ) -> list[str]:
    a, b, out = str(bench.a), str(bench.b), str(bench.out)
    bench.header = read_header(bench.a)
    size = bench.header.file_size
    keys = check_keys(bench.header)

    bench.runs.append(measure("python -c 'import torch' (baseline)",
                              [sys.executable, "-c", "import torch"]))
    cache = Path(tempfile.mkdtemp(prefix="modelkit-bench-cache-"))
    try:
        env = {**child_env(), "MODELKIT_CACHE_DIR": str(cache)}
        mk = [*modelkit_cmd(), "merge", a, b, "-o", out, "--alpha", str(ALPHA), "-q"]
        took(bench.tool("modelkit cold (hashes inputs)", mk, env, keys))
        label = f"modelkit warm (hashes cached){f', best of {rounds}' if rounds > 1 else ''}"
        warm = [took(bench.tool(label, mk, env, keys, record=False)) for _ in range(rounds)]
        bench.runs.append(best_of(label, warm))
        label = f"reference pread/lerp/pwrite{f', best of {rounds}' if rounds > 1 else ''}"
        ref = [sys.executable, "-c", REFERENCE_CODE, a, b, out, str(ALPHA)]
        refs = [bench.tool(label, ref, None, keys, record=False) for _ in range(rounds)]
        bench.runs.append(best_of(label, refs))
        if busy:
            busy_runs(bench, keys, rounds)
        est = re.search(r"estimated peak working memory: ([\d.]+ [KMG]B)", warm[0].stdout)
        if est:
            bench.notes.append(f"modelkit's own estimate of peak working memory: "
                               f"{est.group(1)} plus the interpreter and torch")
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    free = mem_available()
    if not naive:
        bench.notes.append("naive baseline: skipped (--no-naive)")
    elif free < 3.5 * size + 1e9:
        bench.notes.append(f"naive baseline: skipped, it needs ~{3.5 * size / 1e9:.0f} GB "
                           f"of anonymous memory and {free / 1e9:.1f} GB is available")
    else:
        run = bench.tool("naive load_file + save_file", [sys.executable, "-c", NAIVE_CODE,
                                                         a, b, out, str(ALPHA)], None, keys)
        if not run.killed:
            run.inner_s = last_json(run.stdout).get("work_s")

    why = bench.mecha_available() if mecha else "--no-mecha"
    free = mem_available()
    if not why and free < (1 + MECHA_ANON_RATIO) * size + 1e9:
        why = (f"extrapolated from SD1.5 it needs ~{MECHA_ANON_RATIO * size / 1e9:.0f} GB of "
               f"anonymous memory plus {size / 1e9:.1f} GB for its output and "
               f"{free / 1e9:.1f} GB is available")
    if why:
        bench.notes.append(f"sd-mecha: skipped ({why})")
    else:
        label = f"sd-mecha {bench.mecha_info['version']} (default threads)"
        run = bench.tool(label, [str(bench.mecha_python), "-c", MECHA_CODE, a, b, out,
                                 str(ALPHA)], None, keys)
        if not run.killed:
            info = last_json(run.stdout)
            run.inner_s = info.get("work_s")
            bench.mecha_info.update(info)
    bench.cp()  # one more, after the last tool
    return keys


def report(bench: Bench, keys: list[str]) -> list[str]:
    out: list[str] = []
    cp = statistics.median(bench.cp_times)
    rows = []
    for run in bench.runs:
        is_cp = run.label == "cp"
        wall = cp if is_cp else run.wall_s
        ratio = "-" if run.label.startswith("python -c") else f"{wall / cp:.1f}x"
        rows.append([f"cp (median of {len(bench.cp_times)})" if is_cp else run.label,
                     secs(wall), secs(run.inner_s), ratio, mb(run.peak_anon_kb),
                     mb(run.hwm_kb), str(run.samples), run.note])
    size = bench.a.stat().st_size
    out.append(table(f"Merge {bench.arch}: weighted_sum alpha {ALPHA}, fp16 out, fp32 math, "
                     f"cpu; inputs 2 x {size / 1e9:.2f} GB (each in a fresh process, "
                     "RssAnon sampled every 5 ms)",
                     ["tool", "wall s", "in-tool s", "vs cp", "peak RssAnon MB",
                      "VmHWM MB", "samples", "note"], rows))
    out.append("cp runs (s): " + ", ".join(f"{t:.2f}" for t in bench.cp_times)
               + "   in-tool s: the tool's own timing, interpreter start and imports "
               "excluded")

    ref = reference(bench.a, bench.b, keys)
    rows = []
    for label, chk in bench.outputs.items():
        diff, verdict = compare(chk.values, ref)
        keyset = (f"{chk.n_keys} keys, {chk.missing} of A missing, {chk.extra} extra, "
                  f"{chk.dtype_changed} dtype changed")
        rows.append([label, diff, verdict, keyset])
    mk = next((c for lbl, c in bench.outputs.items() if lbl.startswith("modelkit warm")), None)
    mecha = next((c for lbl, c in bench.outputs.items() if lbl.startswith("sd-mecha")), None)
    if mk and mecha:
        diff, verdict = compare(mecha.values, mk.values)
        rows.append(["sd-mecha vs modelkit (not vs ref)", diff, verdict, ""])
    out.append(table(f"Check: {len(keys)} fp16 keys vs (1-a)*A.float()+a*B.float() -> half "
                     "computed here", ["output", "max abs diff", "elements", "key set"],
                     rows))
    out.append("check keys: " + ", ".join(keys))
    out.extend(verdicts(bench, cp))
    if bench.notes:
        out.append("\n== Notes\n" + "\n".join(f"- {n}" for n in bench.notes))
    return out


def verdicts(bench: Bench, cp: float) -> list[str]:
    by = {r.label: r for r in bench.runs}
    cold = next(r for lbl, r in by.items() if lbl.startswith("modelkit cold"))
    warm = next(r for lbl, r in by.items() if lbl.startswith("modelkit warm")
                and "BUSY" not in lbl)
    mecha = next((r for lbl, r in by.items() if lbl.startswith("sd-mecha")), None)
    lines = []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"{'OK ' if ok else 'MISS'} {text}")

    for run, name in ((warm, "warm"), (cold, "cold")):
        verdict(run.wall_s <= TARGET_CP_RATIO * cp,
                f"modelkit {name} within {TARGET_CP_RATIO:g}x cp: {run.wall_s / cp:.1f}x "
                f"({run.wall_s:.2f} s vs cp {cp:.2f} s; in-tool {secs(run.inner_s)} s)")
    if mecha and not mecha.killed:
        for run, name in ((warm, "warm"), (cold, "cold")):
            verdict(mecha.wall_s >= TARGET_MECHA_SPEEDUP * run.wall_s,
                    f"modelkit {name} >= {TARGET_MECHA_SPEEDUP:g}x faster than sd-mecha: "
                    f"{mecha.wall_s / run.wall_s:.1f}x")
    else:
        lines.append("--  sd-mecha speed target not checked (sd-mecha not run)")
    verdict(cold.wall_s <= TARGET_COLD_RATIO * warm.wall_s,
            f"modelkit cold within {TARGET_COLD_RATIO:g}x of warm: "
            f"{cold.wall_s / warm.wall_s:.2f}x")
    for busy in ("", ", BUSY"):
        mine = next((r for lbl, r in by.items() if lbl.startswith("modelkit warm")
                     and (busy in lbl if busy else "BUSY" not in lbl)), None)
        ref = next((r for lbl, r in by.items() if lbl.startswith("reference")
                    and (busy in lbl if busy else "BUSY" not in lbl)), None)
        if mine and ref:
            verdict(mine.wall_s <= ref.wall_s,
                    f"modelkit warm{busy.lower()} at or under the pread reference: "
                    f"{mine.wall_s:.2f} s vs {ref.wall_s:.2f} s")
    quiet_b = next((r for lbl, r in by.items() if "BUSY" in lbl and "modelkit" in lbl), None)
    if quiet_b:
        verdict(quiet_b.wall_s <= 1.5 * warm.wall_s,
                f"modelkit warm beside a busy process within 1.5x of quiet: "
                f"{quiet_b.wall_s / warm.wall_s:.2f}x")
    for run, name in ((warm, "warm"), (cold, "cold")):
        anon = run.peak_anon_kb * 1024 / MB
        verdict(anon < TARGET_ANON_MB, f"modelkit {name} peak RssAnon under "
                                       f"{TARGET_ANON_MB:g} MB: {anon:.0f} MB")
    return ["\n== Targets (wall time: whole process, interpreter start included)", *lines]


# --------------------------------------------------------------------------
# main


def prepare(d: Path, arch: str, generated: list[Path]) -> tuple[list[Path], list[str]]:
    """Reuse or generate the two inputs (appending those generated to
    ``generated``); make room for SDXL by removing SD1.5 inputs when needed.
    Returns the inputs and notes."""
    notes: list[str] = []
    want = expected_header(ARCHS[arch][1], d)
    paths = input_paths(d, arch)
    reuse = [same_layout(p, want) for p in paths]
    # room for the missing inputs and one output, with ~2 GB of RAM left over
    need = sum(0 if r else want.file_size for r in reuse) + want.file_size

    def room() -> bool:
        return shutil.disk_usage(d).free > need + 1e8 and mem_available() > need + 2e9

    if not room() and arch == "sdxl":
        for p in input_paths(d, "sd1"):
            if p.exists():
                log(f"removing {p.name} to make room")
                notes.append(f"removed {p.name} to make room for SDXL")
                p.unlink()
    if not room():
        raise BenchError(f"{d}: {shutil.disk_usage(d).free / 1e9:.1f} GB free on disk, "
                         f"{mem_available() / 1e9:.1f} GB of RAM available; this run needs "
                         f"about {need / 1e9:.1f} GB more plus 2 GB of RAM to spare")
    for p, ok, seed in zip(paths, reuse, SEEDS, strict=True):
        if ok:
            log(f"{p.name}: present, reused")
            notes.append(f"{p.name}: reused")
        else:
            p.unlink(missing_ok=True)
            generated.append(p)
            t = generate(p, ARCHS[arch][1], seed)
            notes.append(f"{p.name}: generated in {t:.1f} s (seed {seed})")
    return paths, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help="where the models and outputs go; a tmpfs (default %(default)s)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd1",
                    help="sd1 (2 x 2.1 GB) or sdxl (2 x 6.9 GB); default %(default)s")
    ap.add_argument("--keep", action="store_true",
                    help="keep the input models for the next run")
    ap.add_argument("--mecha-python", type=Path, default=MECHA_PYTHON,
                    help="interpreter of a venv with sd-mecha (default %(default)s)")
    ap.add_argument("--no-mecha", action="store_true", help="skip sd-mecha")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--busy", action="store_true",
                    help="also run modelkit and the reference beside a busy process")
    ap.add_argument("--rounds", type=int, default=3,
                    help="warm modelkit runs, best reported (default %(default)s)")
    args = ap.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    generated: list[Path] = []
    try:
        paths, notes = prepare(args.dir, args.arch, generated)
        bench = Bench(args.dir, args.arch, paths[0], paths[1], args.mecha_python)
        bench.notes.extend(notes)
        load0 = os.getloadavg()[0]
        keys = run_all(bench, naive=not args.no_naive, mecha=not args.no_mecha,
                       rounds=max(1, args.rounds), busy=args.busy)
        load = f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end"
        lines = report(bench, keys)
    except BenchError as exc:
        print(f"bench_merge: {exc}", file=sys.stderr)
        return 2
    finally:
        outputs = ["cp-out.safetensors", f"merge-out-{args.arch}.safetensors"]
        for name in outputs:
            (args.dir / name).unlink(missing_ok=True)
        for name in [*outputs, *(p.name for p in input_paths(args.dir, args.arch))]:
            for tmp in args.dir.glob(f".{name}.*.partial"):  # an interrupted write
                tmp.unlink(missing_ok=True)
        if not args.keep:
            # only what this run generated: a model another run kept is left alone
            for p in generated:
                p.unlink(missing_ok=True)
            if args.dir.exists() and not any(args.dir.iterdir()):
                args.dir.rmdir()
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(args.dir.parent)],
                        capture_output=True, text=True, check=False).stdout.strip()
    vers = ", ".join(f"{d} {version(d)}" for d in ("torch", "safetensors"))
    mecha = bench.mecha_info
    mecha_v = f", sd-mecha {mecha['version']}" if mecha.get("version") else ""
    if mecha.get("torch"):
        mecha_v += f" (torch {mecha['torch']})"
    print(f"modelkit merge benchmark, {started}, {os.cpu_count()} cores, "
          f"{platform.machine()}, Python {platform.python_version()}, {vers}{mecha_v}, "
          f"{args.dir} on {fs}, {load}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
