"""``lora extract``, ``resize``, ``merge`` and ``convert`` (issue 19) for SD3,
Qwen-Image, Wan, Chroma, Flux.2 and Z-Image on each family's small config:
every result is checked against an independent computation (the base plus
a known low-rank ΔW, ΔW placed by hand from the module names and the row
slices written out in tests/test_family_lora.py, torch.linalg.svd in
float64), never against the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.cli import main
from tests.cli_support import ok as _ok
from tests.file_support import metadata as _meta
from tests.file_support import tensors as _tensors
from tests.test_family_lora import FAMILIES, Module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RANK = 2  # of the fine-tune's ΔW
FAMILY_NAMES = list(FAMILIES)
# what kohya sd-scripts / musubi-tuner write (ss_base_model_version,
# modelspec.architecture); None: no trainer names one, nothing is written
META = {"sd3": (None, None), "qwen_image": ("qwen_image", "Qwen-Image/lora"),
        "wan": ("wan", "wan2.1/lora"), "chroma": ("chroma", "chroma/lora"),
        "flux2": ("flux_2_dev", None), "z_image": ("z_image", "Z-Image/lora")}
# a weight PEFT has no name for: SD3's last context adaLN (context_pre_only,
# 2h rows), which diffusers stores with its halves swapped and the table (for
# 38 blocks) names as an ordinary block's
NO_PEFT: dict[str, set[str]] = {}  # every weight has a PEFT name (SD3 pre-only adaLN: swapped)
ADALN = "final_layer.adaLN_modulation.1"  # diffusers' norm_out.linear: halves swapped
BIG = 1 << 20  # weights above this many elements (Z-Image's caption embedder) stay zero





def _flat(key: str) -> str:
    return key.removesuffix(".weight").replace(".", "_")


def _linear(w: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in w.items() if t.ndim == 2 and k.endswith(".weight") and t.numel() < BIG]


def _some(family: str) -> set[str]:
    """The weights the modules of tests/test_family_lora.py patch (fused
    q/k/v and linear1 among them) and the final adaLN: where the fine-tune
    differs, and what resize works on (every weight would only make the
    tests slower)."""
    keys, kohya, peft = FAMILIES[family]()
    return {key for _, key, _, _ in kohya + peft} | ({f"{ADALN}.weight"} & set(keys))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: an F32 base and a fine-tune: base + a seeded rank-2 ΔW on
    the weights of :func:`_some`."""
    d = tmp_path_factory.mktemp("familyops")
    out = {}
    for i, (family, make) in enumerate(FAMILIES.items()):
        keys, _, _ = make()
        if "pos_embed" in keys:  # SD3's 192x192 patch grid: read and copied, never patched
            keys["pos_embed"] = (1, 64, keys["pos_embed"][2])
        gen = torch.Generator().manual_seed(100 + i)
        w = {k: (torch.zeros(s, dtype=torch.float16) if math.prod(s) >= BIG
                 else torch.randn(s, generator=gen) * 0.1) for k, s in keys.items()}
        tuned = dict(w)
        for k in sorted(_some(family)):
            a = torch.randn(w[k].shape[0], RANK, generator=gen)
            b = torch.randn(RANK, w[k].shape[1], generator=gen)
            tuned[k] = w[k] + 0.05 * (a @ b)
        paths = {"base": d / f"{family}.safetensors", "tuned": d / f"{family}_t.safetensors",
                 "dir": d}
        save_file(w, str(paths["base"]))
        save_file(tuned, str(paths["tuned"]))
        out[family] = paths
    return out


