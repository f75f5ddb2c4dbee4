"""A kohya LoRA on a fused weight (``qkv``, a single block's ``linear1``, an
adaLN modulation diffusers stores halves swapped) baked into a base in the
diffusers layout: each split diffusers weight is checked bit for bit
against W + s·up[rows]@down computed here, with the rows written out by
hand below (not read from the layout maps); baking into the diffusers base
and converting back equals baking into the original base; a DoRA module on
a fused weight is refused through the console."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.arch import chroma, flux2, sd3
from modelkit.cli import main
from modelkit.convert.layout import convert_layout
from modelkit.io.open import open_source
from modelkit.io.reader import open_model
from modelkit.testing import flux_config

Shape = tuple[int, ...]
RANK, ALPHA = 4, 8.0
S = ALPHA / RANK
# where one module lands: (diffusers weight key, [(first, last + 1) rows of the
# fused ΔW, in the weight's row order])
Landing = list[tuple[str, list[tuple[int, int]]]]
QKV, ADD_QKV = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_model(path) as f:
        return {k: f.get(k).clone() for k in f.infos}


def _write_base(path: Path, keys: dict[str, Shape], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(s, generator=gen) * 0.1 for k, s in keys.items()}, str(path))


def _write_lora(path: Path, base: dict[str, torch.Tensor], modules: dict[str, str],
                seed: int) -> dict[str, torch.Tensor]:
    """kohya modules ``name -> original weight key`` with random factors."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, key in modules.items():
        rows, cols = base[key].shape
        out[f"{name}.lora_down.weight"] = torch.randn(RANK, cols, generator=gen) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(rows, RANK, generator=gen) * 0.1
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return out


# --- per family: the original keys, kohya modules and where each lands -----------


def _flux() -> tuple[dict[str, Shape], dict[str, str], dict[str, Landing]]:
    from modelkit.arch import flux

    cfg = flux_config(hidden=256, depth=2, single=2)
    h, mlp = 256, 1024
    qkv = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
               "lora_unet_double_blocks_1_txt_attn_qkv": "double_blocks.1.txt_attn.qkv.weight",
               "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1.weight",
               "lora_unet_final_layer_adaLN_modulation_1":
                   "final_layer.adaLN_modulation.1.weight",
               "lora_unet_single_blocks_1_linear2": "single_blocks.1.linear2.weight"}
    d, s = "transformer_blocks", "single_transformer_blocks"
    land = {
        "lora_unet_double_blocks_0_img_attn_qkv": [
            (f"{d}.0.attn.{p}.weight", [r]) for p, r in zip(QKV, qkv, strict=True)],
        "lora_unet_double_blocks_1_txt_attn_qkv": [
            (f"{d}.1.attn.{p}.weight", [r])
            for p, r in zip(ADD_QKV, qkv, strict=True)],
        "lora_unet_single_blocks_0_linear1": [
            *((f"{s}.0.attn.{p}.weight", [r]) for p, r in zip(QKV, qkv, strict=True)),
            (f"{s}.0.proj_mlp.weight", [(3 * h, 3 * h + mlp)])],
        # shift, scale -> diffusers' scale, shift
        "lora_unet_final_layer_adaLN_modulation_1": [
            ("norm_out.linear.weight", [(h, 2 * h), (0, h)])],
        "lora_unet_single_blocks_1_linear2": [(f"{s}.1.proj_out.weight", [(0, h)])],
    }
    return flux.transformer_keys(cfg), modules, land


def _sd3() -> tuple[dict[str, Shape], dict[str, str], dict[str, Landing]]:
    cfg = sd3.SD3Config(depth=2)
    h = cfg.hidden
    qkv = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    j = "joint_blocks"
    modules = {"lora_unet_joint_blocks_0_x_block_attn_qkv": f"{j}.0.x_block.attn.qkv.weight",
               "lora_unet_joint_blocks_0_context_block_attn_qkv":
                   f"{j}.0.context_block.attn.qkv.weight",
               # the last (pre-only) context block's modulation: halves swapped
               "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1":
                   f"{j}.1.context_block.adaLN_modulation.1.weight",
               "lora_unet_final_layer_adaLN_modulation_1":
                   "final_layer.adaLN_modulation.1.weight"}
    t = "transformer_blocks"
    land = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": [
            (f"{t}.0.attn.{p}.weight", [r]) for p, r in zip(QKV, qkv, strict=True)],
        "lora_unet_joint_blocks_0_context_block_attn_qkv": [
            (f"{t}.0.attn.{p}.weight", [r])
            for p, r in zip(ADD_QKV, qkv, strict=True)],
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": [
            (f"{t}.1.norm1_context.linear.weight", [(h, 2 * h), (0, h)])],
        "lora_unet_final_layer_adaLN_modulation_1": [
            ("norm_out.linear.weight", [(h, 2 * h), (0, h)])],
    }
    return sd3.transformer_keys(cfg), modules, land


