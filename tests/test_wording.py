"""Issue 17: wording of messages, tables and progress lines (one helper for
counts and articles, no mid-word cuts, no escaped layout in usage errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import run_all as _run_all
from cli_support import run_here

from modelkit.wording import (
    a,
    agree,
    article,
    fit_words,
    noun,
    plural,
    plural_of,
    with_article,
    wrap_words,
)


def test_plural_and_noun() -> None:
    assert [plural(n, "tensor") for n in (0, 1, 2)] == ["0 tensors", "1 tensor", "2 tensors"]
    assert plural(1, "hint") == "1 hint" and plural(2, "hint") == "2 hints"
    assert plural(3, "entry") == "3 entries" and plural(2, "key") == "2 keys"
    assert plural(2, "match") == "2 matches" and plural(2, "index") == "2 indexes"
    assert plural(2, "cell", "cells!") == "2 cells!"
    assert noun(1, "file") == "file" and noun(5, "file") == "files"
    assert plural_of("bias") == "biases" and plural_of("EMA weights") == "EMA weights"
    assert plural(12, "schedule buffer") == "12 schedule buffers"
    assert agree(1, "key", "matches", "match") == "1 key matches"
    assert agree(3, "key", "matches", "match") == "3 keys match"


@pytest.mark.parametrize(("word", "want"), [
    ("sdxl", "an"), ("sd1", "an"), ("sd2", "an"), ("sdxl_refiner", "an"), ("adapter", "an"),
    ("embedding", "an"), ("fp16", "an"), ("int8", "an"), ("8-bit", "an"), ("unet", "a"),
    ("lora", "a"), ("checkpoint", "a"), ("vae", "a"), ("bf16", "a"), ("gguf", "a"),
    ("text_encoder", "a"), ("unknown", "an"), ("hour", "a"), ("MSE", "an"), ("18", "an"),
    ("1", "a"), ("", "a"),
])
def test_article(word: str, want: str) -> None:
    assert article(word) == want


def test_a() -> None:
    assert a("sdxl") == "an sdxl" and with_article("lora") == "a lora"


def test_fit_words_cuts_at_a_word_boundary() -> None:
    text = "tensors 686, missing 0, wrong_shape 0"
    assert fit_words(text, 100) == text
    assert fit_words(text, 16) == "tensors 686..."
    assert len(fit_words(text, 16)) <= 16
    assert fit_words("abcdefghijklmnop", 8) == "abcde..."
    assert fit_words("abc", 2) == ".."


def test_wrap_words() -> None:
    assert wrap_words("tensors 686, missing 0, wrong_shape 0", 16) == [
        "tensors 686,", "missing 0,", "wrong_shape 0"]
    assert wrap_words("", 5) == [""]
    assert wrap_words("abcdefgh", 3) == ["abc", "def", "gh"]






@pytest.fixture(scope="module")
def cli_out(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[int, str, str]]:
    """Every CLI case of this file: the ones that need no torch through the
    real console script, the others (message checks) in this process."""
    from modelkit.testing.lora import write_lora

    root = tmp_path_factory.mktemp("wording")
    (root / "out").mkdir()
    lora = root / "style.safetensors"
    write_lora(lora, "sd1", seed=3)
    sd1, sd1_b = str(models["sd1"]), str(models["sd1_b"])
    light = _run_all({
        "quantize": ["quantize", sd1, "-o", "q.safetensors"],
        "presets": ["presets"],
        "presets_help": ["presets", "--help"],
        "merge_help": ["merge", "--help"],
    }, root)
    heavy = run_here({
        "merge_lora": ["merge", sd1, str(lora), "-o", "m.safetensors", "--alpha", "0.5", "-q"],
        "verify": ["verify", sd1, "--static-only", "-q"],
        "blocks_3": ["merge", sd1, sd1_b, "-o", "b.safetensors", "--blocks", "1,2,3",
                     "--dry-run", "-q"],
        "blocks_in": ["merge", sd1, sd1_b, "-o", "b.safetensors", "--blocks", "in_only",
                      "--dry-run", "-q"],
        "prune": ["prune", sd1, "-o", str(root / "out" / "p.safetensors")],
        "bake_arch": ["lora", "bake", str(models["sdxl"]), str(lora), "-o", "x.safetensors",
                      "-q"],
        "resize_ckpt": ["lora", "resize", sd1, "--rank", "2", "-o", "x.safetensors", "-q"],
    }, root)
    assert not list(root.glob("*.safetensors.*")) and not list(root.glob("[mqb].safetensors"))
    return {**light, **heavy}


def test_a_missing_choice_option_lists_its_choices_on_one_line(
        cli_out: dict[str, tuple[int, str, str]]) -> None:
    """Item 6: no literal ``\\n\\t`` from click's layout of the choices."""
    code, out, err = cli_out["quantize"]
    assert code == 2 and out == ""
    assert err == ("modelkit: error: Missing option '--dtype'. Choose from: fp16, bf16, fp32, "
                   "fp8_e4m3fn, fp8_e5m2, int8 (see 'modelkit quantize --help')\n")


