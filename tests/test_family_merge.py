"""Merge, prune, extract, swap and ema for the transformer families (issue
19): SD3, Qwen-Image, Wan, Chroma, Flux.2, Z-Image and Flux.1. The block
lists (ComfyUI's block-merge names, both layouts), per-block merges checked
key by key against (1-w)·A + w·B on small seeded files with the real key
names, presets, bf16 staying bf16, the refusals (two families, two layouts,
two variants), and prune / extract / swap / ema on a small Flux all-in-one."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.arch import chroma, flux, flux2, qwen_image, sd3, wan, z_image
from modelkit.arch.blocks import block_of, parse_blocks, preset
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.family_blocks import FAMILIES
from modelkit.arch.registry import handles
from modelkit.core.recipe import Recipe
from modelkit.engine.runner import run
from modelkit.inspect.report import inspect_model
from tests.cli_support import cli as _cli
from tests.file_support import tensors as _tensors

Keys = dict[str, tuple[int, ...]]
FLUX_TINY = replace(flux.small(flux.VARIANTS["dev"]), hidden_size=128, num_heads=1)


def _zimage_keys(layout: str) -> Keys:
    """A small Z-Image with the one full-size tensor its detection reads
    (cap_embedder.1 [3840, 2560], what tells it from Lumina 2)."""
    keys = z_image.transformer_keys(z_image.small(z_image.VARIANTS["z-image"]), layout)
    return {**keys, "cap_embedder.0.weight": (2560,), "cap_embedder.1.weight": (3840, 2560)}


# (family, layout) -> small transformer keys with the real names
SMALL = {
    ("sd3", "original"): lambda: sd3.transformer_keys(
        replace(sd3.VARIANTS["sd3.5-medium"], depth=2, pos_embed_max=4, attn2_layers=1)),
    ("qwen_image", "diffusers"): lambda: qwen_image.transformer_keys(
        replace(qwen_image.small(qwen_image.VARIANTS["qwen-image"]), num_heads=1)),
    ("wan", "original"): lambda: wan.transformer_keys(wan.small(wan.VARIANTS["i2v-14b"])),
    ("chroma", "diffusers"): lambda: chroma.transformer_keys(
        replace(chroma.small(chroma.VARIANTS["chroma"]), hidden_size=128, num_heads=1),
        "diffusers"),
    ("flux2", "original"): lambda: flux2.transformer_keys(
        replace(flux2.small(flux2.VARIANTS["dev"]), hidden_size=128, num_heads=1)),
    ("z_image", "original"): lambda: _zimage_keys("original"),
    ("flux", "diffusers"): lambda: flux.transformer_keys(FLUX_TINY, "diffusers"),
}


def _write(path: Path, keys: Keys, seed: int, dtype: torch.dtype = torch.bfloat16,
           prefix: str = "") -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({prefix + k: torch.randn(s, generator=gen).mul_(0.05).to(dtype)
               for k, s in keys.items()}, str(path))
    return path




# --- the block lists ----------------------------------------------------------------

# keys of every family (both layouts, with and without the denoiser prefix)
# and the block written out by hand from ComfyUI's node names
HAND = {
    "sd3": {"joint_blocks.3.x_block.attn.qkv.weight": "joint_blocks.3",
            "model.diffusion_model.joint_blocks.37.context_block.attn.qkv.bias":
                "joint_blocks.37",
            "pos_embed": "pos_embed", "x_embedder.proj.weight": "x_embedder",
            "y_embedder.mlp.0.weight": "y_embedder",
            "transformer_blocks.3.attn.to_q.weight": "joint_blocks.3",
            "pos_embed.proj.weight": "x_embedder",
            "time_text_embed.text_embedder.linear_1.weight": "y_embedder",
            "norm_out.linear.weight": "final_layer"},
    "flux": {"transformer_blocks.3.attn.to_q.weight": "double_blocks.3",
             "single_transformer_blocks.37.proj_mlp.weight": "single_blocks.37",
             "single_blocks.0.linear1.weight": "single_blocks.0",
             "time_text_embed.guidance_embedder.linear_1.weight": "guidance_in",
             "time_text_embed.text_embedder.linear_2.bias": "vector_in",
             "x_embedder.weight": "img_in", "proj_out.weight": "final_layer",
             "model.diffusion_model.txt_in.weight": "txt_in"},
    "qwen_image": {"transformer_blocks.59.img_mod.1.weight": "transformer_blocks.59",
                   "txt_norm.weight": "txt_norm", "norm_out.linear.weight": "proj_out",
                   "time_text_embed.timestep_embedder.linear_1.weight": "time_text_embed"},
    "wan": {"blocks.39.cross_attn.k_img.weight": "blocks.39",
            "condition_embedder.image_embedder.ff.net.0.proj.weight": "img_emb",
            "condition_embedder.time_proj.weight": "time_projection",
            "img_emb.proj.1.weight": "img_emb", "scale_shift_table": "head",
            "blocks.0.scale_shift_table": "blocks.0", "head.modulation": "head",
            "vace_blocks.0.after_proj.weight": "patch_embedding"},  # none claims it
    "chroma": {"distilled_guidance_layer.layers.1.in_layer.weight":
                   "distilled_guidance_layer",
               "transformer_blocks.18.ff.net.2.weight": "double_blocks.18",
               "context_embedder.weight": "txt_in"},
    "flux2": {"double_stream_modulation_img.lin.weight": "double_stream_modulation_img",
              "single_stream_modulation.linear.weight": "single_stream_modulation",
              "single_transformer_blocks.47.attn.to_out.weight": "single_blocks.47",
              "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in"},
    "z_image": {"noise_refiner.1.attention.qkv.weight": "noise_refiner.1",
                "layers.29.feed_forward.w1.weight": "layers.29",
                "all_x_embedder.2-1.weight": "x_embedder",
                "all_final_layer.2-1.linear.weight": "final_layer",
                "cap_pad_token": "cap_embedder",
                "context_refiner.0.attention.to_q.weight": "context_refiner.0"},
}


@pytest.mark.parametrize("family", list(HAND))
def test_keys_go_to_the_blocks_comfyui_names(family: str) -> None:
    assert {k: block_of(k, family) for k in HAND[family]} == HAND[family]


FULL_SIZE = {  # the largest variant of each family, in each of its layouts
    "sd3": [sd3.transformer_keys(sd3.VARIANTS["sd3.5-large"])],
    "qwen_image": [qwen_image.transformer_keys(qwen_image.VARIANTS["qwen-image"])],
    **{name: [m.transformer_keys(m.VARIANTS[v], lay) for lay in ("original", "diffusers")]
       for name, m, v in (("wan", wan, "i2v-14b"), ("chroma", chroma, "chroma"),
                          ("flux2", flux2, "dev"), ("z_image", z_image, "z-image"),
                          ("flux", flux, "dev"))},
}


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_every_key_has_a_block_and_both_layouts_weigh_the_same(family: str) -> None:
    """At full size every transformer key is claimed by a block, every block
    has keys, and the diffusers layout puts exactly as many parameters in
    each block as the original one (the same weights under other names)."""
    table = FAMILIES[family]
    per_layout = []
    for keys in FULL_SIZE[family]:
        assert [k for k in keys if table.claims(k) is None] == []
        params: dict[str, int] = {}
        for key, shape in keys.items():
            params[table.block_of(key)] = params.get(table.block_of(key), 0) + math.prod(shape)
        assert list(params) == list(table.names) or set(params) == set(table.names)
        per_layout.append(params)
    assert all(p == per_layout[0] for p in per_layout)


def test_block_specs_take_the_familys_names_groups_and_short_ranges(
        capsys: pytest.CaptureFixture[str]) -> None:
    w = parse_blocks("JOINT=0.5, joint_blocks.0-2=0.25, x_embedder=1, default=0", "sd3")
    assert len(w) == 5 + 38 + 1 and w["joint_blocks.2"] == 0.25 and w["joint_blocks.3"] == 0.5
    assert w["x_embedder"] == 1.0 and w["pos_embed"] == w["final_layer"] == 0.0
    w = parse_blocks("MOD=1,SINGLE=0.5,default=0", "flux2")
    assert w["double_stream_modulation_txt"] == 1.0 and w["single_blocks.47"] == 0.5
    assert w["double_blocks.7"] == 0.0 and len(w) == 4 + 3 + 8 + 48 + 1
    z = preset("noise_refiner_only", "z_image")
    assert [b for b, v in z.items() if v] == ["noise_refiner.0", "noise_refiner.1"]
    g = preset("gradient_in_to_out", "wan")
    assert g["patch_embedding"] == 0.0 and g["head"] == 1.0 and g["blocks.0"] == 5 / 45
    code, out, err = _cli(capsys, "presets", "--arch", "z_image", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["layers_only"]["z_image"] == {b: float(b.startswith("layers."))
                                              for b in FAMILIES["z_image"].names}
    code, out, _ = _cli(capsys, "presets", "--arch", "flux2")
    assert "flux2: 64 weights (img_in, txt_in, time_in, guidance_in, " in out
    assert "MOD (double_stream_modulation_img, double_stream_modulation_txt, " in out


# --- merges -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("families")
    out = {}
    for (family, layout), keys in SMALL.items():
        k = keys()
        out[family] = (_write(d / f"{family}_a.safetensors", k, 1),
                       _write(d / f"{family}_b.safetensors", k, 2))
        rep = inspect_model(out[family][0])
        assert (rep.arch, rep.layout) == (family, layout)
    return out


def _spec(family: str) -> str:
    """A mapping with a group, a single name and a default: four distinct weights."""
    table = FAMILIES[family]
    group, name = table.stacks[0].group, f"{table.stacks[-1].stem}.0"
    return f"{group}=0.5,{name}=0.25,{table.ins[1].name}=1,default=0.75"


@pytest.mark.parametrize("family", [f for f, _ in SMALL])
def test_block_merge_is_the_hand_computed_blend(pairs: dict[str, tuple[Path, Path]],
                                               family: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pairs[family]
    out = tmp_path / "m.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(out), "-q",
                        "--blocks", _spec(family))
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    assert list(tm) == list(ta)
    weights = parse_blocks(_spec(family), family)
    hand = {k: v for k, v in HAND[family].items() if k in tm}
    seen = set()
    for key, got in tm.items():
        alpha = weights[hand.get(key) or block_of(key, family)]
        seen.add(alpha)
        assert got.dtype == torch.bfloat16, key  # bf16 inputs stay bf16
        want = torch.lerp(ta[key].float(), tb[key].float(), alpha).to(torch.bfloat16)
        assert torch.equal(got, want), key
    assert seen == {0.25, 0.5, 0.75, 1.0}


def test_one_name_value_item_is_a_spec_not_a_preset(pairs: dict[str, tuple[Path, Path]],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pairs["wan"]
    out = tmp_path / "m.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(out), "-q",
                        "--blocks", "default=0.25")
    assert code == 0, err
    ta, tb = _tensors(a), _tensors(b)
    for key, got in _tensors(out).items():
        want = torch.lerp(ta[key].float(), tb[key].float(), 0.25).to(torch.bfloat16)
        assert torch.equal(got, want), key


METHODS = {"weighted_sum": {"alpha": 0.5}, "slerp": {"alpha": 0.5},
           "add_difference": {"alpha": 1.0}, "triple_sum": {"alpha": 0.3, "beta": 0.3},
           "sum_twice": {"alpha": 0.3, "beta": 0.3}, "train_difference": {"alpha": 1.0},
           "ties": {"k": 0.5}, "model_stock": {}}


def test_every_method_merges_a_family(pairs: dict[str, tuple[Path, Path]],
                                      tmp_path: Path) -> None:
    """Every merge method runs on a Flux.2 transformer (per-key methods; nothing
    SD-specific in the way): A's keys, bf16 kept, B and C mixed in; the
    add difference checked against A + (B - C) by hand."""
    from modelkit.core.registry import METHOD, all_transforms

    assert set(METHODS) == {n for n, t in all_transforms().items() if t.kind == METHOD}
    a, b = pairs["flux2"]
    c = _write(tmp_path / "c.safetensors", SMALL[("flux2", "original")](), 3)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    for method, params in METHODS.items():
        models = (a, b) if method in ("weighted_sum", "slerp", "ties") else (a, b, c)
        out = tmp_path / f"{method}.safetensors"
        run(Recipe.merge(*models, method=method, output=out, **params))
        got = _tensors(out)
        assert list(got) == list(ta) and {t.dtype for t in got.values()} == {torch.bfloat16}
        key = "double_blocks.1.img_attn.qkv.weight"
        assert not torch.equal(got[key], ta[key]), method
        if method == "add_difference":
            want = ta[key].float() + (tb[key].float() - tc[key].float())
            assert torch.allclose(got[key].float(), want, rtol=2**-8, atol=1e-6)


def test_presets_and_recipes_take_the_familys_blocks(pairs: dict[str, tuple[Path, Path]],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    a, b = pairs["wan"]
    out = tmp_path / "p.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(out), "-q",
                        "--blocks", "blocks_only")
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    for key, got in tm.items():
        assert torch.equal(got, tb[key] if key.startswith("blocks.") else ta[key]), key
    a, b = pairs["z_image"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\ninputs:\n  a: {a}\n  b: {b}\nsteps:\n  m:\n"
                      "    method: weighted_sum\n    models: [a, b]\n"
                      "    params:\n      alpha: {preset: context_refiner_only}\n"
                      "output:\n  path: out.safetensors\n")
    code, _, err = _cli(capsys, "recipe", "run", str(recipe), "-q")
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(tmp_path / "out.safetensors")
    for key, got in tm.items():
        assert torch.equal(got, tb[key] if key.startswith("context_refiner.") else ta[key])


@pytest.mark.parametrize(("family", "variant", "blocks"), [
    ("wan", "t2v-1.3b", 46), ("sd3", "sd3.5-medium", 44)])
def test_dry_run_of_full_size_sparse_files(tmp_path: Path, family: str, variant: str,
                                           blocks: int,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Real sizes (Wan 2.1 1.3B in bf16, SD3.5 medium in fp16; sparse,
    all-zero): every key planned as a merge, the resolved weight of every
    block of the family's list shown, nothing written."""
    from modelkit.testing import write_sparse_sd3, write_sparse_wan

    write = write_sparse_wan if family == "wan" else write_sparse_sd3
    a, b = write(tmp_path / "a.safetensors", variant), write(tmp_path / "b.safetensors",
                                                            variant)
    code, out, err = _cli(capsys, "merge", str(a), str(b), "-o", str(tmp_path / "c.sft"),
                          "--dry-run", "--blocks", "gradient_out_to_in")
    assert code == 0, err
    shapes = (wan.transformer_keys(wan.VARIANTS[variant]) if family == "wan" else
              sd3.transformer_keys(sd3.VARIANTS[variant]))
    assert f"({family}): {len(shapes)} tensors, {len(shapes)} merged, 0 copied" in out
    assert f"block weights of merge.alpha ({blocks} blocks):" in out
    first = FAMILIES[family].stacks[0].stem
    # 1 at the first name falling by 1/(n-1) a position; 5 names before the blocks
    assert f"{first}.0 {1 - 5 / (blocks - 1):.4f}" in out
    assert not (tmp_path / "c.sft").exists()


