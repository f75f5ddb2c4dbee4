"""Families ``inspect`` names (family, variant, layout) while the other
commands refuse them: SD3/SD3.5, from full-size sparse headers, through the
command line's own function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkit.arch import registry
from modelkit.inspect.report import inspect_model
from modelkit.testing import (
    write_sparse_dit,
    write_sparse_flux,
    write_sparse_qwen_image,
    write_sparse_sd3,
    write_sparse_wan,
)
from tests.cli_support import run_here


def _inspect_json(paths: dict[str, Path], cwd: Path) -> dict[str, dict]:
    res = run_here({n: ["inspect", "--json", str(p)] for n, p in paths.items()}, cwd)
    out = {}
    for name, (code, stdout, stderr) in res.items():
        assert code == 0, stderr
        d = json.loads(stdout)
        out[name] = d[0] if isinstance(d, list) else d
    return out


# --- SD3 / SD3.5 ------------------------------------------------------------------

SD3_CASES = [
    # variant, prefixed, all-in-one, parameters of the MMDiT (billions)
    ("sd3-medium", False, False, 2.08),
    ("sd3-medium", True, False, 2.08),
    ("sd3.5-medium", False, False, 2.47),
    ("sd3.5-large", True, False, 8.15),
    ("sd3-medium", False, True, 2.08),
]


def test_inspect_names_sd3_family_variant_and_layout(tmp_path: Path) -> None:
    paths = {f"{v}-{p}-{a}": write_sparse_sd3(tmp_path / f"{v}-{p}-{a}.safetensors", v,
                                              prefixed=p, all_in_one=a)
             for v, p, a, _ in SD3_CASES}
    got = _inspect_json(paths, tmp_path)
    for variant, prefixed, aio, billions in SD3_CASES:
        d = got[f"{variant}-{prefixed}-{aio}"]
        assert (d["arch"], d["variant"], d["layout"]) == ("sd3", variant, "original")
        assert d["kind"] == ("checkpoint" if aio else "unet")
        assert d["unknown_keys"] == []
        unet = d["components"]["unet"]
        assert unet["family"] == "SD3 transformer"
        assert unet["prefix"] == ("model.diffusion_model." if prefixed or aio else "")
        assert abs(unet["n_params"] / 1e9 - billions) < 0.01
        if aio:
            assert set(d["components"]) == {"unet", "vae", "clip_l", "clip_g", "t5xxl"}
            assert d["components"]["vae"]["prefix"] == "first_stage_model."
        assert not any("recognised only" in n for n in d["notes"])


def test_sd3_is_not_flux_and_flux_is_not_sd3(tmp_path: Path) -> None:
    sd3 = inspect_model(write_sparse_sd3(tmp_path / "a.safetensors", "sd3.5-large")).to_dict()
    flux = inspect_model(write_sparse_flux(tmp_path / "b.safetensors", "dev")).to_dict()
    assert sd3["arch"] == "sd3" and flux["arch"] == "flux"


SD3_DIFFUSERS_CASES = [
    # variant, prefixed, parameters of the MMDiT (billions: the original layout's)
    ("sd3-medium", False, 2.08),
    ("sd3.5-medium", True, 2.47),
    ("sd3.5-large", False, 8.15),
]


def test_inspect_names_sd3_in_the_diffusers_layout(tmp_path: Path) -> None:
    """diffusers' SD3Transformer2DModel names (split to_q/to_k/to_v,
    pos_embed.proj): family sd3, its variant, layout diffusers."""
    paths = {f"{v}-{p}": write_sparse_sd3(tmp_path / f"{v}-{p}.safetensors", v, prefixed=p,
                                          layout="diffusers")
             for v, p, _ in SD3_DIFFUSERS_CASES}
    got = _inspect_json(paths, tmp_path)
    for variant, prefixed, billions in SD3_DIFFUSERS_CASES:
        d = got[f"{variant}-{prefixed}"]
        assert (d["arch"], d["variant"], d["layout"]) == ("sd3", variant, "diffusers")
        assert d["kind"] == "unet" and d["unknown_keys"] == []
        unet = d["components"]["unet"]
        assert unet["family"] == "SD3 transformer"
        assert unet["prefix"] == ("model.diffusion_model." if prefixed else "")
        assert abs(unet["n_params"] / 1e9 - billions) < 0.01
    flux = inspect_model(write_sparse_flux(tmp_path / "f.safetensors", "dev",
                                           layout="diffusers")).to_dict()
    assert flux["arch"] == "flux"


# --- Qwen-Image ---------------------------------------------------------------------


def test_inspect_names_qwen_image_family_variant_and_layout(tmp_path: Path) -> None:
    paths = {str(p): write_sparse_qwen_image(tmp_path / f"q{p}.safetensors", prefixed=p)
             for p in (False, True)}
    got = _inspect_json(paths, tmp_path)
    for prefixed in (False, True):
        d = got[str(prefixed)]
        assert (d["arch"], d["variant"], d["layout"]) == ("qwen_image", "qwen-image",
                                                          "diffusers")
        assert d["kind"] == "unet" and d["unknown_keys"] == []
        unet = d["components"]["unet"]
        assert unet["family"] == "Qwen-Image transformer"
        assert unet["prefix"] == ("model.diffusion_model." if prefixed else "")
        assert abs(unet["n_params"] / 1e9 - 20.43) < 0.01  # Qwen-Image has 20B
        assert not any("recognised only" in n for n in d["notes"])


def test_qwen_image_is_not_flux_diffusers(tmp_path: Path) -> None:
    flux = write_sparse_flux(tmp_path / "f.safetensors", "dev", layout="diffusers")
    qwen = write_sparse_qwen_image(tmp_path / "q.safetensors")
    assert inspect_model(flux).to_dict()["arch"] == "flux"
    assert inspect_model(qwen).to_dict()["arch"] == "qwen_image"


# --- Wan 2.1 / 2.2 --------------------------------------------------------------------

WAN_CASES = [
    # variant, layout, prefixed, parameters (billions; diffusers' classes on
    # the meta device count the same)
    ("t2v-1.3b", "original", False, 1.42),
    ("t2v-1.3b", "original", True, 1.42),
    ("t2v-14b", "original", True, 14.29),
    ("i2v-14b", "original", False, 16.39),
    ("vace", "original", True, 17.34),
    ("ti2v-5b", "original", False, 5.00),
    ("t2v-1.3b", "diffusers", False, 1.42),
    ("t2v-14b", "diffusers", False, 14.29),
    ("i2v-14b", "diffusers", True, 16.39),
    ("ti2v-5b", "diffusers", False, 5.00),
    ("vace", "diffusers", False, 17.34),
]


def test_inspect_names_wan_family_variant_and_layout(tmp_path: Path) -> None:
    paths = {f"{v}-{lay}-{p}": write_sparse_wan(tmp_path / f"{v}-{lay}-{p}.safetensors", v,
                                                layout=lay, prefixed=p)
             for v, lay, p, _ in WAN_CASES}
    got = _inspect_json(paths, tmp_path)
    for variant, layout, prefixed, billions in WAN_CASES:
        d = got[f"{variant}-{layout}-{prefixed}"]
        assert (d["arch"], d["variant"], d["layout"]) == ("wan", variant, layout)
        assert d["kind"] == "unet" and d["unknown_keys"] == []
        unet = d["components"]["unet"]
        assert unet["family"] == "Wan transformer"
        assert unet["prefix"] == ("model.diffusion_model." if prefixed else "")
        assert abs(unet["n_params"] / 1e9 - billions) < 0.01
        assert not any("recognised only" in n for n in d["notes"])


# --- the commands that do not handle a family refuse it in one line ----------------


def test_refusals_of_the_transformer_families_are_one_line(tmp_path: Path) -> None:
    """Through the command line's own function (in process; the console
    script's codes: tests/test_cli_exit_codes.py): each refusal (no EMA in
    a transformer file, two families in one merge) is one line naming the
    file or family, exit 2, no file."""
    sd3 = write_sparse_sd3(tmp_path / "sd3.safetensors", "sd3-medium", all_in_one=True)
    qwen = write_sparse_qwen_image(tmp_path / "q.safetensors", prefixed=True, tiny=True)
    wan = write_sparse_wan(tmp_path / "w.safetensors", "t2v-14b", tiny=True)
    chroma = write_sparse_dit(tmp_path / "chroma.safetensors", "chroma", tiny=True)
    z_image = write_sparse_dit(tmp_path / "z.safetensors", "z_image")
    assert inspect_model(qwen).to_dict()["arch"] == "qwen_image"
    assert inspect_model(wan).to_dict()["arch"] == "wan"
    cases = {  # name: (arguments, what the line must say)
        "ema sd3": (["ema", str(sd3)], ("sd3.safetensors", "has no EMA weights")),
        "ema qwen": (["ema", str(qwen)], ("q.safetensors", "has no EMA weights")),
        "merge wan chroma": (["merge", str(wan), str(chroma)], ("chroma", "wan")),
        "ema z_image": (["ema", str(z_image)], ("has no EMA weights",)),
    }
    res = run_here({n: [*a, "-o", str(tmp_path / f"{n}.safetensors")]
                    for n, (a, _) in cases.items()}, tmp_path)
    for name, (_, words) in cases.items():
        code, _, err = res[name]
        assert code == 2, (name, err)
        assert "\n" not in err.strip() and all(w in err for w in words), (name, err)
        assert not (tmp_path / f"{name}.safetensors").exists()


# --- the families are not confused with each other ---------------------------------


def test_each_family_is_named_as_itself(tmp_path: Path) -> None:
    """One full-size file of every transformer family: each reads as its own
    family only (no rule of another family holds)."""
    files = {
        ("flux", "dev"): write_sparse_flux(tmp_path / "f.safetensors", "dev"),
        ("flux", "schnell"): write_sparse_flux(tmp_path / "fd.safetensors", "schnell",
                                               layout="diffusers"),
        ("sd3", "sd3.5-large"): write_sparse_sd3(tmp_path / "s.safetensors", "sd3.5-large"),
        ("qwen_image", "qwen-image"): write_sparse_qwen_image(tmp_path / "q.safetensors"),
        ("wan", "i2v-14b"): write_sparse_wan(tmp_path / "w.safetensors", "i2v-14b"),
        ("wan", "ti2v-5b"): write_sparse_wan(tmp_path / "w5.safetensors", "ti2v-5b"),
        ("wan", "t2v-14b"): write_sparse_wan(tmp_path / "wd.safetensors", "t2v-14b",
                                             layout="diffusers"),
        ("chroma", "chroma"): write_sparse_dit(tmp_path / "c.safetensors", "chroma"),
        ("flux2", "dev"): write_sparse_dit(tmp_path / "f2.safetensors", "flux2",
                                           layout="diffusers"),
        ("z_image", "z-image"): write_sparse_dit(tmp_path / "z.safetensors", "z_image"),
    }
    from modelkit.io.header import read_header

    for (arch, variant), path in files.items():
        d = inspect_model(path).to_dict()
        assert (d["arch"], d["variant"]) == (arch, variant), path
        keys = {k: v.shape for k, v in read_header(path).tensors.items()}
        holding = {a.name for a in registry.REGISTRY.values() for r in a.detect
                   if r.holds(keys)}
        assert holding == {arch}, (path, holding)


def test_detect_only_families() -> None:
    """The families after SDXL are named by inspect and handled by every
    command: none is recognised only."""
    assert registry.names(where=lambda a: a.support != registry.FULL) == ()
    assert registry.names(support=registry.DETECT) == ()
    for command in ("hash", "library", "tui"):
        assert registry.handling(command) == registry.names()


# --- the generated tables against diffusers' classes (meta device, no memory) -------


def test_generated_tables_match_diffusers_classes() -> None:
    """Qwen-Image and Wan, VACE included (diffusers layout): the same keys and
    shapes as the diffusers classes; SD3 (fused qkv): the same parameter count."""
    import math

    pytest.importorskip("diffusers")
    import torch
    from diffusers import (
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
        WanTransformer3DModel,
        WanVACETransformer3DModel,
    )

    from modelkit.arch import qwen_image, sd3, wan

    def table(cls: type, **kw: object) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in cls(**kw).state_dict().items()}

    assert table(QwenImageTransformer2DModel) == qwen_image.transformer_keys(
        qwen_image.VARIANTS["qwen-image"])
    assert table(WanTransformer3DModel, in_channels=36, image_dim=1280,
                 added_kv_proj_dim=5120) == wan.transformer_keys(wan.VARIANTS["i2v-14b"],
                                                                 "diffusers")
    assert table(WanTransformer3DModel, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                 in_channels=48, out_channels=48) == wan.transformer_keys(
                     wan.VARIANTS["ti2v-5b"], "diffusers")
    assert table(WanVACETransformer3DModel) == wan.transformer_keys(wan.VARIANTS["vace"],
                                                                     "diffusers")
    ref = table(SD3Transformer2DModel, sample_size=128, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16,
                qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    mine = sd3.transformer_keys(sd3.VARIANTS["sd3.5-medium"])
    assert sum(map(math.prod, ref.values())) == sum(map(math.prod, mine.values()))
    assert ref["pos_embed.pos_embed"] == mine["pos_embed"]
    # the diffusers layout convert --layout writes: the class's own table
    from modelkit.arch import layouts

    plan = layouts.to_diffusers(layouts.family_map("sd3", mine, "original", "x"), mine, "x")
    assert {k: t.shape for k, t in plan.items()} == ref


# --- Chroma, Flux.2 and Z-Image ---------------------------------------------------

DIT_CASES = [
    # family, variant, layout, prefixed, parameters (billions), family label
    ("chroma", "chroma", "original", False, 8.90, "Chroma transformer"),
    ("chroma", "chroma", "diffusers", True, 8.90, "Chroma transformer"),
    ("flux2", "dev", "original", True, 32.22, "Flux.2 transformer"),
    ("flux2", "dev", "diffusers", False, 32.22, "Flux.2 transformer"),
    ("z_image", "z-image", "original", False, 6.15, "Z-Image transformer"),
    ("z_image", "z-image", "diffusers", True, 6.15, "Z-Image transformer"),
]


def test_inspect_names_chroma_flux2_and_z_image(tmp_path: Path) -> None:
    """Full-size headers of both layouts, bare or under
    ``model.diffusion_model.``: family, variant, layout and size."""
    paths = {f"{f}-{lay}-{p}": write_sparse_dit(tmp_path / f"{f}-{lay}-{p}.safetensors", f,
                                                layout=lay, prefixed=p)
             for f, _, lay, p, _, _ in DIT_CASES}
    got = _inspect_json(paths, tmp_path)
    for family, variant, layout, prefixed, billions, label in DIT_CASES:
        d = got[f"{family}-{layout}-{prefixed}"]
        assert (d["arch"], d["variant"], d["layout"], d["kind"]) == (
            family, variant, layout, "unet")
        assert d["unknown_keys"] == []
        unet = d["components"]["unet"]
        assert unet["family"] == label
        assert unet["prefix"] == ("model.diffusion_model." if prefixed else "")
        assert abs(unet["n_params"] / 1e9 - billions) < 0.01


def test_chroma_flux2_and_z_image_tables_match_diffusers_classes() -> None:
    """The diffusers layouts equal diffusers' own classes key for key and
    shape for shape; the original layouts hold the same parameter count."""
    import math

    pytest.importorskip("diffusers")
    import torch
    from diffusers import (
        ChromaTransformer2DModel,
        Flux2Transformer2DModel,
        ZImageTransformer2DModel,
    )

    from modelkit.arch import chroma, flux2, z_image

    for module, cls in ((chroma, ChromaTransformer2DModel), (flux2, Flux2Transformer2DModel),
                        (z_image, ZImageTransformer2DModel)):
        with torch.device("meta"):
            ref = {k: tuple(v.shape) for k, v in cls().state_dict().items()}
        cfg = next(iter(module.VARIANTS.values()))
        assert module.transformer_keys(cfg, "diffusers") == ref, module.__name__
        original = module.transformer_keys(cfg, "original")
        assert sum(map(math.prod, original.values())) == sum(map(math.prod, ref.values()))


def test_sd_checkpoints_are_not_read_as_the_new_families(models: dict[str, Path]) -> None:
    """No SD1/SD2/SDXL/refiner file reads as SD3, Qwen-Image or Wan."""
    new = set(registry.names(where=lambda a: a.spec is None))
    for name, arch in (("sd1", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl"),
                       ("sdxl_refiner", "sdxl_refiner"), ("sdxl_unet", "sdxl"),
                       ("sd1_unet_prefixed", "sd1")):
        d = inspect_model(models[name]).to_dict()
        assert d["arch"] == arch and d["arch"] not in new, name
