"""Quantized inputs (issue 20): GGUF of every type, ComfyUI's scaled fp8 and
int8 (current and legacy spellings) and bitsandbytes NF4 read as the float
model they stand for, bit for bit; merges and LoRA bakes on them equal the
same work on the dequantized safetensors; ``inspect`` reports the storage
per layer; inconsistent quantized files are refused in one line.

Fixtures are written by hand from the documented layouts: GGML blocks from
ggml's ``src/ggml-common.h`` structs (random codes, finite fp16 scales) read
back against gguf-py's ``gguf.quants.dequantize``; ComfyUI's tensors and
records as ``comfy/utils.py convert_old_quants`` and ``comfy/ops.py`` name
them; bitsandbytes' as ``QuantState.as_dict(packed=True)`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_support import run_all, run_entry
from safetensors.torch import save_file

from modelkit.io.formats import FORMATS, OUTPUT_FORMATS, by_suffix, input_format
from modelkit.io.open import open_source
from modelkit.io.quantized import layer_quantization
from modelkit.vocab import OUTPUT_FORMATS as VOCAB_OUTPUT_FORMATS

# where each block type keeps its fp16 scales (ggml src/ggml-common.h block_<type>)
FP16_FIELDS = {"Q8_0": (0,), "Q5_1": (0, 2), "Q5_0": (0,), "Q4_1": (0, 2), "Q4_0": (0,),
               "Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,),
               "Q2_K": (80, 82)}
# bitsandbytes functional.py get_4bit_type("nf4"): the 16 NF4 code values
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _blocks(ggml_type: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGML blocks whose fp16 scales are finite and small."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][1]
    out = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in FP16_FIELDS[ggml_type]:
        d = rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16)
        out[:, at:at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return out


def _write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray, tuple[int, ...]]],
                orig: dict[str, tuple[int, ...]] | None = None) -> None:
    """A GGUF file of ``name -> (ggml type, data, stored shape)``."""
    import gguf

    w = gguf.GGUFWriter(path, "flux")
    for name, shape in (orig or {}).items():
        w.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for name, (kind, data, shape) in tensors.items():
        # block data goes in as bytes per row (gguf-py derives the shape)
        arr = data.reshape(shape[0], -1) if data.dtype == np.uint8 else data.reshape(shape)
        w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_values(kind: str, data: np.ndarray) -> torch.Tensor:
    """gguf-py's dequantization (the independent reference), flat float32."""
    import gguf

    arr = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    src = open_source(path)
    try:
        return {k: src.get(k).clone() for k in src.infos}
    finally:
        close = getattr(src, "close", None)
        if close:
            close()


# --- the format table ----------------------------------------------------------------


def test_format_table_declares_each_format_once(tmp_path: Path) -> None:
    suffixes = [s for f in FORMATS.values() for s in f.suffixes]
    assert len(suffixes) == len(set(suffixes))
    assert set(OUTPUT_FORMATS) == {n for n, f in FORMATS.items() if f.writer}
    assert OUTPUT_FORMATS == VOCAB_OUTPUT_FORMATS
    assert by_suffix("a.SFT") is FORMATS["safetensors"] and by_suffix("a.pth").name == "pickle"
    # a GGUF file is one whatever its name; a folder is a diffusers model
    odd = tmp_path / "named.safetensors"
    odd.write_bytes(b"GGUF" + bytes(12))
    assert input_format(odd).name == "gguf" and input_format(tmp_path).name == "diffusers"


# --- GGUF -------------------------------------------------------------------------------


