"""Comparing two models per component and per block."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from modelkit import testing as t
from modelkit.errors import Cancelled
from modelkit.inspect.compare import compare_models
from modelkit.io.reader import open_model


def test_identical_models(models: dict[str, Path]) -> None:
    with open_model(models["sd1"]) as a, open_model(models["sd1"]) as b:
        rep = compare_models(a, b)
    assert rep.identical and rep.overall.relative_l2 == 0.0
    assert rep.overall.unchanged_share == 1.0
    assert {"unet", "vae", "te", "other"} == set(rep.components)  # other: schedule buffers
    assert "IN00" in rep.blocks and "OUT11" in rep.blocks and "VAE" in rep.blocks


def test_relative_l2_per_component_matches_hand_sums(models: dict[str, Path]) -> None:
    a, b = load_file(models["sd1"]), load_file(models["sd1_b"])
    with open_model(models["sd1"]) as sa, open_model(models["sd1_b"]) as sb:
        rep = compare_models(sa, sb)
    vae = [k for k in a if k.startswith("first_stage_model.") and a[k].is_floating_point()]
    diff = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in vae)
    ref = sum(float((a[k].double() ** 2).sum()) for k in vae)
    assert math.isclose(rep.components["vae"].relative_l2, math.sqrt(diff / ref),
                        rel_tol=1e-5)
    assert rep.components["vae"].n_unchanged == 0
    assert not rep.identical


def test_lists_keys_only_in_one_and_mismatches(tmp_path: Path, models: dict[str, Path]
                                               ) -> None:
    x, y = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    t.write_tensors(x, {"a": (2, 2), "b": (3,), "c": (4,)})
    t.write_tensors(y, {"a": (2, 2), "b": (4,), "d": (1,)})
    with open_model(x) as sx, open_model(y) as sy:
        rep = compare_models(sx, sy, arch="unknown")
    assert rep.only_a == ["c"] and rep.only_b == ["d"] and rep.mismatched == ["b"]
    assert rep.overall.n_tensors == 1 and not rep.blocks
    d = rep.to_dict()
    assert d["n_only_a"] == 1 and d["identical"] is False


def test_cancel_stops_before_the_next_tensor(models: dict[str, Path]) -> None:
    cancel = threading.Event()
    seen = []

    def progress(p: object) -> None:
        seen.append(p)
        cancel.set()

    with open_model(models["sd1"]) as a, open_model(models["sd1_b"]) as b, \
            pytest.raises(Cancelled):
        compare_models(a, b, progress=progress, cancel=cancel)
    assert len(seen) == 1
