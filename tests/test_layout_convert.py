"""``convert --layout``: Flux.1, Chroma, Flux.2, SD3/SD3.5, Wan and Z-Image
transformers between the original and the diffusers layout, both ways.

The expected diffusers tensors are computed here from the original ones by
rename tables and row splits of this file's own (diffusers' converters'
rules: substring renames, ``qkv`` in three equal chunks, ``linear1`` split
at 3x the hidden width, adaLN halves swapped), not through the key maps the
command uses; the maps themselves are checked against the generated key
tables of both layouts (small and full size, headers only), and against
diffusers' own single-file converters in tests/test_render_families.py
(which imports diffusers anyway)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_converted

from modelkit.arch import chroma, flux, flux2, layouts, registry, sd3, wan, z_image
from modelkit.arch.configs import UNET_PREFIX
from modelkit.convert.layout import convert_layout, plan_layout
from modelkit.core.recipe import Recipe
from modelkit.engine.runner import run
from modelkit.errors import ModelkitError
from modelkit.inspect.describe import describe
from modelkit.io.reader import open_model
from modelkit.testing import flux_config, write_tensors
from tests.cli_support import run_here

Shapes = dict[str, tuple[int, ...]]
State = dict[str, torch.Tensor]

# --- small configs with the real key names ----------------------------------------

CHROMA = replace(chroma.ChromaConfig(), hidden_size=128, num_heads=1, depth=1,
                 depth_single_blocks=2, context_in_dim=32, approximator_hidden=64,
                 approximator_layers=2)
FLUX2 = replace(flux2.Flux2Config(), hidden_size=128, num_heads=1, depth=2,
                depth_single_blocks=1, context_in_dim=32)
ZIMAGE = replace(z_image.ZImageConfig(), dim=128, num_heads=1, num_layers=2,
                 num_refiner_layers=1, cap_feat_dim=32, t_hidden=64)


def _sd3(variant: str) -> sd3.SD3Config:
    return replace(sd3.VARIANTS[variant], depth=2, pos_embed_max=4, adm_in=32, context_in=32,
                   attn2_layers=min(1, sd3.VARIANTS[variant].attn2_layers))


def _wan(variant: str) -> wan.WanConfig:
    return replace(wan.small(wan.VARIANTS[variant]), ffn_dim=192, text_dim=32)


# case -> family, original keys, dtype, prefixed, whether the small file is detected
CASES: dict[str, tuple[str, Shapes, str, bool, bool]] = {
    "flux-dev": ("flux", flux.transformer_keys(flux_config("dev", hidden=128, depth=2,
                                                           single=1)), "BF16", False, True),
    "flux-schnell": ("flux", flux.transformer_keys(flux_config("schnell", hidden=128,
                                                               depth=1, single=2)),
                     "F16", True, True),
    "chroma": ("chroma", chroma.transformer_keys(CHROMA), "BF16", False, True),
    "flux2": ("flux2", flux2.transformer_keys(FLUX2), "BF16", True, True),
    "sd3-medium": ("sd3", sd3.transformer_keys(_sd3("sd3-medium")), "F16", True, True),
    "sd3.5-medium": ("sd3", sd3.transformer_keys(_sd3("sd3.5-medium")), "BF16", False, True),
    "sd3.5-large": ("sd3", sd3.transformer_keys(_sd3("sd3.5-large")), "F32", False, True),
    "wan-t2v-1.3b": ("wan", wan.transformer_keys(_wan("t2v-1.3b")), "BF16", False, True),
    "wan-i2v-14b": ("wan", wan.transformer_keys(_wan("i2v-14b")), "BF16", True, True),
    "wan-ti2v-5b": ("wan", wan.transformer_keys(_wan("ti2v-5b")), "F16", False, True),
    "wan-vace": ("wan", wan.transformer_keys(replace(_wan("vace"), vace_layers=(0, 1))),
                 "BF16", True, True),
    # Z-Image is told from Lumina 2.0 by its full width: a small one is not detected
    "z_image": ("z_image", z_image.transformer_keys(ZIMAGE), "BF16", False, False),
}

# --- the expected diffusers tensors, by this file's own rules ----------------------


def _renamed(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        key = key.replace(old, new)
    return key


def _swapped(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


BFL_BLOCKS = (
    ("double_blocks.", "transformer_blocks."), ("single_blocks.", "single_transformer_blocks."),
    (".img_mod.lin.", ".norm1.linear."), (".txt_mod.lin.", ".norm1_context.linear."),
    (".img_attn.norm.query_norm.scale", ".attn.norm_q.weight"),
    (".img_attn.norm.key_norm.scale", ".attn.norm_k.weight"),
    (".txt_attn.norm.query_norm.scale", ".attn.norm_added_q.weight"),
    (".txt_attn.norm.key_norm.scale", ".attn.norm_added_k.weight"),
    (".img_attn.proj.", ".attn.to_out.0."), (".txt_attn.proj.", ".attn.to_add_out."),
    (".norm.query_norm.scale", ".attn.norm_q.weight"),
    (".norm.key_norm.scale", ".attn.norm_k.weight"),
    ("img_in.", "x_embedder."), ("txt_in.", "context_embedder."),
    ("final_layer.linear.", "proj_out."))
FLUX_RENAMES = (
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    *BFL_BLOCKS, (".img_mlp.0.", ".ff.net.0.proj."), (".img_mlp.2.", ".ff.net.2."),
    (".txt_mlp.0.", ".ff_context.net.0.proj."), (".txt_mlp.2.", ".ff_context.net.2."),
    (".linear2.", ".proj_out."), (".modulation.lin.", ".norm.linear."))
CHROMA_RENAMES = (*FLUX_RENAMES, (".in_layer.", ".linear_1."), (".out_layer.", ".linear_2."),
                  (".scale", ".weight"))
FLUX2_RENAMES = (
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ("modulation_img.lin.", "modulation_img.linear."),
    ("modulation_txt.lin.", "modulation_txt.linear."),
    ("stream_modulation.lin.", "stream_modulation.linear."),
    *BFL_BLOCKS, (".img_mlp.0.", ".ff.linear_in."), (".img_mlp.2.", ".ff.linear_out."),
    (".txt_mlp.0.", ".ff_context.linear_in."), (".txt_mlp.2.", ".ff_context.linear_out."),
    (".linear1.", ".attn.to_qkv_mlp_proj."), (".linear2.", ".attn.to_out."))
QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _bfl(state: State, renames: tuple[tuple[str, str], ...], split_linear1: bool) -> State:
    """Flux.1, Chroma and Flux.2: qkv in three, linear1 at 3x hidden (Flux.1,
    Chroma), the final adaLN's halves swapped, the rest renamed."""
    h = state["img_in.weight"].shape[0]
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(\w+)", key)
        s = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(\w+)", key)
        if m:
            for name, part in zip(QKV[m[2]], t.chunk(3), strict=True):
                out[f"transformer_blocks.{m[1]}.attn.{name}.{m[3]}"] = part
        elif s and split_linear1:
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            for name, part in zip(names, t.split([h, h, h, t.shape[0] - 3 * h]), strict=True):
                out[f"single_transformer_blocks.{s[1]}.{name}.{s[2]}"] = part
        elif key.startswith("final_layer.adaLN_modulation.1."):
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = _swapped(t)
        else:
            out[_renamed(key, renames)] = t
    return out


