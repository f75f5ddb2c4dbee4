"""The architecture registry: every entry declares every field, every name list
elsewhere is derived from it, and inspect names Flux.1 family, variant and
layout from full-size sparse headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from modelkit.arch import layouts, registry
from modelkit.arch.blocks import MAPS, block_names
from modelkit.arch.lora_names import NAMINGS
from modelkit.arch.registry import DETECT, FULL, PARTIAL, REGISTRY, Architecture, Rule
from modelkit.inspect.report import inspect_model
from modelkit.testing import write_sparse_flux
from modelkit.vocab import USER_DTYPES

OPTIONAL = {"variants", "layout_rules", "notes"}  # may be empty for any entry
# what a family that inspect recognises but other commands refuse may leave out
DETECT_ONLY = {"spec", "blocks", "lora", "diffusers", "gguf", "commands", "probe"}
# a family some commands handle: the tables of the commands not done yet
PARTIAL_ONLY = {"spec", "diffusers", "gguf", "probe"}
# a transformer family (no LDM config): its diffusers names are its layout map
# (modelkit/arch/layouts.py), not an LDM config and pipeline list
TRANSFORMER_ONLY = {"commands", "spec", "diffusers"}
# every command a PARTIAL entry may list
COMMANDS = {"inspect", "hash", "merge", "convert", "prune", "extract", "swap", "ema",
            "library", "tui", "lora bake", "lora info", "lora extract", "lora resize",
            "lora merge", "lora convert"}


def _rule_conditions(rule: Rule) -> int:
    return len(rule.keys) + len(rule.absent) + len(rule.shapes) + len(rule.features)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_architecture_declares_every_field(name: str) -> None:
    arch = REGISTRY[name]
    assert arch.name == name and arch.support in (FULL, PARTIAL, DETECT)
    ldm = arch.spec is not None
    allowed_empty = OPTIONAL | {FULL: {"commands"} if ldm else TRANSFORMER_ONLY,
                                PARTIAL: PARTIAL_ONLY, DETECT: DETECT_ONLY}[arch.support]
    for f in fields(Architecture):
        value = getattr(arch, f.name)
        if f.name not in allowed_empty:
            assert value not in (None, "", ()), f"{name} does not declare {f.name}"
    assert arch.detect and all(_rule_conditions(r) > 0 and r.evidence for r in arch.detect)
    assert all(_rule_conditions(v.rule) > 0 for v in arch.variants)
    assert len({v.name for v in arch.variants}) <= len(arch.variants)
    assert set(arch.layouts) <= {registry.ORIGINAL, registry.DIFFUSERS}
    assert {layout for layout, _ in arch.layout_rules} <= set(arch.layouts)
    assert [c.role for c in arch.components].count(registry.DENOISER) == 1
    assert arch.default_dtype in USER_DTYPES
    assert arch.verify in (registry.RENDER, registry.PROBE)
    assert arch.prediction in (registry.EPS, registry.EPS_OR_V, registry.FLOW)
    if arch.support == PARTIAL:  # its own block map and LoRA table, the commands named
        assert arch.blocks is not None and list(arch.blocks.names) == block_names(name)
        assert arch.lora is not None and arch.lora.modules is not None
        assert arch.commands <= COMMANDS
    if "convert" in arch.commands or (arch.support == FULL and not ldm):
        # convert --layout: a key map of both layouts (Qwen-Image has one)
        assert (name in layouts.MAPS) == (len(arch.layouts) == 2)
    if arch.support == FULL and not ldm:  # its own block list, LoRA table and probe
        assert arch.blocks is not None and list(arch.blocks.names) == block_names(name)
        assert arch.lora is not None and arch.lora.modules is not None and arch.lora.adapters
        assert arch.gguf is not None and arch.probe
    if arch.support == FULL and ldm:
        assert arch.blocks is not None and arch.lora is not None
        assert arch.diffusers is not None and arch.gguf is not None
        assert list(arch.blocks.names) == block_names(name)
        assert arch.blocks.maps == MAPS and arch.blocks.default_map in MAPS
        assert set(arch.lora.namings) <= set(NAMINGS)
        assert arch.pipeline(None) and {v.name for v in arch.variants} <= {
            v for v, _ in arch.diffusers.pipelines}
        slots = {s.name for s in arch.spec.text_encoders}
        assert {c.name for c in arch.components if c.role == registry.TEXT_ENCODER} == slots


def test_sd_entries_hold_the_known_facts() -> None:
    sd = ("sd1", "sd2", "sdxl", "sdxl_refiner")
    assert registry.names(where=lambda a: a.spec is not None) == sd
    assert registry.names(support=FULL) == registry.names()  # every family, every command
    assert [len(REGISTRY[a].blocks.names) for a in sd] == [26, 26, 20, 26]
    assert {a: REGISTRY[a].gguf.arch for a in sd} == {
        "sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl_refiner": "sdxl"}
    from modelkit.io.suffixes import GGUF_DIFFUSION_ARCHS  # what ComfyUI-GGUF loads

    assert {a.gguf.arch for a in REGISTRY.values() if a.gguf} <= GGUF_DIFFUSION_ARCHS
    assert [a for a in REGISTRY.values() if a.lora and a.lora.kohya_v2] == [REGISTRY["sd2"]]
    assert REGISTRY["sdxl"].diffusers.scaling_factor == 0.13025
    assert REGISTRY["sd2"].lora.kohya_te_dropped_layers == 1
    assert REGISTRY["sdxl_refiner"].pipeline(None) == "StableDiffusionXLImg2ImgPipeline"
    assert registry.listed() == registry.listed(registry.names())  # every family
    assert registry.same_family("sdxl", "sdxl_refiner")
    assert not registry.same_family("sd1", "sd2")
    assert REGISTRY["flux"].default_dtype == "bf16"
    assert registry.FLUX_BLOCKS[:5] == ("img_in", "time_in", "guidance_in", "vector_in",
                                        "txt_in")
    assert len(registry.FLUX_BLOCKS) == 5 + 19 + 38 + 1


def test_name_lists_elsewhere_are_the_registrys() -> None:
    from modelkit import vocab
    from modelkit.arch import adapter_keys, diffusers_names, lora_blocks, lora_names
    from modelkit.arch.detect import EMBEDDING_WIDTH_ARCH, TE_FAMILY_ARCH
    from modelkit.cli.info_cmd import PRESET_ARCHS
    from modelkit.cli.library_cmd import ARCHS
    from modelkit.convert.gguf import GGUF_ARCH
    from modelkit.inspect.adapters import ARCH_CANDIDATES
    from modelkit.inspect.compare import BLOCK_ARCHS
    from modelkit.library.layout import ARCH_FOLDER_NAMES, arch_name
    from modelkit.lora.adapter import LORA_ARCHS
    from modelkit.lora.output import BASE_MODEL_VERSION, MODELSPEC_ARCH
    from modelkit.verify.models import RENDER_ARCHS
    from modelkit.verify.tokenizer import PAD_ALT_SLOTS

    full = registry.names(where=lambda a: a.spec is not None)  # the LDM (SD) entries
    transformers = ("sd3", "flux", "chroma", "flux2", "qwen_image", "wan", "z_image")
    assert vocab.ARCH_NAMES == registry.names(support=FULL) == (*full, *transformers)
    assert vocab.RECOGNISED_ONLY == registry.names(support=DETECT) == ()
    assert registry.names(support=PARTIAL) == ()
    for command in ("convert", "lora bake", "lora info", "merge", "prune", "extract", "swap",
                    "ema", "hash", "library", "tui"):
        assert registry.handling(command) == (*full, *transformers), command
    # quantize, export-gguf and verify handle every entry declaring their table
    assert registry.handling("quantize") == registry.names()
    assert registry.handling("export-gguf") == registry.handling("verify") == registry.names()
    assert (*registry.names(), "unknown") == ARCHS
    assert set(ARCH_FOLDER_NAMES.values()) <= set(REGISTRY)
    assert ARCH_FOLDER_NAMES["sd1.5"] == "sd1" and ARCH_FOLDER_NAMES["flux1"] == "flux"
    assert [arch_name(a) for a in full] == ["SD1", "SD2", "SDXL", "SDXL refiner"]
    assert RENDER_ARCHS == BLOCK_ARCHS == full
    assert tuple(GGUF_ARCH) == registry.names(where=lambda a: a.gguf is not None) == (
        registry.names())
    # LoRA commands and LoRA block weights: every family but the refiner
    assert (*full[:3], *transformers) == LORA_ARCHS == lora_blocks.LBW_ARCHS
    for cmd in ("lora extract", "lora resize", "lora merge", "lora convert"):
        assert registry.handling(cmd) == (*full, *transformers)
    assert ARCH_CANDIDATES == ("sd1", "sd2", "sdxl")  # those with LDM key tables
    assert {a for a, _ in diffusers_names.PIPELINES} == set(full)
    assert {"sdxl", "sdxl_refiner"} == lora_names.KOHYA_LDM_UNET
    assert adapter_keys.CONTEXT_DIMS == {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    assert PRESET_ARCHS == ("sd1", "sdxl", "sd3", "flux", "chroma", "flux2", "qwen_image", "wan",
                            "z_image")
    assert TE_FAMILY_ARCH == {"CLIP-L": "sd1", "OpenCLIP-H": "sd2", "OpenCLIP-bigG": "sdxl"}
    assert EMBEDDING_WIDTH_ARCH == {768: "sd1", 1024: "sd2"}
    pad_alt = {("sd2", "tokenizer"), ("sdxl", "tokenizer_2"), ("sdxl_refiner", "tokenizer_2")}
    assert pad_alt == PAD_ALT_SLOTS
    # kohya sd-scripts (flux1, chroma) and musubi-tuner (architecture_full_name)
    assert BASE_MODEL_VERSION == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
                                  "sd3": None, "flux": "flux1", "chroma": "chroma",
                                  "flux2": "flux_2_dev", "qwen_image": "qwen_image",
                                  "wan": "wan", "z_image": "z_image"}
    assert MODELSPEC_ARCH["sd3"] is None and MODELSPEC_ARCH["flux2"] is None
    assert MODELSPEC_ARCH["sdxl"] == "stable-diffusion-xl-v1-base/lora"


def test_registry_import_stays_light() -> None:
    code = "import modelkit.arch.registry, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ})
    assert out.stdout.strip() == "False"


# --- Flux.1 detection on full-size sparse headers -------------------------------

FLUX_CASES = [
    # variant written, layout, prefixed, all-in-one -> variant reported
    ("dev", "original", False, False, "dev"),
    ("schnell", "original", True, False, "schnell"),
    ("fill", "original", False, False, "fill"),
    ("depth", "original", True, False, "depth"),
    ("kontext", "original", False, False, "dev"),  # Kontext has dev's layout
    ("dev", "diffusers", False, False, "dev"),
    ("schnell", "diffusers", False, False, "schnell"),
    ("dev", "original", False, True, "dev"),
]


@pytest.mark.parametrize(("written", "layout", "prefixed", "aio", "variant"), FLUX_CASES)
def test_inspect_names_flux_family_variant_and_layout(
        tmp_path: Path, written: str, layout: str, prefixed: bool, aio: bool,
        variant: str) -> None:
    path = write_sparse_flux(tmp_path / "f.safetensors", written, layout=layout,
                             prefixed=prefixed, all_in_one=aio)
    assert path.stat().st_size > 20 * 10**9  # full size, sparse on disk
    d = inspect_model(path).to_dict()
    assert (d["arch"], d["variant"], d["layout"]) == ("flux", variant, layout)
    assert d["kind"] == ("checkpoint" if aio else "unet")
    assert d["prediction"]["type"] == "unknown"
    assert d["unknown_keys"] == []
    # every command handles Flux.1: no note says otherwise
    assert not any("do not" in n or "recognised only" in n for n in d["notes"])
    unet = d["components"]["unet"]
    assert unet["family"] == "Flux.1 transformer"
    assert unet["prefix"] == ("model.diffusion_model." if prefixed or aio else "")
    if aio:
        assert set(d["components"]) == {"unet", "vae", "clip_l", "t5xxl"}
        assert d["components"]["t5xxl"]["n_tensors"] == 1 + 24 * 9 + 1 + 1
    else:
        assert unet["n_params"] > 11.8e9  # Flux.1 has 11.9B parameters


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_flux_like_families_are_not_flux1(tmp_path: Path, layout: str) -> None:
    """Chroma (no vector_in, no per-block modulation) is Flux-like but not
    Flux.1: it reads as Chroma."""
    from modelkit.arch import flux
    from modelkit.io.writer import TensorSpec, write_sparse

    dropped = ("vector_in.", "time_text_embed.text_embedder.", "_mod.lin", "norm1.linear",
               "norm1_context.linear")
    keys = {k: s for k, s in flux.transformer_keys(flux.FluxConfig(hidden_size=256, num_heads=2,
                                                                   depth=1, depth_single_blocks=1),
                                                   layout).items()
            if not any(d in k for d in dropped)}
    keys["distilled_guidance_layer.in_proj.weight"] = (256, 64)
    path = write_sparse(tmp_path / "chroma.safetensors",
                        [TensorSpec(k, "BF16", s) for k, s in keys.items()])
    d = inspect_model(path).to_dict()
    assert (d["arch"], d["variant"], d["layout"]) == ("chroma", "chroma", layout)


def test_sd_checkpoints_report_the_original_layout(models: dict[str, Path]) -> None:
    d = inspect_model(models["sdxl"]).to_dict()
    assert (d["arch"], d["variant"], d["layout"]) == ("sdxl", None, "original")
    assert inspect_model(models["vae"]).to_dict()["layout"] is None


def test_inspect_cli_json_and_text_name_flux(tmp_path: Path) -> None:
    path = write_sparse_flux(tmp_path / "flux1-schnell.safetensors", "schnell",
                             layout="diffusers")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    exe = Path(sys.executable).with_name("modelkit")
    out = subprocess.run([str(exe), "inspect", "--json", str(path)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    d = d[0] if isinstance(d, list) else d
    assert (d["arch"], d["variant"], d["layout"]) == ("flux", "schnell", "diffusers")
    text = subprocess.run([str(exe), "inspect", str(path)], capture_output=True, text=True,
                          env=env)
    assert text.returncode == 0, text.stderr
    assert "layout      diffusers" in text.stdout and "variant     schnell" in text.stdout

