"""verify --probe: the streamed functional probe (block math against the
libraries' own modules, the faults it catches per block, the CLI's exit
codes, reports and plot). The Qwen-Image block is checked against
diffusers' own block by ``bench/bench_probe.py --check-math`` (importing
diffusers or transformers alone costs more than this file's time budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelkit.arch import probes
from modelkit.arch.registry import REGISTRY
from modelkit.io.open import open_source
from modelkit.io.source import DerivedSource
from modelkit.testing import (
    flux_config,
    write_checkpoint,
    write_sparse_checkpoint,
    write_tensors,
)
from modelkit.verify.probe import plan_blocks, probe
from modelkit.verify.probe_blocks import BLOCKS, Weights, make_inputs
from tests.cli_support import run_entry

FAULT_KEY = "double_blocks.1.img_attn.proj.weight"  # a square weight


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny all-in-one Flux.1 dev in F32 (the reference) and its BF16 cast."""
    from modelkit.arch import flux

    d = tmp_path_factory.mktemp("probe")
    keys = flux.all_in_one_keys(flux_config("dev"), tiny=True)
    # q/k norm scales near 1, as trained ones are (the synthetic default for
    # a 1-D tensor, 0.02, flattens the attention and would hide a q/k swap)
    gen = torch.Generator().manual_seed(0)
    scales = {k: 1 + 0.05 * torch.randn(s, generator=gen) for k, s in keys.items()
              if k.endswith(".scale")}
    for name, dtype, cast in (("ref", "F32", torch.float32), ("bf16", "BF16", torch.bfloat16)):
        write_tensors(d / f"{name}.safetensors", keys, dtype=dtype,
                      overrides={k: v.to(cast) for k, v in scales.items()})
    return d / "ref.safetensors", d / "bf16.safetensors"


def _fault(t: torch.Tensor, fault: str) -> torch.Tensor:
    return {"zero": lambda: torch.zeros_like(t), "nan": lambda: torch.full_like(t, torch.nan),
            "transpose": lambda: t.T.contiguous(), "scale2": lambda: t * 2,
            "qk_swap": lambda: torch.cat([t.chunk(3)[i] for i in (1, 0, 2)])}[fault]()


def _faulty_source(ref: Path, key: str, fault: str) -> DerivedSource:
    """The reference with ``fault`` in ``key`` (``drop``: without it), read lazily."""
    src = open_source(ref)
    full = "model.diffusion_model." + key
    infos = {k: i for k, i in src.infos.items() if not (fault == "drop" and k == full)}
    return DerivedSource("faulty", infos, {}, lambda k: _fault(src.get(k), fault)
                         if k == full else src.get(k))


def _faulty(ref: Path, out: Path, key: str, fault: str) -> Path:
    src = _faulty_source(ref, key, fault)
    keys = {k: tuple(i.shape) for k, i in src.infos.items()}
    write_tensors(out, keys, dtype="F32", overrides={k: src.get(k) for k in keys})
    return out