SD3_RENAMES = (
    ("joint_blocks.", "transformer_blocks."), (".x_block.adaLN_modulation.1.", ".norm1.linear."),
    (".context_block.adaLN_modulation.1.", ".norm1_context.linear."),
    (".x_block.attn.proj.", ".attn.to_out.0."), (".x_block.attn2.proj.", ".attn2.to_out.0."),
    (".context_block.attn.proj.", ".attn.to_add_out."),
    (".x_block.attn.ln_q.", ".attn.norm_q."), (".x_block.attn.ln_k.", ".attn.norm_k."),
    (".x_block.attn2.ln_q.", ".attn2.norm_q."), (".x_block.attn2.ln_k.", ".attn2.norm_k."),
    (".context_block.attn.ln_q.", ".attn.norm_added_q."),
    (".context_block.attn.ln_k.", ".attn.norm_added_k."),
    (".x_block.mlp.fc1.", ".ff.net.0.proj."), (".x_block.mlp.fc2.", ".ff.net.2."),
    (".context_block.mlp.fc1.", ".ff_context.net.0.proj."),
    (".context_block.mlp.fc2.", ".ff_context.net.2."),
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("final_layer.linear.", "proj_out."))
SD3_QKV = {"x_block.attn": "attn.to_{}", "x_block.attn2": "attn2.to_{}",
           "context_block.attn": "attn.add_{}_proj"}