def test_a_lora_as_merge_input_names_the_registrys_bake_op(
        cli_out: dict[str, tuple[int, str, str]]) -> None:
    """Item 4: the op's name comes from the registry ("lora_bake", not "bake")."""
    from modelkit.core.registry import ADAPTER, CHECKPOINT, ops_taking

    assert ops_taking(CHECKPOINT, ADAPTER) == ["lora_bake"]
    code, _, err = cli_out["merge_lora"]
    assert code == 2 and err.count("\n") == 1
    assert "style.safetensors is a lora, not a checkpoint" in err
    assert "'modelkit lora bake' or an 'op: lora_bake' step" in err and "'op: bake'" not in err


def test_verify_table_wraps_values_at_word_boundaries(
        cli_out: dict[str, tuple[int, str, str]]) -> None:
    """Item 11: no value cut mid-word (it showed ``tensors 686, mis``)."""
    code, out, _ = cli_out["verify"]
    assert code == 0
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.lstrip().startswith("static.keys.unet"))
    assert "tensors 686, missing 0, wrong_shape 0," in lines[row]
    assert lines[row].rstrip().endswith("PASS") and lines[row + 1].strip() == "unexpected 0"
    assert not [line for line in lines if line.rstrip().endswith(", mis")]


def test_block_counts_tell_one_story(cli_out: dict[str, tuple[int, str, str]]) -> None:
    """Item 9: 26 (SD1/SD2) and 20 (SDXL) weights, as A1111/SuperMerger count
    them, plus modelkit's optional VAE entry, in the error, the dry run,
    ``modelkit presets`` and its help, ``merge --help``, the README and docs."""
    import re

    from modelkit.arch.blocks import count_text, weights_title

    assert count_text("sd1") == ("26 weights (BASE, IN00..IN11, M00, OUT00..OUT11; "
                                 "27 with the optional VAE entry last)")
    assert count_text("sdxl", vae_slot=False) == "20 weights (BASE, IN00..IN08, M00, OUT00..OUT08)"
    assert weights_title({"BASE": 0, "M00": 1, "VAE": 0}) == "2 blocks + the VAE entry"
    code, _, err = cli_out["blocks_3"]
    assert code == 2 and err == ("modelkit: error: command line: steps.merge.params.alpha: "
                                 f"block list for sd1 has 3 values; expected {count_text('sd1')}\n")
    code, out, _ = cli_out["blocks_in"]
    assert code == 0 and "block weights of merge.alpha (26 blocks + the VAE entry):" in out
    code, out, _ = cli_out["presets"]
    assert code == 0 and out.splitlines()[:2] == [f"sd1: {count_text('sd1')}",
                                                  f"sdxl: {count_text('sdxl')}"]
    help_text = " ".join(cli_out["presets_help"][1].split())
    assert "(26 weights: BASE, IN00..IN11, M00, OUT00..OUT11)" in help_text
    assert "optional VAE entry last (27 or 21 values)" in help_text
    assert "(27/21 with the optional VAE entry last)" in " ".join(cli_out["merge_help"][1].split())
    root = Path(__file__).resolve().parents[1]
    docs = " ".join((root / "README.md").read_text().split()) + " ".join(
        " ".join((p.read_text()).split()) for p in (root / "docs").glob("*.md"))
    docs = re.sub(r"\s*#\s*", " ", docs)  # YAML comments in docs/recipes.md
    assert "27 or 21 with modelkit's optional VAE entry last" in docs
    assert "27/21 with the optional VAE entry last" in docs
    assert not re.search(r"\b(27|21) (blocks|values)\b(?! with| values\))", docs)


