"""The pieces of ``modelkit verify``: metrics, thresholds, settings, prompt
syntax and library lookup, the tokenizer search, reports, GGUF reading and
static checks that need no render."""

from __future__ import annotations

import gzip
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.core.verify_library import embedding_names_in, find_library, parse_prompt
from modelkit.core.verify_settings import (
    VerifySettings,
    load_prompts,
    parse_lora_arg,
    parse_seeds,
    parse_size,
    parse_threshold,
    resolve_plan,
)
from modelkit.core.verify_thresholds import Limit, limits_for
from modelkit.errors import ModelkitError, OutputError
from modelkit.verify import metrics
from modelkit.verify.report import Check, VerifyReport, json_safe, to_junit, to_markdown


def _naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM by explicit 11x11 windows (no separable filtering), per channel."""
    t = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-t * t / (2 * 1.5 * 1.5))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch], y[..., ch]
        vals = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * pa * pa).sum() - ma * ma
                vb = (w * pb * pb).sum() - mb * mb
                cov = (w * pa * pb).sum() - ma * mb
                vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                            / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_image_metrics() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((20, 18, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert metrics.psnr(a, a) == math.inf and metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.psnr(np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.1)) == pytest.approx(20.0)
    assert metrics.ssim(b, a) == pytest.approx(_naive_ssim(b, a), abs=1e-12)
    assert 0.5 < metrics.ssim(b, a) < 1.0
    assert metrics.max_abs(b, a) == pytest.approx(float(np.abs(b - a).max()))
    assert metrics.relative_l2(np.array([3.0, 4.0]), np.array([0.0, 0.0])) == math.inf
    assert metrics.relative_l2(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == 1.0
    mean, std = metrics.image_stats(np.dstack([np.full((2, 2), 0.5), np.eye(2), np.eye(2)]))
    assert (mean, std) == (pytest.approx(1.5 / 3), 0.0)
    assert not metrics.is_finite(np.array([1.0, np.nan]))


def test_limits_per_operation_and_overrides() -> None:
    fp16 = {lim.metric: lim for lim in limits_for("fp16")}
    assert fp16["psnr"].describe() == ">= 40 dB" and fp16["psnr"].judge(39.9) == "fail"
    assert fp16["ssim"].judge(0.99) == "pass" and fp16["ssim"].judge(float("nan")) == "fail"
    fp8 = {lim.metric: lim for lim in limits_for("fp8", {"psnr": 25.0})}
    assert fp8["psnr"] == Limit("psnr", 25.0, warn=30.0)  # warn stays: still stricter
    assert [fp8["psnr"].judge(v) for v in (24, 27, 31)] == ["fail", "warn", "pass"]
    assert limits_for("fp8", {"psnr": 35.0})[0] == Limit("psnr", 35.0)  # warn dropped
    assert limits_for("merge") == []  # merges are reported, not judged
    assert limits_for("merge", {"ssim": 0.5}) == [Limit("ssim", 0.5)]
    effect = {lim.metric: lim for lim in limits_for("lora_bake")}["lora_effect"]
    assert effect.judge(35.0) == "pass" and effect.judge(80.0) == "fail"
    assert limits_for("lossless")[0].describe() == "<= 1e-05"
    with pytest.raises(ModelkitError, match="unknown threshold 'speed'"):
        limits_for("fp16", {"speed": 1.0})


def test_settings_parsing(tmp_path: Path) -> None:
    assert parse_size("256x192") == (256, 192) and parse_size("128") == (128, 128)
    assert parse_seeds("1, 2,3") == (1, 2, 3) and parse_threshold("psnr=35") == ("psnr", 35.0)
    for bad, call in (("big", parse_size), ("1,x", parse_seeds), ("fast=1", parse_threshold)):
        with pytest.raises(ModelkitError):
            call(bad)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    assert parse_lora_arg(f"{lora}:0.8").weight == 0.8 and parse_lora_arg(str(lora)).weight == 1
    with pytest.raises(ModelkitError, match="no such file"):
        parse_lora_arg(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(ModelkitError, match="not a number"):
        parse_lora_arg(f"{lora}:strong")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nfirst prompt\n\nnegative: ugly, blurry\nsecond prompt\n")
    assert load_prompts(prompts) == (("first prompt", "second prompt"), "ugly, blurry")
    prompts.write_text("only one\n")
    with pytest.raises(ModelkitError, match="at least two prompts"):
        load_prompts(prompts)
    with pytest.raises(ModelkitError, match="multiples of 8"):
        VerifySettings(size=(100, 64)).validate()
    with pytest.raises(ModelkitError, match="unknown operation"):
        VerifySettings(operation="magic").validate()


def test_presets_resolve_per_model_size() -> None:
    s = VerifySettings()
    tiny = resolve_plan(s, tiny=True, default_resolution=512, device="cpu")
    assert (tiny.preset, tiny.width, tiny.steps, tiny.threads) == ("tiny", 64, 2, 1)
    assert tiny.seeds == (1, 2) and len(tiny.prompts) == 2 and tiny.negative_prompt
    real = resolve_plan(s, tiny=False, default_resolution=512, device="cpu")
    assert (real.preset, real.width, real.height, real.steps) == ("smoke", 256, 256, 4)
    std = resolve_plan(VerifySettings(preset="standard"), tiny=False,
                       default_resolution=1024, device="cpu")
    assert (std.width, std.steps) == (1024, 20)
    own = resolve_plan(VerifySettings(size=(128, 96), steps=3, threads=2), tiny=True,
                       default_resolution=512, device="cpu")
    assert (own.width, own.height, own.steps, own.threads) == (128, 96, 3, 2)


def test_recipe_verify_fields_are_declared_once_on_the_settings() -> None:
    """Issue 18: the fields a recipe's verify: section may set come from
    VerifySettings' own field metadata; a full section builds the settings."""
    from dataclasses import fields

    from modelkit.core.recipe import verify_fields
    from modelkit.core.verify_settings import RECIPE
    from modelkit.engine.verification import settings_from

    allowed = verify_fields()
    declared = {f.name for f in fields(VerifySettings) if RECIPE in f.metadata}
    assert set(allowed) == declared | {"reference"}
    assert not {"device", "work_dir", "allow_download"} & set(allowed)
    section = {"prompts": ["a", "b"], "negative_prompt": "n", "seeds": [3], "preset": "tiny",
               "steps": 2, "size": "64x72", "guidance_scale": 5, "scheduler": "ddim",
               "threads": 1, "operation": "merge", "thresholds": {"psnr": 30.0},
               "tokenizer": "tok", "library": "lib", "render": False}
    assert set(section) == declared
    s = settings_from(section, "cpu")
    assert (s.prompts, s.seeds, s.size, s.steps, s.guidance_scale) == (("a", "b"), (3,),
                                                                       (64, 72), 2, 5)
    assert (s.tokenizer, s.library, s.render, s.scheduler) == (Path("tok"), Path("lib"),
                                                               False, "ddim")
    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    assert all(f"`{name}`" in docs for name in declared), "docs/recipes.md lists the fields"


