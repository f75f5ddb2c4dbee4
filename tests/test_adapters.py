"""Adapter module names (modelkit.arch.lora_names), adapter fixtures
(modelkit.testing.lora) and header-only detection (modelkit.inspect.adapters)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit.arch.configs import ARCHS, TINY, UNET_PREFIX
from modelkit.arch.keys import checkpoint_keys, component_keys, unet_keys
from modelkit.arch.lora_names import (
    ModuleTarget,
    checkpoint_key_modules,
    lora_module_map,
    lora_module_targets,
    resolve_module,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from modelkit.inspect.adapters import AdapterInfo, detect_adapter, read_alphas, split_key
from modelkit.io.header import TensorInfo, read_header
from modelkit.testing import write_embedding, write_unet
from modelkit.testing.lora import factorization, lokr_shapes, lora_keys, write_lora

ARCH_NAMES = ("sd1", "sd2", "sdxl")
TABLES = {"tiny": TINY, "full": ARCHS}


def _detect(path: Path) -> AdapterInfo | None:
    header = read_header(path)
    return detect_adapter(header.tensors, header.metadata)


def _fields(info: AdapterInfo | None) -> dict[str, object]:
    assert info is not None
    d = info.to_dict()
    return {k: d[k] for k in ("format", "naming", "n_modules", "ranks", "targets", "arch",
                              "conv_modules")}


# --- LDM <-> diffusers UNet map ------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_unet_map_covers_every_module_once(arch: str, size: str) -> None:
    cfg = TABLES[size][arch].unet
    to_diffusers = unet_ldm_to_diffusers(cfg)
    modules = {k.rsplit(".", 1)[0] for k in unet_keys(cfg)}
    assert set(to_diffusers) == modules
    assert len(set(to_diffusers.values())) == len(to_diffusers)
    back = unet_diffusers_to_ldm(cfg)
    assert all(back[d] == m for m, d in to_diffusers.items())


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_unet_map_known_pairs(size: str) -> None:
    sd1 = unet_diffusers_to_ldm(TABLES[size]["sd1"].unet)
    sdxl = unet_diffusers_to_ldm(TABLES[size]["sdxl"].unet)
    expected_sd1 = {
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k":
            "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        # up_blocks.0 has no attention in SD1: its upsampler is the block's 2nd module
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "conv_norm_out": "out.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
    }
    assert {k: sd1[k] for k in expected_sd1} == expected_sd1
    expected_sdxl = {
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    assert {k: sdxl[k] for k in expected_sdxl} == expected_sdxl
    assert "down_blocks.0.attentions.0.proj_in" not in sdxl  # SDXL level 0: no attention


# --- kohya module map ----------------------------------------------------------------


def _fits(target: ModuleTarget, key_shapes: dict[str, tuple[int, ...]]) -> bool:
    full = key_shapes[target.key]
    if target.rows is None:
        return target.shape == full
    start, stop = target.rows
    return 0 <= start < stop <= full[0] and target.shape == (stop - start, *full[1:])


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("naming", ["kohya", "peft", "comfyui"])
def test_module_map_targets_exist_with_their_shapes(arch: str, size: str,
                                                    naming: str) -> None:
    spec = TABLES[size][arch]
    keys: dict[str, tuple[int, ...]] = {}
    for comp in component_keys(spec).values():
        keys.update(comp)
    targets = lora_module_targets(spec, naming)
    assert targets
    for name, t in targets.items():
        assert t.name == name
        assert t.key in keys and _fits(t, keys), name
        assert t.bias_key is None or t.bias_key in keys, name
    assert lora_module_map(spec, naming) == {n: t.key for n, t in targets.items()}


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_fixture_shapes_fit_targets(arch: str, size: str) -> None:
    """Every adapter module's factors rebuild a ΔW of the target weight's shape."""
    spec = TABLES[size][arch]
    for kind in ("lora", "loha", "lokr", "peft", "full"):
        naming = "peft" if kind == "peft" else "kohya"
        targets = lora_module_targets(spec, naming)
        keys = lora_keys(arch, kind=kind, tiny=size == "tiny", conv=True, conv_rank=2)
        modules = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys}
        for module in modules:
            out, inn = _delta_shape(kind, module, keys)
            t = targets[module]
            assert (out, inn) == (t.shape[0], math.prod(t.shape[1:])), (kind, module)


def _delta_shape(kind: str, m: str, keys: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    if kind in ("lora", "peft"):
        down, up = ((f"{m}.lora_down.weight", f"{m}.lora_up.weight") if kind == "lora"
                    else (f"{m}.lora_A.weight", f"{m}.lora_B.weight"))
        assert keys[down][0] == keys[up][1] and math.prod(keys[up][2:]) == 1
        return keys[up][0], math.prod(keys[down][1:])
    if kind == "loha":
        assert keys[f"{m}.hada_w1_a"][1] == keys[f"{m}.hada_w1_b"][0]
        return keys[f"{m}.hada_w1_a"][0], keys[f"{m}.hada_w1_b"][1]
    if kind == "lokr":
        w1 = keys[f"{m}.lokr_w1"]
        if f"{m}.lokr_w2" in keys:
            w2 = keys[f"{m}.lokr_w2"]
            return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
        a, b = keys[f"{m}.lokr_w2_a"], keys[f"{m}.lokr_w2_b"]
        return w1[0] * a[0], w1[1] * b[1]
    diff = keys[f"{m}.diff"]
    return diff[0], math.prod(diff[1:])


def test_sd1_kohya_names_use_diffusers_paths() -> None:
    spec = ARCHS["sd1"]
    targets = lora_module_targets(spec)
    p = UNET_PREFIX
    expected = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            (p + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320)),
        "lora_unet_down_blocks_0_resnets_0_conv1":
            (p + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
        "lora_unet_down_blocks_0_attentions_0_proj_in":
            (p + "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv":
            (p + "output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        "lora_unet_time_embedding_linear_1": (p + "time_embed.0.weight", (1280, 320)),
        "lora_te_text_model_encoder_layers_0_mlp_fc1":
            ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
             (3072, 768)),
    }
    assert {n: (targets[n].key, targets[n].shape) for n in expected} == expected
    unet = [n for n in targets if n.startswith("lora_unet_")]
    assert not any(n.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))
                   for n in unet)
    groups = [t.group for t in targets.values()]
    assert groups.count("transformer") == 192 and groups.count("text") == 72


def test_sdxl_kohya_names_use_ldm_paths() -> None:
    spec = ARCHS["sdxl"]
    targets = lora_module_targets(spec)
    p = UNET_PREFIX
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            (p + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", (640, 640)),
        "lora_unet_input_blocks_1_0_in_layers_2":
            (p + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
        "lora_unet_output_blocks_2_2_conv":
            (p + "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1":
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1"
             ".weight", (3072, 768)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1":
            ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
             (5120, 1280)),
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight",
             (1280, 1280)),
    }
    assert {n: (targets[n].key, targets[n].shape) for n in expected} == expected
    assert not any(n.startswith("lora_unet_down_blocks") for n in targets)
    groups = [t.group for t in targets.values()]
    assert groups.count("transformer") == 722  # 70 blocks x 10 + 11 x proj_in/out
    assert groups.count("text") == 72 + 192
    # SDXL LoRAs saved with diffusers paths still resolve (kohya remaps them on load)
    alias = resolve_module(spec, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0"
                                 "_attn1_to_q")
    assert alias is not None
    assert alias.key == p + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.mark.parametrize("arch,slot", [("sd2", "te"), ("sdxl", "te2")])
def test_open_clip_qkv_are_row_thirds_of_in_proj(arch: str, slot: str) -> None:
    spec = ARCHS[arch]
    width = next(s.config.width for s in spec.text_encoders if s.name == slot)
    base = f"lora_{slot}_text_model_encoder_layers_3_self_attn_"
    targets = lora_module_targets(spec)
    rows = [targets[base + p].rows for p in ("q_proj", "k_proj", "v_proj")]
    assert rows == [(0, width), (width, 2 * width), (2 * width, 3 * width)]
    key = targets[base + "q_proj"].key
    assert key.endswith("transformer.resblocks.3.attn.in_proj_weight")
    assert targets[base + "k_proj"].bias_key == key.replace("_weight", "_bias")
    assert checkpoint_key_modules(spec)[key] == [base + p for p in
                                                 ("q_proj", "k_proj", "v_proj")]
    assert targets[base + "out_proj"].rows is None


def test_lokr_factorization_matches_lycoris_examples() -> None:
    assert [factorization(d) for d in (320, 640, 768, 1280, 2560)] == [
        (16, 20), (20, 32), (24, 32), (32, 40), (40, 64)]
    assert factorization(320, 8) == (8, 40)
    assert lokr_shapes((320, 320), rank=16) == {"lokr_w1": (16, 16), "lokr_w2": (20, 20)}
    assert lokr_shapes((320, 320), rank=4) == {
        "lokr_w1": (16, 16), "lokr_w2_a": (20, 4), "lokr_w2_b": (4, 20)}
    assert lokr_shapes((320, 320, 3, 3), rank=4)["lokr_w2_b"] == (4, 180)


# --- detection -----------------------------------------------------------------------


def test_detect_sd1_kohya_lora(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd1", rank=4, alpha=8)
    info = _detect(path)
    assert _fields(info) == {"format": "lora", "naming": "kohya", "n_modules": 264,
                             "ranks": [4], "targets": ["unet", "te"], "arch": "sd1",
                             "conv_modules": 32}  # SD1 proj_in/proj_out are 1x1 convs
    assert info is not None and info.alphas == [8.0]
    assert "metadata ss_base_model_version=sd_v1" in info.arch_evidence


def test_detect_sd1_locon_and_read_alphas(tmp_path: Path) -> None:
    from modelkit.io.reader import open_model

    path = tmp_path / "a.safetensors"
    write_lora(path, "sd1", conv=True, rank=4, alpha=1, conv_rank=8, conv_alpha=2)
    info = _detect(path)
    assert _fields(info) == {"format": "locon", "naming": "kohya", "n_modules": 350,
                             "ranks": [4, 8], "targets": ["unet", "te"], "arch": "sd1",
                             "conv_modules": 96}
    assert info is not None and info.alphas == [1.0, 2.0]
    with open_model(path) as src:
        assert read_alphas(src.keys(), src.get) == [1.0, 2.0]


def test_detect_sd2_loha(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd2", kind="loha", rank=2)
    info = _detect(path)
    assert _fields(info) == {"format": "loha", "naming": "kohya",
                             "n_modules": 192 + 23 * 6, "ranks": [2],
                             "targets": ["unet", "te"], "arch": "sd2", "conv_modules": 0}
    keys = read_header(path).tensors
    assert not any("layers_23_" in k for k in keys)  # kohya trains 23 of SD2's 24 layers
    assert read_header(path).metadata["ss_network_module"] == "lycoris.kohya"


@pytest.mark.parametrize("rank,ranks", [(4, [4]), (16, [])])
def test_detect_sdxl_lokr(tmp_path: Path, rank: int, ranks: list[int]) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sdxl", kind="lokr", rank=rank)
    info = _detect(path)
    assert _fields(info) == {"format": "lokr", "naming": "kohya", "n_modules": 986,
                             "ranks": ranks, "targets": ["unet", "te1", "te2"],
                             "arch": "sdxl", "conv_modules": 0}
    has_low_rank = any(k.endswith("lokr_w2_a") for k in read_header(path).tensors)
    assert has_low_rank == bool(ranks)


def test_detect_sdxl_locon_conv_modules(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sdxl", conv=True, text_encoder=False)
    # 17 res blocks: 34 conv1/conv2 + 11 skip convs (+ 17 Linear time_emb_proj),
    # plus 2 down- and 2 upsamplers: 49 conv modules
    assert _fields(_detect(path)) == {"format": "locon", "naming": "kohya",
                                      "n_modules": 722 + 62 + 4, "ranks": [4],
                                      "targets": ["unet"], "arch": "sdxl",
                                      "conv_modules": 49}


def test_detect_peft(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sdxl", kind="peft", rank=8, alpha=4)
    info = _detect(path)
    assert _fields(info) == {"format": "peft", "naming": "peft",
                             "n_modules": 70 * 8 + 12 * 4 + 32 * 4, "ranks": [8],
                             "targets": ["unet", "te1", "te2"], "arch": "sdxl",
                             "conv_modules": 0}
    assert info is not None and info.alphas == [4.0]
    # tiny SD1 attention-only PEFT: nothing tells SD1 from SD2 (widths are tiny)
    write_lora(path, "sd1", kind="peft")
    info = _detect(path)
    assert info is not None and (info.arch, info.n_modules) == ("unknown", 16 * 8 + 12 * 4)


def test_detect_comfyui(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd2", kind="comfyui")
    info = _detect(path)
    assert _fields(info) == {"format": "comfyui", "naming": "comfyui",
                             "n_modules": 192 + 24 * 6, "ranks": [4],
                             "targets": ["unet", "te"], "arch": "sd2", "conv_modules": 0}
    assert info is not None and info.alphas is None


@pytest.mark.parametrize("kind,fmt", [("lora", "dora"), ("peft", "dora"),
                                      ("full", "full"), ("ia3", "ia3")])
def test_detect_dora_full_ia3(tmp_path: Path, kind: str, fmt: str) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd1", kind=kind, dora=fmt == "dora", text_encoder=False)
    info = _detect(path)
    assert info is not None
    assert (info.format, info.naming, info.n_modules) == (
        fmt, "peft" if kind == "peft" else "kohya", 128 if kind == "peft" else 192)
    assert info.ranks == ([4] if fmt == "dora" else [])


@pytest.mark.parametrize("arch,context", [("sd1", 768), ("sd2", 1024)])
def test_full_size_arch_from_widths(tmp_path: Path, arch: str, context: int) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, arch, kind="peft", tiny=False, text_encoder=False, with_metadata=False)
    info = _detect(path)
    assert info is not None and info.arch == arch
    assert any(f"input width {context}" in e for e in info.arch_evidence)


def test_arch_from_structure_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd1", text_encoder=False, with_metadata=False)
    info = _detect(path)
    assert info is not None and info.arch == "sd1" and info.alphas is None
    write_lora(path, "sd2", text_encoder=False, with_metadata=False)
    assert _detect(path).arch == "sd2"  # type: ignore[union-attr]
    write_lora(path, "sdxl", with_metadata=False)
    info = _detect(path)
    assert info is not None and info.arch == "sdxl"
    assert any("lora_te1_" in e for e in info.arch_evidence)


def test_conflicting_evidence_gives_unknown(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_lora(path, "sd1", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    info = _detect(path)
    assert info is not None and info.arch == "unknown"
    assert any("conflict" in e for e in info.arch_evidence)


@pytest.mark.parametrize("arch", [*ARCH_NAMES, "sdxl_refiner"])
def test_checkpoint_headers_are_not_adapters(arch: str) -> None:
    keys = checkpoint_keys(ARCHS[arch], ema=arch == "sd1")
    infos = {k: TensorInfo(k, "F16", s, 0, 0) for k, s in keys.items()}
    assert detect_adapter(infos, {}) is None


def test_checkpoint_and_embedding_files_are_not_adapters(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    write_unet(path, "sd1")
    assert _detect(path) is None
    path = tmp_path / "emb.safetensors"
    write_embedding(path, "sd1")
    assert _detect(path) is None


def test_split_key_spellings() -> None:
    assert split_key("lora_unet_x_to_q.lora_down.weight") == ("lora_unet_x_to_q",
                                                              "lora_down.weight")
    assert split_key("unet.a.to_q.lora.down.weight") == ("unet.a.to_q", "lora.down.weight")
    assert split_key("unet.a.attn1.processor.to_out_lora.up.weight") == (
        "unet.a.attn1.to_out.0", "lora.up.weight")
    assert split_key("lora_te_x.hada_w1_a") == ("lora_te_x", "hada_w1_a")
    assert split_key("model.diffusion_model.out.2.weight") is None


def test_detection_module_does_not_import_torch() -> None:
    code = ("import sys, modelkit.inspect.adapters, modelkit.arch.lora_names\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
