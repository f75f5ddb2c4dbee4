"""export-gguf for Chroma, Flux.2 and Z-Image: the full-size plan of each
family (hand-counted from the lcpp.patch keep-lists and mix rules), every
tensor's type on small configs against an independent rule, small files
that gguf-py reads back to the input (bit-exact for float tensors, to
modelkit's own dequantizer for quantized ones) with the
``general.architecture`` ComfyUI-GGUF's loader accepts, and the runner on
a Chroma file."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.arch import chroma, flux2, z_image
from modelkit.arch.keys import KeyShapes

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

SMALL: dict[str, KeyShapes] = {
    "chroma": chroma.transformer_keys(chroma.small(chroma.VARIANTS["chroma"])),
    "flux2": flux2.transformer_keys(flux2.small(flux2.VARIANTS["dev"])),
    "z_image": z_image.transformer_keys(z_image.small(z_image.VARIANTS["z-image"])),
}
# lcpp.patch keep-lists, written out again here (LLM_ARCH_FLUX with the
# auto_convert branch's Flux.2 lines; LLM_ARCH_LUMINA2)
FLUX_KEEP = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
KEEP = {"chroma": FLUX_KEEP,
        "flux2": (*FLUX_KEEP, "single_stream_modulation.", "double_stream_modulation_"),
        "z_image": ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.",
                    "context_refiner.", "noise_refiner.")}
ARCH = {"chroma": "flux", "flux2": "flux", "z_image": "lumina2"}
BLOCK = {"Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def plans(family: str, qtype: str, keys: KeyShapes) -> dict[str, Any]:
    from modelkit.convert.gguf import POLICIES, plan_tensors
    from modelkit.io.source import tensor_info

    infos = {k: tensor_info(k, "BF16", s) for k, s in keys.items()}
    return {p.key: p for p in plan_tensors(infos, POLICIES[family], qtype)}


def expected(family: str, key: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type ComfyUI-GGUF's convert.py + patched llama-quantize give a
    BF16 tensor, by hand: 1-D, small and pad tokens F32, keep-list BF16,
    fused qkv / feed-forward down raised under Q4_K_M, F16 where the row
    does not fill whole blocks, else the file type."""
    if len(shape) < 2 or math.prod(shape) <= 1024 or key.endswith("_pad_token"):
        return "F32"
    if any(p in key for p in KEEP[family]):
        return "BF16"
    t = {"q8_0": "Q8_0", "q4_k_m": "Q4_K"}[qtype]
    if qtype == "q4_k_m" and key.endswith(("attn.qkv.weight", "attention.qkv.weight")):
        t = "Q5_K"
    elif qtype == "q4_k_m" and key.endswith("feed_forward.w2.weight"):
        t = "Q6_K"
    return "F16" if shape[-1] % BLOCK[t] else t


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_small_config_types_follow_the_patch(family: str, qtype: str) -> None:
    keys = SMALL[family]
    got = plans(family, qtype, keys)
    for key, shape in keys.items():
        assert got[key].ggml_type == expected(family, key, shape, qtype), (key, shape)
    # every branch of the rule is exercised on these shapes
    assert {"F32", "BF16"} <= {p.ggml_type for p in got.values()}


def test_full_size_plans_hand_counted() -> None:
    """Full-size headers (no data: only the plan is made) through plan_gguf (detection, policy,
    general.architecture). Chroma: 19 double blocks x 8 + 38 single x 2 +
    12 approximator Linears = 240 quantized, its in_proj (64 wide) F16 under
    k-quants, 38 fused qkv raised; Flux.2: 8 x 8 + 48 x 2 = 160, the three
    shared modulations kept; Z-Image: 30 layers x 6 = 180 (both refiners
    kept), 30 qkv to Q5_K and 30 w2 to Q6_K under Q4_K_M."""
    from collections import Counter

    from modelkit.convert.gguf import plan_gguf
    from modelkit.io.source import DerivedSource, tensor_info

    def header(family: str) -> DerivedSource:
        module = {"chroma": chroma, "flux2": flux2, "z_image": z_image}[family]
        keys = module.transformer_keys(next(iter(module.VARIANTS.values())))
        infos = {k: tensor_info(k, "BF16", s) for k, s in keys.items()}
        return DerivedSource(family, infos, {}, lambda k: pytest.fail(f"read {k}"))

    want = {"chroma": ({"Q4_K": 201, "Q5_K": 38, "F16": 1, "BF16": 3}, 240),
            "flux2": ({"Q4_K": 144, "Q5_K": 16, "BF16": 11}, 160),
            "z_image": ({"Q4_K": 120, "Q5_K": 30, "Q6_K": 30, "BF16": 28}, 180)}
    for family, (types, n_quant) in want.items():
        source = header(family)
        payload = plan_gguf(source, qtype="q4_k_m")
        assert payload.arch == ARCH[family]
        got = Counter(p.ggml_type for p in payload.plans)
        n_f32 = sum(1 for k, s in source.infos.items() if len(s.shape) < 2
                    or math.prod(s.shape) <= 1024 or k.endswith("_pad_token"))
        assert got == {**types, "F32": n_f32}, family
        assert sum(p.quantized for p in payload.plans) == n_quant - types.get("F16", 0)
        q8 = plan_gguf(source, qtype="q8_0")
        assert sum(p.ggml_type == "Q8_0" for p in q8.plans) == n_quant
    # the keys ComfyUI-GGUF's convert.py detects these files by (ModelFlux,
    # ModelLumina2: keys_detect), so its files carry the architecture we write
    detect = {"chroma": ("double_blocks.0.img_attn.proj.weight",),
              "flux2": ("double_blocks.0.img_attn.proj.weight",),
              "z_image": ("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight")}
    for family, keys in detect.items():
        assert set(keys) <= set(header(family).infos), family
    z = {p.key: p for p in plan_gguf(header("z_image"), qtype="q4_k_m").plans}
    assert z["x_pad_token"].ggml_type == "F32" and z["x_pad_token"].shape == (1, 3840)
    assert z["noise_refiner.0.attention.qkv.weight"].ggml_type == "BF16"


