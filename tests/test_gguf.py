"""export-gguf: the UNet as a GGUF file that ComfyUI-GGUF's loader reads back
to the original shapes, with q8_0 within its error bound and float-kept
tensors bit-exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.arch.configs import UNET_PREFIX
from modelkit.errors import ModelkitError, OutputError

gguf = pytest.importorskip("gguf")

Q8_REL_BOUND = 0.5 / 127 + 1 / 2048  # half a step plus the fp16 rounding of the scale


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from modelkit import testing as t
    from modelkit.testing.lora import write_lora

    root = tmp_path_factory.mktemp("gguf")
    builders = {
        "sd1": lambda p: t.write_checkpoint(p, "sd1", seed=21, dtype="F16"),
        "sdxl": lambda p: t.write_checkpoint(p, "sdxl", seed=22, dtype="F32"),
        "sd2": lambda p: t.write_checkpoint(p, "sd2", seed=23, components=["unet"]),
        "sd1_unet": lambda p: t.write_unet(p, "sd1", seed=24),
        "lora": lambda p: write_lora(p, "sd1"),
        "vae": lambda p: t.write_vae(p),
    }
    out = {}
    for name, build in builders.items():
        out[name] = root / f"{name}.safetensors"
        build(out[name])
    return out


@pytest.fixture(scope="module")
def exported(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[Path, Any]]:
    from modelkit.core.api import export_gguf

    root = tmp_path_factory.mktemp("gguf_out")
    runs = {"sd1": ("sd1", {}), "sdxl": ("sdxl", {}), "sd2": ("sd2", {}),
            "sd1_unet": ("sd1_unet", {}), "sd1_flat_off": ("sd1", {"flatten": False}),
            "sd1_f16": ("sd1", {"qtype": "f16"})}
    out = {}
    for name, (src, kw) in runs.items():
        path = root / f"{name}.gguf"
        out[name] = (path, export_gguf(files[src], path, **kw))
    return out


def source_unet(path: Path) -> dict[str, np.ndarray]:
    """The UNet tensors of a safetensors file, unprefixed, in their own dtype."""
    from safetensors.numpy import load_file

    sd = load_file(str(path))
    if any(k.startswith(UNET_PREFIX) for k in sd):
        return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return sd


def field_str(reader: Any, key: str) -> str | None:
    f = reader.get_field(key)
    return None if f is None else bytes(f.parts[f.data[-1]]).decode()


def comfy_load(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """ComfyUI-GGUF's loader rule (loader.py gguf_sd_loader + dequant.py):
    the shape is ``comfy.gguf.orig_shape.<name>`` (must be ARRAY of INT32)
    or the GGUF shape reversed; F16/F32 data is viewed as that shape,
    anything else is dequantized block by block and reshaped to it."""
    reader = gguf.GGUFReader(str(path))
    assert field_str(reader, "general.architecture") in {"sd1", "sdxl"}  # IMG_ARCH_LIST
    out = {}
    for t in reader.tensors:
        f = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if f is not None:
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            shape = tuple(int(f.parts[i][0]) for i in f.data)
        else:
            shape = tuple(int(d) for d in reversed(t.shape))
        qt = t.tensor_type
        if qt in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            arr = t.data.reshape(shape)
        else:
            arr = gguf.quants.dequantize(t.data, qt).reshape(shape)
        out[t.name] = (arr, qt.name)
    return out


def q8_blocks_within_bound(src: np.ndarray, raw: np.ndarray) -> float:
    """Check every Q8_0 block against its bound; return the worst error as a
    fraction of the block's max |x|."""
    x = src.astype(np.float32).reshape(-1, 32)
    blocks = raw.reshape(-1, 34)
    d16 = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 32)
    np.testing.assert_array_equal(deq, q * d16[:, None])
    amax = np.abs(x).max(axis=1)
    d32 = amax / 127
    bound = d32 / 2 + 127 * np.abs(d32 - d16) + 1e-12
    err = np.abs(x - deq).max(axis=1)
    assert (err <= bound).all()
    nz = amax > 0
    return float((err[nz] / amax[nz]).max()) if nz.any() else 0.0


