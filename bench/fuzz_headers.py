"""Long header-fuzzing run: mutated safetensors headers through ``inspect``,
``inspect --json`` and ``prune`` (in-process, through ``modelkit.cli.main``).

Run::

    .venv/bin/python bench/fuzz_headers.py [--cases 20000] [--seed 0]

Each case mutates one of six small real files (modelkit.fuzz: JSON
edits, numbers, nesting, Unicode, duplicates, truncation, the length field,
odd but legal shapes and dtypes) and checks that every command either works
or exits 1/2 with one line naming the file: no internal error, traceback,
terminal escape in inspect's text, hang, leftover file, and nothing inspect
accepts that the safetensors library or modelkit's reader cannot read.

Prints tried / clean / defective, how many files inspect accepted and prune
wrote, the defects found (one example per kind), and the files the
safetensors library reads but modelkit refuses (where the format's rules are
stricter than the library: duplicate keys, unknown entry fields, a header
not starting with '{'), by reason. The CI version is
tests/test_hardening_fuzz.py. Exit status 1 when a defect was found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelkit.fuzz import FuzzStats, run_fuzz  # noqa: E402


def _progress(start: float) -> object:
    def report(stats: FuzzStats) -> None:
        print(f"  {stats.tried} tried, {stats.n_defective} defective, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune-every", type=int, default=1,
                        help="run prune on every Nth case (default every case)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stats = run_fuzz(args.cases, seed=args.seed, prune_every=args.prune_every,
                     progress=_progress(start))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    print(f"header fuzzing, seed {args.seed}: {stats.tried} tried, {stats.clean} clean, "
          f"{stats.n_defective} defective ({seconds:.0f} s, "
          f"{1000 * seconds / max(stats.tried, 1):.1f} ms per case)")
    print(f"  inspect accepted {stats.inspect_accepted}, prune wrote {stats.prune_wrote}")
    print(f"defects ({len(stats.defects)} kinds):")
    for example in stats.defects.values():
        print(f"  - {example[:300]}")
    if not stats.defects:
        print("  none")
    print(f"refused by modelkit, read by the safetensors library "
          f"({sum(stats.stricter.values())} files):")
    for reason, n in stats.stricter.most_common():
        print(f"  {n:6d}  {reason}")
    return 1 if stats.defects else 0


if __name__ == "__main__":
    sys.exit(main())
