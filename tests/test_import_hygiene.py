"""``import modelkit``, the header/inspect path and ``modelkit --help`` stay
light: no torch, diffusers or textual."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "diffusers", "textual", "transformers")


def _imported(code: str) -> set[str]:
    # the module list goes on the last line: help text above it may name diffusers
    probe = code + "\nimport sys\nprint('\\nMODULES', ' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    modules = out.rsplit("\nMODULES ", 1)[1]
    return set(modules.split()) & set(HEAVY)


def test_import_modelkit_is_light() -> None:
    assert _imported("import modelkit, modelkit.io.header, modelkit.inspect.report, "
                     "modelkit.arch.keys, modelkit.errors, modelkit.verify") == set()


def test_help_is_light() -> None:
    code = ("from modelkit.cli import main\n"
            "for args in (['--help'], ['inspect', '--help'], ['hash', '--help'],"
            " ['demo', '--help'], ['prune', '--help'], ['quantize', '--help'],"
            " ['export-gguf', '--help'], ['convert', '--help'], ['verify', '--help']):\n"
            "    assert main(args) == 0")
    assert _imported(code) == set()


def test_inspect_of_safetensors_needs_no_torch(models: dict[str, Path]) -> None:
    code = f"from modelkit.cli import main\nassert main(['inspect', {str(models['sd1'])!r}]) == 0"
    assert _imported(code) == set()
