"""Block lists, key -> block maps over every generated key of every
architecture, presets and the block-spec parser (each form and each error)."""

from __future__ import annotations

import re

import pytest

from modelkit.arch.blocks import (
    MAPS,
    PRESET_DOCS,
    block_names,
    block_of,
    parse_blocks,
    preset,
    preset_names,
)
from modelkit.arch.configs import ARCHS, UNET_PREFIX, VAE_PREFIX
from modelkit.arch.keys import checkpoint_keys, unet_keys
from modelkit.errors import ModelkitError

U = UNET_PREFIX
N_IO = {"sd1": 12, "sd2": 12, "sdxl": 9, "sdxl_refiner": 12}
SD26 = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]]
XL20 = ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]]


# --- block lists --------------------------------------------------------------------


def test_block_names() -> None:
    assert block_names("sd1") == SD26 and len(SD26) == 26
    assert block_names("sd2") == SD26
    assert block_names("sdxl_refiner") == SD26
    assert block_names("sdxl") == XL20 and len(XL20) == 20
    assert block_names("sdxl", vae_slot=True) == [*XL20, "VAE"]
    assert block_names("sd1", vae_slot=True) == [*SD26, "VAE"]
    assert len(block_names("flux", vae_slot=True)) == 63  # its own map, no VAE entry
    with pytest.raises(ModelkitError, match=r"unknown architecture 'sd4'.*sd1, sd2, sdxl"):
        block_names("sd4")


# --- key -> block -----------------------------------------------------------------------


def test_specific_keys() -> None:
    cases = [
        ("sd1", U + "time_embed.0.weight", "IN00", "BASE"),
        ("sd1", U + "time_embed.2.bias", "IN00", "BASE"),
        ("sdxl", U + "label_emb.0.0.weight", "IN00", "BASE"),
        ("sdxl", U + "time_embed.0.weight", "IN00", "BASE"),
        ("sd1", U + "out.2.weight", "OUT11", "OUT11"),
        ("sd1", U + "out.0.bias", "OUT11", "OUT11"),
        ("sdxl", U + "out.2.weight", "OUT08", "OUT08"),
        ("sdxl_refiner", U + "out.0.weight", "OUT11", "OUT11"),
        ("sd1", U + "output_blocks.11.1.proj_out.weight", "OUT11", "OUT11"),
        ("sd1", U + "output_blocks.3.0.out_layers.3.weight", "OUT03", "OUT03"),
        ("sd1", U + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
         "IN01", "IN01"),
        ("sd1", U + "input_blocks.10.0.in_layers.0.weight", "IN10", "IN10"),
        ("sd1", U + "input_blocks.11.0.emb_layers.1.bias", "IN11", "IN11"),
        ("sd1", U + "middle_block.1.proj_out.weight", "M00", "M00"),
        ("sdxl", U + "middle_block.2.out_layers.3.bias", "M00", "M00"),
        ("sdxl", U + "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0.bias",
         "IN08", "IN08"),
        ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
         "BASE", "BASE"),
        ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight",
         "BASE", "BASE"),
        ("sdxl", "conditioner.embedders.1.model.ln_final.weight", "BASE", "BASE"),
        ("sd1", VAE_PREFIX + "decoder.conv_out.weight", "BASE", "BASE"),
        ("sdxl", VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight", "BASE", "BASE"),
        ("sd1", "model_ema.diffusion_modelout2weight", "BASE", "BASE"),
        ("sd1", "alphas_cumprod", "BASE", "BASE"),
        # not a key any config generates: unknown UNet parts differ between maps
        ("sd1", U + "input_blocks.12.0.weight", "BASE", "OUT11"),
        ("sdxl", U + "something_new.weight", "BASE", "OUT08"),
    ]
    for arch, key, sm, mecha in cases:
        assert block_of(key, arch) == sm, key
        assert block_of(key, arch, "supermerger") == sm, key
        assert block_of(key, arch, "mecha") == mecha, key