def _chroma() -> tuple[dict[str, Shape], dict[str, str], dict[str, Landing]]:
    cfg = chroma.small(chroma.ChromaConfig())
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    qkv = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    modules = {"lora_unet_double_blocks_1_img_attn_qkv": "double_blocks.1.img_attn.qkv.weight",
               "lora_unet_single_blocks_1_linear1": "single_blocks.1.linear1.weight"}
    s = "single_transformer_blocks"
    land = {
        "lora_unet_double_blocks_1_img_attn_qkv": [
            (f"transformer_blocks.1.attn.{p}.weight", [r])
            for p, r in zip(QKV, qkv, strict=True)],
        "lora_unet_single_blocks_1_linear1": [
            *((f"{s}.1.attn.{p}.weight", [r]) for p, r in zip(QKV, qkv, strict=True)),
            (f"{s}.1.proj_mlp.weight", [(3 * h, 3 * h + mlp)])],
    }
    return chroma.transformer_keys(cfg), modules, land


def _flux2() -> tuple[dict[str, Shape], dict[str, str], dict[str, Landing]]:
    cfg = flux2.small(flux2.Flux2Config())
    h = cfg.hidden_size
    qkv = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    modules = {"lora_unet_double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv.weight",
               # Flux.2 keeps the single blocks' linear1 fused in diffusers
               "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1.weight",
               "lora_unet_final_layer_adaLN_modulation_1":
                   "final_layer.adaLN_modulation.1.weight"}
    land = {
        "lora_unet_double_blocks_0_txt_attn_qkv": [
            (f"transformer_blocks.0.attn.{p}.weight", [r])
            for p, r in zip(ADD_QKV, qkv, strict=True)],
        "lora_unet_single_blocks_0_linear1": [
            ("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight", [(0, 9 * h)])],
        "lora_unet_final_layer_adaLN_modulation_1": [
            ("norm_out.linear.weight", [(h, 2 * h), (0, h)])],
    }
    return flux2.transformer_keys(cfg), modules, land


FAMILIES: dict[str, Callable[[], tuple[dict[str, Shape], dict[str, str], dict[str, Landing]]]]
FAMILIES = {"flux": _flux, "sd3": _sd3, "chroma": _chroma, "flux2": _flux2}


def _bases(tmp_path: Path, keys: dict[str, Shape]) -> tuple[Path, Path]:
    orig, diff = tmp_path / "orig.safetensors", tmp_path / "diff.safetensors"
    _write_base(orig, keys, seed=5)
    assert main(["convert", str(orig), "-o", str(diff), "--layout", "diffusers", "-q"]) == 0
    return orig, diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_lora_bakes_into_split_diffusers_weights_row_by_row(family: str,
                                                                  tmp_path: Path) -> None:
    keys, modules, land = FAMILIES[family]()
    orig, diff = _bases(tmp_path, keys)
    w_orig, w_diff = _tensors(orig), _tensors(diff)
    lora = tmp_path / "l.safetensors"
    la = _write_lora(lora, w_orig, modules, seed=6)
    out_d, out_o = tmp_path / "od.safetensors", tmp_path / "oo.safetensors"
    assert main(["lora", "bake", str(diff), str(lora), "-o", str(out_d), "-q"]) == 0
    got = _tensors(out_d)
    want = {k: v.clone() for k, v in w_diff.items()}
    for name, landing in land.items():
        up, down = la[f"{name}.lora_up.weight"], la[f"{name}.lora_down.weight"]
        for key, runs in landing:
            row = 0
            for a, b in runs:
                want[key][row:row + b - a] += S * (up[a:b] @ down)
                row += b - a
            assert row == want[key].shape[0], key
    patched = {k for landing in land.values() for k, _ in landing}
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
        assert torch.equal(got[key], w_diff[key]) == (key not in patched), key
    # round trip: the diffusers bake converted back is the original bake
    assert main(["lora", "bake", str(orig), str(lora), "-o", str(out_o), "-q"]) == 0
    baked_o = _tensors(out_o)
    with open_source(out_d) as src:
        back = convert_layout(src, "original").source
        assert set(back.infos) == set(baked_o)
        for key, t in baked_o.items():
            assert torch.equal(back.get(key), t), key


