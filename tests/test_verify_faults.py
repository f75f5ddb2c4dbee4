"""Faults ``modelkit verify`` must catch (issue 21), injected into clean
tiny fixtures (tests/fault_fixtures.py), each caught by a named check with
exit code 1 through the console script's entry point (``modelkit.cli.main``,
in this process; ``--static-only``: no render); the clean files pass.

Reference-free faults (static checks): a dropped key, a zeroed tensor, a
NaN tensor, fp16 overflow. Against ``--reference`` (per-layer gates and the
VAE round trip): a LoRA baked at twice its scale (the reference is the
expected bake), a transposed square weight, q and k swapped, a zeroed VAE
encoder layer, a layer quantized with the wrong scale (modelkit int8 for
SD, ComfyUI scaled fp8 for Flux).

Every fault runs here on one family at least and every family on one fault
at least (the suite's time budget); bench/bench_verify_faults.py runs the
whole matrix, every fault on SD1, SDXL and Flux.1.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import pytest
import torch
from fault_fixtures import FLUX_QKV, UNET, build, verify_args

from modelkit.cli import main

# family -> the cases run here (the bench runs all four on all three)
# (SD1's clean casts: test_verify.py's fp16/int8/GGUF outputs, which run the
# gates too, and the clean GGUF of test_verify_gates.py)
MATRIX = {"flux": ("clean", "loose", "broken", "wrong_scale"),
          "sd1": ("broken", "wrong_scale"), "sdxl": ("loose",)}


def _cases(case: str) -> list[str]:
    return [fam for fam, cases in MATRIX.items() if case in cases]


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each family's files, then each case through ``modelkit verify``."""
    built, results = {}, {}
    for fam, cases in MATRIX.items():
        b = built[fam] = build(fam, tmp_path_factory.mktemp(f"faults-{fam}"), cases)
        for case in cases:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(verify_args(b, case))
            results[f"{fam}:{case}"] = (code, out.getvalue(), "")
    return {"built": built, "results": results}


def _report(faults: dict[str, Any], case: str, code: int) -> dict[str, Any]:
    got, out, err = faults["results"][case]
    assert got == code, (case, err, out[-2000:])
    return json.loads(out)


def _failed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"] if c["verdict"] == "fail"}


def _layer(report: dict[str, Any], key: str) -> dict[str, Any]:
    assert report["gates"] is not None
    return next(g for g in report["gates"]["layers"] if g["key"] == key)


