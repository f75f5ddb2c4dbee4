"""``import modelkit``, the header/inspect path and ``modelkit --help`` stay
light: no torch, diffusers or textual."""

from __future__ import annotations

import re
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
                     "modelkit.arch.keys, modelkit.errors, modelkit.verify, "
                     "modelkit.sweep") == set()


def test_help_is_light() -> None:
    code = ("from modelkit.cli import main\n"
            "for args in (['--help'], ['inspect', '--help'], ['hash', '--help'],"
            " ['demo', '--help'], ['prune', '--help'], ['quantize', '--help'],"
            " ['export-gguf', '--help'], ['convert', '--help'], ['lora', '--help'],"
            " ['lora', 'bake', '--help'], ['library', '--help'],"
            " ['library', 'scan', '--help'], ['tui', '--help'],"
            " ['verify', '--help'], ['sweep', '--help']):\n"
            "    assert main(args) == 0")
    assert _imported(code) == set()


def test_inspect_of_safetensors_needs_no_torch(models: dict[str, Path]) -> None:
    code = f"from modelkit.cli import main\nassert main(['inspect', {str(models['sd1'])!r}]) == 0"
    assert _imported(code) == set()


def test_inspect_of_gguf_needs_no_torch(tmp_path: Path) -> None:
    """GGUF headers are read in pure Python: no torch, numpy or gguf package."""
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = string("general.architecture") + struct.pack("<I", 8) + string("sd1")
    info = string("w") + struct.pack("<IQIQ", 1, 4, 0, 0)
    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
    path = tmp_path / "tiny.gguf"
    path.write_bytes(body + b"\0" * (-len(body) % 32) + struct.pack("<4f", 1, 2, 3, 4))
    code = (f"from modelkit.cli import main\nassert main(['inspect', {str(path)!r}]) == 0\n"
            "import sys\nassert not {'numpy', 'gguf'} & set(sys.modules)")
    assert _imported(code) == set()


def test_library_scan_and_queries_need_no_torch_or_textual(model_library: dict[str, Path],
                                                          tmp_path: Path) -> None:
    root = model_library["root"] / "webui" / "models" / "Lora"
    code = ("from modelkit.cli import main\n"
            f"assert main(['library', 'scan', {str(root)!r}, '--db', "
            f"{str(tmp_path / 'i.sqlite')!r}, '-q', '-j', '1']) == 0\n"
            f"for cmd in ('list', 'check', 'dupes'):\n"
            f"    main(['library', cmd, '--db', {str(model_library['db'])!r}])\n"
            f"assert main(['library', 'lineage', 'merged-pruned', '--db', "
            f"{str(model_library['db'])!r}]) == 0")
    assert _imported(code) == set()


def test_library_never_imports_the_tui() -> None:
    library = Path(__file__).resolve().parent.parent / "modelkit" / "library"
    banned = re.compile(r"^\s*(from|import)\s+(textual|rich|torch|modelkit\.tui)\b", re.M)
    for path in library.glob("*.py"):
        assert not banned.search(path.read_text()), path
