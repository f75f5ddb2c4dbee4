"""The LoRA engine (modelkit.lora): ΔW of every format against hand-written
formulas, bake coverage and errors, extract, resize, merge, convert, info."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_converted
from safetensors.torch import save_file

from modelkit.arch.lora_blocks import attention_blocks, parse_lora_blocks
from modelkit.errors import ModelkitError
from modelkit.io.hashing import hash_file
from modelkit.io.reader import open_model
from modelkit.lora import bake, convert, extract, info, merge, resize
from modelkit.testing import write_checkpoint
from modelkit.testing.lora import write_lora

UNET = "model.diffusion_model."
LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
LIN_KEY = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # [32, 32]
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
CONV_KEY = UNET + "input_blocks.4.0.in_layers.2.weight"  # [32, 16, 3, 3]
OUT_KEY = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"  # weight + bias
OUT = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
NORM = "lora_unet_down_blocks_1_resnets_0_norm1"
NORM_KEY = UNET + "input_blocks.4.0.in_layers.0"
K = 0.7


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    out = {n: root / f"{n}.safetensors" for n in (
        "sd1", "sd1_lora", "sd1_locon", "sd1_lokr", "sd1_loha", "sd1_peft", "sd2_lora",
        "sdxl_lora")}
    out.update(sd2=models["sd2"], sdxl=models["sdxl"])  # the session's fp16 checkpoints
    write_checkpoint(out["sd1"], "sd1", seed=1, dtype="F32")
    write_lora(out["sd1_lora"], "sd1", rank=4, alpha=2.0, dtype="F32", seed=4)
    write_lora(out["sd1_locon"], "sd1", conv=True, rank=4, conv_rank=2, dtype="F32", seed=5)
    write_lora(out["sd1_lokr"], "sd1", kind="lokr", conv=True, dtype="F32", seed=6)
    write_lora(out["sd1_loha"], "sd1", kind="loha", alpha=1.0, dtype="F32", seed=7)
    write_lora(out["sd1_peft"], "sd1", kind="peft", dtype="F32", seed=8)
    write_lora(out["sd2_lora"], "sd2", rank=4, dtype="F32", seed=9)
    write_lora(out["sdxl_lora"], "sdxl", rank=4, alpha=8.0, dtype="F32", seed=10)
    return out


def _g(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bake_key(lib: dict[str, Path], tensors: dict[str, torch.Tensor], tmp: Path, key: str,
              meta: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    path = tmp / "hand.safetensors"
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1", **(meta or {})})
    ck = open_model(lib["sd1"])
    conv = bake(ck, [(open_model(path), K)])
    return ck.get(key).float(), conv.source.get(key).float()


def _lora(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float | None = None
          ) -> dict[str, torch.Tensor]:
    out = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


# --- ΔW formulas ------------------------------------------------------------------


def test_lora_linear_and_missing_alpha(lib: dict[str, Path], tmp_path: Path) -> None:
    up, down = _g(1, 32, 4), _g(2, 4, 32)
    w, got = _bake_key(lib, _lora(LIN, up, down, 2.0), tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * 0.5 * up @ down)
    w, got = _bake_key(lib, _lora(LIN, up, down), tmp_path, LIN_KEY)  # no alpha: s = 1
    torch.testing.assert_close(got, w + K * up @ down)


def test_locon_3x3_and_tucker(lib: dict[str, Path], tmp_path: Path) -> None:
    up, down = _g(1, 32, 4, 1, 1), _g(2, 4, 16, 3, 3)
    w, got = _bake_key(lib, _lora(CONV, up, down, 4.0), tmp_path, CONV_KEY)
    expect = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    torch.testing.assert_close(got, w + K * expect, atol=1e-5, rtol=1e-5)
    mid, down1 = _g(3, 4, 4, 3, 3), _g(4, 4, 16, 1, 1)
    t = {**_lora(CONV, up, down1, 2.0), f"{CONV}.lora_mid.weight": mid}
    w, got = _bake_key(lib, t, tmp_path, CONV_KEY)
    expect = torch.zeros(32, 16, 3, 3)
    for o in range(32):
        for i in range(16):
            for a in range(4):
                for b in range(4):
                    expect[o, i] += up[o, a, 0, 0] * mid[a, b] * down1[b, i, 0, 0]
    torch.testing.assert_close(got, w + K * 0.5 * expect, atol=1e-5, rtol=1e-5)


def test_loha_plain_and_tucker(lib: dict[str, Path], tmp_path: Path) -> None:
    a1, b1, a2, b2 = _g(1, 32, 2), _g(2, 2, 32), _g(3, 32, 2), _g(4, 2, 32)
    t = {f"{LIN}.hada_w1_a": a1, f"{LIN}.hada_w1_b": b1, f"{LIN}.hada_w2_a": a2,
         f"{LIN}.hada_w2_b": b2, f"{LIN}.alpha": torch.tensor(1.0)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * 0.5 * (a1 @ b1) * (a2 @ b2))  # s once
    t1, t2 = _g(5, 2, 2, 3, 3), _g(6, 2, 2, 3, 3)
    wa1, wb1, wa2, wb2 = _g(7, 2, 32), _g(8, 2, 16), _g(9, 2, 32), _g(10, 2, 16)
    t = {f"{CONV}.hada_t1": t1, f"{CONV}.hada_t2": t2, f"{CONV}.hada_w1_a": wa1,
         f"{CONV}.hada_w1_b": wb1, f"{CONV}.hada_w2_a": wa2, f"{CONV}.hada_w2_b": wb2}
    w, got = _bake_key(lib, t, tmp_path, CONV_KEY)

    def factor(tt: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        f = torch.zeros(32, 16, 3, 3)
        for i in range(2):
            for j in range(2):
                f += wa[i][:, None, None, None] * wb[j][None, :, None, None] * tt[i, j]
        return f

    expect = factor(t1, wa1, wb1) * factor(t2, wa2, wb2)
    torch.testing.assert_close(got, w + K * expect, atol=1e-4, rtol=1e-4)


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = \
                a[i, j] * b
    return out


def test_lokr_variants(lib: dict[str, Path], tmp_path: Path) -> None:
    w1, w2a, w2b = _g(1, 4, 4), _g(2, 8, 2), _g(3, 2, 8)
    t = {f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2_a": w2a, f"{LIN}.lokr_w2_b": w2b,
         f"{LIN}.alpha": torch.tensor(1.0)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * 0.5 * _kron(w1, w2a @ w2b))
    w1a, w1b, w2 = _g(4, 4, 1), _g(5, 1, 4), _g(6, 8, 8)
    t = {f"{LIN}.lokr_w1_a": w1a, f"{LIN}.lokr_w1_b": w1b, f"{LIN}.lokr_w2": w2,
         f"{LIN}.alpha": torch.tensor(3.0)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * 3.0 * _kron(w1a @ w1b, w2))
    w1, w2 = _g(7, 4, 4), _g(8, 8, 8)  # both full: s = 1 whatever alpha says
    t = {f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2": w2, f"{LIN}.alpha": torch.tensor(5.0)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * _kron(w1, w2))
    # conv with a Tucker w2: [8, 4, 3, 3] from t2 [2, 2, 3, 3], w2_a [2, 8], w2_b [2, 4]
    c1, t2, wa, wb = _g(9, 4, 4), _g(10, 2, 2, 3, 3), _g(11, 2, 8), _g(12, 2, 4)
    t = {f"{CONV}.lokr_w1": c1, f"{CONV}.lokr_t2": t2, f"{CONV}.lokr_w2_a": wa,
         f"{CONV}.lokr_w2_b": wb, f"{CONV}.alpha": torch.tensor(2.0)}
    w, got = _bake_key(lib, t, tmp_path, CONV_KEY)
    f2 = torch.einsum("ijhw,jc,io->ochw", t2, wb, wa)
    expect = torch.zeros(32, 16, 3, 3)
    for i in range(4):
        for j in range(4):
            expect[i * 8:(i + 1) * 8, j * 4:(j + 1) * 4] = c1[i, j] * f2
    torch.testing.assert_close(got, w + K * expect, atol=1e-5, rtol=1e-5)


def test_ia3_full_norm(lib: dict[str, Path], tmp_path: Path) -> None:
    s = _g(1, 32)
    t = {f"{LIN}.weight": s, f"{LIN}.on_input": torch.tensor(False)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * w * s[:, None])
    t = {f"{LIN}.weight": s, f"{LIN}.on_input": torch.tensor(True)}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * w * s[None, :])
    d, db = _g(2, 32, 32), _g(3, 32)
    t = {f"{OUT}.diff": d, f"{OUT}.diff_b": db}
    w, got = _bake_key(lib, t, tmp_path, OUT_KEY + ".weight")
    torch.testing.assert_close(got, w + K * d)
    b, got_b = _bake_key(lib, t, tmp_path, OUT_KEY + ".bias")
    torch.testing.assert_close(got_b, b + K * db)
    wn, bn = _g(4, 16), _g(5, 16)
    t = {f"{NORM}.w_norm": wn, f"{NORM}.b_norm": bn}
    w, got = _bake_key(lib, t, tmp_path, NORM_KEY + ".weight")
    torch.testing.assert_close(got, w + K * wn)


def test_dora_both_axes(lib: dict[str, Path], tmp_path: Path) -> None:
    up, down = _g(1, 32, 4), _g(2, 4, 32)
    m_out, m_in = _g(3, 32, 1).abs() + 0.5, _g(4, 1, 32).abs() + 0.5
    t = {**_lora(LIN, up, down, 2.0), f"{LIN}.dora_scale": m_out}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    wc = w + 0.5 * up @ down
    expect = wc * m_out / wc.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, w + K * (expect - w), atol=1e-5, rtol=1e-5)
    t[f"{LIN}.dora_scale"] = m_in
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY)
    expect = wc * m_in / wc.norm(dim=0, keepdim=True)
    torch.testing.assert_close(got, w + K * (expect - w), atol=1e-5, rtol=1e-5)
    t[f"{LIN}.dora_scale"] = m_in.reshape(-1)  # 1-D on a square layer: ambiguous
    with pytest.raises(ModelkitError, match="square"):
        _bake_key(lib, t, tmp_path, LIN_KEY)


def test_peft_spellings_and_metadata_scale(lib: dict[str, Path], tmp_path: Path) -> None:
    up, down = _g(1, 32, 4), _g(2, 4, 32)
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    t = {f"{path}.to_q.lora.down.weight": down, f"{path}.to_q.lora.up.weight": up}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    w, got = _bake_key(lib, t, tmp_path, LIN_KEY, meta)
    torch.testing.assert_close(got, w + K * 2.0 * up @ down)
    old = {f"{path}.processor.to_q_lora.down.weight": down,
           f"{path}.processor.to_q_lora.up.weight": up}
    w, got = _bake_key(lib, old, tmp_path, LIN_KEY)
    torch.testing.assert_close(got, w + K * up @ down)


# --- bake -----------------------------------------------------------------------


def test_every_fixture_format_bakes_with_full_coverage(lib: dict[str, Path],
                                                       tmp_path: Path) -> None:
    ck = open_model(lib["sd1"])
    for kind in ("lora", "loha", "lokr", "peft", "comfyui", "full", "ia3"):
        path = tmp_path / f"{kind}.safetensors"
        write_lora(path, "sd1", kind=kind, conv=kind != "peft", dora=kind == "loha")
        rep = bake(ck, [open_model(path)]).report.adapters[0]
        assert rep.unmatched == [] and rep.n_modules > 0, kind
        assert 0 < rep.keys_touched <= 2 * rep.n_modules, kind


def test_sd2_fused_qkv_row_slices(lib: dict[str, Path], tmp_path: Path) -> None:
    pre = "lora_te_text_model_encoder_layers_3_self_attn_"
    t = {**_lora(pre + "q_proj", _g(1, 32, 2), _g(2, 2, 32)),
         **_lora(pre + "v_proj", _g(3, 32, 2), _g(4, 2, 32))}  # no k, no out_proj
    path = tmp_path / "qv.safetensors"
    save_file(t, path, metadata={"ss_v2": "True"})
    ck = open_model(lib["sd2"])
    key = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"
    conv = bake(ck, [open_model(path)])
    w, got = ck.get(key).float(), conv.source.get(key).float()  # fp16 checkpoint
    q, v = _g(1, 32, 2) @ _g(2, 2, 32), _g(3, 32, 2) @ _g(4, 2, 32)
    torch.testing.assert_close(got[:32], (w[:32] + q).half().float())
    assert torch.equal(got[32:64], w[32:64])
    torch.testing.assert_close(got[64:], (w[64:] + v).half().float())
    assert conv.report.adapters[0].keys_touched == 1


def test_weights_blocks_and_several_adapters(lib: dict[str, Path]) -> None:
    ck = open_model(lib["sd1"])
    one = bake(ck, [(open_model(lib["sd1_lora"]), 0.5, 0.25)]).source
    two = bake(ck, [(open_model(lib["sd1_lora"]), 0.5, 0.25),
                    (open_model(lib["sd1_peft"]), 0.3)]).source
    peft = bake(ck, [(open_model(lib["sd1_peft"]), 0.3)]).source
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for key in (LIN_KEY, te):
        w = ck.get(key)
        torch.testing.assert_close(two.get(key), one.get(key) + peft.get(key) - w)
    full = bake(ck, [open_model(lib["sd1_lora"])]).source
    torch.testing.assert_close(one.get(te) - ck.get(te), 0.25 * (full.get(te) - ck.get(te)))
    blocked = bake(ck, [open_model(lib["sd1_lora"])], blocks="IND").source  # IN04 -> 0
    assert torch.equal(blocked.get(LIN_KEY), ck.get(LIN_KEY))
    deep = UNET + "input_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"  # IN05 -> 1
    assert torch.equal(blocked.get(deep), full.get(deep))
    assert torch.equal(blocked.get(te), full.get(te))  # BASE 1


def test_output_dtype_and_passthrough(lib: dict[str, Path]) -> None:
    ck = open_model(lib["sd1"])
    conv = bake(ck, [open_model(lib["sd1_lora"])], dtype="fp16")
    vae = "first_stage_model.decoder.conv_in.weight"
    assert conv.source.infos[LIN_KEY].dtype == "F16"
    assert conv.source.get(vae).dtype == torch.float16
    same = bake(ck, [open_model(lib["sd1_lora"])]).source
    assert torch.equal(same.get(vae), ck.get(vae))


def test_bake_errors(lib: dict[str, Path], tmp_path: Path) -> None:
    ck = open_model(lib["sd1"])
    with pytest.raises(ModelkitError, match=r"sd1_lora\.safetensors: is an sd1 adapter but "
                                            r"sdxl\.safetensors is an sdxl checkpoint"):
        bake(open_model(lib["sdxl"]), [open_model(lib["sd1_lora"])])
    t = {**_lora(LIN, _g(1, 32, 4), _g(2, 4, 32)),
         **_lora("lora_unet_no_such_module", _g(1, 8, 4), _g(2, 4, 8))}
    save_file(t, tmp_path / "extra.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelkitError, match=r"lora_unet_no_such_module\.lora_down\.weight"):
        bake(ck, [open_model(tmp_path / "extra.safetensors")])
    rep = bake(ck, [open_model(tmp_path / "extra.safetensors")], allow_unmatched=True).report
    assert rep.adapters[0].unmatched == ["lora_unet_no_such_module.lora_down.weight",
                                         "lora_unet_no_such_module.lora_up.weight"]
    assert rep.adapters[0].keys_touched == 1
    bad = _lora(LIN, _g(1, 32, 4), _g(2, 4, 48))
    save_file(bad, tmp_path / "bad.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelkitError, match=rf"{LIN}\.lora_down\.weight: ΔW is 32x48"):
        bake(ck, [open_model(tmp_path / "bad.safetensors")])
    # LyCORIS sparse bias is not applied: listed like an unmatched key, never dropped
    sparse = {**_lora(LIN, _g(1, 32, 4), _g(2, 4, 32)),
              f"{LIN}.bias_indices": torch.tensor([[0], [1]]),
              f"{LIN}.bias_values": torch.tensor([0.5]),
              f"{LIN}.bias_size": torch.tensor([32, 32])}
    save_file(sparse, tmp_path / "sparse.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelkitError, match=r"3 keys .* not applied \(LyCORIS sparse bias\)"):
        bake(ck, [open_model(tmp_path / "sparse.safetensors")])
    rep = bake(ck, [open_model(tmp_path / "sparse.safetensors")], allow_unmatched=True).report
    assert rep.adapters[0].unmatched == [f"{LIN}.{s}" for s in
                                         ("bias_indices", "bias_size", "bias_values")]
    assert rep.adapters[0].keys_touched == 1


# --- extract, resize, merge, convert, info ------------------------------------------


@pytest.fixture(scope="module")
def tuned(lib: dict[str, Path]) -> Path:
    out = lib["sd1"].parent / "tuned.safetensors"
    write_converted(bake(open_model(lib["sd1"]), [open_model(lib["sd1_lokr"])],
                         blocks="OUTALL"), out)
    return out


def test_extract_then_bake_reproduces_tuned(lib: dict[str, Path], tuned: Path,
                                            tmp_path: Path) -> None:
    base, ft = open_model(lib["sd1"]), open_model(tuned)
    conv = extract(base, ft, rank=8, conv_rank=4, dtype="fp32")
    out = tmp_path / "ex.safetensors"
    write_converted(conv, out)
    rep = conv.report
    assert 0 < rep.relative_error < 1  # OUTALL left IN01's attention untouched:
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in rep.skipped
    back = bake(base, [open_model(out)]).source
    err = ref = 0.0
    for layer in rep.layers:
        t, b, w = ft.get(layer.key).float(), back.get(layer.key).float(), base.get(layer.key)
        err += float(((t - b) ** 2).sum())
        ref += float(((t - w.float()) ** 2).sum())
    assert math.sqrt(err / ref) == pytest.approx(rep.relative_error, rel=1e-3)
    meta = open_model(out).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_v2"] == "False"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "8"
    assert float(meta["modelkit.lora.relative_error"]) == pytest.approx(rep.relative_error,
                                                                        rel=1e-5)
    assert set(json.loads(meta["modelkit.lora.skipped"])) == set(rep.skipped)
    assert hash_file(out).addnet == meta["sshs_model_hash"]
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def test_extract_energy_and_exact_low_rank(lib: dict[str, Path], tmp_path: Path) -> None:
    tuned = tmp_path / "t.safetensors"
    write_converted(bake(open_model(lib["sd1"]), [open_model(lib["sd1_lora"])]), tuned)
    base, ft = open_model(lib["sd1"]), open_model(tuned)
    exact = extract(base, ft, rank=4, dtype="fp32", method="randomized")
    exact.prepare()
    assert exact.report.relative_error < 1e-4  # a rank-4 update, found by the fast SVD
    low = extract(base, ft, rank=4, energy=0.5, dtype="fp32")
    low.prepare()
    ranks = {x.rank for x in low.report.layers}
    assert min(ranks) < 4 and low.report.relative_error > exact.report.relative_error
    assert low.source.metadata["ss_network_dim"] == "Dynamic"


def test_resize_full_rank_is_lossless_and_merge_equals_baking_both(
        lib: dict[str, Path], tmp_path: Path) -> None:
    ck = open_model(lib["sd1"])
    resized = tmp_path / "r.safetensors"
    write_converted(resize(open_model(lib["sd1_locon"]), rank=64, dtype="fp32"), resized)
    merged = tmp_path / "m.safetensors"
    write_converted(merge([(open_model(lib["sd1_locon"]), 0.6, None),
                           (open_model(lib["sd1_loha"]), -0.4, "IND")], rank=64,
                          dtype="fp32"), merged)
    a = bake(ck, [open_model(lib["sd1_locon"])]).source
    b = bake(ck, [open_model(resized)]).source
    both = bake(ck, [(open_model(lib["sd1_locon"]), 0.6),
                     (open_model(lib["sd1_loha"]), -0.4, None, "IND")]).source
    m = bake(ck, [open_model(merged)]).source
    for key in (LIN_KEY, CONV_KEY,
                "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"):
        torch.testing.assert_close(b.get(key), a.get(key), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.get(key), both.get(key), atol=1e-5, rtol=1e-5)
    small = resize(open_model(lib["sd1_locon"]), rank=2)
    small.prepare()
    assert 0 < small.report.relative_error < 1


def test_convert_keeps_delta_and_alpha(lib: dict[str, Path], tmp_path: Path) -> None:
    ck = open_model(lib["sd2"])
    ref = bake(ck, [open_model(lib["sd2_lora"])]).source
    src = lib["sd2_lora"]
    for to in ("peft", "comfy", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        write_converted(convert(open_model(src), to), out)
        names = list(open_model(out).infos)
        prefix = {"peft": "unet.", "comfy": "diffusion_model.", "kohya": "lora_unet_"}[to]
        assert any(n.startswith(prefix) for n in names)
        got = bake(ck, [open_model(out)]).source
        for key in (UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"):
            assert torch.equal(got.get(key), ref.get(key)), key  # fp16 after float32 math
        src = out  # chain: kohya -> peft -> comfy -> kohya
    comfy = tmp_path / "direct.safetensors"
    write_converted(convert(open_model(lib["sdxl_lora"]), "comfy"), comfy)
    alphas = {k: v for k, v in open_model(comfy).iter() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 8.0 for v in alphas.values())
    assert any(k.startswith("text_encoders.clip_g.transformer.") for k in alphas)
    with pytest.raises(ModelkitError, match="plain LoRA only"):
        convert(open_model(lib["sd1_lokr"]), "peft")


def test_info_blocks_and_ranks(lib: dict[str, Path]) -> None:
    rep = info(open_model(lib["sd1_lora"]), open_model(lib["sd1"]))
    te = [x for x in rep.layers if x.block == "BASE"]
    assert len(te) == 72 and rep.blocks["BASE"].n_modules == 72
    lora = open_model(lib["sd1_lora"])
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    dense = 0.5 * lora.get(f"{name}.lora_up.weight") @ lora.get(f"{name}.lora_down.weight")
    layer = next(x for x in rep.layers if x.name == name)
    assert layer.delta_norm == pytest.approx(float(dense.norm()), rel=1e-4)
    s = torch.linalg.svdvals(dense) ** 2
    assert layer.effective_rank == int((torch.cumsum(s, 0) < 0.9 * s.sum()).sum()) + 1
    expect = math.sqrt(sum(x.delta_norm ** 2 for x in te) / sum(x.base_norm ** 2 for x in te))
    assert rep.blocks["BASE"].relative == pytest.approx(expect)
    assert rep.blocks["IN00"].n_modules == 0 and len(rep.keys_touched) == 264
    d = rep.to_dict()
    assert d["blocks"]["IN01"]["relative"] > 0 and json.dumps(d)


def test_lora_block_weight_lists() -> None:
    assert len(attention_blocks("sd1")) == 17 and len(attention_blocks("sdxl")) == 12
    short = parse_lora_blocks(",".join(["0"] * 16 + ["1"]), "sd1")
    assert short["OUT11"] == 1 and short["OUT10"] == 0 and short["IN03"] == 1
    assert parse_lora_blocks("outs", "sdxl")["OUT05"] == 1
    assert parse_lora_blocks("outs", "sdxl")["IN04"] == 0
    assert len(parse_lora_blocks([0.5] * 20, "sdxl")) == 20
    with pytest.raises(ModelkitError, match="expected 17"):
        parse_lora_blocks([1] * 5, "sd1")