def test_split_rows_scale_with_block_weights_and_strength(tmp_path: Path) -> None:
    keys, modules, land = _flux()
    orig, diff = _bases(tmp_path, keys)
    w_orig, w_diff = _tensors(orig), _tensors(diff)
    lora, out = tmp_path / "l.safetensors", tmp_path / "o.safetensors"
    la = _write_lora(lora, w_orig, modules, seed=7)
    # strength 0.5 everywhere, single block 0 off: its linear1 rows stay as they were
    assert main(["lora", "bake", str(diff), f"{lora}:0.5", "-o", str(out), "-q",
                 "--blocks", "single_blocks.0=0,default=1"]) == 0
    got = _tensors(out)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    up, down = la[f"{name}.lora_up.weight"], la[f"{name}.lora_down.weight"]
    for key, [(a, b)] in land[name]:
        assert torch.equal(got[key], w_diff[key] + (0.5 * S) * (up[a:b] @ down)), key
    for key, _ in land["lora_unet_single_blocks_0_linear1"]:
        assert torch.equal(got[key], w_diff[key]), key


def test_dora_on_a_fused_weight_of_a_diffusers_base_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, modules, _ = _flux()
    orig, _ = _bases(tmp_path, keys)
    w = _tensors(orig)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    la = _write_lora(tmp_path / "tmp.safetensors", w, {name: modules[name]}, seed=8)
    la[f"{name}.dora_scale"] = torch.ones(math.prod(w[modules[name]].shape[:1]), 1)
    save_file(la, str(tmp_path / "dora.safetensors"))
    # in process (the console script's exit codes: tests/test_cli_exit_codes.py)
    code = main(["lora", "bake", str(tmp_path / "diff.safetensors"),
                 str(tmp_path / "dora.safetensors"), "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"module {name} (lora, DoRA) reads the whole fused weight" in err
    assert "diff.safetensors stores split" in err and "convert --layout original" in err
    assert not list(tmp_path.glob("x.safetensors*"))


# --- LoRA block weights for every family -------------------------------------------


def _bake_blocks(tmp_path: Path, keys: dict[str, Shape], modules: dict[str, str],
                 spec: str, *, layout: str | None = None) -> tuple[dict[str, torch.Tensor], ...]:
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("b", "l", "o"))
    _write_base(base, keys, seed=11)
    if layout is not None:
        conv = tmp_path / "bd.safetensors"
        assert main(["convert", str(base), "-o", str(conv), "--layout", layout, "-q"]) == 0
        base = conv
    w = _tensors(base)
    la = _write_lora(lora, _tensors(tmp_path / "b.safetensors"), modules, seed=12)
    assert main(["lora", "bake", str(base), str(lora), "-o", str(out), "-q",
                 "--blocks", spec]) == 0
    return w, la, _tensors(out)


def _lbw_check(w: dict[str, torch.Tensor], la: dict[str, torch.Tensor],
               got: dict[str, torch.Tensor], strengths: dict[str, tuple[str, float]]) -> None:
    """``strengths``: module -> (patched key in the base, block weight), by hand."""
    for name, (key, k) in strengths.items():
        up, down = la[f"{name}.lora_up.weight"], la[f"{name}.lora_down.weight"]
        want = w[key] if k == 0 else w[key] + (k * S) * (up @ down)
        assert torch.equal(got[key], want), name
    touched = {key for key, _ in strengths.values()}
    for key in w.keys() - touched:
        assert torch.equal(got[key], w[key]), key


def test_block_weights_scale_one_wan_block_in_both_layouts(tmp_path: Path) -> None:
    from modelkit.arch import wan

    keys = wan.transformer_keys(wan.small(wan.VARIANTS["t2v-1.3b"]))
    modules = {"lora_unet_blocks_0_self_attn_q": "blocks.0.self_attn.q.weight",
               "lora_unet_blocks_1_ffn_0": "blocks.1.ffn.0.weight",
               "lora_unet_head_head": "head.head.weight"}
    spec = "blocks.1=0.25,blocks.0=0,default=1"
    w, la, got = _bake_blocks(tmp_path, keys, modules, spec)
    _lbw_check(w, la, got, {
        "lora_unet_blocks_0_self_attn_q": ("blocks.0.self_attn.q.weight", 0),
        "lora_unet_blocks_1_ffn_0": ("blocks.1.ffn.0.weight", 0.25),
        "lora_unet_head_head": ("head.head.weight", 1.0)})
    # the same blocks by their original names on a diffusers-layout base
    (tmp_path / "d").mkdir()
    w, la, got = _bake_blocks(tmp_path / "d", keys, modules, spec, layout="diffusers")
    _lbw_check(w, la, got, {
        "lora_unet_blocks_0_self_attn_q": ("blocks.0.attn1.to_q.weight", 0),
        "lora_unet_blocks_1_ffn_0": ("blocks.1.ffn.net.0.proj.weight", 0.25),
        "lora_unet_head_head": ("proj_out.weight", 1.0)})


def test_block_weights_scale_one_sd3_block(tmp_path: Path) -> None:
    keys = sd3.transformer_keys(sd3.SD3Config(depth=2))
    qkv, fc2 = "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.1.x_block.mlp.fc2.weight"
    modules = {"lora_unet_joint_blocks_0_x_block_attn_qkv": qkv,
               "lora_unet_joint_blocks_1_x_block_mlp_fc2": fc2,
               "lora_unet_context_embedder": "context_embedder.weight"}
    # one block at 0.5, the embedder at 2, the other block off
    w, la, got = _bake_blocks(tmp_path, keys, modules,
                              "joint_blocks.1=0.5,context_embedder=2,default=0")
    _lbw_check(w, la, got, {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": (qkv, 0),
        "lora_unet_joint_blocks_1_x_block_mlp_fc2": (fc2, 0.5),
        "lora_unet_context_embedder": ("context_embedder.weight", 2.0)})


def test_every_tabled_family_takes_block_weights() -> None:
    from modelkit.arch import registry
    from modelkit.arch.lora_blocks import parse_lora_blocks
    from modelkit.arch.lora_modules import tabled_archs

    for arch in tabled_archs():
        entry = registry.get(arch)
        assert entry is not None and entry.lora is not None and entry.blocks is not None
        assert entry.lora.block_weights, arch
        names = entry.blocks.names
        got = parse_lora_blocks(f"{names[-2]}=0.5,default=1", arch)
        assert got == {n: (0.5 if n == names[-2] else 1.0) for n in names}, arch


def test_full_module_weight_and_bias_split_row_by_row(tmp_path: Path) -> None:
    keys, _, land = _flux()
    _, diff = _bases(tmp_path, keys)
    w = _tensors(diff)
    h = 256
    gen = torch.Generator().manual_seed(9)
    # a LyCORIS full module on the fused qkv: ΔW = diff, Δb = diff_b (no scale)
    name = "lycoris_double_blocks_0_img_attn_qkv"
    d, db = torch.randn(3 * h, h, generator=gen) * 0.1, torch.randn(3 * h, generator=gen) * 0.1
    save_file({f"{name}.diff": d, f"{name}.diff_b": db}, str(tmp_path / "full.safetensors"))
    out = tmp_path / "o.safetensors"
    assert main(["lora", "bake", str(diff), f"{tmp_path / 'full.safetensors'}:0.5", "-o",
                 str(out), "-q"]) == 0
    got = _tensors(out)
    for key, [(a, b)] in land["lora_unet_double_blocks_0_img_attn_qkv"]:
        assert torch.equal(got[key], w[key] + 0.5 * d[a:b]), key
        bias = key.removesuffix(".weight") + ".bias"
        assert torch.equal(got[bias], w[bias] + 0.5 * db[a:b]), bias


def test_info_measures_fused_modules_against_a_diffusers_base(tmp_path: Path) -> None:
    from modelkit.lora.info import info

    keys, modules, land = _flux()
    orig, diff = _bases(tmp_path, keys)
    w_diff = _tensors(diff)
    lora = tmp_path / "l.safetensors"
    _write_lora(lora, _tensors(orig), modules, seed=10)
    with open_source(lora) as la, open_source(orig) as bo, open_source(diff) as bd:
        ro, rd = info(la, bo), info(la, bd)
    by_name = {x.name: x for x in rd.layers}
    for name, landing in land.items():
        # ‖W‖ of the fused weight, joined here from the diffusers weights
        want = float(torch.cat([w_diff[k] for k, _ in landing]).norm())
        assert by_name[name].base_norm == pytest.approx(want, rel=1e-6), name
    assert [x.name for x in rd.layers] == [x.name for x in ro.layers]
    assert [x.base_norm for x in rd.layers] == pytest.approx(
        [x.base_norm for x in ro.layers], rel=1e-6)
    assert {n: b.relative for n, b in rd.blocks.items() if b.n_modules} == pytest.approx(
        {n: b.relative for n, b in ro.blocks.items() if b.n_modules}, rel=1e-6)
