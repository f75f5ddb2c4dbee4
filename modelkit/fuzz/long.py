"""The long fuzz run's harness: run ``modelkit`` on hostile inputs
(:mod:`modelkit.fuzz.inputs`) and classify every command's outcome.

Each case is built in a fresh folder (``in/`` the inputs, ``out/`` the
outputs, and its own ``cache/``, ``home/`` and ``tmp/`` as
``MODELKIT_CACHE_DIR``, ``HOME`` and ``TMPDIR``); each command runs under a
time limit and an address-space limit, and is classified:

- ``ok``: exit 0 or 1 with no traceback, or exit 2 with one line
  ``modelkit: error: ...`` on stderr;
- ``INTERNAL``: exit 3 (or any other code), or a traceback;
- ``HANG``: no answer within the time limit;
- ``CRASH``: killed by a signal, or out of memory under the limit;
- ``LEFTOVER``: a ``.partial``/temp file, an output left after a failed
  run, a file written outside ``out/``, an input changed or removed, or a
  process left running;
- ``BADMSG``: exit 2 whose stderr is not the one-line error.

Two runners: :class:`ForkServer` (default) imports the console script's
function ``modelkit.cli:run`` and torch once in a child process, then forks a
fresh process per command (new session, limits, stdio to files, atexit
handlers run), so a command costs milliseconds instead of a torch import;
:class:`ConsoleRunner` starts the real ``modelkit`` script per command.

The first case of each distinct failure is minimized (mutation steps dropped
while the failure stays the same) and written, with its command line, to the
findings folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.fuzz.inputs import TARGETS, Case, Command, Target

OUTCOMES = ("ok", "INTERNAL", "HANG", "CRASH", "LEFTOVER", "BADMSG")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MEMORY = 4 << 30
TEMP_NAME = re.compile(r"\.partial$|\.tmp$|\.old$|-journal$|-wal$|-shm$")

WORKER = r"""
import atexit, importlib, json, os, resource, signal, sys, tempfile, time, traceback
from modelkit.cli import SUBCOMMANDS, run
for module, _, _ in SUBCOMMANDS.values():
    if "tui" not in module:
        importlib.import_module(module)
import torch  # noqa: F401  (imported once, before the forks)

def child(req):
    os.setsid()
    if req["mem"]:
        resource.setrlimit(resource.RLIMIT_AS, (req["mem"], req["mem"]))
    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    tempfile.tempdir = None
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.argv = ["modelkit", *req["args"]]
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code & 0xFF)

out = sys.stdout
out.write("ready\n")
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(97)
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > req["timeout"]:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002 if time.monotonic() - t0 < 0.5 else 0.02)
    stray = False
    try:
        os.killpg(pid, 0)
        stray = True
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                          "stray": stray and not timed_out,
                          "seconds": time.monotonic() - t0}) + "\n")
    out.flush()