def test_open_clip_layer_math_matches_torch_multihead_attention(tmp_path: Path) -> None:
    # open_clip's ResidualAttentionBlock is nn.MultiheadAttention (fused
    # in_proj) with pre-norms and a GELU MLP: rebuilt from torch's modules
    width, heads, n = 32, 4, 7
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
    ln1, ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
    fc, proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
    sd = {**{f"attn.{k}": v for k, v in attn.state_dict().items()},
          **{f"ln_1.{k}": v.normal_() for k, v in ln1.state_dict().items()},
          **{f"ln_2.{k}": v.normal_() for k, v in ln2.state_dict().items()},
          **{f"mlp.c_fc.{k}": v for k, v in fc.state_dict().items()},
          **{f"mlp.c_proj.{k}": v for k, v in proj.state_dict().items()}}
    write_tensors(tmp_path / "o.safetensors", {k: tuple(v.shape) for k, v in sd.items()},
                  dtype="F32", overrides={k: v.contiguous() for k, v in sd.items()})
    src = open_source(tmp_path / "o.safetensors")
    w = Weights(src, "", {k: tuple(i.shape) for k, i in src.infos.items()})
    group = probes.ProbeGroup("te", "l", probes.OPEN_CLIP_LAYER, tokens=n,
                              options=(("head_dim", width // heads),))
    x = make_inputs(group, w, seed=1)["x"]
    mask = torch.full((n, n), float("-inf")).triu(1)
    with torch.no_grad():
        h = x + attn(ln1(x), ln1(x), ln1(x), need_weights=False, attn_mask=mask)[0]
        theirs = h + proj(torch.nn.functional.gelu(fc(ln2(h))))
        ours = BLOCKS[group.kind](w, {"x": x}, group)
    # a residual block reports the update it adds to its input
    assert torch.allclose(ours, (theirs - x).reshape(-1), atol=1e-5)


def test_every_family_has_probe_blocks_found_in_its_files(flux_pair: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    ref = open_source(flux_pair[0])
    names = [b.name for b in plan_blocks(REGISTRY["flux"], ref.infos)]
    assert names == ["img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                     "double_blocks.0", "double_blocks.1", "single_blocks.0",
                     "single_blocks.1", "final_layer", "encoder", "decoder",
                     "transformer.text_model.encoder.layers.0",
                     "transformer.encoder.block.0"]
    write_sparse_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", tiny=True)
    sdxl = plan_blocks(REGISTRY["sdxl"], open_source(tmp_path / "sdxl.safetensors").infos)
    counts = {c: sum(b.component == c for b in sdxl) for c in ("unet", "vae", "te1", "te2")}
    assert counts == {"unet": 9 + 1 + 9, "vae": 2, "te1": 12, "te2": 32}
    assert [a.name for a in REGISTRY.values() if not a.probe] == []


def test_bf16_cast_passes_with_small_errors(flux_pair: tuple[Path, Path]) -> None:
    ref, cand = (open_source(p) for p in flux_pair)
    results = probe(cand, ref, REGISTRY["flux"], seed=0)
    same = probe(ref, ref, REGISTRY["flux"], seed=0)
    assert all(r.rel_error == 0.0 and r.cosine == pytest.approx(1.0) for r in same)
    # bf16 keeps 8 bits of mantissa: per-block output errors of 1e-3..1e-2
    assert all(1e-4 < r.rel_error < 0.02 and r.cosine > 0.9999 and r.finite for r in results)


@pytest.mark.parametrize("fault", ["zero", "nan", "transpose", "scale2", "drop", "qk_swap"])
def test_each_fault_fails_only_its_block(flux_pair: tuple[Path, Path], fault: str) -> None:
    key = "double_blocks.1.img_attn.qkv.weight" if fault == "qk_swap" else FAULT_KEY
    bad = _faulty_source(flux_pair[0], key, fault)
    results = probe(bad, open_source(flux_pair[0]), REGISTRY["flux"], only=("transformer",))
    failing = [r.block for r in results if not r.rel_error <= 0.05]
    assert failing == ["double_blocks.1"]
    hit = next(r for r in results if r.block == "double_blocks.1")
    assert hit.finite == (fault not in ("nan", "drop"))
    assert bool(hit.missing) == (fault == "drop")


def test_cli_probe_exit_codes_reports_and_plot(flux_pair: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    ref, cand = flux_pair
    nan = _faulty(ref, tmp_path / "nan.safetensors", "single_blocks.0.linear2.weight", "nan")
    got = run_entry({
        "clean": ["verify", str(cand), "--reference", str(ref), "--probe",
                  "--report", str(tmp_path / "v.json"), "--junit", str(tmp_path / "v.xml"),
                  "--markdown", str(tmp_path / "v.md")],
        "nan": ["verify", str(nan), "--reference", str(ref), "--probe", "--json"],
        "no_ref": ["verify", str(cand), "--probe"],
        "lora": ["verify", str(cand), "--reference", str(ref), "--probe", "--lora",
                 str(ref)],
        **_flux2_cases(tmp_path),  # in the same child process (torch imported once)
    }, tmp_path)
    assert got["clean"][0] == 0, got["clean"]
    report = json.loads((tmp_path / "v.json").read_text())
    assert len(report["probe"]) == 14 and report["verdict"] == "pass"
    assert (tmp_path / "v.xml").read_text().count("<testcase") == 15
    assert "| double_blocks.0 | flux_double |" in (tmp_path / "v.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "v-probe.png") as img:
        assert img.format == "PNG" and img.size[1] == 300
    code, out, _ = got["nan"]
    assert code == 1
    nan_report = json.loads(out)
    failed = [c["case"] for c in nan_report["checks"] if c["verdict"] == "fail"]
    assert failed == ["transformer:single_blocks.0"]
    assert "first goes non-finite at transformer:single_blocks.0" in " ".join(
        nan_report["notes"])
    for case, words in (("no_ref", "--reference"), ("lora", "--lora")):
        code, _, err = got[case]
        assert code == 2 and words in err and "Traceback" not in err
    _check_flux2(got)


def _family_keys(family: str) -> dict[str, tuple[int, ...]]:
    from dataclasses import replace

    from modelkit.arch import qwen_image, sd3, wan

    if family == "sd3.5-medium":  # 2 heads of 64; block 0 has x_block.attn2
        cfg = replace(sd3.VARIANTS[family], depth=2, pos_embed_max=8, attn2_layers=1,
                      adm_in=64, context_in=64)
        return sd3.transformer_keys(cfg)
    if family == "qwen_image":
        return qwen_image.transformer_keys(qwen_image.small(qwen_image.QwenImageConfig()))
    return wan.transformer_keys(wan.small(wan.VARIANTS[family]))


@pytest.mark.parametrize("family", ["sd3.5-medium", "qwen_image", "t2v-1.3b", "i2v-14b"])
def test_transformer_families_probe_every_block(family: str, tmp_path: Path) -> None:
    keys = {"model.diffusion_model." + k: s for k, s in _family_keys(family).items()}
    write_tensors(tmp_path / "ref.safetensors", keys, dtype="F32")
    write_tensors(tmp_path / "cand.safetensors", keys, dtype="BF16")
    arch = REGISTRY[{"sd3.5-medium": "sd3", "qwen_image": "qwen_image"}.get(family, "wan")]
    results = probe(open_source(tmp_path / "cand.safetensors"),
                    open_source(tmp_path / "ref.safetensors"), arch)
    main = {"sd3": probes.SD3_JOINT, "qwen_image": probes.QWEN_BLOCK,
            "wan": probes.WAN_BLOCK}[arch.name]
    stem = {"sd3": "joint_blocks", "qwen_image": "transformer_blocks", "wan": "blocks"}
    assert [r.block for r in results if r.kind == main] == [
        f"{stem[arch.name]}.{i}" for i in range(2)]
    assert all(r.finite and 1e-5 < r.rel_error < 0.02 for r in results)


def test_transformer_only_candidate_against_an_all_in_one_reference(
        flux_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.verify.run import verify

    ref = open_source(flux_pair[0])
    root = "model.diffusion_model."
    bare = {k[len(root):]: ref.get(k).to(torch.float16) for k in ref.infos
            if k.startswith(root)}
    write_tensors(tmp_path / "t.safetensors", {k: tuple(v.shape) for k, v in bare.items()},
                  overrides=bare)
    report = verify(tmp_path / "t.safetensors", VerifySettings(probe=True),
                    reference=flux_pair[0])
    skipped = [c.case for c in report.checks if c.verdict == "skip"]
    assert skipped == ["vae:encoder", "vae:decoder",
                       "clip_l:transformer.text_model.encoder.layers.0",
                       "t5xxl:transformer.encoder.block.0"]
    passed = [c for c in report.checks if c.name == "probe.block" and c.verdict == "pass"]
    assert len(passed) == 10 and all(0 < c.value < 1e-2 for c in passed)
    assert report.passed and any("clip_l, t5xxl, vae" in n for n in report.notes)


@pytest.mark.parametrize("swap", [True, False])
def test_diffusers_layout_candidate_is_probed_in_the_bfl_layout(
        flux_pair: tuple[Path, Path], tmp_path: Path, swap: bool) -> None:
    from modelkit.arch import to_diffusers
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.verify.run import verify

    ref = open_source(flux_pair[0])
    out = {}
    for target, piece in to_diffusers.flux_map(flux_config("dev")).items():
        t = ref.get("model.diffusion_model." + piece.source)
        t = t[piece.rows[0]:piece.rows[1]] if piece.rows else t
        # swap=False: a converter that forgets diffusers' (scale, shift) order
        t = torch.cat(t.chunk(2)[::-1]) if piece.swap and swap else t
        out[target] = t.to(torch.bfloat16).contiguous()
    write_tensors(tmp_path / "d.safetensors", {k: tuple(v.shape) for k, v in out.items()},
                  overrides=out)
    report = verify(tmp_path / "d.safetensors", VerifySettings(probe=True),
                    reference=flux_pair[0])
    failed = [c.case for c in report.failed]
    assert failed == ([] if swap else ["transformer:final_layer"])
    assert sum(c.verdict == "pass" for c in report.checks if c.name == "probe.block") == (
        10 if swap else 9)
    assert any("probed as the BFL layout" in n for n in report.notes)


def test_quantized_sd1_outputs_are_probed_as_verify_reads_them(tmp_path: Path) -> None:
    from modelkit.core.recipe import Recipe
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.engine.api import export_gguf
    from modelkit.engine.runner import run
    from modelkit.verify.run import verify

    src = tmp_path / "sd1.safetensors"
    write_checkpoint(src, "sd1", dtype="F32")
    outs = {"gguf": export_gguf(src, tmp_path / "q8.gguf").path}
    for dtype in ("fp8_e4m3fn", "int8"):
        outs[dtype] = tmp_path / f"{dtype}.safetensors"
        run(Recipe.op("quantize", src.absolute(), output=outs[dtype].absolute(), dtype=dtype))
    got = {}
    for name, path in outs.items():
        report = verify(path, VerifySettings(probe=True), reference=src)
        unet = [r for r in report.probe or [] if r["component"] == "unet"]
        got[name] = (report.passed, len(unet), max(float(str(r["rel_error"])) for r in unet),
                     sum(bool(r["absent"]) for r in report.probe or []))
    assert {n: g[:2] for n, g in got.items()} == {n: (True, 25) for n in outs}
    assert got["gguf"][3] == 14  # the GGUF holds the UNet only: VAE and CLIP skipped
    # int8 is read dequantized (raw int8 codes would be off by orders of magnitude)
    assert 1e-4 < got["int8"][2] < 0.05 and 1e-4 < got["gguf"][2] < 0.05
    assert 0.05 < got["fp8_e4m3fn"][2] < 0.15  # fp8's own limit (3-bit mantissa)
    from modelkit.testing.lora import write_lora

    write_lora(tmp_path / "l.safetensors")
    lora = verify(tmp_path / "l.safetensors", VerifySettings(probe=True), reference=src)
    assert [c.name for c in lora.failed] == ["probe.coverage"]


# --- Chroma, Flux.2, Z-Image (their block math against diffusers' blocks:
# tests/test_render_families.py, which imports diffusers anyway) -------------------

NEW_FAMILY_BLOCKS = {
    "chroma": (["img_in", "txt_in", "distilled_guidance_layer", "double_blocks.0",
                "double_blocks.1", "single_blocks.0", "single_blocks.1", "final_layer.linear"],
               "double_blocks.1.img_attn.proj.weight", "transpose"),
    "flux2": (["img_in", "txt_in", "time_in", "guidance_in", "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
               "double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1",
               "final_layer"], "single_blocks.1.linear1.weight", "scale2"),
    "z_image": (["x_embedder", "t_embedder", "cap_embedder", "noise_refiner.0",
                 "noise_refiner.1", "context_refiner.0", "context_refiner.1", "layers.0",
                 "layers.1", "final_layer"], "layers.1.attention.qkv.weight", "qk_swap"),
}


def _small_state(family: str) -> dict[str, torch.Tensor]:
    from importlib import import_module

    module = import_module(f"modelkit.arch.{family}")
    keys = module.transformer_keys(module.small(next(iter(module.VARIANTS.values()))))
    gen = torch.Generator().manual_seed(len(family))
    # norm scales near 1, as trained ones are (a q/k swap would hide otherwise)
    state = {k: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1
             else 0.05 * torch.randn(s, generator=gen) for k, s in keys.items()}
    return state


def _memory(state: dict[str, torch.Tensor], label: str) -> DerivedSource:
    from modelkit.io.source import tensor_info

    return DerivedSource(label, {k: tensor_info(k, "F32", v.shape) for k, v in state.items()},
                         {}, state.__getitem__)


@pytest.mark.parametrize("family", list(NEW_FAMILY_BLOCKS))
def test_new_families_probe_every_block_and_catch_a_fault(family: str) -> None:
    """Every block of a small Chroma / Flux.2 / Z-Image is probed; a bf16
    round trip moves each by 1e-4..2e-2, a transposed projection, a doubled
    weight or a q/k swap fails its own block only, beyond the 0.05 gate."""
    names, key, fault = NEW_FAMILY_BLOCKS[family]
    ref = _small_state(family)
    arch = REGISTRY[family]
    assert [b.name for b in plan_blocks(arch, ref)] == names
    cast = {k: v.to(torch.bfloat16).float() for k, v in ref.items()}
    results = probe(_memory(cast, "bf16"), _memory(ref, "ref"), arch)
    assert [r.block for r in results] == names
    assert all(r.finite and 1e-4 < r.rel_error < 0.02 for r in results), [
        (r.block, r.rel_error) for r in results]
    bad = probe(_memory({**ref, key: _fault(ref[key], fault)}, "bad"), _memory(ref, "ref"),
                arch)
    failing = [(r.block, r.rel_error) for r in bad if not r.rel_error <= 0.05]
    block = next(n for n in names if key.startswith(n + "."))
    assert [b for b, _ in failing] == [block], failing


def _flux2_cases(d: Path) -> dict[str, list[str]]:
    """A small Flux.2 (F32), its bf16 cast, a copy with one weight doubled
    and a diffusers-layout header, with the verify commands probing them."""
    from dataclasses import replace

    from modelkit.arch import flux2
    from modelkit.testing import write_sparse_dit

    keys = flux2.transformer_keys(replace(flux2.small(flux2.VARIANTS["dev"]), depth=1,
                                          depth_single_blocks=1))
    gen = torch.Generator().manual_seed(4)
    state = {k: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1
             else 0.05 * torch.randn(s, generator=gen) for k, s in keys.items()}
    bad = {**state, "single_blocks.0.linear2.weight": 2 * state["single_blocks.0.linear2.weight"]}
    cast = {k: v.to(torch.bfloat16) for k, v in state.items()}
    for name, tensors, dtype in (("f2ref", state, "F32"), ("f2bf16", cast, "BF16"),
                                 ("f2bad", bad, "F32")):
        write_tensors(d / f"{name}.safetensors", keys, dtype=dtype, overrides=tensors)
    write_sparse_dit(d / "f2d.safetensors", "flux2", layout="diffusers", tiny=True)
    args = ["--reference", str(d / "f2ref.safetensors"), "--probe", "--json", "-q"]
    return {f"flux2_{n}": ["verify", str(d / f"f2{n}.safetensors"), *args]
            for n in ("bf16", "bad", "d")}


def _check_flux2(got: dict[str, tuple[int, str, str]]) -> None:
    """verify --probe on a Flux.2 pair: a bf16 cast passes (exit 0), a
    doubled weight fails its block (exit 1), a diffusers-layout file is
    refused in one line naming the conversion (exit 2)."""
    code, out, err = got["flux2_bf16"]
    assert code == 0, err
    report = json.loads(out)
    assert report["arch"] == "flux2" and len(report["probe"]) == 10
    assert all(1e-4 < r["rel_error"] < 0.02 for r in report["probe"]), report["probe"]
    code, out, _ = got["flux2_bad"]
    assert code == 1
    assert [c["case"] for c in json.loads(out)["checks"] if c["verdict"] == "fail"] == [
        "transformer:single_blocks.0"]
    code, out, err = got["flux2_d"]
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert ("f2d.safetensors: is a Flux.2 transformer in the diffusers layout; the probe "
            "reads the original layout: convert it first ('modelkit convert f2d.safetensors "
            "--layout original -o OUT.safetensors')") in err


def test_tensors_that_do_not_fit_their_block_are_one_line_errors(
        flux_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A file whose block weights disagree in width (a truncated or spliced
    file) is refused naming the block, not an internal error."""
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.errors import ModelkitError
    from modelkit.verify.probe_run import probe_verify

    ref = flux_pair[0]
    src = open_source(ref)
    keys = {k: tuple(i.shape) for k, i in src.infos.items()}
    full = "model.diffusion_model." + FAULT_KEY
    rows, cols = keys[full]
    keys[full] = (rows, 2 * cols)  # proj no longer takes the attention's output
    bad = tmp_path / "bad.safetensors"
    write_tensors(bad, keys, dtype="F32")
    with pytest.raises(ModelkitError, match=r"block double_blocks\.1: its tensors do not fit"):
        probe_verify(bad, bad, VerifySettings(probe=True))
