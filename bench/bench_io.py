"""I/O benchmark for modelkit: generation, header reads, hashing and the
peak memory of streamed read-transform-write passes over full-size synthetic
SD1.5 and SDXL checkpoints.

Run::

    .venv/bin/python bench/bench_io.py [--dir /dev/shm/modelkit-bench] [--keep]

Every figure of one run is printed side by side (machines are noisy: compare
numbers from the same run, never across runs). Put ``--dir`` on a RAM disk
(tmpfs): on a real disk the figures measure the disk. Each memory figure
comes from a fresh subprocess whose ``/proc/<pid>/status`` the parent samples
every few milliseconds; the figure that matters is peak ``RssAnon`` (process
memory proper), not RSS or ``VmHWM``, which also count the pages of the
memory-mapped input file. See ``bench/README.md`` for what each figure means.

The script re-invokes itself as ``bench_io.py _child KIND ARGS...`` to run
one pass in a fresh process; that entry point is internal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modelkit.io.hashing import hash_file  # noqa: E402
from modelkit.io.header import Header, read_header  # noqa: E402

DEFAULT_DIR = Path("/dev/shm/modelkit-bench")
MODELS = {"sd15": ("sd1", "sd15-fp16.safetensors"),
          "sdxl": ("sdxl", "sdxl-fp16.safetensors")}
PRIVATE_PREFIX = "bench_io-"  # this script's files; others may share the folder
STATUS_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM")
SAMPLE_INTERVAL = 0.005  # seconds between /proc samples of a child
MiB = 1 << 20
MB = 1e6
# peak anon RSS above the import baseline, in units of the largest source
# tensor, that still counts as "a small constant" (fp32 output is 2x, plus
# a chunk or two and allocator slack)
SMALL_CONSTANT = 4.0


EXTRA: dict[str, Any] = {}  # a child's extra figures, added to its report


class BenchError(RuntimeError):
    """A benchmark step failed in a way that makes its figures meaningless."""


# --------------------------------------------------------------------------
# /proc helpers (shared by parent and child)


def read_status(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of ``/proc/<pid>/status`` in KiB ({} once gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(rest.split()[0])
    return out


# --------------------------------------------------------------------------
# child side: one pass in a fresh process, a JSON report on the last line


def _import_all() -> None:
    """Everything any pass imports, so each child starts from the same base."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import modelkit.engine.runner
    import modelkit.testing  # noqa: F401