def test_gguf_every_type_reads_as_gguf_py_dequantizes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelkit.io.gguf.CHUNK", 512)  # several chunks per tensor
    rng = np.random.default_rng(20)
    tensors: dict[str, tuple[str, np.ndarray, tuple[int, ...]]] = {}
    for kind in FP16_FIELDS:
        tensors[f"blocks.{kind.lower()}.weight"] = (kind, _blocks(kind, 4, rng), (4, 256))
    tensors["flat.weight"] = ("Q4_K", _blocks("Q4_K", 3, rng), (3, 256))  # orig (12, 64)
    floats = rng.standard_normal((3, 32)).astype(np.float32)
    tensors["f32.bias"] = ("F32", floats, (3, 32))
    tensors["f16.bias"] = ("F16", floats.astype(np.float16), (3, 32))
    bf16 = (floats.view(np.uint32) >> 16).astype(np.uint16)
    tensors["bf16.bias"] = ("BF16", bf16.view(np.int16), (3, 32))
    path = tmp_path / "all.gguf"
    _write_gguf(path, tensors, {"flat.weight": (12, 64)})

    got = _read_all(path)
    assert list(got) == list(tensors)
    for name, (kind, data, _) in tensors.items():
        t = got[name]
        if kind in FP16_FIELDS:
            want = _gguf_values(kind, data)
            if kind == "Q8_0":  # modelkit presents Q8_0 as F16, as it always has
                want = want.to(torch.float16)
            else:
                assert t.dtype == torch.float32, name
            assert torch.equal(t.reshape(-1), want), name
        elif kind == "BF16":
            assert t.dtype == torch.bfloat16
            assert torch.equal(t.float(), torch.from_numpy(floats).view(torch.int32)
                               .bitwise_and(-65536).view(torch.float32))
        else:
            assert torch.equal(t.float(), torch.from_numpy(floats.astype(
                np.float16 if kind == "F16" else np.float32).astype(np.float32)))
    assert got["flat.weight"].shape == (12, 64)
    assert got["blocks.q6_k.weight"].shape == (4, 256)
    assert layer_quantization(path)["blocks.q3_k.weight"] == "Q3_K"


# --- ComfyUI ----------------------------------------------------------------------------


def _comfy_tensors(rng: torch.Generator) -> tuple[dict[str, torch.Tensor],
                                                   dict[str, torch.Tensor], dict]:
    """Stored tensors, the expected float32 model, and the layer records."""
    fp8 = (torch.randn(8, 32, generator=rng) * 100).to(torch.float8_e4m3fn)
    s_fp8 = torch.tensor(0.0123, dtype=torch.float32)
    i8 = torch.randint(-127, 128, (256, 160), generator=rng, dtype=torch.int8)
    s_blk = torch.rand(2, 2, generator=rng) / 100  # (ceil(256/128), ceil(160/128))
    i8t = torch.randint(-127, 128, (16, 8), generator=rng, dtype=torch.int8)
    s_t = torch.tensor([0.5], dtype=torch.float32)
    norm = torch.randn(32, generator=rng).to(torch.bfloat16)
    stored = {"blocks.0.attn.qkv.weight": fp8, "blocks.0.attn.qkv.weight_scale": s_fp8,
              "blocks.0.attn.qkv.input_scale": torch.tensor(1.0),
              "blocks.0.attn.qkv.bias": norm,
              "blocks.0.mlp.0.weight": i8, "blocks.0.mlp.0.weight_scale": s_blk,
              "blocks.0.mlp.2.weight": i8t, "blocks.0.mlp.2.weight_scale": s_t,
              "final_layer.norm.weight": norm.clone()}
    # ComfyUI's dequantization, written out: fp8/int8 to float32 times the scale
    # (per 128 x 128 tile for int8_blockwise)
    tiles = s_blk.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :160]
    want = {"blocks.0.attn.qkv.weight": fp8.float() * s_fp8,
            "blocks.0.attn.qkv.bias": norm,
            "blocks.0.mlp.0.weight": i8.float() * tiles,
            "blocks.0.mlp.2.weight": i8t.float() * 0.5,
            "final_layer.norm.weight": norm}
    layers = {"blocks.0.attn.qkv": {"format": "float8_e4m3fn"},
              "blocks.0.mlp.0": {"format": "int8_blockwise", "group_size": 128},
              "blocks.0.mlp.2": {"format": "int8_tensorwise"}}
    return stored, want, layers


def _json_tensor(value: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def _check_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].shape == t.shape and torch.equal(got[k], t), k