def _sd3_expected(state: State) -> State:
    """SD3: each qkv in three; adaLN halves swapped where the layer is
    diffusers' AdaLayerNormContinuous (the final layer, the last context
    block's two-way modulation)."""
    h = state["context_embedder.weight"].shape[0]
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"joint_blocks\.(\d+)\.(\w+\.attn2?)\.qkv\.(\w+)", key)
        if m:
            for name, part in zip("qkv", t.chunk(3), strict=True):
                out[f"transformer_blocks.{m[1]}.{SD3_QKV[m[2]].format(name)}.{m[3]}"] = part
        elif key == "pos_embed":
            out["pos_embed.pos_embed"] = t
        elif key.startswith("final_layer.adaLN_modulation.1.") or (
                "context_block.adaLN_modulation" in key and t.shape[0] == 2 * h):
            out[_renamed(key, SD3_RENAMES).replace("final_layer.adaLN_modulation.1.",
                                                  "norm_out.linear.")] = _swapped(t)
        else:
            out[_renamed(key, SD3_RENAMES)] = t
    return out


# diffusers' convert_wan_transformer_to_diffusers rules, norm2/norm3 exchanged
WAN_RENAMES = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"), ("cross_attn", "attn2"),
    ("self_attn", "attn1"), (".o.", ".to_out.0."), (".q.", ".to_q."), (".k.", ".to_k."),
    (".v.", ".to_v."), (".k_img.", ".add_k_proj."), (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."), ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"), ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"), ("norm3", "norm2"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("before_proj", "proj_in"), ("after_proj", "proj_out"))  # VACE
ZIMAGE_RENAMES = (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1."),
                  (".attention.out.", ".attention.to_out.0."),
                  (".attention.k_norm.", ".attention.norm_k."),
                  (".attention.q_norm.", ".attention.norm_q."))


def _z_image_expected(state: State) -> State:
    out = {}
    for key, t in state.items():
        if key.endswith(".attention.qkv.weight"):
            for name, part in zip("qkv", t.chunk(3), strict=True):
                out[key.replace(".qkv.", f".to_{name}.")] = part
        else:
            out[_renamed(key, ZIMAGE_RENAMES)] = t
    return out


EXPECTED: dict[str, Callable[[State], State]] = {
    "flux": lambda s: _bfl(s, FLUX_RENAMES, True),
    "chroma": lambda s: _bfl(s, CHROMA_RENAMES, True),
    "flux2": lambda s: _bfl(s, FLUX2_RENAMES, False),
    "sd3": _sd3_expected,
    "wan": lambda s: {_renamed(k, WAN_RENAMES): t for k, t in s.items()},
    "z_image": _z_image_expected,
}

# --- round trips ---------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _state(path: Path) -> State:
    src = open_model(path)
    return {k: src.get(k).clone() for k in src.infos}


def _detected(path: Path) -> tuple[str, str | None]:
    rep = describe(open_model(path))
    return rep.arch, rep.layout