def _naive_pass(src: str, out: str, fp32: bool) -> None:
    """What a script without modelkit does: load the whole state dict, save it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
    state = load_file(src)
    if fp32:
        state = {k: v.to(torch.float32) if v.is_floating_point() else v
                 for k, v in state.items()}
    save_file(state, out, metadata=meta)


def _cast_micro(src: str) -> dict[str, list[float]]:
    """fp16->fp32 conversion of every float tensor of ``src``, nothing written:
    modelkit's chunked ``cast`` (a fresh output per tensor), one ``.to()`` call
    per tensor, and ``copy_`` into one reused buffer (no fresh pages)."""
    import torch

    from modelkit.io.reader import cast, open_model

    with open_model(src) as m:
        keys = [k for k, i in m.infos.items() if i.is_float]
        scratch = torch.empty(max(m.infos[k].numel for k in keys), dtype=torch.float32)

        def chunked() -> None:
            for k in keys:
                cast(m.get(k), torch.float32)

        def to() -> None:
            for k in keys:
                m.get(k).to(torch.float32)

        def reused() -> None:
            for k in keys:
                t = m.get(k)
                scratch[:t.numel()].view(t.shape).copy_(t)

        variants = {"cast() chunked": chunked, ".to()": to, "copy_ reused buffer": reused}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3):  # interleaved, so noise hits all three alike
            for name, fn in variants.items():
                times[name].append(timed(fn))
    return times


def _child_work(kind: str, args: Sequence[str]) -> Callable[[], None] | None:
    """Import what ``kind`` needs and return its work (None: imports only)."""
    if kind == "import-torch":
        import torch  # noqa: F401

        return None
    _import_all()
    if kind == "import-all":
        return None
    if kind == "generate":
        from modelkit.testing import write_checkpoint

        arch, path, tiny = args

        def generate() -> None:
            write_checkpoint(path, arch, tiny=tiny == "tiny", dtype="F16")

        return generate
    if kind in ("copy", "fp32"):
        from modelkit.core.recipe import Recipe
        from modelkit.engine.runner import run

        src, out = args
        # the one runner: a plain streamed copy, or every float tensor cast to fp32
        recipe = (Recipe.op("quantize", src, output=out, dtype="fp32") if kind == "fp32"
                  else Recipe.op("convert", src, output=out))

        def convert() -> None:
            run(recipe, overwrite=True)

        return convert
    if kind in ("naive", "naive-fp32"):
        src, out = args

        def naive() -> None:
            _naive_pass(src, out, fp32=kind == "naive-fp32")

        return naive
    if kind == "cast-micro":

        def micro() -> None:
            EXTRA.update(_cast_micro(args[0]))

        return micro
    raise SystemExit(f"unknown child kind {kind!r}")


def child_main(argv: Sequence[str]) -> None:
    """``_child KIND ARGS...``: run one pass, print a JSON report."""
    kind, args = argv[0], argv[1:]
    t0 = time.perf_counter()
    work = _child_work(kind, args)
    t1 = time.perf_counter()
    ready = read_status()
    if work is not None:
        work()
    t2 = time.perf_counter()
    end = read_status()
    report: dict[str, Any] = {
        "import_s": t1 - t0, "work_s": t2 - t1,
        "anon_ready_kb": ready.get("RssAnon", 0), "anon_end_kb": end.get("RssAnon", 0),
        "hwm_kb": end.get("VmHWM", 0), "file_end_kb": end.get("RssFile", 0),
        "shmem_end_kb": end.get("RssShmem", 0), "extra": EXTRA,
    }
    print(json.dumps(report), flush=True)


# --------------------------------------------------------------------------
# parent side


@dataclass
class ChildRun:
    """One sampled child process."""

    label: str
    wall_s: float  # whole process, interpreter start to exit
    import_s: float
    work_s: float  # the pass itself, measured in the child
    peak_anon_kb: int
    anon_ready_kb: int  # after imports, before the pass
    hwm_kb: int
    samples: int
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def delta_kb(self) -> int:
        return self.peak_anon_kb - self.anon_ready_kb


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class Sampled:
    """A finished child process with its sampled memory figures (kB)."""

    wall_s: float
    peak_anon_kb: int
    hwm_kb: int
    samples: int
    stdout: str
    stderr: str
    returncode: int | None
    killed: bool = False


@contextlib.contextmanager
def busy_loop(enabled: bool = True) -> Iterator[None]:
    """One competing CPU-bound process (``while True: pass``) for the block:
    what a user's UI, browser or render does to a 2-core machine."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it take its core
        yield
    finally:
        proc.kill()
        proc.wait()