def test_prompt_syntax_and_library(tmp_path: Path) -> None:
    assert parse_prompt("a cat <lora:style:0.5>, <lyco:sub/detail>") == (
        "a cat", [parse_prompt("<lora:style:0.5>")[1][0], parse_prompt("<lora:sub/detail>")[1][0]])
    clean, tags = parse_prompt("<lora:style:0.5> a cat <lora:detail>")
    assert clean == "a cat" and [(t.name, t.weight) for t in tags] == [("style", 0.5),
                                                                        ("detail", 1.0)]
    with pytest.raises(ModelkitError, match="not a number"):
        parse_prompt("<lora:style:high>")
    root = tmp_path / "webui"
    model = root / "models" / "Stable-diffusion" / "sub" / "m.safetensors"
    model.parent.mkdir(parents=True)
    (root / "models" / "Lora" / "styles").mkdir(parents=True)
    (root / "models" / "Lora" / "styles" / "ink.safetensors").write_bytes(b"")
    (root / "embeddings").mkdir()
    (root / "embeddings" / "neg.pt").write_bytes(b"")
    lib = find_library(model)
    assert lib.root == root
    assert lib.find_lora("ink") == root / "models" / "Lora" / "styles" / "ink.safetensors"
    with pytest.raises(ModelkitError, match="no LoRA named 'nope'"):
        lib.find_lora("nope")
    names = lib.embeddings()
    assert list(names) == ["neg"]
    assert embedding_names_in(["neg, blurry"], names) == ["neg"]
    assert embedding_names_in(["negative space", "neg-ative"], names) == []
    assert find_library(tmp_path / "alone.safetensors").root is None
    with pytest.raises(ModelkitError, match="no such folder"):
        find_library(model, tmp_path / "nowhere")