SUBSETS = {  # few quantized tensors each, so that encoding stays fast
    "chroma": ("img_in.weight", "distilled_guidance_layer.in_proj.weight",
               "distilled_guidance_layer.norms.0.scale",
               "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"),
    "flux2": ("single_stream_modulation.lin.weight", "double_blocks.0.txt_attn.qkv.weight",
              "double_blocks.0.img_mlp.0.weight", "single_blocks.1.norm.key_norm.scale"),
    "z_image": ("x_pad_token", "cap_embedder.0.weight", "context_refiner.0.attention.qkv.weight",
                "layers.0.attention.qkv.weight", "layers.0.feed_forward.w1.weight",
                "layers.1.adaLN_modulation.0.weight"),
}


@pytest.mark.parametrize("family", list(SUBSETS))
def test_written_file_reads_back(tmp_path: Path, family: str) -> None:
    from modelkit.convert.gguf import POLICIES, plan_tensors
    from modelkit.io.ggml import dequantize_blocks
    from modelkit.io.gguf import planned_payload
    from modelkit.io.source import DerivedSource, tensor_info
    from modelkit.io.write import OutputSpec, write

    gen = torch.Generator().manual_seed(7)
    tensors = {k: (torch.randn(SMALL[family][k], generator=gen) * 0.05).to(torch.bfloat16)
               for k in SUBSETS[family]}
    infos = {k: tensor_info(k, "BF16", v.shape) for k, v in tensors.items()}
    source = DerivedSource(family, infos, {}, tensors.__getitem__)
    payload = planned_payload(source, plan_tensors(infos, POLICIES[family], "q4_k_m"),
                              qtype="q4_k_m", arch=POLICIES[family].arch)
    path = tmp_path / f"{family}.gguf"
    write(payload, OutputSpec(path, "gguf", True))
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == ARCH[family]
    seen = set()
    for t in reader.tensors:
        x = tensors[t.name].float()
        assert t.tensor_type.name == expected(family, t.name, tuple(x.shape), "q4_k_m")
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(x.shape)
        raw = np.asarray(t.data)
        theirs = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1)
        if t.tensor_type.name.startswith("Q"):
            mine = dequantize_blocks(torch.from_numpy(raw.reshape(-1, raw.shape[-1]).copy()),
                                     t.tensor_type.name).numpy()
            np.testing.assert_array_equal(mine, theirs, err_msg=t.name)
            rel = np.linalg.norm(theirs - x.reshape(-1).numpy()) / np.linalg.norm(x)
            bound = {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}[t.tensor_type.name]
            assert 1e-3 < rel < bound, (t.name, rel)  # Q4_K: about 21 dB on Gaussian data
        else:
            np.testing.assert_array_equal(theirs, x.reshape(-1).numpy(), err_msg=t.name)
        seen.add(t.tensor_type.name)
    assert seen & {"Q4_K", "Q5_K", "Q6_K"} and seen & {"F32", "BF16"}


def test_runner_exports_chroma(tmp_path: Path) -> None:
    """The export through the runner on a small Chroma file (original
    layout): 'flux', the approximator quantized, its norms F32; the
    diffusers layout is refused in one line, nothing written."""
    from modelkit import testing as t
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run
    from modelkit.errors import ModelkitError

    cfg = replace(chroma.small(chroma.VARIANTS["chroma"]), depth=1, depth_single_blocks=1,
                  approximator_layers=1)
    src = tmp_path / "chroma.safetensors"
    t.write_tensors(src, chroma.transformer_keys(cfg), dtype="BF16", seed=3)
    out = tmp_path / "c.gguf"
    details = run(Recipe.op("convert", src, output=out).with_output(
        format="gguf", quant="q8_0")).to_dict()["output_details"]
    assert details["general.architecture"] == "flux"
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["distilled_guidance_layer.layers.0.in_layer.weight"] == "Q8_0"
    assert types["distilled_guidance_layer.norms.0.scale"] == "F32"
    assert types["img_in.weight"] == "BF16"
    diffusers = t.write_sparse_dit(tmp_path / "chroma-d.safetensors", "chroma",
                                   layout="diffusers", tiny=True)
    recipe = Recipe.op("convert", diffusers, output=tmp_path / "d.gguf").with_output(
        format="gguf", quant="q4_k_m")
    with pytest.raises(ModelkitError, match="diffusers layout") as err:
        run(recipe)
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.glob("*.gguf")] == ["c.gguf"]
