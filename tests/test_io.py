"""The one read path and the one write path."""

from __future__ import annotations

import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelkit import testing
from modelkit.core.recipe import Recipe
from modelkit.engine.runner import run
from modelkit.errors import BadFileError, OutputError, UnsafePickleError
from modelkit.io.header import read_header, read_small_tensor
from modelkit.io.pickle import load_pickle_state_dict, save_pickle_state_dict
from modelkit.io.reader import cast, open_model
from modelkit.io.writer import SafetensorsWriter, TensorSpec, write_sparse


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None,
           inputs: tuple[Path, ...] = ()) -> None:
    from modelkit.io.dtypes import from_torch

    specs = [TensorSpec(k, from_torch(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(path, specs, meta, inputs=inputs) as w:
        for k, t in reversed(list(tensors.items())):  # any order
            w.write(k, t)


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    tensors = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "f8": base.to(torch.float8_e4m3fn), "i64": torch.arange(7).reshape(1, 7),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0), "b": torch.tensor([True, False]),
        "transposed": base.t(),  # non-contiguous: must not be scrambled
    }
    out = tmp_path / "x.safetensors"
    _write(out, tensors, {"k": "v"})
    back = load_file(out)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype, k
        assert torch.equal(back[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else back[k], t.contiguous().view(torch.uint8)
                           if t.dtype == torch.float8_e4m3fn else t.contiguous()), k
    header = read_header(out)
    assert header.metadata == {"k": "v"}
    assert header.data_start % 8 == 0
    for info in header.tensors.values():  # aligned to element size
        assert info.begin % max(1, int(info.nbytes / max(info.numel, 1))) == 0
    assert read_small_tensor(header, "i64") == [float(i) for i in range(7)]
    assert read_small_tensor(header, "bf16") == pytest.approx(
        base.bfloat16().float().flatten().tolist())
    assert read_small_tensor(header, "f16") == pytest.approx(
        base.half().float().flatten().tolist())


def test_writer_refuses_its_input(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    _write(src, {"w": torch.ones(2)})
    before = src.read_bytes()
    with pytest.raises(OutputError, match="also an input"):
        _write(src, {"w": torch.zeros(2)}, inputs=(src,))
    with pytest.raises(OutputError, match="also an input"):
        run(Recipe.op("quantize", src, output=src, dtype="fp16"), overwrite=True)
    assert src.read_bytes() == before


def test_no_partial_output_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"user file")
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    with pytest.raises(RuntimeError), SafetensorsWriter(out, specs) as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("boom")
    assert out.read_bytes() == b"user file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    with pytest.raises(KeyboardInterrupt), SafetensorsWriter(out, specs) as w:
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_writer_checks_shapes_and_completeness(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", "F16", (2,)), TensorSpec("b", "F16", (3,))]
    w = SafetensorsWriter(out, specs)
    with pytest.raises(Exception, match="shape"):
        w.write("a", torch.ones(3, dtype=torch.float16))
    with pytest.raises(Exception, match="bytes"):
        w.write("a", torch.ones(2, dtype=torch.float32))
    w.write("a", torch.ones(2, dtype=torch.float16))
    with pytest.raises(Exception, match="never written"):
        w.commit()
    assert not out.exists()


def _corrupt(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_header_errors(tmp_path: Path, models: dict[str, Path]) -> None:
    src = models["sd1"].read_bytes()
    cases = {
        "trunc.safetensors": (src[: len(src) - 100], "truncated"),
        "short.safetensors": (b"abc", "shorter than 8 bytes"),
        "text.safetensors": (b"hello world, this is not a model" * 4, "100 MB|header"),
        "json.safetensors": (struct.pack("<Q", 4) + b"[1,2", "not a safetensors"),
        "cut_header.safetensors": (src[:20], "truncated"),
    }
    for name, (data, msg) in cases.items():
        with pytest.raises(BadFileError, match=msg) as err:
            read_header(_corrupt(tmp_path, name, data))
        assert name in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(BadFileError, match="no such file"):
        read_header(tmp_path / "missing.safetensors")


def test_reader_streams_tensors(models: dict[str, Path]) -> None:
    with open_model(models["sd1"]) as src:
        ref = load_file(models["sd1"])
        assert src.keys() == list(read_header(models["sd1"]).tensors)
        for key in list(ref)[:50]:
            assert torch.equal(src.get(key), ref[key])


def test_cast_is_chunked_and_exact() -> None:
    t = torch.randn(3 * (1 << 20) + 17, dtype=torch.float32)
    assert torch.equal(cast(t, torch.float16), t.half())
    ids = torch.arange(77)
    assert cast(ids, torch.float16) is ids  # integers are never cast


def test_cast_keeps_ints_and_metadata(tmp_path: Path, models: dict[str, Path]) -> None:
    src = tmp_path / "noted.safetensors"
    testing.write_checkpoint(src, "sd1", seed=1, metadata={"modelkit.note": "x"})
    out = tmp_path / "sd1_fp32.safetensors"
    run(Recipe.op("quantize", src, output=out, dtype="fp32"))
    back = load_file(out)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert back[key].dtype == torch.int64
    ref = load_file(models["sd1"])
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert back[w].dtype == torch.float32 and torch.equal(back[w], ref[w].float())
    assert read_header(out).metadata["modelkit.note"] == "x"


def test_sparse_full_size_file(tmp_path: Path) -> None:
    p = write_sparse(tmp_path / "big.safetensors", [TensorSpec("w", "F32", (1 << 28,))])
    assert p.stat().st_size == 8 + read_header(p).header_size + (1 << 30)
    assert p.stat().st_blocks * 512 < 1 << 20  # nothing stored


class ModelCheckpoint:  # stands in for pytorch_lightning's class
    def __init__(self) -> None:
        self.best_model_score = 0.5


def _lightning_module() -> None:
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        sys.modules.setdefault(n, types.ModuleType(n))
    mod = sys.modules[names[-1]]
    ModelCheckpoint.__module__ = names[-1]
    mod.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]


def test_ckpt_with_lightning_callback_loads(tmp_path: Path) -> None:
    _lightning_module()
    state = {"model.diffusion_model.x": torch.arange(4.0), "global_step_buf": torch.ones(1)}
    path = tmp_path / "m.ckpt"
    save_pickle_state_dict(state, path, {"global_step": 875000,
                                         "callbacks": {ModelCheckpoint: ModelCheckpoint()}})
    loaded = load_pickle_state_dict(path)
    assert set(loaded) == set(state)
    assert torch.equal(loaded["model.diffusion_model.x"], torch.arange(4.0))


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def test_ckpt_with_forbidden_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Evil()}, path)
    with pytest.raises(UnsafePickleError, match=r"evil\.ckpt.*(posix\.system|os\.system)"):
        load_pickle_state_dict(path)


def test_textual_inversion_pt(tmp_path: Path) -> None:
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.randn(4, 768)}, "name": "emb", "step": 10},
               path)
    assert list(load_pickle_state_dict(path)) == ["string_to_param.*"]