def sample_process(cmd: list[str], env: dict[str, str] | None = None,
                   min_available: int | None = None) -> Sampled:
    """Run ``cmd``, sampling its RssAnon and VmHWM every ~5 ms. With
    ``min_available`` (bytes) it is killed when MemAvailable drops below that
    (benchmark inputs sit in RAM, so a runaway child could take the machine)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or child_env(), cwd=REPO)
        peak = hwm = samples = 0
        killed = False
        while proc.poll() is None:
            st = read_status(proc.pid)
            if "RssAnon" in st:  # absent once the child is a zombie
                peak = max(peak, st["RssAnon"])
                hwm = max(hwm, st["VmHWM"])
                samples += 1
            if (min_available is not None and samples % 20 == 0
                    and mem_available() < min_available):
                proc.kill()
                proc.wait()
                killed = True
                break
            time.sleep(SAMPLE_INTERVAL)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Sampled(wall, peak, hwm, samples, out.read(), err.read(), proc.returncode,
                       killed)


def run_child(label: str, kind: str, *args: str) -> ChildRun:
    """Run ``kind`` in a fresh process, sampling its RssAnon every ~5 ms."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, *args]
    run = sample_process(cmd)
    if run.returncode != 0:
        raise BenchError(f"{label}: child exited {run.returncode}\n{run.stderr[-2000:]}")
    rep = json.loads(run.stdout.strip().splitlines()[-1])
    peak = max(run.peak_anon_kb, rep["anon_ready_kb"], rep["anon_end_kb"])
    return ChildRun(label, run.wall_s, rep["import_s"], rep["work_s"], peak,
                    rep["anon_ready_kb"], max(run.hwm_kb, rep["hwm_kb"]), run.samples, rep)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_load() -> tuple[str, float]:
    """Load average and CPU pressure (PSI ``some`` avg60, %): a busy machine
    (others' work) makes every timing noisy. Returns (description, psi)."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    psi = 0.0
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                psi = float(dict(f.split("=") for f in line.split()[1:])["avg60"])
    except (OSError, KeyError, ValueError):
        pass
    return f"loadavg {' '.join(load)}, cpu PSI some avg60 {psi:.1f}%", psi


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_cmd(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=child_env(),
                          cwd=REPO, check=False)


def time_cmd(cmd: Sequence[str], repeat: int) -> tuple[float, list[float]]:
    """Median wall time of ``cmd`` over ``repeat`` runs (it must succeed)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        res = run_cmd(cmd)
        times.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    return statistics.median(times), times


def largest(header: Header) -> tuple[str, int]:
    t = max(header.tensors.values(), key=lambda i: i.nbytes)
    return t.name, t.nbytes


def valid_model(path: Path) -> bool:
    from modelkit.errors import ModelkitError

    if not path.is_file():
        return False
    try:
        read_header(path)
    except ModelkitError:
        return False
    return True


# --------------------------------------------------------------------------
# formatting


def ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def secs(s: float) -> str:
    return f"{s:.2f} s"


def mib(kb: float) -> str:
    return f"{kb / 1024:,.0f} MiB"


def rate(nbytes: int, s: float) -> str:
    return f"{nbytes / s / MB:,.0f} MB/s"


def table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(head))
    return "\n".join([f"\n== {title}", line(head), rule, *(line(r) for r in rows)])


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# the benchmark sections


@dataclass
class Context:
    """Shared state of one run."""

    dir: Path
    paths: dict[str, Path]
    tiny: bool = False
    regenerate: bool = False  # generate even when another benchmark left the model
    published: list[Path] = field(default_factory=list)  # plain names this run made
    headers: dict[str, Header] = field(default_factory=dict)
    out: list[str] = field(default_factory=list)  # printed tables
    problems: list[str] = field(default_factory=list)

    def scratch(self, name: str) -> Path:
        return self.dir / name


def shared_name(path: Path) -> Path:
    """The plain name of a private model file: other benchmarks sharing the
    folder may have generated the same seeded model under it."""
    return path.with_name(path.name.removeprefix(PRIVATE_PREFIX))


def section_generate(ctx: Context) -> None:
    """Make each model available under this script's private name: kept from an
    earlier ``--keep`` run, hard-linked to an identical model another benchmark
    left under the plain name (no copy, and immune to its deletion), or
    generated, then hard-linked under the plain name for other benchmarks."""
    rows = []
    for name, (arch, _) in MODELS.items():
        path = ctx.paths[name]
        shared = shared_name(path)
        if valid_model(path):
            log(f"{path.name}: present, reused")
            rows.append([name, "reused (not timed)", "-", "-", "-", "-"])
        elif valid_model(shared) and not ctx.regenerate:
            path.unlink(missing_ok=True)
            os.link(shared, path)
            log(f"{path.name}: hard link to {shared.name}, reused")
            rows.append([name, f"reused {shared.name} (not timed)", "-", "-", "-", "-"])
        else:
            path.unlink(missing_ok=True)
            log(f"generating {path.name} ...")
            run = run_child(f"generate {name}", "generate", arch, str(path),
                            "tiny" if ctx.tiny else "full")
            size = path.stat().st_size
            ctx.headers[name] = read_header(path)
            big = largest(ctx.headers[name])[1]
            rows.append([name, secs(run.work_s), rate(size, run.work_s),
                         mib(run.peak_anon_kb), mib(run.delta_kb),
                         f"{run.delta_kb * 1024 / big:.2f}"])
            if not shared.exists():  # let other benchmarks reuse it (bench_merge.py)
                os.link(path, shared)
                ctx.published.append(shared)
        ctx.headers[name] = read_header(path)
    for name, path in ctx.paths.items():
        h = ctx.headers[name]
        key, nbytes = largest(h)
        rows_info = f"{h.file_size / 1e9:.3f} GB, {len(h.tensors)} tensors, " \
                    f"largest {nbytes / MiB:.1f} MiB ({key})"
        ctx.out.append(f"{name}: {path}  {rows_info}")
    ctx.out.append(table(f"Generation: write_checkpoint(tiny={ctx.tiny}, dtype='F16') "
                         "in a fresh process",
                         ["model", "time", "write rate", "peak RssAnon",
                          "above imports", "x largest"], rows))


