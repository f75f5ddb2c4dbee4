"""Library index benchmark: ``modelkit library scan`` over the demo library
copied to 2,000 files, first scan and re-scans, with the floors that bound
them timed in the same run.

Run::

    .venv/bin/python bench/bench_library.py [--dir /dev/shm/modelkit-bench-library] \
        [--files 2000] [--rounds 3] [--keep]

The demo library (``modelkit.demo.build_library``: 17 tiny models of every
kind, about 146 MB) is written once, then hard-linked into ``--dir`` under
``models/<kind folder>/set-NNN/`` until ``--files`` files exist (hard links:
2,000 paths, one copy of the bytes, as many headers to read). Every figure is
one fresh ``modelkit`` process (start-up and imports included), as a user
runs it:

- ``first scan``: an empty index; every header is read and inspected
  (files/second);
- ``re-scan, nothing changed``: the target is under 2 s for 2,000 files;
- ``re-scan, 1 % touched``: 20 files get a new mtime and are read again;
- ``list --json``, ``check`` and ``dupes --no-hash`` over the full index;
- floors: ``find -printf`` over the tree (the walk and stat a re-scan must
  do) and a loop of ``read_header`` over every file in one process (the
  header parsing a first scan must do, without inspection).

The first scan runs twice: with ``-j 1`` (headers read in the scanning
process) and with the default (one worker process per CPU; the peak RssAnon
column is the parent's). Peak anonymous RSS (RssAnon) of each process is
sampled every ~5 ms. The TUI
is timed headless too: the app started over the 2,000-file index until the
table is filled, and one filter change. See ``bench/README.md`` (section
"Library").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import REPO, child_env, log, machine_load, sample_process, table  # noqa: E402

from modelkit.library.scan import default_workers  # noqa: E402

DEFAULT_DIR = Path("/dev/shm/modelkit-bench-library")
TOUCHED = 0.01  # share of files given a new mtime for the partial re-scan


def build(root: Path, n_files: int) -> int:
    """The demo library hard-linked into ``root`` until ``n_files`` exist."""
    from modelkit.demo import build_library


    source = root / "source"
    if not (source / "models").exists():
        log("writing the demo library (17 files)")
        build_library(source)
    files = sorted(p for p in source.rglob("*.safetensors"))
    lib = root / "lib"
    shutil.rmtree(lib, ignore_errors=True)
    count = 0
    for i in range(n_files):
        src = files[i % len(files)]
        rel = src.relative_to(source)
        dst = lib / rel.parent / f"set-{i // len(files):03d}" / rel.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        count += 1
    return count


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelkit", *args]


def run(label: str, cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RssAnon kB, stdout) of one fresh process."""
    res = sample_process(cmd, env=env)
    if res.returncode not in (0, 1):
        raise RuntimeError(f"{label}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return res.wall_s, res.peak_anon_kb, res.stdout


def touch(lib: Path, share: float) -> int:
    files = sorted(lib.rglob("*.safetensors"))
    step = max(1, round(1 / share))
    chosen = files[::step]
    for p in chosen:
        # hard links share an inode: give these paths their own copy first
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data)
    return len(chosen)


READ_HEADERS = """
import sys, time
from pathlib import Path
t = time.perf_counter()
from modelkit.io.header import read_header
n = 0
for p in Path(sys.argv[1]).rglob("*.safetensors"):
    read_header(p)
    n += 1
print(n, time.perf_counter() - t)
"""


async def _tui_times(db: str) -> tuple[float, float, int]:
    from modelkit.tui.app import make_app
    from modelkit.tui.widgets.model_table import ModelTable

    app = make_app(db=db, images=False)
    start = time.perf_counter()
    async with app.run_test(size=(160, 45)) as pilot:
        table = None
        while True:
            await pilot.pause(0.02)
            try:
                table = app.screen.query_one(ModelTable)
            except Exception:
                continue
            if table.row_count:
                break
        loaded = time.perf_counter() - start
        rows = table.row_count
        t = time.perf_counter()
        table.set_query("kind:lora")
        filtered = time.perf_counter() - t
        return loaded, filtered, rows


