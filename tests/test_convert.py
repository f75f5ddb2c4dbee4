"""prune, ema, quantize, dequantize, swap, extract and ckpt conversion on
seeded tiny checkpoints: exact key sets, bit-exact tensors where the math
allows, measured error bounds where it does not."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_chain

from modelkit import testing as t
from modelkit.arch.configs import UNET_PREFIX, VAE_PREFIX
from modelkit.arch.keys import SCHEDULE_BUFFERS, checkpoint_keys
from modelkit.convert.quantize import INT8_SCHEME, QUANT_KEY, SCALE_SUFFIX
from modelkit.errors import ModelkitError
from modelkit.io.header import read_header
from modelkit.io.reader import open_model

CLIP = "cond_stage_model.transformer."
POS = CLIP + "text_model.embeddings.position_ids"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_model(path) as m:
        return {k: m.get(k).clone() for k in m.infos}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ema_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "ema.safetensors"
    t.write_checkpoint(path, "sd1", seed=21, ema=True, dtype="F32", markers=("v_pred",),
                       metadata={"ss_output_name": "mine", "modelspec.title": "Mine"})
    return path


@pytest.fixture(scope="module")
def novelai_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NovelAI-style CLIP names, fp32 position ids with one off value, junk keys."""
    keys = {}
    for k, s in checkpoint_keys(t.arch_spec("sd1")).items():
        keys[k.replace(CLIP + "text_model.", CLIP)] = s
    keys["embedding_manager.embedder.transformer.x"] = (4, 4)
    keys["some.unknown.key"] = (3,)
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 76] = 75.99998
    path = tmp_path_factory.mktemp("convert") / "nai.safetensors"
    t.write_tensors(path, keys, seed=22, overrides={CLIP + "embeddings.position_ids": ids})
    return path


# --- prune --------------------------------------------------------------------


