"""export-gguf for every family and llama.cpp file type: the type of every
tensor under the family's policy (keep-lists, the _S/_M mixes, the F16
fallback, flattened SD kernels, Wan's 5-D kernel), files gguf-py reads back
to the same values as modelkit's own dequantizers, bytes equal to
``quantize_blocks`` of the input, the error report, and the command's
one-line refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.arch import flux, qwen_image, sd3, wan
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.keys import KeyShapes
from tests.cli_support import run_all

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

# the fixtures: real key names, 256-wide rows where k-quants apply (SD3 192:
# the k-quant fallback, as SD3.5-large's 2432)
FLUX_CFG = replace(flux.VARIANTS["dev"], hidden_size=256, num_heads=2, depth=1,
                   depth_single_blocks=1, vec_in_dim=32, context_in_dim=64)
SD3_CFG = sd3.SD3Config(depth=3, pos_embed_max=16, adm_in=256, context_in=256)
QWEN_CFG = replace(qwen_image.small(qwen_image.VARIANTS["qwen-image"]), num_layers=1,
                   joint_attention_dim=256)
WAN_CFG = replace(wan.VARIANTS["t2v-1.3b"], dim=256, ffn_dim=256, num_layers=3, text_dim=256)
KEYS: dict[str, KeyShapes] = {
    "flux": flux.transformer_keys(FLUX_CFG), "sd3": sd3.transformer_keys(SD3_CFG),
    "qwen_image": qwen_image.transformer_keys(QWEN_CFG),
    "wan": wan.transformer_keys(WAN_CFG)}
DTYPES = {"flux": "BF16", "sd3": "F16", "qwen_image": "BF16", "wan": "BF16", "sd1": "F16"}


def plans(family: str, qtype: str, keys: KeyShapes | None = None) -> dict[str, Any]:
    from modelkit.convert.gguf import POLICIES, plan_tensors
    from modelkit.io.source import tensor_info

    keys = KEYS[family] if keys is None else keys
    infos = {k: tensor_info(k, DTYPES[family], s) for k, s in keys.items()}
    return {p.key: p for p in plan_tensors(infos, POLICIES[family], qtype)}


def types(family: str, qtype: str) -> dict[str, str]:
    return {k: p.ggml_type for k, p in plans(family, qtype).items()}


def check_rest(family: str, qtype: str, listed: dict[str, str], default: str) -> None:
    """The listed tensors have their types; every other one is float when
    1-D or small (F16 stays F16, BF16 becomes F32) and ``default`` else."""
    got = plans(family, qtype)
    small = "F16" if DTYPES[family] == "F16" else "F32"
    for key, p in got.items():
        shape = KEYS[family][key] if family in KEYS else None
        if key in listed:
            assert p.ggml_type == listed[key], (qtype, key, p)
        elif shape is not None and (len(shape) < 2 or math.prod(shape) <= 1024):
            assert p.ggml_type == small, (qtype, key, p)
        else:
            assert p.ggml_type == default, (qtype, key, p)


def test_flux_policy() -> None:
    """lcpp.patch: embedders and final layer never quantized (BF16 kept as
    BF16); fused qkv raised under Q4_K_M/Q5_K_M/Q3_K_M, nothing else."""
    kept = {k: "BF16" for k, s in KEYS["flux"].items() if len(s) == 2 and k.startswith(
        ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."))}
    assert len(kept) == 10
    qkv = [k for k in KEYS["flux"] if k.endswith("attn.qkv.weight")]
    assert len(qkv) == 2
    for qtype, default, raised in (("q4_k_m", "Q4_K", "Q5_K"), ("q5_k_m", "Q5_K", "Q6_K"),
                                   ("q3_k_m", "Q3_K", "Q4_K"), ("q4_k_s", "Q4_K", "Q4_K"),
                                   ("q8_0", "Q8_0", "Q8_0"), ("q2_k", "Q2_K", "Q2_K")):
        check_rest("flux", qtype, {**kept, **dict.fromkeys(qkv, raised)}, default)


def test_sd3_policy_falls_back_to_f16() -> None:
    """192-wide rows cannot hold 256-weight k-quant blocks: F16 (the patch's
    fallback), 768-wide ones quantize; pos_embed, the embedders and the
    final layer stay F16; legacy 32-blocks fit everywhere."""
    keys = KEYS["sd3"]
    kept = {k: "F16" for k, s in keys.items() if len(s) >= 2 and math.prod(s) > 1024 and (
        k == "pos_embed" or k.startswith(("x_embedder.", "t_embedder.", "y_embedder.",
                                          "context_embedder.", "final_layer.")))}
    assert "pos_embed" in kept and "x_embedder.proj.weight" in kept
    narrow = {k: "F16" for k, s in keys.items() if k not in kept and len(s) == 2
              and s[1] == 192 and math.prod(s) > 1024}
    p = plans("sd3", "q4_k_m")
    assert {p[k].why for k in narrow} == {"fallback"}
    assert p["joint_blocks.0.x_block.mlp.fc2.weight"].shape == (192, 768)
    check_rest("sd3", "q4_k_m", {**kept, **narrow}, "Q4_K")
    check_rest("sd3", "q4_0", kept, "Q4_0")


def test_qwen_image_policy() -> None:
    """auto_convert's lcpp.patch: img_in, txt_in, time_text_embed, norm_out,
    proj_out kept; to_v (not add_v_proj) raised by the attention-v rule."""
    keys = KEYS["qwen_image"]
    kept = {k: "BF16" for k, s in keys.items() if len(s) == 2 and math.prod(s) > 1024
            and k.startswith(("img_in.", "txt_in.", "time_text_embed.", "norm_out.",
                              "proj_out."))}
    assert len(kept) == 6
    v = "transformer_blocks.0.attn.to_v.weight"
    check_rest("qwen_image", "q4_k_m", {**kept, v: "Q6_K"}, "Q4_K")
    check_rest("qwen_image", "q2_k", {**kept, v: "Q3_K"}, "Q2_K")
    check_rest("qwen_image", "q6_k", kept, "Q6_K")


def test_wan_policy_mix_counts_and_5d() -> None:
    """Wan: the embedders and head kept, modulation F32 (keys_hiprec),
    v projections and ffn.2 raised, Q4_K_S/Q3_K_M's first-n counters in
    sorted name order, the 5-D patch embedding F32 as 2-D with its shape."""
    keys = KEYS["wan"]
    kept = {k: "BF16" for k, s in keys.items() if len(s) == 2 and math.prod(s) > 1024
            and k.startswith(("text_embedding.", "time_embedding.", "time_projection.",
                              "head."))}
    hiprec = {k: "F32" for k in keys if k.endswith("modulation")}
    assert len(hiprec) == 4 and keys["blocks.0.modulation"] == (1, 6, 256)
    five = {"patch_embedding.weight": "F32"}
    v = sorted(k for k in keys if k.endswith((".v.weight",)))
    ffn2 = [k for k in keys if k.endswith("ffn.2.weight")]
    assert len(v) == 6 and len(ffn2) == 3
    fixed = {**kept, **hiprec, **five}
    check_rest("wan", "q4_k_m", {**fixed, **dict.fromkeys(v + ffn2, "Q6_K")}, "Q4_K")
    check_rest("wan", "q4_k_s", {**fixed, **dict.fromkeys(v[:4], "Q5_K"),
                                 **dict.fromkeys(v[4:], "Q4_K"),
                                 **dict.fromkeys(ffn2, "Q5_K")}, "Q4_K")
    check_rest("wan", "q3_k_m", {**fixed, **dict.fromkeys(v[:2], "Q5_K"),
                                 **dict.fromkeys(v[2:] + ffn2, "Q4_K")}, "Q3_K")
    check_rest("wan", "q5_0", {**fixed, **dict.fromkeys(ffn2, "Q5_1")}, "Q5_0")
    check_rest("wan", "q3_k_s", fixed, "Q3_K")
    p = plans("wan", "q4_k_m")["patch_embedding.weight"]
    assert (p.shape, p.orig_shape, p.why) == ((256, 64), (256, 16, 1, 2, 2), "5-d")


def test_sd1_policy_flattens_and_mixes() -> None:
    """SD1 (shape_fix): 64-wide attention v and feed-forward down layers go
    to rows of 256 with orig_shape under Q4_K_M and are raised to Q6_K."""
    from modelkit import testing as t
    from modelkit.arch.keys import unet_keys

    keys = unet_keys(t.arch_spec("sd1").unet)
    p = plans("sd1", "q4_k_m", keys)
    v = p["input_blocks.7.1.transformer_blocks.0.attn1.to_v.weight"]
    assert (v.ggml_type, v.shape, v.orig_shape) == ("Q6_K", (16, 256), (64, 64))
    ff = p["input_blocks.7.1.transformer_blocks.0.ff.net.2.weight"]
    assert (ff.ggml_type, ff.shape, ff.orig_shape) == ("Q6_K", (64, 256), None)
    q = p["input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight"]
    assert (q.ggml_type, q.shape) == ("Q4_K", (16, 256))
    assert p["input_blocks.0.0.weight"].ggml_type == "F32"
    assert p["time_embed.0.weight"].ggml_type == "F16"
    conv = p["input_blocks.1.0.in_layers.2.weight"]
    assert conv.ggml_type == "Q4_K" and conv.orig_shape == keys[conv.key]
    assert len(conv.orig_shape) == 4 and conv.shape[1] == 256
    n_v = [k for k in sorted(p) if ".to_v." in k and p[k].quantized]  # counted ones
    s = plans("sd1", "q4_k_s", keys)
    assert [s[k].ggml_type for k in n_v][:5] == ["Q5_K"] * 4 + ["Q4_K"]


# --- written files: gguf-py reads them back to modelkit's own values ------------

SUBSETS = {  # few quantized tensors each, so that encoding stays fast
    "flux": ("img_in.weight", "img_in.bias", "final_layer.linear.weight",
             "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight",
             "double_blocks.0.img_attn.norm.key_norm.scale"),
    "sd3": ("pos_embed", "x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight",
            "joint_blocks.0.x_block.mlp.fc2.weight", "joint_blocks.0.x_block.mlp.fc2.bias"),
    "qwen_image": ("img_in.weight", "transformer_blocks.0.attn.to_v.weight",
                   "transformer_blocks.0.attn.to_q.weight", "txt_norm.weight"),
    "wan": ("patch_embedding.weight", "patch_embedding.bias", "blocks.0.modulation",
            "blocks.0.self_attn.v.weight", "blocks.0.self_attn.q.weight",
            "blocks.0.ffn.2.weight", "head.head.weight"),
}
WRITES = [("flux", "q4_k_m"), ("flux", "q5_k_m"), ("sd3", "q3_k_m"), ("qwen_image", "q2_k"),
          ("wan", "q4_k_m"), ("wan", "q4_0"), ("wan", "q5_0"), ("wan", "q8_0"),
          ("qwen_image", "q4_1"), ("wan", "bf16")]


def subset_source(family: str) -> Any:
    """The family's subset as an in-memory source of seeded values in its dtype."""
    from modelkit.io.source import DerivedSource, tensor_info

    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[DTYPES[family]]
    gen = torch.Generator().manual_seed(len(family))
    tensors = {k: (torch.randn(KEYS[family][k], generator=gen) * 0.05).to(dtype)
               for k in SUBSETS[family]}
    infos = {k: tensor_info(k, DTYPES[family], v.shape) for k, v in tensors.items()}
    return DerivedSource(family, infos, {}, tensors.__getitem__)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    from modelkit.convert.gguf import POLICIES, plan_tensors
    from modelkit.io.gguf import planned_payload
    from modelkit.io.write import OutputSpec, write

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf_export")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        # 64 k-quant blocks a chunk: most tensors span chunks that the two
        # encoder threads take at once (the kernels' buffers are per thread)
        mp.setattr("modelkit.io.gguf.CHUNK", 16384)
        for family, qtype in WRITES:
            source = subset_source(family)
            payload = planned_payload(source, plan_tensors(source.infos, POLICIES[family],
                                                           qtype),
                                      qtype=qtype, arch=POLICIES[family].arch)
            path = root / f"{family}-{qtype}.gguf"
            write(payload, OutputSpec(path, "gguf", True))
            out[family, qtype] = (path, source, payload)
    return out