def check_roundtrip(gguf_path: Path, src_path: Path) -> dict[str, str]:
    """Every UNet key present at its original shape; q8_0 within bound;
    float tensors exact. Returns name -> GGML type."""
    src = source_unet(src_path)
    loaded = comfy_load(gguf_path)
    assert set(loaded) == set(src)
    raw = {t.name: t.data for t in gguf.GGUFReader(str(gguf_path)).tensors}
    worst = 0.0
    for name, (arr, qt) in loaded.items():
        assert arr.shape == src[name].shape, name
        if qt == "Q8_0":
            worst = max(worst, q8_blocks_within_bound(src[name], raw[name]))
        else:
            np.testing.assert_array_equal(arr, src[name].astype(arr.dtype), err_msg=name)
            assert arr.astype(src[name].dtype).tobytes() == src[name].tobytes(), name
    assert worst <= Q8_REL_BOUND
    return {n: qt for n, (_, qt) in loaded.items()}


def test_sd1_checkpoint_roundtrip(files: dict[str, Path], exported: dict) -> None:
    path, result = exported["sd1"]
    types = check_roundtrip(path, files["sd1"])
    reader = gguf.GGUFReader(str(path))
    assert field_str(reader, "general.architecture") == "sd1"
    assert not any(t.name.startswith(("model.", "first_stage_model.", "cond_stage_model."))
                   for t in reader.tensors)
    assert types["input_blocks.0.0.weight"] == "F32" and types["out.2.weight"] == "F32"
    assert types["time_embed.0.weight"] == "F16"
    assert types["input_blocks.1.1.proj_in.weight"] == "F16"
    assert types["input_blocks.1.0.in_layers.0.weight"] == "F16"  # 1-D
    assert types["input_blocks.1.0.in_layers.2.weight"] == "Q8_0"  # 3x3 conv, flattened
    assert result.n_tensors == len(types)
    assert result.n_quantized == sum(qt == "Q8_0" for qt in types.values()) > 0
    assert result.bytes_written == path.stat().st_size
    assert not list(path.parent.glob(".*partial"))


