"""export-gguf: the UNet as a GGUF file that ComfyUI-GGUF's loader reads back
to the original shapes, with q8_0 within its error bound and float-kept
tensors bit-exact."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.arch.configs import UNET_PREFIX
from modelkit.errors import ModelkitError, OutputError
from modelkit.fuzz import run_cli

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
    from modelkit.engine.api import export_gguf

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
    from modelkit.engine.api import export_gguf

    # 30 blocks of 32: most UNet tensors of the tiny model span several
    # chunks, and end in a partial one
    monkeypatch.setattr(io_gguf, "CHUNK", 960)
    out = tmp_path / "chunked.gguf"
    export_gguf(files["sd1"], out)
    assert out.read_bytes() == exported["sd1"][0].read_bytes()


@pytest.mark.parametrize(("name", "words"), [("lora", "LoRA"), ("vae", "VAE")])
def test_refuses_non_unet_inputs(files: dict[str, Path], tmp_path: Path, name: str,
                                 words: str) -> None:
    from modelkit.engine.api import export_gguf

    out = tmp_path / "x.gguf"
    with pytest.raises(ModelkitError, match=words) as err:
        export_gguf(files[name], out)
    assert str(files[name]) in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_refuses_bad_outputs_and_qtype(files: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.engine.api import export_gguf

    before = files["sd1"].read_bytes()
    with pytest.raises(OutputError, match="also an input"):
        export_gguf(files["sd1"], files["sd1"])
    assert files["sd1"].read_bytes() == before
    with pytest.raises(OutputError, match="does not exist"):
        export_gguf(files["sd1"], tmp_path / "missing" / "x.gguf")
    with pytest.raises(ModelkitError, match="unknown GGUF type"):
        export_gguf(files["sd1"], tmp_path / "x.gguf", qtype="q4_k")
    assert not list(tmp_path.iterdir())


def test_export_refuses_an_existing_output_unless_overwrite(files: dict[str, Path],
                                                            exported: dict,
                                                            tmp_path: Path) -> None:
    """export_gguf follows the one overwrite policy (issue 18): an existing
    output is refused and kept; ``overwrite=True`` replaces it."""
    from modelkit.engine.api import export_gguf

    out = tmp_path / "mine.gguf"
    out.write_bytes(b"user data")
    with pytest.raises(OutputError, match="exists") as err:
        export_gguf(files["sd1_unet"], out)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.gguf"]
    export_gguf(files["sd1_unet"], out, overwrite=True)
    assert out.read_bytes() == exported["sd1_unet"][0].read_bytes()


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


# --- inspect reads GGUF from its header (issue 9 item 3) ------------------------------


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def handmade_gguf(kv: list[bytes], tensors: list[bytes], data: bytes = b"",
                  n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF v3 file from encoded key/values and tensor infos."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kv) if n_kv is None else n_kv)
    body = head + b"".join(kv) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def kv_str(key: str, value: str) -> bytes:
    return _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(value)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (_gguf_string(name) + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset))


@pytest.mark.parametrize(("name", "arch"), [("sd1", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl"),
                                            ("sd1_flat_off", "sd1"), ("sd1_f16", "sd1")])
def test_inspect_reads_modelkit_gguf(exported: dict, name: str, arch: str) -> None:
    from collections import Counter

    from modelkit.cli.inspect_cmd import render
    from modelkit.inspect.report import inspect_model

    path, result = exported[name]
    rep = inspect_model(path)
    d = rep.to_dict()
    reader = gguf.GGUFReader(str(path))
    assert (d["kind"], d["arch"], d["file_format"]) == ("unet", arch, "gguf")
    assert d["components"]["unet"]["complete"] is True, d["components"]["unet"]
    assert d["unknown_keys"] == [] and d["n_tensors"] == result.n_tensors
    g = d["gguf"]
    assert g["architecture"] == field_str(reader, "general.architecture")
    assert g["quant_types"] == dict(Counter(t.tensor_type.name for t in reader.tensors))
    n_orig = sum(1 for f in reader.fields if f.startswith("comfy.gguf.orig_shape."))
    assert g["n_orig_shapes"] == n_orig and g["n_orig_shapes_invalid"] == 0
    assert d["metadata"]["modelkit.qtype"] == field_str(reader, "modelkit.qtype")
    assert d["metadata"]["modelkit.source"] == field_str(reader, "modelkit.source")
    assert f"general.architecture {g['architecture']}" in render(rep)


def test_gguf_header_matches_gguf_py(exported: dict) -> None:
    from modelkit.io.gguf_header import read_gguf_header

    path = exported["sd1"][0]
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert header.data_start == reader.data_offset
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        mine = header.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert (mine.ggml_type, mine.nbytes) == (t.tensor_type.name, int(t.n_bytes))
        assert header.data_start + mine.offset == t.data_offset
    for key in ("general.architecture", "general.name", "modelkit.version"):
        assert header.kv[key] == field_str(reader, key)


def test_gguf_tables_match_gguf_py() -> None:
    from modelkit.io.gguf_header import GGML_TYPES, VALUE_TYPES

    known = gguf.GGMLQuantizationType.__members__
    checked = 0
    for type_id, (name, block, size) in GGML_TYPES.items():
        if name in known:
            qt = gguf.GGMLQuantizationType[name]
            assert qt.value == type_id and gguf.GGML_QUANT_SIZES[qt] == (block, size)
            checked += 1
    assert checked >= 30
    for type_id, (name, _) in VALUE_TYPES.items():
        assert gguf.GGUFValueType(type_id).name == name.upper()


def test_hostile_gguf_headers(exported: dict, tmp_path: Path) -> None:
    """Corrupt and hostile GGUF headers: a one-line error naming the file, no
    allocation sized by a count the file cannot back, never a crash."""
    import random
    import tracemalloc

    from modelkit.errors import BadFileError
    from modelkit.inspect.report import inspect_model

    good = exported["sd1"][0].read_bytes()
    array = _gguf_string("a") + struct.pack("<II", 9, 0)  # ARRAY of UINT8 ...
    crafted = {
        "tensor_count": good[:8] + struct.pack("<Q", 2**62) + good[16:],
        "kv_count": good[:16] + struct.pack("<Q", 2**60) + good[24:],
        "key_length": good[:24] + struct.pack("<Q", 2**61) + good[32:],
        "version_1": good[:4] + struct.pack("<I", 1) + good[8:],
        "huge_array": handmade_gguf([array + struct.pack("<Q", 2**60)], []),
        "deep_array": handmade_gguf([_gguf_string("a") + struct.pack("<I", 9)
                                     + struct.pack("<IQ", 9, 1) * 50], []),
        "five_dims": handmade_gguf([], [tensor_info("w", [1, 1, 1, 1, 1])]),
        "unknown_type": handmade_gguf([], [tensor_info("w", [4], ggml_type=99)]),
        "past_end": handmade_gguf([], [tensor_info("w", [4], offset=0)], b"\0" * 8),
        "misaligned": handmade_gguf([], [tensor_info("w", [1], offset=4)], b"\0" * 40),
        "dup_tensor": handmade_gguf([], [tensor_info("w", [1])] * 2, b"\0" * 4),
        "q8_rows": handmade_gguf([], [tensor_info("w", [31], ggml_type=8)], b"\0" * 34),
        "bad_alignment": handmade_gguf([_gguf_string("general.alignment")
                                        + struct.pack("<II", 4, 3)], []),
    }
    for name, data in crafted.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(BadFileError) as err:
                inspect_model(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value), name
        assert peak < 4 << 20, (name, peak)
    rng = random.Random(9)
    path = tmp_path / "mutated.gguf"
    end = 40_000  # the key/values and tensor infos of the tiny export
    for _ in range(60):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(end)] = rng.randrange(256)
        path.write_bytes(buf[:rng.choice((len(buf), rng.randrange(len(buf))))])
        try:
            inspect_model(path)
        except BadFileError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    rc, out, err = run_cli(["inspect", str(tmp_path / "tensor_count.gguf")])
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert "tensor_count.gguf" in err


def test_gguf_with_orig_shape_records(tmp_path: Path) -> None:
    from modelkit.inspect.report import inspect_model

    shape = _gguf_string("comfy.gguf.orig_shape.w") + struct.pack("<II", 9, 5) + \
        struct.pack("<Q2i", 2, 2, 2)
    bad = _gguf_string("comfy.gguf.orig_shape.v") + struct.pack("<II", 9, 5) + \
        struct.pack("<Qi", 1, 3)
    data = struct.pack("<4f", 1, 2, 3, 4) + b"\0" * 16 + struct.pack("<2f", 5, 6)
    path = tmp_path / "small.gguf"
    path.write_bytes(handmade_gguf([kv_str("general.architecture", "sd1"), shape, bad],
                                   [tensor_info("w", [4]), tensor_info("v", [2], 0, 32)],
                                   data))
    d = inspect_model(path).to_dict()
    assert d["dtypes"] == {"F32": 2} and d["n_params"] == 6
    assert d["gguf"]["n_orig_shapes"] == 2 and d["gguf"]["n_orig_shapes_invalid"] == 1
    assert "comfy.gguf.orig_shape.w" not in d["metadata"]
    assert any("do not match" in n for n in d["notes"])