def _convert(path: Path, out: Path, to: str, family: str, detectable: bool) -> None:
    if detectable:
        run(Recipe.op("layout", path, output=out, to=to))
    else:  # what convert_layout does once the file is recognised
        frm = layouts.DIFFUSERS if to == layouts.ORIGINAL else layouts.ORIGINAL
        write_converted(plan_layout(open_model(path), family, frm, to), out)


def _layout_of(family: str, path: Path) -> str | None:
    keys = registry.strip_denoiser_prefix({k: tuple(i.shape) for k, i in
                                           open_model(path).infos.items()})
    hit = registry.first_match(registry.REGISTRY[family].layout_rules, keys)
    return hit[0] if hit else None


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(case: str, tmp_path: Path) -> None:
    family, keys, dtype, prefixed, detectable = CASES[case]
    prefix = UNET_PREFIX if prefixed else ""
    original = tmp_path / "original.safetensors"
    write_tensors(original, {prefix + k: s for k, s in keys.items()}, dtype=dtype,
                  seed=len(case))
    source = _state(original)
    diff, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    _convert(original, diff, "diffusers", family, detectable)
    got = _state(diff)
    bare = {k[len(prefix):]: t for k, t in source.items()}
    expected = {prefix + k: t for k, t in EXPECTED[family](bare).items()}
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(_bits(got[key]), _bits(t)), key
    _convert(diff, back, "original", family, detectable)
    again = _state(back)
    assert set(again) == set(source)
    assert all(torch.equal(_bits(again[k]), _bits(source[k])) for k in source)
    for path, layout in ((original, "original"), (diff, "diffusers"), (back, "original")):
        if detectable:
            assert _detected(path) == (family, layout), path.name
        assert _layout_of(family, path) == layout, path.name


def test_all_in_one_keeps_the_other_components(tmp_path: Path) -> None:
    """A ComfyUI all-in-one Flux file: the transformer converted under its
    prefix, the VAE and text encoders copied unchanged."""
    path = tmp_path / "aio.safetensors"
    keys = flux.all_in_one_keys(flux_config("schnell", hidden=128, depth=1, single=1),
                                tiny=True)
    write_tensors(path, keys, dtype="BF16", seed=5)
    out = tmp_path / "aio-diffusers.safetensors"
    report = run(Recipe.op("layout", path, output=out, to="diffusers"))
    before, after = _state(path), _state(out)
    others = [k for k in before if not k.startswith(UNET_PREFIX)]
    assert others and all(torch.equal(_bits(after[k]), _bits(before[k])) for k in others)
    assert f"{UNET_PREFIX}transformer_blocks.0.attn.to_q.weight" in after
    assert report.steps[0].report.n_kept == len(others)
    assert _detected(out) == ("flux", "diffusers")