def test_vae_slot() -> None:
    key = VAE_PREFIX + "encoder.conv_in.weight"
    for m in MAPS:
        assert block_of(key, "sdxl", m) == "BASE"
        assert block_of(key, "sdxl", m, vae_slot=True) == "VAE"
        assert block_of(key, "sd1", m, vae_slot=True) == "VAE"
    te = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert block_of(te, "sdxl", vae_slot=True) == "BASE"


def test_block_of_errors() -> None:
    with pytest.raises(ModelkitError, match="unknown block map 'comfy'; known: supermerger"):
        block_of(U + "out.0.weight", "sd1", "comfy")
    with pytest.raises(ModelkitError, match="unknown architecture"):
        block_of(U + "out.0.weight", "sd4")


def _expected(key: str, arch: str, map_name: str, vae_slot: bool) -> str:
    """An independent regex oracle for the documented maps."""
    last = f"OUT{N_IO[arch] - 1:02d}"
    m = re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.", key)
    if m:
        return f"{'IN' if m[1] == 'input' else 'OUT'}{int(m[2]):02d}"
    if re.match(r"model\.diffusion_model\.middle_block\.", key):
        return "M00"
    if re.match(r"model\.diffusion_model\.out\.\d+\.", key):
        return last
    if re.match(r"model\.diffusion_model\.(time_embed|label_emb)\.", key):
        return "IN00" if map_name == "supermerger" else "BASE"
    assert not key.startswith(U), key
    if vae_slot and key.startswith("first_stage_model."):
        return "VAE"
    return "BASE"


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("map_name", MAPS)
@pytest.mark.parametrize("vae_slot", [False, True])
def test_every_key_lands_in_documented_block(arch: str, map_name: str,
                                             vae_slot: bool) -> None:
    keys = checkpoint_keys(ARCHS[arch], ema=True)
    names = block_names(arch, vae_slot)
    hit: dict[str, int] = dict.fromkeys(names, 0)
    for key in keys:
        block = block_of(key, arch, map_name, vae_slot)
        assert block == _expected(key, arch, map_name, vae_slot), key
        hit[block] += 1
    # every block gets keys; every UNet block gets UNet keys
    assert all(hit.values()), hit
    unet_hit = {block_of(U + k, arch, map_name, vae_slot) for k in unet_keys(ARCHS[arch].unet)}
    io_blocks = set(names) - {"BASE", "VAE"}
    # mecha sends time_embed/label_emb to BASE; supermerger keeps the UNet off BASE
    assert unet_hit == (io_blocks | {"BASE"} if map_name == "mecha" else io_blocks)


# --- presets -----------------------------------------------------------------------


def test_presets_sd1() -> None:
    assert set(preset_names()) == set(PRESET_DOCS)
    assert set(preset_names()) >= {"flat_0", "flat_1", "flat_half", "gradient_in_to_out",
                                   "gradient_out_to_in", "in_only", "out_only", "mid_only",
                                   "in_half", "out_half", "base_only"}
    g = preset("gradient_in_to_out", "sd1")
    assert list(g) == SD26
    assert g["BASE"] == 0 and g["IN00"] == 0 and g["OUT11"] == 1 and g["M00"] == 0.5
    assert g["IN01"] == pytest.approx(1 / 24)
    r = preset("gradient_out_to_in", "sd1")
    assert all(r[n] == pytest.approx(1 - g[n]) for n in SD26[1:])
    assert [preset("in_only", "sd1")[n] for n in SD26] == [0] + [1] * 12 + [0] * 13
    assert [preset("out_only", "sd1")[n] for n in SD26] == [0] * 14 + [1] * 12
    assert [preset("mid_only", "sd1")[n] for n in SD26] == [0] * 13 + [1] + [0] * 12
    assert [preset("in_half", "sd1")[n] for n in SD26] == [0] + [0.5] * 12 + [0] * 13
    assert [preset("out_half", "sd1")[n] for n in SD26] == [0] * 14 + [0.5] * 12
    assert [preset("base_only", "sd1")[n] for n in SD26] == [1] + [0] * 25
    assert set(preset("flat_half", "sd1").values()) == {0.5}
    v = preset("gradient_v", "sd1")
    assert (v["IN00"], v["IN06"], v["M00"], v["OUT05"], v["OUT11"]) == (1, 0.5, 0, 0.5, 1)


