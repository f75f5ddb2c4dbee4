"""Key tables generated from configs match the real models' key counts and
parameter counts (figures from arenasys/stable-diffusion-webui-model-toolkit's
component lists, ``components/*.txt``)."""

from __future__ import annotations

import pytest

from modelkit.arch.configs import ARCHS, TINY
from modelkit.arch.keys import (
    checkpoint_keys,
    component_keys,
    controlnet_keys,
    ema_key,
    n_params,
    unet_keys,
)

# (keys, millions of params) per component of the real files, computed from the
# key and shape lists of arenasys/stable-diffusion-webui-model-toolkit
# (``components/*.txt``)
REAL = {
    "sd1": {"unet": (686, 859.52), "vae": (248, 83.65), "te": (196, 123.06)},
    "sd2": {"unet": (686, 865.91), "te": (294, 354.03)},
    "sdxl": {"unet": (1680, 2567.46), "te1": (196, 123.06), "te2": (390, 694.66)},
    "sdxl_refiner": {"unet": (1220, 2259.53)},
}


@pytest.mark.parametrize("arch", sorted(REAL))
def test_full_size_key_and_param_counts(arch: str) -> None:
    comps = component_keys(ARCHS[arch])
    for comp, (n_keys, mparams) in REAL[arch].items():
        assert len(comps[comp]) == n_keys, comp
        assert round(n_params(comps[comp]) / 1e6, 2) == mparams, comp


def test_known_shapes() -> None:
    sd1 = unet_keys(ARCHS["sd1"].unet)
    assert sd1["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert sd1["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert sd1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert sd1["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert sd1["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert sd1["out.2.weight"] == (4, 320, 3, 3)
    sdxl = unet_keys(ARCHS["sdxl"].unet)
    assert sdxl["label_emb.0.0.weight"] == (1280, 2816)
    assert sdxl["input_blocks.4.1.proj_in.weight"] == (640, 640)
    assert "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight" in sdxl
    assert "input_blocks.9.0.in_layers.0.weight" not in sdxl
    ref = unet_keys(ARCHS["sdxl_refiner"].unet)
    assert ref["input_blocks.0.0.weight"] == (384, 4, 3, 3)
    assert ref["label_emb.0.0.weight"] == (1536, 2560)


def test_full_checkpoint_sizes() -> None:
    # SD1 fp32 with EMA is the well-known 7.7 GB file; SDXL fp16 is 6.94 GB
    sd1 = checkpoint_keys(ARCHS["sd1"], ema=True)
    assert n_params(sd1) * 4 == pytest.approx(7.70e9, rel=1e-3)
    assert n_params(checkpoint_keys(ARCHS["sdxl"])) * 2 == pytest.approx(6.938e9, rel=1e-3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_has_the_same_keys(arch: str) -> None:
    assert list(checkpoint_keys(TINY[arch], ema=True)) == list(
        checkpoint_keys(ARCHS[arch], ema=True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ema_names_are_unique(arch: str) -> None:
    keys = unet_keys(ARCHS[arch].unet)
    assert len({ema_key(k) for k in keys}) == len(keys)
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_controlnet_sd15_params() -> None:
    keys = controlnet_keys(ARCHS["sd1"].unet)
    assert n_params(keys) == 361_279_120
    assert keys["input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert keys["zero_convs.11.0.weight"] == (1280, 1280, 1, 1)
