"""``inspect`` on every fixture kind, tiny and full-size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelkit import testing as t
from modelkit.inspect.report import inspect_model
from modelkit.io.pickle import save_pickle_state_dict


def _d(path: Path) -> dict:
    return inspect_model(path).to_dict()


def _complete(d: dict, names: list[str]) -> None:
    assert sorted(d["components"]) == sorted(names)
    for name in names:
        c = d["components"][name]
        assert c["complete"] is True, (name, c)
        assert c["n_missing"] == c["n_unexpected"] == c["n_shape_mismatches"] == 0


def test_sd1_checkpoint(models: dict[str, Path]) -> None:
    d = _d(models["sd1"])
    assert (d["kind"], d["arch"], d["variant"]) == ("checkpoint", "sd1", None)
    assert d["prediction"]["type"] == "eps"
    assert d["schema"] == "modelkit.inspect/1"
    _complete(d, ["unet", "vae", "te"])
    assert d["components"]["unet"]["n_tensors"] == 686
    assert d["components"]["te"]["family"] == "CLIP, HF layout, width 32"
    assert d["has_ema"] is False
    assert d["extra_keys"] == {"schedule_buffers": 12}
    assert d["unknown_keys"] == []
    assert d["dtypes"] == {"F16": 1130, "F32": 12, "I64": 1}
    assert d["n_tensors"] == 1143
    assert d["size_bytes"] == models["sd1"].stat().st_size


def test_sd1_with_ema(models: dict[str, Path]) -> None:
    d = _d(models["sd1_ema"])
    assert d["has_ema"] is True and d["n_ema_tensors"] == 686
    # the parts table prune uses: decay and num_updates are EMA state (issue 9 item 11)
    assert d["extra_keys"] == {"ema": 688, "schedule_buffers": 12}
    assert any("EMA" in n for n in d["notes"])
    assert any("fp32" in n for n in d["notes"])


@pytest.mark.parametrize(("name", "variant"), [("sd1_inpaint", "inpaint"),
                                               ("sd1_pix2pix", "pix2pix")])
def test_variants(models: dict[str, Path], name: str, variant: str) -> None:
    d = _d(models[name])
    assert (d["arch"], d["variant"]) == ("sd1", variant)
    _complete(d, ["unet", "vae", "te"])


def test_sd2_prediction(models: dict[str, Path]) -> None:
    d = _d(models["sd2"])
    assert d["arch"] == "sd2"
    _complete(d, ["unet", "vae", "te"])
    assert d["prediction"]["type"] == "eps"
    assert "heuristic" in d["prediction"]["evidence"][0]
    d = _d(models["sd2_v_meta"])
    assert d["prediction"] == {"type": "v", "evidence": [
        "metadata modelspec.prediction_type = v"], "zero_terminal_snr": False}


def test_sd2_sidecar_yaml(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    t.write_checkpoint(path, "sd2")
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert _d(path)["prediction"]["type"] == "v"


def test_sdxl(models: dict[str, Path]) -> None:
    d = _d(models["sdxl"])
    assert (d["kind"], d["arch"]) == ("checkpoint", "sdxl")
    _complete(d, ["unet", "vae", "te1", "te2"])
    assert d["prediction"]["type"] == "eps"
    d = _d(models["sdxl_vpred"])
    assert d["prediction"]["type"] == "v"
    assert d["prediction"]["zero_terminal_snr"] is True
    assert d["extra_keys"] == {"prediction_markers": 2}


def test_sdxl_refiner(models: dict[str, Path]) -> None:
    d = _d(models["sdxl_refiner"])
    assert d["arch"] == "sdxl_refiner"
    _complete(d, ["unet", "vae", "te2"])


def test_unet_only(models: dict[str, Path]) -> None:
    d = _d(models["sdxl_unet"])
    assert (d["kind"], d["arch"]) == ("unet", "sdxl")
    _complete(d, ["unet"])
    assert any("diffusion_models" in n for n in d["notes"])
    d = _d(models["sd1_unet_prefixed"])
    assert (d["kind"], d["arch"]) == ("unet", "sd1")


def test_vae(models: dict[str, Path]) -> None:
    d = _d(models["vae"])
    assert (d["kind"], d["arch"]) == ("vae", "unknown")
    _complete(d, ["vae"])
    assert "cannot be told" in d["arch_evidence"][0]


@pytest.mark.parametrize(("name", "arch", "width"), [
    ("emb_sd1", "sd1", 768), ("emb_sd2", "sd2", 1024), ("emb_sdxl", "sdxl", [768, 1280]),
    ("emb_tiny", "unknown", 32)])
def test_embeddings(models: dict[str, Path], name: str, arch: str, width: object) -> None:
    d = _d(models[name])
    assert (d["kind"], d["arch"]) == ("embedding", arch)
    assert d["embedding"]["vectors"] == 4
    assert d["embedding"]["width"] == width
    assert d["prediction"]["type"] == "unknown"


def test_controlnet(tmp_path: Path) -> None:
    from modelkit.arch.keys import controlnet_keys

    path = tmp_path / "cn.safetensors"
    keys = {"control_model." + k: s for k, s in
            controlnet_keys(t.arch_spec("sd1").unet).items()}
    t.write_tensors(path, keys)
    d = _d(path)
    assert (d["kind"], d["arch"]) == ("controlnet", "sd1")


def test_missing_and_wrong_keys(tmp_path: Path) -> None:
    from modelkit.arch.keys import checkpoint_keys

    keys = checkpoint_keys(t.arch_spec("sdxl"))
    drop = "model.diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"
    del keys[drop]
    keys["first_stage_model.decoder.conv_out.weight"] = (3, 16, 1, 1)
    keys["some.stray.key"] = (2,)
    path = tmp_path / "broken.safetensors"
    t.write_tensors(path, keys)
    d = _d(path)
    unet, vae = d["components"]["unet"], d["components"]["vae"]
    assert unet["complete"] is False and unet["missing"] == [drop]
    assert vae["complete"] is False and vae["n_shape_mismatches"] == 1
    assert "decoder.conv_out.weight: [3, 16, 1, 1], expected [3, 16, 3, 3]" in \
        vae["shape_mismatches"][0]
    assert d["unknown_keys"] == ["some.stray.key"]
    assert any("unet is incomplete" in n for n in d["notes"])


def test_broken_position_ids(tmp_path: Path) -> None:
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    path = tmp_path / "merged.safetensors"
    t.write_checkpoint(path, "sd1")
    from modelkit.testing import write_tensors

    ids = (torch.arange(77, dtype=torch.float32) * 0.99999).half().reshape(1, 77)
    from modelkit.io.header import read_header

    keys = {k: i.shape for k, i in read_header(path).tensors.items()}
    write_tensors(tmp_path / "broken.safetensors", keys, overrides={key: ids})
    d = _d(tmp_path / "broken.safetensors")
    assert any("position_ids is stored as F16" in n for n in d["notes"])
    write_tensors(tmp_path / "shifted.safetensors", keys,
                  overrides={key: torch.arange(77).flip(0).reshape(1, 77)})
    assert any("broken CLIP position ids" in n for n in _d(tmp_path / "shifted.safetensors")
               ["notes"])


@pytest.mark.parametrize(("arch", "ema", "dtype", "comps"), [
    ("sd1", True, "F32", ["unet", "vae", "te"]),
    ("sdxl", False, "F16", ["unet", "vae", "te1", "te2"]),
    ("sd2", False, "F16", ["unet", "vae", "te"]),
    ("sdxl_refiner", False, "F16", ["unet", "vae", "te2"]),
])
def test_full_size_layouts(tmp_path: Path, arch: str, ema: bool, dtype: str,
                           comps: list[str]) -> None:
    path = t.write_sparse_checkpoint(tmp_path / f"{arch}.safetensors", arch, ema=ema,
                                     dtype=dtype)
    d = _d(path)
    assert (d["kind"], d["arch"], d["variant"]) == ("checkpoint", arch, None)
    _complete(d, comps)
    assert d["has_ema"] is ema
    if arch == "sd1":
        assert d["size_bytes"] == pytest.approx(7.70e9, rel=1e-3)
        assert d["components"]["unet"]["n_params"] == 859_520_964
        assert d["components"]["te"]["family"] == "CLIP-L"
    if arch == "sdxl":
        assert d["components"]["te2"]["family"] == "OpenCLIP-bigG"
        assert d["n_params"] == pytest.approx(3.469e9, rel=1e-3)
        assert d["dtypes"] == {"F16": 2514, "I64": 1}


def test_full_size_sd15_inpaint(tmp_path: Path) -> None:
    path = t.write_sparse_checkpoint(tmp_path / "inp.safetensors", "sd1", variant="inpaint")
    d = _d(path)
    assert (d["arch"], d["variant"]) == ("sd1", "inpaint")
    assert d["components"]["unet"]["complete"] is True


def test_ckpt_input(tmp_path: Path, models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "m.ckpt"
    save_pickle_state_dict(load_file(models["sd1"]), path, {"global_step": 1})
    d = _d(path)
    assert (d["file_format"], d["kind"], d["arch"]) == ("pickle", "checkpoint", "sd1")
    _complete(d, ["unet", "vae", "te"])