def tui_times(db: str) -> tuple[float, float, int]:
    """(seconds until the table is filled, seconds of one filter change, rows)."""
    return asyncio.run(_tui_times(db))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the files for another run")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    load_before = machine_load()
    n = build(args.dir, args.files)
    lib, db = args.dir / "lib", args.dir / "index.sqlite"
    env = child_env()
    env["MODELKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-lib-cache-")
    rows = []

    def record(label: str, wall: float, peak: int, extra: str = "") -> None:
        rows.append([label, f"{wall:.2f}", f"{peak / 1024:.0f}", extra])

    wall, _, _ = run("python", [sys.executable, "-c", "pass"], env)
    record("python -c pass", wall, 0)
    walls = []
    for _ in range(args.rounds):
        w, _, out = run("find", ["find", str(lib), "-name", "*.safetensors", "-printf",
                                 "%s %T@ %p\\n"], env)
        walls.append(w)
    record("find -printf (walk floor)", min(walls), 0, f"{len(out.splitlines())} files")
    w, peak, out = run("read_header", [sys.executable, "-c", READ_HEADERS, str(lib)], env)
    count, inner = out.split()
    record("read_header loop (header floor)", w, peak,
           f"{int(count) / float(inner):.0f} files/s in process")
    for jobs in (["-j", "1"], []):
        label = "first scan" + (" -j 1 (one process)" if jobs else
                                f" (-j {default_workers()}, the default)")
        log(label)
        db.unlink(missing_ok=True)
        w, peak, out = run(label, cli("library", "scan", str(lib), "--db", str(db),
                                      "--json", "-q", *jobs), env)
        rep = json.loads(out)
        record(label, w, peak, f"{n / w:.0f} files/s ({n / rep['seconds']:.0f} in "
                               f"process), {rep['inspected']} read")
    rescans = []
    for _ in range(args.rounds):
        w, peak, out = run("re-scan", cli("library", "scan", str(lib), "--db", str(db),
                                          "--json", "-q"), env)
        rep = json.loads(out)
        rescans.append((w, peak, rep))
    best = min(rescans, key=lambda r: r[0])
    record("re-scan, nothing changed", best[0], max(r[1] for r in rescans),
           f"{best[2]['seconds']:.2f} s in process, {best[2]['inspected']} read; median "
           f"{statistics.median(r[0] for r in rescans):.2f} s")
    n_touched = touch(lib, TOUCHED)
    w, peak, out = run("partial", cli("library", "scan", str(lib), "--db", str(db),
                                      "--json", "-q"), env)
    rep = json.loads(out)
    record(f"re-scan, {n_touched} touched", w, peak,
           f"{rep['inspected']} read, {rep['seconds']:.2f} s in process")
    for label, cmd in (("list --json", cli("library", "list", "--db", str(db), "--json")),
                       ("check", cli("library", "check", "--db", str(db))),
                       ("dupes --no-hash", cli("library", "dupes", "--db", str(db),
                                               "--no-hash"))):
        w, peak, out = run(label, cmd, env)
        record(label, w, peak)
    log("TUI over the index")
    os.environ["MODELKIT_CACHE_DIR"] = env["MODELKIT_CACHE_DIR"]
    loaded, filtered, n_rows = tui_times(str(db))
    rows.append(["tui: start until the table is filled", f"{loaded:.2f}", "-",
                 f"{n_rows} rows"])
    rows.append(["tui: one filter change (table rebuilt)", f"{filtered:.2f}", "-", ""])
    print(f"modelkit library benchmark: {n} files (hard links of the 17-file demo "
          f"library), {args.dir}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; load before: "
          f"{load_before[0]}; after: {machine_load()[0]}")
    print(table("library scan and queries (fresh process each, wall s)",
                ["what", "wall s", "peak RssAnon MiB", "notes"], rows))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    shutil.rmtree(env["MODELKIT_CACHE_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
