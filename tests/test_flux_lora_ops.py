"""Flux.1 ``lora extract``, ``resize``, ``merge`` and ``convert`` (issue 19) on a
reduced-width Flux (hidden 128, one double and one single block): every
result is checked against an independent computation (the bake of the input
adapters, a hand-built ΔW, torch.linalg.svd), never against itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.cli import main
from modelkit.testing import flux_config, write_checkpoint, write_flux
from modelkit.testing.lora import write_flux_lora, write_lora
from tests.cli_support import ok as _ok
from tests.cli_support import run_here
from tests.file_support import metadata as _meta
from tests.file_support import tensors as _tensors

SIZE = {"hidden": 128, "depth": 1, "single": 1}
H = SIZE["hidden"]
QKV = "double_blocks.0.img_attn.qkv"
LIN1 = "single_blocks.0.linear1"
ADALN = "final_layer.adaLN_modulation.1"


def _kohya_modules() -> tuple[str, ...]:
    """Every kohya module name but the final adaLN modulation (diffusers'
    norm_out.linear, its halves swapped: tested on its own)."""
    from modelkit.arch import flux

    return tuple(n for n in flux.lora_modules(flux_config(**SIZE))
                 if n.startswith("lora_unet_") and "adaLN" not in n)





def _bake(base: Path, out: Path, *loras: object) -> dict[str, torch.Tensor]:
    _ok("lora", "bake", base, *loras, "-o", out)
    return _tensors(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An F32 base, and a fine-tune of it: base + a known rank-2 ΔW on every
    2-D weight (seeded)."""
    d = tmp_path_factory.mktemp("fluxops")
    base, tuned = d / "base.safetensors", d / "tuned.safetensors"
    write_flux(base, dtype="F32", seed=3, **SIZE)
    gen = torch.Generator().manual_seed(11)
    w = _tensors(base)
    for key, t in w.items():
        if t.ndim == 2:
            a = torch.randn(t.shape[0], 2, generator=gen)
            b = torch.randn(2, t.shape[1], generator=gen)
            w[key] = t + 0.05 * (a @ b)
    save_file(w, str(tuned))
    return {"base": base, "tuned": tuned, "dir": d}


