"""Every family after SDXL in the library, the TUI and ``hash``, and the
standalone text encoders and VAEs they use (CLIP-L/G, T5-XXL, UMT5-XXL,
Qwen2.5-VL-7B, Qwen3-4B, the 16-channel Flux.1/SD3 autoencoder, the Wan 2.1 and 2.2
VAEs) recognised as such.

Tiny files have the real key names at small widths; the exact variants are
checked on full-size headers written sparsely (real header, zero data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_support import run_all
from textual.pilot import Pilot
from textual.widgets import Static
from tui_support import settle

from modelkit.arch import encoders, flux
from modelkit.arch.configs import CLIP_L
from modelkit.arch.keys import KeyShapes, text_encoder_keys
from modelkit.cli.inspect_cmd import render
from modelkit.inspect.report import inspect_model
from modelkit.io.writer import TensorSpec, write_sparse
from modelkit.library import db as dbm
from modelkit.library.check import check
from modelkit.library.query import list_entries
from modelkit.library.scan import scan
from modelkit.testing import (
    write_flux,
    write_sparse_dit,
    write_sparse_flux,
    write_sparse_qwen_image,
    write_sparse_sd3,
    write_sparse_wan,
    write_tensors,
)
from modelkit.testing.lora import write_flux_lora

# --- tiny and full-size component files -----------------------------------------------

CLIP_G = replace(CLIP_L, width=1280, layers=32, heads=20)
TINY: dict[str, KeyShapes] = {
    "t5": encoders.t5_encoder_keys(2, 64, 96, 100, (32, 4)),
    "umt5": encoders.t5_encoder_keys(2, 64, 96, 100, (32, 4), every=True),
    "qwen": {**encoders.qwen25_text_keys(2, 64, 32, 96, 100),
             "visual.patch_embed.proj.weight": (32, 3, 2, 14, 14), "lm_head.weight": (100, 64)},
    "qwen3": encoders.qwen3_text_keys(2, 64, 4, 2, 16, 96, 100),
    "ae": flux.ae_keys(16),
    "wan21": encoders.wan21_vae_keys(8, 16),
    "wan22": encoders.wan22_vae_keys(8, 48, 16),
}


def _sparse(path: Path, keys: Mapping[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sparse(path, [TensorSpec(k, dtype, s) for k, s in keys.items()])


def _tiny(path: Path, keys: Mapping[str, tuple[int, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, keys, dtype="F16")
    return path


def _params(keys: Mapping[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for s in keys.values())


# hand counts of the released encoders' parameters (widths from their configs)
T5XXL = (32128 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 10240 * 4096 + 2 * 4096)
         + 32 * 64 + 4096)  # 4.76 B: t5xxl_fp16.safetensors is 9.52 GB
UMT5XXL = (256384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 10240 * 4096 + 2 * 4096 + 32 * 64)
           + 4096)  # 5.68 B: umt5_xxl_fp16 is 11.4 GB
# Qwen2.5-7B: q, k, v with biases, o without (4 key/value heads of 128: 512)
QWEN25_7B = (152064 * 3584 + 28 * ((3584 * 3584 + 3584) + 2 * (512 * 3584 + 512)
                                   + 3584 * 3584 + 3 * 18944 * 3584 + 2 * 3584)
             + 3584)  # 7.07 B
# Mistral Small 3.1's text model: 32 query and 8 key/value heads of 128, no biases
MISTRAL_24B = (131072 * 5120 + 40 * (4096 * 5120 + 2 * 1024 * 5120 + 5120 * 4096
                                     + 3 * 32768 * 5120 + 2 * 5120) + 5120)  # 22.9 B
# Qwen3-4B: 32 query and 8 key/value heads of 128 without biases, per-head q/k norms
QWEN3_4B = (151936 * 2560 + 36 * (4096 * 2560 + 2 * 1024 * 2560 + 2560 * 4096 + 2 * 128
                                  + 3 * 9728 * 2560 + 2 * 2560) + 2560)  # 4.02 B


def _clip(width: int, layers: int, vocab: int = 49408, ctx: int = 77) -> int:
    """A CLIP text model's parameters: embeddings, per layer four biased
    attention projections, two LayerNorms, fc1 (4x) and fc2, the final norm."""
    w, f = width, 4 * width
    layer = 4 * (w * w + w) + 4 * w + (f * w + f) + (w * f + w)
    return vocab * w + ctx * w + layers * layer + 2 * w


def test_each_text_encoder_and_vae_is_recognised_and_checked(tmp_path: Path) -> None:
    cases = {  # file: (keys, component, kind, arch, used_by, prefix)
        "t5": (TINY["t5"], "t5xxl", "text_encoder", "flux", ["sd3", "flux", "chroma"], ""),
        "t5-aio": ({f"text_encoders.t5xxl.transformer.{k}": s for k, s in TINY["t5"].items()},
                   "t5xxl", "text_encoder", "flux", ["sd3", "flux", "chroma"],
                   "text_encoders.t5xxl.transformer."),
        "t5-clipsave": ({f"t5xxl.transformer.{k}": s for k, s in TINY["t5"].items()},
                        "t5xxl", "text_encoder", "flux", ["sd3", "flux", "chroma"],
                        "t5xxl.transformer."),
        "umt5": (TINY["umt5"], "umt5xxl", "text_encoder", "wan", ["wan"], ""),
        "qwen": (TINY["qwen"], "qwen25vl", "text_encoder", "qwen_image", ["qwen_image"], ""),
        "qwen3": (TINY["qwen3"], "qwen3", "text_encoder", "z_image", ["z_image"], ""),
        "ae": (TINY["ae"], "ae16", "vae", "flux", ["flux", "sd3", "chroma", "z_image"], ""),
        "wan21": (TINY["wan21"], "wan21_vae", "vae", "wan", ["wan", "qwen_image"], ""),
        "wan22": (TINY["wan22"], "wan22_vae", "vae", "wan", ["wan"], ""),
    }
    for name, (keys, comp, kind, arch, used_by, prefix) in cases.items():
        d = inspect_model(_tiny(tmp_path / f"{name}.safetensors", keys)).to_dict()
        assert (d["kind"], d["arch"], d["variant"], d["layout"]) == (
            kind, arch, None, "original"), name
        assert d["component"]["name"] == comp and d["component"]["used_by"] == used_by
        (c,) = d["components"].values()
        assert (c["complete"], c["n_missing"], c["n_unexpected"], c["prefix"]) == (
            True, 0, 0, prefix), name
        assert c["n_tensors"] == len(keys) and d["unknown_keys"] == [], name
        assert any("is used by" in e for e in d["arch_evidence"])
    # the hand counts of the tiny tables: T5 has one attention bias, UMT5 one a layer
    assert len(TINY["t5"]) == 1 + 2 * 9 + 1 + 1 and len(TINY["umt5"]) == 1 + 2 * 10 + 1
    # Wan 2.1: 194 tensors at any width (ComfyUI's WanVAE state dict), 2.2: 196
    assert len(TINY["wan21"]) == 194 and len(TINY["wan22"]) == 196
    # diffusers-named VAEs (AutoencoderKL, AutoencoderKLWan) are named with their
    # layout and not checked: the tables are of the original names
    # (and Flux.2's 32-channel VAE has no table yet)
    for name, keys, comp, layout in (
            ("ae-diffusers", {"encoder.conv_in.weight": (32, 3, 3, 3),
                              "encoder.down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3),
                              "decoder.conv_in.weight": (64, 16, 3, 3)}, "ae16", "diffusers"),
            ("wan-diffusers", {"encoder.conv_in.weight": (96, 3, 3, 3, 3),
                               "encoder.mid_block.attentions.0.to_qkv.weight": (48, 16, 1, 1),
                               "decoder.conv_in.weight": (32, 16, 3, 3, 3)}, "wan21_vae",
             "diffusers"),
            ("flux2-vae", {"encoder.conv_in.weight": (32, 3, 3, 3),
                           "decoder.conv_in.weight": (64, 32, 3, 3),
                           "bn.running_mean": (128,)}, "flux2_vae", "original")):
        d = inspect_model(_tiny(tmp_path / f"{name}.safetensors", keys)).to_dict()
        assert (d["component"]["name"], d["layout"]) == (comp, layout), name
        assert d["components"]["vae"]["complete"] is None
    # a damaged file: one layer's feed-forward gone, listed by name
    broken = {k: s for k, s in TINY["umt5"].items() if ".1.layer.1.DenseReluDense" not in k}
    d = inspect_model(_tiny(tmp_path / "umt5-broken.safetensors", broken)).to_dict()
    c = d["components"]["te"]
    assert c["complete"] is False and c["n_missing"] == 3
    assert c["missing"] == [f"encoder.block.1.layer.1.DenseReluDense.{w}.weight"
                            for w in ("wi_0", "wi_1", "wo")]
    assert any("UMT5-XXL is incomplete: 3 missing keys" in n for n in d["notes"])


def test_full_size_encoders_name_their_exact_variant(tmp_path: Path) -> None:
    files = {
        "t5": _sparse(tmp_path / "t5xxl_fp16.safetensors", encoders.t5_encoder_keys()),
        "umt5": _sparse(tmp_path / "umt5.safetensors", encoders.t5_encoder_keys(
            vocab=256384, every=True)),
        "qwen": _sparse(tmp_path / "qwen.safetensors", encoders.qwen25_text_keys()),
        "qwen3": _sparse(tmp_path / "qwen_3_4b.safetensors", encoders.qwen3_text_keys()),
        "mistral": _sparse(tmp_path / "mistral_3_small_flux2.safetensors",
                           {**encoders.llama_text_keys(), "lm_head.weight": (131072, 5120)}),
        "clip_l": _sparse(tmp_path / "clip_l.safetensors", text_encoder_keys(CLIP_L)),
        "clip_g": _sparse(tmp_path / "clip_g.safetensors", {
            **text_encoder_keys(CLIP_G), "text_projection.weight": (1280, 1280)}),
        "t5-short": _sparse(tmp_path / "t5-short.safetensors", {
            k: s for k, s in encoders.t5_encoder_keys().items()
            if not k.startswith("encoder.block.23.")}),
    }
    got = {n: inspect_model(p).to_dict() for n, p in files.items()}
    want = {"t5": ("t5xxl", "xxl", T5XXL), "umt5": ("umt5xxl", "xxl", UMT5XXL),
            "qwen": ("qwen25vl", "7b", QWEN25_7B), "qwen3": ("qwen3", "4b", QWEN3_4B),
            "mistral": ("mistral3", "24b", MISTRAL_24B + 131072 * 5120),  # + lm_head
            "clip_l": ("clip_l", None, _clip(768, 12)),
            "clip_g": ("clip_g", None, _clip(1280, 32) + 1280 * 1280)}  # + text_projection
    for name, (comp, variant, params) in want.items():
        d = got[name]
        assert (d["component"]["name"], d["variant"], d["n_params"]) == (comp, variant, params)
        assert d["components"]["te"]["complete"] is True, name
    assert T5XXL == 4_762_310_656 and UMT5XXL == 5_680_910_336 and QWEN25_7B == 7_070_619_136
    assert _clip(768, 12) == 123_060_480 and QWEN3_4B == 4_022_468_096
    assert MISTRAL_24B == 22_901_314_560
    assert got["mistral"]["arch"] == "flux2"
    assert got["clip_l"]["arch"] == "sd1" and got["clip_g"]["component"]["used_by"] == [
        "sdxl", "sd3"]
    # the released width expects the released depth: a missing last layer is listed
    short = got["t5-short"]["components"]["te"]
    assert (short["complete"], short["n_missing"]) == (False, 9)
    assert all(k.startswith("encoder.block.23.") for k in short["missing"])


def test_a_scaled_fp8_t5_reads_as_t5(tmp_path: Path) -> None:
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled: fp8 weights with .scale_weight
    beside them and the scaled_fp8 marker."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, s in TINY["t5"].items():
        w = torch.randn(s, generator=gen)
        if len(s) == 2 and k != "shared.weight":
            scale = w.abs().max() / 448
            sd[k] = (w / scale).to(torch.float8_e4m3fn)
            sd[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            sd[k] = w.to(torch.bfloat16)
    save_file(sd, str(tmp_path / "t5xxl_fp8_scaled.safetensors"))
    d = inspect_model(tmp_path / "t5xxl_fp8_scaled.safetensors").to_dict()
    assert (d["kind"], d["component"]["name"]) == ("text_encoder", "t5xxl")
    assert d["quantization"]["spelling"] == "comfy-legacy"
    assert d["components"]["te"]["complete"] is True and d["unknown_keys"] == []


# --- a library of every family --------------------------------------------------------


def _gguf(path: Path) -> Path:
    """A tiny Flux.1 transformer as ComfyUI-GGUF stores it (F16 tensors)."""
    import gguf

    cfg = replace(flux.small(flux.VARIANTS["dev"]), hidden_size=128, num_heads=1)
    w = gguf.GGUFWriter(str(path), "flux")
    rng = np.random.default_rng(0)
    for k, s in flux.transformer_keys(cfg).items():
        w.add_tensor(k, rng.standard_normal(s).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _build_library(root: Path) -> None:
    comfy, forge = root / "comfy/models", root / "forge/models"
    dm = comfy / "diffusion_models"
    for d in (dm, comfy / "unet", comfy / "checkpoints", forge / "Stable-diffusion",
              forge / "text_encoder"):
        d.mkdir(parents=True, exist_ok=True)
    write_sparse_flux(dm / "flux1-dev.safetensors")
    write_sparse_flux(dm / "flux1-schnell-diffusers.safetensors", "schnell",
                      layout="diffusers")
    write_sparse_sd3(dm / "sd3.5_large.safetensors", "sd3.5-large")
    write_sparse_qwen_image(dm / "qwen_image.safetensors")
    write_sparse_wan(dm / "wan2.1_t2v_1.3B.safetensors", "t2v-1.3b")
    write_sparse_wan(comfy / "unet/wan2.2_ti2v_5B.safetensors", "ti2v-5b")  # the old name
    write_sparse_dit(dm / "chroma.safetensors", "chroma")
    write_sparse_dit(dm / "flux2-dev.safetensors", "flux2", layout="diffusers")
    write_sparse_dit(dm / "z_image.safetensors", "z_image", prefixed=True)
    _gguf(dm / "flux1-dev-Q8_0.gguf")
    write_sparse_flux(comfy / "checkpoints/flux1-dev-fp8.safetensors", all_in_one=True)
    write_sparse_flux(comfy / "checkpoints/flux1-schnell-transformer.safetensors", "schnell")
    _sparse(comfy / "text_encoders/t5xxl_fp16.safetensors", encoders.t5_encoder_keys())
    _sparse(comfy / "text_encoders/clip_l.safetensors", text_encoder_keys(CLIP_L))
    _sparse(comfy / "clip/umt5_xxl.safetensors", encoders.t5_encoder_keys(vocab=256384,
                                                                          every=True))
    _sparse(comfy / "text_encoders/qwen_2.5_vl_7b.safetensors", encoders.qwen25_text_keys())
    _sparse(comfy / "vae/ae.safetensors", flux.ae_keys())
    _sparse(comfy / "vae/wan_2.1_vae.safetensors", encoders.wan21_vae_keys())
    _sparse(comfy / "vae/wan2.2_vae.safetensors", encoders.wan22_vae_keys())
    _tiny(comfy / "vae/t5-misfiled.safetensors", TINY["t5"])
    (comfy / "loras").mkdir()
    write_flux_lora(comfy / "loras/flux-style.safetensors")
    # Forge: Flux transformers in Stable-diffusion, with the VAE and encoders beside
    write_sparse_flux(forge / "Stable-diffusion/flux1-dev.safetensors")
    write_sparse_wan(forge / "Stable-diffusion/wan2.1_t2v_1.3B.safetensors", "t2v-1.3b")
    _sparse(forge / "VAE/ae.safetensors", flux.ae_keys())
    _tiny(forge / "text_encoder/t5.safetensors", TINY["t5"])
    (forge / "Lora").mkdir()
    write_flux_lora(forge / "Lora/flux-style.safetensors")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    _build_library(root / "lib")
    db = root / "index.sqlite"
    scan([root / "lib"], db, workers=1)
    return {"root": root / "lib", "db": db, "cache": root / "cache"}


@pytest.fixture(autouse=True)
def _cache(library: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(library["cache"]))


# relative path -> kind, arch, variant, key layout, UI layout, folder role
UNET, TE, VAE = "unet", "text_encoder", "vae"
C, F = "comfyui", "a1111"
EXPECTED: dict[str, tuple[str, str, str | None, str | None, str, str]] = {
    "comfy/models/diffusion_models/flux1-dev.safetensors": (UNET, "flux", "dev", "original",
                                                            C, UNET),
    "comfy/models/diffusion_models/flux1-schnell-diffusers.safetensors": (
        UNET, "flux", "schnell", "diffusers", C, UNET),
    "comfy/models/diffusion_models/sd3.5_large.safetensors": (UNET, "sd3", "sd3.5-large",
                                                              "original", C, UNET),
    # Qwen-Image has one key layout, diffusers' names (ComfyUI's files too)
    "comfy/models/diffusion_models/qwen_image.safetensors": (UNET, "qwen_image", "qwen-image",
                                                             "diffusers", C, UNET),
    "comfy/models/diffusion_models/wan2.1_t2v_1.3B.safetensors": (UNET, "wan", "t2v-1.3b",
                                                                  "original", C, UNET),
    "comfy/models/unet/wan2.2_ti2v_5B.safetensors": (UNET, "wan", "ti2v-5b", "original", C,
                                                     UNET),
    "comfy/models/diffusion_models/chroma.safetensors": (UNET, "chroma", "chroma",
                                                         "original", C, UNET),
    "comfy/models/diffusion_models/flux2-dev.safetensors": (UNET, "flux2", "dev",
                                                            "diffusers", C, UNET),
    "comfy/models/diffusion_models/z_image.safetensors": (UNET, "z_image", "z-image",
                                                          "original", C, UNET),
    "comfy/models/diffusion_models/flux1-dev-Q8_0.gguf": (UNET, "flux", "dev", "original",
                                                          C, UNET),
    "comfy/models/checkpoints/flux1-dev-fp8.safetensors": ("checkpoint", "flux", "dev",
                                                           "original", C, "checkpoint"),
    "comfy/models/checkpoints/flux1-schnell-transformer.safetensors": (
        UNET, "flux", "schnell", "original", C, "checkpoint"),
    "comfy/models/text_encoders/t5xxl_fp16.safetensors": (TE, "flux", "xxl", "original",
                                                          C, TE),
    "comfy/models/text_encoders/clip_l.safetensors": (TE, "sd1", None, "original", C, TE),
    "comfy/models/clip/umt5_xxl.safetensors": (TE, "wan", "xxl", "original", C, TE),
    "comfy/models/text_encoders/qwen_2.5_vl_7b.safetensors": (TE, "qwen_image", "7b",
                                                              "original", C, TE),
    "comfy/models/vae/ae.safetensors": (VAE, "flux", None, "original", C, VAE),
    "comfy/models/vae/wan_2.1_vae.safetensors": (VAE, "wan", None, "original", C, VAE),
    "comfy/models/vae/wan2.2_vae.safetensors": (VAE, "wan", None, "original", C, VAE),
    "comfy/models/vae/t5-misfiled.safetensors": (TE, "flux", None, "original", C, VAE),
    "comfy/models/loras/flux-style.safetensors": ("lora", "flux", None, None, C, "lora"),
    "forge/models/Stable-diffusion/flux1-dev.safetensors": (UNET, "flux", "dev", "original",
                                                            F, "checkpoint"),
    "forge/models/Stable-diffusion/wan2.1_t2v_1.3B.safetensors": (
        UNET, "wan", "t2v-1.3b", "original", F, "checkpoint"),
    "forge/models/VAE/ae.safetensors": (VAE, "flux", None, "original", F, VAE),
    "forge/models/text_encoder/t5.safetensors": (TE, "flux", None, "original", F, TE),
    "forge/models/Lora/flux-style.safetensors": ("lora", "flux", None, None, F, "lora"),
}


def test_scan_records_kind_arch_variant_and_layout_of_every_family(
        library: dict[str, Path]) -> None:
    with dbm.opened(library["db"]) as conn:
        entries = list_entries(conn)
    got = {str(Path(e.path).relative_to(library["root"])):
           (e.kind, e.arch, e.variant, e.key_layout, e.layout, e.role) for e in entries}
    assert got == EXPECTED


def test_help_lines_name_every_family_for_hash_library_and_tui() -> None:
    from modelkit.arch import registry
    from modelkit.cli.families import families_text

    every = registry.listed(registry.names())
    assert families_text("library") == families_text("tui") == (
        f"Families: {every} (named with their variant and layout).")
    for name in registry.names():
        assert all(registry.handles(name, c) for c in ("hash", "library", "tui")), name


def test_check_reports_the_misplaced_files_with_the_folder_the_ui_expects(
        library: dict[str, Path]) -> None:
    root = library["root"]
    with dbm.opened(library["db"]) as conn:
        hints = {(str(Path(h.path).relative_to(root)), h.code): h for h in check(conn).hints}
    assert sorted(hints) == [
        ("comfy/models/checkpoints/flux1-schnell-transformer.safetensors", "unet-only"),
        ("comfy/models/vae/t5-misfiled.safetensors", "wrong-folder"),
        ("forge/models/Stable-diffusion/wan2.1_t2v_1.3B.safetensors", "unet-only"),
    ]
    unet = hints[("comfy/models/checkpoints/flux1-schnell-transformer.safetensors",
                  "unet-only")]
    assert unet.expected == str(root / "comfy/models/diffusion_models")
    t5 = hints[("comfy/models/vae/t5-misfiled.safetensors", "wrong-folder")]
    assert t5.expected == str(root / "comfy/models/text_encoders")
    assert t5.message.startswith("T5-XXL text encoder in a vae folder; comfyui loads it")
    wan = hints[("forge/models/Stable-diffusion/wan2.1_t2v_1.3B.safetensors", "unet-only")]
    assert wan.expected is None
    assert "A1111 and Forge do not load Wan diffusion-model files: ComfyUI loads them " \
           "from models/diffusion_models" in wan.message


@pytest.mark.asyncio
async def test_tui_shows_arch_variant_layout_and_component(library: dict[str, Path]) -> None:
    from modelkit.tui.app import make_app
    from modelkit.tui.widgets.model_table import ModelTable

    root = library["root"]
    async with make_app(db=str(library["db"]), images=False).run_test(
            size=(160, 45)) as pilot:
        await settle(pilot)
        table = pilot.app.screen.query_one(ModelTable)
        row = [str(c) for c in table.get_row(
            str(root / "comfy/models/diffusion_models/wan2.1_t2v_1.3B.safetensors"))]
        assert row[1:4] == ["wan2.1_t2v_1.3B", "unet", "wan"]
        await _filter(pilot, "layout:diffusers")
        assert sorted(e.name for e in table.shown) == [
            "flux1-schnell-diffusers.safetensors", "flux2-dev.safetensors",
            "qwen_image.safetensors"]
        await _filter(pilot, "v:xxl")
        assert sorted(e.name for e in table.shown) == ["t5xxl_fp16.safetensors",
                                                       "umt5_xxl.safetensors"]
        await _filter(pilot, "t5xxl_fp16")
        info = _info(pilot)
        assert "kind         text_encoder (xxl)" in info
        assert "component    T5-XXL  (used by SD3, Flux.1 and Chroma)" in info
        assert "layout       original key names" in info
        await _filter(pilot, "flux1-schnell-transformer")
        info = _info(pilot)
        assert "kind         unet (schnell)" in info and "arch         Flux.1" in info
        assert "warning: UNet-only file in a checkpoint folder" in info
        assert f"move to: {root / 'comfy/models/diffusion_models'}" in info
        # a table wide enough shows the variant and the key layout beside the arch
        await _filter(pilot, "")
        await pilot.resize_terminal(240, 45)
        await settle(pilot)
        assert table.full
        row = [str(c) for c in table.get_row(
            str(root / "comfy/models/diffusion_models/flux1-schnell-diffusers.safetensors"))]
        assert row[1:6] == ["flux1-schnell-diffusers", "unet", "flux", "schnell", "diffusers"]
        row = [str(c) for c in table.get_row(
            str(root / "comfy/models/text_encoders/qwen_2.5_vl_7b.safetensors"))]
        assert row[2:6] == ["te", "qwen", "7b", "original"]  # the short arch name


async def _filter(pilot: Pilot[Any], text: str) -> None:
    pilot.app.screen.query_one("#filter").value = text
    await settle(pilot)


def _info(pilot: Pilot[Any]) -> str:
    return pilot.app.screen.query_one("#info-text", Static).content.plain  # type: ignore[union-attr]


# --- hash through the console script, inspect's text --------------------------------------


def test_hash_of_every_family_and_inspect_text(tmp_path: Path) -> None:
    """sha256 and AutoV2 are of the whole file, addnet of the tensor bytes
    after the header: the same transformer with and without the
    ``model.diffusion_model.`` prefix has one addnet and two sha256s; a
    GGUF has no addnet (no tool defines one)."""
    from safetensors.torch import load_file

    bare = write_flux(tmp_path / "bare.safetensors", hidden=128, depth=1, single=1).path
    tensors = {f"model.diffusion_model.{k}": t for k, t in load_file(str(bare)).items()}
    prefixed = write_tensors(tmp_path / "prefixed.safetensors",
                             {k: tuple(t.shape) for k, t in tensors.items()},
                             overrides=tensors).path
    gg = _gguf(tmp_path / "flux.gguf")
    t5 = _tiny(tmp_path / "t5.safetensors", TINY["t5"])
    res = run_all({"hash": ["hash", "--json", str(bare), str(prefixed), str(gg)]}, tmp_path)
    code, out, err = res["hash"]
    assert code == 0, err
    by_name = {Path(r["path"]).name: r for r in json.loads(out)}
    for path in (bare, prefixed, gg):
        data = Path(path).read_bytes()
        r = by_name[Path(path).name]
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["autov2"] == r["sha256"][:10]
        if Path(path).suffix == ".gguf":
            assert r["addnet"] is None
            continue
        start = 8 + int.from_bytes(data[:8], "little")
        assert r["addnet"] == hashlib.sha256(data[start:]).hexdigest()
    assert by_name["bare.safetensors"]["addnet"] == by_name["prefixed.safetensors"]["addnet"]
    assert by_name["bare.safetensors"]["sha256"] != by_name["prefixed.safetensors"]["sha256"]
    # inspect's text and JSON name the encoder and the families that use it
    rep = inspect_model(t5)
    text = render(rep)
    assert "kind        text_encoder" in text
    assert "T5-XXL is used by SD3, Flux.1 and Chroma" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("    te ")]
    assert line.split()[:4] == ["te", "T5-XXL", "21", "tensors"] and "complete" in line
    assert json.loads(json.dumps(rep.to_dict()))["component"] == {
        "name": "t5xxl", "label": "T5-XXL", "used_by": ["sd3", "flux", "chroma"]}



def test_a_forged_layer_number_makes_no_huge_table(tmp_path: Path) -> None:
    """A header naming layer 999999999 is checked against at most one layer
    a key: incomplete, at once."""
    keys = {**TINY["qwen"], "model.layers.999999999.mlp.gate_proj.weight": (96, 64)}
    d = inspect_model(_tiny(tmp_path / "forged.safetensors", keys)).to_dict()
    c = d["components"]["te"]
    assert d["component"]["name"] == "qwen25vl" and c["complete"] is False
    layers = len(keys)  # the cap: one layer a key; 12 keys a layer, 2 layers there
    assert c["n_unexpected"] == 1 and c["n_missing"] == (layers - 2) * 12


def test_verify_takes_a_standalone_vae_and_refuses_a_text_encoder(tmp_path: Path) -> None:
    """Their arch is the family that uses them: a Flux.1 VAE is probed as a
    VAE (its encoder and decoder blocks, equal to themselves) and gets no
    transformer key check; a T5 is refused in one line, not probed as a VAE
    (its ``encoder.`` keys are no VAE's)."""
    from modelkit.core.verify_settings import VerifySettings
    from modelkit.errors import ModelkitError
    from modelkit.verify.run import verify

    ae = _tiny(tmp_path / "ae.safetensors", TINY["ae"])
    t5 = _tiny(tmp_path / "t5.safetensors", TINY["t5"])
    report = verify(ae, VerifySettings(probe=True), ae)
    probed = [(b["component"], b["block"]) for b in report.probe]
    assert probed == [("vae", "encoder"), ("vae", "decoder")]
    assert all(b["rel_error"] == 0.0 and b["cosine"] == pytest.approx(1.0) for b in report.probe)
    with pytest.raises(ModelkitError, match="is a standalone T5-XXL text encoder; the probe"):
        verify(t5, VerifySettings(probe=True), t5)
    static = verify(ae)  # the static checks and the VAE round trip: no transformer check
    names = [c.name for c in static.checks]
    assert "static.keys.transformer" not in names and "vae.round_trip" in names
    assert static.arch == "flux" and not static.failed


def _llama_cpp_names(kinds: dict[str, tuple[str, tuple[int, ...]]], layers: int,
                     extra: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tensor names as llama.cpp writes them (gguf-py's ``TENSOR_NAMES``:
    an independent table), ``kinds``: MODEL_TENSOR name -> (suffix, shape)
    per layer."""
    import gguf

    names = gguf.TENSOR_NAMES
    out = {f"{names[getattr(gguf.MODEL_TENSOR, k)]}.weight": s for k, s in extra.items()}
    for i in range(layers):
        for kind, (suffix, shape) in kinds.items():
            out[f"{names[getattr(gguf.MODEL_TENSOR, kind)].format(bid=i)}.{suffix}"] = shape
    return out


def test_gguf_text_encoders_are_named_in_comfyui_ggufs_names(tmp_path: Path) -> None:
    """city96's T5 and Qwen3 GGUF files hold llama.cpp's names; ComfyUI-GGUF
    maps them back (loader.py) and so does inspect: T5-XXL and Qwen3, complete."""
    import gguf

    w, ff, hd = 64, 96, 16
    t5 = _llama_cpp_names(
        {**{f"ENC_ATTN_{p}": ("weight", (w, w)) for p in ("Q", "K", "V", "OUT")},
         "ENC_ATTN_NORM": ("weight", (w,)), "ENC_FFN_GATE": ("weight", (ff, w)),
         "ENC_FFN_UP": ("weight", (ff, w)), "ENC_FFN_DOWN": ("weight", (w, ff)),
         "ENC_FFN_NORM": ("weight", (w,))}, 2,
        {"TOKEN_EMBD": (100, w), "ENC_OUTPUT_NORM": (w,)})
    t5["enc.blk.0.attn_rel_b.weight"] = (32, 4)  # the first layer's only (T5, not UMT5)
    qwen3 = _llama_cpp_names(
        {"ATTN_NORM": ("weight", (w,)), "ATTN_Q": ("weight", (4 * hd, w)),
         "ATTN_K": ("weight", (2 * hd, w)), "ATTN_V": ("weight", (2 * hd, w)),
         "ATTN_OUT": ("weight", (w, 4 * hd)), "ATTN_Q_NORM": ("weight", (hd,)),
         "ATTN_K_NORM": ("weight", (hd,)), "FFN_NORM": ("weight", (w,)),
         "FFN_GATE": ("weight", (ff, w)), "FFN_UP": ("weight", (ff, w)),
         "FFN_DOWN": ("weight", (w, ff))}, 2,
        {"TOKEN_EMBD": (100, w), "OUTPUT_NORM": (w,)})
    for arch, keys, comp in (("t5encoder", t5, "t5xxl"), ("qwen3", qwen3, "qwen3")):
        path = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        for k, s in keys.items():
            writer.add_tensor(k, np.zeros(s, dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        d = inspect_model(path).to_dict()
        assert (d["kind"], d["component"]["name"]) == ("text_encoder", comp), arch
        c = d["components"]["te"]
        assert (c["complete"], c["n_tensors"], c["n_unexpected"]) == (True, len(keys), 0)