def _kohya_lora(path: Path, w: dict[str, torch.Tensor], rank: int, alpha: float, seed: int,
                skip: set[str] | frozenset[str] = frozenset(), only: set[str] | None = None,
                metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A kohya LoRA on every 2-D weight (or those of ``only``) but the
    ``skip`` paths (whole-weight modules, names by hand)."""
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for k in _linear(w):
        if k.removesuffix(".weight") in skip or (only is not None and k not in only):
            continue
        name = "lora_unet_" + _flat(k)
        t[f"{name}.lora_down.weight"] = torch.randn(rank, w[k].shape[1], generator=gen) * 0.1
        t[f"{name}.lora_up.weight"] = torch.randn(w[k].shape[0], rank, generator=gen) * 0.1
        t[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(t, str(path), metadata=metadata)
    return t


def _kohya_delta(lora: dict[str, torch.Tensor], w: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Weight key -> ΔW (float64) of a kohya LoRA with whole-weight modules."""
    by_name = {"lora_unet_" + _flat(k): k for k in w}
    out = {}
    for key in lora:
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            up, down = lora[key].double(), lora[f"{name}.lora_down.weight"].double()
            alpha = lora.get(f"{name}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[by_name[name]] = scale * (up @ down)
    return out


def _placed(w: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], modules: list[Module],
            scale: float, down: str, up: str) -> dict[str, torch.Tensor]:
    """Weight key -> ΔW (float64) of ``modules`` at the rows their names say."""
    out: dict[str, torch.Tensor] = {}
    for name, key, r0, r1 in modules:
        acc = out.setdefault(key, torch.zeros(w[key].shape, dtype=torch.float64))
        stop = r1 if r1 is not None else acc.shape[0]
        acc[r0:stop] += scale * (lora[f"{name}.{up}"].double() @ lora[f"{name}.{down}"].double())
    return out


# --- extract -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_extract_bakes_back_to_the_fine_tune(models: dict[str, dict[str, Path]],
                                             tmp_path: Path, family: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    m = models[family]
    w0, want = _tensors(m["base"]), _tensors(m["tuned"])
    lora, out = tmp_path / "x.safetensors", tmp_path / "b.safetensors"
    fmt = "kohya" if family in ("qwen_image", "wan") else "peft"  # split q/k/v, norm_out
    assert main(["lora", "extract", str(m["base"]), str(m["tuned"]), "-o", str(lora),
                 "--rank", "4", "--dtype", "fp32", "--format", fmt, "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["relative_error"] < 1e-5
    assert set(report["left_out"]) == (NO_PEFT.get(family, set()) if fmt == "peft" else set())
    keys = _tensors(lora)
    prefix = {"kohya": "lora_unet_", "peft": "transformer."}[fmt]
    assert keys and all(k.startswith(prefix) for k in keys)
    meta = _meta(lora)
    version, spec = META[family]
    assert meta.get("ss_base_model_version") == version
    assert meta.get("modelspec.architecture") == spec
    assert not any(str(m["dir"]) in v or str(tmp_path) in v for v in meta.values())
    _ok("lora", "bake", m["base"], lora, "-o", out)
    got = _tensors(out)
    left = {f"{p}.weight" for p in report["left_out"]}  # PEFT has no name for them
    for key, t in got.items():
        expect = w0[key] if key in left else want[key]
        torch.testing.assert_close(t, expect, rtol=0, atol=5e-6, msg=key)
    assert all(not torch.equal(got[k], w0[k]) for k in _some(family) - left)


# --- convert -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_convert_kohya_peft_kohya_keeps_every_delta(models: dict[str, dict[str, Path]],
                                                    tmp_path: Path, family: str) -> None:
    m = models[family]
    w = _tensors(m["base"])
    src, peft, back, comfy = (tmp_path / f"{n}.safetensors" for n in ("k", "p", "k2", "c"))
    k = _kohya_lora(src, w, rank=3, alpha=1.5, seed=7, skip=NO_PEFT.get(family, set()))
    _ok("lora", "convert", src, "--to", "peft", "-o", peft)
    # SD3's PEFT names are Flux.1's (transformer.transformer_blocks.N.attn.to_q): --arch
    _ok("lora", "convert", peft, "--to", "kohya", "-o", back,
        *(["--arch", family] if family == "sd3" else []))
    _ok("lora", "convert", src, "--to", "comfyui", "-o", comfy)
    want = _kohya_delta(k, w)
    p, k2, c = _tensors(peft), _tensors(back), _tensors(comfy)
    assert all(n.startswith("transformer.") for n in p)
    assert not any(n.endswith(".alpha") for n in p)
    got = _kohya_delta(k2, w)
    assert set(got) == set(want)
    for key, delta in got.items():
        torch.testing.assert_close(delta, want[key], rtol=0, atol=1e-9, msg=key)
    # ComfyUI: the same tensors under diffusion_model.<path>
    for key in want:
        name = "lora_unet_" + _flat(key)
        cname = "diffusion_model." + key.removesuffix(".weight")
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert torch.equal(c[f"{cname}.{suffix}"], k[f"{name}.{suffix}"]), key
    # the PEFT modules of tests/test_family_lora.py, at their rows by hand: alpha/r folded in
    _, _, peft_mods = FAMILIES[family]()
    hand = _placed(w, p, [x for x in peft_mods if f"{x[0]}.lora_B.weight" in p], 1.0,
                   "lora_A.weight", "lora_B.weight")
    assert hand
    for key, delta in hand.items():
        rows = delta.abs().sum(1) > 0
        torch.testing.assert_close(delta[rows], want[key][rows], rtol=0, atol=1e-9, msg=key)
    if family in ("sd3", "flux2"):  # norm_out.linear: the up rows with halves swapped, by hand
        up = k[f"lora_unet_{_flat(ADALN)}.lora_up.weight"]
        half = up.shape[0] // 2
        assert torch.equal(p["transformer.norm_out.linear.lora_B.weight"],
                           0.5 * torch.cat([up[half:], up[:half]]))
        # and bake puts it back in the original order
        _ok("lora", "bake", m["base"], peft, "-o", tmp_path / "b.safetensors")
        got_w = _tensors(tmp_path / "b.safetensors")[f"{ADALN}.weight"]
        torch.testing.assert_close(got_w.double(), w[f"{ADALN}.weight"].double()
                                   + want[f"{ADALN}.weight"], rtol=0, atol=1e-6)


def test_convert_sd3_fused_qkv_splits_by_rows_and_fuses_back(
        models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    w = _tensors(models["sd3"]["base"])
    src, peft, back = (tmp_path / f"{n}.safetensors" for n in ("k", "p", "k2"))
    k = _kohya_lora(src, w, rank=3, alpha=6.0, seed=8, skip=set())  # s = 2
    _ok("lora", "convert", src, "--to", "peft", "-o", peft)
    _ok("lora", "convert", peft, "--to", "kohya", "-o", back, "--arch", "sd3")
    p, k2 = _tensors(peft), _tensors(back)
    h = w["joint_blocks.0.x_block.attn.qkv.weight"].shape[1]
    name = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    up, down = k[f"{name}.lora_up.weight"], k[f"{name}.lora_down.weight"]
    for i, proj in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        split = f"transformer.transformer_blocks.1.attn.{proj}"
        assert torch.equal(p[f"{split}.lora_A.weight"], down)
        assert torch.equal(p[f"{split}.lora_B.weight"], 2.0 * up[i * h:(i + 1) * h])
    # fused back: the three downs stacked (rank 9), alpha = rank
    assert k2[f"{name}.lora_down.weight"].shape == (9, h)
    assert float(k2[f"{name}.alpha"]) == 9.0


# --- merge and resize ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_of_kohya_and_peft_is_the_sum_of_their_delta(
        models: dict[str, dict[str, Path]], tmp_path: Path, family: str) -> None:
    from tests.test_family_lora import _write_lora

    w = _tensors(models[family]["base"])
    _, kohya, peft = FAMILIES[family]()
    ka, pb, out = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "m"))
    la = _write_lora(ka, w, kohya, alpha=8.0, seed=11)  # s = 2
    lb = _write_lora(pb, w, peft, down="lora_A.weight", up="lora_B.weight", seed=12)  # s = 1
    _ok("lora", "merge", f"{ka}:0.5", f"{pb}:-1", "-o", out, "--rank", 32, "--dtype", "fp32")
    want = _placed(w, la, kohya, 0.5 * 2.0, "lora_down.weight", "lora_up.weight")
    for key, delta in _placed(w, lb, peft, -1.0, "lora_A.weight", "lora_B.weight").items():
        want[key] = want.get(key, torch.zeros_like(delta)) + delta
    got = _kohya_delta(_tensors(out), w)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=0, atol=1e-5, msg=key)
    assert _meta(out).get("ss_base_model_version") == META[family][0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_resize_equals_the_truncated_svd(models: dict[str, dict[str, Path]], tmp_path: Path,
                                         family: str) -> None:
    w = _tensors(models[family]["base"])
    src, out = tmp_path / "k.safetensors", tmp_path / "r.safetensors"
    # the trainer's metadata names the family (a Chroma LoRA has Flux.1 names)
    version = META[family][0]
    k = _kohya_lora(src, w, rank=6, alpha=3.0, seed=13, only=_some(family),
                    metadata={"ss_base_model_version": version} if version else None)
    _ok("lora", "resize", src, "--rank", 2, "--dtype", "fp32", "-o", out)
    assert _meta(out).get("ss_base_model_version") == version
    r = _tensors(out)
    full, got = _kohya_delta(k, w), _kohya_delta(r, w)
    assert set(full) == set(got)
    for key, delta in full.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        want = (u[:, :2] * s[:2]) @ vh[:2]
        assert r[f"lora_unet_{_flat(key)}.lora_down.weight"].shape[0] == 2
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-5, msg=key)
        tail = float(s[2:].square().sum().sqrt())  # Eckart-Young: the optimum's error
        assert abs(float((delta - got[key]).norm()) - tail) <= 1e-4 * tail, key