def test_the_familys_dtype_is_the_default(tmp_path: Path) -> None:
    """Without --dtype: fp32 Wan inputs are written bf16 (its registry
    dtype), fp32 SD3 inputs fp16; --dtype still wins."""
    keys = SMALL[("wan", "original")]()
    a, b = (_write(tmp_path / f"{n}.safetensors", keys, s, torch.float32) for n, s in
            (("a", 3), ("b", 4)))
    run(Recipe.merge(a, b, output=tmp_path / "w.safetensors", alpha=0.5))
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(tmp_path / "w.safetensors")
    assert {t.dtype for t in tm.values()} == {torch.bfloat16}
    key = "blocks.1.ffn.0.weight"
    assert torch.equal(tm[key], torch.lerp(ta[key], tb[key], 0.5).to(torch.bfloat16))
    run(Recipe.merge(a, b, output=tmp_path / "w32.safetensors", dtype="fp32", alpha=0.5))
    assert _tensors(tmp_path / "w32.safetensors")[key].dtype == torch.float32
    keys = SMALL[("sd3", "original")]()
    a, b = (_write(tmp_path / f"s{n}.safetensors", keys, s, torch.float32) for n, s in
            (("a", 5), ("b", 6)))
    run(Recipe.merge(a, b, output=tmp_path / "s.safetensors", alpha=0.5))
    assert {t.dtype for t in _tensors(tmp_path / "s.safetensors").values()} == {torch.float16}