def test_synthetic_and_bpe_tokenizers(tmp_path: Path) -> None:
    from modelkit.verify import tokenizer as tk

    alphabet = tk.byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet.index("a") + 256 == 320  # CLIP's "a</w>"
    syn = tk.synthetic_tokenizer()
    assert len(syn) == 514 and tk.is_synthetic(syn) and not tk.is_placeholder(syn)
    ids = syn("a cat").input_ids
    assert ids == [512, 320, 66, 64, 339, 513]  # start, "a</w>", c, a, "t</w>", end
    bpe = tmp_path / tk.BPE_FILE
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nc a\nca t</w>\n")
    tok = tk.tokenizer_from_bpe(bpe)
    assert len(tok) == 512 + 2 + 2  # bytes, word-end bytes, 2 merges, start and end
    assert tok("a cat").input_ids == [514, 320, 513, 515]  # "cat</w>" is merge 2
    assert tok.convert_ids_to_tokens([512, 513]) == ["ca", "cat</w>"]
    sd2 = tk.pipeline_tokenizers(syn, "sd2", ["tokenizer"])["tokenizer"]
    assert sd2.pad_token == "!" and syn.pad_token == tk.EOS and sd2 is not syn
    src = tk.TokenizerSource("path", tmp_path, "test")
    assert tk.tokenizer_check(syn, src, tiny=True, text_vocab=49408).verdict == "pass"
    assert tk.tokenizer_check(syn, src, tiny=False, text_vocab=49408).verdict == "fail"
    assert tk.tokenizer_check(syn, src, tiny=True, text_vocab=300).verdict == "fail"