def test_flattened_tensors_record_orig_shape(exported: dict) -> None:
    reader = gguf.GGUFReader(str(exported["sd1"][0]))
    n_flat = 0
    for t in reader.tensors:
        stored = tuple(int(d) for d in reversed(t.shape))
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is None:
            assert t.tensor_type.name != "Q8_0" or stored[-1] % 32 == 0
            continue
        n_flat += 1
        orig = tuple(int(field.parts[i][0]) for i in field.data)
        assert stored == (np.prod(orig) // 256, 256) and orig[-1] % 32 != 0
    assert n_flat > 0


def test_metadata(exported: dict) -> None:
    reader = gguf.GGUFReader(str(exported["sd1"][0]))
    assert field_str(reader, "general.name") == "sd1"
    assert field_str(reader, "modelkit.source") == "sd1.safetensors"
    assert field_str(reader, "modelkit.source_arch") == "sd1"
    f = reader.get_field("general.quantization_version")
    assert int(f.parts[f.data[-1]][0]) == gguf.GGML_QUANT_VERSION
    f = reader.get_field("general.file_type")
    assert int(f.parts[f.data[-1]][0]) == gguf.LlamaFileType.MOSTLY_Q8_0


def test_sdxl_f32_checkpoint(files: dict[str, Path], exported: dict) -> None:
    path, _ = exported["sdxl"]
    types = check_roundtrip(path, files["sdxl"])
    assert field_str(gguf.GGUFReader(str(path)), "general.architecture") == "sdxl"
    assert types["label_emb.0.0.weight"] == "F32" and types["time_embed.2.bias"] == "F32"
    assert "Q8_0" in types.values()


def test_sd2_is_tagged_sd1(files: dict[str, Path], exported: dict) -> None:
    path, result = exported["sd2"]
    check_roundtrip(path, files["sd2"])
    assert field_str(gguf.GGUFReader(str(path)), "general.architecture") == "sd1"
    assert any("sd2" in n for n in result.notes)


def test_unet_only_file(files: dict[str, Path], exported: dict) -> None:
    path, _ = exported["sd1_unet"]
    check_roundtrip(path, files["sd1_unet"])


def test_no_flatten_keeps_every_shape(files: dict[str, Path], exported: dict) -> None:
    """The layout stable-diffusion.cpp checks: stored shape == real shape."""
    path, result = exported["sd1_flat_off"]
    types = check_roundtrip(path, files["sd1"])
    reader = gguf.GGUFReader(str(path))
    assert not [k for k in reader.fields if k.startswith("comfy.gguf.orig_shape.")]
    assert types["input_blocks.1.0.in_layers.2.weight"] == "F16"
    assert 0 < result.n_quantized < exported["sd1"][1].n_quantized


def test_f16_export(files: dict[str, Path], exported: dict) -> None:
    path, result = exported["sd1_f16"]
    types = check_roundtrip(path, files["sd1"])
    assert result.n_quantized == 0 and "Q8_0" not in types.values()
    f = gguf.GGUFReader(str(path)).get_field("general.file_type")
    assert int(f.parts[f.data[-1]][0]) == gguf.LlamaFileType.MOSTLY_F16


def test_chunking_does_not_change_bytes(files: dict[str, Path], exported: dict,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    import modelkit.io.gguf as io_gguf
    from modelkit.core.api import export_gguf

    monkeypatch.setattr(io_gguf, "CHUNK", 96)
    out = tmp_path / "chunked.gguf"
    export_gguf(files["sd1"], out)
    assert out.read_bytes() == exported["sd1"][0].read_bytes()


@pytest.mark.parametrize(("name", "words"), [("lora", "LoRA"), ("vae", "VAE")])
def test_refuses_non_unet_inputs(files: dict[str, Path], tmp_path: Path, name: str,
                                 words: str) -> None:
    from modelkit.core.api import export_gguf

    out = tmp_path / "x.gguf"
    with pytest.raises(ModelkitError, match=words) as err:
        export_gguf(files[name], out)
    assert str(files[name]) in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_refuses_bad_outputs_and_qtype(files: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.core.api import export_gguf

    before = files["sd1"].read_bytes()
    with pytest.raises(OutputError, match="also an input"):
        export_gguf(files["sd1"], files["sd1"])
    assert files["sd1"].read_bytes() == before
    with pytest.raises(OutputError, match="does not exist"):
        export_gguf(files["sd1"], tmp_path / "missing" / "x.gguf")
    with pytest.raises(ModelkitError, match="unknown GGUF type"):
        export_gguf(files["sd1"], tmp_path / "x.gguf", qtype="q4_k")
    assert not list(tmp_path.iterdir())


def test_error_midway_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.convert.gguf import tensor_plan, unet_source
    from modelkit.io.gguf import write_gguf
    from modelkit.io.reader import open_model

    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")
    with open_model(files["sd1"]) as src:
        unet = unet_source(src)
        produce, calls = unet.produce, []

        def failing(key: str) -> Any:
            calls.append(key)
            if len(calls) == 40:
                raise KeyboardInterrupt
            return produce(key)

        unet.produce = failing
        with pytest.raises(KeyboardInterrupt):
            write_gguf(unet, out, arch="sd1", plan=tensor_plan)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_tables_match_gguf() -> None:
    from modelkit.io.gguf import GGML_SIZES

    for name, sizes in GGML_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == sizes


def test_import_is_light() -> None:
    code = ("import sys, modelkit.convert.gguf, modelkit.io.gguf\n"
            "print(sorted({'torch', 'gguf', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