"""


@dataclass
class Ran:
    """What one command did."""

    rc: int
    stdout: str
    stderr: str
    timed_out: bool
    stray: bool
    seconds: float


class ForkServer:
    """A child process that imports ``modelkit.cli`` and torch once and
    forks one process per command."""

    def __init__(self, memory: int = DEFAULT_MEMORY) -> None:
        self.memory = memory
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"fuzz worker did not start: {line!r}")

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float,
            stdout: Path, stderr: Path) -> Ran:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        req = {"args": args, "cwd": str(cwd), "env": env, "timeout": timeout,
               "mem": self.memory, "stdout": str(stdout), "stderr": str(stderr)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc = None
            raise RuntimeError("fuzz worker died")
        res = json.loads(line)
        return Ran(res["rc"], _read(stdout), _read(stderr), res["timed_out"], res["stray"],
                   res["seconds"])

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


def console_script() -> list[str]:
    """The ``modelkit`` console script beside this Python (or ``-m modelkit``)."""
    script = Path(sys.executable).with_name("modelkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


class ConsoleRunner:
    """The real ``modelkit`` console script, one process per command."""

    def __init__(self, memory: int = DEFAULT_MEMORY) -> None:
        self.memory = memory

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float,
            stdout: Path, stderr: Path) -> Ran:
        mem = self.memory

        def limit() -> None:
            if mem:
                resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

        t0 = time.monotonic()
        with open(stdout, "wb") as o, open(stderr, "wb") as e:
            proc = subprocess.Popen([*console_script(), *args], cwd=cwd,
                                    env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=o, stderr=e, preexec_fn=limit,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stray = False
        try:
            os.killpg(proc.pid, 0)
            stray = not timed_out
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return Ran(proc.returncode, _read(stdout), _read(stderr), timed_out, stray,
                   time.monotonic() - t0)


def _read(path: Path) -> str:
    try:
        return path.read_bytes()[:200_000].decode("utf-8", "backslashreplace")
    except OSError:
        return ""


# --- classification -----------------------------------------------------------------

Snapshot = dict[bytes, tuple[str, Any]]
SANDBOX = ("cache", "home", "tmp")


def snapshot(case_dir: Path) -> Snapshot:
    """Every entry under ``case_dir`` (bytes path) -> (type, fingerprint):
    content digests for files under ``in/``, sizes elsewhere; symlinks and
    FIFOs are never followed or opened."""
    root = os.fsencode(case_dir)
    out: Snapshot = {}
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, root)
            if rel.split(b"/")[0] == b"cache":
                continue
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            elif stat.S_ISREG(st.st_mode):
                if rel.startswith(b"in/"):
                    h = hashlib.sha1()
                    with open(p, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
                    out[rel] = ("file", h.hexdigest())
                else:
                    out[rel] = ("file", st.st_size)
            else:
                out[rel] = ("other", st.st_mode)
    return out


def leftovers(cmd: Command, rc: int, before: Snapshot, after: Snapshot) -> list[str]:
    """What the command left that it should not have."""
    found = []
    for rel, what in before.items():
        if rel.startswith(b"in/") and after.get(rel) != what:
            found.append(f"input {'removed' if rel not in after else 'changed'}: "
                         f"{os.fsdecode(rel)}")
    for rel in sorted(set(after) - set(before)):
        name = os.fsdecode(rel)
        top = rel.split(b"/")[0]
        if top != b"out":
            found.append(f"wrote outside out/: {name}")
        elif TEMP_NAME.search(name.rsplit("/", 1)[-1]):
            found.append(f"temp file left: {name}")
        elif rc not in cmd.outputs_ok:
            found.append(f"output left after exit {rc}: {name}")
    return found


def classify(cmd: Command, ran: Ran, before: Snapshot, after: Snapshot) -> tuple[str, str]:
    """(outcome, detail) of one command (see the module docstring)."""
    err = ran.stderr
    if ran.timed_out:
        return "HANG", f"no answer after {ran.seconds:.0f} s"
    if ran.rc < 0:
        return "CRASH", f"killed by {signal.Signals(-ran.rc).name}"
    if "MemoryError" in err or "can't allocate memory" in err or "Cannot allocate memory" in err:
        return "CRASH", "out of memory: " + _last_line(err)
    if "Traceback" in err:
        return "INTERNAL", f"traceback: {_error_where(err)}"
    if ran.rc not in (0, 1, 2):
        return "INTERNAL", f"exit {ran.rc}: {_error_where(err)}"
    left = leftovers(cmd, ran.rc, before, after)
    if ran.stray:
        left.append("process left running")
    if left:
        return "LEFTOVER", "; ".join(left[:5])
    if ran.rc == 2:
        lines = err.rstrip("\n").split("\n")
        if len(lines) != 1 or not lines[0].startswith("modelkit: error: "):
            return "BADMSG", f"exit 2 with {len(lines)} stderr lines: {err[:300]!r}"
    return "ok", ""


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().split("\n") if x.strip()]
    return lines[-1][:300] if lines else ""


def _error_where(err: str) -> str:
    """The exception and the innermost modelkit frame of a traceback, or the
    last line of stderr."""
    frames = re.findall(r'File "([^"]*)", line (\d+), in (\S+)', err)
    own = [f for f in frames if "/modelkit/" in f[0]] or frames
    last = _last_line(err)
    if own:
        path, line, func = own[-1]
        short = path.split("/modelkit/", 1)[-1] if "/modelkit/" in path else Path(path).name
        return f"{last} [at {short}:{line} in {func}]"
    return last


def signature(target: str, cmd: Command, outcome: str, detail: str) -> str:
    """A failure's identity for deduplication: names, numbers and quoted
    text blurred."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\d+|\S*/\S*", "_", detail.split(" [at ")[0])[:160]
    where = detail.split(" [at ", 1)[1].split(":")[0] if " [at " in detail else ""
    if outcome == "LEFTOVER":
        text = ";".join(sorted({x.split(":")[0] for x in detail.split("; ")}))
    return f"{target} | {cmd.name} | {outcome} | {where} {text}".strip()


# --- cases --------------------------------------------------------------------------


@dataclass
class Result:
    command: Command
    outcome: str
    detail: str
    ran: Ran


