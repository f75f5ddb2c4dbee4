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


# --- verify --probe block math against diffusers' own blocks -----------------------


def _block_weights(family: str, seed: int) -> dict[str, torch.Tensor]:
    """A small original-layout transformer of ``family`` in memory: seeded
    weights, RMS/q-k norm scales near 1 (as trained ones are)."""
    from importlib import import_module

    module = import_module(f"modelkit.arch.{family}")
    keys = module.transformer_keys(module.small(next(iter(module.VARIANTS.values()))))
    gen = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1
            else 0.05 * torch.randn(s, generator=gen) for k, s in keys.items()}


def _probe_out(state: dict[str, torch.Tensor], pattern: str, family: str, name: str
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Our probe block ``name`` (of ``family``'s group ``pattern``) on its
    seeded inputs: (the flattened output, the inputs)."""
    from modelkit.arch.registry import REGISTRY
    from modelkit.io.source import DerivedSource, tensor_info
    from modelkit.verify.probe_blocks import BLOCKS, Weights, make_inputs

    group = next(g for g in REGISTRY[family].probe if g.pattern == pattern)
    src = DerivedSource(family, {k: tensor_info(k, "F32", v.shape) for k, v in state.items()},
                        {}, state.__getitem__)
    prefix = name + "."
    w = Weights(src, prefix, {k[len(prefix):]: tuple(v.shape) for k, v in state.items()
                              if k.startswith(prefix)})
    inputs = make_inputs(group, w, seed=3)
    with torch.no_grad():
        return BLOCKS[group.kind](w, inputs, group), inputs


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.reshape(-1).shape and float(theirs.abs().max()) > 1e-2
    diff = float((ours - theirs.reshape(-1)).abs().max())
    assert diff < 2e-5 * max(1.0, float(theirs.abs().max())), diff
    return diff


def test_probe_blocks_equal_diffusers_blocks() -> None:
    """The probe's Chroma, Flux.2 and Z-Image blocks give what diffusers'
    block classes give with the same weights (converted by diffusers' own
    single-file converters; Chroma's, which assumes the full width, by
    hand) and inputs, RoPE left out on both sides: max abs diff < 2e-5."""
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.models.transformers import transformer_chroma as tc
    from diffusers.models.transformers import transformer_flux2 as tf2
    from diffusers.models.transformers import transformer_z_image as tz

    torch.manual_seed(0)
    diffs = {}
    # Z-Image: a modulated layer, a context refiner layer, the final layer
    z = _block_weights("z_image", 1)
    zd = sfu.convert_z_image_transformer_checkpoint_to_diffusers(dict(z))
    for name, mod in (("layers.1", True), ("context_refiner.0", False)):
        block = tz.ZImageTransformerBlock(0, 256, 2, 2, 1e-5, True, modulation=mod).eval()
        block.load_state_dict(_sub(zd, name + "."))
        ours, x = _probe_out(z, name.split(".")[0] + ".{n}", "z_image", name)
        with torch.no_grad():
            theirs = block(x["x"], None, None, adaln_input=x["adaln"] if mod else None)
        diffs[name] = _close(ours, theirs - x["x"])
    final = tz.FinalLayer(256, 64).eval()
    final.load_state_dict(_sub(zd, "all_final_layer.2-1."))
    ours, x = _probe_out(z, "final_layer", "z_image", "final_layer")
    with torch.no_grad():
        diffs["z final"] = _close(ours, final(x["x"], c=x["c"]))
    # Flux.2: a double and a single block, shared modulation given
    f = _block_weights("flux2", 2)
    fd = sfu.convert_flux2_transformer_checkpoint_to_diffusers(dict(f))
    double = tf2.Flux2TransformerBlock(256, 2, 128, mlp_ratio=3.0, eps=1e-6, bias=False).eval()
    double.load_state_dict(_sub(fd, "transformer_blocks.1."))
    ours, x = _probe_out(f, "double_blocks.{n}", "flux2", "double_blocks.1")
    with torch.no_grad():
        txt, img = double(x["img"], x["txt"], x["mod_img"], x["mod_txt"], None)
    diffs["flux2 double"] = _close(ours, torch.cat([(img - x["img"]).reshape(-1),
                                                    (txt - x["txt"]).reshape(-1)]))
    single = tf2.Flux2SingleTransformerBlock(256, 2, 128, mlp_ratio=3.0, eps=1e-6,
                                             bias=False).eval()
    single.load_state_dict(_sub(fd, "single_transformer_blocks.0."))
    ours, x = _probe_out(f, "single_blocks.{n}", "flux2", "single_blocks.0")
    with torch.no_grad():
        theirs = single(x["x"], None, x["mod"], None)
    diffs["flux2 single"] = _close(ours, theirs - x["x"])
    # Chroma: the approximator, a double and a single block
    c = _block_weights("chroma", 3)
    approx = tc.ChromaApproximator(64, 256, 128, n_layers=2).eval()
    approx.load_state_dict({k.replace("in_layer", "linear_1").replace("out_layer", "linear_2")
                            .replace(".scale", ".weight"): v
                            for k, v in _sub(c, "distilled_guidance_layer.").items()})
    ours, x = _probe_out(c, "distilled_guidance_layer", "chroma", "distilled_guidance_layer")
    with torch.no_grad():
        diffs["chroma approximator"] = _close(ours, approx(x["x"]))
    b = _sub(c, "double_blocks.0.")
    double = tc.ChromaTransformerBlock(256, 2, 128).eval()
    names = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
             "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
             "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
    sd = {f"{names[m]}.{p}": b[f"{m}.{p}"] for m in names for p in ("weight", "bias")}
    for s, (q, k, v, nq, nk) in (("img", ("to_q", "to_k", "to_v", "norm_q", "norm_k")),
                                 ("txt", ("add_q_proj", "add_k_proj", "add_v_proj",
                                          "norm_added_q", "norm_added_k"))):
        for p in ("weight", "bias"):
            for proj, part in zip((q, k, v), b[f"{s}_attn.qkv.{p}"].chunk(3), strict=True):
                sd[f"attn.{proj}.{p}"] = part
        sd[f"attn.{nq}.weight"] = b[f"{s}_attn.norm.query_norm.scale"]
        sd[f"attn.{nk}.weight"] = b[f"{s}_attn.norm.key_norm.scale"]
    double.load_state_dict(sd)
    ours, x = _probe_out(c, "double_blocks.{n}", "chroma", "double_blocks.0")
    temb = torch.cat([x["mod_img"].view(1, 6, 256), x["mod_txt"].view(1, 6, 256)], 1)
    with torch.no_grad():
        txt, img = double(x["img"], x["txt"], temb)
    diffs["chroma double"] = _close(ours, torch.cat([(img - x["img"]).reshape(-1),
                                                     (txt - x["txt"]).reshape(-1)]))
    b = _sub(c, "single_blocks.1.")
    single = tc.ChromaSingleTransformerBlock(256, 2, 128).eval()
    sd = {"proj_out.weight": b["linear2.weight"], "proj_out.bias": b["linear2.bias"],
          "attn.norm_q.weight": b["norm.query_norm.scale"],
          "attn.norm_k.weight": b["norm.key_norm.scale"]}
    for p in ("weight", "bias"):
        *qkv, mlp = b[f"linear1.{p}"].split([256, 256, 256, 1024])
        sd[f"proj_mlp.{p}"] = mlp
        sd.update({f"attn.to_{n}.{p}": t for n, t in zip("qkv", qkv, strict=True)})
    single.load_state_dict(sd)
    ours, x = _probe_out(c, "single_blocks.{n}", "chroma", "single_blocks.1")
    with torch.no_grad():
        theirs = single(x["x"], x["mod"].view(1, 3, 256))
    diffs["chroma single"] = _close(ours, theirs - x["x"])
    print("probe vs diffusers, max abs diff:", diffs)


def test_tiny_models_get_real_weights_while_transformers_no_init_weights_is_left_on() -> None:
    """transformers' ``no_init_weights`` swaps torch's initializers for
    no-ops; left entered (as a load in this suite once did), every model
    built after it held uninitialized memory and the renders decoded to
    NaN depending on test order. The tiny VAE built under it is the one
    built without it, and the swap is left as it was."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    from modelkit.verify.render_families import _vae

    before = torch.nn.init.normal_  # a swap an earlier test left on stays (it does in CI)
    clean = _vae(0).state_dict()
    assert torch.nn.init.normal_ is before
    leaked = no_init_weights()
    leaked.__enter__()
    try:
        swapped = torch.nn.init.normal_
        assert swapped.__module__ != "torch.nn.init"
        built = _vae(0).state_dict()
        assert torch.nn.init.normal_ is swapped
    finally:
        leaked.__exit__(None, None, None)
    assert torch.nn.init.normal_ is before
    assert set(built) == set(clean) and all(torch.equal(built[k], clean[k]) for k in clean)
    assert all(torch.isfinite(t).all() for t in built.values())
