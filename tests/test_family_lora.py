"""LoRA bake and info for the transformer families (SD3, Chroma, Flux.2,
Qwen-Image, Wan, Z-Image) and the other LoRA formats of Flux.1 (XLabs,
OneTrainer, SimpleTuner LyCORIS): every patched weight is checked against
W + s·up@down computed here, on the row slice the module's name says
(written out by hand below, not taken from the tables); alpha from the
tensor, the header metadata or neither; a LoRA of another family is
refused naming both, and a Wan 2.1 image-to-video LoRA on a Wan 2.2 file
gets a report of what matches."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.arch import chroma, flux2, qwen_image, registry, sd3, wan, z_image
from modelkit.arch.configs import UNET_PREFIX
from modelkit.cli import main
from modelkit.io.reader import open_model
from modelkit.testing import flux_config
from tests.cli_support import run_here

Shape = tuple[int, ...]
RANK = 4


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_model(path) as f:
        return {k: f.get(k).clone() for k in f.infos}


def _write_base(path: Path, keys: dict[str, Shape], *, prefix: str = "", seed: int = 0
                ) -> None:
    gen = torch.Generator().manual_seed(seed)

    def value(shape: Shape) -> torch.Tensor:
        if math.prod(shape) > 1 << 20:  # Z-Image's full-width caption embedder: read, not baked
            return torch.zeros(shape, dtype=torch.float16)
        return torch.randn(shape, generator=gen) * 0.1

    save_file({prefix + k: value(s) for k, s in keys.items()}, str(path))


# a module: (adapter module name, target key, first row, last row + 1 or None for all)
Module = tuple[str, str, int, int | None]


def _write_lora(path: Path, base: dict[str, torch.Tensor], modules: list[Module], *,
                down: str = "lora_down.weight", up: str = "lora_up.weight",
                alpha: float | None = None, metadata: dict[str, str] | None = None,
                seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, key, r0, r1 in modules:
        w = base[key]
        rows = (r1 if r1 is not None else w.shape[0]) - r0
        out[f"{name}.{down}"] = torch.randn(RANK, w.shape[1], generator=gen) * 0.1
        out[f"{name}.{up}"] = torch.randn(rows, RANK, generator=gen) * 0.1
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path), metadata=metadata)
    return out


def _expected(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
              modules: list[Module], scale: float, *, down: str = "lora_down.weight",
              up: str = "lora_up.weight") -> dict[str, torch.Tensor]:
    want = {k: v.clone() for k, v in base.items()}
    for name, key, r0, r1 in modules:
        stop = r1 if r1 is not None else want[key].shape[0]
        want[key][r0:stop] += scale * (lora[f"{name}.{up}"] @ lora[f"{name}.{down}"])
    return want


def _bake(base: Path, lora: Path, out: Path, *extra: str) -> None:
    assert main(["lora", "bake", str(base), str(lora), "-o", str(out), "-q", *extra]) == 0


def _check(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
           modules: list[Module]) -> None:
    patched = {key for _, key, _, _ in modules}
    for key, w in want.items():
        assert torch.equal(got[key], w), key
    assert patched  # the untouched ones were compared above too


# --- per family: a small base and modules in every naming it has ----------------------

def _sd3() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = sd3.SD3Config(depth=2)  # hidden 128
    h = cfg.hidden
    x, c = "joint_blocks.0.x_block", "joint_blocks.1.context_block"
    kohya = [("lora_unet_joint_blocks_0_x_block_attn_qkv", f"{x}.attn.qkv.weight", 0, None),
             ("diffusion_model.joint_blocks.0.x_block.mlp.fc2", f"{x}.mlp.fc2.weight", 0, None)]
    peft = [("transformer.transformer_blocks.0.attn.to_k", f"{x}.attn.qkv.weight", h, 2 * h),
            ("transformer.transformer_blocks.1.attn.add_v_proj", f"{c}.attn.qkv.weight",
             2 * h, 3 * h),
            ("transformer.transformer_blocks.1.ff.net.0.proj",
             "joint_blocks.1.x_block.mlp.fc1.weight", 0, None),
            ("transformer.context_embedder", "context_embedder.weight", 0, None)]
    return sd3.transformer_keys(cfg), kohya, peft


def _qwen() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = qwen_image.small(qwen_image.QwenImageConfig())
    b = "transformer_blocks"
    kohya = [(f"lora_unet_{b}_0_attn_to_q", f"{b}.0.attn.to_q.weight", 0, None),
             (f"{b}.1.img_mlp.net.0.proj", f"{b}.1.img_mlp.net.0.proj.weight", 0, None),
             (f"diffusion_model.{b}.1.attn.add_k_proj", f"{b}.1.attn.add_k_proj.weight", 0,
              None)]
    peft = [(f"transformer.{b}.0.txt_mod.1", f"{b}.0.txt_mod.1.weight", 0, None),
            (f"transformer.{b}.1.attn.to_out.0", f"{b}.1.attn.to_out.0.weight", 0, None)]
    return qwen_image.transformer_keys(cfg), kohya, peft


def _wan() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = wan.small(wan.VARIANTS["t2v-1.3b"])
    kohya = [("lora_unet_blocks_0_self_attn_q", "blocks.0.self_attn.q.weight", 0, None),
             ("diffusion_model.blocks.1.ffn.0", "blocks.1.ffn.0.weight", 0, None),
             ("lora_unet__blocks_1_cross_attn_o", "blocks.1.cross_attn.o.weight", 0, None)]
    peft = [("transformer.blocks.0.attn2.to_k", "blocks.0.cross_attn.k.weight", 0, None),
            ("transformer.blocks.1.ffn.net.2", "blocks.1.ffn.2.weight", 0, None),
            ("transformer.condition_embedder.time_proj", "time_projection.1.weight", 0, None)]
    return wan.transformer_keys(cfg), kohya, peft


def _chroma() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = chroma.small(chroma.ChromaConfig())
    h = cfg.hidden_size
    kohya = [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight",
              0, None),
             ("lora_unet_single_blocks_1_linear2", "single_blocks.1.linear2.weight", 0, None)]
    peft = [("transformer.single_transformer_blocks.0.attn.to_v",
             "single_blocks.0.linear1.weight", 2 * h, 3 * h),
            ("transformer.single_transformer_blocks.0.proj_mlp",
             "single_blocks.0.linear1.weight", 3 * h, 7 * h),
            ("transformer.distilled_guidance_layer.layers.1.linear_2",
             "distilled_guidance_layer.layers.1.out_layer.weight", 0, None)]
    return chroma.transformer_keys(cfg), kohya, peft


def _flux2() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = flux2.small(flux2.Flux2Config())
    h = cfg.hidden_size
    kohya = [("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight", 0, None),
             ("lora_unet_double_stream_modulation_img_lin",
              "double_stream_modulation_img.lin.weight", 0, None)]
    peft = [("transformer.transformer_blocks.0.attn.add_k_proj",
             "double_blocks.0.txt_attn.qkv.weight", h, 2 * h),
            ("transformer.transformer_blocks.1.ff.linear_in", "double_blocks.1.img_mlp.0.weight",
             0, None),
            ("transformer.single_transformer_blocks.1.attn.to_out",
             "single_blocks.1.linear2.weight", 0, None)]
    return flux2.transformer_keys(cfg), kohya, peft


def _z_image() -> tuple[dict[str, Shape], list[Module], list[Module]]:
    cfg = z_image.small(z_image.ZImageConfig())
    d = cfg.dim
    keys = z_image.transformer_keys(cfg)
    keys["cap_embedder.1.weight"] = (3840, 2560)  # the width detection reads
    kohya = [("lora_unet_layers_0_attention_to_k", "layers.0.attention.qkv.weight", d, 2 * d),
             ("diffusion_model.layers.1.feed_forward.w2", "layers.1.feed_forward.w2.weight", 0,
              None),
             ("lora_unet_layers_1_attention_qkv", "layers.1.attention.qkv.weight", 0, None)]
    peft = [("transformer.noise_refiner.0.attention.to_out.0",
             "noise_refiner.0.attention.out.weight", 0, None),
            ("transformer.layers.0.attention.to_q", "layers.0.attention.qkv.weight", 0, d)]
    return keys, kohya, peft


FAMILIES: dict[str, Callable[[], tuple[dict[str, Shape], list[Module], list[Module]]]] = {
    "sd3": _sd3, "qwen_image": _qwen, "wan": _wan, "chroma": _chroma, "flux2": _flux2,
    "z_image": _z_image}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bake_every_family_kohya_with_alpha_tensor(family: str, tmp_path: Path) -> None:
    keys, kohya, _ = FAMILIES[family]()
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("base", "lora", "out"))
    # SD3 as a ComfyUI checkpoint (prefixed), the others as bare transformer files
    prefix = UNET_PREFIX if family == "sd3" else ""
    _write_base(base, keys, prefix=prefix)
    w = {k.removeprefix(prefix): v for k, v in _tensors(base).items()}
    la = _write_lora(lora, w, kohya, alpha=8.0)  # alpha 8 / rank 4: s = 2
    _bake(base, lora, out)
    got = {k.removeprefix(prefix): v for k, v in _tensors(out).items()}
    _check(got, _expected(w, la, kohya, 2.0), kohya)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bake_every_family_peft_split_rows_and_metadata_alpha(family: str, tmp_path: Path
                                                              ) -> None:
    keys, _, peft = FAMILIES[family]()
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("base", "lora", "out"))
    _write_base(base, keys, seed=3)
    w = _tensors(base)
    # alpha only in the header (Comfy-Org/ComfyUI PR #15830): 16 / 4 = 4
    meta = {"transformer.lora_alpha": "16", "transformer.r": "4"}
    la = _write_lora(lora, w, peft, down="lora_A.weight", up="lora_B.weight", metadata=meta,
                     seed=4)
    _bake(base, lora, out)
    _check(_tensors(out), _expected(w, la, peft, 4.0, down="lora_A.weight",
                                    up="lora_B.weight"), peft)


# --- Flux.1's other formats --------------------------------------------------------------


def _flux_base(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], int]:
    from modelkit.arch import flux

    cfg = flux_config(hidden=256, depth=2, single=2)
    base = tmp_path / "flux.safetensors"
    _write_base(base, flux.transformer_keys(cfg), seed=5)
    return base, _tensors(base), cfg.hidden_size


def test_flux_xlabs_onetrainer_and_no_alpha(tmp_path: Path) -> None:
    base, w, h = _flux_base(tmp_path)
    lora, out = tmp_path / "x.safetensors", tmp_path / "o.safetensors"
    # XLabs: qkv_lora2 is the text stream's fused qkv; a single block's qkv_lora
    # the q/k/v rows of linear1; no alpha: s = 1 (diffusers' reading)
    xlabs = [("double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv.weight", 0,
              None),
             ("double_blocks.1.processor.proj_lora1", "double_blocks.1.img_attn.proj.weight", 0,
              None),
             ("single_blocks.1.processor.qkv_lora", "single_blocks.1.linear1.weight", 0, 3 * h)]
    la = _write_lora(lora, w, xlabs, down="down.weight", up="up.weight")
    _bake(base, lora, out)
    _check(_tensors(out), _expected(w, la, xlabs, 1.0, down="down.weight", up="up.weight"),
           xlabs)
    # OneTrainer: lora_transformer_ + the diffusers path, kohya suffixes and alpha
    one = [("lora_transformer_single_transformer_blocks_0_proj_mlp",
            "single_blocks.0.linear1.weight", 3 * h, 7 * h),
           ("lora_transformer_transformer_blocks_1_attn_add_q_proj",
            "double_blocks.1.txt_attn.qkv.weight", 0, h)]
    la = _write_lora(lora, w, one, alpha=2.0, seed=9)  # s = 0.5
    _bake(base, lora, out, "--overwrite")
    _check(_tensors(out), _expected(w, la, one, 0.5), one)


def test_flux_simpletuner_lycoris_loha_and_lokr_on_split_rows(tmp_path: Path) -> None:
    base, w, h = _flux_base(tmp_path)
    lora, out = tmp_path / "l.safetensors", tmp_path / "o.safetensors"
    gen = torch.Generator().manual_seed(11)
    name = "lycoris_transformer_blocks_0_attn_to_v"  # rows 2h..3h of img_attn.qkv
    t = {f"{name}.hada_w1_a": torch.randn(h, 2, generator=gen) * 0.1,
         f"{name}.hada_w1_b": torch.randn(2, h, generator=gen) * 0.1,
         f"{name}.hada_w2_a": torch.randn(h, 2, generator=gen) * 0.1,
         f"{name}.hada_w2_b": torch.randn(2, h, generator=gen) * 0.1,
         f"{name}.alpha": torch.tensor(4.0)}  # s = 4 / 2
    lokr = "lycoris_single_transformer_blocks_1_attn_to_q"  # rows 0..h of linear1
    t[f"{lokr}.lokr_w1"] = torch.randn(16, 16, generator=gen) * 0.1  # full factors: s = 1
    t[f"{lokr}.lokr_w2"] = torch.randn(h // 16, h // 16, generator=gen) * 0.1
    save_file(t, str(lora))
    _bake(base, lora, out)
    got, key = _tensors(out), "double_blocks.0.img_attn.qkv.weight"
    dw = 2.0 * (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (
        t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"])
    want = w[key].clone()
    want[2 * h:3 * h] += dw
    torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
    assert torch.equal(got[key][:2 * h], w[key][:2 * h])
    key = "single_blocks.1.linear1.weight"
    want = w[key].clone()
    want[:h] += torch.kron(t[f"{lokr}.lokr_w1"], t[f"{lokr}.lokr_w2"])
    torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
    assert torch.equal(got[key][h:], w[key][h:])


# --- info, refusal, the Wan 2.1-on-2.2 report ------------------------------------------


def test_info_per_block_for_wan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.io.open import open_source
    from modelkit.lora.info import info

    keys, kohya, _ = _wan()
    base, lora = tmp_path / "b.safetensors", tmp_path / "l.safetensors"
    _write_base(base, keys)
    w = _tensors(base)
    la = _write_lora(lora, w, kohya, alpha=8.0)
    with open_source(lora) as src:
        rep = info(src)
    assert rep.arch == "wan" and rep.format == "lora" and rep.alpha_source == "tensor"
    # the family's block names, in order; the modules sit in blocks 0 and 1
    assert list(rep.blocks) == list(registry.get("wan").blocks.names)
    assert {k: b.n_modules for k, b in rep.blocks.items() if b.n_modules} == {
        "blocks.0": 1, "blocks.1": 2}
    for name, key, _, _ in kohya:  # ‖ΔW‖_F of s·up@down, by hand
        want = float((2.0 * la[f"{name}.lora_up.weight"] @ la[f"{name}.lora_down.weight"]
                      ).norm())
        layer = next(x for x in rep.layers if x.name == name)
        assert layer.key == UNET_PREFIX + key
        assert layer.delta_norm == pytest.approx(want, rel=1e-5)
    assert main(["lora", "info", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "lora for wan" in text and "alpha from tensor" in text
    assert text.index("  blocks.0 ") < text.index("  blocks.1 ")


def test_cross_family_refusal_and_wan21_report(tmp_path: Path) -> None:
    qkeys, _, _ = _qwen()
    wkeys, wkohya, _ = _wan()
    _write_base(tmp_path / "qwen.safetensors", qkeys)
    _write_base(tmp_path / "wan22.safetensors", wkeys)  # no k_img/v_img: text-to-video
    w = _tensors(tmp_path / "wan22.safetensors")
    _write_lora(tmp_path / "wanlora.safetensors", w, wkohya, alpha=4.0)
    # a Wan 2.1 I2V LoRA: the image cross-attention of both blocks besides the rest
    i2v = dict(_write_lora(tmp_path / "tmp.safetensors", w, wkohya, alpha=4.0))
    for i in range(2):
        for p in ("k_img", "v_img"):
            i2v[f"lora_unet_blocks_{i}_cross_attn_{p}.lora_down.weight"] = torch.ones(RANK, 128)
            i2v[f"lora_unet_blocks_{i}_cross_attn_{p}.lora_up.weight"] = torch.ones(128, RANK)
    save_file(i2v, str(tmp_path / "i2v.safetensors"))
    # a BFL control LoRA: full norm scales and an img_in LoRA beside the LoRA
    _, _, h = _flux_base(tmp_path)
    control = {"img_in.lora_A.weight": torch.ones(RANK, 64),
               "img_in.lora_B.weight": torch.ones(h, RANK),
               "double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(RANK, h),
               "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(3 * h, RANK),
               "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128)}
    save_file(control, str(tmp_path / "control.safetensors"))
    # a Flux.1 transformer in the diffusers layout and a kohya LoRA on a fused qkv: baked
    from modelkit.arch import flux

    fcfg = flux_config(hidden=256, depth=2, single=2)
    _write_base(tmp_path / "fluxd.safetensors", flux.transformer_keys(fcfg, "diffusers"))
    fused = [("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight",
              0, None)]
    _write_lora(tmp_path / "fused.safetensors", _tensors(tmp_path / "flux.safetensors"), fused)
    cases = {
        "control": ["lora", "bake", "flux.safetensors", "control.safetensors", "-o",
                    "c.safetensors"],
        "layout": ["lora", "bake", "fluxd.safetensors", "fused.safetensors", "-o",
                   "d.safetensors"],
        "cross": ["lora", "bake", "qwen.safetensors", "wanlora.safetensors", "-o", "x"],
        "wan21": ["lora", "bake", "wan22.safetensors", "i2v.safetensors", "-o", "y"],
        "wan21_ok": ["lora", "bake", "wan22.safetensors", "i2v.safetensors", "-o", "z.safetensors",
                     "--allow-unmatched"],
    }
    res = run_here(cases, tmp_path)
    code, _, err = res["cross"]
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("wanlora.safetensors: is a wan adapter but qwen.safetensors is a qwen_image "
            "checkpoint") in err
    code, _, err = res["wan21"]
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "i2v.safetensors: 3 of 7 modules match wan22.safetensors" in err
    assert "2 blocks.cross_attn.k_img, 2 blocks.cross_attn.v_img modules have no target" in err
    assert "Wan 2.1 I2V LoRA on a Wan 2.2" in err and "--allow-unmatched" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    code, _, err = res["control"]
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "control.safetensors: is a BFL Flux control LoRA" in err
    code, _, err = res["layout"]  # the fused qkv lands row by row (tests/test_bake_split.py)
    assert code == 0, err
    assert (tmp_path / "d.safetensors").exists()
    assert not list(tmp_path.glob("c.safetensors*"))
    code, out, err = res["wan21_ok"]
    assert code == 0, err
    assert "no target in the base: 2 blocks.cross_attn.k_img" in out
    got = _tensors(tmp_path / "z.safetensors")
    la = _tensors(tmp_path / "i2v.safetensors")
    _check(got, _expected(w, la, wkohya, 1.0), wkohya)


def test_family_tables_resolve_each_familys_own_names() -> None:
    from modelkit.arch.lora_modules import resolved_counts
    from modelkit.inspect.adapters import guess_arch

    for family, make in FAMILIES.items():
        _, kohya, peft = make()
        names = [n for n, _, _, _ in kohya + peft]
        counts = resolved_counts(names)
        assert counts[family] == len(names), family
        # Chroma's names are Flux.1's (the base decides which family bakes them)
        expect = ("chroma", "flux") if family == "chroma" else (family,)
        assert guess_arch(dict.fromkeys(names), {})[0] in expect, family  # type: ignore[arg-type]


def test_bare_bfl_names_bake(tmp_path: Path) -> None:
    base, w, _ = _flux_base(tmp_path)
    lora, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    bare = [("double_blocks.1.txt_mlp.0", "double_blocks.1.txt_mlp.0.weight", 0, None)]
    la = _write_lora(lora, w, bare, down="lora_A.weight", up="lora_B.weight", seed=13)
    _bake(base, lora, out)
    _check(_tensors(out), _expected(w, la, bare, 1.0, down="lora_A.weight",
                                    up="lora_B.weight"), bare)


def test_diffusers_layout_bases_take_modules_that_land_on_one_weight(tmp_path: Path) -> None:
    from modelkit.arch import flux

    # Wan: musubi (original names) and PEFT modules, each renamed onto diffusers' weight
    cfg = wan.small(wan.VARIANTS["t2v-1.3b"])
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("wd", "wl", "wo"))
    _write_base(base, wan.transformer_keys(cfg, wan.DIFFUSERS), seed=21)
    w = _tensors(base)
    mods = [("lora_unet_blocks_0_self_attn_q", "blocks.0.attn1.to_q.weight", 0, None),
            ("diffusion_model.blocks.1.ffn.0", "blocks.1.ffn.net.0.proj.weight", 0, None),
            ("lora_unet_head_head", "proj_out.weight", 0, None)]
    la = _write_lora(lora, w, mods, alpha=8.0, seed=22)
    _bake(base, lora, out)
    _check(_tensors(out), _expected(w, la, mods, 2.0), mods)
    # Flux.1: split diffusers projections land whole on to_k / proj_mlp
    fcfg = flux_config(hidden=256, depth=2, single=2)
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("fd", "fl", "fo"))
    _write_base(base, flux.transformer_keys(fcfg, "diffusers"), seed=23)
    w = _tensors(base)
    mods = [("transformer.transformer_blocks.1.attn.to_k",
             "transformer_blocks.1.attn.to_k.weight", 0, None),
            ("transformer.single_transformer_blocks.0.proj_mlp",
             "single_transformer_blocks.0.proj_mlp.weight", 0, None),
            ("lora_unet_single_blocks_1_linear2", "single_transformer_blocks.1.proj_out.weight",
             0, None)]
    la = _write_lora(lora, w, mods, alpha=8.0, seed=24)
    _bake(base, lora, out)
    _check(_tensors(out), _expected(w, la, mods, 2.0), mods)