def test_resize_to_peft_writes_the_final_adaln_with_halves_swapped(
        models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    w = _tensors(models["flux2"]["base"])
    src, out = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    k = _kohya_lora(src, w, rank=3, alpha=6.0, seed=17, only={f"{ADALN}.weight"})
    _ok("lora", "resize", src, "--rank", 3, "--dtype", "fp32", "--format", "peft", "-o", out)
    p = _tensors(out)
    assert set(p) == {f"transformer.norm_out.linear.lora_{x}.weight" for x in "AB"}
    delta = _kohya_delta(k, w)[f"{ADALN}.weight"]
    half = delta.shape[0] // 2
    got = (p["transformer.norm_out.linear.lora_B.weight"].double()
           @ p["transformer.norm_out.linear.lora_A.weight"].double())
    torch.testing.assert_close(got, torch.cat([delta[half:], delta[:half]]), rtol=0, atol=1e-6)


# --- help and refusals -----------------------------------------------------------------


def test_lora_help_lists_every_family_for_the_four_commands(
        capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.arch import registry

    for cmd in ("extract", "resize", "merge", "convert"):
        assert main(["lora", cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        families = text.split("Families: ")[1]
        assert "Refused" not in families, cmd
        for name in (*FAMILY_NAMES, "flux", "sd1", "sdxl"):
            assert registry.handles(name, f"lora {cmd}")
            assert registry.label(name) in families or name in families, (cmd, name)


def test_refusals_in_one_line(models: dict[str, dict[str, Path]], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 2, no file: a Wan LoRA merged with a Qwen-Image one;
    extract from two families; a resize to rank 0."""
    from tests.test_family_lora import _write_lora

    wan_w, qwen_w = _tensors(models["wan"]["base"]), _tensors(models["qwen_image"]["base"])
    _, wan_k, _ = FAMILIES["wan"]()
    _, qwen_k, _ = FAMILIES["qwen_image"]()
    _write_lora(tmp_path / "wan.safetensors", wan_w, wan_k)
    _write_lora(tmp_path / "qwen.safetensors", qwen_w, qwen_k)
    sd3_w = _tensors(models["sd3"]["base"])
    _kohya_lora(tmp_path / "s3.safetensors", sd3_w, rank=2, alpha=2.0, seed=3,
                only={"joint_blocks.1.context_block.adaLN_modulation.1.weight"})
    bad = str(tmp_path / "bad.safetensors")
    cases = {
        "merge": ["lora", "merge", "wan.safetensors", "qwen.safetensors", "-o", bad,
                  "--rank", "2"],
        "extract": ["lora", "extract", str(models["wan"]["base"]),
                    str(models["qwen_image"]["tuned"]), "-o", bad, "--rank", "2"],
        "rank": ["lora", "resize", "s3.safetensors", "--rank", "0", "-o", bad],
    }
    # in process (the console script's exit codes: tests/test_cli_exit_codes.py)
    monkeypatch.chdir(tmp_path)
    res = {}
    for case, argv in cases.items():
        code = main(argv)
        res[case] = (code, "", capsys.readouterr().err)
    for case, (code, _, err) in res.items():
        assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
    assert not Path(bad).exists()
    assert "(wan)" in res["merge"][2] and "(qwen_image)" in res["merge"][2]
    assert "wan" in res["extract"][2] and "qwen" in res["extract"][2].lower()
    assert "--rank" in res["rank"][2]

def test_sd3_pre_only_adaln_converts_to_peft_with_halves_swapped(
        models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """The last joint block's context adaLN ([2h, h]): diffusers' norm1_context
    holds it with shift and scale swapped, whatever the depth; the PEFT up is
    the kohya up (alpha/r folded) with its halves swapped, and both bake the same."""
    w = _tensors(models["sd3"]["base"])
    key = "joint_blocks.1.context_block.adaLN_modulation.1.weight"
    assert w[key].shape[0] == 2 * w[key].shape[1]  # the pre-only block of this depth
    src, peft = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    k = _kohya_lora(src, w, rank=2, alpha=1.0, seed=5, only={key})  # s = 0.5
    _ok("lora", "convert", src, "--to", "peft", "-o", peft)
    up = k[f"lora_unet_{_flat(key)}.lora_up.weight"]
    half = up.shape[0] // 2
    b = _tensors(peft)["transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight"]
    assert torch.equal(b, 0.5 * torch.cat([up[half:], up[:half]]))
    for lora, out in ((src, "bk.safetensors"), (peft, "bp.safetensors")):
        _ok("lora", "bake", models["sd3"]["base"], lora, "-o", tmp_path / out)
    got_k, got_p = _tensors(tmp_path / "bk.safetensors"), _tensors(tmp_path / "bp.safetensors")
    assert not torch.equal(got_k[key], w[key]) and torch.equal(got_k[key], got_p[key])