def section_header(ctx: Context, repeat: int) -> None:
    rows = []
    py = sys.executable
    for name, path in ctx.paths.items():
        first = timed(lambda p=path: read_header(p))
        runs = [timed(lambda p=path: read_header(p)) for _ in range(repeat)]
        hsize = ctx.headers[name].header_size
        rows.append([f"{name} read_header (in process)", ms(first),
                     ms(statistics.median(runs)), f"{hsize / 1e3:,.0f} kB JSON"])
    startup, _ = time_cmd([py, "-c", "pass"], 5)
    rows.append(["python -c pass (startup baseline)", "-", ms(startup), ""])
    code = ("import sys; from modelkit.io.header import read_header; "
            "read_header(sys.argv[1])")
    for name, path in ctx.paths.items():
        med, times = time_cmd([py, "-c", code, str(path)], 5)
        rows.append([f"{name} fresh process: import + read_header", ms(times[0]),
                     ms(med), ""])
    probe = run_cmd([py, "-m", "modelkit", "inspect", "--json", str(ctx.paths["sd15"])])
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(["modelkit inspect --json", "skipped", "-", why[:60]])
        ctx.problems.append(f"`python -m modelkit inspect --json` not measured: {why}")
    else:
        for name, path in ctx.paths.items():
            cmd = [py, "-m", "modelkit", "inspect", "--json", str(path)]
            med, times = time_cmd(cmd, 3)
            try:
                json.loads(run_cmd(cmd).stdout)
                note = "JSON ok"
            except json.JSONDecodeError:
                note = "stdout is not JSON"
                ctx.problems.append(f"modelkit inspect --json on {name}: stdout not JSON")
            rows.append([f"{name} modelkit inspect --json (end to end)", ms(times[0]),
                         ms(med), note])
    ctx.out.append(table(f"Header read (median of {repeat} in process, 5 or 3 fresh "
                         "processes)", ["what", "first", "median", "note"], rows))


def section_hash(ctx: Context, repeat: int) -> None:
    path = ctx.paths["sd15"]
    size = path.stat().st_size
    digests: dict[str, str] = {}

    def modelkit_hash() -> None:
        digests["hash_file"] = hash_file(path).sha256

    def coreutils() -> None:
        res = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                             check=True)
        digests["sha256sum"] = res.stdout.split()[0]

    def one_digest() -> None:
        with open(path, "rb") as f:
            digests["hashlib"] = hashlib.file_digest(f, "sha256").hexdigest()

    variants = {"hash_file (sha256 + addnet, 2 threads)": modelkit_hash,
                "sha256sum": coreutils,
                "hashlib.file_digest sha256 (1 thread)": one_digest}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):  # interleaved, so noise hits all alike
        for name, fn in variants.items():
            times[name].append(timed(fn))
    agree = len(set(digests.values())) == 1
    if not agree:
        ctx.problems.append(f"sha256 digests disagree: {digests}")
    ref = min(times["sha256sum"])
    rows = [[name, " ".join(f"{t:.2f}" for t in ts), secs(min(ts)), rate(size, min(ts)),
             f"{min(ts) / ref:.2f}x"] for name, ts in times.items()]
    ctx.out.append(table(f"Hash of sd15 ({size / 1e9:.2f} GB), {repeat} interleaved "
                         f"runs; digests {'agree' if agree else 'DISAGREE'}",
                         ["what", "runs (s)", "best", "throughput (best)",
                          "time vs sha256sum"], rows))