def test_comfy_current_format_both_spellings_and_legacy_scaled_fp8(tmp_path: Path) -> None:
    stored, want, layers = _comfy_tensors(torch.Generator().manual_seed(1))
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                  "layers": layers})}
    save_file(stored, str(tmp_path / "meta.safetensors"), metadata=meta)
    got = _read_all(tmp_path / "meta.safetensors")
    _check_same(dict(sorted(got.items())), dict(sorted(want.items())))
    assert got["blocks.0.attn.qkv.weight"].dtype == torch.float32
    src = open_source(tmp_path / "meta.safetensors")
    assert "_quantization_metadata" not in src.metadata  # the tensors are float now

    per_layer = {**stored, **{f"{k}.comfy_quant": _json_tensor(v) for k, v in layers.items()}}
    save_file(per_layer, str(tmp_path / "tensors.safetensors"))
    _check_same(dict(sorted(_read_all(tmp_path / "tensors.safetensors").items())),
                dict(sorted(want.items())))
    assert layer_quantization(tmp_path / "tensors.safetensors") == {
        "blocks.0.attn.qkv.bias": "BF16", "blocks.0.attn.qkv.weight": "float8_e4m3fn",
        "blocks.0.mlp.0.weight": "int8_blockwise", "blocks.0.mlp.2.weight": "int8_tensorwise",
        "final_layer.norm.weight": "BF16"}

    # the legacy spelling: a scaled_fp8 marker under the model prefix, .scale_weight
    p = "model.diffusion_model."
    legacy = {p + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
              p + "x.weight": stored["blocks.0.attn.qkv.weight"].clone(),
              p + "x.scale_weight": stored["blocks.0.attn.qkv.weight_scale"].clone(),
              p + "x.scale_input": torch.tensor(1.0),
              p + "x.bias": stored["final_layer.norm.weight"].clone(),
              p + "y.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}  # unscaled fp8 stays
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    got = _read_all(tmp_path / "legacy.safetensors")
    assert sorted(got) == [p + "x.bias", p + "x.weight", p + "y.weight"]
    assert torch.equal(got[p + "x.weight"], want["blocks.0.attn.qkv.weight"])
    assert got[p + "y.weight"].dtype == torch.float8_e4m3fn
    assert layer_quantization(tmp_path / "legacy.safetensors")[p + "x.weight"] == \
        "float8_e4m3fn scaled"


def test_modelkit_int8_is_reported_and_left_to_dequantize(tmp_path: Path) -> None:
    """modelkit's own int8 (``modelkit.int8.per_channel``) stays as stored on
    open (the ``dequantize`` operation restores it); its storage is reported."""
    meta = {"modelkit.quantization": json.dumps({"scheme": "modelkit.int8.per_channel",
                                                 "version": 1, "scale_suffix": "_scale"})}
    q = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    save_file({"a.weight": q, "a.weight_scale": torch.rand(64), "a.bias": torch.zeros(64)},
              str(tmp_path / "i8.safetensors"), metadata=meta)
    assert layer_quantization(tmp_path / "i8.safetensors") == {
        "a.weight": "int8 per_channel", "a.bias": "F32"}
    got = _read_all(tmp_path / "i8.safetensors")
    assert got["a.weight"].dtype == torch.int8 and torch.equal(got["a.weight"], q)


# --- bitsandbytes -----------------------------------------------------------------------


def _nf4_reference(packed: np.ndarray, absmax: np.ndarray, block: int, n: int) -> np.ndarray:
    """bitsandbytes' dequantize_4bit element by element: high nibble first."""
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
    qmap = np.asarray(NF4, dtype=np.float32)
    return np.array([qmap[c] * absmax[i // block] for i, c in enumerate(codes)],
                    dtype=np.float32)


def test_bitsandbytes_nf4_plain_and_double_quantized(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelkit.io.quantized.CHUNK", 128)  # two blocks per step
    rng = np.random.default_rng(4)
    shape, block, n = (6, 40), 64, 240  # 240 = 3 full blocks and a partial one
    packed = rng.integers(0, 256, n // 2, dtype=np.uint8)
    absmax = rng.uniform(0.1, 2.0, 4).astype(np.float32)
    state = {"quant_type": "nf4", "blocksize": block, "dtype": "bfloat16",
             "shape": list(shape)}
    qmap = torch.tensor(NF4, dtype=torch.float32)
    bias = torch.randn(6)
    base = "transformer_blocks.0.ff.net.0.proj.weight"
    plain = {base: torch.from_numpy(packed).reshape(-1, 1), base + ".absmax":
             torch.from_numpy(absmax), base + ".quant_map": qmap,
             base + ".quant_state.bitsandbytes__nf4": _json_tensor(state),
             "transformer_blocks.0.ff.net.0.proj.bias": bias}
    save_file(plain, str(tmp_path / "nf4.safetensors"))
    got = _read_all(tmp_path / "nf4.safetensors")
    assert sorted(got) == ["transformer_blocks.0.ff.net.0.proj.bias", base]
    want = _nf4_reference(packed, absmax, block, n).reshape(shape)
    assert torch.equal(got[base], torch.from_numpy(want))
    assert layer_quantization(tmp_path / "nf4.safetensors")[base] == "nf4"

    # double quantization: absmax stored as uint8 codes of a 256-entry map
    nmap = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
    qabs = rng.integers(0, 256, 4, dtype=np.uint8)
    nabs, offset = np.array([0.75], dtype=np.float32), 0.5
    absmax2 = (nmap[qabs] * nabs[0]).astype(np.float32) + np.float32(offset)
    nested = {**plain, base + ".absmax": torch.from_numpy(qabs),
              base + ".nested_absmax": torch.from_numpy(nabs),
              base + ".nested_quant_map": torch.from_numpy(nmap),
              base + ".quant_state.bitsandbytes__nf4": _json_tensor(
                  {**state, "nested_blocksize": 256, "nested_dtype": "float32",
                   "nested_offset": offset})}
    save_file(nested, str(tmp_path / "nf4d.safetensors"))
    got = _read_all(tmp_path / "nf4d.safetensors")
    want = _nf4_reference(packed, absmax2, block, n).reshape(shape)
    assert torch.equal(got[base], torch.from_numpy(want))


# --- merges and bakes on quantized inputs -----------------------------------------------


@pytest.fixture(scope="module")
def flux_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reduced Flux.1 (real key names) as GGUF Q4_K, as ComfyUI fp8, and each
    one's dequantized values as plain F32 safetensors; a second model; a LoRA."""
    from modelkit.arch import flux
    from modelkit.testing import flux_config
    from modelkit.testing.lora import write_flux_lora

    root = tmp_path_factory.mktemp("quant-flux")
    shapes = flux.transformer_keys(flux_config(hidden=128, depth=1, single=1))
    rng, gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    gg: dict[str, tuple[str, np.ndarray, tuple[int, ...]]] = {}
    orig, deq_q4, comfy, deq_fp8, other, layers = {}, {}, {}, {}, {}, {}
    for key, shape in shapes.items():
        numel = int(np.prod(shape))
        other[key] = torch.randn(*shape, generator=gen) / 10
        if len(shape) == 2 and numel % 256 == 0:  # flattened to 256-wide rows, as city96's tool
            blocks = _blocks("Q4_K", numel // 256, rng)
            gg[key] = ("Q4_K", blocks, (numel // 256, 256))
            orig[key] = tuple(shape)
            deq_q4[key] = _gguf_values("Q4_K", blocks).reshape(shape)
            w = (torch.randn(*shape, generator=gen) * 50).to(torch.float8_e4m3fn)
            comfy[key], comfy[key[:-len("weight")] + "weight_scale"] = w, torch.tensor(0.002)
            deq_fp8[key] = w.float() * torch.tensor(0.002)
            layers[key[:-len(".weight")]] = {"format": "float8_e4m3fn"}
        else:
            values = rng.standard_normal(numel).astype(np.float32).reshape(shape)
            gg[key] = ("F32", values, tuple(shape))
            deq_q4[key] = comfy[key] = deq_fp8[key] = torch.from_numpy(values)
    paths = {n: root / f"{n}.safetensors" for n in ("q4_deq", "fp8", "fp8_deq", "other")}
    paths["q4"] = root / "q4.gguf"
    _write_gguf(paths["q4"], gg, orig)
    save_file(deq_q4, str(paths["q4_deq"]))
    save_file(comfy, str(paths["fp8"]), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": layers})})
    save_file(deq_fp8, str(paths["fp8_deq"]))
    save_file(other, str(paths["other"]))
    paths["lora"] = root / "lora.safetensors"
    write_flux_lora(paths["lora"], "kohya", hidden=128, depth=1, single=1, rank=4, seed=5)
    return paths


def _run(recipe: object) -> dict[str, torch.Tensor]:
    from modelkit.engine.runner import run

    run(recipe, overwrite=True)  # type: ignore[arg-type]
    return _read_all(Path(recipe.output_path))  # type: ignore[attr-defined]


@pytest.mark.parametrize("quant", ["q4", "fp8"])
def test_merge_and_bake_on_quantized_input_equal_the_dequantized_file(
        flux_inputs: dict[str, Path], tmp_path: Path, quant: str) -> None:
    from modelkit.core.recipe import Recipe

    p = flux_inputs
    for name, a in (("q", p[quant]), ("d", p[f"{quant}_deq"])):
        merged = _run(Recipe.merge(a, p["other"], alpha=0.3,
                                   output=tmp_path / f"m_{name}.safetensors"))
        baked = _run(Recipe.op("lora_bake", a, p["lora"],
                               output=tmp_path / f"b_{name}.safetensors"))
        if name == "q":
            first = (merged, baked)
    assert first[0].keys() == merged.keys() and first[1].keys() == baked.keys()
    for got, want in zip(first, (merged, baked), strict=True):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    base = _read_all(p[f"{quant}_deq"])
    assert sum(not torch.equal(baked[k].float(), base[k].to(baked[k].dtype).float())
               for k in baked) > 0  # the bake changed something


# --- inspect and hostile files through the console script --------------------------------


def _hostile(tmp_path: Path) -> dict[str, Path]:
    """Quantized files whose records do not fit their tensors."""
    out = {}
    fp8 = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    bad_scale = {"a.weight": fp8, "a.weight_scale": torch.ones(3)}
    meta = {"_quantization_metadata": json.dumps({"layers": {"a": {"format": "float8_e4m3fn"}}})}
    save_file(bad_scale, str(tmp_path / "scale.safetensors"), metadata=meta)
    out["scale"] = tmp_path / "scale.safetensors"
    save_file({"a.weight": fp8}, str(tmp_path / "fmt.safetensors"), metadata={
        "_quantization_metadata": json.dumps({"layers": {"a": {"format": "q9_z"}}})})
    out["format"] = tmp_path / "fmt.safetensors"
    save_file({"a.weight": torch.zeros(4, 8, dtype=torch.int8), "a.weight_scale": torch.ones(())},
              str(tmp_path / "group.safetensors"), metadata={"_quantization_metadata": json.dumps(
                  {"layers": {"a": {"format": "int8_blockwise", "group_size": "x"}}})})
    out["group"] = tmp_path / "group.safetensors"
    save_file({"a.weight": fp8, "a.weight_scale": torch.ones(()),
               "a.comfy_quant": torch.tensor(list(b"{not json"), dtype=torch.uint8)},
              str(tmp_path / "cq.safetensors"))
    out["comfy_quant"] = tmp_path / "cq.safetensors"
    base = "w.weight"
    save_file({base: torch.zeros(8, 1, dtype=torch.uint8), base + ".absmax": torch.ones(1),
               base + ".quant_map": torch.zeros(16),
               base + ".quant_state.bitsandbytes__nf4": _json_tensor(
                   {"quant_type": "nf4", "blocksize": 64, "shape": [64, 64]})},
              str(tmp_path / "nf4.safetensors"))
    out["nf4"] = tmp_path / "nf4.safetensors"
    rng = np.random.default_rng(3)
    _write_gguf(tmp_path / "q.gguf", {"x.weight": ("Q4_K", _blocks("Q4_K", 4, rng), (4, 256))})
    data = (tmp_path / "q.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    out["gguf_cut"] = tmp_path / "cut.gguf"
    return out


def test_inspect_reports_storage_per_layer_and_refuses_hostile_files(
        flux_inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelkit.cli import main

    hostile = _hostile(tmp_path)
    cases = {"q4": ["inspect", str(flux_inputs["q4"])],
             "fp8": ["inspect", "--json", str(flux_inputs["fp8"])],
             **{n: ["inspect", str(p)] for n, p in hostile.items()}}
    res = run_entry(cases, tmp_path)
    # and once through the installed console script itself
    res["console"] = run_all({"c": ["inspect", str(hostile["gguf_cut"])]}, tmp_path)["c"]
    # a command that reads weights refuses the same way (in this process: torch is loaded)
    capsys.readouterr()
    code = main(["merge", str(hostile["scale"]), str(flux_inputs["other"]), "-o",
                 str(tmp_path / "never.safetensors")])
    res["merge"] = (code, "", capsys.readouterr().err)
    code, out, err = res["q4"]
    assert code == 0, err
    assert "quantized   gguf: F32 29 layers, Q4_K 23" in out
    assert "flux" in out.split("arch", 1)[1].split("\n", 1)[0]
    code, out, err = res["fp8"]
    assert code == 0, err
    rep = json.loads(out)
    assert rep["arch"] == "flux" and rep["unknown_keys"] == []
    q = rep["quantization"]
    assert q["spelling"] == "comfy" and q["counts"] == {"F32": 29, "float8_e4m3fn": 23}
    assert q["layers"]["double_blocks.0.img_attn.qkv.weight"] == "float8_e4m3fn"
    assert "double_blocks.0.img_attn.qkv.weight_scale" not in q["layers"]
    wants = {"scale": "does not fit weight", "format": "which ComfyUI does not name",
             "comfy_quant": "is not JSON text", "group": "is not a block size",
             "nf4": "do not fit its quant_state",
             "gguf_cut": "", "merge": "does not fit weight", "console": "cut.gguf"}
    for name, part in wants.items():
        code, out, err = res[name]
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert part in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "never.safetensors").exists()