def test_prune_lists_drops_keeps_markers_and_metadata(ema_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    (conv,), res = run_chain([ema_model], [("prune", {})], out)
    rep = conv.report
    src = read_header(ema_model)
    ema_keys = [k for k in src.tensors if k.startswith("model_ema.")]
    assert len(ema_keys) == 688  # 686 weights + decay + num_updates
    assert set(rep.dropped) == set(ema_keys) | set(SCHEDULE_BUFFERS)
    assert rep.dropped_by_reason() == {"EMA weights": 688, "schedule buffer": 12}
    assert rep.dropped_bytes == sum(src.tensors[k].nbytes for k in rep.dropped)
    assert rep.markers == ["v_pred"]
    got = read_header(out)
    assert set(got.tensors) == set(src.tensors) - set(rep.dropped)
    assert "v_pred" in got.tensors
    want = _tensors(ema_model)
    for k, v in _tensors(out).items():
        assert torch.equal(v, want[k]), k
    assert got.metadata["ss_output_name"] == "mine"
    assert got.metadata["modelspec.title"] == "Mine"
    (entry,) = json.loads(got.metadata["modelkit.history"])
    assert entry["op"] == "prune"
    # hashed on a thread while writing, then patched into the header
    assert entry["inputs"] == [{"file": ema_model.name, "sha256": _sha256(ema_model)}]
    assert res.bytes_written == out.stat().st_size


def test_prune_keep_ema_and_dtype(ema_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p16.safetensors"
    (conv,), _ = run_chain([ema_model], [("prune", {"keep_ema": True, "dtype": "fp16"})], out)
    got = read_header(out)
    assert conv.report.dropped_by_reason() == {"schedule buffer": 12}
    assert got.tensors["model_ema.num_updates"].dtype == "I32"  # never cast integers
    assert got.tensors[POS].dtype == "I64"
    assert got.tensors[UNET_PREFIX + "out.2.weight"].dtype == "F16"
    assert got.tensors["v_pred"].dtype == read_header(ema_model).tensors["v_pred"].dtype


def test_prune_repairs_novelai_names_and_position_ids(novelai_model: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "fixed.safetensors"
    (conv,), _ = run_chain([novelai_model], [("prune", {})], out)
    rep = conv.report
    assert rep.renamed[CLIP + "embeddings.position_ids"] == POS
    assert len(rep.renamed) == 197  # every CLIP key, position ids included
    assert rep.repaired == [POS]
    assert rep.dropped == {"embedding_manager.embedder.transformer.x": "training leftover",
                           "some.unknown.key": "unknown key",
                           **dict.fromkeys(SCHEDULE_BUFFERS, "schedule buffer")}
    tensors = _tensors(out)
    assert tensors[POS].dtype == torch.int64
    assert torch.equal(tensors[POS], torch.arange(77).reshape(1, 77))
    assert not any(k.startswith(CLIP + "encoder.") for k in tensors)
    src = _tensors(novelai_model)
    key = CLIP + "text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(tensors[key], src[CLIP + "encoder.layers.0.mlp.fc1.weight"])


def test_prune_keeps_a_standalone_unet_without_prefix(tmp_path: Path) -> None:
    """A ComfyUI-style UNet file (bare keys) is all UNet: prune keeps every
    tensor byte for byte (it once dropped all of them as unknown keys)."""
    unet, out = tmp_path / "u.safetensors", tmp_path / "p.safetensors"
    t.write_unet(unet, "sd1", seed=3)
    (conv,), _ = run_chain([unet], [("prune", {})], out)
    report = conv.report
    assert report.dropped == {} and report.n_kept == len(read_header(unet).tensors)
    got, want = _tensors(out), _tensors(unet)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_prune_refuses_a_lora(tmp_path: Path) -> None:
    from modelkit.testing.lora import write_lora

    lora = tmp_path / "l.safetensors"
    write_lora(lora, "sd1")
    with pytest.raises(ModelkitError, match=r"l\.safetensors: is a lora"):
        run_chain([lora], [("prune", {})], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# --- ema ----------------------------------------------------------------------


def test_ema_lands_bit_exact_on_unet_keys(ema_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.safetensors"
    (conv,), _ = run_chain([ema_model], [("ema", {})], out)
    src, got = _tensors(ema_model), _tensors(out)
    mapping = t.ema_keys_for("sd1")
    assert len(mapping) == 686
    for unet_key, ema_key in mapping.items():
        assert torch.equal(got[unet_key], src[ema_key]), unet_key
    assert not any(k.startswith("model_ema.") for k in got)
    for k in got:
        if not k.startswith(UNET_PREFIX):
            assert torch.equal(got[k], src[k]), k
    rep = conv.report
    assert rep.n_swapped == 686 and rep.n_ema_dropped == 688 and not rep.online_only
    assert len(rep.blocks) == 25  # IN00..IN11, M00, OUT00..OUT11 (no UNet key in BASE)
    # fixture EMA = online + 1 % noise of similar scale: about 0.01 everywhere
    for name, b in rep.blocks.items():
        assert 0.004 < b.relative_l2 < 0.02, name
    diff = sum((src[e].double() - src[u].double()).pow(2).sum() for u, e in mapping.items())
    ref = sum(src[u].double().pow(2).sum() for u in mapping)
    assert rep.overall_relative_l2 == pytest.approx(math.sqrt(diff / ref), rel=1e-6)


def test_ema_without_ema_is_a_clear_error(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelkitError, match=r"sd1\.safetensors: has no EMA weights"):
        run_chain([models["sd1"]], [("ema", {})], tmp_path / "o.safetensors")


def test_ema_map_is_built_forward_not_by_reinserting_dots() -> None:
    from modelkit.arch.keys import ema_key, unet_keys

    # input_blocks.1.1 and input_blocks.11 flatten alike only with equal suffixes;
    # the SD1 table has no such pair, so the forward map is one-to-one
    for arch in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        keys = unet_keys(t.arch_spec(arch, tiny=False).unet)
        assert len({ema_key(k) for k in keys}) == len(keys)


# --- quantize / dequantize ------------------------------------------------------


@pytest.mark.parametrize("target,dtype", [("fp8_e4m3fn", "F8_E4M3"), ("fp8_e5m2", "F8_E5M2")])
def test_fp8_files_hold_f8_and_keep_vae_and_ints(ema_model: Path, tmp_path: Path,
                                                 target: str, dtype: str) -> None:
    out = tmp_path / "q.safetensors"
    (conv,), _ = run_chain([ema_model], [("quantize", {"dtype": target})], out)
    h = read_header(out)
    unet = [i for k, i in h.tensors.items() if k.startswith(UNET_PREFIX)]
    assert {i.dtype for i in unet} == {dtype}
    assert {i.dtype for k, i in h.tensors.items() if k.startswith(VAE_PREFIX)} == {"F16"}
    assert h.tensors[POS].dtype == "I64"
    assert h.tensors["model_ema.num_updates"].dtype == "I32"
    assert conv.report.policy == {"unet": dtype, "te": "max16", "vae": "max16"}
    src = _tensors(ema_model)
    got = _tensors(out)
    key = UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(got[key], src[key].to(getattr(torch, {"F8_E4M3": "float8_e4m3fn",
                                                             "F8_E5M2": "float8_e5m2"}[dtype])))


def test_overflow_is_saturated_and_counted(tmp_path: Path) -> None:
    keys = checkpoint_keys(t.arch_spec("sd1"))
    big_key = UNET_PREFIX + "out.2.weight"
    w = t.synthetic_tensor(big_key, keys[big_key], 0)
    w.view(-1)[:3] = torch.tensor([1e5, -7e4, float("inf")])
    src = tmp_path / "big.safetensors"
    t.write_tensors(src, keys, dtype="F32", overrides={big_key: w})
    out = tmp_path / "q.safetensors"
    (conv,), _ = run_chain([src], [("quantize", {"dtype": "fp16"})], out)
    assert conv.report.overflow == {big_key: 3}
    got = _tensors(out)[big_key].float().view(-1)
    assert got[:3].tolist() == [65504.0, -65504.0, 65504.0]
    assert torch.isfinite(_tensors(out)[big_key]).all()
    e4 = tmp_path / "q8.safetensors"
    (conv8,), _ = run_chain([src], [("quantize", {"dtype": "fp8_e4m3fn"})], e4)
    assert conv8.report.overflow[big_key] >= 3
    assert not torch.isnan(_tensors(e4)[big_key].float()).any()  # e4m3fn has no inf


def test_int8_round_trip_within_documented_bound(ema_model: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.safetensors"
    (conv,), _ = run_chain([ema_model], [("quantize", {"dtype": "int8",
                                                       "components": "unet,te"})], q)
    h = read_header(q)
    scheme = json.loads(h.metadata[QUANT_KEY])
    assert scheme["scheme"] == INT8_SCHEME and scheme["version"] == 1
    int8 = [k for k, i in h.tensors.items() if i.dtype == "I8"]
    assert int8 and all(k + SCALE_SUFFIX in h.tensors for k in int8)
    assert any(k.startswith(CLIP) for k in int8)
    assert UNET_PREFIX + "out.2.bias" not in int8  # biases and norms stay float
    rep = conv.report
    assert rep.n_int8 == len(int8)
    assert rep.bytes_out < rep.bytes_in / 2
    dq = tmp_path / "dq.safetensors"
    (dconv,), _ = run_chain([q], [("dequantize", {"dtype": "fp32"})], dq)
    assert dconv.report.n_int8 == len(int8)
    src, back, qt = _tensors(ema_model), _tensors(dq), _tensors(q)
    assert set(back) == set(src)
    assert QUANT_KEY not in read_header(dq).metadata
    err_sq = ref_sq = 0.0
    for k in int8:
        w, r = src[k].reshape(src[k].shape[0], -1), back[k].reshape(src[k].shape[0], -1)
        half_step = qt[k + SCALE_SUFFIX][:, None] / 2
        # the documented bound, plus float32 rounding of q * s
        assert ((w - r).abs() <= half_step + 4e-7 * w.abs()).all(), k
        assert torch.allclose(qt[k + SCALE_SUFFIX], w.abs().amax(dim=1) / 127)
        err_sq += float((w - r).double().pow(2).sum())
        ref_sq += float(w.double().pow(2).sum())
    assert rep.relative_l2 == pytest.approx(math.sqrt(err_sq / ref_sq), rel=1e-4)
    assert rep.relative_l2 < 0.01 and rep.snr_db > 40
    for k in set(src) - set(int8):
        assert torch.equal(back[k], src[k]), k  # float tensors untouched (fp32 in and out)


def test_int8_default_policy_is_unet_only_and_vae_fp16(ema_model: Path,
                                                       tmp_path: Path) -> None:
    q = tmp_path / "q.safetensors"
    run_chain([ema_model], [("quantize", {"dtype": "int8"})], q)
    h = read_header(q)
    assert not any(k.startswith(CLIP) and i.dtype == "I8" for k, i in h.tensors.items())
    assert {i.dtype for k, i in h.tensors.items() if k.startswith(VAE_PREFIX)} == {"F16"}
    with pytest.raises(ModelkitError, match="already quantized"):
        run_chain([q], [("quantize", {"dtype": "int8"})], tmp_path / "qq.safetensors")


def test_dequantize_refuses_unknown_scheme(tmp_path: Path) -> None:
    src = tmp_path / "odd.safetensors"
    t.write_checkpoint(src, "sd1", metadata={QUANT_KEY: json.dumps({"scheme": "x",
                                                                      "version": 9})})
    with pytest.raises(ModelkitError, match="not one this modelkit reads"):
        run_chain([src], [("dequantize", {})], tmp_path / "o.safetensors")


# --- swap / extract -----------------------------------------------------------


def test_extract_vae_and_swap_it_back(models: dict[str, Path], ema_model: Path,
                                      tmp_path: Path) -> None:
    vae = tmp_path / "vae.safetensors"
    run_chain([ema_model], [("extract", {"component": "vae"})], vae)
    keys = set(read_header(vae).tensors)
    assert keys and all(k.startswith(("encoder.", "decoder.", "quant_conv",
                                      "post_quant_conv")) for k in keys)
    out = tmp_path / "swapped.safetensors"
    (conv,), _ = run_chain([models["sd1"], vae], [("swap", {"component": "vae"})], out)
    assert conv.report.n_tensors == 248
    got, donor, base = _tensors(out), _tensors(vae), _tensors(models["sd1"])
    for k, v in got.items():
        if k.startswith(VAE_PREFIX):
            assert v.dtype == torch.float16  # the target file's dtype
            assert torch.equal(v, donor[k[len(VAE_PREFIX):]].half()), k
        else:
            assert torch.equal(v, base[k]), k


def test_swap_refuses_a_vae_of_the_wrong_shape(models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.arch.keys import vae_keys

    keys = dict(vae_keys(t.arch_spec("sdxl").vae))
    keys["decoder.conv_in.weight"] = (keys["decoder.conv_in.weight"][0], 16, 3, 3)
    keys["post_quant_conv.weight"] = (16, 16, 1, 1)
    flux_like = tmp_path / "ae16.safetensors"
    t.write_tensors(flux_like, keys)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ModelkitError, match=r"ae16\.safetensors: .* wrong vae"):
        run_chain([models["sdxl"], flux_like], [("swap", {"component": "vae"})], out)
    assert list(tmp_path.iterdir()) == [flux_like]


def test_swap_refuses_a_lora_as_donor(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelkitError, match=r"emb_sd1\.safetensors: is an embedding"):
        run_chain([models["sd1"], models["emb_sd1"]], [("swap", {"component": "vae"})],
                  tmp_path / "o.safetensors")


def test_extract_unet_keeps_markers_and_te_layouts(models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    unet = tmp_path / "u.safetensors"
    run_chain([models["sdxl_vpred"]], [("extract", {"component": "unet"})], unet)
    keys = set(read_header(unet).tensors)
    assert {"v_pred", "ztsnr"} <= keys
    assert "input_blocks.0.0.weight" in keys
    te = tmp_path / "te.safetensors"
    (conv,), _ = run_chain([models["sdxl"]], [("extract", {"component": "te"})], te)
    assert conv.report.notes  # two encoders keep their prefixes
    te2 = tmp_path / "te2.safetensors"
    run_chain([models["sdxl"]], [("extract", {"component": "te2"})], te2)
    assert "positional_embedding" in read_header(te2).tensors
    with pytest.raises(ModelkitError, match="has no te2"):
        run_chain([models["sd1"]], [("extract", {"component": "te2"})], tmp_path / "x.st")


# --- ckpt conversion ------------------------------------------------------------


def test_ckpt_converts_to_safetensors_bit_exact(models: dict[str, Path],
                                                tmp_path: Path) -> None:
    from modelkit.io.pickle import save_pickle_state_dict

    src = _tensors(models["sd1"])
    ckpt = tmp_path / "m.ckpt"
    save_pickle_state_dict(src, ckpt)
    out = tmp_path / "m.safetensors"
    done, res = run_chain([ckpt], [], out)
    assert not done and res.format == "safetensors"
    got = _tensors(out)
    assert set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) and got[k].dtype == src[k].dtype for k in src)
    (entry,) = json.loads(read_header(out).metadata["modelkit.history"])
    assert entry["op"] == "convert" and entry["inputs"][0]["sha256"] == _sha256(ckpt)


def test_output_onto_input_is_refused(ema_model: Path) -> None:
    before = _sha256(ema_model)
    with pytest.raises(ModelkitError, match="output is also an input"):
        run_chain([ema_model], [("prune", {})], ema_model)
    assert _sha256(ema_model) == before


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_ema_for_sd2_and_sdxl(arch: str, tmp_path: Path) -> None:
    src_path = tmp_path / f"{arch}.safetensors"
    t.write_checkpoint(src_path, arch, ema=True, seed=23)
    out = tmp_path / "e.safetensors"
    (conv,), _ = run_chain([src_path], [("ema", {})], out)
    src, got = _tensors(src_path), _tensors(out)
    mapping = t.ema_keys_for(arch)
    assert conv.report.n_swapped == len(mapping) and not conv.report.online_only
    assert all(torch.equal(got[u], src[e]) for u, e in mapping.items())
    assert set(got) == {k for k in src if not k.startswith("model_ema.")}


def test_dtype_tables_are_declared_once() -> None:
    """Issue 18: quantize's targets and components are vocab's; LoRA storage
    types are vocab's float storage as safetensors dtypes; the pickle suffixes
    the reader opens are the ones the writer refuses."""
    from modelkit.convert.quantize import component_policy
    from modelkit.io.files import MODEL_SUFFIXES, PICKLE_SUFFIXES
    from modelkit.io.reader import is_pickle_path
    from modelkit.io.write import output_format
    from modelkit.lora.output import storage_dtype
    from modelkit.vocab import COMPONENTS, FLOAT_STORAGE_DTYPES, QUANT_TARGETS

    for target in QUANT_TARGETS:
        assert tuple(component_policy(target, None)) == COMPONENTS
    assert component_policy("fp8_e5m2", None) == {"unet": "F8_E5M2", "vae": "max16",
                                                   "te": "max16"}
    with pytest.raises(ModelkitError, match="choose one of " + ", ".join(QUANT_TARGETS)):
        component_policy("fp4", None)
    assert FLOAT_STORAGE_DTYPES == ("F16", "BF16", "F32")
    assert [storage_dtype(n) for n in ("fp16", "BF16", "float32")] == ["F16", "BF16", "F32"]
    with pytest.raises(ModelkitError, match="stored as fp16, bf16 or fp32"):
        storage_dtype("fp8")
    assert set(PICKLE_SUFFIXES) < set(MODEL_SUFFIXES)
    for suffix in PICKLE_SUFFIXES:
        assert is_pickle_path(f"m{suffix.upper()}")
        with pytest.raises(ModelkitError, match=r"writes \.safetensors"):
            output_format(f"out{suffix}")