def test_presets_sdxl_and_vae() -> None:
    g = preset("gradient_in_to_out", "sdxl")
    assert list(g) == XL20 and g["IN00"] == 0 and g["OUT08"] == 1 and g["M00"] == 0.5
    assert [preset("in_mid", "sdxl")[n] for n in XL20] == [0] + [1] * 10 + [0] * 9
    assert [preset("mid_out", "sdxl")[n] for n in XL20] == [0] * 10 + [1] * 10
    assert preset("base_only", "sdxl", vae_slot=True)["VAE"] == 1  # VAE follows BASE
    assert preset("unet_only", "sdxl", vae_slot=True)["VAE"] == 0
    for name in preset_names():
        for arch in ARCHS:
            p = preset(name, arch, vae_slot=True)
            assert list(p) == block_names(arch, True)
            assert all(0 <= x <= 1 for x in p.values())
    with pytest.raises(ModelkitError, match="unknown block preset 'nope'"):
        preset("nope", "sd1")


# --- parsing: accepted forms ------------------------------------------------------------


def test_parse_list_and_string() -> None:
    values = [i / 25 for i in range(26)]
    out = parse_blocks(values, "sd1")
    assert list(out) == SD26 and list(out.values()) == values
    assert parse_blocks(tuple(values), "sd2") == out
    text = ",".join(str(v) for v in values)
    assert parse_blocks(text, "sd1") == out
    assert parse_blocks(" 0, 1 ," + ",".join(["0.5"] * 24), "sd1")["IN00"] == 1.0
    xl = parse_blocks(list(range(20)), "sdxl")
    assert xl["BASE"] == 0 and xl["M00"] == 10 and xl["OUT08"] == 19
    assert all(isinstance(v, float) for v in xl.values())


def test_parse_vae_slot_lists() -> None:
    xl21 = parse_blocks(list(range(21)), "sdxl", vae_slot=True)
    assert xl21["VAE"] == 20 and list(xl21) == [*XL20, "VAE"]
    xl20 = parse_blocks([0.25] + [1] * 19, "sdxl", vae_slot=True)
    assert xl20["VAE"] == 0.25  # VAE follows BASE when left off
    sd = parse_blocks([0.5] + [0] * 25, "sd1", vae_slot=True)
    assert sd["VAE"] == 0.5 and len(sd) == 27


def test_parse_scalar_and_preset() -> None:
    assert parse_blocks(0.5, "sd1") == dict.fromkeys(SD26, 0.5)
    assert parse_blocks(1, "sdxl") == dict.fromkeys(XL20, 1.0)
    assert parse_blocks("0.25", "sdxl") == dict.fromkeys(XL20, 0.25)
    assert parse_blocks("in_only", "sd1") == preset("in_only", "sd1")
    assert parse_blocks(" Gradient_In_To_Out ", "sdxl") == preset("gradient_in_to_out", "sdxl")
    assert parse_blocks("flat_1", "sdxl", vae_slot=True)["VAE"] == 1.0