def _expected(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """SNR and cosine as the gate measures them (float64), from the
    tensors as stored (cosine 0 against zeros)."""
    r, c = ref.double().reshape(-1), cand.double().reshape(-1)
    snr = 10 * math.log10(float(r @ r) / float((c - r) @ (c - r)))
    norms = float(r @ r) * float(c @ c)
    return snr, float(r @ c) / math.sqrt(norms) if norms else 0.0


@pytest.mark.parametrize("fam", _cases("clean"))
def test_clean_cast_passes(faults: dict[str, Any], fam: str) -> None:
    """No false alarm: the fp16 cast of the clean source passes every
    static check, its per-layer gates and the VAE round trip."""
    rep = _report(faults, f"{fam}:clean", 0)
    assert rep["verdict"] == "pass" and not _failed(rep)
    assert rep["gates"]["judged"] and rep["operation"] == "fp16"
    names = {c["name"] for c in rep["checks"]}
    assert names >= {"gate.f16", "vae.round_trip", "static.zeroed", "static.nan_inf"}
    # fp16 rounding of N(0, 1/fan_in) weights: ~73.5 dB (bench/calibrate_gates.py)
    big = [g for g in rep["gates"]["layers"] if g["elements"] >= 4096]
    assert big and all(70 < g["snr_db"] < 80 for g in big)
    vae = next(c for c in rep["checks"] if c["name"] == "vae.round_trip")
    assert vae["verdict"] == "pass" and 40 < vae["value"] < 100


@pytest.mark.parametrize("fam", _cases("loose"))
def test_reference_free_faults(faults: dict[str, Any], fam: str) -> None:
    """A dropped key, a zeroed tensor, a NaN tensor and fp16 overflow, each
    named by its own check (no reference needed)."""
    b, at = faults["built"][fam], faults["built"][fam]["at"]
    failed = _failed(_report(faults, f"{fam}:loose", 1))
    keys = "static.keys.transformer" if fam == "flux" else "static.keys.unet"
    assert set(failed) == {keys, "static.zeroed", "static.nan_inf"}
    drop = at["drop"].removeprefix(UNET) if fam == "flux" else at["drop"]
    assert failed[keys]["message"].endswith(f"1 missing: {drop}")
    assert failed["static.zeroed"]["message"].endswith(f"1 weight tensors are all zeros: "
                                                       f"{at['zero']}")
    nan = failed["static.nan_inf"]
    n = b["sd"][at["nan"]].numel()
    assert nan["value"] == n + 1  # the NaN tensor and the one overflowed weight
    assert f"{at['nan']} ({n})" in nan["message"] and f"{at['inf']} (1)" in nan["message"]
    assert "beyond the fp16 range (65504)" in nan["message"]


@pytest.mark.parametrize("fam", _cases("broken"))
def test_faults_against_the_expected_output(faults: dict[str, Any], fam: str) -> None:
    """A LoRA baked at 2x, a transposed weight and q/k swapped fail the f16
    gate by name with the figures the tensors give; the zeroed VAE encoder
    layer fails the round trip; every other layer passes."""
    b, at = faults["built"][fam], faults["built"][fam]["at"]
    rep = _report(faults, f"{fam}:broken", 1)
    failed = _failed(rep)
    assert set(failed) == {"gate.f16", "vae.round_trip", "static.zeroed"}
    assert rep["operation"] == "fp16"  # a cast with broken layers, not a merge
    qk = [FLUX_QKV] if fam == "flux" else [at["q"], at["k"]]
    broken = [*b["deltas"], at["square"], *qk, b["vae_layer"]]
    assert sorted(g["key"] for g in rep["gates"]["layers"] if not g["passed"]) == sorted(broken)
    for key in broken:
        snr, cos = _expected(b["expected"][key], b["bad"][key].half())
        layer = _layer(rep, key)
        assert layer["snr_db"] == pytest.approx(snr, abs=1e-6), key
        assert layer["cosine"] == pytest.approx(cos, abs=1e-9), key
    # the magnitudes the faults imply: a 5 % LoRA delta off by one delta ~26 dB;
    # W^T against W: -3 dB; q<->k: -3 dB (SD), -1.25 dB with Flux's v kept
    assert all(20 < _layer(rep, k)["snr_db"] < 30 for k in b["deltas"])
    assert abs(_layer(rep, at["square"])["cosine"]) < 0.3
    for key in qk:
        assert _layer(rep, key)["snr_db"] < 0
    assert b["vae_layer"] in failed["static.zeroed"]["message"]
    assert failed["vae.round_trip"]["value"] < 25
    assert "gate.f16" in failed and at["square"] in failed["gate.f16"]["message"]


@pytest.mark.parametrize("fam", _cases("wrong_scale"))
def test_layer_quantized_with_the_wrong_scale(faults: dict[str, Any], fam: str) -> None:
    """x2 restores 2W: an error of W itself, 0 dB at cosine 1; every other
    quantized layer passes its class's gate at the calibrated figures."""
    b = faults["built"][fam]
    rep = _report(faults, f"{fam}:wrong_scale", 1)
    cls = "fp8_e4m3_scaled" if fam == "flux" else "int8_channel"
    failed = _failed(rep)
    assert set(failed) == {f"gate.{cls}"}
    layer = _layer(rep, b["scaled"])
    assert abs(layer["snr_db"]) < 0.1 and layer["cosine"] > 0.999 and not layer["passed"]
    assert failed[f"gate.{cls}"]["message"].startswith(
        f"1 of {sum(g['format'] == cls for g in rep['gates']['layers'])} ")
    assert b["scaled"] in failed[f"gate.{cls}"]["message"]
    others = [g for g in rep["gates"]["layers"] if g["format"] == cls and g["key"] != b["scaled"]]
    assert others and all(g["passed"] and 25 < g["snr_db"] < 50 for g in others)