def time_cp(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t = time.perf_counter() - t
    dst.unlink()
    return t


@dataclass
class Pass:
    """One kind of pass over one input, run once per round."""

    label: str
    kind: str
    src: Path | None  # None: imports only
    big: int  # largest tensor of the input, bytes
    runs: list[ChildRun] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.src.stat().st_size if self.src else 0

    @property
    def best_s(self) -> float:
        return min(r.work_s for r in self.runs)

    @property
    def worst_mem(self) -> ChildRun:
        """The run with the highest peak RssAnon above its imports."""
        return max(self.runs, key=lambda r: r.delta_kb)

    @property
    def k(self) -> float:
        """Peak RssAnon above imports in units of the largest tensor."""
        return self.worst_mem.delta_kb * 1024 / self.big


def section_passes(ctx: Context, sdxl_pass: bool, repeat: int) -> None:
    sd15 = ctx.paths["sd15"]
    size15 = sd15.stat().st_size
    big15 = largest(ctx.headers["sd15"])[1]
    out = ctx.scratch(f"{PRIVATE_PREFIX}pass-out.safetensors")
    passes = [
        Pass("import torch only", "import-torch", None, big15),
        Pass("import torch+safetensors+modelkit", "import-all", None, big15),
        Pass("sd15 fp16->fp16 run(convert)", "copy", sd15, big15),
        Pass("sd15 fp16->fp32 run(quantize fp32)", "fp32", sd15, big15),
        Pass("sd15 naive load_file+save_file", "naive", sd15, big15),
        Pass("sd15 naive load_file+.to(fp32)+save", "naive-fp32", sd15, big15),
    ]
    cp_srcs = [sd15]
    if sdxl_pass:
        bigxl = largest(ctx.headers["sdxl"])[1]
        passes.append(Pass("sdxl fp16->fp16 run(convert)", "copy", ctx.paths["sdxl"],
                           bigxl))
        cp_srcs.append(ctx.paths["sdxl"])
    cp_times: dict[Path, list[float]] = {src: [] for src in cp_srcs}
    for rnd in range(1, repeat + 1):  # rounds, so noise bursts hit every pass alike
        for p in passes:
            # the naive fp32 pass holds the whole fp32 state dict: 2x the file
            if p.kind == "naive-fp32" and mem_available() < 2 * size15 + 1.5e9:
                ctx.problems.append(f"round {rnd}: {p.label} skipped, not enough "
                                    "free memory")
                continue
            log(f"round {rnd}/{repeat}: {p.label} ...")
            args = [str(p.src), str(out)] if p.src else []
            try:
                p.runs.append(run_child(p.label, p.kind, *args))
            finally:
                out.unlink(missing_ok=True)
        for src in cp_srcs:
            log(f"round {rnd}/{repeat}: cp {src.name} ...")
            cp_out = ctx.scratch(f"{PRIVATE_PREFIX}cp.safetensors")
            cp_times[src].append(time_cp(src, cp_out))
    passes = [p for p in passes if p.runs]
    best_cp = {src: min(ts) for src, ts in cp_times.items()}

    rows = []
    for p in passes:
        w = p.worst_mem
        all_s = " ".join(f"{r.work_s:.2f}" for r in p.runs)
        if p.src:
            times = [all_s, secs(p.best_s), rate(p.nbytes, p.best_s),
                     f"{p.best_s / best_cp[p.src]:.1f}x"]
            mem = [mib(w.peak_anon_kb), mib(w.delta_kb), f"{p.k:.2f}"]
        else:
            imp = " ".join(f"{r.import_s:.2f}" for r in p.runs)
            times = [f"{imp} (import)", "-", "-", "-"]
            mem = [mib(w.peak_anon_kb), "-", "-"]
        rows.append([p.label, *times, *mem, mib(max(r.hwm_kb for r in p.runs)),
                     str(sum(r.samples for r in p.runs))])
    for src, ts in cp_times.items():
        name = "sd15" if src == sd15 else "sdxl"
        rows.append([f"cp {name} (same rounds)", " ".join(f"{t:.2f}" for t in ts),
                     secs(min(ts)), rate(src.stat().st_size, min(ts)), "1.0x",
                     "-", "-", "-", "-", "-"])
    head = ["pass", "pass time runs (s)", "best", "rate (best)", "vs cp",
            "peak RssAnon", "above imports", "x largest", "VmHWM", "samples"]
    ctx.out.append(table(f"Read-transform-write passes, each run in a fresh process, "
                         f"{repeat} rounds (RssAnon sampled every "
                         f"{SAMPLE_INTERVAL * 1e3:g} ms; memory: worst round)",
                         head, rows))
    ctx.out.append(f"largest tensor: sd15 {big15 / MiB:.1f} MiB" + (
        f", sdxl {largest(ctx.headers['sdxl'])[1] / MiB:.1f} MiB" if sdxl_pass else ""))
    ctx.out.append(f"size: sd15 {size15 / 1e9:.2f} GB" + (
        f", sdxl {ctx.paths['sdxl'].stat().st_size / 1e9:.2f} GB" if sdxl_pass else ""))
    check_expectations(ctx, passes, best_cp)


def check_expectations(ctx: Context, passes: list[Pass],
                       best_cp: dict[Path, float]) -> None:
    """peak RssAnon ~= import baseline + largest tensor x small constant."""
    verdicts = []
    streamed = [p for p in passes if p.src and "run(" in p.label]
    for p in streamed:
        ok = p.k <= SMALL_CONSTANT
        verdicts.append(f"{'OK ' if ok else 'BAD'} {p.label}: peak RssAnon is imports "
                        f"+ {p.k:.2f} x largest tensor (limit {SMALL_CONSTANT:g})")
        if not ok:
            ctx.problems.append(f"{p.label}: peak RssAnon {mib(p.worst_mem.peak_anon_kb)}"
                                f" = imports + {p.k:.2f} x largest tensor")
        ratio = p.best_s / best_cp[p.src] if p.src else 0
        if ratio > 10:
            ctx.problems.append(f"{p.label}: best run takes {ratio:.1f}x as long as cp")
    copies = [p.worst_mem for p in streamed if "fp16->fp16" in p.label]
    if len(copies) == 2:
        a, b = copies
        grow = (b.delta_kb - a.delta_kb) / 1024
        verdicts.append(f"{'OK ' if grow < 256 else 'BAD'} sd15 -> sdxl copy: peak "
                        f"above imports {mib(a.delta_kb)} -> {mib(b.delta_kb)} "
                        f"(model 3.3x bigger)")
        if grow >= 256:
            ctx.problems.append(f"peak RssAnon grows with the model: {mib(a.delta_kb)}"
                                f" -> {mib(b.delta_kb)} from sd15 to sdxl")
    for p in passes:
        if p.src and "naive" in p.label:
            verdicts.append(f"--  contrast, {p.label}: imports + {p.k:.2f} x largest "
                            "tensor")
    ctx.out.append("\n== Expectation: peak RssAnon ~= imports + largest tensor x small "
                   "constant, flat in model size\n" + "\n".join(verdicts))


def section_cast_micro(ctx: Context) -> None:
    """Where the time of an fp32 cast goes: conversion or fresh pages."""
    run = run_child("cast micro", "cast-micro", str(ctx.paths["sd15"]))
    n = sum(i.numel for i in ctx.headers["sd15"].tensors.values() if i.is_float)
    rows = [[name, " ".join(f"{t:.2f}" for t in ts), secs(min(ts)),
             f"{n / min(ts) / 1e6:,.0f} M elem/s"]
            for name, ts in run.report["extra"].items()]
    ctx.out.append(table("fp16->fp32 conversion of every sd15 float tensor, nothing "
                         "written (3 interleaved runs, one process)",
                         ["variant", "runs (s)", "best", "rate"], rows))


def cleanup(ctx: Context, keep: bool) -> None:
    """Remove this script's own files only: others may share the folder. A
    plain-named model this run published goes too (unless ``keep``), and only
    while it is still the file this run generated."""
    ours = [ctx.scratch(f"{PRIVATE_PREFIX}{n}.safetensors") for n in ("pass-out", "cp")]
    if not keep:
        for path in ctx.paths.values():
            shared = shared_name(path)
            if shared in ctx.published and path.exists() and shared.exists() \
                    and os.path.samefile(path, shared):
                ours.append(shared)
            ours.append(path)
    for path in ours:
        path.unlink(missing_ok=True)
        for tmp in ctx.dir.glob(f".{path.name}.*.partial"):  # an interrupted write
            tmp.unlink(missing_ok=True)
    for path in ctx.paths.values():
        if shared_name(path).exists() and shared_name(path) not in ours:
            log(f"left {shared_name(path)} (plain name, other benchmarks may use it)")
    if ctx.dir.is_dir() and not any(ctx.dir.iterdir()):
        ctx.dir.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help="where the models and outputs go; a tmpfs (default %(default)s)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the generated models for the next run")
    ap.add_argument("--repeat", type=int, default=20,
                    help="in-process header reads for the median (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of the pass table; hashing runs one more "
                         "(default %(default)s)")
    ap.add_argument("--regenerate", action="store_true",
                    help="generate (and time) the models even when another benchmark "
                         "left them in --dir (needs 9 GB more)")
    ap.add_argument("--no-sdxl-pass", action="store_true",
                    help="skip the fp16 copy pass over the SDXL file")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke-test the script on tiny models (figures meaningless)")
    args = ap.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    size_kind = "tiny" if args.tiny else "full"
    paths = {name: args.dir / f"{PRIVATE_PREFIX}{size_kind}-{fname}"
             for name, (_, fname) in MODELS.items()}
    missing = [n for n, p in paths.items()
               if not p.exists() and (args.regenerate or not shared_name(p).exists())]
    need = sum(7.5e9 if n == "sdxl" else 2.2e9 for n in missing) + (
        7.5e9 if not args.no_sdxl_pass else 4.5e9)
    need = need / 100 if args.tiny else need
    free = shutil.disk_usage(args.dir).free
    if free < need:
        if not any(args.dir.iterdir()):
            args.dir.rmdir()
        print(f"{args.dir}: {free / 1e9:.1f} GB free, this run needs about "
              f"{need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    ctx = Context(args.dir, paths, tiny=args.tiny, regenerate=args.regenerate)
    started = time.strftime("%Y-%m-%d %H:%M")
    load_start = machine_load()
    try:
        section_generate(ctx)
        log("header reads ...")
        section_header(ctx, args.repeat)
        log("hashing ...")
        section_hash(ctx, args.rounds + 1)
        section_passes(ctx, not args.no_sdxl_pass, args.rounds)
        log("cast micro-benchmark ...")
        section_cast_micro(ctx)
    finally:
        cleanup(ctx, keep=args.keep)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(args.dir.parent)],
                        capture_output=True, text=True, check=False).stdout.strip()
    vers = ", ".join(f"{d} {version(d)}" for d in ("torch", "safetensors"))
    print(f"modelkit I/O benchmark{' (TINY smoke test)' if args.tiny else ''}, "
          f"{started}, {os.cpu_count()} cores, {platform.machine()}, "
          f"Python {platform.python_version()}, {vers}, {args.dir} on {fs}")
    load_end = machine_load()
    print(f"machine load before: {load_start[0]}; after: {load_end[0]}")
    print("\n".join(ctx.out))
    if max(load_start[1], load_end[1]) > 10:
        ctx.problems.append("other processes competed for the CPU (cpu PSI over 10%); "
                            "timings are unreliable, run again on an idle machine")
    if ctx.problems:
        print("\n== Problems\n" + "\n".join(f"- {p}" for p in ctx.problems))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