def loader_shape(reader: Any, t: Any) -> tuple[int, ...]:
    """ComfyUI-GGUF loader.py's shape: the INT32 orig_shape record or the
    GGUF shape reversed."""
    f = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
    if f is None:
        return tuple(int(d) for d in reversed(t.shape))
    assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    return tuple(int(f.parts[i][0]) for i in f.data)


@pytest.mark.parametrize(("family", "qtype"), WRITES, ids=[f"{f}-{q}" for f, q in WRITES])
def test_written_file_reads_back(written: dict, family: str, qtype: str) -> None:
    from modelkit.io.ggml import dequantize_blocks, quantize_blocks
    from modelkit.numeric import relative_l2

    path, source, payload = written[family, qtype]
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == payload.arch
    ft = reader.get_field("general.file_type")
    assert gguf.LlamaFileType(int(ft.parts[ft.data[-1]][0])).name == f"MOSTLY_{qtype.upper()}"
    planned = {p.key: p for p in payload.plans}
    quality = {q.key: q for q in payload.quality.tensors}
    assert [t.name for t in reader.tensors] == list(source.infos)
    for t in reader.tensors:
        x = source.get(t.name)
        plan = planned[t.name]
        assert t.tensor_type.name == plan.ggml_type
        assert loader_shape(reader, t) == tuple(x.shape)
        xf = x.float().reshape(-1)
        if plan.quantized:
            raw = np.asarray(t.data)
            assert raw.tobytes() == quantize_blocks(xf, plan.ggml_type).numpy().tobytes()
            mine = dequantize_blocks(torch.from_numpy(raw.reshape(-1, raw.shape[-1]).copy()),
                                     plan.ggml_type).numpy()
            theirs = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1)
            np.testing.assert_array_equal(mine, theirs, err_msg=t.name)
        else:
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
            cast = xf.numpy().astype(np.float16) if plan.ggml_type == "F16" else xf.numpy()
            np.testing.assert_array_equal(theirs, cast.astype(np.float32), err_msg=t.name)
        err = float(((theirs.astype(np.float64) - xf.double().numpy()) ** 2).sum())
        ref = float((xf.double().numpy() ** 2).sum())
        if t.name in quality:
            assert quality[t.name].relative_l2 == pytest.approx(relative_l2(err, ref), rel=1e-5)
        else:
            assert err == 0, t.name
    assert {q.key for q in payload.quality.tensors} == {
        k for k, p in planned.items() if p.quantized or p.ggml_type == "F16" != DTYPES[family]
        or p.ggml_type == "BF16" != DTYPES[family]}