def test_a_source_without_raw_reads_gives_the_same_bytes(tmp_path: Path) -> None:
    """A pickle has no safetensors byte offsets: every tensor comes through
    ``get`` and row slices, and the file is the one the byte route writes."""
    path = _flux_file(tmp_path / "f.safetensors")
    torch.save(_state(path), tmp_path / "f.ckpt")
    streamed, sliced = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(Recipe.op("layout", path, output=streamed, to="diffusers"))
    run(Recipe.op("layout", tmp_path / "f.ckpt", output=sliced, to="diffusers"))
    a, b = _state(streamed), _state(sliced)
    assert set(a) == set(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


# --- the maps against the key tables of both layouts ----------------------------------

GENERATED = {  # family, config, original keys, diffusers keys
    **{f"chroma-{s}": ("chroma", c) for s, c in (("small", CHROMA),
                                                  ("full", chroma.VARIANTS["chroma"]))},
    **{f"flux2-{s}": ("flux2", c) for s, c in (("small", FLUX2), ("full", flux2.VARIANTS["dev"]))},
    **{f"z_image-{s}": ("z_image", c) for s, c in (("small", ZIMAGE),
                                                    ("full", z_image.VARIANTS["z-image"]))},
    **{f"flux-{v}": ("flux", c) for v, c in flux.VARIANTS.items()},
    **{f"wan-{v}": ("wan", c) for v, c in wan.VARIANTS.items()},
    **{f"wan-{v}-small": ("wan", _wan(v)) for v in ("t2v-1.3b", "i2v-14b", "vace")},
}


@pytest.mark.parametrize("case", sorted(GENERATED))
def test_maps_turn_one_key_table_into_the_other(case: str) -> None:
    """Every diffusers key made once with its shape, every original key used
    (rows tiled exactly), the inverse the identity, and the map read back
    from either layout's own keys."""
    family, cfg = GENERATED[case]
    module = {"chroma": chroma, "flux2": flux2, "z_image": z_image, "flux": flux,
              "wan": wan}[family]
    orig, diff = module.transformer_keys(cfg, "original"), module.transformer_keys(cfg,
                                                                                  "diffusers")
    key_map = layouts.family_map(family, orig, "original", "x")
    assert key_map == layouts.family_map(family, diff, "diffusers", "x")
    forward = layouts.to_diffusers(key_map, orig, "x")
    assert {k: t.shape for k, t in forward.items()} == diff
    inverse = layouts.to_original(key_map, diff, "x")
    assert {k: t.shape for k, t in inverse.items()} == orig
    for key, target in inverse.items():  # back through the forward plan: the same rows
        ranges = [r for s in target.segments for r in _through(forward[s.key], s)]
        assert _joined(ranges) == [(key, 0, layouts.rows_of(orig[key]))], key


def _through(target: layouts.Target, seg: layouts.Segment) -> list[tuple[str, int, int]]:
    """The input row ranges rows ``seg.start:seg.stop`` of ``target`` are made of."""
    out, pos = [], 0
    for s in target.segments:
        n = s.stop - s.start
        lo, hi = max(seg.start, pos), min(seg.stop, pos + n)
        if lo < hi:
            out.append((s.key, s.start + lo - pos, s.start + hi - pos))
        pos += n
    return out


def _joined(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for key, start, stop in ranges:
        if out and out[-1][0] == key and out[-1][2] == start:
            out[-1] = (key, out[-1][1], stop)
        else:
            out.append((key, start, stop))
    return out


@pytest.mark.parametrize("variant", sorted(sd3.VARIANTS))
def test_full_size_diffusers_headers_are_named(variant: str) -> None:
    """Full-size SD3 variants (and Flux.1, Chroma, Flux.2, Wan, Z-Image) in
    the diffusers layout, headers only: family, variant and layout."""
    cases = [("sd3", variant, sd3.transformer_keys(sd3.VARIANTS[variant]))]
    if variant == "sd3-medium":
        cases += [("flux", "dev", flux.transformer_keys(flux.VARIANTS["dev"])),
                  ("chroma", "chroma", chroma.transformer_keys(chroma.VARIANTS["chroma"])),
                  ("flux2", "dev", flux2.transformer_keys(flux2.VARIANTS["dev"])),
                  ("wan", "i2v-14b", wan.transformer_keys(wan.VARIANTS["i2v-14b"])),
                  ("z_image", "z-image", z_image.transformer_keys(z_image.VARIANTS["z-image"]))]
    for family, name, orig in cases:
        key_map = layouts.family_map(family, orig, "original", "x")
        diff = {k: t.shape for k, t in layouts.to_diffusers(key_map, orig, "x").items()}
        found = registry.detect_denoiser(diff)
        assert found is not None and (found.arch, found.variant, found.layout) == (
            family, name, "diffusers"), family
        back = registry.detect_denoiser(orig)
        assert back is not None and (back.arch, back.layout) == (family, "original")


# --- refusals -------------------------------------------------------------------------


def _flux_file(path: Path, extra: Shapes | None = None) -> Path:
    keys = flux.transformer_keys(flux_config("dev", hidden=128, depth=1, single=1))
    write_tensors(path, {**keys, **(extra or {})}, dtype="BF16")
    return path


def test_refusals_name_the_key_or_the_reason(tmp_path: Path) -> None:
    bad = open_model(_flux_file(tmp_path / "extra.safetensors", {"lora_marker.weight": (4,)}))
    with pytest.raises(ModelkitError, match=r"key 'lora_marker\.weight' is not part of"):
        convert_layout(bad, "diffusers")
    keys = flux.transformer_keys(flux_config("dev", hidden=128, depth=1, single=1))
    keys["single_blocks.0.linear1.bias"] = (100,)  # does not split at 3 x 128
    write_tensors(tmp_path / "shape.safetensors", keys, dtype="BF16")
    with pytest.raises(ModelkitError, match=r"'single_blocks\.0\.linear1\.bias' has shape"):
        convert_layout(open_model(tmp_path / "shape.safetensors"), "diffusers")
    cfg = flux_config("dev", hidden=128, depth=1, single=1)
    diff = flux.transformer_keys(cfg, "diffusers")
    k = "transformer_blocks.0.attn.to_k.weight"
    write_tensors(tmp_path / "mixed.safetensors", diff, dtype="BF16",
                  overrides={k: torch.zeros(diff[k], dtype=torch.float32)})
    with pytest.raises(ModelkitError, match=r"different dtypes \(BF16, F32\)"):
        convert_layout(open_model(tmp_path / "mixed.safetensors"), "original")
    del diff["single_transformer_blocks.0.proj_mlp.bias"]
    write_tensors(tmp_path / "cut.safetensors", diff, dtype="BF16")
    with pytest.raises(ModelkitError, match=r"has no 'single_transformer_blocks\.0\.proj_mlp"):
        convert_layout(open_model(tmp_path / "cut.safetensors"), "original")
    from modelkit.testing.lora import write_flux_lora

    write_flux_lora(tmp_path / "lora.safetensors", "kohya")  # a LoRA is no transformer
    with pytest.raises(ModelkitError, match=r"is a lora, not a transformer or checkpoint"):
        convert_layout(open_model(tmp_path / "lora.safetensors"), "diffusers")


def test_z_image_drops_only_what_diffusers_drops(tmp_path: Path) -> None:
    keys = {**z_image.transformer_keys(ZIMAGE), "norm_final.weight": (ZIMAGE.dim,)}
    path = tmp_path / "z.safetensors"
    write_tensors(path, keys, dtype="BF16")
    step = plan_layout(open_model(path), "z_image", "original", "diffusers")
    assert step.report.dropped == ["norm_final.weight"]
    assert set(step.source.infos) == set(z_image.transformer_keys(ZIMAGE, "diffusers"))


def test_cli_converts_and_refuses_in_one_line(tmp_path: Path, models: dict[str, Path]
                                              ) -> None:
    src = _flux_file(tmp_path / "flux.safetensors")
    out = tmp_path / "flux-diffusers.safetensors"
    res = run_here({
        "ok": ["convert", str(src), "-o", str(out), "--layout", "diffusers", "-q"],
        "again": ["convert", str(out), "-o", str(tmp_path / "x.safetensors"), "--layout",
                  "diffusers", "-q"],
        "sd1": ["convert", str(models["sd1"]), "-o", str(tmp_path / "y.safetensors"),
                "--layout", "diffusers", "-q"],
        "folder": ["convert", str(src), "-o", str(tmp_path / "z"), "--layout", "original"],
    }, tmp_path)
    code, stdout, err = res["ok"]
    assert code == 0, err
    assert "flux (dev) transformer: original -> diffusers layout" in stdout
    assert _detected(out) == ("flux", "diffusers")
    for name, needle in (("again", "already in the diffusers layout"),
                         ("sd1", "is an SD1 checkpoint; --layout converts"),
                         ("folder", "--layout writes a .safetensors file")):
        code, _, err = res[name]
        assert code == 2 and needle in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux-diffusers.safetensors",
                                                          "flux.safetensors"]
