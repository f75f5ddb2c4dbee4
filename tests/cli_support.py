"""Running the ``modelkit`` command line from tests, as a user would: the
real console script (one process per case, all at once) or the console
script's own function, ``modelkit.cli:run``, in one child process for
commands that load torch (torch is imported once for all the cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

Result = tuple[int, str, str]  # exit code, stdout, stderr


def console() -> list[str]:
    """The installed ``modelkit`` console script beside this interpreter."""
    script = Path(sys.executable).with_name("modelkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkit"]


def run_all(cases: dict[str, list[str]], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> dict[str, Result]:
    """Each case through the real console script, concurrently."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    procs = {name: subprocess.Popen([*console(), *args], cwd=cwd, env=full, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    errors="backslashreplace")
             for name, args in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        out[name] = (proc.returncode, stdout, stderr)
    return out


CHILD = """
import contextlib, io, json, sys
from modelkit.cli import run

results = {}
for name, args in json.loads(sys.argv[1]).items():
    sys.argv = ["modelkit", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    results[name] = [code, out.getvalue(), err.getvalue()]
sys.__stdout__.write(json.dumps(results))
"""


def run_entry(cases: dict[str, list[str]], cwd: Path, *, no_warnings: bool = False
              ) -> dict[str, Result]:
    """Each case through ``modelkit.cli:run`` (what the console script calls,
    ``sys.exit`` included), one after another in one child process.
    ``no_warnings``: nothing else may reach the child's own stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if no_warnings:
        assert "Warning" not in proc.stderr, proc.stderr
    return {k: (v[0], v[1], v[2]) for k, v in json.loads(proc.stdout).items()}


def run_here(cases: dict[str, list[str]], cwd: Path) -> dict[str, Result]:
    """What :func:`run_entry` does, in this process (no child, no second
    torch import): for checks of a command's messages and files; the
    console script's exit codes themselves are tested through the child
    (tests/test_cli_exit_codes.py holds a case of each family's refusals).
    It calls ``modelkit.cli.main``, which restores the signal handlers:
    ``run`` leaves SIGTERM ignored for its exit, which spawned processes of
    later tests would inherit."""
    import contextlib
    import io

    from modelkit.cli import main

    results: dict[str, Result] = {}
    here = Path.cwd()
    try:
        os.chdir(cwd)
        for name, args in cases.items():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
            results[name] = (code, out.getvalue(), err.getvalue())
    finally:
        os.chdir(here)
    return results


def ok(*args: object) -> None:
    """Run ``modelkit ARGS -q`` in process and assert it exits 0."""
    from modelkit.cli import main

    assert main([str(a) for a in args] + ["-q"]) == 0, args


def cli(capsys: Any, *args: str) -> Result:
    """Run ``modelkit ARGS`` in process: (exit code, stdout, stderr)."""
    from modelkit.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err