def test_written_types_cover_every_kernel(written: dict) -> None:
    """The writes above store every quantized GGML type, a fallback and the
    5-D kernel; the 5-D kernel reads back exactly in its own shape."""
    stored = {p.ggml_type for _, _, payload in written.values() for p in payload.plans}
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "Q8_0"} <= stored
    whys = {p.why for _, _, payload in written.values() for p in payload.plans}
    assert {"fallback", "mix", "5-d", "kept"} <= whys
    path, source, _ = written["wan", "q4_k_m"]
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
    assert t.tensor_type.name == "F32" and len(t.shape) == 2
    back = np.asarray(t.data).reshape(loader_shape(reader, t))
    np.testing.assert_array_equal(back, source.get(t.name).float().numpy())


# --- the command ---------------------------------------------------------------------


def test_prefixed_flux_exports_the_transformer_with_its_error_report(tmp_path: Path
                                                                     ) -> None:
    """A prefixed all-in-one Flux file through the runner: the transformer
    alone, unprefixed, with the per-tensor error in the --json report; the
    diffusers layout is refused in one line before anything is written."""
    from safetensors.torch import load_file

    from modelkit import testing as t
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run
    from modelkit.errors import ModelkitError

    aio = tmp_path / "flux-aio.safetensors"
    keys = {**{UNET_PREFIX + k: s for k, s in flux.transformer_keys(
        replace(FLUX_CFG, hidden_size=128, num_heads=1)).items()},
        "vae.decoder.conv_in.weight": (4, 4, 3, 3)}
    t.write_tensors(aio, keys, dtype="BF16", seed=5)
    out = tmp_path / "ok.gguf"
    recipe = Recipe.op("convert", aio, output=out).with_output(format="gguf", quant="q4_0")
    details = json.loads(json.dumps(run(recipe).to_dict()))["output_details"]
    assert details["general.architecture"] == "flux"
    reader = gguf.GGUFReader(str(out))
    names = [t.name for t in reader.tensors]
    assert "img_in.weight" in names and not [n for n in names if n.startswith(("model.",
                                                                                "vae."))]
    quantized = [t for t in reader.tensors if t.tensor_type.name == "Q4_0"]
    measured = {q["key"]: q for q in details["quality"]["tensors"]}
    assert quantized and {t.name for t in quantized} == set(measured)
    t0 = quantized[0]
    deq = gguf.quants.dequantize(np.asarray(t0.data), t0.tensor_type).reshape(-1)
    ref = load_file(str(aio))[UNET_PREFIX + t0.name].float().reshape(-1).double().numpy()
    rel = float(np.linalg.norm(deq - ref) / np.linalg.norm(ref))
    assert measured[t0.name]["relative_l2"] == pytest.approx(rel, rel=1e-5)
    assert 15 < details["quality"]["snr_db"] < 30  # 4-bit: about 21 dB on Gaussian data
    diffusers = t.write_sparse_flux(tmp_path / "flux-diffusers.safetensors",
                                    layout="diffusers", tiny=True)
    recipe = Recipe.op("convert", diffusers, output=tmp_path / "d.gguf").with_output(
        format="gguf", quant="q4_k_m")
    with pytest.raises(ModelkitError, match="diffusers layout") as err:
        run(recipe)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["ok.gguf"]


