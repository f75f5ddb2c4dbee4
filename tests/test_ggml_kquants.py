"""GGML Q4_K, Q5_K and Q2_K quantizers (modelkit.io.ggml.k_qkx2): the bytes
of ggml's reference ``quantize_<type>`` (golden files made by
bench/ggml_ref/make_golden.py) on seeded corner cases, across chunk and
padding boundaries, on several threads; read back by gguf-py with the
round-trip error ggml's reference has on Gaussian data."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from modelkit.io.ggml import GGML_TYPES, dequantize_blocks, k_qkx2, quantize_blocks
from modelkit.testing.ggml_cases import make_case
from tests.ggml_support import differ, golden, quantize

gguf = pytest.importorskip("gguf")

TYPES = ["Q4_K", "Q5_K", "Q2_K"]
# relative RMSE of ggml's reference on Gaussian data (shared/reference/quant.md)
GAUSS_REL_RMSE = {"Q5_K": 0.036, "Q4_K": 0.071, "Q2_K": 0.297}





def _golden_input_and_bytes(name: str, only: tuple[str, ...] = ()
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The golden cases of ``name`` (all, or ``only``) as one input and
    ggml's bytes for it."""
    meta, cases = golden(name)
    names = sorted(only or cases)
    xs = [make_case(c, meta["rows"], meta["cols"], meta["seed"]) for c in names]
    refs = [cases[c] for c in names]
    return np.concatenate(xs), np.concatenate(refs)


@pytest.mark.parametrize("name", TYPES)
def test_chunks_and_padding_keep_the_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 cases x 8 blocks in chunks of 5 blocks: every chunk but the last is
    # padded to whole SIMD column groups, and its searcher's buffers are reused
    x, ref = _golden_input_and_bytes(name)
    monkeypatch.setattr(k_qkx2, "CHUNK_WEIGHTS", 5 * 256)
    assert not differ(quantize(x, name), ref, name)


@pytest.mark.parametrize("name", TYPES)
def test_several_intra_op_threads_fall_back_to_the_exact_sum(name: str) -> None:
    import torch

    x, ref = _golden_input_and_bytes(name, ("weights", "constant", "one_nonzero"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mine = quantize(x, name)
    finally:
        torch.set_num_threads(before)
    assert not differ(mine, ref, name)


def test_two_threads_at_once_each_get_their_bytes() -> None:
    # each thread has its own buffers (the export may quantize two tensors at once)
    inputs = {name: _golden_input_and_bytes(name) for name in ("Q4_K", "Q2_K")}
    out: dict[str, np.ndarray] = {}

    def work(name: str) -> None:
        for _ in range(3):
            out[name] = quantize(inputs[name][0], name)

    threads = [threading.Thread(target=work, args=(name,)) for name in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (_, ref) in inputs.items():
        assert not differ(out[name], ref, name)


@pytest.mark.parametrize("name", TYPES)
def test_read_back_by_gguf_py(name: str) -> None:
    import torch

    x = make_case("gauss", 32, 2048, seed=3)
    blocks = quantize(x, name)
    ref = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType[name])
    back = getattr(k_qkx2, f"dequantize_{name.lower()}")  # re-exported beside the quantizer
    mine = back(torch.from_numpy(blocks)).numpy()
    np.testing.assert_array_equal(mine.view(np.uint32), ref.reshape(-1).view(np.uint32))
    np.testing.assert_array_equal(dequantize_blocks(torch.from_numpy(blocks), name).numpy(),
                                  mine)
    rel = float(np.linalg.norm(ref.reshape(x.shape) - x) / np.linalg.norm(x))
    assert rel == pytest.approx(GAUSS_REL_RMSE[name], rel=0.03)


@pytest.mark.parametrize("name", TYPES)
def test_shapes_and_bad_lengths(name: str) -> None:
    import torch

    ggml_type = GGML_TYPES[name]
    x = torch.from_numpy(make_case("weights", 3, 512, seed=1))
    blocks = quantize_blocks(x, name)
    assert blocks.dtype == torch.uint8
    assert tuple(blocks.shape) == (3 * 512 // 256, ggml_type.block_bytes)
    # a non-contiguous input and a bfloat16 one quantize their float32 values
    wide = torch.from_numpy(make_case("weights", 512, 6, seed=1)).t()
    assert torch.equal(quantize_blocks(wide, name), quantize_blocks(wide.contiguous(), name))
    bf = x.to(torch.bfloat16)
    assert torch.equal(quantize_blocks(bf, name), quantize_blocks(bf.float(), name))
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_blocks(torch.zeros(256 + 32), name)


def test_ggml_reference_on_fresh_seeds() -> None:
    # beside the golden files: when bench/ggml_ref/build.sh has been run here
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench" / "ggml_ref"))
    try:
        import ggml_ref
    finally:
        sys.path.pop(0)
    if not ggml_ref.available():
        pytest.skip("ggml's reference is not built (bench/ggml_ref/build.sh)")
    for seed, case in enumerate(("weights", "student_t2", "outliers", "bf16")):
        x = make_case(case, 4, 2048, seed=100 + seed)
        for name in TYPES:
            ref = ggml_ref.quantize(x, name.lower())
            assert not differ(quantize(x, name), ref, name), (name, case)