@pytest.mark.parametrize("fmt", ["kohya", "peft", "comfyui"])
def test_extract_bakes_back_to_the_fine_tune(models: dict[str, Path], tmp_path: Path,
                                             fmt: str, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    base, tuned = models["base"], models["tuned"]
    lora = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(base), str(tuned), "-o", str(lora), "--rank", "4",
                 "--dtype", "fp32", "--format", fmt, "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["left_out"] == []  # PEFT's norm_out.linear: the adaLN, halves swapped
    assert report["skipped"] == [] and report["relative_error"] < 1e-5
    keys = _tensors(lora)
    prefix = {"kohya": "lora_unet_", "comfyui": "diffusion_model.", "peft": "transformer."}
    assert all(k.startswith(prefix[fmt]) for k in keys)
    if fmt == "kohya":  # fused qkv is one module, alpha = rank
        assert keys[f"lora_unet_{QKV.replace('.', '_')}.lora_up.weight"].shape == (3 * H, 4)
        assert float(keys[f"lora_unet_{QKV.replace('.', '_')}.alpha"]) == 4.0
    if fmt == "peft":  # split q/k/v and proj_mlp, each its own rank-2 SVD
        one = "transformer.single_transformer_blocks.0"
        assert keys[f"{one}.attn.to_k.lora_B.weight"].shape == (H, 4)
        assert keys[f"{one}.proj_mlp.lora_B.weight"].shape == (4 * H, 4)
        assert not any(k.endswith(".alpha") for k in keys)
    meta = _meta(lora)
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert not any(str(models["dir"]) in v or str(tmp_path) in v for v in meta.values())
    assert float(meta["modelkit.lora.relative_error"]) < 1e-5
    got = _bake(base, tmp_path / "b.safetensors", lora)
    want = _tensors(tuned)
    for key, t in got.items():
        torch.testing.assert_close(t, want[key], rtol=0, atol=2e-6, msg=key)


def _delta(lora: dict[str, torch.Tensor], name: str, scale: float = 1.0) -> torch.Tensor:
    if f"{name}.lora_up.weight" in lora:
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        alpha = lora.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else scale
    else:
        up, down = lora[f"{name}.lora_B.weight"], lora[f"{name}.lora_A.weight"]
    return scale * (up.double() @ down.double())


def _fused_peft(lora: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW of the fused qkv and linear1 of a PEFT LoRA, placed by hand."""
    d, s = "transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0"
    qkv = torch.cat([_delta(lora, f"{d}.{p}", scale) for p in ("to_q", "to_k", "to_v")])
    lin1 = torch.cat([*(_delta(lora, f"{s}.attn.{p}", scale) for p in ("to_q", "to_k", "to_v")),
                      _delta(lora, f"{s}.proj_mlp", scale)])
    return {QKV: qkv, LIN1: lin1}


def test_convert_kohya_peft_kohya_is_exact(models: dict[str, Path], tmp_path: Path) -> None:
    src, peft, back = (tmp_path / f"{n}.safetensors" for n in ("k", "p", "k2"))
    write_flux_lora(src, "kohya", rank=4, alpha=2.0, seed=5, modules=_kohya_modules(), **SIZE)
    _ok("lora", "convert", src, "--to", "peft", "-o", peft)
    _ok("lora", "convert", peft, "--to", "kohya", "-o", back)
    k, p, k2 = _tensors(src), _tensors(peft), _tensors(back)
    kname = {path: "lora_unet_" + path.replace(".", "_") for path in (QKV, LIN1)}
    # kohya -> PEFT: each split module takes its rows of up (alpha/r = 0.5 folded), same down
    up = k[f"{kname[QKV]}.lora_up.weight"]
    to_k = "transformer.transformer_blocks.0.attn.to_k"
    assert torch.equal(p[f"{to_k}.lora_A.weight"], k[f"{kname[QKV]}.lora_down.weight"])
    assert torch.equal(p[f"{to_k}.lora_B.weight"], 0.5 * up[H:2 * H])
    for path, want in _fused_peft(p).items():
        torch.testing.assert_close(want, _delta(k, kname[path]), rtol=0, atol=1e-12)
    # PEFT -> kohya: the downs stacked, up block-diagonal: rank 3r on qkv, 4r on linear1
    assert k2[f"{kname[QKV]}.lora_down.weight"].shape == (12, H)
    assert k2[f"{kname[LIN1]}.lora_up.weight"].shape == (7 * H, 16)
    assert float(k2[f"{kname[LIN1]}.alpha"]) == 16.0
    for name in {n.rsplit(".", 2)[0] for n in k if n.endswith(".lora_up.weight")}:
        torch.testing.assert_close(_delta(k2, name), _delta(k, name), rtol=0, atol=1e-9,
                                   msg=name)
    meta = _meta(back)
    assert "lora_adapter_metadata" not in meta


def test_convert_comfyui_is_a_renaming(models: dict[str, Path], tmp_path: Path) -> None:
    src, out = tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    write_flux_lora(src, "kohya", rank=2, alpha=1.0, seed=6, **SIZE)
    _ok("lora", "convert", src, "--to", "comfyui", "-o", out)
    k, c = _tensors(src), _tensors(out)
    paths = [key.removesuffix(".weight") for key, t in _tensors(models["base"]).items()
             if t.ndim == 2]
    n = 0
    for path in paths:
        name = "lora_unet_" + path.replace(".", "_")
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            if f"{name}.{suffix}" in k:
                assert torch.equal(c[f"diffusion_model.{path}.{suffix}"], k[f"{name}.{suffix}"])
                n += 1
    assert n == len(k) == len(c)


def test_merge_of_kohya_and_peft_is_the_sum_of_their_delta(models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    base = models["base"]
    ka, pb, m = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "m"))
    write_flux_lora(ka, "kohya", rank=4, alpha=2.0, seed=7, **SIZE)
    write_flux_lora(pb, "peft", rank=4, alpha=8.0, alpha_in_metadata=True, seed=8, **SIZE)
    _ok("lora", "merge", f"{ka}:0.5", f"{pb}:-1", "-o", m, "--rank", 32, "--dtype", "fp32")
    merged, a, b = _tensors(m), _tensors(ka), _tensors(pb)
    # by hand on the fused weights: 0.5 * alpha/r * up@down - 1 * 2 * B@A at the split rows
    hand = _fused_peft(b, 2.0)
    for path in (QKV, LIN1):
        name = "lora_unet_" + path.replace(".", "_")
        want = 0.5 * _delta(a, name) - hand[path]
        torch.testing.assert_close(_delta(merged, name), want, rtol=0, atol=1e-5)
    # every weight: the merged LoRA bakes to what the two adapters bake to
    both = _bake(base, tmp_path / "o1.safetensors", f"{ka}:0.5", f"{pb}:-1")
    one = _bake(base, tmp_path / "o2.safetensors", m)
    for key, t in both.items():
        torch.testing.assert_close(one[key], t, rtol=0, atol=1e-5, msg=key)


def test_resize_equals_the_truncated_svd(tmp_path: Path) -> None:
    src, out = tmp_path / "k.safetensors", tmp_path / "r.safetensors"
    write_flux_lora(src, "kohya", rank=8, alpha=4.0, seed=9, **SIZE)
    _ok("lora", "resize", src, "--rank", 3, "--dtype", "fp32", "-o", out)
    k, r = _tensors(src), _tensors(out)
    names = {n.rsplit(".", 2)[0] for n in k if n.endswith(".lora_up.weight")}
    assert names == {n.rsplit(".", 2)[0] for n in r if n.endswith(".lora_up.weight")}
    for name in names:
        full = _delta(k, name)
        u, s, vh = torch.linalg.svd(full)
        want = (u[:, :3] * s[:3]) @ vh[:3]
        got = _delta(r, name)
        assert r[f"{name}.lora_down.weight"].shape[0] == 3
        # close to the float64 truncation (fp32 SVD of near-equal singular values), and
        # exactly as far from ΔW as the optimum (Eckart-Young: the tail of the spectrum)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=name)
        tail = float(s[3:].square().sum().sqrt())
        assert abs(float((full - got).norm()) - tail) <= 1e-5 * tail, name


def test_resize_and_merge_take_flux_block_weights(tmp_path: Path) -> None:
    src, out = tmp_path / "k.safetensors", tmp_path / "m.safetensors"
    write_flux_lora(src, "kohya", rank=2, seed=10, **SIZE)
    _ok("lora", "merge", src, "-o", out, "--rank", 2, "--dtype", "fp32", "--blocks",
        "single_only")
    k, m = _tensors(src), _tensors(out)
    lin1 = "lora_unet_" + LIN1.replace(".", "_")
    torch.testing.assert_close(_delta(m, lin1), _delta(k, lin1), rtol=0, atol=1e-6)
    qkv = "lora_unet_" + QKV.replace(".", "_")
    assert f"{qkv}.lora_up.weight" not in m  # block weight 0: nothing left to write


def test_cli_refusals_in_one_line(models: dict[str, Path], tmp_path: Path
                                                 ) -> None:
    """One line, exit 2, no file: a bad rank, another family, a PEFT output
    for a weight PEFT has no name for."""
    lora, sd, sd_lora = (tmp_path / f"{n}.safetensors" for n in ("k", "sd", "sdl"))
    write_flux_lora(lora, "kohya", rank=2, seed=12, modules=_kohya_modules(), **SIZE)
    write_checkpoint(sd)
    write_lora(sd_lora)
    base, tuned = str(models["base"]), str(models["tuned"])
    adaln = tmp_path / "adaln.safetensors"  # every module, the final adaLN included
    write_flux_lora(adaln, "kohya", rank=2, seed=13, **SIZE)
    bad, out = str(tmp_path / "bad.safetensors"), str(tmp_path / "o.safetensors")
    out_adaln = str(tmp_path / "adaln_peft.safetensors")
    res = run_here({
        "rank0": ["lora", "extract", base, tuned, "-o", bad, "--rank", "0"],
        "resize0": ["lora", "resize", str(lora), "-o", bad, "--rank", "0"],
        "family": ["lora", "extract", base, str(sd), "-o", bad, "--rank", "2"],
        "merge_family": ["lora", "merge", str(lora), str(sd_lora), "-o", bad, "--rank", "2"],
        "peft_adaln": ["lora", "convert", str(adaln), "--to", "peft", "-o", out_adaln],
        "ok": ["lora", "convert", str(lora), "--to", "peft", "-o", out, "--json", "-q"],
    }, tmp_path)
    for case in ("rank0", "resize0", "family", "merge_family"):
        code, _, err = res[case]
        assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
        assert "Traceback" not in err
    assert not Path(bad).exists()
    assert "at least 1" in res["rank0"][2] and "at least 1" in res["resize0"][2]
    assert "flux" in res["family"][2] and "sd1" in res["family"][2]
    assert "(flux)" in res["merge_family"][2] and "(sd1)" in res["merge_family"][2]
    # the final adaLN is diffusers' norm_out.linear with its halves swapped: up rows swapped
    assert res["peft_adaln"][0] == 0, res["peft_adaln"][2]
    k, p = _tensors(adaln), _tensors(Path(out_adaln))
    up = k[f"lora_unet_{ADALN.replace('.', '_')}.lora_up.weight"]
    half = up.shape[0] // 2
    assert torch.equal(p["transformer.norm_out.linear.lora_B.weight"],
                       torch.cat([up[half:], up[:half]]))
    code, stdout, err = res["ok"]
    assert code == 0, err
    report = json.loads(stdout)
    assert report["report"]["rank_changes"] == {}
    assert Path(out).exists()


def test_lora_help_names_flux_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.arch.registry import handles

    for cmd in ("extract", "resize", "merge", "convert"):
        assert handles("flux", f"lora {cmd}")
        assert main(["lora", cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "flux" in text.split("Families: ")[1].split("Refused")[0], cmd
    assert flux_config(**SIZE).hidden_size == H


def test_resize_to_peft_splits_each_weight_and_bakes_the_same(models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    base = models["base"]
    src, out = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    write_flux_lora(src, "kohya", rank=3, alpha=6.0, seed=14, modules=_kohya_modules(), **SIZE)
    _ok("lora", "resize", src, "--rank", 3, "--dtype", "fp32", "--format", "peft", "-o", out)
    p = _tensors(out)
    one = "transformer.single_transformer_blocks.0"
    assert p[f"{one}.proj_mlp.lora_B.weight"].shape == (4 * H, 3)
    assert not any(k.endswith(".alpha") for k in p)
    want = _bake(base, tmp_path / "o1.safetensors", src)
    got = _bake(base, tmp_path / "o2.safetensors", out)
    for key, t in want.items():
        torch.testing.assert_close(got[key], t, rtol=0, atol=2e-6, msg=key)