def test_command_refuses_a_bad_type_and_a_vae(tmp_path: Path) -> None:
    """Through the console script: exit 2, one line naming what to change,
    no output file (a NaN weight: ggml's blocks cannot store it; the VAE is
    a GGUF file: refused from its header, before torch is imported)."""
    from safetensors.numpy import load_file

    from modelkit import testing as t

    t.write_vae(tmp_path / "vae.safetensors")
    writer = gguf.GGUFWriter(str(tmp_path / "vae.gguf"), "")
    for key, value in load_file(str(tmp_path / "vae.safetensors")).items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    t.write_flux(tmp_path / "flux.safetensors", hidden=256, depth=1, single=1)
    weights = load_torch(str(tmp_path / "flux.safetensors"))
    weights["single_blocks.0.linear2.weight"][3, 5] = float("nan")
    save_file(weights, str(tmp_path / "nan.safetensors"))
    runs = run_all({
        "type": ["export-gguf", "vae.gguf", "-o", "t.gguf", "--type", "q4_k"],
        "vae": ["export-gguf", "vae.gguf", "-o", "v.gguf", "--type", "q4_k_m"],
        "nan": ["export-gguf", "nan.safetensors", "-o", "n.gguf", "--type", "q4_k_m", "-q"],
    }, tmp_path)
    for name, words in (("type", "'q4_k' is not one of 'q8_0', 'q6_k', 'q5_k_m'"),
                        ("vae", "vae.gguf): is a VAE with no UNet or transformer; "
                                "give a full checkpoint or a denoiser-only file"),
                        ("nan", "tensor 'single_blocks.0.linear2.weight' holds NaN or inf; "
                                "GGML Q4_K blocks cannot store it")):
        rc, out, err = runs[name]
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert words in err, (name, err)
    assert [p.name for p in tmp_path.glob("*.gguf")] == ["vae.gguf"]


