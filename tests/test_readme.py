"""CI runs exactly the README's test command; the set-up advice says what
pip really installs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = _blocks()
    assert len(blocks) == 2, "the README has exactly two set-up commands"
    assert "modelkit demo" in blocks[0]
    assert "pytest" in blocks[1]
    assert all("torch==2.13.0" in b for b in blocks)
    assert blocks[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_set_up_takes_torch_from_the_cpu_index_and_modelkit_from_the_checkout() -> None:
    for block in _blocks():
        installs = [c.strip() for c in block.split("&&") if " install " in c]
        # torch on its own, from PyTorch's CPU index (an --index-url would
        # apply to every package of the same pip call), then the checkout
        assert installs[0] == f".venv/bin/pip install torch==2.13.0 {CPU_INDEX}"
        assert installs[1].startswith(".venv/bin/pip install -e ")
        assert "torch" not in installs[1]


def test_ci_fails_on_a_cuda_build_of_torch() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_line = lines.index(_blocks()[1])
    check = [i for i, line in enumerate(lines) if "torch.version.cuda is None or sys.exit" in line]
    assert check and check[0] > test_line


def test_readme_says_what_pip_installs() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "pins the CPU build" not in text
    assert "the CUDA build, which brings several GB of `nvidia-*` wheels" in text
    # the PyPI name modelkit is another project's: no advice may send users there
    assert "The distribution is named `sd-modelkit`" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^name = "sd-modelkit"$', pyproject, re.M)
    assert re.search(r'^modelkit = "modelkit.cli:run"$', pyproject, re.M)
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "modelkit").rglob("*.py")]
    for path in sources:
        body = " ".join(path.read_text().split())
        assert "modelkit[" not in body, path
        advice = re.findall(r"(?<!never with `)pip install '?modelkit\b", body)
        assert not advice, path


def test_readme_and_docs_say_what_verify_needs_for_real_models() -> None:
    """Where the real CLIP tokenizer comes from, that it wins over the
    demo's synthetic one, and the time and memory to expect, as measured."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    section = readme[readme.index("### What `modelkit verify` needs for real models"):
                     readme.index("## Commands")]
    for needed in ("`--tokenizer DIR`", "`models/tokenizers/clip`", "Hugging Face cache",
                   "`.venv/bin/pip install --no-deps open-clip-torch`",
                   "A real tokenizer always wins over the synthetic one",
                   "exit 2", "`tokenizer.clip` check", "one at a time",
                   "`--preset smoke`", "bench/README.md", "per denoising step and per image"):
        assert needed in section, needed
    docs = " ".join((ROOT / "docs" / "verify.md").read_text().split())
    assert "**For real (full-size) models** verify needs the real CLIP tokenizer" in docs
    assert "`pip install --no-deps open-clip-torch`" in docs
    # the smoke preset's time per image says what was measured, and where
    assert "about 15 s per SD1.5 image on 2 cores (the default" not in docs
    assert "bench/README.md" in docs
