"""GGML block quantizers (modelkit.io.ggml): the bytes of ggml's own reference
quantizer (golden files made by bench/ggml_ref/make_golden.py from
ggml-org/ggml's ``quantize_<type>`` with no importance matrix) on seeded
corner cases, dequantizers bit for bit gguf-py's, and the round-trip error
ggml's reference has on Gaussian data."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from modelkit.io.ggml import GGML_TYPES, dequantize_blocks, quantize_blocks
from modelkit.testing.ggml_cases import CASES, make_case
from tests.ggml_support import GOLDEN, differ, golden, quantize

gguf = pytest.importorskip("gguf")

MINE = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q3_K"]
KQB = ["Q4_K", "Q5_K", "Q2_K"]
DEQUANT = [*MINE, *KQB]
# byte ranges of each block's fp16 fields (gguf-py gguf/quants.py, ggml ggml-common.h)
FP16_FIELDS = {"Q8_0": (0, 2), "Q5_1": (0, 4), "Q5_0": (0, 2), "Q4_1": (0, 4),
               "Q4_0": (0, 2), "Q6_K": (208, 210), "Q3_K": (108, 110), "Q4_K": (0, 4),
               "Q5_K": (0, 4), "Q2_K": (80, 84)}
# relative RMSE of ggml's reference on Gaussian data (shared/reference/quant.md)
GAUSS_REL_RMSE = {"Q8_0": 0.0054, "Q6_K": 0.0177, "Q3_K": 0.151}




def _dequantize(blocks: np.ndarray, name: str) -> np.ndarray:
    import torch

    if name in KQB:  # their quantizers' module (branch kqb) re-exports these
        from modelkit.io.ggml import k_qkx2_dequant

        kernel = getattr(k_qkx2_dequant, f"dequantize_{name.lower()}")
        return kernel(torch.from_numpy(blocks)).numpy()
    return dequantize_blocks(torch.from_numpy(blocks), name).numpy()


@pytest.mark.parametrize("name", DEQUANT)
def test_quantize_is_ggml_reference_bytes(name: str) -> None:
    """Every block type on every seeded case (subnormal spans included: the
    reference is built with NDEBUG, so none is skipped)."""
    meta, cases = golden(name)
    assert set(cases) == set(CASES) and not meta["skipped_reference_aborts"]
    for case, ref in cases.items():
        x = make_case(case, meta["rows"], meta["cols"], meta["seed"])
        assert hashlib.sha256(x.tobytes()).hexdigest() == meta["input_sha256"][case], (
            f"the generator of case {case!r} changed: regenerate the golden files")
        bad = differ(quantize(x, name), ref, name)
        assert not bad, f"{name} {case}: blocks {bad[:10]} differ"


def _random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    """Random blocks with finite fp16 scales (every code pattern occurs)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, GGML_TYPES[name].block_bytes), dtype=np.uint8)
    lo, hi = FP16_FIELDS[name]
    scales = (rng.standard_normal((n, (hi - lo) // 2)) * 0.01).astype(np.float16)
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("name", DEQUANT)
def test_dequantize_is_gguf_py_bit_for_bit(name: str) -> None:
    blocks = [_random_blocks(name, 512, seed=7)]
    if (GOLDEN / f"{name.lower()}.npz").exists():
        _, cases = golden(name)
        nbytes = GGML_TYPES[name].block_bytes
        blocks += [ref.reshape(-1, nbytes) for ref in cases.values()]
    data = np.concatenate(blocks)
    mine = _dequantize(data, name)
    ref = gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType[name])
    assert mine.dtype == np.float32
    np.testing.assert_array_equal(mine.view(np.uint32), ref.reshape(-1).view(np.uint32))


def _rel_rmse(name: str) -> float:
    x = make_case("gauss", 32, 2048, seed=3)
    back = _dequantize(quantize(x, name), name).reshape(x.shape)
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


def test_round_trip_error_is_the_references() -> None:
    errors = {name: _rel_rmse(name) for name in MINE}
    for name, expected in GAUSS_REL_RMSE.items():
        assert errors[name] == pytest.approx(expected, rel=0.03), name
    # more bits, less error: each 4/5-bit pair and the ladder up to Q8_0
    order = ["Q3_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q8_0"]
    assert [errors[n] for n in order] == sorted((errors[n] for n in order), reverse=True)


def test_q8_0_agrees_with_the_gguf_writer() -> None:
    import torch

    from modelkit.io.gguf import Q80Encoder, q8_0_blocks

    for case in ("gauss", "zeros", "integers", "huge", "bf16"):
        x = torch.from_numpy(make_case(case, 4, 1024, seed=5)).reshape(-1)
        mine = quantize(x.numpy(), "Q8_0")
        np.testing.assert_array_equal(Q80Encoder(x.numel()).encode(x).numpy(), mine)
        np.testing.assert_array_equal(q8_0_blocks(x).numpy(), mine)


@pytest.mark.parametrize("name", MINE)
def test_shapes_and_bad_lengths(name: str) -> None:
    import torch

    ggml_type = GGML_TYPES[name]
    x = torch.from_numpy(make_case("weights", 3, 512, seed=1))
    blocks = quantize_blocks(x, name)
    assert blocks.dtype == torch.uint8
    assert tuple(blocks.shape) == (3 * 512 // ggml_type.block_size, ggml_type.block_bytes)
    assert dequantize_blocks(blocks, name).shape == (3 * 512,)
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_blocks(torch.zeros(ggml_type.block_size + 8), name)
