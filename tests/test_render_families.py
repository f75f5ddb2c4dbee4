"""Tiny renders of Flux.1, SD3 and Qwen-Image through diffusers' pipelines,
the transformer loaded from an original-layout single file through
modelkit's key maps (arch/to_diffusers.py); the maps checked against
diffusers' own single-file converters, bit for bit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.arch import qwen_image, sd3, to_diffusers
from modelkit.arch.configs import UNET_PREFIX
from modelkit.io.open import open_source
from modelkit.testing import flux_config, write_flux, write_tensors
from modelkit.verify.render_families import render_family

SD35 = replace(sd3.VARIANTS["sd3.5-medium"], depth=2, pos_embed_max=16, attn2_layers=1,
               adm_in=64, context_in=64)  # 2 heads of 64, x_block.attn2 in block 0
QWEN = qwen_image.small(qwen_image.QwenImageConfig())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("families")
    write_flux(d / "flux.safetensors", prefixed=True, dtype="F32")
    write_tensors(d / "sd3.safetensors",
                  {UNET_PREFIX + k: s for k, s in sd3.transformer_keys(SD35).items()},
                  dtype="F32")
    write_tensors(d / "qwen_image.safetensors",
                  {UNET_PREFIX + k: s for k, s in qwen_image.transformer_keys(QWEN).items()},
                  dtype="F32")
    return {f: d / f"{f}.safetensors" for f in ("flux", "sd3", "qwen_image")}


def _mapped(state: dict[str, torch.Tensor], key_map: to_diffusers.KeyMap
            ) -> dict[str, torch.Tensor]:
    out = {}
    for target, piece in key_map.items():
        t = state[UNET_PREFIX + piece.source]
        t = t[piece.rows[0]:piece.rows[1]] if piece.rows else t
        out[target] = torch.cat(t.chunk(2)[::-1]) if piece.swap else t
    return out


def _row_coded(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each tensor's value says which key and which row it is (key number x
    32768 + row, exact in float32), broadcast along the other axes without
    allocating: full-width Flux in a few MB."""
    out = {}
    for i, (k, shape) in enumerate(sorted(keys.items())):
        rows = torch.arange(shape[0], dtype=torch.float32) + 32768.0 * i
        out[UNET_PREFIX + k] = rows.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_key_maps_equal_diffusers_single_file_converters(files: dict[str, Path],
                                                         family: str) -> None:
    from diffusers.loaders import single_file_utils as sfu

    from modelkit.arch import flux

    if family == "flux":  # diffusers' converter assumes Flux's full width, 3072
        cfg = flux_config("dev", hidden=3072, depth=1, single=1)
        state = _row_coded(flux.transformer_keys(cfg))
        theirs = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(state))
        ours = _mapped(state, to_diffusers.flux_map(cfg))
    else:
        src = open_source(files[family])
        state = {k: src.get(k) for k in src.infos}
        theirs = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
        ours = _mapped(state, to_diffusers.sd3_map(SD35))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image"])
def test_tiny_render_from_an_original_layout_file(files: dict[str, Path], family: str) -> None:
    first = render_family(files[family], family, "a red fox in the snow", seed=1)
    other = render_family(files[family], family, "a lighthouse on an island", seed=1)
    again = render_family(files[family], family, "a red fox in the snow", seed=1)
    n_keys = {"flux": len(to_diffusers.flux_map(flux_config("dev"))),
              "sd3": len(to_diffusers.sd3_map(SD35)),
              "qwen_image": len(to_diffusers.qwen_image_map(QWEN))}[family]
    assert first.loaded == n_keys
    assert first.image.shape == (32, 32, 3) and np.isfinite(first.latents).all()
    assert first.image.std() > 0.01  # not flat
    assert np.array_equal(first.image, again.image)  # deterministic
    moved = np.linalg.norm(first.latents - other.latents) / np.linalg.norm(first.latents)
    assert moved > 1e-3  # the prompt reaches the transformer


def test_render_refuses_an_incomplete_transformer(files: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from modelkit.errors import ModelkitError

    src = open_source(files["qwen_image"])
    keys = {k: tuple(i.shape) for k, i in src.infos.items()
            if not k.endswith("transformer_blocks.1.attn.to_k.weight")}
    write_tensors(tmp_path / "cut.safetensors", keys, dtype="F32")
    with pytest.raises(ModelkitError, match=r"transformer_blocks\.1\.attn\.to_k\.weight"):
        render_family(tmp_path / "cut.safetensors", "qwen_image", "x")


# --- convert --layout's maps (tests/test_layout_convert.py has the round trips) ---


def _row_coded_rows(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each tensor's value says which key and which row it is (exact in
    float32); one column: the converters only move rows."""
    return {k: (torch.arange(shape[0], dtype=torch.float32) + 32768.0 * i).view(
        -1, *[1] * (len(shape) - 1)) for i, (k, shape) in enumerate(sorted(keys.items()))}


@pytest.mark.parametrize("family", ["chroma", "flux2", "z_image", "wan"])
def test_layout_maps_equal_diffusers_single_file_converters(family: str) -> None:
    """The maps of convert --layout (arch/layouts.py) for the families
    rendered nowhere here, bit for bit against diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu

    from modelkit.arch import chroma, flux2, layouts, wan, z_image

    module, cfg, convert = {
        # diffusers' Chroma converter assumes the full width (3072, MLP 4x)
        "chroma": (chroma, replace(chroma.VARIANTS["chroma"], depth=1, depth_single_blocks=1,
                                   approximator_layers=2),
                   sfu.convert_chroma_transformer_checkpoint_to_diffusers),
        "flux2": (flux2, flux2.small(flux2.VARIANTS["dev"]),
                  sfu.convert_flux2_transformer_checkpoint_to_diffusers),
        "z_image": (z_image, z_image.small(z_image.VARIANTS["z-image"]),
                    sfu.convert_z_image_transformer_checkpoint_to_diffusers),
        "wan": (wan, wan.small(wan.VARIANTS["i2v-14b"]),
                sfu.convert_wan_transformer_to_diffusers),
    }[family]
    keys = {k: (s[0], *[1] * (len(s) - 1))
            for k, s in module.transformer_keys(cfg, "original").items()}
    state = _row_coded_rows(keys)
    theirs = convert(dict(state))
    plan = layouts.to_diffusers(layouts.family_map(family, keys, "original", "x"), keys, "x")
    ours = {k: torch.cat([state[s.key][s.start:s.stop] for s in t.segments])
            for k, t in plan.items()}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
