"""The long fuzz run (issue 17): hostile safetensors files, LoRA adapters,
GGUF files, ``.ckpt`` pickles, library folders and sweep files through the
``modelkit`` command line, every outcome classified.

Run::

    nice -n 10 .venv/bin/python bench/fuzz_long.py --minutes 30 \\
        --seed 0 --target all --out /tmp/fuzz-findings

Per target, cases are seeded mutations of valid tiny files
(modelkit.fuzz.inputs); each case's commands run in a fresh folder
under a time limit (``--timeout``) and an address-space limit (``--mem-gb``)
and are classified ok / INTERNAL / HANG / CRASH / LEFTOVER / BADMSG
(modelkit.fuzz.long). ``--minutes`` is shared equally among the
targets (``--cases`` caps the cases per target instead or as well).

Writes ``summary.md`` and ``summary.json`` (command runs per target and
outcome, the distinct failures) and, per distinct failure, a folder with the
minimized reproducer (``in.tar.gz`` and the mutated files), ``command.txt``,
stderr and the case's seeds. Exit status 1 when any command was not ok.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelkit.fuzz.inputs import TARGETS  # noqa: E402
from modelkit.fuzz.long import (  # noqa: E402
    DEFAULT_TIMEOUT,
    ConsoleRunner,
    ForkServer,
    Summary,
    fuzz_target,
)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None,
                        help="total time, shared equally among the targets")
    parser.add_argument("--cases", type=int, default=None, help="cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="all",
                        help=f"all, or a comma list of: {', '.join(TARGETS)}")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"),
                        help="findings folder (summary and reproducers)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds per command before it counts as a HANG")
    parser.add_argument("--mem-gb", type=float, default=4.0,
                        help="address-space limit per command (0: none)")
    parser.add_argument("--console", action="store_true",
                        help="start the real console script per command (slow: a torch "
                             "import each) instead of forking a warm worker")
    parser.add_argument("--minimize", type=int, default=12,
                        help="re-runs allowed to minimize each distinct failure (0: none)")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else args.target.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; choose all or {', '.join(TARGETS)}")
    if args.minutes is None and args.cases is None:
        args.minutes = 5.0
    per_target = None if args.minutes is None else 60 * args.minutes / len(names)
    memory = int(args.mem_gb * (1 << 30))
    runner = ConsoleRunner(memory) if args.console else ForkServer(memory)
    summary = Summary(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runner.start()
    try:
        with tempfile.TemporaryDirectory(prefix="modelkit-fuzz-long-") as tmp:
            for name in names:
                _say(f"{name}: {per_target or 0:.0f} s, {args.cases or '-'} cases")
                fuzz_target(runner, name, Path(tmp), args.out, summary, seconds=per_target,
                            cases=args.cases, timeout=args.timeout,
                            minimize_budget=args.minimize, progress=_say)
                (args.out / "summary.md").write_text(summary.markdown())
                (args.out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    finally:
        runner.close()
    print(summary.markdown())
    print(f"({time.monotonic() - start:.0f} s; findings in {args.out})")
    return 1 if summary.bad() else 0


if __name__ == "__main__":
    sys.exit(main())
