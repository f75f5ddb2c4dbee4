"""``modelkit verify`` end to end on seeded tiny models: passes on a good
checkpoint, fails (exit 1, naming the check) on broken ones, and checks
fp16/int8/GGUF outputs and a LoRA bake against their oracles (a bake made by
hand, against the same LoRA applied at render time by diffusers).

Asserts on renders use latents or exact equality: with random tiny weights,
pixel metrics mostly reflect the VAE. Renders are 64x64, 1 seed, 1 step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.cli import main
from modelkit.io.reader import open_model
from modelkit.verify import LoraUse, VerifyReport, VerifySession, VerifySettings, verify

SD1_TE = "cond_stage_model.transformer.text_model."
FAST = ("--seeds", "1", "--steps", "1", "-q")


def fast_settings(**kw: object) -> VerifySettings:
    return VerifySettings(seeds=(1,), steps=1, **kw)  # type: ignore[arg-type]


def edited(src: Path, out: Path, replace: dict[str, torch.Tensor] | None = None,
           drop: tuple[str, ...] = (), zero_prefix: str | None = None) -> Path:
    """A copy of ``src`` with some tensors replaced, dropped or zeroed."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    for key in drop:
        del sd[key]
    for key, t in (replace or {}).items():
        sd[key] = t
    if zero_prefix:
        sd = {k: torch.zeros_like(v) if k.startswith(zero_prefix) and v.is_floating_point()
              else v for k, v in sd.items()}
    save_file(sd, str(out))
    return out