# --- lora bake into a GGUF input -------------------------------------------------------


def test_lora_bake_into_a_q4_k_m_gguf_requantizes_in_one_pass(tmp_path: Path) -> None:
    """``lora bake flux-Q4_K_M.gguf style.safetensors -o out.gguf --type
    q4_k_m``: every output tensor is the bake of the dequantized input (the
    same bake written to safetensors) quantized again, byte for byte."""
    from safetensors.torch import load_file

    from modelkit import testing as t
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run
    from modelkit.io.ggml import dequantize_blocks, quantize_blocks
    from modelkit.testing.lora import write_flux_lora

    keep = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
            "double_blocks.0.img_mod.", "double_blocks.0.img_attn.")
    keys = {k: s for k, s in KEYS["flux"].items() if k.startswith(keep)}
    base, lora = tmp_path / "flux.safetensors", tmp_path / "style.safetensors"
    t.write_tensors(base, keys, dtype="BF16", seed=8)
    write_flux_lora(lora, "kohya", depth=1, single=1, rank=4, seed=9,
                    modules=("lora_unet_double_blocks_0_img_attn_qkv",))

    def go(op: str, *inputs: Path, out: str, **fields: Any) -> Path:
        path = tmp_path / out
        run(Recipe.op(op, *inputs, output=path).with_output(**fields))
        return path

    q4 = go("convert", base, out="flux-Q4_K_M.gguf", format="gguf", quant="q4_k_m")
    baked = go("lora_bake", q4, lora, out="out.gguf", quant="q4_k_m")
    plain = go("convert", q4, out="deq.safetensors")
    ref = load_file(str(go("lora_bake", plain, lora, out="ref.safetensors")))
    deq = load_file(str(plain))
    qkv = "double_blocks.0.img_attn.qkv.weight"
    la = load_file(str(lora))
    m = "lora_unet_double_blocks_0_img_attn_qkv"
    delta = la[f"{m}.lora_up.weight"] @ la[f"{m}.lora_down.weight"] * (la[f"{m}.alpha"] / 4)
    torch.testing.assert_close(ref[qkv] - deq[qkv], delta, rtol=0, atol=1e-6)
    reader = gguf.GGUFReader(str(baked))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types[qkv] == "Q5_K" and types["double_blocks.0.img_mod.lin.weight"] == "Q4_K"
    changed = 0
    for tensor in reader.tensors:
        x = ref[tensor.name].float().reshape(-1)
        raw = np.asarray(tensor.data)
        if tensor.tensor_type.name in ("F32", "F16", "BF16"):
            back = gguf.quants.dequantize(raw, tensor.tensor_type).reshape(-1)
            np.testing.assert_array_equal(back, x.numpy(), err_msg=tensor.name)
            continue
        want = quantize_blocks(x, tensor.tensor_type.name)
        assert raw.tobytes() == want.numpy().tobytes(), tensor.name
        np.testing.assert_array_equal(
            gguf.quants.dequantize(raw, tensor.tensor_type).reshape(-1),
            dequantize_blocks(want, tensor.tensor_type.name).numpy())
        changed += not torch.equal(ref[tensor.name], deq[tensor.name])
    assert changed == 1