def test_tokenizer_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tokenizer, then the library, the Hugging Face cache, an open-clip
    wheel's BPE file, else a one-line error saying how to provide one."""
    import huggingface_hub.constants as hf_constants

    from modelkit.core.verify_library import Library
    from modelkit.verify import tokenizer as tk

    cache = tmp_path / "hub"
    snap = cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text("{}")
    (cache / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
    (cache / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    wheel = tmp_path / "site" / "open_clip"
    wheel.mkdir(parents=True)
    (wheel / "__init__.py").write_text("raise ImportError('never imported')\n")
    (wheel / tk.BPE_FILE).write_bytes(gzip.compress(b"#version\n"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    lib_dir = tmp_path / "lib" / "models" / "tokenizers" / "clip"
    lib_dir.mkdir(parents=True)
    (lib_dir / "tokenizer.json").write_text("{}")
    lib = Library(tmp_path / "lib", tokenizer_dirs=[lib_dir])
    assert tk.find_tokenizer(lib, explicit=snap).kind == "path"
    assert tk.find_tokenizer(lib).description == "model library: models/tokenizers/clip"
    hit = tk.find_tokenizer(Library(None))
    assert (hit.kind, hit.location) == ("hf_cache", snap)
    (snap / "tokenizer.json").unlink()
    hit = tk.find_tokenizer(Library(None))
    assert (hit.kind, hit.location) == ("open_clip", wheel / tk.BPE_FILE)
    monkeypatch.setattr(tk, "open_clip_bpe", lambda: None)
    with pytest.raises(ModelkitError) as err:
        tk.find_tokenizer(Library(None))
    msg = str(err.value)
    assert "\n" not in msg and "--tokenizer" in msg and "open-clip-torch" in msg
    with pytest.raises(ModelkitError, match="not a tokenizer folder"):
        tk.find_tokenizer(Library(None), explicit=tmp_path)


def test_report_renderings() -> None:
    rep = VerifyReport(model="m.safetensors", timings={"static": 0.5})
    rep.add(Check("static.nan_inf", "pass", "", 0))
    rep.add(Check("compare.psnr", "fail", "fp16: psnr out of bounds", 31.5, ">= 40 dB",
                  case="p1-s1"))
    rep.add(Check("compare.psnr", "pass", "", math.inf, ">= 40 dB", case="p2-s1"))
    rep.add(Check("render", "skip", "static checks failed"))
    assert rep.verdict == "fail" and rep.exit_code == 1
    assert rep.summary() == "FAIL: 2 passed, 0 warnings, 1 failed, 1 skipped (compare.psnr)"
    d = rep.to_dict()
    assert d["checks"][2]["value"] == "inf" and json_safe(float("nan")) == "nan"
    root = ET.fromstring(to_junit(rep))
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "1", "1")
    names = [c.get("name") for c in root.iter("testcase")]
    assert names == ["static.nan_inf", "compare.psnr[p1-s1]", "compare.psnr[p2-s1]", "render"]
    assert "| compare.psnr | p1-s1 | 31.5 | >= 40 dB | FAIL |" in to_markdown(rep)


def test_outputs_refuse_existing_and_need_renders(tmp_path: Path) -> None:
    from modelkit.verify import outputs

    taken = tmp_path / "r.json"
    taken.write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        outputs.check_outputs([taken], overwrite=False)
    outputs.check_outputs([taken, None], overwrite=True)
    rep = VerifyReport(model="m.safetensors")
    with pytest.raises(ModelkitError, match="no renders"):
        outputs.write_grid(rep, tmp_path / "grid.png")
    outputs.write_json(rep, taken, overwrite=True)
    assert '"verdict": "pass"' in taken.read_text()
    assert outputs.diff_gain(np.zeros((4, 4))) == outputs.DIFF_GAIN
    assert outputs.diff_gain(np.full((4, 4), 0.9)) == 1.0  # a merge: no saturation
    assert outputs.diff_gain(np.full((4, 4), 1e-4)) == outputs.MAX_GAIN


def test_gguf_reads_back_at_source_shapes(models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.arch.configs import UNET_PREFIX
    from modelkit.engine.api import export_gguf
    from modelkit.io.gguf import open_gguf
    from modelkit.io.reader import open_model

    out = tmp_path / "unet.gguf"
    export_gguf(models["sd1"], out)
    gguf = open_gguf(out)
    assert gguf.metadata["general.architecture"] == "sd1"
    with open_model(models["sd1"]) as src:
        unet = {k[len(UNET_PREFIX):]: k for k in src.infos if k.startswith(UNET_PREFIX)}
        assert set(gguf.infos) == set(unet)
        assert all(i.shape == src.infos[unet[k]].shape for k, i in gguf.infos.items())
        for key in list(gguf.infos)[::12]:  # values: a sample of every kind of tensor
            orig = src.get(unet[key]).float()
            got = gguf.get(key).float()
            bound = orig.abs().max() / 127 + 1e-3  # q8_0: half a step of the block max
            assert (got - orig).abs().max() <= bound, key


def test_static_only_checks_dtypes_and_float_position_ids(models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from modelkit.verify import verify

    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    weight = "first_stage_model.decoder.conv_out.bias"
    sd = load_file(str(models["sd1"]))
    sd[key] = torch.arange(77, dtype=torch.float32).reshape(1, 77)  # exact: fine
    sd[weight] = sd[weight].to(torch.int32)
    out = tmp_path / "odd.safetensors"
    save_file(sd, str(out))
    report = verify(out, VerifySettings(render=False))
    verdicts = {c.name: c for c in report.checks}
    assert verdicts["static.position_ids"].verdict == "pass"
    assert "stored as float" in verdicts["static.position_ids"].message
    assert verdicts["static.dtypes"].verdict == "fail" and weight in \
        verdicts["static.dtypes"].message
    assert report.checks[-1].name == "render" and report.checks[-1].verdict == "skip"


def test_progress_and_cancel(models: dict[str, Path]) -> None:
    import threading

    from modelkit.errors import Cancelled
    from modelkit.progress import Progress
    from modelkit.verify import verify

    seen: list[Progress] = []
    report = verify(models["sd1"], VerifySettings(render=False), progress=seen.append)
    assert report.passed and report.plan is None  # static only: nothing rendered
    scan = [p for p in seen if p.step == "NaN/Inf scan"]
    assert scan and scan[-1].done == scan[-1].total and scan[-1].unit == "bytes"
    assert {p.phase for p in scan} == {"verify"} and scan[-1].label == "verify NaN/Inf scan"
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        verify(models["sd1"], VerifySettings(render=False), cancel=stop)


def test_markdown_escapes_prompts_and_names() -> None:
    from modelkit.verify.report import ImageMetrics

    rep = VerifyReport(model="m\x1b]0;x\x07.safetensors")
    rep.images.append(ImageMetrics("p1-s1", 0, "a cat | x\n| forged | row |\x1b[2J", 1,
                                   0.0, 0.1, psnr=40.0))
    md = to_markdown(rep)
    assert "\x1b" not in md and md.startswith("# modelkit verify: m\\x1b]0;x\\x07.safetensors")
    row = next(line for line in md.splitlines() if line.startswith("| p1-s1 |"))
    assert row.endswith("| a cat \\| x\\n\\| forged \\| row \\|\\x1b[2J |")
    assert not any(line.startswith("| forged") for line in md.splitlines())