@pytest.fixture(scope="session")
def lib(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, Path]:
    """An A1111-style library: a good tiny SD1 checkpoint, its fp32 source,
    fp16/int8/GGUF outputs, broken variants, a LoRA, an embedding and the
    synthetic tokenizer in models/tokenizers/clip."""
    from conftest import keep_lora_modules, run_chain

    from modelkit import testing as t
    from modelkit.engine.api import export_gguf
    from modelkit.testing.lora import write_lora
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    root = tmp_path_factory.mktemp("verify-lib")
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    (root / "models" / "Lora").mkdir()
    (root / "embeddings").mkdir()
    write_synthetic_tokenizer(root / "models" / "tokenizers" / "clip")
    p = {"root": root}
    p["good"] = ckpts / "good.safetensors"
    os.link(models["sd1"], p["good"])  # the shared tiny SD1 (seed 1, fp16)
    p["sdxl"] = ckpts / "tiny-sdxl.safetensors"
    os.link(models["sdxl"], p["sdxl"])
    p["source"] = ckpts / "source-fp32.safetensors"
    t.write_checkpoint(p["source"], "sd1", seed=1, dtype="F32")
    p["fp16"] = ckpts / "out-fp16.safetensors"
    run_chain([p["source"]], [("quantize", {"dtype": "fp16"})], p["fp16"])
    p["int8"] = ckpts / "out-int8.safetensors"
    run_chain([p["source"]], [("quantize", {"dtype": "int8"})], p["int8"])
    p["gguf"] = ckpts / "out-unet.gguf"
    export_gguf(p["source"], p["gguf"])
    p["lora"] = root / "models" / "Lora" / "style.safetensors"
    write_lora(p["lora"], "sd1", kind="lora", seed=10)
    keep_lora_modules(p["lora"])
    p["emb"] = root / "embeddings" / "neg.safetensors"
    t.write_embedding(p["emb"], "sd1", tiny=True, seed=15, name="neg")
    nan = torch.full((32, 32), float("nan"))
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 40:] += 0.5  # the known merge bug: ids drift off the integers
    broken = {
        "nan": {"replace": {SD1_TE + "encoder.layers.3.self_attn.q_proj.weight": nan}},
        "missing_te": {"drop": (SD1_TE + "encoder.layers.5.mlp.fc1.weight",)},
        "position_ids": {"replace": {SD1_TE + "embeddings.position_ids": ids}},
        # the final norm's scale and bias (1-D: not a zeroed weight for
        # static.zeroed): every prompt embeds to zeros
        "zero_te": {"zero_prefix": SD1_TE + "final_layer_norm."},
    }
    for name, change in broken.items():
        p[name] = edited(p["good"], ckpts / f"broken-{name}.safetensors", **change)
    return p


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["verify", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_checkpoint_passes_offline_with_every_output(
        capsys: pytest.CaptureFixture[str], lib: dict[str, Path], tmp_path: Path) -> None:
    """No tokenizer argument: it comes from the library above the model. The
    tiny SDXL encoders have different widths (32/64), so diffusers' loader
    fills text_encoder_2 from the bigG weights: nothing is left on meta."""
    o = {n: tmp_path / n for n in ("r.json", "r.md", "grid.png", "r.xml", "imgs")}
    code, out, err = run_cli(capsys, str(lib["sdxl"]), *FAST, "--report", str(o["r.json"]),
                             "--markdown", str(o["r.md"]), "--grid", str(o["grid.png"]),
                             "--junit", str(o["r.xml"]), "--images", str(o["imgs"]))
    assert code == 0, out + err
    assert out.splitlines()[-6].startswith("PASS: ")  # then the five files written
    d = json.loads(o["r.json"].read_text())
    assert d["schema"] == "modelkit.verify/1" and d["verdict"] == "pass" and d["arch"] == "sdxl"
    verdicts = {c["name"]: c["verdict"] for c in d["checks"]}
    for name in ("static.architecture", "static.keys.te1", "static.keys.te2",
                 "static.nan_inf", "static.position_ids", "tokenizer.clip",
                 "load.meta_params", "render.finite", "render.not_black", "render.not_flat",
                 "render.prompt_sensitivity", "render.deterministic"):
        assert verdicts[name] == "pass", name
    meta = next(c for c in d["checks"] if c["name"] == "load.meta_params")
    assert meta["value"] == 0 and "StableDiffusionXLPipeline" in meta["message"]
    assert d["tokenizer"]["source"] == "library" and d["tiny_model"] is True
    plan = d["settings"]
    assert (plan["preset"], plan["width"], plan["steps"], plan["threads"]) == ("tiny", 64, 1, 1)
    assert plan["seeds"] == [1] and len(plan["prompts"]) == 2 and plan["negative_prompt"]
    assert len(d["images"]) == 2 and d["hashes"]["model"]["file"] == "tiny-sdxl.safetensors"
    assert {"torch", "diffusers", "transformers"} <= set(d["versions"])
    assert str(tmp_path) not in o["r.json"].read_text()  # file names only
    suite = ET.parse(o["r.xml"]).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests", 0)) == len(d["checks"])
    assert "| render.prompt_sensitivity |  |" in o["r.md"].read_text()
    from PIL import Image

    grid = Image.open(o["grid.png"])
    assert grid.size[1] > 2 * 192  # 2 rows (2 prompts x 1 seed) of 192-px cells
    pngs = sorted(p.name for p in o["imgs"].glob("*.png"))
    assert pngs == ["tiny-sdxl-p1-s1.png", "tiny-sdxl-p2-s1.png"]
    text = Image.open(o["imgs"] / "tiny-sdxl-p1-s1.png").text
    assert text["seed"] == "1" and text["model"] == "tiny-sdxl.safetensors"
    assert text["prompt"] == plan["prompts"][0]
    assert "Steps: 1, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x64" in \
        text["parameters"]
    # outputs are never overwritten without --overwrite (refused before any work)
    code, _, err = run_cli(capsys, str(lib["good"]), *FAST, "--report", str(o["r.json"]))
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(("name", "check", "words"), [
    ("nan", "static.nan_inf", "1024 NaN/Inf values in 1 tensors"),
    ("missing_te", "static.keys.te", "1 missing: " + SD1_TE + "encoder.layers.5.mlp.fc1"),
    ("position_ids", "static.position_ids", "not 0..76"),
])
def test_broken_files_fail_statically(capsys: pytest.CaptureFixture[str], lib: dict[str, Path],
                                      name: str, check: str, words: str) -> None:
    code, out, _ = run_cli(capsys, str(lib[name]), *FAST)
    assert code == 1
    assert out.splitlines()[-1].startswith("FAIL: ") and f"({check})" in out.splitlines()[-1]
    row = next(line for line in out.splitlines() if line.strip().startswith(check))
    assert "FAIL" in row and words in row
    assert "static checks failed" in out  # a broken file is not rendered


def test_wrong_architecture_is_bad_input(capsys: pytest.CaptureFixture[str],
                                        lib: dict[str, Path], tmp_path: Path) -> None:
    """A reference of another architecture, or a file whose architecture is
    unknown, is bad input: one line, exit 2, no report written (the library
    call still returns the report with the failed check)."""
    md = tmp_path / "r.md"
    code, out, err = run_cli(capsys, str(lib["sdxl"]), "--reference", str(lib["good"]),
                             "--markdown", str(md), *FAST)
    assert code == 2 and out == "" and not md.exists()
    assert err == ("modelkit: error: tiny-sdxl.safetensors is sdxl, the reference "
                   "good.safetensors is sd1; give a reference of the same architecture\n")
    from modelkit import testing as t

    odd = tmp_path / "odd.safetensors"
    t.write_tensors(odd, {"model.diffusion_model.foo.weight": (4, 4),
                          "first_stage_model.decoder.x.weight": (2, 2)})
    code, out, err = run_cli(capsys, str(odd), "--static-only")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "odd.safetensors: architecture 'unknown' is not one verify knows" in err
    report = verify(odd, fast_settings(render=False))
    assert [c.name for c in report.failed] == ["static.architecture"]


def test_zeroed_text_encoder_fails_prompt_sensitivity(lib: dict[str, Path]) -> None:
    report = verify(lib["zero_te"], fast_settings())
    failed = {c.name: c for c in report.failed}
    assert set(failed) == {"render.prompt_sensitivity"}
    assert failed["render.prompt_sensitivity"].value == 0.0
    assert report.exit_code == 1


def test_missing_text_encoder_key_is_left_on_meta(lib: dict[str, Path], tmp_path: Path) -> None:
    """Past the static check, diffusers loads such a file silently with the
    parameter on the meta device: the load check names it."""
    from modelkit.convert.diffusers import write_diffusers_configs
    from modelkit.core.verify_settings import resolve_plan
    from modelkit.verify.render import load_pipeline, tokenizer_slots
    from modelkit.verify.tokenizer import pipeline_tokenizers, synthetic_tokenizer

    with open_model(lib["good"]) as src:  # the missing key would stop the config writer
        config = write_diffusers_configs(src, tmp_path / "config")
    plan = resolve_plan(VerifySettings(), tiny=True, default_resolution=512, device="cpu")
    toks = pipeline_tokenizers(synthetic_tokenizer(), "sd1", tokenizer_slots(config))
    loaded = load_pipeline(lib["missing_te"], "broken", config, toks, plan)
    [param] = loaded.meta_params  # "text_model." is gone in transformers >= 5.6
    assert param.startswith("text_encoder.")
    assert param.endswith("encoder.layers.5.mlp.fc1.weight")


def test_placeholder_tokenizer_fails(capsys: pytest.CaptureFixture[str], lib: dict[str, Path],
                                    tmp_path: Path) -> None:
    """A folder without tokenizer files loads as transformers' silent
    2-token placeholder; saved, it looks like a tokenizer folder."""
    from transformers import CLIPTokenizer

    (tmp_path / "empty").mkdir()
    CLIPTokenizer.from_pretrained(str(tmp_path / "empty")).save_pretrained(
        str(tmp_path / "placeholder"))
    code, out, _ = run_cli(capsys, str(lib["good"]), "--tokenizer",
                           str(tmp_path / "placeholder"), *FAST)
    assert code == 1 and "(tokenizer.clip)" in out
    assert "placeholder tokenizer (2 tokens" in out and "tokenizer check failed" in out


def _bake(base: Path, lora: Path, weight: float, out: Path) -> Path:
    """Bake a kohya LoRA by hand, independently of diffusers and of modelkit's
    own bake: ``W += weight * alpha / rank * up @ down`` in float32 on every
    module's checkpoint key."""
    from safetensors.torch import load_file

    from modelkit.arch.configs import TINY
    from modelkit.arch.lora_names import lora_module_map

    targets = lora_module_map(TINY["sd1"])
    base_sd, lora_sd = load_file(str(base)), load_file(str(lora))
    baked = {}
    for key in (k for k in lora_sd if k.endswith(".lora_down.weight")):
        module = key.removesuffix(".lora_down.weight")
        down = lora_sd[key].float().flatten(1)
        up = lora_sd[module + ".lora_up.weight"].float().flatten(1)
        scale = float(lora_sd[module + ".alpha"]) / down.shape[0]
        target = targets[module]
        w = base_sd[target].float()
        baked[target] = w + weight * scale * (up @ down).reshape(w.shape)
    return edited(base, out, replace=baked)


@pytest.fixture(scope="session")
def bake(lib: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A LoRA bake (written outside the library) verified against its runtime
    oracle, with the library's negative embedding in the prompts."""
    baked = _bake(lib["good"], lib["lora"], 0.7,
                  tmp_path_factory.mktemp("bake") / "baked.safetensors")
    settings = fast_settings(prompts=("a red fox", "a lighthouse"),
                             negative_prompt="neg, blurry")
    report = verify(baked, settings, reference=lib["good"], loras=[LoraUse(lib["lora"], 0.7)])
    return {"file": baked, "report": report}


def test_lora_bake_matches_runtime_oracle(bake: dict[str, object],
                                          lib: dict[str, Path]) -> None:
    report = bake["report"]
    assert isinstance(report, VerifyReport)
    assert report.operation == "lora_bake"
    assert report.passed, report.summary()
    assert report.renders is not None and report.renders.base is not None
    assert "embeddings used: neg" in report.notes  # library found from the reference
    for row in report.images:
        assert row.latent is not None and row.latent < 1e-4  # bake == oracle
        assert row.lora_effect is not None and row.lora_effect < 60  # the LoRA did something
    # the base itself is not a bake of anything: caught before any render
    unbaked = verify(lib["good"], fast_settings(), reference=lib["good"],
                     loras=[LoraUse(lib["lora"], 0.7)])
    assert [c.name for c in unbaked.failed] == ["static.change"]
    assert "the LoRA was not applied" in unbaked.failed[0].message


def test_prompt_lora_tag_and_embedding_from_library(bake: dict[str, object],
                                                    lib: dict[str, Path]) -> None:
    """``<lora:style:0.7>`` in a prompt renders exactly as the oracle's
    ``--lora style:0.7``; ``neg`` in the negative prompt is the library's
    embedding (embeddings/neg.safetensors)."""
    oracle = bake["report"]
    assert isinstance(oracle, VerifyReport) and oracle.renders is not None
    assert oracle.renders.reference is not None
    prompts = ("a red fox <lora:style:0.7>", "a lighthouse <lora:style:0.7>")
    tagged = verify(lib["good"], fast_settings(prompts=prompts, negative_prompt="neg, blurry"))
    assert tagged.passed, tagged.summary()
    assert "embeddings used: neg" in tagged.notes
    assert tagged.renders is not None
    for a, b in zip(tagged.renders.candidate, oracle.renders.reference, strict=True):
        assert np.array_equal(a.latents, b.latents)


def test_fp16_int8_and_gguf_against_their_source(lib: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """int8 and GGUF are dequantized for the render; the source is rendered
    once for all three (a session)."""
    from PIL import Image

    from modelkit.verify import outputs

    session = VerifySession()
    latents = {}
    for name, op in (("fp16", "fp16"), ("int8", "int8"), ("gguf", "int8")):
        report = verify(lib[name], fast_settings(), reference=lib["source"], session=session)
        assert report.passed, (name, report.summary())
        assert report.operation == op, (name, report.operation_reason)
        psnr = [c for c in report.checks if c.name == "compare.psnr"]
        assert [c.case for c in psnr] == ["p1-s1", "p2-s1"]
        assert all(c.verdict == "pass" and c.threshold for c in psnr)
        latents[name] = max(r.latent for r in report.images if r.latent is not None)
        if name == "fp16":
            assert psnr[0].threshold == ">= 40 dB"
            assert report.change is not None and report.change["a"] == "source-fp32.safetensors"
            grid = Image.open(outputs.write_grid(report, tmp_path / "grid.png"))
            assert grid.size[0] >= 3 * 192  # reference | candidate | difference
            pngs = outputs.write_images(report, tmp_path / "imgs")
            assert sorted(p.name for p in pngs) == [
                "out-fp16-p1-s1.png", "out-fp16-p2-s1.png", "reference-p1-s1.png",
                "reference-p2-s1.png"]
            assert Image.open(pngs[-1]).text["model"] == "source-fp32.safetensors"
    assert len(session.renders) == 1
    assert 0 < latents["fp16"] < 0.01  # fp16 rounding, not more
    assert latents["fp16"] < latents["int8"] < 0.05 and latents["fp16"] < latents["gguf"] < 0.05
    # the same file against itself is a lossless rewrite: nothing changed
    same = verify(lib["source"], fast_settings(render=False), reference=lib["source"])
    assert same.operation == "lossless" and same.passed
    assert next(c for c in same.checks if c.name == "static.change").verdict == "pass"


def test_console_script_exit_codes(lib: dict[str, Path], tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("modelkit")
    bad = subprocess.run([str(exe), "verify", str(lib["lora"]), "-q"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr  # a LoRA is bad input
    assert bad.stderr == ("modelkit: error: style.safetensors is a lora, not a checkpoint; "
                          "verify renders SD1, SD2 and SDXL checkpoints (a LoRA: its base with "
                          "--lora); a transformer of SD3, Flux.1, Chroma, Flux.2, Qwen-Image, "
                          "Wan or Z-Image is checked block by block against its reference with "
                          "--reference REF --probe\n")
    missing = subprocess.run([str(exe), "verify", str(tmp_path / "none.safetensors")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1 and "no such file" in missing.stderr
