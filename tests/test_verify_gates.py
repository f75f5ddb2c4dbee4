"""Per-layer gates (modelkit/verify/gates.py): the class table against the
real quantizers, the format class of each layer from a GGUF header, and a
GGUF layer written with the wrong block scale caught by ``gate.q8_0``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelkit.cli import main
from modelkit.core.verify_thresholds import GATES, cosine_at
from modelkit.verify.gates import measure

UNET = "model.diffusion_model."


def _weights(kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 1024, generator=gen) / 32
    if kind == "outliers":  # 0.1 % of the weights x30, as bench/calibrate_gates.py
        w = torch.where(torch.rand(w.shape, generator=gen) < 1e-3, w * 30, w)
    return w


def _gguf_roundtrip(w: torch.Tensor, name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qt = GGMLQuantizationType[name.upper()]
    return torch.from_numpy(np.asarray(dequantize(quantize(w.numpy(), qt), qt),
                                       dtype=np.float32).reshape(w.shape))


def _int8_channel(w: torch.Tensor) -> torch.Tensor:
    from modelkit.convert.quantize import int8_dequantize, int8_quantize

    q, s, _, _ = int8_quantize(w)
    return int8_dequantize(q, s, torch.float32)


def _fp8_scaled(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().max() / 448
    return (w / s).to(torch.float8_e4m3fn).float() * s


def _modelkit_ggml(w: torch.Tensor, name: str) -> torch.Tensor:
    """modelkit's own GGML writer kernels (byte-identical to ggml's)."""
    from modelkit.io.ggml import dequantize_blocks, quantize_blocks

    return dequantize_blocks(quantize_blocks(w.reshape(-1), name.upper()),
                             name.upper()).reshape(w.shape)


ROUNDTRIPS = {
    **{t: (lambda w, t=t: _gguf_roundtrip(w, t)) for t in ("q8_0", "q5_1", "q5_0", "q4_1",
                                                           "q4_0")},
    # k-quants modelkit writes now (gguf-py has no k-quant quantizer)
    **{t: (lambda w, t=t: _modelkit_ggml(w, t)) for t in ("q6_k", "q3_k")},
    "int8_channel": _int8_channel, "fp8_e4m3_scaled": _fp8_scaled,
    "f16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float(),
}


def test_gate_table() -> None:
    """Every GGUF quantization type modelkit's writers make or plan (the
    legacy and k-quants) has a gate; more bits never gate lower; each level
    is 3 dB or more below its calibrated figure."""
    ladder = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]
    assert [GATES[t].snr_db for t in ladder] == sorted((GATES[t].snr_db for t in ladder),
                                                       reverse=True)
    assert GATES["q5_1"].snr_db >= GATES["q5_0"].snr_db >= GATES["q4_1"].snr_db \
        >= GATES["q4_0"].snr_db
    for name, gate in GATES.items():
        if gate.calibrated is not None:
            assert gate.calibrated - gate.snr_db >= 3.0, name
        assert gate.cosine == cosine_at(gate.snr_db) < 1.0
    assert cosine_at(20.0) == pytest.approx(1 / math.sqrt(1.01), abs=1e-15)


@pytest.mark.parametrize("kind", ["gauss", "outliers"])
def test_real_quantizers_pass_their_gates(kind: str) -> None:
    """gguf-py's own quantizers, modelkit's Q6_K/Q3_K kernels, modelkit's
    int8 and the casts, on seeded weights: every layer passes its class's
    gate, with room."""
    for seed in range(2):
        w = _weights(kind, seed)
        for cls, roundtrip in ROUNDTRIPS.items():
            snr, cos = measure(roundtrip(w), w)
            gate = GATES[cls]
            assert snr >= gate.snr_db + 2 and cos >= gate.cosine, (cls, kind, snr)


def test_measure_scale_and_transpose() -> None:
    """x2 gives 0 dB at cosine 1; W^T against W about -3 dB at cosine ~0;
    NaN is not a number of dB."""
    w = _weights("gauss", 3)[:, :64]
    snr, cos = measure(2 * w, w)
    assert snr == pytest.approx(0.0, abs=1e-9) and cos == pytest.approx(1.0, abs=1e-12)
    snr, cos = measure(w.t(), w)
    assert -3.5 < snr < -2.5 and abs(cos) < 0.05
    assert measure(w, w) == (math.inf, 1.0)
    bad = w.clone()
    bad[0, 0] = math.nan
    assert all(math.isnan(x) for x in measure(bad, w))


def _double_block_scales(path: Path, name: str) -> None:
    """Double the fp16 scale ``d`` of every Q8_0 block of tensor ``name``
    in place (block: 2 bytes d, then 32 int8)."""
    from modelkit.io.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    t = header.tensors[name]
    assert t.ggml_type == "Q8_0"
    with open(path, "r+b") as f:
        f.seek(header.data_start + t.offset)
        raw = bytearray(f.read(t.nbytes))
        for i in range(0, len(raw), 34):
            (d,) = struct.unpack_from("<e", raw, i)
            struct.pack_into("<e", raw, i, 2 * d)
        f.seek(header.data_start + t.offset)
        f.write(raw)


def _verify(*args: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", *args, "--static-only", "--threads", "1", "--json", "-q"])
    return code, json.loads(out.getvalue())


def test_gguf_layers_gated_by_their_ggml_type(tmp_path: Path) -> None:
    """A Q8_0 GGUF UNet: quantized layers gated as q8_0, kept ones as f32;
    the same file with one tensor's block scales doubled fails gate.q8_0,
    naming that tensor at 0 dB (cosine 1)."""
    from modelkit import testing as t
    from modelkit.engine.api import export_gguf
    from modelkit.verify.gates import format_classes
    from modelkit.verify.models import open_model_under_test

    src = tmp_path / "src.safetensors"
    t.write_checkpoint(src, "sd1", seed=5, dtype="F32")
    good = tmp_path / "unet.gguf"
    export_gguf(src, good)
    classes = format_classes(open_model_under_test(good))
    assert set(classes.values()) == {"q8_0", "f32"}
    code, rep = _verify(str(good), "--reference", str(src))
    assert code == 0, rep["checks"]
    gates = {c["name"]: c for c in rep["checks"] if c["name"].startswith("gate.")}
    assert gates["gate.q8_0"]["verdict"] == "pass" and 37 < gates["gate.q8_0"]["value"] < 50
    assert gates["gate.f32"]["value"] == "inf"  # kept tensors are the source's own
    name = next(k for k, c in classes.items() if c == "q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes())
    _double_block_scales(bad, name)
    md = tmp_path / "report.md"
    code, rep = _verify(str(bad), "--reference", str(src), "--markdown", str(md))
    assert code == 1
    failed = [c for c in rep["checks"] if c["verdict"] == "fail"]
    assert [c["name"] for c in failed] == ["gate.q8_0"]
    layer = rep["gates"]["layers"][0]
    assert layer["key"] == UNET + name and abs(layer["snr_db"]) < 0.1
    assert layer["cosine"] > 0.999 and f"{UNET + name} (" in failed[0]["message"]
    table = md.read_text().split("Per-layer gates (judged: ", 1)[1].splitlines()
    assert table[2:4] == ["| layer | format | SNR dB | cosine | verdict |",
                          "| --- | --- | --- | --- | --- |"]
    assert table[4].startswith(f"| {UNET + name} | q8_0 | ") and table[4].endswith(" | FAIL |")


def test_a_merge_stored_narrower_is_reported_a_broken_cast_judged() -> None:
    """Inferred (no --op): every UNet layer off (a merge saved in fp16, the
    VAE and text encoder untouched) is reported; three broken layers among
    clean ones are judged; a given --op always judges."""
    from modelkit.verify.gates import LayerGate, judged

    def layers(n_bad: int) -> list[LayerGate]:
        unet = [LayerGate(f"{UNET}b.{i}.weight", "f16", 4096, 20.0 if i < n_bad else 73.0,
                          0.99 if i < n_bad else 1.0) for i in range(10)]
        vae = [LayerGate(f"first_stage_model.e.{i}.weight", "f16", 4096, 73.0, 1.0)
               for i in range(30)]
        return unet + vae

    judge, why = judged(layers(10), "fp16", given=False)
    assert not judge and why.startswith("10 of 10 unet layers beyond")
    assert judged(layers(3), "fp16", given=False) == (
        True, "fp16: every layer must pass its format's gate")
    assert judged(layers(10), "fp16", given=True)[0]
    assert not judged(layers(0), "lossless", given=False)[0]
    assert not judged(layers(3), "merge", given=True)[0]
    assert [g.passed for g in layers(3)[:4]] == [False, False, False, True]


def test_comfyui_formats_read_through_io(tmp_path: Path) -> None:
    """ComfyUI's current layout (``_quantization_metadata``): an
    int8_blockwise layer (a scale per 128x128 block) and a float8_e4m3fn
    layer (one scale) are classed from io's layer table, dequantized by io
    and measured; a doubled fp8 scale reads 0 dB."""
    from safetensors.torch import save_file

    from modelkit.verify.gates import format_classes, layer_gates
    from modelkit.verify.models import open_model_under_test

    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(256, 256, generator=gen) / 16, torch.randn(128, 384, generator=gen) / 20
    save_file({"a.weight": a, "b.weight": b}, str(tmp_path / "ref.safetensors"))
    blocks = a.reshape(2, 128, 2, 128).abs().amax(dim=(1, 3)) / 127
    qa = (a / blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)).round().to(torch.int8)
    sb = b.abs().max() / 448
    meta = json.dumps({"format_version": "1.0", "layers": {
        "a": {"format": "int8_blockwise", "group_size": 128},
        "b": {"format": "float8_e4m3fn"}}})
    for name, scale in (("cand", sb), ("bad", 2 * sb)):
        save_file({"a.weight": qa, "a.weight_scale": blocks, "b.weight": (b / sb).to(
            torch.float8_e4m3fn), "b.weight_scale": scale.reshape(())},
            str(tmp_path / f"{name}.safetensors"), metadata={"_quantization_metadata": meta})
    ref = open_model_under_test(tmp_path / "ref.safetensors")
    cand = open_model_under_test(tmp_path / "cand.safetensors")
    assert format_classes(cand) == {"a.weight": "int8_block", "b.weight": "fp8_e4m3_scaled"}
    got = {g.key: g for g in layer_gates(cand, ref)}
    assert set(got) == {"a.weight", "b.weight"} and all(g.passed for g in got.values())
    assert 35 < got["a.weight"].snr_db < 45 and 28 < got["b.weight"].snr_db < 35
    bad = {g.key: g for g in layer_gates(open_model_under_test(tmp_path / "bad.safetensors"),
                                         ref)}
    assert abs(bad["b.weight"].snr_db) < 0.1 and not bad["b.weight"].passed
    assert bad["a.weight"].snr_db == got["a.weight"].snr_db