# --- item 5: progress lines ----------------------------------------------------------


def test_progress_lines_say_what_they_count() -> None:
    """The percentage is the line's own done/total; the run's share is
    labelled ``overall`` (the issue's contradictory lines, fixed)."""
    from modelkit.progress import HASH, READ, VERIFY, WRITE, Progress

    cases = [
        (Progress("x.safetensors", 622200, 622200, "bytes", None, HASH, 0.056),
         "hash x.safetensors: 100.0% 622.2 KB/622.2 KB, overall 6%"),
        (Progress("extract", 264, 264, "tensors", None, READ, 0.5),
         "read extract: 100.0% 264/264 tensors, overall 50%"),
        (Progress("lora_extract", 256, 447000, "bytes", None, WRITE, 0.98),
         "write lora_extract: 0.1% 256 B/447.0 KB, overall 98%"),
        (Progress("sweep", 4, 6, "cells", None, VERIFY, 0.8),
         "verify sweep: 66.7% 4/6 cells, overall 80%"),
        (Progress("compare", 5, 10, "bytes", "k", "compare"), "compare: 50.0% 5 B/10 B"),
        (Progress("NaN/Inf scan", 0, 0, "bytes", None, VERIFY),
         "verify NaN/Inf scan: 100.0% 0 B/0 B"),
        (Progress("merge", 10, 10, "bytes", "k", WRITE, 0.998), "write merge: 100.0% 10 B/10 B"),
    ]
    for p, want in cases:
        assert p.describe() == want and str(p) == want


def _no_repeated_word(label: str) -> bool:
    import re

    words = re.findall(r"[\w-]+", label.lower())
    return len(words) == len(set(words))


