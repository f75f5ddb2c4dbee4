"""Interrupt ``modelkit merge`` at random moments and check what is left.

Each round starts ``modelkit merge A B -o OUT --alpha 0.5 -q`` on two
full-size SD1.5 files (bench_merge.py's, generated when missing), waits a
random time between 0 and the measured length of a whole run, sends SIGINT,
SIGTERM or SIGHUP (sometimes a second signal 3 ms later) and checks:

* no ``.partial`` temp file is left beside the output;
* stderr is at most one line and never a traceback;
* the exit code is 130 (interrupted) or 0 (the run had finished);
* the message is honest: "no output was written" means there is no output,
  "that file is complete" means the output exists and its header is valid.

Run::

    .venv/bin/python bench/bench_signals.py [--rounds 40] [--dir /dev/shm/modelkit-bench]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_io import DEFAULT_DIR, child_env, log  # noqa: E402

from modelkit.io.header import read_header  # noqa: E402

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


def _inputs(d: Path) -> tuple[Path, Path]:
    from modelkit import testing

    paths = (d / "full-sd15-fp16.safetensors", d / "full-sd15-fp16-seed1.safetensors")
    for seed, p in enumerate(paths):
        if not p.exists():
            log(f"generating {p.name} ...")
            testing.write_checkpoint(p, "sd1", tiny=False, dtype="F16", seed=seed)
    return paths


def _command(a: Path, b: Path, out: Path) -> list[str]:
    script = Path(sys.executable).with_name("modelkit")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]
    return [*base, "merge", str(a), str(b), "-o", str(out), "--alpha", "0.5", "-q"]


def _one(cmd: list[str], out: Path, delay: float, sigs: list[int]) -> tuple[int, str]:
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    for i, sig in enumerate(sigs):
        if proc.poll() is None:
            proc.send_signal(sig)
        if i + 1 < len(sigs):
            time.sleep(0.003)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _problems(code: int, err: str, out: Path) -> list[str]:
    found = []
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.*.partial")]
    if leftovers:
        found.append(f"temp files left: {leftovers}")
    if "Traceback" in err or err.count("\n") > 1:
        found.append(f"stderr not one line: {err[-300:]!r}")
    if code not in (0, 130):
        found.append(f"exit code {code}: {err.strip()[-200:]}")
    if code == 130 and "no output was written" in err and out.exists():
        found.append("said no output was written, but the output exists")
    if (code == 0 or "that file is complete" in err) and out.exists():
        try:
            read_header(out)
        except Exception as exc:
            found.append(f"output unreadable: {exc}")
    if code == 0 and not out.exists():
        found.append("exit 0 without an output")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    a, b = _inputs(args.dir)
    out = args.dir / "signals-out.safetensors"
    cmd = _command(a, b, out)
    log("timing one whole run ...")
    start = time.perf_counter()
    subprocess.run([*cmd, "--overwrite"], env=child_env(), check=True,
                   stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - start
    rng = random.Random(args.seed)
    tally = {"interrupted": 0, "finished": 0, "problems": 0}
    findings = []
    for i in range(args.rounds):
        name = rng.choice(list(SIGNALS))
        double = rng.random() < 0.3
        delay = rng.uniform(0, whole * 1.05)
        sigs = [SIGNALS[name]] * (2 if double else 1)
        code, err = _one(cmd, out, delay, sigs)
        found = _problems(code, err, out)
        tally["interrupted" if code == 130 else "finished"] += 1
        if found:
            tally["problems"] += 1
            findings.append(f"round {i}: {name}{' x2' if double else ''} at {delay:.2f} s: "
                            + "; ".join(found))
        log(f"round {i + 1}/{args.rounds}: {name}{' x2' if double else ''} at {delay:.2f} s "
            f"-> exit {code}{' PROBLEM' if found else ''}")
    out.unlink(missing_ok=True)
    print(f"modelkit signal bench: {args.rounds} rounds of merge (a whole run took "
          f"{whole:.1f} s), load average {os.getloadavg()[0]:.2f}")
    print(f"interrupted (exit 130): {tally['interrupted']}, finished before the signal "
          f"(exit 0): {tally['finished']}, rounds with a problem: {tally['problems']}")
    for f in findings:
        print(f"- {f}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
