"""The golden files of ggml's reference quantizer (tests/data/ggml/, made by
bench/ggml_ref/make_golden.py) and the helpers both GGML test files use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelkit.io.ggml import GGML_TYPES, quantize_blocks

GOLDEN = Path(__file__).parent / "data" / "ggml"


def golden(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The golden file of GGML type ``name``: (its meta, ggml's bytes per case)."""
    with np.load(GOLDEN / f"{name.lower()}.npz") as data:
        meta = json.loads(str(data["meta"]))
        cases = {k[5:]: data[k] for k in data.files if k.startswith("case_")}
    return meta, cases


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    """modelkit's blocks of the float32 array ``x``."""
    import torch

    return quantize_blocks(torch.from_numpy(x), name).numpy()


def differ(mine: np.ndarray, ref: np.ndarray, name: str) -> list[int]:
    """The indices of the blocks in which ``mine`` and ``ref`` differ."""
    nbytes = GGML_TYPES[name].block_bytes
    return np.flatnonzero((mine.reshape(-1, nbytes) != ref.reshape(-1, nbytes)).any(axis=1)
                          ).tolist()