def test_two_families_two_layouts_two_variants(pairs: dict[str, tuple[Path, Path]],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Two families: one line, exit 2, no file (through the console script's
    entry point: tests/test_cli_exit_codes.py, ``merge_families``). Two
    layouts of Flux: refused, naming both. Flux dev as A and schnell as B:
    refused with the count and first key schnell lacks; schnell as A:
    merged, the four guidance keys only dev has reported, not silently left."""
    wan_a, chroma_b = pairs["wan"][0], pairs["chroma"][1]
    code, _, err = _cli(capsys, "merge", str(wan_a), str(chroma_b), "-o",
                        str(tmp_path / "x.safetensors"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot merge different architectures" in err and "is wan" in err
    assert "is chroma" in err and not (tmp_path / "x.safetensors").exists()
    bfl = _write(tmp_path / "bfl.safetensors", flux.transformer_keys(FLUX_TINY), 7)
    code, _, err = _cli(capsys, "merge", str(bfl), str(pairs["flux"][1]), "-o",
                        str(tmp_path / "y.safetensors"))
    assert code == 2 and "cannot merge different key layouts of flux" in err, err
    assert "bfl.safetensors has the original layout" in err
    schnell = _write(tmp_path / "schnell.safetensors", flux.transformer_keys(
        replace(FLUX_TINY, guidance_embed=False)), 8)
    code, _, err = _cli(capsys, "merge", str(bfl), str(schnell), "-o",
                        str(tmp_path / "y.safetensors"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("cannot merge (bfl.safetensors (flux dev), schnell.safetensors (flux schnell)): "
            "guidance_in.in_layer.bias is missing from b (and 3 more)") in err
    code, out, err = _cli(capsys, "merge", str(schnell), str(bfl), "-o",
                          str(tmp_path / "z.safetensors"))
    assert code == 0, err
    assert ("warning: 4 keys only bfl.safetensors (flux dev) has are left out (first: "
            "guidance_in.in_layer.bias)") in err
    assert "note: 4 keys exist only in B/C and were ignored" in out
    assert not any(k.startswith("guidance_in.") for k in _tensors(tmp_path / "z.safetensors"))
    # Wan image-to-video as A, text-to-video as B: the image keys and the
    # wider patch embedding are counted, the first named
    ka = SMALL[("wan", "original")]()
    kb = wan.transformer_keys(wan.small(wan.VARIANTS["t2v-14b"]))
    n = len(ka.keys() - kb.keys()) + sum(ka[k] != kb[k] for k in ka.keys() & kb.keys())
    assert n == 19
    t2v = _write(tmp_path / "t2v.safetensors", kb, 9)
    code, _, err = _cli(capsys, "merge", str(pairs["wan"][0]), str(t2v), "-o",
                        str(tmp_path / "w.safetensors"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"blocks.0.cross_attn.k_img.bias is missing from b (and {n - 1} more)" in err


# --- prune, extract, swap, ema on a Flux all-in-one ---------------------------------


@pytest.fixture(scope="module")
def aio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("aio")
    keys = flux.all_in_one_keys(FLUX_TINY, tiny=True)
    return (_write(d / "a.safetensors", keys, 11), _write(d / "b.safetensors", keys, 12))


def test_prune_keeps_every_component_and_drops_the_residue(aio: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    a, _ = aio
    junk = {"optimizer.state.0.exp_avg": (4,), "lora_unet_double_blocks_0_img_mod_lin.alpha":
            (), "model_ema.decay": (), "notes.foo": (3,)}
    src = tmp_path / "dirty.safetensors"
    save_file({**_tensors(a), **{k: torch.ones(s) for k, s in junk.items()}}, str(src))
    assert handles("flux", "prune") and handles("wan", "prune")
    report = run(Recipe.op("prune", src, output=tmp_path / "p.safetensors"))
    got, want = _tensors(tmp_path / "p.safetensors"), _tensors(a)
    assert list(got) == list(want)  # the transformer, vae. and text_encoders. all kept
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == torch.bfloat16 for k in got)
    dropped = report.steps[0].report.dropped
    assert dropped == {"optimizer.state.0.exp_avg": "training leftover",
                       "lora_unet_double_blocks_0_img_mod_lin.alpha": "training leftover",
                       "model_ema.decay": "EMA weights", "notes.foo": "unknown key"}


def test_prune_of_a_bare_transformer_keeps_its_keys(pairs: dict[str, tuple[Path, Path]],
                                                   tmp_path: Path) -> None:
    a = pairs["wan"][0]
    src = tmp_path / "wan_dirty.safetensors"
    save_file({**_tensors(a), "scaler.scale": torch.ones(1), "ema.blocks.0.ffn.0.weight":
               torch.ones(2)}, str(src))
    report = run(Recipe.op("prune", src, output=tmp_path / "w.safetensors", dtype="fp32"))
    got, want = _tensors(tmp_path / "w.safetensors"), _tensors(a)
    assert list(got) == list(want)  # every Wan key, bare, is the transformer
    assert all(torch.equal(got[k], want[k].float()) for k in got)  # --dtype still casts
    assert set(report.steps[0].report.dropped) == {"scaler.scale", "ema.blocks.0.ffn.0.weight"}


def test_extract_and_swap_round_trip(aio: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Each component of B to a file of its own with ComfyUI's standalone
    names, then into A: the result is A with B's component, bit for bit."""
    a, b = aio
    tb = _tensors(b)
    files = {}
    for comp in ("unet", "vae", "t5xxl"):
        files[comp] = tmp_path / f"{comp}.safetensors"
        run(Recipe.op("extract", b, output=files[comp], component=comp))
    got = {c: _tensors(p) for c, p in files.items()}
    assert got["unet"].keys() == flux.transformer_keys(FLUX_TINY).keys()
    assert all(torch.equal(t, tb[UNET_PREFIX + k]) for k, t in got["unet"].items())
    assert got["vae"].keys() == flux.ae_keys(16).keys()
    assert torch.equal(got["t5xxl"]["shared.weight"],
                       tb["text_encoders.t5xxl.transformer.shared.weight"])
    assert inspect_model(files["unet"]).arch == "flux"
    ta = _tensors(a)
    for flag, comp, prefix in (("--vae", "vae", "vae."), ("--te", "t5xxl",
                                                          "text_encoders.t5xxl."),
                               ("--unet", "unet", UNET_PREFIX)):
        out = tmp_path / f"swapped_{comp}.safetensors"
        code, _, err = _cli(capsys, "swap", str(a), flag, str(files[comp]), "-o", str(out),
                            "-q")
        assert code == 0, err
        got_swap = _tensors(out)
        assert list(got_swap) == list(ta)
        for key, t in got_swap.items():
            assert torch.equal(t, tb[key] if key.startswith(prefix) else ta[key]), (comp, key)
    # a merge bakes B's VAE into A's vae. keys; the text encoders stay A's
    baked = tmp_path / "baked.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(baked), "-q", "--alpha",
                        "0.5", "--vae", str(files["vae"]))
    assert code == 0, err
    for key, t in _tensors(baked).items():
        want = (tb[key] if key.startswith("vae.") else ta[key] if not key.startswith(
            UNET_PREFIX) else torch.lerp(ta[key].float(), tb[key].float(), 0.5).to(t.dtype))
        assert torch.equal(t, want), key
    code, _, err = _cli(capsys, "merge", str(files["unet"]), str(files["unet"]), "-o",
                        str(tmp_path / "nv.safetensors"), "--vae", str(files["vae"]))
    assert code == 2 and "has no VAE (no vae.* keys) to bake it into" in err, err
    code, _, err = _cli(capsys, "swap", str(a), "--vae", str(files["t5xxl"]), "-o",
                        str(tmp_path / "bad.safetensors"))
    assert code == 2 and "has none of the vae keys" in err and len(err.splitlines()) == 1
    code, _, err = _cli(capsys, "ema", str(files["unet"]), "-o", str(tmp_path / "e.safetensors"))
    assert code == 2 and "unet.safetensors: has no EMA weights" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e.safetensors").exists()