def case_env(case_dir: Path) -> dict[str, str]:
    for name in SANDBOX:
        (case_dir / name).mkdir(exist_ok=True)
    return {"MODELKIT_CACHE_DIR": str(case_dir / "cache"), "HOME": str(case_dir / "home"),
            "TMPDIR": str(case_dir / "tmp"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "COLUMNS": "100", "PYTHONHASHSEED": "0",
            # an internal error shows its traceback (exit 3 without it): the
            # innermost frame tells distinct failures apart
            "MODELKIT_DEBUG": "1"}


def fresh_dir(path: Path) -> Path:
    if os.path.lexists(path):
        for top, dirs, _files in os.walk(path):  # a mutant may have made folders read-only
            for d in dirs:
                p = os.path.join(top, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_case(runner: Any, target: Target, case: Case, seeds: dict[str, Any], case_dir: Path,
             steps: list[tuple[str, int]] | None = None, timeout: float = DEFAULT_TIMEOUT,
             stop_after: str | None = None, only: set[str] | None = None) -> list[Result]:
    """Build ``case`` (with ``steps``, default all) in the fresh ``case_dir``
    and run its commands (``only`` these, by name); one :class:`Result` per
    command run."""
    fresh_dir(case_dir)
    logs = fresh_dir(case_dir.parent / (case_dir.name + ".logs"))
    commands = target.build(case, case.steps if steps is None else steps, seeds, case_dir)
    env = case_env(case_dir)
    results: list[Result] = []
    done: list[tuple[int, str]] = []
    for i, cmd in enumerate(commands):
        if (cmd.gate is not None and not cmd.gate(done)) or (only and cmd.name not in only):
            continue
        before = snapshot(case_dir)
        ran = runner.run(list(cmd.args), case_dir, env, cmd.timeout or timeout,
                         logs / f"{i}.out", logs / f"{i}.err")
        after = snapshot(case_dir)
        outcome, detail = classify(cmd, ran, before, after)
        results.append(Result(cmd, outcome, detail, ran))
        done.append((ran.rc, ran.stdout))
        if stop_after is not None and cmd.name == stop_after:
            break
    return results


def minimize(runner: Any, target: Target, case: Case, seeds: dict[str, Any], case_dir: Path,
             sig: str, timeout: float, budget: int = 12) -> list[tuple[str, int]]:
    """The fewest of ``case``'s steps (dropping one at a time) that still
    give the failure ``sig``."""
    steps = list(case.steps)
    cmd_name = sig.split(" | ")[1]
    tries = 0
    changed = True
    while changed and len(steps) > 1 and tries < budget:
        changed = False
        for i in range(len(steps)):
            trial = steps[:i] + steps[i + 1:]
            tries += 1
            res = run_case(runner, target, case, seeds, case_dir, trial, timeout, cmd_name)
            if any(signature(target.name, r.command, r.outcome, r.detail) == sig for r in res):
                steps, changed = trial, True
                break
            if tries >= budget:
                break
    return steps


def write_reproducer(folder: Path, case_dir: Path, result: Result, case: Case,
                     steps: list[tuple[str, int]], sig: str, run_seed: int) -> None:
    """The minimized case's inputs (``in.tar.gz``, and single files as they
    are), its command line, output and description."""
    folder.mkdir(parents=True, exist_ok=True)
    inp = case_dir / "in"
    try:
        with tarfile.open(folder / "in.tar.gz", "w:gz") as tar:
            tar.add(inp, arcname="in")
    except (OSError, ValueError, tarfile.TarError) as exc:
        (folder / "in.tar.error").write_text(str(exc))
    for p in inp.iterdir():
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 20 << 20:
            shutil.copyfile(p, folder / p.name)
    cmd = "modelkit " + " ".join(shlex.quote(a) for a in result.command.args)
    (folder / "command.txt").write_text(
        "# in a folder holding in/ (tar xzf in.tar.gz) and an empty out/:\n"
        f"mkdir -p out && {cmd}\n"
        f"# exit {result.ran.rc}, {result.outcome}: {result.detail}\n")
    (folder / "stderr.txt").write_text(result.ran.stderr[:50_000])
    (folder / "stdout.txt").write_text(result.ran.stdout[:20_000])
    (folder / "case.json").write_text(json.dumps({
        "signature": sig, "target": case.target, "run_seed": run_seed, "case": case.index,
        "seed_file": case.seed_name, "steps": case.steps, "minimized_steps": steps,
        "described": case.describe(steps), "command": list(result.command.args),
        "exit": result.ran.rc, "outcome": result.outcome, "detail": result.detail}, indent=1))


# --- runs ---------------------------------------------------------------------------


@dataclass
class Finding:
    signature: str
    target: str
    command: str
    outcome: str
    detail: str
    count: int = 0
    reproducer: str = ""


@dataclass
class Summary:
    seed: int
    counts: dict[str, Counter[str]] = field(default_factory=dict)  # target -> outcome -> n
    cases: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    findings: dict[str, Finding] = field(default_factory=dict)

    def bad(self, target: str | None = None) -> int:
        return sum(n for t, c in self.counts.items() if target in (None, t)
                   for o, n in c.items() if o != "ok")

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "cases": dict(self.cases),
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
                "counts": {t: {o: c.get(o, 0) for o in OUTCOMES} for t, c in self.counts.items()},
                "findings": [vars(f) for f in self.findings.values()]}

    def markdown(self) -> str:
        lines = [f"# Long fuzz run, seed {self.seed}", "",
                 "Command runs per target and outcome:", "",
                 "| target | cases | seconds | " + " | ".join(OUTCOMES) + " |",
                 "|---" * (len(OUTCOMES) + 3) + "|"]
        for t, c in self.counts.items():
            lines.append(f"| {t} | {self.cases[t]} | {self.seconds[t]:.0f} | "
                         + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |")
        lines += ["", f"Distinct failures: {len(self.findings)}", ""]
        for f in sorted(self.findings.values(), key=lambda f: (f.target, f.outcome)):
            lines.append(f"- **{f.outcome}** `{f.target}` `{f.command}` x{f.count}: "
                         f"{f.detail[:300]}  \n  reproducer: `{f.reproducer}`")
        return "\n".join(lines) + "\n"


def fuzz_target(runner: Any, name: str, work: Path, findings: Path | None, summary: Summary,
                seconds: float | None = None, cases: int | None = None,
                timeout: float = DEFAULT_TIMEOUT, minimize_budget: int = 12,
                progress: Callable[[str], None] | None = None,
                only: set[str] | None = None, quick: bool = False) -> None:
    """Fuzz one target for ``seconds`` or ``cases`` (whichever ends first),
    running ``only`` the commands so named (default all); ``quick``: fewer
    seed files."""
    target = TARGETS[name]()
    target.quick = quick
    seeds = target.prepare(fresh_dir(work / f"seeds-{name}"))
    rng = random.Random(f"{summary.seed}:{name}")
    counts = summary.counts.setdefault(name, Counter())
    case_dir = work / "case"
    start = time.monotonic()
    i = 0
    while (cases is None or i < cases) and (seconds is None or
                                            time.monotonic() - start < seconds):
        case = target.new_case(rng, i, seeds)
        i += 1
        results = run_case(runner, target, case, seeds, case_dir, timeout=timeout, only=only)
        summary.cases[name] += 1
        for r in results:
            counts[r.outcome] += 1
            if r.outcome == "ok":
                continue
            sig = signature(name, r.command, r.outcome, r.detail)
            known = summary.findings.get(sig)
            if known is not None:
                known.count += 1
                continue
            f = summary.findings[sig] = Finding(sig, name, r.command.name, r.outcome,
                                                r.detail, 1)
            if progress:
                progress(f"  new {r.outcome} in {name} {r.command.name}: {r.detail[:200]}")
            if findings is not None:
                steps = minimize(runner, target, case, seeds, case_dir, sig, timeout,
                                 minimize_budget) if minimize_budget else case.steps
                res = run_case(runner, target, case, seeds, case_dir, steps, timeout)
                again = [x for x in res if signature(name, x.command, x.outcome, x.detail) == sig]
                if not again:  # flaky: keep the original
                    steps = case.steps
                    res = run_case(runner, target, case, seeds, case_dir, steps, timeout)
                    again = [x for x in res if signature(name, x.command, x.outcome,
                                                         x.detail) == sig] or [r]
                n = sum(g.target == name for g in summary.findings.values())
                slug = re.sub(r"[^a-z0-9]+", "-", f"{r.command.name}-{r.outcome}".lower())
                folder = findings / name / f"{n:03d}-{slug.strip('-')}"
                write_reproducer(folder, case_dir, again[0], case, steps, sig, summary.seed)
                f.reproducer = str(folder)
        if progress and i % 50 == 0:
            progress(f"  {name}: {i} cases, {sum(counts.values())} runs, "
                     f"{summary.bad(name)} not ok, {time.monotonic() - start:.0f} s")
    summary.seconds[name] += time.monotonic() - start
    fresh_dir(case_dir)


__all__ = ["OUTCOMES", "ConsoleRunner", "ForkServer", "Summary", "classify", "fuzz_target",
           "run_case"]
