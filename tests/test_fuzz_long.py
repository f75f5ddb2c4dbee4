"""A short, seeded slice of the long fuzz run (``bench/fuzz_long.py``,
issue 17): per target, a few mutated inputs through the console script's
function (one warm worker process, a fresh forked process per command) must
give no internal error, hang, crash, leftover or messy error line.

Every target is clean: the failures the first long run found (LoRA factors,
GGUF ``orig_shape`` values, pickle opcodes and storage sizes, library names
and header lengths) are fixed and each has its own regression test."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkit.fuzz.inputs import TARGETS, Command, TensorFile
from modelkit.fuzz.long import (
    ForkServer,
    Ran,
    Summary,
    classify,
    fuzz_target,
    snapshot,
)

# one command of each target that reads deep (the long run runs them all)
ONLY = {
    "safetensors": {"prune"},
    "lora": {"lora info"},
    "gguf": {"convert"},
    "pickle": {"convert"},
    "library": {"library scan"},
    "sweep": {"sweep --dry-run"},
}
CASES = 3


@pytest.fixture(scope="module")
def runner() -> Iterator[ForkServer]:
    r = ForkServer()
    r.start()
    yield r
    r.close()


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_short(runner: ForkServer, target: str, tmp_path: Path) -> None:
    summary = Summary(seed=0)
    fuzz_target(runner, target, tmp_path, None, summary, cases=CASES, only=ONLY[target],
                quick=True)
    counts = summary.counts[target]
    assert summary.cases[target] == CASES
    assert sum(counts.values()) >= CASES  # every case ran a command
    assert {f.signature: f.detail for f in summary.findings.values()} == {}


def test_mutations_are_deterministic_per_seed(tmp_path: Path) -> None:
    """The same run seed gives the same cases (so a reproducer's seeds can
    be replayed), and a different one other cases."""
    target = TARGETS["lora"]()
    seeds = {"lora": b"", "loha": b""}
    cases = [[target.new_case(random.Random(f"{s}:lora"), i, seeds) for i in range(3)]
             for s in (0, 0, 1)]
    assert [c.steps for c in cases[0]] == [c.steps for c in cases[1]]
    assert [c.steps for c in cases[0]] != [c.steps for c in cases[2]]
    tf = TensorFile({"a": "b"}, {"w": ["F16", [2], b"\0\0\0\0"]})
    target.apply(tf, [("values", 5), ("metadata", 7)])
    again = TensorFile({"a": "b"}, {"w": ["F16", [2], b"\0\0\0\0"]})
    target.apply(again, [("values", 5), ("metadata", 7)])
    assert tf.pack() == again.pack() and tf.pack() != TensorFile(
        {"a": "b"}, {"w": ["F16", [2], b"\0\0\0\0"]}).pack()


def test_classification(tmp_path: Path) -> None:
    """The outcome classes: the one-line error, a traceback, exit 3, a
    timeout, a signal, a temp file, an output after a failure, a changed input."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "m.safetensors").write_bytes(b"x")
    cmd = Command("prune", ("prune",))
    before = snapshot(tmp_path)

    def ran(rc: int, err: str = "", timed_out: bool = False) -> Ran:
        return Ran(rc, "", err, timed_out, False, 0.1)

    assert classify(cmd, ran(2, "modelkit: error: m.safetensors: bad\n"), before,
                    before) == ("ok", "")
    assert classify(cmd, ran(2, "modelkit: error: a\nmore\n"), before, before)[0] == "BADMSG"
    assert classify(cmd, ran(3, "modelkit: internal error: X"), before, before)[0] == "INTERNAL"
    tb = 'Traceback (most recent call last):\n  File "/x/modelkit/io/a.py", line 3, in f\nE: y\n'
    assert classify(cmd, ran(1, tb), before, before) == (
        "INTERNAL", "traceback: E: y [at io/a.py:3 in f]")
    assert classify(cmd, ran(0, timed_out=True), before, before)[0] == "HANG"
    assert classify(cmd, ran(-9), before, before) == ("CRASH", "killed by SIGKILL")
    (tmp_path / "out" / ".p.safetensors.x.partial").write_bytes(b"")
    assert classify(cmd, ran(0), before, snapshot(tmp_path)) == (
        "LEFTOVER", "temp file left: out/.p.safetensors.x.partial")
    (tmp_path / "out" / ".p.safetensors.x.partial").unlink()
    (tmp_path / "out" / "p.safetensors").write_bytes(b"")
    assert classify(cmd, ran(0), before, snapshot(tmp_path)) == ("ok", "")
    assert classify(cmd, ran(2, "modelkit: error: x\n"), before, snapshot(tmp_path)) == (
        "LEFTOVER", "output left after exit 2: out/p.safetensors")
    (tmp_path / "out" / "p.safetensors").unlink()
    (tmp_path / "in" / "m.safetensors").write_bytes(b"y")
    assert classify(cmd, ran(0), before, snapshot(tmp_path)) == (
        "LEFTOVER", "input changed: in/m.safetensors")