def test_a_runs_progress_lines_agree_with_their_counts(models: dict[str, Path],
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event of a real extraction run (plan, read, hash, write) and of
    a static verify: the shown percentage is done/total, labels never say a
    word twice, and the CLI's line is the event's own line."""
    import io
    import re

    from modelkit.cli.progress import StderrProgress
    from modelkit.core.recipe import Recipe
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.engine.runner import run
    from modelkit.progress import Progress
    from modelkit.verify import verify

    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(tmp_path / "cache"))  # inputs get hashed
    seen: list[Progress] = []
    run(Recipe.op("lora_extract", models["sd1"], models["sd1_b"],
                  output=tmp_path / "l.safetensors", rank=2), progress=seen.append)
    verify(models["sd1"], VerifySettings(render=False), progress=seen.append)
    assert {p.phase for p in seen} >= {"plan", "read", "hash", "write", "verify"}
    for p in seen:
        line = p.describe()
        pct = float(re.search(r": ([\d.]+)% ", line).group(1))  # type: ignore[union-attr]
        want = 100 * p.done / p.total if p.total else 100.0
        assert abs(pct - want) < 0.051, line
        assert _no_repeated_word(p.label), line
        assert "verify:" not in line and "write verify" not in line
    last_read = [p for p in seen if p.phase == "read"][-1]
    assert last_read.describe() == "read extract: 100.0% 264/264 tensors, overall 50%"
    log = io.StringIO()
    bar = StderrProgress(stream=log, min_seconds=0)
    for p in seen:
        bar(p)
    lines = log.getvalue().splitlines()
    tail = r"( [\d.]+ [KMG]?B/s)? \d+s( ETA \S+)?"
    assert lines and all(re.fullmatch(re.escape(p) + tail, line)
                         for p, line in zip(_logged(seen, lines), lines, strict=True))


def _logged(seen: list[object], lines: list[str]) -> list[str]:
    """The event line each logged line starts with."""
    out = []
    texts = {str(p) for p in seen}
    for line in lines:
        out.append(max((t for t in texts if line.startswith(t + " ")), key=len))
    return out


def test_the_readme_library_example_prints_a_few_useful_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The Python API example of the README (it once printed 1,140 event
    reprs): one line per step as it ends."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "from modelkit import Recipe, run" in b)
    assert "progress=print" not in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert lines[-1] == "1130 sd1"
    assert lines[-2].startswith("write prune: 100.0% ") and "overall" not in lines[-2]
    assert all(re.match(r"(hash|write) \S+: 100\.0% ", line) for line in lines[:-1]), lines


# --- item 11: grammar, sizes, the grid's font, "reported" ------------------------------


def test_messages_take_the_right_article(cli_out: dict[str, tuple[int, str, str]]) -> None:
    """``an sd1 adapter``, ``an sdxl checkpoint``, ``not an adapter``."""
    code, _, err = cli_out["bake_arch"]
    assert code == 2 and "style.safetensors: is an sd1 adapter but sdxl.safetensors is an " \
        "sdxl checkpoint" in err
    code, _, err = cli_out["resize_ckpt"]
    assert code == 2 and "sd1.safetensors: is a checkpoint, not an adapter" in err


def test_prune_says_which_size_is_which(cli_out: dict[str, tuple[int, str, str]]) -> None:
    """The file written (header and metadata included) and the tensor data
    were two unlabelled sizes (21.03 MB and 20.88 MB for one output)."""
    import re

    code, out, _ = cli_out["prune"]
    lines = out.splitlines()
    assert code == 0
    assert re.fullmatch(r"wrote \S+p\.safetensors \(safetensors\): 1131 tensors, "
                        r"[\d.]+ MB on disk in [\d.]+s", lines[0]), lines[0]
    assert re.fullmatch(r"kept 1131 tensors; dropped 12 \(12 schedule buffers\), 48\.00 KB; "
                        r"tensor data [\d.]+ MB -> [\d.]+ MB", lines[1]), lines[1]
    on_disk = float(lines[0].split(", ")[1].split()[0])
    data = float(lines[1].split("-> ")[1].split()[0])
    assert data < on_disk < data + 0.5


def test_grid_labels_keep_their_spaces() -> None:
    """The grid's font draws a space wide enough to see ("cliffatsunset",
    "PSNR9.3 dB" with the default font's 2 px spaces), and a cut label ends
    at a word with an ellipsis."""
    from PIL import Image, ImageDraw

    from modelkit.verify.outputs import fit_text, label_font

    font = label_font()
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    assert draw.textlength(" ", font=font) >= 3
    assert draw.textlength("cliff at sunset", font=font) - \
        draw.textlength("cliffatsunset", font=font) >= 6
    text = "cliff at sunset  seed 1  PSNR 9.3 dB"
    width = int(draw.textlength("cliff at suns", font=font))
    cut = fit_text(text, width, font, draw)
    assert cut == "cliff at..." and draw.textlength(cut, font=font) <= width
    assert fit_text(text, 10_000, font, draw) == text
    assert fit_text("abcdefghijklmnopqrstuvwxyz", 40, font, draw).endswith("...")


def test_a_comparison_no_threshold_judged_is_reported_not_passed() -> None:
    """A merge's metrics are reported, not judged: the outcome says so in
    the verify summary, the sweep table and the contact sheet's colour."""
    from modelkit.sweep import results
    from modelkit.verify.report import Check, VerifyReport

    rep = VerifyReport(model="m.safetensors")
    rep.add(Check("static.nan_inf", "pass", "", 0))
    rep.add(Check("compare.psnr", "info", "", 10.2, case="p1-s1"))
    rep.add(Check("compare.ssim", "info", "", 0.31, case="p1-s1"))
    assert rep.verdict == "pass" and rep.passed and rep.outcome == "reported"
    assert rep.summary() == "REPORTED: 1 passed, 0 warnings, 0 failed, 0 skipped, 2 reported"
    assert rep.to_dict()["verdict"] == "pass"
    judged = VerifyReport(model="m.safetensors")
    judged.add(Check("compare.psnr", "pass", "", 45.0, ">= 40 dB", case="p1-s1"))
    assert judged.outcome == "pass" and judged.summary().startswith("PASS: 1 passed, 0 warnings")
    record = {"status": "ok", "timings": {"total": 1.5},
              "verify": {"verdict": "pass", "outcome": "reported",
                         "metrics": {"psnr": 10.2, "ssim": 0.31, "latent": 0.9}}}
    assert results.row([], 0, {}, record)["verdict"] == "reported"
    assert results._status_line(record) == ("REPORTED  1.5 s", results.TEXT)
    old = {**record, "verify": {"verdict": "pass", "metrics": {}}}  # a record from before
    assert results._status_line(old) == ("PASS  1.5 s", results.PASS_COLOUR)