def test_parse_mapping() -> None:
    out = parse_blocks({"IN00-IN05": 0.3, "M00": 1, "OUT": 0.5, "default": 0}, "sd1")
    assert [out[f"IN{i:02d}"] for i in range(12)] == [0.3] * 6 + [0.0] * 6
    assert out["M00"] == 1 and out["BASE"] == 0
    assert all(out[f"OUT{i:02d}"] == 0.5 for i in range(12))
    # specificity: name > range > group > default, regardless of order
    out = parse_blocks({"OUT11": 1, "OUT": 0.5, "OUT00-OUT02": 0.2, "*": 0.1}, "sd1")
    assert (out["OUT11"], out["OUT05"], out["OUT01"], out["IN03"]) == (1, 0.5, 0.2, 0.1)
    # case-insensitive names, MID group, a range across groups in list order
    out = parse_blocks({"in08-out01": 1, "base": 0.5, "DEFAULT": 0}, "sdxl")
    assert [out[n] for n in ("IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02")] == \
        [0, 1, 1, 1, 1, 0]
    assert parse_blocks({"MID": 1, "default": 0}, "sdxl")["M00"] == 1
    # complete without default
    full = {"BASE": 0, "IN": 1, "M00": 0.5, "OUT": 0}
    assert parse_blocks(full, "sdxl")["M00"] == 0.5
    # VAE follows BASE unless named, also with a default
    v = parse_blocks({"BASE": 1, "default": 0}, "sdxl", vae_slot=True)
    assert v["VAE"] == 1
    assert parse_blocks({"VAE": 0.2, "default": 0}, "sdxl", vae_slot=True)["VAE"] == 0.2
    # a parsed map parses to itself; string form of a mapping
    assert parse_blocks(out, "sdxl") == out
    s = parse_blocks("IN00-IN05=0.3, M00:1, OUT=0.5, default=0", "sd1")
    assert s == parse_blocks({"IN00-IN05": 0.3, "M00": 1, "OUT": 0.5, "default": 0}, "sd1")


# --- parsing: errors -----------------------------------------------------------------


@pytest.mark.parametrize(("spec", "arch", "vae", "message"), [
    ([0.5] * 25, "sd1", False,
     r"has 25 values; expected 26 weights \(BASE, IN00..IN11, M00, OUT00..OUT11\) "
     r"\(the first value is BASE"),
    ([0.5] * 26, "sdxl", False, r"has 26 values; expected 20 weights \(BASE, IN00..IN08, M00"),
    ([0.5] * 19, "sdxl", True, r"has 19 values; expected 20 weights \(BASE, IN00..IN08, M00, "
                               r"OUT00..OUT08; 21 with the optional VAE entry last\) \(the first"),
    ("0.1,0.2", "sd1", False, "has 2 values; expected 26"),
    ([0.5] * 25 + ["x"], "sd1", False, r"block value 26 \(OUT11\): 'x' is not a number"),
    ([0.5] * 25 + [None], "sd1", False, r"block value 26 \(OUT11\): None is not a number"),
    ([0.5] * 25 + [float("inf")], "sd1", False, "not a finite number"),
    ({"IN12": 1, "default": 0}, "sd1", False,
     r"unknown block 'IN12' for sd1; use names from BASE, IN00..IN11"),
    ({"IN09": 1, "default": 0}, "sdxl", False, "unknown block 'IN09' for sdxl"),
    ({"IN05-IN00": 1, "default": 0}, "sd1", False,
     "block range 'IN05-IN00' is reversed; write 'IN00-IN05'"),
    ({"IN00-IN99": 1, "default": 0}, "sd1", False, "unknown block 'IN00-IN99'"),
    ({"VAE": 1, "default": 0}, "sdxl", False, "unknown block 'VAE'"),
    ({"IN": 1, "OUT": 0}, "sd1", False, "no value for blocks BASE, M00 of sd1"),
    ({"IN00-IN03": 1, "IN02-IN05": 0, "default": 0}, "sd1", False,
     "blocks 'IN00-IN03' and 'IN02-IN05' both set IN02 with different values"),
    ({"M00": "lots", "default": 0}, "sd1", False, "block 'M00': 'lots' is not a number"),
    ("nope", "sd1", False, "unknown block preset 'nope'; known: flat_0"),
    ("IN=1, 0.5", "sd1", False, "block item '0.5' must be NAME=VALUE"),
    (True, "sd1", False, "True is not a number"),
    ({1, 2}, "sd1", False, "cannot read set"),
    ("flat_1", "sd4", False, "unknown architecture 'sd4'"),
])
def test_parse_errors(spec: object, arch: str, vae: bool, message: str) -> None:
    with pytest.raises(ModelkitError, match=message):
        parse_blocks(spec, arch, vae_slot=vae)


def test_blocks_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import modelkit.arch.blocks, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
