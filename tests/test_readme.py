"""CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2, "the README has exactly two set-up commands"
    assert "modelkit demo" in blocks[0]
    assert "pytest" in blocks[1]
    assert all("torch==2.13.0" in b for b in blocks)
    assert blocks[1] in (ROOT / ".ci" / "run").read_text().splitlines()
